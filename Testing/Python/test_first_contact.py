"""What a new user meets first: modality, outputs that are never overwritten, plain answers, progress,
repeated shots and errors that come before anything heavy loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from rcmed_engine.cli import main
from rcmed_engine.evaluate import slices_along
from rcmed_engine.io import read_image

TINY = ["--preset", "tiny", "--device", "cpu"]
pytestmark = pytest.mark.usefixtures("one_thread")


def _write(path: Path, array: np.ndarray, **meta: str) -> Path:
    image = sitk.GetImageFromArray(array)
    for k, v in meta.items():
        image.SetMetaData(k, v)
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture
def mr(tmp_path) -> Path:
    vol = np.random.default_rng(0).normal(100, 20, (4, 16, 12)).clip(0).astype(np.float32)
    return _write(tmp_path / "head.nii.gz", vol)


# ------------------------------------------------------------------------------------------ modality
def test_modality_from_the_header(tmp_path):
    vol = np.random.default_rng(0).random((3, 8, 8)).astype(np.float32)
    assert read_image(_write(tmp_path / "a.nrrd", vol, modality="CT")).meta["modality"] == "CT"
    assert read_image(_nifti_with_descrip(tmp_path / "b.nii", vol, "T1w MPRAGE 1mm")).meta["modality"] == "MR"
    assert "modality" not in read_image(_nifti_with_descrip(tmp_path / "c.nii", vol, "subject 12")).meta


def _nifti_with_descrip(path: Path, array: np.ndarray, text: str) -> Path:
    """A NIfTI-1 file whose header description (80 bytes at offset 148) says ``text``."""
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    raw = bytearray(path.read_bytes())
    raw[148:228] = text.encode().ljust(80, b"\0")
    path.write_bytes(bytes(raw))
    return path


def test_guesses_are_said(tmp_path, capsys, mr):
    from rcmed_engine.preprocess import guess_modality

    assert guess_modality(np.zeros((4, 8, 8), np.float32)) == ("MR", "guessed: a grey volume with no negative values")
    assert guess_modality(np.zeros((1, 8, 8, 3), np.uint8))[0] == "microscopy"
    assert guess_modality(np.full((2, 8, 8), -1024.0))[0] == "CT"
    rgb = np.random.default_rng(1).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    png = tmp_path / "tile.png"
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(png))
    assert main(["segment", str(png), "--prompt", "cell nuclei", "-o", str(tmp_path / "o.nii.gz"), *TINY]) == 0
    err = capsys.readouterr().err
    assert "assuming modality microscopy" in err and "--modality" in err


# ------------------------------------------------------------------------------------------ outputs
def test_existing_output_is_refused_unless_overwrite(tmp_path, capsys, mr):
    out = tmp_path / "o.nii.gz"
    out.write_bytes(b"the user's own file")
    assert main(["segment", str(mr), "--prompt", "disc", "-o", str(out), "--modality", "MR", *TINY]) == 1
    err = capsys.readouterr().err
    assert "exists; pass --overwrite" in err and len(err.strip().splitlines()) == 1
    assert out.read_bytes() == b"the user's own file"
    assert main(["segment", str(mr), "--prompt", "disc", "-o", str(out), "--modality", "MR", "--overwrite", *TINY]) == 0
    assert read_image(out).array.shape == (4, 16, 12)
    report = tmp_path / "r.json"
    report.write_text("{}")
    assert main(["evaluate", str(tmp_path), "-o", str(report), *TINY]) == 1
    assert "exists; pass --overwrite" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_read_only_folder_fails_before_the_model_loads(tmp_path, capsys, mr, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main(["segment", str(mr), "--prompt", "disc", "-o", str(locked / "o.nii.gz"), *TINY]) == 1
        assert "cannot write to" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)


def test_unwritable_or_full_output_fails_before_the_model_loads(tmp_path, capsys, mr, monkeypatch):
    """The model is never loaded when the output cannot be written (here: made to fail; a full disk the same)."""
    import rcmed_engine.cli as cli
    import tempfile

    loaded = []
    monkeypatch.setattr(cli, "_engine", lambda args: loaded.append(1))

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)
    assert main(["segment", str(mr), "--prompt", "disc", "-o", str(tmp_path / "o.nii.gz"), *TINY]) == 1
    assert "cannot write to" in capsys.readouterr().err and not loaded
    monkeypatch.undo()
    monkeypatch.setattr(cli, "_engine", lambda args: loaded.append(1))
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 10))
    assert main(["segment", str(mr), "--prompt", "disc", "-o", str(tmp_path / "o.nii.gz"), *TINY]) == 1
    assert "not enough room" in capsys.readouterr().err and not loaded


# ------------------------------------------------------------------------------------------ answers
def test_answer_is_a_plain_sentence_per_target(tmp_path, capsys, mr):
    out = tmp_path / "o.seg.nrrd"
    assert main(["segment", str(mr), "--prompt", "disc and ring", "-o", str(out), "--modality", "MR", *TINY]) == 0
    captured = capsys.readouterr()
    lines = [l for l in captured.err.splitlines() if l.startswith(("disc:", "ring:"))]
    assert len(lines) == 2 and all(("present (presence" in l and " mL" in l) or "absent" in l for l in lines)
    assert "<p>" not in captured.err and "[SEG]" not in captured.err
    summary = json.loads(captured.out)
    assert "[SEG]" in summary["answer"]  # the raw answer stays in the JSON (and the segments' tags)
    assert set(summary["presence"]) == {"disc", "ring"}


# ------------------------------------------------------------------------------------------ progress
def test_evaluate_counts_slices(tmp_path):
    a = sitk.GetImageFromArray(np.zeros((5, 7, 9), np.float32))
    sitk.WriteImage(a, str(tmp_path / "v.nii.gz"))
    assert slices_along(tmp_path / "v.nii.gz", "axial") == 5
    assert slices_along(tmp_path / "v.nii.gz", "coronal") == 7
    assert slices_along(tmp_path / "v.nii.gz", "sagittal") == 9
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((6, 4), np.uint8)), str(tmp_path / "p.png"))
    assert slices_along(tmp_path / "p.png", "axial") == 1


def test_evaluate_progress_is_in_slices(tmp_path):
    from rcmed_engine.engine import Engine
    from rcmed_engine.evaluate import evaluate_dataset
    from rcmed_engine.model.presets import load_preset

    root = tmp_path / "Dataset001_X"
    for d in ("imagesTs", "labelsTs"):
        (root / d).mkdir(parents=True)
    for i, n in enumerate((3, 5)):
        img = np.random.default_rng(i).random((n, 12, 12)).astype(np.float32)
        sitk.WriteImage(sitk.GetImageFromArray(img), str(root / "imagesTs" / f"c{i}_0000.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray((img > 0.5).astype(np.uint8)), str(root / "labelsTs" / f"c{i}.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MR"}, "labels": {"background": 0, "x": 1},
                                                   "file_ending": ".nii.gz"}))
    seen = []
    evaluate_dataset(Engine(load_preset("tiny"), device="cpu"), root, progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (8, 8) and all(t == 8 for _, t in seen) and len(seen) > 2


# ------------------------------------------------------------------------------------------ register
def test_register_refuses_the_same_shot_twice(tmp_path, capsys):
    img = np.random.default_rng(0).random((3, 24, 24)).astype(np.float32)
    mask = np.zeros(img.shape, np.uint8)
    mask[1, 8:16, 8:16] = 1
    _write(tmp_path / "img.nii.gz", img)
    _write(tmp_path / "mask.nii.gz", mask)
    reg = tmp_path / "registry"
    argv = ["register", str(tmp_path / "img.nii.gz"), "--mask", str(tmp_path / "mask.nii.gz"), "--name", "blob",
            "--registry", str(reg), *TINY]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "assuming modality MR" in err  # the same guess, said, as segment makes
    before = {p: p.read_bytes() for p in reg.rglob("*") if p.is_file()}
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "already has this shot" in err and len(err.strip().splitlines()) == 2  # the note, then the error
    assert {p: p.read_bytes() for p in reg.rglob("*") if p.is_file()} == before


# ------------------------------------------------------------------------------------------ time to error
@pytest.mark.parametrize("argv", [
    ["segment", "{missing}", "--prompt", "disc", "-o", "{out}"],
    ["segment", "{image}", "--prompt", "[SEG]", "-o", "{out}"],
    ["segment", "{image}", "--prompt", "disc", "-o", "{existing}"],
    ["segment", "{image}", "--prompt", "disc", "-o", "{tmp}/o.txt"],
    ["segment", "{image}", "--prompt", "disc", "-o", "{out}", "--slices", "x:y"],
    ["evaluate", "{tmp}", "-o", "{tmp}/r.json"],
    ["register", "{missing}", "--mask", "{image}", "--name", "blob", "--registry", "{tmp}/reg"],
    ["register", "{image}", "--mask", "{image}", "--name", "a and b", "--registry", "{tmp}/reg"],
])
def test_argument_errors_come_before_torch_is_imported(tmp_path, mr, argv):
    existing = tmp_path / "existing.nii.gz"
    existing.write_bytes(b"x")
    fill = {"missing": tmp_path / "missing.nii.gz", "out": tmp_path / "o.nii.gz", "image": mr,
            "existing": existing, "tmp": tmp_path}
    args = [a.format(**fill) for a in argv]
    code = ("import sys, json; from rcmed_engine.cli import main; rc = main(json.loads(sys.argv[1])); "
            "print(json.dumps([rc, 'torch' in sys.modules]))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(args + TINY)], capture_output=True, text=True,
                          timeout=120)
    rc, imported = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rc == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not imported, f"torch was imported before the error: {proc.stderr}"


def test_library_progress_bars_are_off_when_not_on_a_terminal(tmp_path, mr):
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    try:
        assert main(["segment", str(mr), "--prompt", "disc", "-o", str(tmp_path / "o.nii.gz"), "--modality", "MR",
                     *TINY]) == 0
        assert not hf_logging.is_progress_bar_enabled()  # pytest's stderr is not a terminal
    finally:
        hf_logging.enable_progress_bar()


def test_demo_picture_has_title_slice_numbers_and_legend():
    from rcmed_engine.demo import montage

    gray = np.full((6, 40, 40), 90, np.uint8)
    masks = np.zeros((6, 40, 40), bool)
    masks[:, 10:20, 10:20] = True
    plain = montage(gray, masks, masks)
    shown = montage(gray, masks, masks, labels=[f"axial {i}" for i in range(6)], title="RCMed lite: 'x' Dice 1.000")
    assert shown.shape[0] == plain.shape[0] + 54 and shown.shape[1] == plain.shape[1]
    head = shown[:54]
    assert ((head == (0, 0, 200)).all(-1)).any() and ((head == (0, 255, 0)).all(-1)).any()  # the legend's swatches
    assert (head > 200).all(-1).any()  # white title text
    assert not np.array_equal(shown[54:], plain)  # the slice labels are drawn on the panels


def test_demo_runs_on_the_template(tmp_path):
    """The demo's own path end to end (tiny weights, four slices): one .seg.nrrd with both prompts, the PNG and
    a Dice per prompt against its reference."""
    pytest.importorskip("nilearn")
    from rcmed_engine.demo import PROMPTS, run
    from rcmed_engine.io import read_labelmap

    summary = run(tmp_path, "tiny", None, (60, 64), batch=4)
    assert set(summary["dice"]) == set(PROMPTS)
    assert (tmp_path / "demo_overlay.png").is_file()
    _, _, segments = read_labelmap(tmp_path / "demo.seg.nrrd")
    assert [s.name for s in segments] == list(PROMPTS)


def test_loading_line_on_a_terminal_only(monkeypatch, capsys):
    import argparse

    import rcmed_engine.cli as cli

    args = argparse.Namespace(preset="lite", server=None)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    cli._loading(args)
    assert "loading the lite model" in capsys.readouterr().err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    cli._loading(args)
    assert capsys.readouterr().err == ""


def _readme_examples() -> list[str]:
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = text.split("Examples that run as written", 1)[1].split("```", 2)[1]
    return [line.strip() for line in block.splitlines() if line.strip()]


def test_readme_examples_are_what_this_test_runs():
    lines = _readme_examples()
    assert lines[0].startswith("T1=$(python -c ") and all(l.startswith("rcmed ") for l in lines[1:])


@pytest.mark.lite
@pytest.mark.slow
def test_readme_examples_run_as_written(tmp_path, monkeypatch, capsys):
    """The README's examples, as written, on the demo's template (the default lite preset, no extra flags)."""
    import shlex

    pytest.importorskip("nilearn")
    lines = _readme_examples()
    code = lines[0].split("python -c ", 1)[1].rsplit(")", 1)[0]
    t1 = subprocess.run([sys.executable, "-c", shlex.split(code)[0]], capture_output=True, text=True,
                        check=True).stdout.strip()
    assert Path(t1).is_file()
    monkeypatch.chdir(tmp_path)
    for line in lines[1:]:
        argv = [a.replace("$T1", t1) for a in shlex.split(line)][1:]
        assert main(argv) == 0, line
        capsys.readouterr()
    assert (tmp_path / "tissue.seg.nrrd").is_file() and (tmp_path / "wm.nii.gz").is_file()
