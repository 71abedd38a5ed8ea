"""Remote engine overhead: the same requests on a local Engine and through ``rcmed serve`` on loopback.

A script that prints figures and writes JSON (never a test). The server runs in its own process
(``python -m rcmed_engine.cli serve``), as it would on a GPU box; the client is RemoteEngine.

- local_2d_s / remote_2d_s: one prompt on one 2D slice whose image is already uploaded and whose
  embeddings are cached on both sides (the radiologist's second prompt); target: remote - local <= 50 ms
- local_volume_s / remote_volume_s: one prompt on a 64-slice volume with every cache empty: the
  embedding caches are cleared and, remotely, the image is uploaded again (hash, zstd, transfer,
  job, long poll, result); target: remote <= 1.15 x local
- remote_volume_uploaded_s: the same with the image already on the server (only the job)

The volume is 64 axial slices of nilearn's MNI152 T1 template (real anatomy) when nilearn's data files
are installed, otherwise a synthetic CT phantom of the same size. Medians over --repeats; local and
remote runs are interleaved so that machine noise hits both alike (``remote_volume_overhead_paired`` is
the median of the per-round ratios; the ``*_min_s`` figures are the least disturbed runs).

    python bench/remote.py [--preset tiny] [--weights DIR] [--device cpu] [--repeats 9] [--slices 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rcmed_engine import wire  # noqa: E402
from rcmed_engine.client import RemoteEngine  # noqa: E402
from rcmed_engine.engine import Engine  # noqa: E402
from rcmed_engine.geometry import Geometry, Volume  # noqa: E402
from report import write_report  # noqa: E402


def bench_volume(slices: int) -> tuple[Volume, str, str]:
    """(volume, modality, source): MNI T1 axial slab, or a CT phantom when nilearn is absent."""
    try:
        from rcmed_engine.data_locations import MNI_T1, nilearn_data_dir
        from rcmed_engine.io import read_image

        t1 = read_image(nilearn_data_dir() / MNI_T1)
        frame = t1.slice_frame("axial")
        if frame.slice_axis != 0:
            raise ValueError("unexpected MNI orientation")
        lo = t1.array.shape[0] // 2 - slices // 2
        g = t1.geometry
        origin = tuple(float(v) for v in g.ijk_to_lps([0, 0, lo]))
        return (Volume(np.ascontiguousarray(t1.array[lo:lo + slices]), Geometry(origin, g.spacing, g.direction), {}),
                "MR", "MNI152 T1 (nilearn)")
    except Exception:  # noqa: BLE001 - no nilearn data: a synthetic phantom of the same size
        rng = np.random.default_rng(0)
        z, y, x = np.meshgrid(np.linspace(-1, 1, slices), np.linspace(-1, 1, 233), np.linspace(-1, 1, 197),
                              indexing="ij")
        body = (y ** 2 + x ** 2 < 0.8) * 1000 - 1000 + ((y - 0.2) ** 2 + (x + 0.3) ** 2 + z ** 2 < 0.2) * 60
        array = (body + rng.normal(0, 20, body.shape)).astype(np.int16)
        return Volume(array, Geometry((0, 0, 0), (0.8, 0.8, 2.5), (1, 0, 0, 0, 1, 0, 0, 0, 1)), {}), "CT", "phantom"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads on each side (default 1: on a small shared machine more threads "
                             "oversubscribe the cores and the figures become noise)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "remote.json"))
    args = parser.parse_args(argv)

    volume, modality, source = bench_volume(args.slices)
    slice2d = Volume(np.ascontiguousarray(volume.array[args.slices // 2:args.slices // 2 + 1]), volume.geometry, {})
    token = secrets.token_urlsafe(16)
    port = free_port()
    cmd = [sys.executable, "-m", "rcmed_engine.cli", "serve", "--preset", args.preset, "--device", args.device,
           "--batch", str(args.batch), "--port", str(port), "--log-level", "warning"]
    if args.weights:
        cmd += ["--weights", args.weights]
    threads = str(args.threads)
    env = {**os.environ, "RCMED_TOKEN": token, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    server = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the server too when stopped
    torch.set_num_threads(args.threads)
    try:
        local = Engine.from_preset(args.preset, weights=args.weights, device=args.device, batch_size=args.batch)
        remote = RemoteEngine(f"http://127.0.0.1:{port}", token=token)
        remote.wait_ready(600)
        prompt = "white matter" if modality == "MR" else "liver"

        # 2D, image uploaded and embeddings cached on both sides; the first rounds warm up.
        for engine in (local, remote):
            for _ in range(3):
                engine.segment(slice2d, prompt, modality=modality)
        local_2d, remote_2d = [], []
        for _ in range(max(10, 4 * args.repeats)):
            t0 = time.perf_counter()
            a = local.segment(slice2d, prompt, modality=modality)
            local_2d.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            b = remote.segment(slice2d, prompt, modality=modality)
            remote_2d.append(time.perf_counter() - t0)
        assert np.array_equal(a.labels, b.labels), "remote and local 2D masks differ"

        # Volume, every cache empty (remote: the image is uploaded again each time).
        ident, frame = wire.encode_volume(volume)
        local_vol, remote_vol, remote_uploaded = [], [], []
        for r in range(args.repeats + 1):  # round 0 warms up and is discarded
            local.clear_cache()
            t0 = time.perf_counter()
            a = local.segment(volume, prompt, modality=modality)
            t_local = time.perf_counter() - t0

            remote.clear_cache()
            remote.forget_image(ident)
            t0 = time.perf_counter()
            b = remote.segment(volume, prompt, modality=modality)
            t_remote = time.perf_counter() - t0
            assert np.array_equal(a.labels, b.labels), "remote and local volume masks differ"

            remote.clear_cache()
            t0 = time.perf_counter()
            remote.segment(volume, prompt, modality=modality)
            t_uploaded = time.perf_counter() - t0
            if r:
                local_vol.append(t_local)
                remote_vol.append(t_remote)
                remote_uploaded.append(t_uploaded)
            print(f"volume round {r}: local {t_local:.3f} s, remote {t_remote:.3f} s "
                  f"(image already there: {t_uploaded:.3f} s)", flush=True)
        info = remote.info()
        remote.close()
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()

    med = statistics.median
    result = {
        "local_2d_s": round(med(local_2d), 5),
        "remote_2d_s": round(med(remote_2d), 5),
        "remote_2d_overhead_ms": round((med(remote_2d) - med(local_2d)) * 1000, 2),
        "target_2d_overhead_ms": 50,
        "local_volume_s": round(med(local_vol), 4),
        "remote_volume_s": round(med(remote_vol), 4),
        "remote_volume_overhead": round(med(remote_vol) / med(local_vol) - 1, 4),
        "remote_volume_uploaded_s": round(med(remote_uploaded), 4),
        "remote_volume_overhead_paired": round(med([r / l - 1 for r, l in zip(remote_vol, local_vol)]), 4),
        "local_volume_min_s": round(min(local_vol), 4),
        "remote_volume_min_s": round(min(remote_vol), 4),
        "target_volume_overhead": 0.15,
        "volume_shape": list(volume.array.shape),
        "volume_dtype": volume.array.dtype.str,
        "volume_source": source,
        "upload_bytes": len(frame),
        "raw_bytes": int(volume.array.nbytes),
        "preset": args.preset,
        "device": info.get("device"),
        "batch": args.batch,
        "threads": args.threads,
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    print(f"wrote {write_report(args.out, result)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
