"""Server soak: many clients, good and bad, against one ``rcmed serve`` on loopback (issue 21).

A script that prints figures and writes JSON (never a test). It starts ``python -m rcmed_engine.cli serve``
on 127.0.0.1 with a fresh token, measures valid one-slice segments alone, then runs --clients threads for
--minutes, each drawing requests of every kind:

- valid: uploads of real volumes (RCMA frames and .nii.gz files) and one-slice segments of them;
- jobs cancelled while they run; bombs (a .nii.gz announcing 700^3 float64 zeros, as in the issue, an NRRD
  and an RCMA frame of the same); truncated files; garbage bytes; wrong tokens; oversized prompts.

It watches the server throughout (readiness every 0.5 s, resident memory) and stops by itself. Written to
bench/results/server_soak.json: requests by kind, status counts, p50/p99 of valid segments alone and under
load (total latency and, from each answer's Server-Timing header, its wait for the model thread (behind
other clients, behind a job's step), its run there and its time in the server, each with its ratio under
load / alone), every bomb's latency, the server's peak RSS (VmHWM) against the bound it announced in
/v1/info, and whether it stayed ready. Targets: 0 x 5xx, 0 crashes, peak RSS <= bound, every bomb refused in < 1 s,
valid-segment p99 under load <= 3 x alone.

    python bench/server_soak.py [--minutes 10] [--clients 16] [--preset tiny] [--device cpu]
                                [--cache-mb MB] [--max-request-mb MB] [--bomb-side 700] [--out PATH]
"""

from __future__ import annotations

import argparse
import gzip
import os
import random
import secrets
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rcmed_engine import wire  # noqa: E402
from rcmed_engine.geometry import Geometry, Volume  # noqa: E402
from rcmed_engine.io import write_json_atomic  # noqa: E402
from rcmed_engine.server.timing import parse_server_timing  # noqa: E402

MB = 1 << 20
HOST = "127.0.0.1"  # loopback only: this script never listens elsewhere


# ----------------------------------------------------------------------------------------- inputs
def real_volumes(n: int, slices: int) -> tuple[list[Volume], str, str]:
    """n axial slabs of the MNI152 T1 (nilearn) when installed, else CT phantoms; (volumes, modality, source)."""
    try:
        from rcmed_engine.data_locations import MNI_T1, nilearn_data_dir
        from rcmed_engine.io import read_image

        t1 = read_image(nilearn_data_dir() / MNI_T1)
        if t1.slice_frame("axial").slice_axis != 0:
            raise ValueError("unexpected MNI orientation")
        g, out = t1.geometry, []
        for i in range(n):
            lo = 40 + i * (t1.array.shape[0] - 80 - slices) // max(1, n - 1)
            origin = tuple(float(v) for v in g.ijk_to_lps([0, 0, lo]))
            out.append(Volume(np.ascontiguousarray(t1.array[lo:lo + slices]), Geometry(origin, g.spacing, g.direction),
                              {"modality": "MR"}))
        return out, "MR", "MNI152 T1 (nilearn)"
    except Exception:  # noqa: BLE001 - no nilearn data: phantoms
        rng = np.random.default_rng(0)
        z, y, x = np.meshgrid(np.linspace(-1, 1, slices), np.linspace(-1, 1, 160), np.linspace(-1, 1, 140),
                              indexing="ij")
        out = []
        for i in range(n):
            body = (y ** 2 + x ** 2 < 0.8) * 1000 - 1000 + ((y - 0.1 * i) ** 2 + (x + 0.3) ** 2 + z ** 2 < 0.2) * 60
            out.append(Volume((body + rng.normal(0, 20, body.shape)).astype(np.int16),
                              Geometry((0, 0, 0), (0.8, 0.8, 2.5), (1, 0, 0, 0, 1, 0, 0, 0, 1)), {"modality": "CT"}))
        return out, "CT", "phantom"


def nii_gz_bytes(volume: Volume, folder: Path, name: str) -> bytes:
    import SimpleITK as sitk

    path = folder / f"{name}.nii.gz"
    sitk.WriteImage(volume.geometry.apply_to(sitk.GetImageFromArray(volume.array)), str(path), True)
    return path.read_bytes()


