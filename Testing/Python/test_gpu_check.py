"""bench/gpu_check.sh --dry-run: the device check rehearsed on the CPU, so a GPU minute never meets a typo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
SYRE_KEYS = [f"{path}_b{b}" for path in ("naive", "fast", "fast_compile") for b in (1, 8)]


def test_dry_run_writes_every_key(tmp_path):
    out = tmp_path / "gpu.json"
    env = dict(os.environ, RCMED_PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["dry_run"] is True
    for part in ("syre_7b", "lite", "lora_step"):
        assert result[part]["status"] == "ok", (part, result[part].get("error"))
    syre = result["syre_7b"]
    for key in SYRE_KEYS:
        assert syre[key]["ms_per_slice"] > 0 and "peak_gib" in syre[key]
    assert syre["agreement_fast_vs_naive"] >= 0.9999 and syre["agree_pass"] is True
    assert 0.0 < syre["foreground_naive_b8"] < 1.0  # agreement on non-empty masks
    assert {"agreement_fast_compile_vs_naive", "speedup_b8", "parameters"} <= set(syre)
    lite = result["lite"]
    assert lite["agreement_cpu_fp32_vs_cpu"] >= 0.999 and lite["cpu"]["ms_per_slice"] > 0
    lora = result["lora_step"]
    assert lora["samples_per_s"] > 0 and lora["trainable_parameters"] > 0 and "peak_gib" in lora
    fsdp = result["fsdp"]  # the trainer's FSDP2 path, one rank (gloo here, NCCL on the device)
    assert fsdp["status"] == "ok", fsdp.get("error")
    assert fsdp["world_size"] == 1 and fsdp["why_one_process"] and fsdp["fsdp_groups"] > 1
    assert fsdp["samples_per_s"] > 0 and np.isfinite(fsdp["loss"]) and fsdp["dcp_mib"] > 0
    assert "syre-7b fast_b8" in proc.stdout  # the table


def _gpu_check():
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check

    return gpu_check


def test_a_failing_part_is_one_line_in_its_json(tmp_path, monkeypatch):
    gc = _gpu_check()

    def broken(rec, dry):
        rec.set("measured", 1.0)
        raise RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB")

    monkeypatch.setitem(gc.PART_FUNCS, "lite", broken)
    out = tmp_path / "lite.json"
    gc.run_child("lite", True, out)
    data = json.loads(out.read_text())
    assert data["status"] == "error" and data["measured"] == 1.0  # what it measured before the failure stays
    assert data["error"] == "RuntimeError: CUDA out of memory."


def test_a_part_past_its_budget_is_stopped_and_recorded():
    gc = _gpu_check()
    data = gc.run_part("fsdp", True, budget=0.01)
    assert data["status"] == "timeout" and "budget" in data["error"]


def test_simpleitk_stand_in_only_where_missing(monkeypatch):
    gc = _gpu_check()
    assert gc.stand_in_simpleitk() is False  # installed here: the real one stays
    monkeypatch.setitem(sys.modules, "SimpleITK", None)  # as if missing: importing it raises
    assert gc.stand_in_simpleitk() is True
    stub = sys.modules["SimpleITK"]
    try:
        stub.ReadImage("x.nii.gz")
    except RuntimeError as exc:
        assert "stand-in" in str(exc)
    else:
        raise AssertionError("the stand-in must refuse file I/O")
