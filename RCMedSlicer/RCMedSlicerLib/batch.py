"""Bookkeeping of the headless batch run (``Scripts/batch.py``), without Slicer.

One ``.seg.nrrd`` per scan in the output folder. A scan whose output already exists is skipped (so an
interrupted run can simply be started again). Each output is written to a hidden temporary file in the
output folder and renamed into place only when complete. The run ends with a summary and a non-zero exit
status when any scan failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from .engines import DEVICES, PRESETS

OUTPUT_SUFFIX = ".seg.nrrd"
_TEMP_RE = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp\.seg\.nrrd$")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class BatchUsageError(ValueError):
    """Bad arguments or folders; reported in one line with exit status 2."""


def temp_path(output: Path) -> Path:
    """A hidden temporary name beside ``output`` with the same suffix (the writer picks the format by it)."""
    stem = output.name[: -len(OUTPUT_SUFFIX)] if output.name.endswith(OUTPUT_SUFFIX) else output.name
    return output.parent / f".{stem}.{uuid.uuid4().hex[:12]}.tmp{OUTPUT_SUFFIX}"


def commit(temp: Path, output: Path) -> Path:
    """Move a complete temporary file into place (atomic on one file system)."""
    if not temp.is_file() or temp.stat().st_size == 0:
        raise OSError(f"the writer produced no file for {output.name}")
    os.replace(temp, output)
    return output


def discard(temp: Path) -> None:
    try:
        temp.unlink()
    except FileNotFoundError:
        pass


def remove_stale_temps(output_dir: Path) -> list[Path]:
    """Remove temporary files a killed earlier run left behind (only names this module makes)."""
    removed = []
    if output_dir.is_dir():
        for p in output_dir.iterdir():
            if p.is_file() and _TEMP_RE.match(p.name):
                discard(p)
                removed.append(p)
    return removed


@dataclass
class ScanOutcome:
    scan: str
    output: str
    status: str  # "done", "skipped", "failed"
    seconds: float = 0.0
    message: str = ""
    segments: list[str] = field(default_factory=list)


@dataclass
class BatchReport:
    prompt: str
    outcomes: list[ScanOutcome] = field(default_factory=list)
    started: float = field(default_factory=time.time)

    def add(self, outcome: ScanOutcome) -> None:
        self.outcomes.append(outcome)

    def count(self, status: str) -> int:
        return sum(1 for o in self.outcomes if o.status == status)

    @property
    def failed(self) -> list[ScanOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    def exit_code(self) -> int:
        return EXIT_FAILED if self.failed else EXIT_OK

    def summary(self) -> str:
        lines = [f"RCMed batch: {len(self.outcomes)} scans, {self.count('done')} segmented, "
                 f"{self.count('skipped')} skipped (already done), {self.count('failed')} failed "
                 f"in {time.time() - self.started:.1f} s"]
        for o in self.failed:
            lines.append(f"  FAILED {o.scan}: {o.message}")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps({"prompt": self.prompt, "outcomes": [asdict(o) for o in self.outcomes],
                           "failed": len(self.failed)}, indent=2)


def one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------- arguments
def script_arguments(argv: Sequence[str]) -> list[str]:
    """The batch script's own arguments: what follows the first ``--`` (Slicer's separator), if any."""
    argv = list(argv)
    return argv[argv.index("--") + 1:] if "--" in argv else argv


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="Slicer --no-main-window --python-script RCMedSlicer/Scripts/batch.py --",
        description="Segment what a prompt names in every scan of a folder; one .seg.nrrd per scan.")
    p.add_argument("--input", required=True, help="folder of scans (NIfTI, NRRD, MHA)")
    p.add_argument("--prompt", required=True, help='what to segment, e.g. "liver" or "liver and spleen"')
    p.add_argument("--output", required=True, help="folder for the .seg.nrrd files (created if missing)")
    p.add_argument("--preset", default="lite", choices=PRESETS)
    p.add_argument("--weights", default="", help="folder of weights instead of the preset's own")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--server", default="", help="URL of an 'rcmed serve' engine instead of a local one")
    p.add_argument("--token", default="", help="token for --server (default: RCMED_TOKEN)")
    p.add_argument("--modality", default="auto", help="CT, MR, ... (default: inferred per scan)")
    p.add_argument("--axis", default="axial", choices=("axial", "coronal", "sagittal"))
    p.add_argument("--overwrite", action="store_true", help="redo scans whose output exists")
    p.add_argument("--report", default="", help="also write the outcome of every scan to this JSON file")
    return p


def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    args = build_parser().parse_args(script_arguments(argv))
    if not " ".join(args.prompt.split()):
        raise BatchUsageError("--prompt is empty: name what to segment")
    return args
