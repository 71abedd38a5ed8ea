"""``OUT_DIR/summary.csv``: one row per scan and target, rebuilt from the manifest at the end of each run."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Iterable

COLUMNS = ("case", "input", "prompt", "target", "voxels", "volume_ml", "present", "presence", "slices", "seconds",
           "output")


def summary_rows(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for r in sorted(records, key=lambda r: r["case"]):
        for t in r.get("targets", []):
            rows.append({"case": r["case"], "input": r.get("input", ""), "prompt": r.get("prompt", ""),
                         "target": t["target"], "voxels": t["voxels"], "volume_ml": f"{t['volume_ml']:.6f}",
                         "present": int(bool(t["present"])), "presence": "" if t["presence"] is None else t["presence"],
                         "slices": t["slices"], "seconds": r.get("seconds", ""), "output": r.get("output", "")})
    return rows


def write_summary(out_dir: Path, records: Iterable[dict[str, Any]]) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(summary_rows(records))
    path = out_dir / "summary.csv"
    tmp = path.with_name(".summary.csv.tmp")
    tmp.write_text(buf.getvalue(), encoding="utf-8")
    tmp.replace(path)
    return path
