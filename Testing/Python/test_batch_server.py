"""``rcmed batch --server URL,URL``: a cohort fanned out over two running engines (real uvicorn on 127.0.0.1)
gives the local executor's label maps; a wrong token is one line before any case runs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rcmed_engine.batch import BatchOptions, run_batch
from rcmed_engine.batch.executors import LocalExecutor
from rcmed_engine.cli import main
from rcmed_engine.engine import Engine
from rcmed_engine.io import read_labelmap
from test_batch import make_cohort, manifest_lines
from test_server import TOKEN, ThreadServer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def two_servers():
    servers = [ThreadServer(Engine.from_preset("tiny", device="cpu")).start() for _ in range(2)]
    yield servers
    for s in servers:
        s.stop()


def test_batch_over_two_servers_matches_local(two_servers, tmp_path, capsys):
    src = make_cohort(tmp_path / "in", n=4)
    out = tmp_path / "out"
    urls = ",".join(s.url for s in two_servers)
    rc = main(["batch", str(src), "--prompt", "liver", "-o", str(out), "--server", urls, "--token", TOKEN,
               "--modality", "CT"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 1 and (report["done"], report["failed"]) == (4, 1)
    assert {r["model"] for r in manifest_lines(out)[1:]} == {"tiny:none"}
    local = tmp_path / "local"
    run_batch(BatchOptions(str(src), str(local), prompt="liver", modality="CT", progress=False),
              LocalExecutor(Engine.from_preset("tiny", device="cpu")))
    for i in range(4):
        assert np.array_equal(read_labelmap(out / f"s{i}.seg.nrrd")[0], read_labelmap(local / f"s{i}.seg.nrrd")[0])


def test_wrong_token_is_one_line(two_servers, tmp_path, capsys):
    src = make_cohort(tmp_path / "in", n=1, corrupt=False)
    rc = main(["batch", str(src), "--prompt", "liver", "-o", str(tmp_path / "o"), "--server", two_servers[0].url,
               "--token", "wrong"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "token" in err[0].lower(), err
