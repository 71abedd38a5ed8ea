"""Cohort throughput of ``rcmed batch`` (a script that prints figures and writes JSON; never a test).

Cases per minute for the local executor, Ray with 1 worker and Ray with 2 workers, each worker one torch thread
(the lite preset by default, on synthetic CT-like volumes), and Ray's overhead with 1 worker against local
(target <= 10%). Model loading is left out: each executor loads its model(s) before the clock starts.

    python bench/batch_scaling.py [--preset lite] [--cases 12] [--shape 16,128,128]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_report  # noqa: E402

from rcmed_engine.batch import BatchOptions, run_batch  # noqa: E402
from rcmed_engine.batch.executors import LocalExecutor  # noqa: E402


def make_cohort(folder: Path, n: int, shape: tuple[int, int, int]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, s) for s in shape), indexing="ij")
    for i in range(n):
        rng = np.random.default_rng(i)
        blob = ((x - 0.2 * rng.uniform(-1, 1)) ** 2 + (y / 0.8) ** 2 + (z / 1.5) ** 2) < 0.3
        vol = np.where(blob, 60.0, -900.0) + rng.normal(0, 20, shape)
        image = sitk.GetImageFromArray(vol.astype(np.int16))
        image.SetSpacing((0.8, 0.8, 2.5))
        sitk.WriteImage(image, str(folder / f"case{i:03d}.nii.gz"))


def timed(name: str, executor, src: Path, work: Path, prompt: str) -> dict:
    executor.model()  # load before the clock
    started = time.perf_counter()
    run = run_batch(BatchOptions(str(src), str(work / name), prompt=prompt, modality="CT", progress=False,
                                 qc=True), executor)
    seconds = time.perf_counter() - started
    executor.close()
    done = run.counts["done"]
    return {"cases": done, "failed": run.counts["failed"], "seconds": round(seconds, 2),
            "cases_per_min": round(60.0 * done / seconds, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="lite")
    ap.add_argument("--cases", type=int, default=12)
    ap.add_argument("--shape", default="16,128,128", help="z,y,x of each synthetic scan")
    ap.add_argument("--prompt", default="liver")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "batch_scaling.json"))
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    shape = tuple(int(v) for v in args.shape.split(","))
    import ray

    from rcmed_engine.batch.ray_executor import RayExecutor
    from rcmed_engine.engine import Engine

    with tempfile.TemporaryDirectory(prefix="rcmed-batch-bench-") as tmp:
        src, work = Path(tmp) / "in", Path(tmp) / "out"
        make_cohort(src, args.cases, shape)
        figures = {"local": timed("local", LocalExecutor(Engine.from_preset(args.preset, device="cpu")), src, work,
                                  args.prompt)}
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            for workers in (1, 2):
                executor = RayExecutor("auto", workers=workers, cpus_per_worker=1, preset=args.preset, device="cpu")
                figures[f"ray_{workers}"] = timed(f"ray{workers}", executor, src, work, args.prompt)
        finally:
            ray.shutdown()
    local, ray1 = figures["local"]["cases_per_min"], figures["ray_1"]["cases_per_min"]
    write_report(args.out, {
        "preset": args.preset, "cases": args.cases, "shape_zyx": list(shape), "threads_per_worker": 1,
        "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "cases_per_min": {k: v["cases_per_min"] for k, v in figures.items()},
        "ray_1_overhead_vs_local": round(local / ray1 - 1.0, 4) if ray1 else None,
        "ray_2_speedup_vs_ray_1": round(figures["ray_2"]["cases_per_min"] / ray1, 3) if ray1 else None,
        "runs": figures})


if __name__ == "__main__":
    main()
