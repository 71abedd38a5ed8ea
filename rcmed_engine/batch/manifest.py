"""``OUT_DIR/manifest.jsonl``: one line per case outcome, appended as each case ends (a killed run loses only the
cases in flight). The first line says the format; the last line of a case wins.

A case is skipped when its last line is ``done`` with the same input hash, prompt and model, and its output is
still there; ``failed`` cases are tried again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from .errors import BatchUsageError

MANIFEST_NAME = "manifest.jsonl"
FORMAT = "rcmed-batch-manifest"
FORMAT_VERSION = 1


class Manifest:
    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / MANIFEST_NAME
        self.records: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            self._load()
        else:
            self._append({"format": FORMAT, "version": FORMAT_VERSION})

    def _load(self) -> None:
        with open(self.path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
        try:
            head = json.loads(lines[0]) if lines else {}
        except json.JSONDecodeError:
            head = {}
        if head.get("format") != FORMAT or head.get("version") != FORMAT_VERSION:
            found = f"{head.get('format')} v{head.get('version')}" if head else "an unknown format"
            raise BatchUsageError(f"{self.path} was written by another version ({found}; this one writes {FORMAT} "
                                  f"v{FORMAT_VERSION}): use a new output folder or remove the manifest")
        for line in lines[1:]:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash: that case simply runs again
            if isinstance(rec, dict) and "case" in rec:
                self.records[rec["case"]] = rec

    def _append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def record(self, record: dict[str, Any]) -> None:
        self.records[record["case"]] = record
        self._append(record)

    def is_done(self, case_id: str, input_hash: str, prompt: str, model: str, out_dir: Path) -> bool:
        rec = self.records.get(case_id)
        if not rec or rec.get("status") != "done":
            return False
        same = (rec.get("input_hash"), rec.get("prompt"), rec.get("model")) == (input_hash, prompt, model)
        return same and bool(rec.get("output")) and (out_dir / rec["output"]).is_file()

    def done(self) -> Iterable[dict[str, Any]]:
        return (r for r in self.records.values() if r.get("status") == "done")
