"""Latency of the lite preset on this machine (a script that prints figures and writes JSON; never a test).

Measures, on slices of the MNI152 T1 template (real anatomy, shipped by nilearn):
- first_prompt_s: a prompt on a new 2D slice (encoder + prompt-free prefix + prompt)
- cached_prompt_s: a second prompt on the same slice (cached prefix: prompt tokens + mask decoder)
- volume_batched_s_per_slice / volume_single_s_per_slice: a 64-slice volume with --batch slices per
  forward against one slice at a time (cache cleared before each run)
- peak_rss_mb: the process's peak resident memory

    python bench/latency.py [--preset lite] [--repeats 3] [--slices 64] [--batch 8]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from rcmed_engine.data_locations import MNI_T1, nilearn_data_dir
from rcmed_engine.engine import Engine
from rcmed_engine.geometry import Volume
from rcmed_engine.io import read_image
from report import write_report


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="lite")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "latency.json"))
    args = parser.parse_args(argv)

    t1 = read_image(nilearn_data_dir() / MNI_T1)
    frame = t1.slice_frame("axial")
    n = t1.array.shape[frame.slice_axis]
    lo = n // 2 - args.slices // 2
    engine = Engine.from_preset(args.preset, weights=args.weights, device="cpu", batch_size=args.batch)

    # 2D: distinct slices each repeat, so every "first" prompt really is on a new slice.
    first, cached = [], []
    for r in range(args.repeats + 1):  # the first round warms up allocators and is discarded
        index = [slice(None)] * 3
        index[frame.slice_axis] = slice(lo + r, lo + r + 1)
        slice2d = Volume(np.ascontiguousarray(t1.array[tuple(index)]), t1.geometry, {})
        engine.clear_cache()
        t0 = time.perf_counter()
        engine.segment(slice2d, "white matter", modality="MR", axis="axial")
        t_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        engine.segment(slice2d, "grey matter", modality="MR", axis="axial")
        t_cached = time.perf_counter() - t0
        if r:
            first.append(t_first)
            cached.append(t_cached)
        print(f"2D round {r}: first {t_first:.3f} s, cached {t_cached:.3f} s", flush=True)

    def volume_run(batch: int) -> float:
        engine.batch_size = batch
        engine.clear_cache()
        t0 = time.perf_counter()
        engine.segment(t1, "white matter", modality="MR", axis="axial", slices=(lo, lo + args.slices))
        return (time.perf_counter() - t0) / args.slices

    # Interleave the two paths so machine noise hits both alike; compare medians.
    batched, single = [], []
    for r in range(max(1, args.repeats - 1)):
        batched.append(volume_run(args.batch))
        single.append(volume_run(1))
        print(f"volume round {r}: batched {batched[-1]:.3f} s/slice, single {single[-1]:.3f} s/slice", flush=True)

    result = {
        "preset": args.preset,
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "first_prompt_s": round(statistics.median(first), 4),
        "cached_prompt_s": round(statistics.median(cached), 4),
        "volume_batched_s_per_slice": round(statistics.median(batched), 4),
        "volume_single_s_per_slice": round(statistics.median(single), 4),
        "volume_speedup": round(statistics.median(single) / statistics.median(batched), 3),
        "volume_slices": args.slices,
        "batch": args.batch,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    print(f"wrote {write_report(args.out, result)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