def nifti1_header(side: int) -> bytes:
    head = bytearray(352)
    struct.pack_into("<i", head, 0, 348)
    struct.pack_into("<8h", head, 40, 3, side, side, side, 1, 1, 1, 1)
    struct.pack_into("<2h", head, 70, 64, 64)  # float64
    struct.pack_into("<4f", head, 76, 1.0, 1.0, 1.0, 1.0)
    struct.pack_into("<f", head, 108, 352.0)
    head[344:348] = b"n+1\0"
    return bytes(head)


def gzip_of_zeros(prefix: bytes, nbytes: int) -> bytes:
    c = zlib.compressobj(1, zlib.DEFLATED, 31)
    parts, zero, left = [c.compress(prefix)], bytes(16 * MB), nbytes
    while left > 0:
        parts.append(c.compress(zero[:min(left, len(zero))]))
        left -= len(zero)
    parts.append(c.flush())
    return b"".join(parts)


def bombs(side: int) -> dict[str, bytes]:
    """Files announcing side^3 float64 zeros (2.7 GB for 700), each a few MB on the wire."""
    n = side ** 3 * 8
    zeros = gzip_of_zeros(b"", n)  # the same stream serves NRRD's gzip encoding and the frame's gzip codec
    nrrd = (f"NRRD0004\ntype: double\ndimension: 3\nsizes: {side} {side} {side}\nencoding: gzip\n\n").encode()
    head = {"dtype": "<f8", "shape": [side, side, side], "codec": "gzip"}
    import json

    hb = json.dumps(head).encode()
    frame = wire.MAGIC + bytes([1]) + struct.pack("<I", len(hb)) + hb + zeros
    return {"nii.gz": gzip_of_zeros(nifti1_header(side), n), "nrrd": nrrd + zeros, "frame": frame}


# ----------------------------------------------------------------------------------------- server
def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    out[line.split(":")[0]] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


class Watch(threading.Thread):
    """Readiness and memory of the server every 0.5 s until stopped."""

    def __init__(self, url: str, proc: subprocess.Popen) -> None:
        super().__init__(daemon=True)
        self.url, self.proc = url, proc
        self.stop_event = threading.Event()
        self.polls = self.not_ready = 0
        self.peak_rss = 0
        self.exited: int | None = None

    def run(self) -> None:
        with httpx.Client(timeout=5) as c:
            while not self.stop_event.is_set():
                if self.proc.poll() is not None:
                    self.exited = self.proc.returncode
                    return
                self.peak_rss = max(self.peak_rss, proc_status(self.proc.pid).get("VmRSS", 0))
                self.polls += 1
                try:
                    if c.get(f"{self.url}/v1/health/ready").status_code != 200:
                        self.not_ready += 1
                except httpx.HTTPError:
                    self.not_ready += 1
                self.stop_event.wait(0.5)


