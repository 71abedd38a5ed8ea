"""``rcmed batch`` with the local executor (tiny preset): outcomes per case, resumability, atomic outputs, the lock,
summary.csv volumes against voxel counts x spacing, the QC pictures, and bad input in one line."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from rcmed_engine.batch import BatchOptions, find_cases, run_batch
from rcmed_engine.batch.executors import LocalExecutor
from rcmed_engine.batch.lock import LOCK_NAME
from rcmed_engine.cli import main
from rcmed_engine.engine import Engine
from rcmed_engine.io import read_image, read_labelmap
from rotations import rotation

TINY = ["--preset", "tiny", "--device", "cpu"]
pytestmark = pytest.mark.usefixtures("one_thread")


def write_scan(path: Path, seed: int, shape=(5, 18, 14), spacing=(0.9, 0.8, 2.5), direction=None) -> Path:
    image = sitk.GetImageFromArray(np.random.default_rng(seed).normal(100, 30, shape).astype(np.float32))
    image.SetSpacing(spacing)
    image.SetOrigin((10.0, -20.0, 5.0))
    if direction is not None:
        image.SetDirection(tuple(np.asarray(direction, float).ravel()))
    sitk.WriteImage(image, str(path))
    return path


def make_cohort(folder: Path, n: int = 3, corrupt: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        write_scan(folder / f"s{i}.nii.gz", i)
    if corrupt:
        (folder / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08\x00garbage" * 50)
    return folder


@pytest.fixture(scope="module")
def tiny_engine():
    return Engine.from_preset("tiny", device="cpu")


def manifest_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def mtimes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in out.glob("*.seg.nrrd")}


def batch_fail(capsys, argv: list[str], phrase: str) -> str:
    rc = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert rc != 0 and len(lines) == 1, captured.err
    assert lines[0].startswith("rcmed batch: error:") and phrase.lower() in lines[0].lower(), lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------------- the run
def test_cli_batch_runs_every_case_and_a_corrupt_one_fails_alone(tmp_path, capsys):
    src, out = make_cohort(tmp_path / "in"), tmp_path / "out"
    argv = ["batch", str(src), "--prompt", "liver and spleen", "-o", str(out), *TINY, "--modality", "CT"]
    assert main(argv) == 1  # a failed case makes the exit status non-zero; the others are done
    report = json.loads(capsys.readouterr().out)
    assert (report["done"], report["failed"], report["skipped"]) == (3, 1, 0)
    assert "corrupt" in report["failed_cases"]["broken"]
    records = {r["case"]: r for r in manifest_lines(out)[1:]}
    assert manifest_lines(out)[0] == {"format": "rcmed-batch-manifest", "version": 1}
    assert records["broken"]["status"] == "failed" and "\n" not in records["broken"]["reason"]
    for i in range(3):
        r = records[f"s{i}"]
        assert r["status"] == "done" and r["prompt"] == "liver and spleen" and r["model"] == "tiny:none"
        assert len(r["input_hash"]) == 64 and r["seconds"] > 0
        labels, _, segments = read_labelmap(out / r["output"])
        assert [s.name for s in segments] == ["liver", "spleen"]
        assert [t["voxels"] for t in r["targets"]] == [int((labels == 1).sum()), int((labels == 2).sum())]
        assert (out / "qc" / f"s{i}.png").stat().st_size > 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.jsonl", "summary.csv", "qc", "s0.seg.nrrd", "s1.seg.nrrd", "s2.seg.nrrd"])  # no temp, no lock
    page = (out / "qc" / "index.html").read_text()
    assert all(f'src="s{i}.png"' in page for i in range(3)) and "broken" in page
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [(r["case"], r["target"]) for r in rows] == [(f"s{i}", t) for i in range(3) for t in ("liver", "spleen")]


def test_second_run_does_nothing_and_a_removed_output_is_redone(tmp_path, tiny_engine):
    src, out = make_cohort(tmp_path / "in"), tmp_path / "out"
    opts = BatchOptions(str(src), str(out), prompt="liver", modality="CT", progress=False)
    first = run_batch(opts, LocalExecutor(tiny_engine))
    assert first.counts == {"done": 3, "failed": 1, "skipped": 0}
    before, lines = mtimes(out), len(manifest_lines(out))
    second = run_batch(opts, LocalExecutor(tiny_engine))
    assert second.counts == {"done": 0, "failed": 1, "skipped": 3}  # the failed case is tried again, alone
    assert mtimes(out) == before and len(manifest_lines(out)) == lines + 1
    (out / "s1.seg.nrrd").unlink()
    third = run_batch(opts, LocalExecutor(tiny_engine))
    assert third.counts == {"done": 1, "failed": 1, "skipped": 2}
    after = mtimes(out)
    assert after["s0.seg.nrrd"] == before["s0.seg.nrrd"] and after["s2.seg.nrrd"] == before["s2.seg.nrrd"]
    assert "s1.seg.nrrd" in after
    (src / "broken.nii.gz").unlink()  # fixed by removing it: nothing left to do
    write_scan(src / "s2.nii.gz", 99)  # a changed scan is redone
    fourth = run_batch(opts, LocalExecutor(tiny_engine))
    assert fourth.counts == {"done": 1, "failed": 0, "skipped": 2}
    changed = run_batch(BatchOptions(str(src), str(out), prompt="spleen", modality="CT", progress=False),
                        LocalExecutor(tiny_engine))
    assert changed.counts["done"] == 3  # another prompt: every case again


def test_summary_volumes_are_voxels_times_spacing_on_an_anisotropic_oblique_volume(tmp_path, tiny_engine):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    spacing = (0.7, 1.3, 3.1)
    direction = rotation((1, 2, 3), 0.5) @ np.diag((1, -1, 1))
    write_scan(src / "oblique.nrrd", 4, shape=(7, 20, 16), spacing=spacing, direction=direction)
    run = run_batch(BatchOptions(str(src), str(out), prompt="liver and spleen", modality="CT", progress=False,
                                 axis="coronal"), LocalExecutor(tiny_engine))
    assert run.counts["done"] == 1
    labels, geometry, _ = read_labelmap(out / "oblique.seg.nrrd")
    np.testing.assert_allclose(geometry.spacing, spacing)
    frame = read_image(src / "oblique.nrrd").slice_frame("coronal")
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert len(rows) == 2
    for value, row in enumerate(rows, start=1):
        mask = labels == value
        assert int(row["voxels"]) == int(mask.sum()) > 0
        assert float(row["volume_ml"]) == pytest.approx(mask.sum() * 0.7 * 1.3 * 3.1 / 1000.0, rel=1e-6)
        others = tuple(a for a in range(3) if a != frame.slice_axis)
        assert int(row["slices"]) == int(mask.any(axis=others).sum())
        assert row["present"] == "1"


# ------------------------------------------------------------------------------------------- inputs
def test_csv_manifest_and_nnunet_folder(tmp_path, tiny_engine):
    src = make_cohort(tmp_path / "scans", n=2, corrupt=False)
    manifest = tmp_path / "cohort.csv"
    manifest.write_text("path,modality,prompt\nscans/s0.nii.gz,CT,liver\nscans/s1.nii.gz,,spleen and liver\n")
    out = tmp_path / "out"
    assert run_batch(BatchOptions(str(manifest), str(out), modality="CT", progress=False),
                     LocalExecutor(tiny_engine)).counts["done"] == 2
    records = {r["case"]: r for r in manifest_lines(out)[1:]}
    assert records["s0"]["prompt"] == "liver" and records["s1"]["prompt"] == "spleen and liver"
    nn = tmp_path / "imagesTs"
    nn.mkdir()
    for case in ("case_001", "case_002"):
        write_scan(nn / f"{case}_0000.nii.gz", 1)
        write_scan(nn / f"{case}_0001.nii.gz", 2)
    assert [(c.case_id, Path(c.path).name) for c in find_cases(nn)] == [
        ("case_001", "case_001_0000.nii.gz"), ("case_002", "case_002_0000.nii.gz")]


# ------------------------------------------------------------------------------------------- bad input
def test_bad_input_is_one_line(tmp_path, capsys):
    src = make_cohort(tmp_path / "in", n=1, corrupt=False)
    base = ["--prompt", "liver", *TINY]
    batch_fail(capsys, ["batch", str(tmp_path / "nope"), "-o", str(tmp_path / "o"), *base], "input not found")
    empty = tmp_path / "empty"
    empty.mkdir()
    batch_fail(capsys, ["batch", str(empty), "-o", str(tmp_path / "o"), *base], "no scans")
    afile = tmp_path / "afile"
    afile.write_text("x")
    batch_fail(capsys, ["batch", str(src), "-o", str(afile), *base], "is a file")
    rows = tmp_path / "rows.csv"
    rows.write_text("path\nin/s0.nii.gz\nin/missing.nii.gz\n")
    batch_fail(capsys, ["batch", str(rows), "-o", str(tmp_path / "o"), *base], "row 3: file not found")
    batch_fail(capsys, ["batch", str(src), "-o", str(tmp_path / "o"), *TINY], "no prompt")
    batch_fail(capsys, ["batch", str(src), "-o", str(tmp_path / "o"), *base, "--format", "dcm"], "DICOM series")
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.jsonl").write_text('{"format": "rcmed-batch-manifest", "version": 99}\n')
    batch_fail(capsys, ["batch", str(src), "-o", str(other), *base], "another version")


def test_a_second_run_on_the_same_folder_refuses_and_a_stale_lock_is_taken_over(tmp_path, capsys, tiny_engine):
    src, out = make_cohort(tmp_path / "in", n=1, corrupt=False), tmp_path / "out"
    out.mkdir()
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        (out / LOCK_NAME).write_text(json.dumps({"pid": owner.pid, "host": socket.gethostname()}))
        line = batch_fail(capsys, ["batch", str(src), "-o", str(out), "--prompt", "liver", *TINY],
                          f"pid {owner.pid}")
        assert "another rcmed batch" in line
    finally:
        owner.kill()
        owner.wait()
    run = run_batch(BatchOptions(str(src), str(out), prompt="liver", modality="CT", progress=False),
                    LocalExecutor(tiny_engine))  # its owner is gone: the lock is stale
    assert run.counts["done"] == 1 and not (out / LOCK_NAME).exists()
