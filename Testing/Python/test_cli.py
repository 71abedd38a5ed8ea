"""The ``rcmed`` command: bad input fails in one clear line with no file left behind; clicks; info; evaluate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from safetensors.torch import load_file, save_file

from rcmed_engine.cli import _glue_negative_values, build_parser, main
from rcmed_engine.clicks import parse_click
from rcmed_engine.engine import Engine
from rcmed_engine.evaluate import dice
from rcmed_engine.geometry import Geometry
from rcmed_engine.io import SegmentInfo, read_image, read_labelmap, write_labelmap
from rcmed_engine.model.checkpoint import WEIGHTS_NAME, save_checkpoint
from rcmed_engine.model.presets import load_preset
from test_refine import blob_volume, oracle, voxel_ras  # noqa: F401 (oracle: the fake decoder fixture)
from test_refine import geometry as oblique_geometry

TINY = ["--preset", "tiny", "--device", "cpu"]
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for the module


def write(path: Path, array: np.ndarray, spacing=(0.9, 0.8, 2.5)) -> Path:
    image = sitk.GetImageFromArray(array)
    if image.GetDimension() == 3:
        image.SetSpacing(spacing)
        image.SetOrigin((10.0, -20.0, 5.0))
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture
def dirs(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    vol = np.random.default_rng(0).normal(100, 20, (4, 16, 12)).astype(np.float32)
    write(src / "ct.nii.gz", vol)
    return src, out


def run_fail(capsys, argv: list[str], phrase: str, out_dir: Path) -> str:
    rc = main(argv)
    captured = capsys.readouterr()
    err = captured.err
    assert rc != 0, f"expected a failure for {argv}"
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"stderr must be one line, got: {err!r}"
    assert lines[0].startswith("rcmed ") and "error:" in lines[0]
    assert phrase.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in err
    assert sorted(p.name for p in out_dir.iterdir()) == [], "an output or temporary file was left behind"
    assert captured.out == ""
    return lines[0]


def seg_args(image, out, prompt="disc", *extra) -> list[str]:
    return ["segment", str(image), "--prompt", prompt, "-o", str(out), *TINY, "--modality", "MR", *extra]


# ------------------------------------------------------------------------------------------- success

def test_segment_writes_the_labelmap_and_reports_json(dirs, capsys):
    src, out = dirs
    target = out / "seg.nii.gz"
    assert main(seg_args(src / "ct.nii.gz", target, "liver and spleen")) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["targets"] == ["liver", "spleen"] and report["output"] == str(target)
    labels, geometry, _ = read_labelmap(target)
    assert labels.shape == (4, 16, 12)
    assert report["voxels"] == {"liver": int((labels == 1).sum()), "spleen": int((labels == 2).sum())}
    assert geometry.spacing == pytest.approx((0.9, 0.8, 2.5))
    assert [p.name for p in out.iterdir()] == ["seg.nii.gz"]


# ------------------------------------------------------------------------------------------- bad input

def test_missing_file(dirs, capsys):
    src, out = dirs
    run_fail(capsys, seg_args(src / "nope.nii.gz", out / "o.nii.gz"), "not found", out)


def test_corrupt_file(dirs, capsys):
    src, out = dirs
    bad = src / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage" * 50)
    run_fail(capsys, seg_args(bad, out / "o.nii.gz"), "cannot read", out)
    truncated = src / "truncated.nrrd"
    write(truncated, np.random.default_rng(1).normal(size=(4, 16, 12)).astype(np.float32))
    truncated.write_bytes(truncated.read_bytes()[:-300])
    run_fail(capsys, seg_args(truncated, out / "o.nii.gz"), "truncated", out)


@pytest.mark.parametrize("name", ["truncated.nii.gz", "truncated.nii"])
def test_truncated_nifti(dirs, capsys, name):
    src, out = dirs
    path = src / name
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(1).normal(size=(4, 16, 12)).astype(np.float32)),
                    str(path))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    run_fail(capsys, seg_args(path, out / "o.nii.gz"), "truncated", out)


@pytest.mark.parametrize("content", ["empty", "junk"])
def test_unreadable_dicom_folder(dirs, capsys, content):
    src, out = dirs
    folder = src / "dicom"
    folder.mkdir()
    if content == "junk":
        for i in range(3):
            (folder / f"IM{i:04d}.dcm").write_bytes(os.urandom(300))
    run_fail(capsys, seg_args(folder, out / "o.seg.nrrd"), "no DICOM series", out)


def test_4d_image(dirs, capsys):
    src, out = dirs
    path = src / "fmri.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 3, 8, 8), np.float32), isVector=False), str(path))
    run_fail(capsys, seg_args(path, out / "o.nii.gz"), "4D images are not supported", out)


def test_empty_prompt(dirs, capsys):
    src, out = dirs
    run_fail(capsys, seg_args(src / "ct.nii.gz", out / "o.nii.gz", "   "), "prompt is empty", out)


def test_ten_thousand_character_prompt(dirs, capsys):
    src, out = dirs
    line = run_fail(capsys, seg_args(src / "ct.nii.gz", out / "o.nii.gz", "liver " * 1667), "limit is 500", out)
    assert len(line) < 500  # the message does not echo the prompt


def test_nan_voxels(dirs, capsys):
    src, out = dirs
    vol = np.ones((3, 8, 8), np.float32)
    vol[1, 2, 3] = np.nan
    path = write(src / "nan.nrrd", vol)
    run_fail(capsys, seg_args(path, out / "o.nii.gz"), "NaN", out)


@pytest.mark.parametrize("slices", ["2:9", "3:3", "-1:2"])
def test_slice_range_out_of_bounds(dirs, capsys, slices):
    src, out = dirs
    run_fail(capsys, seg_args(src / "ct.nii.gz", out / "o.nii.gz", "disc", f"--slices={slices}"), "out of bounds",
             out)


@pytest.mark.parametrize("slices", ["2-5", "a:b", "1:2:3"])
def test_malformed_slices(dirs, capsys, slices):
    src, out = dirs
    run_fail(capsys, seg_args(src / "ct.nii.gz", out / "o.nii.gz", "disc", f"--slices={slices}"), "--slices", out)


def test_unknown_preset(dirs, capsys):
    src, out = dirs
    argv = ["segment", str(src / "ct.nii.gz"), "--prompt", "disc", "-o", str(out / "o.nii.gz"),
            "--preset", "huge", "--modality", "MR"]
    run_fail(capsys, argv, "unknown preset", out)


def test_weights_of_the_wrong_shape(dirs, capsys, tmp_path):
    src, out = dirs
    folder = tmp_path / "weights"
    save_checkpoint(load_preset("tiny").model, folder)
    state = load_file(str(folder / WEIGHTS_NAME))
    key = "text_hidden_fcs.mlp.2.weight"
    state[key] = state[key].reshape(-1).contiguous()
    save_file(state, str(folder / WEIGHTS_NAME))
    argv = seg_args(src / "ct.nii.gz", out / "o.nii.gz") + ["--weights", str(folder)]
    line = run_fail(capsys, argv, "do not fit", out)
    assert key in line and "mismatched" in line


def test_weights_folder_missing(dirs, capsys, tmp_path):
    src, out = dirs
    argv = seg_args(src / "ct.nii.gz", out / "o.nii.gz") + ["--weights", str(tmp_path / "absent")]
    run_fail(capsys, argv, "weights folder not found", out)


def test_output_in_a_missing_folder(dirs, capsys):
    src, out = dirs
    run_fail(capsys, seg_args(src / "ct.nii.gz", out / "sub" / "o.nii.gz"), "output folder does not exist", out)


@pytest.mark.parametrize("name", ["o.png", "o.txt", "o"])
def test_unsupported_output_suffix(dirs, capsys, name):
    src, out = dirs
    run_fail(capsys, seg_args(src / "ct.nii.gz", out / name), "unsupported output", out)


def test_unknown_modality(dirs, capsys):
    src, out = dirs
    argv = ["segment", str(src / "ct.nii.gz"), "--prompt", "disc", "-o", str(out / "o.nii.gz"), *TINY,
            "--modality", "sonar"]
    run_fail(capsys, argv, "unknown modality", out)


def test_modality_is_guessed_and_said(dirs, capsys):
    """No --modality and nothing in the file: a non-negative grey volume is taken as MR, and stderr says
    so and how to change it (a guess is never silent)."""
    src, out = dirs
    argv = ["segment", str(src / "ct.nii.gz"), "--prompt", "disc", "-o", str(out / "o.nii.gz"), *TINY]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "assuming modality MR" in captured.err and "--modality" in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["modality"] == "MR"


def test_console_script_exit_code_and_one_line(dirs):
    src, out = dirs
    exe = Path(sys.executable).parent / "rcmed"
    assert exe.is_file(), "the rcmed console script is not installed in this environment"
    env = {k: v for k, v in os.environ.items() if k != "RCMED_DEBUG"}  # debug mode re-raises
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([str(exe), "segment", str(src / "missing.nii.gz"), "--prompt", "disc",
                           "-o", str(out / "o.seg.nrrd"), *TINY], capture_output=True, text=True, timeout=120,
                          env=env)
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "not found" in lines[0], proc.stderr
    assert list(out.iterdir()) == []


# ------------------------------------------------------------------------------------------- clicks

def ras_arg(geometry: Geometry, zyx, suffix: str = "") -> str:
    r, a, s = voxel_ras(geometry, zyx)
    return f"{r:.4f},{a:.4f},{s:.4f}{suffix}"


@pytest.fixture
def blobs(tmp_path, request):
    """test_refine's two bright blocks (A on axial slices 2..8, B on 3..5) as an image file; with
    ``oblique`` in the test's name, in an oblique, flipped, anisotropic volume."""
    geo = (oblique_geometry(0.35, flip=(-1, 1, -1), spacing=(1.0, 0.9, 1.2)) if "oblique" in request.node.name
           else Geometry((10.0, -20.0, 5.0), (0.9, 0.8, 2.5), (1, 0, 0, 0, 1, 0, 0, 0, 1)))
    vol, a, b = blob_volume(geo)
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    image = sitk.GetImageFromArray(vol.array)
    vol.geometry.apply_to(image)
    sitk.WriteImage(image, str(src / "blobs.nrrd"))
    return read_image(src / "blobs.nrrd"), a, b, src, out


