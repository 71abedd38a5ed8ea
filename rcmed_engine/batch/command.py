"""``rcmed batch``'s arguments and the executor they choose (local unless --ray or --server)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .errors import BatchUsageError
from .runner import BatchOptions, run_batch
from .work import FORMATS


def add_batch_parser(sub, add_model_args) -> None:
    b = sub.add_parser("batch", help="one prompt over a cohort of scans: resumable, local, Ray or servers")
    b.add_argument("input", help="folder of scans, nnU-Net imagesTs folder, folder of DICOM studies, or a CSV "
                   "manifest (path[,modality][,prompt])")
    b.add_argument("--prompt", default=None, help="what to segment in every scan (a CSV's prompt column wins)")
    b.add_argument("-o", "--output", required=True, help="output folder (created if missing)")
    b.add_argument("--format", default="seg.nrrd", choices=FORMATS, help="label map format (dcm: DICOM SEG, "
                   "for DICOM series input only)")
    b.add_argument("--modality", default=None, help="CT, MR, ... (default: from each file)")
    b.add_argument("--axis", default="axial", choices=["axial", "coronal", "sagittal"])
    b.add_argument("--registry", default=None, help="class registry folder (one-shot adaptation)")
    b.add_argument("--series-filter", default=None, metavar="REGEX", help="DICOM input: keep the series whose "
                   "Modality or SeriesDescription matches (case-insensitive)")
    b.add_argument("--no-qc", action="store_true", help="skip the QC pictures and page")
    b.add_argument("--ray", default=None, metavar="auto|ADDRESS", help="run on a Ray cluster (auto: the one this "
                   "machine belongs to, else a local one Ray starts)")
    b.add_argument("--workers", type=int, default=1, help="--ray: worker actors, one model each (default 1)")
    b.add_argument("--gpus-per-worker", type=float, default=0.0, help="--ray: GPUs per worker (default 0)")
    b.add_argument("--cpus-per-worker", type=float, default=1.0, help="--ray: CPUs (and torch threads) per worker")
    b.add_argument("--connect-timeout", type=float, default=15.0, help="--ray/--server: seconds to wait for an "
                   "answer before giving up (default 15)")
    b.add_argument("--server", default=None, metavar="URL[,URL...]", help="fan out over running rcmed serve engines")
    b.add_argument("--token", default=None, help="the servers' token (default: RCMED_TOKEN)")
    add_model_args(b)


def make_executor(args: argparse.Namespace, local_factory) -> Any:
    if args.ray and args.server:
        raise BatchUsageError("give --ray or --server, not both")
    if args.workers < 1:
        raise BatchUsageError("--workers must be at least 1")
    if getattr(args, "adapter", None) and (args.ray or args.server):  # they would be silently left out
        raise BatchUsageError("--adapter loads into a local engine only (for servers: rcmed serve --adapter DIR)")
    if args.ray:
        from .ray_executor import RayExecutor

        return RayExecutor(args.ray, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                           cpus_per_worker=args.cpus_per_worker, preset=args.preset, weights=args.weights,
                           device=args.device, batch_size=args.batch, connect_timeout=args.connect_timeout)
    if args.server:
        from .server_executor import ServerExecutor

        return ServerExecutor([u.strip() for u in args.server.split(",") if u.strip()], token=args.token,
                              connect_timeout=args.connect_timeout)
    from .executors import LocalExecutor

    return LocalExecutor(factory=local_factory)


def batch_command(args: argparse.Namespace, local_factory) -> int:
    opts = BatchOptions(input=args.input, out_dir=args.output, prompt=args.prompt, fmt=args.format, axis=args.axis,
                        modality=args.modality, registry=args.registry, series_filter=args.series_filter,
                        qc=not args.no_qc)
    executor = make_executor(args, local_factory)
    try:
        run = run_batch(opts, executor, log=lambda line: print(f"rcmed batch: {line}", file=sys.stderr))
    finally:
        executor.close()
    c = run.counts
    print(f"rcmed batch: {c['done']} done, {c['failed']} failed, {c['skipped']} skipped (already done)",
          file=sys.stderr)
    print(json.dumps({"output": run.out_dir, **c, "failed_cases": dict(run.failed)}))
    return run.exit_code
