"""``rcmed batch``: one prompt over a cohort of scans, resumable, on this machine, a Ray cluster or remote engines.

One concept per module: ``cases`` (what INPUT holds), ``manifest`` (what each case came to), ``lock`` (one run
per output folder), ``work`` (one case: read, segment, write, measure, picture), ``executors`` (where cases run:
local, Ray, servers; one protocol), ``summary`` and ``qc`` (what a person reads), ``runner`` (the run itself).
"""

from .cases import Case, find_cases
from .runner import BatchOptions, BatchUsageError, run_batch

__all__ = ["BatchOptions", "BatchUsageError", "Case", "find_cases", "run_batch"]