def earlier(path: Path, labels: np.ndarray, geometry: Geometry, prompt: str | None = "tumour") -> Path:
    """An earlier result as rcmed segment writes it (the prompt in the segments' tags), or a plain label map."""
    tags = {} if prompt is None else {"RCMed.prompt": prompt}
    segments = [SegmentInfo(f"target {v}", v, (1.0, 0.0, 0.0), tags) for v in range(1, max(1, int(labels.max())) + 1)]
    write_labelmap(path, labels.astype(np.uint8), geometry, segments if path.name.endswith(".seg.nrrd") else [])
    return path


def test_segment_then_click_in_an_oblique_volume(blobs, capsys, oracle):
    """segment --click: the text's mask corrected by the click, as Engine.refine gives it, with the clicks in the
    segments' tags and a refine summary in the JSON line."""
    vol, a, _, src, out = blobs
    click = ras_arg(vol.geometry, (5, 8, 9))
    target = out / "t.seg.nrrd"
    assert main(["segment", str(src / "blobs.nrrd"), "--prompt", "tumour", "-o", str(target), *TINY,
                 "--modality", "CT", "--click", click]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["refine"]["clicks"] == 1 and report["refine"]["boxes"] == 0 and "tumour: " in captured.err
    labels, _, segments = read_labelmap(target)
    expected = Engine(load_preset("tiny"), device="cpu").refine(vol, "tumour", [parse_click(click)], modality="CT")
    assert np.array_equal(labels, expected.labels) and labels[5, 8, 9] == 1
    assert json.loads(segments[0].tags["RCMed.clicks"])["clicks"][0]["label"] == "include"
    assert segments[0].tags["RCMed.prompt"] == "tumour"


def test_refine_corrects_an_earlier_result(blobs, capsys, oracle):
    """rcmed refine: the prompt comes from SEG_FILE's tags; an exclude click removes the leak through the
    volume, and with --no-propagate on its own slice only."""
    vol, a, b, src, out = blobs
    seg = earlier(src / "leaky.seg.nrrd", a | b, vol.geometry)
    argv = ["refine", str(seg), str(src / "blobs.nrrd"), "--click", ras_arg(vol.geometry, (4, 18, 19), ":exclude"),
            *TINY, "--modality", "CT"]
    assert main([*argv, "-o", str(out / "fixed.seg.nrrd")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["targets"] == ["tumour"] and report["refine"]["clicks"] == 1
    fixed, geometry, segments = read_labelmap(out / "fixed.seg.nrrd")
    assert np.array_equal(fixed, a.astype(np.uint8)) and geometry == vol.geometry
    assert "exclude" in segments[0].tags["RCMed.clicks"]
    assert main([*argv, "-o", str(out / "one.nii.gz"), "--no-propagate"]) == 0
    one = read_labelmap(out / "one.nii.gz")[0]
    leak_left = (a | b).copy()
    leak_left[4] = a[4]
    assert np.array_equal(one, leak_left.astype(np.uint8))


def test_refine_segments_a_clicked_slice_the_earlier_run_never_reached(blobs, capsys, oracle, monkeypatch):
    """`segment --slices 0:3` records its axis and range in the tags; a click on slice 6 is segmented first."""
    from rcmed_engine.engine import Engine

    vol, a, b, src, out = blobs
    assert main(["segment", str(src / "blobs.nrrd"), "--prompt", "tumour", "--slices", "0:3", *TINY,
                 "--modality", "CT", "-o", str(out / "part.seg.nrrd")]) == 0
    tags = read_labelmap(out / "part.seg.nrrd")[2][0].tags
    assert tags["RCMed.axis"] == "axial" and tags["RCMed.slices"] == "0:3"
    calls = []
    real = Engine.segment
    monkeypatch.setattr(Engine, "segment", lambda self, *a_, **kw: calls.append(kw.get("slices")) or real(self, *a_, **kw))
    assert main(["refine", str(out / "part.seg.nrrd"), str(src / "blobs.nrrd"), "--click",
                 ras_arg(vol.geometry, (6, 8, 9)), "--no-propagate", *TINY, "--modality", "CT",
                 "-o", str(out / "more.seg.nrrd")]) == 0
    assert calls == [(6, 7)]


def test_refine_a_plain_label_map_with_a_box(blobs, capsys, oracle):
    """A label map without segment names needs --prompt; a negative coordinate may follow --box directly."""
    vol, a, b, src, out = blobs
    seg = earlier(src / "empty.nii.gz", np.zeros(a.shape, np.uint8), vol.geometry, None)
    box = f"{ras_arg(vol.geometry, (4, 14, 14))}:{ras_arg(vol.geometry, (4, 22, 24))}"
    assert box.startswith("-")  # R of this volume is negative: argparse alone would take it for an option
    assert main(["refine", str(seg), str(src / "blobs.nrrd"), "--prompt", "tumour", "--box", box, "--no-propagate",
                 "-o", str(out / "boxed.seg.nrrd"), *TINY, "--modality", "CT"]) == 0
    assert json.loads(capsys.readouterr().out)["refine"]["boxes"] == 1
    got = read_labelmap(out / "boxed.seg.nrrd")[0]
    assert np.array_equal(got[4], b[4].astype(np.uint8)) and not got[np.arange(12) != 4].any()


def test_negative_coordinates_are_glued_to_their_option():
    argv = _glue_negative_values(["segment", "x", "--click", "-1.5,2,3:exclude", "--box", "-.5,2,3:4,5,3",
                                  "--slices", "-1:2", "--click", "1,2,3"])
    assert argv == ["segment", "x", "--click=-1.5,2,3:exclude", "--box=-.5,2,3:4,5,3", "--slices", "-1:2",
                    "--click", "1,2,3"]
    args = build_parser().parse_args(["segment", "x", "--prompt", "p", "-o", "o.nii.gz", *argv[2:4], *argv[6:]])
    assert args.click == ["-1.5,2,3:exclude", "1,2,3"] and args.box == ["-.5,2,3:4,5,3"]


@pytest.mark.parametrize("case, phrase", [
    ("segment: click outside", "outside the image"),
    ("segment: zero-area box", "zero area"),
    ("segment: malformed click", "--click wants"),
    ("segment: --no-propagate alone", "only applies"),
    ("refine: exclude with no mask", "nothing to remove"),
    ("refine: another geometry", "another grid"),
    ("refine: no click", "nothing to correct"),
    ("refine: more labels than targets", "names 1 target"),
    ("refine: plain label map, no prompt", "pass --prompt"),
    ("refine: SEG_FILE missing", "not found"),
])
def test_bad_click_input_is_one_line_and_writes_nothing(case, phrase, blobs, capsys, oracle):
    vol, a, b, src, out = blobs
    g = vol.geometry
    image, target = str(src / "blobs.nrrd"), str(out / "o.seg.nrrd")
    segment = ["segment", image, "--prompt", "tumour", "-o", target, *TINY, "--modality", "CT"]
    inside = ras_arg(g, (5, 8, 9))
    argv = {
        "segment: click outside": [*segment, "--click", ras_arg(g, (5, 8, 40))],
        "segment: zero-area box": [*segment, "--box", f"{ras_arg(g, (4, 3, 3))}:{ras_arg(g, (4, 3, 9))}"],
        "segment: malformed click": [*segment, "--click", "1,2"],
        "segment: --no-propagate alone": [*segment, "--no-propagate"],
    }.get(case)
    if argv is None:
        labels, geometry, prompt, click = np.zeros(a.shape, np.uint8), g, "tumour", [f"--click={inside}:exclude"]
        name = "earlier.seg.nrrd"
        if case == "refine: another geometry":
            labels, click = a.astype(np.uint8), [f"--click={inside}"]
            geometry = Geometry((11.0, -20.0, 5.0), g.spacing, g.direction)
        elif case == "refine: no click":
            click = []
        elif case == "refine: more labels than targets":
            labels = np.where(b, 2, a).astype(np.uint8)
        elif case == "refine: plain label map, no prompt":
            name, prompt = "earlier.nii.gz", None
        path = earlier(src / name, labels, geometry, prompt)
        if case == "refine: SEG_FILE missing":
            path = src / "absent.seg.nrrd"
        argv = ["refine", str(path), image, "-o", target, *click, *TINY, "--modality", "CT"]
    run_fail(capsys, argv, phrase, out)


# ------------------------------------------------------------------------------------------- info

def test_info_says_untrained(capsys):
    assert main(["info", *TINY]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["preset"] == "tiny" and info["trained"] is False
    assert "untrained" in info["note"]
    assert info["weights_sha256"] == "none"


# ------------------------------------------------------------------------------------------- evaluate

@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "Dataset001_Disc"
    (root / "imagesTs").mkdir(parents=True)
    (root / "labelsTs").mkdir()
    (root / "dataset.json").write_text(json.dumps({
        "labels": {"background": 0, "disc": 1}, "channel_names": {"0": "MR"}, "file_ending": ".nii.gz",
        "numTraining": 0}))
    rng = np.random.default_rng(3)
    for case in ("case_000", "case_001"):
        vol = rng.normal(50, 10, (3, 20, 18)).astype(np.float32)
        label = np.zeros(vol.shape, np.uint8)
        label[:, 5:12, 4:11] = 1
        vol[label == 1] += 200
        write(root / "imagesTs" / f"{case}_0000.nii.gz", vol)
        write(root / "labelsTs" / f"{case}.nii.gz", label)
    return root


def test_evaluate_writes_the_design_json(dataset, tmp_path, capsys):
    report_path = tmp_path / "report.json"
    assert main(["evaluate", str(dataset), "-o", str(report_path), *TINY]) == 0
    summary = json.loads(capsys.readouterr().out)
    report = json.loads(report_path.read_text())
    assert set(report) == {"mean_dice", "classes", "cases", "seconds", "preset"}
    assert report["preset"] == "tiny"
    assert set(report["classes"]) == {"disc"}
    assert set(report["classes"]["disc"]) == {"dice", "cases"} and report["classes"]["disc"]["cases"] == 2
    assert len(report["cases"]) == 2
    for row in report["cases"]:
        assert set(row) == {"case", "class", "dice", "seconds"}
        assert row["class"] == "disc" and row["seconds"] >= 0 and 0 <= row["dice"] <= 1
    assert [r["case"] for r in report["cases"]] == ["case_000", "case_001"]
    assert report["seconds"] >= 0
    # The numbers are the real Dice of what the engine segments for the class name.
    engine = Engine.from_preset("tiny", device="cpu")
    for row in report["cases"]:
        image = read_image(dataset / "imagesTs" / f"{row['case']}_0000.nii.gz")
        truth = read_image(dataset / "labelsTs" / f"{row['case']}.nii.gz").array == 1
        pred = engine.segment(image, "disc", modality="MR").labels == 1
        assert row["dice"] == pytest.approx(dice(pred, truth), abs=1e-6)
    assert report["mean_dice"] == pytest.approx(np.mean([r["dice"] for r in report["cases"]]), abs=1e-6)
    assert report["classes"]["disc"]["dice"] == pytest.approx(report["mean_dice"], abs=1e-6)
    assert summary["mean_dice"] == report["mean_dice"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_evaluate_bad_dataset_fails_cleanly(tmp_path, capsys):
    (tmp_path / "ds").mkdir()
    out = tmp_path / "out"
    out.mkdir()
    run_fail(capsys, ["evaluate", str(tmp_path / "ds"), "-o", str(out / "r.json"), *TINY], "dataset.json", out)
