"""DICOM studies: walk the tree, one case per series, optionally kept by Modality or SeriesDescription."""

from __future__ import annotations

import os
import re
from pathlib import Path

import SimpleITK as sitk

from .cases import Case
from .errors import BatchUsageError


def series_files(folder: Path, series_uid: str) -> list[str]:
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid))


def _header(path: str) -> dict[str, str]:
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return {}
    keys = set(reader.GetMetaDataKeys())
    return {name: reader.GetMetaData(tag).strip() for name, tag in (("modality", "0008|0060"),
                                                                    ("description", "0008|103e")) if tag in keys}


def _keeps(header: dict[str, str], pattern: re.Pattern | None) -> bool:
    if pattern is None:
        return True
    return any(pattern.search(header.get(k, "")) for k in ("modality", "description"))


def dicom_cases(root: Path, series_filter: str | None = None) -> list[Case]:
    """Every DICOM series under ``root``; ``series_filter``: a regular expression (case-insensitive) that the
    series' Modality or SeriesDescription must match."""
    try:
        pattern = re.compile(series_filter, re.IGNORECASE) if series_filter else None
    except re.error as exc:
        raise BatchUsageError(f"--series-filter {series_filter!r} is not a valid pattern: {exc}") from None
    cases = []
    for dirpath, dirnames, _ in os.walk(root):
        dirnames.sort()
        folder = Path(dirpath)
        try:
            uids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
        except RuntimeError:
            continue
        for uid in uids:
            files = series_files(folder, uid)
            header = _header(files[0]) if files else {}
            if files and _keeps(header, pattern):
                rel = folder.relative_to(root).as_posix()
                name = (rel.replace("/", "_") if rel != "." else root.name) or "series"
                cases.append(Case(name if len(uids) == 1 else f"{name}_{uid[-8:]}", str(folder), uid,
                                  header.get("modality") or None))
    return cases
