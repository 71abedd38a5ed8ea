"""The server's memory: what one request may cost, what decoding costs, and the peak the whole server can
reach under its settings (announced at start and in ``/v1/info``; ``rcmed serve`` refuses to start when it
exceeds the machine's memory).

The bound is the sum of

* ``base``: the process as it stands (Python, libraries and, once loaded, the model's weights);
* ``image_cache``: ``--cache-mb``, the uploaded images kept;
* ``decodes``: ``--decode-workers`` concurrent uploads, each at most one request budget
  (``--max-request-mb``, body included) or one upload body, whichever is larger;
* ``model_work``: the one request on the model thread (its output is checked against one budget);
* ``job_in_progress``: the results so far of the job that runs a chunk at a time (one budget), kept while
  waiting clients' requests run between its chunks;
* ``results``: finished results kept for clients to fetch (at most one budget in all);
* ``engine_cache``: the engine's embedding cache, when the engine states its cap.
"""

from __future__ import annotations

import os
from typing import Any

MB = 1 << 20
GB = 1 << 30

# Decoding a NIfTI/NRRD file: ITK's buffer, numpy's copy of it and a conversion (byte order, RGB); plus one
# byte per voxel for the NaN/Inf scan. Measured: about 2.4 x the array for a float32 .nii.gz and .nrrd.
FILE_COPIES = 3


def machine_memory_bytes() -> int:
    """Physical memory of this machine (MemTotal), or 0 when it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def rss_bytes() -> int:
    """This process's resident memory now (0 when unknown)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except (ImportError, OSError):
        return 0


def default_request_bytes(machine_bytes: int) -> int:
    """The default per-request budget: a sixteenth of the machine's memory, within 256 MB .. 8 GB."""
    if machine_bytes <= 0:
        return 1 * GB
    return int(min(8 * GB, max(256 * MB, machine_bytes // 16)))


def engine_cache_bytes(engine: Any) -> int:
    """The cap of the engine's embedding caches, when it has them (the local Engine does)."""
    total = 0
    for name in ("_features", "_prefixes"):
        total += int(getattr(getattr(engine, name, None), "max_bytes", 0) or 0)
    return total


def memory_bound(settings: Any, machine_bytes: int, base_bytes: int, engine_bytes: int = 0) -> dict[str, Any]:
    """The peak the server can reach under ``settings`` (a ServerSettings), item by item, in bytes.

    Pure: ``machine_bytes`` (0: unknown), ``base_bytes`` (the process now) and ``engine_bytes`` (the engine's
    own caches) are given, so a test can ask about any machine."""
    budget = settings.request_bytes(machine_bytes)
    per_decode = max(budget, settings.max_upload_bytes)
    items = {"base": int(base_bytes), "image_cache": int(settings.cache_bytes),
             "decodes": int(settings.decode_workers * per_decode), "model_work": int(budget),
             "job_in_progress": int(budget), "results": int(budget), "engine_cache": int(engine_bytes)}
    total = sum(items.values())
    return {"bytes": total, "items": items, "machine_bytes": int(machine_bytes), "request_bytes": int(budget),
            "decode_workers": int(settings.decode_workers), "fits": machine_bytes <= 0 or total <= machine_bytes}


def bound_problem(bound: dict[str, Any], settings: Any) -> str | None:
    """One line saying why the bound does not fit this machine and which settings to change; None if it fits."""
    if bound["fits"]:
        return None
    it = bound["items"]
    model = it["model_work"] + it["job_in_progress"] + it["results"] + it["engine_cache"]
    return (f"the server could reach {bound['bytes'] / GB:.1f} GB, more than this machine's "
            f"{bound['machine_bytes'] / GB:.1f} GB (process {it['base'] / GB:.1f} + image cache "
            f"{it['image_cache'] / GB:.1f} + {settings.decode_workers} decodes x "
            f"{it['decodes'] / max(1, settings.decode_workers) / GB:.2f} + model work, job in progress, results "
            f"and engine cache {model / GB:.1f}); lower --cache-mb "
            f"({settings.cache_bytes // MB}), --max-request-mb ({bound['request_bytes'] // MB}), --max-upload-mb "
            f"({settings.max_upload_bytes // MB}) or --decode-workers ({settings.decode_workers})")


def describe_bound(bound: dict[str, Any]) -> str:
    """The bound as one line, for the start-up message and the log."""
    items = ", ".join(f"{k.replace('_', ' ')} {v / MB:.0f} MB" for k, v in bound["items"].items())
    machine = f" of this machine's {bound['machine_bytes'] / GB:.1f} GB" if bound["machine_bytes"] else ""
    return (f"memory bound {bound['bytes'] / GB:.2f} GB{machine} ({items}; one request may use "
            f"{bound['request_bytes'] / MB:.0f} MB)")
