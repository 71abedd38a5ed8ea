"""The run: check INPUT and OUT_DIR, take the lock, skip what the manifest says is done, stream the rest through
an executor, record each outcome as it ends, then write summary.csv and the QC page."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .cases import Case, content_hash, find_cases
from .errors import BatchUsageError, one_line
from .executors import Executor, model_key
from .lock import OutputLock
from .manifest import Manifest
from .progress import CohortBar
from .qc import write_index
from .summary import write_summary
from .work import FORMATS, Task

_TEMP = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp\..+$")


@dataclass
class BatchOptions:
    input: str
    out_dir: str
    prompt: str | None = None
    fmt: str = "seg.nrrd"
    axis: str = "axial"
    modality: str | None = None
    registry: str | None = None
    series_filter: str | None = None
    qc: bool = True
    progress: bool | None = None  # None: a bar when stderr is a terminal
    overwrite: bool = False  # redo every case, done or not


@dataclass
class BatchRun:
    counts: dict[str, int] = field(default_factory=lambda: {"done": 0, "failed": 0, "skipped": 0})
    failed: list[tuple[str, str]] = field(default_factory=list)
    out_dir: str = ""
    cases: int = 0

    @property
    def exit_code(self) -> int:
        return 1 if self.counts["failed"] else 0


def prepare_out_dir(out_dir: str) -> Path:
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise BatchUsageError(f"the output {out} is a file; name a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BatchUsageError(f"cannot create {out}: {exc.strerror or exc}") from None
    return out


def check_cases(opts: BatchOptions, cases: list[Case]) -> None:
    """Prompts parse and every case has one; ``--format dcm`` only for DICOM series. Before any model loads."""
    from ..prompts import parse_targets

    if opts.fmt not in FORMATS:
        raise BatchUsageError(f"unknown --format {opts.fmt}: use one of {', '.join(FORMATS)}")
    for c in cases:
        prompt = c.prompt or opts.prompt
        if not prompt or not " ".join(prompt.split()):
            raise BatchUsageError(f"no prompt for {c.case_id}: give --prompt (or a prompt column in the CSV)")
        parse_targets(prompt)
    if opts.fmt == "dcm" and not all(c.is_dicom for c in cases):
        raise BatchUsageError("--format dcm (DICOM SEG) needs DICOM series as input; use seg.nrrd or nii.gz")


def _remove_stale_temps(out: Path) -> None:
    for folder in (out, out / "qc"):
        if folder.is_dir():
            for p in folder.iterdir():
                if p.is_file() and (_TEMP.match(p.name) or p.name.endswith(".tmp.png")):
                    p.unlink(missing_ok=True)


class _Plan:
    """Tasks made lazily (each hash read when its case comes up), the skipped ones counted on the way."""

    def __init__(self, opts: BatchOptions, cases: list[Case], manifest: Manifest, model: dict, out: Path,
                 on_skip) -> None:
        self.opts, self.cases, self.manifest, self.model, self.out = opts, cases, manifest, model, out
        self.key = model_key(model)
        self.on_skip = on_skip
        self.tasks: dict[str, Task] = {}

    def __iter__(self) -> Iterator[Task]:
        for c in self.cases:
            prompt = c.prompt or self.opts.prompt or ""
            try:
                digest = content_hash(c)
            except OSError as exc:
                digest = f"unreadable: {one_line(exc)}"
            if not self.opts.overwrite and self.manifest.is_done(c.case_id, digest, prompt, self.key, self.out):
                self.on_skip(c)
                continue
            task = Task(c, prompt, str(self.out), self.opts.fmt, self.opts.axis, self.opts.modality,
                        self.opts.registry, self.opts.qc, digest, self.model)
            self.tasks[c.case_id] = task
            yield task


def _record(task: Task, outcome: dict[str, Any], key: str) -> dict[str, Any]:
    rec = {"case": task.case.case_id, "input": task.case.path, "input_hash": task.input_hash, "prompt": task.prompt,
           "model": key, "format": task.fmt, "axis": task.axis}
    if task.case.series_uid:
        rec["series_uid"] = task.case.series_uid
    rec.update({k: v for k, v in outcome.items() if k != "case"})
    return rec


def run_batch(opts: BatchOptions, executor: Executor, log=None, on_case=None) -> BatchRun:
    """Run the cohort; bad input raises ``BatchUsageError`` before anything runs. Ctrl-C loses only the cases
    in flight (the manifest has every finished one; summary and QC page are written on the way out).
    ``log(line)``: a line per failed case; ``on_case(record)``: every case as it ends (skipped ones too)."""
    out = prepare_out_dir(opts.out_dir)
    cases = find_cases(opts.input, opts.series_filter)
    check_cases(opts, cases)
    run = BatchRun(out_dir=str(out), cases=len(cases))
    with OutputLock(out):
        manifest = Manifest(out)
        _remove_stale_temps(out)
        model = executor.model()
        bar = CohortBar(len(cases), opts.progress)

        def skipped(case: Case) -> None:
            run.counts["skipped"] += 1
            bar.add("skipped")
            if on_case:
                on_case({**manifest.records[case.case_id], "status": "skipped"})

        plan = _Plan(opts, cases, manifest, model, out, skipped)
        try:
            for outcome in executor.run(plan):
                task = plan.tasks.pop(outcome["case"])
                record = _record(task, outcome, plan.key)
                manifest.record(record)
                if on_case:
                    on_case(record)
                run.counts[outcome["status"]] += 1
                if outcome["status"] == "failed":
                    run.failed.append((task.case.case_id, outcome.get("reason", "")))
                    if log:
                        log(f"{task.case.case_id}: failed: {outcome.get('reason', '')}")
                bar.add(outcome["status"])
        finally:
            bar.close()
            write_summary(out, manifest.done())
            if opts.qc:
                write_index(out, list(manifest.records.values()))
    return run
