"""The cohort's tqdm bar on a terminal (cases, done, failed, rate, time left); silent in a pipe or a log."""

from __future__ import annotations

import sys
from collections import Counter


class CohortBar:
    def __init__(self, total: int, enabled: bool | None = None) -> None:
        self.counts: Counter[str] = Counter()
        self.bar = None
        if enabled if enabled is not None else sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="rcmed batch", unit="case", file=sys.stderr, dynamic_ncols=True)

    def add(self, status: str) -> None:
        self.counts[status] += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(done=self.counts["done"], failed=self.counts["failed"],
                                 skipped=self.counts["skipped"], refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
