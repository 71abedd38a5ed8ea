"""What INPUT holds: a folder of scans, an nnU-Net ``imagesTs`` folder, DICOM studies, or a CSV manifest.

A ``Case`` is picklable (it travels to Ray workers): a path, a DICOM series UID where it is one, and its own
modality and prompt where a CSV gives them.
"""

from __future__ import annotations

import csv
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import BatchUsageError

SCAN_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".jpg", ".jpeg", ".tif", ".tiff")
_NNUNET_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_OUTPUT_MARKERS = (".seg.nrrd",)


@dataclass(frozen=True)
class Case:
    case_id: str
    path: str
    series_uid: str | None = None
    modality: str | None = None
    prompt: str | None = None

    @property
    def is_dicom(self) -> bool:
        return self.series_uid is not None


def scan_stem(path: Path) -> str | None:
    """The scan's name without its image suffix, or None when the file is not a scan."""
    name, lower = path.name, path.name.lower()
    if name.startswith(".") or lower.endswith(_OUTPUT_MARKERS):
        return None
    for suffix in SCAN_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def find_cases(source: str | Path, series_filter: str | None = None) -> list[Case]:
    """Every case of INPUT, in a stable order; a usage error in one line when there is none."""
    p = Path(source).expanduser().absolute()
    if not p.exists():
        raise BatchUsageError(f"input not found: {p}")
    if p.is_file():
        if p.suffix.lower() != ".csv":
            raise BatchUsageError(f"input {p} is a file: give a folder of scans or a CSV manifest (.csv)")
        cases = _csv_cases(p)
    else:
        cases = _folder_cases(p, series_filter)
    if not cases:
        raise BatchUsageError(f"no scans in {p} (images: {', '.join(SCAN_SUFFIXES[:6])}...; or DICOM series)")
    return _unique_ids(cases)


def _folder_cases(folder: Path, series_filter: str | None) -> list[Case]:
    files = sorted((f for f in folder.iterdir() if f.is_file() and scan_stem(f)), key=lambda f: f.name)
    if files:
        if series_filter:
            raise BatchUsageError("--series-filter applies to DICOM input; this folder holds image files")
        return [Case(_case_id(f), str(f)) for f in _nnunet_first_channels(files)]
    from .dicom_walk import dicom_cases

    return dicom_cases(folder, series_filter)


def _nnunet_first_channels(files: list[Path]) -> list[Path]:
    """nnU-Net ``imagesTs``: CASE_0000.nii.gz, CASE_0001.nii.gz... are channels of one case; channel 0 is read."""
    stems = [scan_stem(f) or "" for f in files]
    matches = [_NNUNET_CHANNEL.match(s) for s in stems]
    if not all(matches):
        return files
    return [f for f, m in zip(files, matches) if m and m.group("channel") == "0000"]


def _case_id(f: Path) -> str:
    stem = scan_stem(f) or f.name
    m = _NNUNET_CHANNEL.match(stem)
    return m.group("case") if m and m.group("channel") == "0000" else stem


def _csv_cases(path: Path) -> list[Case]:
    """``path[,modality][,prompt]`` rows; a header row (first cell ``path``) is optional; paths are relative to
    the CSV's folder. A row whose file is missing is a usage error naming the row."""
    cases = []
    with open(path, newline="", encoding="utf-8") as fh:
        for n, row in enumerate(csv.reader(fh), start=1):
            cells = [c.strip() for c in row]
            if not cells or not cells[0] or cells[0].startswith("#") or (n == 1 and cells[0].lower() == "path"):
                continue
            scan = Path(cells[0]).expanduser()
            scan = scan if scan.is_absolute() else path.parent / scan
            if not scan.exists():
                raise BatchUsageError(f"{path.name} row {n}: file not found: {scan}")
            modality = cells[1] if len(cells) > 1 and cells[1] else None
            prompt = ",".join(cells[2:]).strip() if len(cells) > 2 else None
            cid = (scan_stem(scan) or scan.name) if scan.is_file() else scan.name
            cases.append(Case(cid, str(scan), None, modality, prompt or None))
    return cases


def _unique_ids(cases: list[Case]) -> list[Case]:
    """Two cases with one name (a.nii.gz and a.nrrd, two series of a study) get a short hash of their path."""
    seen: dict[str, int] = {}
    for c in cases:
        seen[c.case_id.lower()] = seen.get(c.case_id.lower(), 0) + 1
    out = []
    for c in cases:
        if seen[c.case_id.lower()] > 1:
            tag = hashlib.sha1(f"{c.path}|{c.series_uid}".encode()).hexdigest()[:8]
            c = Case(f"{c.case_id}-{tag}", c.path, c.series_uid, c.modality, c.prompt)
        out.append(c)
    return out


def content_hash(case: Case) -> str:
    """sha256 of the case's bytes: the file, or the series' files in name order (a DICOM folder)."""
    h = hashlib.sha256()
    p = Path(case.path)
    files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
    if case.series_uid is not None:
        from .dicom_walk import series_files

        files = sorted(Path(f) for f in series_files(p, case.series_uid))
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