def wait_ready(url: str, server: subprocess.Popen, server_lines: list[str], timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if server.poll() is not None:
            raise SystemExit("server_soak: the server exited at start: " + " | ".join(server_lines[-5:]))
        try:
            if httpx.get(f"{url}/v1/health/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"server_soak: the server was not ready within {timeout_s:g} s")
        time.sleep(0.2)


# ----------------------------------------------------------------------------------------- clients
class Soak:
    def __init__(self, url: str, token: str, volumes: list[Volume], files: list[bytes], bomb_bodies: dict[str, bytes],
                 modality: str, max_prompt_chars: int, seed: int) -> None:
        self.url, self.token = url, token
        self.auth = {"Authorization": f"Bearer {token}"}
        self.frames = [wire.encode_volume(v) for v in volumes]
        self.depths = [v.array.shape[0] for v in volumes]
        self.files, self.bombs = files, bomb_bodies
        self.modality = modality
        self.prompt = "white matter" if modality == "MR" else "liver"
        self.max_prompt_chars = max_prompt_chars
        self.ids: dict[int, str] = {}
        self.lock = threading.Lock()
        self.counts: dict[str, Counter] = defaultdict(Counter)
        self.latency: dict[str, list[float]] = defaultdict(list)
        # Per kind, per answered request that ran on the model: seconds of each part (see timed_parts).
        self.parts: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        self.errors: list[str] = []
        self.seed = seed

    def record(self, kind: str, status: int, took: float, text: str = "") -> None:
        with self.lock:
            self.counts[kind][str(status)] += 1
            self.latency[kind].append(took)
            if status >= 500 and len(self.errors) < 20:
                self.errors.append(f"{kind}: {status} {text[:200]}")

    def call(self, c: httpx.Client, kind: str, method: str, path: str, **kw) -> httpx.Response | None:
        t0 = time.perf_counter()
        try:
            r = c.request(method, self.url + path, **kw)
        except httpx.HTTPError as exc:
            self.record(kind, 0, time.perf_counter() - t0, repr(exc))
            return None
        took = time.perf_counter() - t0
        self.record(kind, r.status_code, took, r.text)
        parts = timed_parts(r, took)
        if parts:
            with self.lock:
                for name, value in parts.items():
                    self.parts[kind][name].append(value)
        return r

    def upload(self, c: httpx.Client, i: int, as_file: bool) -> str | None:
        body = self.files[i] if as_file else self.frames[i][1]
        r = self.call(c, "valid_upload_nii_gz" if as_file else "valid_upload_frame", "POST", "/v1/images",
                      content=body, headers=self.auth)
        if r is not None and r.status_code in (200, 201):
            with self.lock:
                self.ids[i] = r.json()["id"]
            return r.json()["id"]
        return None

    def segment(self, c: httpx.Client, rng: random.Random, kind: str = "valid_segment") -> None:
        i = rng.randrange(len(self.frames))
        image = self.ids.get(i) or self.upload(c, i, as_file=False)
        if image is None:
            return
        k = rng.randrange(self.depths[i])
        body = {"image": image, "prompt": self.prompt, "slices": [k, k + 1], "modality": self.modality}
        r = self.call(c, kind, "POST", "/v1/segment", json=body, headers=self.auth)
        if r is not None and r.status_code == 404:  # evicted: upload again
            with self.lock:
                self.ids.pop(i, None)

    def one(self, c: httpx.Client, rng: random.Random) -> None:
        kind = rng.choices(["segment", "upload", "cancel", "bomb", "truncated", "garbage", "token", "prompt"],
                           [40, 12, 6, 10, 8, 8, 8, 8])[0]
        if kind == "segment":
            self.segment(c, rng)
        elif kind == "upload":
            self.upload(c, rng.randrange(len(self.frames)), as_file=rng.random() < 0.5)
        elif kind == "cancel":
            i = rng.randrange(len(self.frames))
            image = self.ids.get(i) or self.upload(c, i, as_file=False)
            if image is None:
                return
            r = self.call(c, "job_submit", "POST", "/v1/segment", headers=self.auth,
                          json={"image": image, "prompt": self.prompt, "job": True, "modality": self.modality})
            if r is not None and r.status_code == 202:
                time.sleep(rng.uniform(0, 0.3))
                self.call(c, "job_cancel", "DELETE", f"/v1/jobs/{r.json()['id']}", headers=self.auth)
        elif kind == "bomb":
            name = rng.choice(sorted(self.bombs))
            self.call(c, f"bomb_{name}", "POST", "/v1/images", content=self.bombs[name], headers=self.auth)
        elif kind == "truncated":
            # A cut frame whose header (with its id) survives names an image the server may already hold:
            # that answers 200 "existed" without decoding (by design); a cut file or new frame answers 400.
            as_file = rng.random() < 0.5
            body = self.files[rng.randrange(len(self.files))] if as_file else \
                self.frames[rng.randrange(len(self.frames))][1]
            self.call(c, "truncated_nii_gz" if as_file else "truncated_frame", "POST", "/v1/images",
                      content=body[:rng.randrange(10, len(body) - 8)], headers=self.auth)
        elif kind == "garbage":
            n = rng.randrange(1, 200_000)
            head = rng.choice([b"", b"\x1f\x8b", b"NRRD0004\n", b"RCMA\x01"])
            self.call(c, "garbage", "POST", "/v1/images", content=head + rng.randbytes(n), headers=self.auth)
        elif kind == "token":
            path, method = rng.choice([("/v1/info", "GET"), ("/v1/images", "POST"), ("/v1/jobs", "GET")])
            self.call(c, "wrong_token", method, path, content=b"x" if method == "POST" else None,
                      headers={"Authorization": f"Bearer wrong-{secrets.token_hex(4)}"})
        else:
            self.call(c, "oversized_prompt", "POST", "/v1/segment", headers=self.auth,
                      json={"image": "0" * 64, "prompt": "liver " * (self.max_prompt_chars // 6 + 10)})

    def client(self, index: int, until: float) -> None:
        rng = random.Random(self.seed + index)
        with httpx.Client(timeout=60) as c:
            while time.monotonic() < until:
                try:
                    self.one(c, rng)
                except Exception as exc:  # noqa: BLE001 - a client bug must not end the soak silently
                    with self.lock:
                        self.errors.append(f"client {index}: {exc!r}"[:300])


def timed_parts(r: httpx.Response, total_s: float) -> dict[str, float] | None:
    """Seconds of an answer that ran on the model: total (as the client saw it), model_wait and model_run
    (Server-Timing), of the wait model_pool (behind other clients) and model_behind_job (behind a job's
    step), app (in the server), rest (total - wait - run: client, loopback, event loop,
    parsing and encoding) and total_without_wait (total - wait: the answer had nobody been ahead of it,
    so its ratio is what busy CPUs alone cost). None for any other answer."""
    try:
        t = parse_server_timing(r.headers.get("server-timing", ""))
    except ValueError:
        return None
    if r.status_code != 200 or t.get("model-wait") is None or t.get("model-run") is None:
        return None
    wait, run = t["model-wait"] / 1000, t["model-run"] / 1000
    pool = (t.get("model-pool") or 0.0) / 1000
    app = t["app"] / 1000 if t.get("app") is not None else float("nan")
    return {"total": total_s, "model_wait": wait, "model_pool": pool, "model_behind_job": wait - pool,
            "model_run": run, "app": app, "rest": total_s - wait - run, "total_without_wait": total_s - wait}


def parts_table(alone: dict[str, list[float]], load: dict[str, list[float]]) -> dict[str, dict]:
    """p50/p99 of each part alone and under load, and their ratios under load / alone."""
    out = {}
    for name in ("total", "model_wait", "model_pool", "model_behind_job", "model_run", "app", "rest",
                 "total_without_wait"):
        a, b = alone.get(name, []), load.get(name, [])
        row = {"alone": {"n": len(a), "p50": pct(a, 50), "p99": pct(a, 99)},
               "load": {"n": len(b), "p50": pct(b, 50), "p99": pct(b, 99)}}
        row["ratio_load_over_alone"] = {q: round(row["load"][q] / row["alone"][q], 2) if row["alone"][q] and
                                        row["load"][q] is not None else None for q in ("p50", "p99")}
        out[name] = row
    return out


def print_parts(table: dict[str, dict]) -> None:
    print(f"server_soak: {'valid segment (s)':<19}{'alone p50':>10}{'p99':>10}{'load p50':>10}{'p99':>10}"
          f"{'x p50':>8}{'x p99':>8}", flush=True)
    for name, row in table.items():
        a, b, x = row["alone"], row["load"], row["ratio_load_over_alone"]
        cells = [a["p50"], a["p99"], b["p50"], b["p99"]]
        print(f"server_soak: {name:<19}" + "".join(f"{v:>10.4f}" if v is not None else f"{'-':>10}" for v in cells)
              + "".join(f"{v:>8.2f}" if v is not None else f"{'-':>8}" for v in (x["p50"], x["p99"])), flush=True)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return round(v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))], 4)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="load phase length (default 10)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument("--alone-s", type=float, default=30.0, help="seconds of valid segments alone first")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the server (default 1)")
    parser.add_argument("--cache-mb", type=int, default=None, help="the server's --cache-mb (default: its own)")
    parser.add_argument("--max-request-mb", type=int, default=None, help="the server's --max-request-mb")
    parser.add_argument("--bomb-side", type=int, default=700, help="bombs announce side^3 float64 (default 700)")
    parser.add_argument("--slices", type=int, default=24, help="slices of each real volume (default 24)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "server_soak.json"))
    args = parser.parse_args(argv)
    if args.clients < 1 or args.clients > 64 or args.minutes <= 0 or args.minutes > 60:
        parser.error("--clients must be 1..64 and --minutes in (0, 60]")
    out = Path(args.out)
    if not out.parent.is_dir():
        parser.error(f"the output folder does not exist: {out.parent}")

    t_start = time.time()
    print(f"server_soak: preparing inputs (bombs announce {args.bomb_side}^3 float64)...", flush=True)
    volumes, modality, source = real_volumes(4, args.slices)
    with tempfile.TemporaryDirectory(prefix="rcmed-soak-") as tmp:
        files = [nii_gz_bytes(v, Path(tmp), f"v{i}") for i, v in enumerate(volumes)]
    bomb_bodies = bombs(args.bomb_side)
    print("server_soak: bombs " + ", ".join(f"{k} {len(v) / MB:.1f} MB" for k, v in bomb_bodies.items()), flush=True)

    token = secrets.token_urlsafe(16)
    port = free_port()
    url = f"http://{HOST}:{port}"
    cmd = [sys.executable, "-m", "rcmed_engine.cli", "serve", "--host", HOST, "--port", str(port), "--preset",
           args.preset, "--device", args.device, "--log-level", "warning"]
    if args.weights:
        cmd += ["--weights", args.weights]
    if args.cache_mb:
        cmd += ["--cache-mb", str(args.cache_mb)]
    if args.max_request_mb:
        cmd += ["--max-request-mb", str(args.max_request_mb)]
    threads = str(args.threads)
    registry = tempfile.mkdtemp(prefix="rcmed-soak-registry-")
    env = {**os.environ, "RCMED_TOKEN": token, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
           "RCMED_REGISTRY": registry}
    server = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server_lines: list[str] = []
    threading.Thread(target=lambda: server_lines.extend(server.stdout), daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the server too when stopped
    watch = None
    try:
        wait_ready(url, server, server_lines)
        info = httpx.get(f"{url}/v1/info", headers={"Authorization": f"Bearer {token}"}).json()
        bound = info["memory"]["bound_bytes"]
        print(f"server_soak: server ready; announced bound {bound / 2**30:.2f} GB; RSS "
              f"{proc_status(server.pid).get('VmRSS', 0) / MB:.0f} MB", flush=True)
        watch = Watch(url, server)
        watch.start()
        soak = Soak(url, token, volumes, files, bomb_bodies, modality, info["limits"]["max_prompt_chars"], args.seed)

        # Valid segments alone (after a warm-up of each volume).
        with httpx.Client(timeout=60) as c:
            rng = random.Random(args.seed)
            for i in range(len(volumes)):
                soak.upload(c, i, as_file=False)
                soak.segment(c, rng, "warmup")
            end = time.monotonic() + args.alone_s
            while time.monotonic() < end:
                soak.segment(c, rng, "valid_segment_alone")
        alone = soak.latency["valid_segment_alone"]
        print(f"server_soak: alone: {len(alone)} segments, p50 {pct(alone, 50)} s, p99 {pct(alone, 99)} s", flush=True)

        # Load.
        until = time.monotonic() + args.minutes * 60
        workers = [threading.Thread(target=soak.client, args=(i, until), daemon=True) for i in range(args.clients)]
        for w in workers:
            w.start()
        while any(w.is_alive() for w in workers):
            time.sleep(min(10.0, max(0.1, until - time.monotonic())))
            with soak.lock:
                total = sum(sum(c.values()) for c in soak.counts.values())
                five = sum(n for c in soak.counts.values() for s, n in c.items() if s.startswith("5"))
            print(f"server_soak: {max(0, until - time.monotonic()):5.0f} s left: {total} requests, {five} x 5xx, "
                  f"RSS {proc_status(server.pid).get('VmRSS', 0) / MB:.0f} MB", flush=True)
            if until - time.monotonic() < -300:
                print("server_soak: clients did not stop 5 minutes after the end; giving up on them", flush=True)
                break
        watch.stop_event.set()
        watch.join(5)
        final = proc_status(server.pid)
        peak = max(watch.peak_rss, final.get("VmHWM", 0))
        info = httpx.get(f"{url}/v1/info", headers={"Authorization": f"Bearer {token}"}).json()
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()

    load = soak.latency["valid_segment"]
    parts = parts_table(soak.parts["valid_segment_alone"], soak.parts["valid_segment"])
    bomb_lat = [t for k, v in soak.latency.items() if k.startswith("bomb_") for t in v]
    bomb_codes = Counter(s for k, c in soak.counts.items() if k.startswith("bomb_") for s in c.elements())
    statuses = Counter(s for c in soak.counts.values() for s in c.elements())
    five = sum(n for s, n in statuses.items() if s.startswith("5") or s == "0")  # 0: no answer at all
    p99_alone, p99_load = pct(alone, 99), pct(load, 99)
    targets = {
        "no_5xx": five == 0,  # 503 included: 16 clients fit the pools' queues, so none should be refused
        "no_crash": watch.exited is None and not soak.errors,
        "peak_rss_within_bound": peak <= bound,
        "bombs_refused_under_1s": bool(bomb_lat) and max(bomb_lat) < 1.0 and set(bomb_codes) <= {"413", "503"},
        "p99_under_load_within_3x_alone": p99_alone is not None and p99_load is not None and p99_load <= 3 * p99_alone,
        "ready_throughout": watch.not_ready == 0,
    }
    result = {
        "what": "rcmed serve soak (issue 21)", "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "preset": args.preset, "device": args.device, "clients": args.clients, "minutes": args.minutes,
        "volumes": source, "volume_shape": list(volumes[0].array.shape), "bomb_side": args.bomb_side,
        "bomb_wire_bytes": {k: len(v) for k, v in bomb_bodies.items()},
        "requests_by_kind": {k: sum(c.values()) for k, c in sorted(soak.counts.items())},
        "status_by_kind": {k: dict(sorted(c.items())) for k, c in sorted(soak.counts.items())},
        "status_counts": dict(sorted(statuses.items())),
        "count_5xx_or_no_answer": five, "count_503": statuses.get("503", 0),
        "valid_segment_alone_s": {"n": len(alone), "p50": pct(alone, 50), "p99": p99_alone},
        "valid_segment_load_s": {"n": len(load), "p50": pct(load, 50), "p99": p99_load},
        "p99_ratio_load_over_alone": round(p99_load / p99_alone, 2) if p99_alone and p99_load else None,
        # Valid segments answered 200, split by their Server-Timing header (seconds).
        "valid_segment_parts_s": parts,
        "bomb_latency_s": {"n": len(bomb_lat), "max": round(max(bomb_lat), 4) if bomb_lat else None,
                           "p50": pct(bomb_lat, 50)},
        "server_peak_rss_bytes": peak, "announced_bound_bytes": bound,
        "announced_bound_items": info["memory"]["bound_items"], "machine_bytes": info["memory"]["machine_bytes"],
        "peak_rss_over_bound": round(peak / bound, 3) if bound else None,
        "ready_polls": watch.polls, "not_ready_polls": watch.not_ready, "server_exited": watch.exited,
        "client_errors": soak.errors, "pools": info.get("pools"), "image_cache": info.get("image_cache"),
        "targets": targets, "all_targets_met": all(targets.values()),
        "wall_s": round(time.time() - t_start, 1),
    }
    write_json_atomic(out, result)
    print(f"server_soak: {sum(statuses.values())} requests, statuses {dict(statuses)}; segments p99 alone "
          f"{p99_alone} s, under load {p99_load} s; bombs max {result['bomb_latency_s']['max']} s; peak RSS "
          f"{peak / MB:.0f} MB of {bound / MB:.0f} MB announced; targets {targets}", flush=True)
    print_parts(parts)
    print(f"server_soak: wrote {out}", flush=True)
    return 0 if all(targets.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
