"""What every benchmark does with its figures: print them as JSON, then write them to ``--out``."""

from __future__ import annotations

import json
from pathlib import Path

from rcmed_engine.io import write_json_atomic


def write_report(out: str | Path, result: dict) -> Path:
    """Print ``result`` (indented JSON) and write it atomically to ``out``, making its folder; return the path."""
    print(json.dumps(result, indent=2))
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, result)
    return path
