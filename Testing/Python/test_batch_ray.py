"""``rcmed batch --ray``: a local Ray cluster (2 CPUs) with the tiny preset, against the local executor; a worker
killed mid-run; an address that does not answer. And: nothing imports Ray unless --ray is given."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from rcmed_engine.batch import BatchOptions, run_batch
from rcmed_engine.batch.executors import LocalExecutor
from rcmed_engine.cli import main
from rcmed_engine.engine import Engine
from rcmed_engine.io import read_labelmap
from test_batch import make_cohort, manifest_lines, mtimes, write_scan

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


@pytest.fixture(scope="module")
def local_ray():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


def ray_executor(workers=2):
    from rcmed_engine.batch.ray_executor import RayExecutor

    return RayExecutor("auto", workers=workers, cpus_per_worker=1, preset="tiny", device="cpu")


def test_ray_cohort_matches_the_local_executor_bit_for_bit(local_ray, tmp_path):
    src = make_cohort(tmp_path / "in", n=5)  # 5 scans and a corrupt one
    out_ray, out_local = tmp_path / "ray", tmp_path / "local"
    opts = BatchOptions(str(src), str(out_ray), prompt="liver and spleen", modality="CT", progress=False)
    executor = ray_executor()
    try:
        first = run_batch(opts, executor)
        assert first.counts == {"done": 5, "failed": 1, "skipped": 0}
        assert first.failed[0][0] == "broken" and "corrupt" in first.failed[0][1]
        before = mtimes(out_ray)
        assert run_batch(opts, executor).counts == {"done": 0, "failed": 1, "skipped": 5}
        assert mtimes(out_ray) == before
        (out_ray / "s3.seg.nrrd").unlink()
        assert run_batch(opts, executor).counts == {"done": 1, "failed": 1, "skipped": 4}
    finally:
        executor.close()
    local = run_batch(BatchOptions(str(src), str(out_local), prompt="liver and spleen", modality="CT",
                                   progress=False), LocalExecutor(Engine.from_preset("tiny", device="cpu")))
    assert local.counts == {"done": 5, "failed": 1, "skipped": 0}
    for i in range(5):
        a, ga, _ = read_labelmap(out_ray / f"s{i}.seg.nrrd")
        b, gb, _ = read_labelmap(out_local / f"s{i}.seg.nrrd")
        assert a.dtype == b.dtype and np.array_equal(a, b) and ga == gb
    assert (out_ray / "summary.csv").read_text().count("\n") == 1 + 5 * 2


def test_a_worker_killed_mid_run_loses_only_its_case(local_ray, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        write_scan(src / f"big{i}.nii.gz", i, shape=(48, 64, 64))
    out = tmp_path / "out"
    executor = ray_executor(workers=1)
    try:
        pid = executor.pids()[0]
        runs = iter(executor.run(_tasks(src, out, executor)))
        first = next(runs)  # the executor has handed the next case to the worker before yielding this one
        os.kill(pid, signal.SIGKILL)
        rest = list(runs)
        assert executor.pids()[0] != pid  # a new worker took the killed one's place
    finally:
        executor.close()
    outcomes = [first, *rest]
    assert sorted(o["case"] for o in outcomes) == ["big0", "big1", "big2"]
    assert all(o["status"] == "done" for o in outcomes), outcomes


def _tasks(src: Path, out: Path, executor):
    from rcmed_engine.batch.cases import find_cases
    from rcmed_engine.batch.work import Task

    out.mkdir(exist_ok=True)
    return [Task(c, "liver", str(out), modality="CT", qc=False) for c in find_cases(src)]


def test_an_unreachable_ray_address_fails_in_one_line_within_the_timeout(tmp_path, capsys):
    src = make_cohort(tmp_path / "in", n=1, corrupt=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    started = time.perf_counter()
    rc = main(["batch", str(src), "--prompt", "liver", "-o", str(tmp_path / "o"), "--preset", "tiny",
               "--ray", f"127.0.0.1:{port}", "--connect-timeout", "3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "cannot reach the Ray cluster" in err[0], err
    assert time.perf_counter() - started < 10


def test_nothing_imports_ray_without_the_ray_option(tmp_path):
    src = make_cohort(tmp_path / "in", n=1, corrupt=False)
    code = ("import sys; from rcmed_engine.cli import main; "
            f"rc = main(['batch', {str(src)!r}, '--prompt', 'liver', '-o', {str(tmp_path / 'o')!r}, "
            "'--preset', 'tiny', '--device', 'cpu', '--modality', 'CT']); "
            "print(rc, 'ray' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.stdout.split()[-2:] == ["0", "False"], done.stdout + done.stderr
