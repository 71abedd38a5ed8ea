"""rcmed_training: the data reader, prepare-builtin's no-leak split, CRD, losses, fit, DDP sync and resume.

All on the ``tiny`` preset and small synthetic or cropped data; each test is time-boxed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml
from safetensors.torch import load_file

from rcmed_engine.geometry import to_slices
from rcmed_engine.io import read_image
from rcmed_engine.preprocess import intensity_window, plan_resize, prepare_slices, to_uint8_rgb
from rcmed_training.crd import (DescriberError, DescriptionCache, GeometricDescriber, VLMDescriber,
                                render_overlay)
from rcmed_training.data import LabelledVolumes, TripletSampler, mask_to_frame
from rcmed_training.losses import LossWeights, rcmed_loss
from rcmed_training.trainer import TrainConfig, Trainer, param_digest

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable


def make_synthetic(root: Path, n_tr: int = 2, n_ts: int = 1, shape=(10, 36, 44), seed: int = 0) -> Path:
    """A small nnU-Net v2 raw data set: an ellipsoid "ball" (1) and a "box" (2) in noise, 2 mm slices."""
    rng = np.random.default_rng(seed)
    for d in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / d).mkdir(parents=True, exist_ok=True)
    z, y, x = shape
    zz, yy, xx = np.mgrid[:z, :y, :x]
    ball = (zz - z / 2) ** 2 / 9 + (yy - 12) ** 2 / 36 + (xx - 12) ** 2 / 36 <= 1
    box = (zz >= 2) & (zz < 7) & (yy >= 22) & (yy < 32) & (xx >= 28) & (xx < 40)
    for split, n in (("Tr", n_tr), ("Ts", n_ts)):
        for i in range(n):
            img = rng.normal(50, 10, shape).astype(np.float32)
            lab = np.zeros(shape, np.uint8)
            lab[ball], lab[box] = 1, 2
            img[ball] += 100
            img[box] += 60
            for a, name in ((img, f"images{split}/c{split}{i}_0000.nii.gz"), (lab, f"labels{split}/c{split}{i}.nii.gz")):
                im = sitk.GetImageFromArray(a)
                im.SetSpacing((1.0, 1.0, 2.0))
                sitk.WriteImage(im, str(root / name))
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MR"}, "file_ending": ".nii.gz",
                                                   "labels": {"background": 0, "ball": 1, "box": 2}}))
    return root


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("synth"))


def tiny_cfg(root: Path, out: Path, **over) -> TrainConfig:
    d = {"data": {"root": str(root), "axes": ["axial", "coronal"], "val_slices": 4},
         "model": {"preset": "tiny", "cache_features": False},
         "optim": {"lr": 1e-3, "batch_size": 2, "warmup_steps": 2, "total_steps": 6},
         "run": {"out": str(out), "val_every": 0, "save_every": 0, "threads": 1}}
    for dotted, v in over.items():
        sec, key = dotted.split(".")
        d[sec][key] = v
    return TrainConfig.from_dict(d)


# ------------------------------------------------------------------------------------------- reader
def test_reader_slices_like_the_engine(synth):
    data = LabelledVolumes(synth, "Tr", ("axial", "coronal", "sagittal"))
    z, y, x = 10, 36, 44
    assert len(data) == 2 * (z + y + x)
    assert data.modality_text == "magnetic resonance"
    ref = next(r for r in data.slices if r.axis == "coronal" and "ball" in r.present)
    pixels, lab, plan, rgb = data.prepare(ref, 64, (0, 0, 0), (1, 1, 1), False)
    # The engine's path, by hand: whole-volume window, anatomical frame, spacing-aware resize, pad.
    vol = read_image(synth / "imagesTr" / f"{data.entries[ref.case].case_id}_0000.nii.gz")
    frame = vol.slice_frame("coronal")
    stack = to_slices(vol.array, frame)
    t = plan_resize(stack.shape[1:3], 64, frame.pixel_spacing)
    want = prepare_slices(to_uint8_rgb(np.ascontiguousarray(stack[ref.index:ref.index + 1]),
                                       intensity_window(vol.array, "MR")), t, (0, 0, 0), (1, 1, 1))
    assert torch.equal(pixels, want[0])
    assert plan.resized_hw == t.resized_hw and t.resized_hw[0] != stack.shape[1]  # 2 mm rows were stretched
    m = mask_to_frame(lab == 1, plan)
    h, w = plan.resized_hw
    assert m.shape == (64, 64) and set(np.unique(m)) <= {0.0, 1.0} and m[h:].sum() == 0 and m[:, w:].sum() == 0


def test_sampler_mix_and_negatives(synth):
    data = LabelledVolumes(synth, "Tr", ("axial",))
    sampler = TripletSampler(data, 64, (0, 0, 0), (1, 1, 1), negative_fraction=0.3,
                             describe=lambda ref, name, rgb, mask: GeometricDescriber().describe(rgb, mask))
    samples = [sampler.draw(0, i) for i in range(60)]
    fmts = {s.fmt for s in samples if s.present}
    assert fmts == {"seg_all_crd", "seg_all", "seg_subset"}
    neg = [s for s in samples if not s.present]
    assert neg and all(s.masks.shape[0] == 0 and "does not contain" in s.answer and "[SEG]" not in s.answer
                       for s in neg)
    for s in samples:
        if s.present:
            assert s.masks.shape[0] == len(s.targets) == s.answer.count("[SEG]")
            assert all(m.sum() > 0 for m in s.masks)
    crd = next(s for s in samples if s.fmt == "seg_all_crd")
    assert "region" in crd.answer and crd.answer.startswith("This is a <p> magnetic resonance </p> image.")
    # Deterministic: the same (seed, number) gives the same sample.
    again = sampler.draw(0, 7)
    assert again.answer == samples[7].answer and torch.equal(again.pixels, samples[7].pixels)


def test_reader_2d(tmp_path):
    root = tmp_path / "d2"
    for d in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / d).mkdir(parents=True)
    img = np.zeros((1, 30, 50), np.uint16)
    lab = np.zeros((1, 30, 50), np.uint8)
    lab[0, 5:15, 5:15] = 1
    img[lab > 0] = 900
    sitk.WriteImage(sitk.GetImageFromArray(img), str(root / "imagesTr" / "a_0000.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(lab), str(root / "labelsTr" / "a.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "microscopy"},
                                                   "labels": {"background": 0, "cell nuclei": 1}}))
    data = LabelledVolumes(root, "Tr", ("axial", "coronal", "sagittal"))
    assert len(data) == 1 and data.slices[0].present == ("cell nuclei",)
    pixels, lab2, plan, _ = data.prepare(data.slices[0], 64, (0, 0, 0), (1, 1, 1), False)
    assert lab2.shape == (30, 50) and plan.resized_hw == (38, 64)


# ---------------------------------------------------------------------------------- prepare-builtin
def _world_points(path: Path) -> set[tuple[float, float, float]]:
    im = sitk.ReadImage(str(path))
    size = im.GetSize()
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), -1).reshape(-1, 3)
    m = np.array(im.GetDirection()).reshape(3, 3) * np.array(im.GetSpacing())
    pts = idx @ m.T + np.array(im.GetOrigin())
    return set(map(tuple, np.round(pts, 3)))


def test_prepare_builtin_mni_no_leak(tmp_path):
    pytest.importorskip("nilearn", reason="nilearn's data files are needed (make install)")
    from rcmed_training.builtin import prepare_mni

    root = prepare_mni(tmp_path, gap=2, crop=(slice(70, 94), slice(90, 110), slice(80, 104)))
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "white matter": 1, "grey matter": 2}
    tr = set().union(*(_world_points(p) for p in (root / "imagesTr").glob("*.nii.gz")))
    ts = set().union(*(_world_points(p) for p in (root / "imagesTs").glob("*.nii.gz")))
    assert tr and ts and not (tr & ts)  # no test voxel in any training volume, whatever plane is cut
    # Sampling every plane of the training split reads only training volumes, and both classes are there.
    data = LabelledVolumes(root, "Tr", ("axial", "coronal", "sagittal"))
    assert {e.case_id for e in data.entries} == {"MNI152_tr0", "MNI152_tr1"}
    assert {c for r in data.slices for c in r.present} == {"white matter", "grey matter"}
    for e in data.entries:  # labels stay on their image's grid
        assert e.labels.shape == e.volume.shape_zyx


def test_prepare_builtin_nuclei(tmp_path):
    from rcmed_training.builtin import stardist_data_dir

    if not (stardist_data_dir() / "img2d.tif").is_file():
        pytest.skip("stardist data files not installed (make install)")
    from rcmed_training.cli import main as train_main

    assert train_main(["prepare-builtin", str(tmp_path), "--only", "nuclei"]) == 0
    root = tmp_path / "Dataset902_StardistNuclei"
    assert train_main(["describe", str(root), "--describer", "vlm", "--vlm-dir", str(tmp_path / "none"),
                       "--no-fallback", "--limit", "1"]) == 2  # one clear line, no traceback
    tr, ts = sorted((root / "imagesTr").glob("*")), sorted((root / "imagesTs").glob("*"))
    assert len(tr) == 12 and len(ts) == 4
    boxes = lambda files: {tuple(sitk.ReadImage(str(f)).GetOrigin()[:2]) for f in files}  # noqa: E731
    assert not (boxes(tr) & boxes(ts))
    data = LabelledVolumes(root, "Ts")
    assert len(data) == 4 and all(r.present == ("cell nuclei",) for r in data.slices)


# ---------------------------------------------------------------------------------------------- CRD
def _disc(h, w, cy, cx, r):
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_crd_geometric_known_shapes():
    g = GeometricDescriber()
    text = g.describe(None, _disc(100, 100, 22, 25, 10))
    assert text.startswith("a single round region in the upper left quadrant") and "small" in text
    assert "patient's right" in g.describe(None, _disc(100, 100, 22, 25, 10), plane="axial")
    two = _disc(100, 100, 30, 30, 8) | _disc(100, 100, 70, 70, 8)
    assert g.describe(None, two).startswith("2 separate regions")
    bar = np.zeros((100, 100), bool)
    bar[45:52, 10:90] = True
    assert "elongated" in g.describe(None, bar) and "centre" in g.describe(None, bar)
    big = np.zeros((100, 100), bool)
    big[45:100, 45:100] = True
    assert "lower right" in g.describe(None, big) and "large" in g.describe(None, big)
    assert g.describe(None, np.zeros((10, 10), bool)) == "absent from this slice"
    over = render_overlay(np.zeros((100, 100, 3), np.uint8), two)
    assert over[30, 30, 0] > 0 and over[30, 30, 1] == 0 and over[0, 0].sum() == 0


def test_crd_vlm_prompt_and_missing_folder(tmp_path):
    v = VLMDescriber(tmp_path / "no_model")
    msgs = v.build_messages("left_kidney", "computed tomography")
    text = msgs[0]["content"][1]["text"]
    assert msgs[0]["content"][0] == {"type": "image"}
    assert "red" in text and "left kidney" in text and "computed tomography" in text
    with pytest.raises(DescriberError, match="no vision-language model folder"):
        v.describe(np.zeros((8, 8, 3), np.uint8), np.ones((8, 8), bool), "x")
    fb = VLMDescriber(None, fallback=GeometricDescriber())
    assert fb.describe(None, _disc(50, 50, 10, 10, 5), "x").startswith("a single") and fb.last_source == "geometric"


def test_crd_jsonl_cache(tmp_path):
    calls = []

    class Counting(GeometricDescriber):
        def describe(self, *a, **k):
            calls.append(1)
            return super().describe(*a, **k)

    mask = _disc(40, 40, 10, 10, 5)
    c = DescriptionCache(tmp_path)
    t1 = c.get_or_make(Counting(), "case", "axial", 3, "ball", None, mask, "mr")
    t2 = c.get_or_make(Counting(), "case", "axial", 3, "ball", None, mask, "mr")
    assert t1 == t2 and len(calls) == 1 and (c.hits, c.misses) == (1, 1)
    c.get_or_make(Counting(), "case", "axial", 3, "ball", None, ~mask, "mr")  # another mask: another key
    lines = (tmp_path / DescriptionCache.FILE).read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["text"] == t1
    again = DescriptionCache(tmp_path)
    assert again.get_or_make(Counting(), "case", "axial", 3, "ball", None, mask, "mr") == t1 and len(calls) == 2


# ------------------------------------------------------------------------------------------- losses
def test_loss_weights_configurable(tmp_path):
    torch.manual_seed(0)
    logits, labels = torch.randn(1, 5, 7), torch.randint(0, 7, (1, 5))
    ml, mt = torch.randn(2, 16, 16), (torch.rand(2, 16, 16) > 0.5).float()
    base = rcmed_loss(logits, labels, ml, mt)
    assert torch.isclose(base["total"], base["ce"] + 0.5 * base["bce"] + 2 * base["dice"] + 0.2 * base["boundary"])
    only = rcmed_loss(logits, labels, ml, mt, LossWeights(ce=0, bce=0, dice=1, boundary=0))
    assert torch.isclose(only["total"], base["dice"])
    cfg = TrainConfig.from_dict({"loss": {"ce": 0.5, "dice": "3"}})
    assert cfg.loss == LossWeights(ce=0.5, bce=0.5, dice=3.0, boundary=0.2)
    with pytest.raises(ValueError, match="unknown keys in loss"):
        TrainConfig.from_dict({"loss": {"focal": 1}})


# ---------------------------------------------------------------------------------------- training
def _batch_loss(tr: Trainer, samples) -> float:
    tr.model.eval()
    with torch.no_grad():
        pixels, enc, masks, feats = tr._tensors(samples)
        loss = float(tr.module(pixels, enc, masks, feats)["total"])
    tr.model.train()
    return loss


def test_training_lowers_loss_and_checkpoint_loads(synth, tmp_path):
    cfg = tiny_cfg(synth, tmp_path / "run", **{"optim.total_steps": 12, "optim.warmup_steps": 1,
                                              "model.cache_features": True, "run.val_every": 6})
    tr = Trainer(cfg)
    fixed = [tr.sampler.draw(99, i) for i in range(4)]
    before = _batch_loss(tr, fixed)
    tr.fit()
    after = _batch_loss(tr, fixed)
    assert after < before, (before, after)
    assert tr.feature_cache.hits > 0 and any((tmp_path / "run" / "feature_cache").rglob("*.safetensors"))
    log = [json.loads(l) for l in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "total" in r] == list(range(1, 13))
    assert any("val_dice" in r for r in log) and (tmp_path / "run" / "curves.png").stat().st_size > 1000
    # The final folder holds only what trained, and the engine's tiny preset takes it as --weights.
    final = tmp_path / "run" / "final"
    keys = set(load_file(str(final / "model.safetensors")))
    assert not any(k.startswith(("image_encoder.", "prompt_encoder.")) for k in keys)
    assert any(k.startswith("mask_decoder.") for k in keys) and any(".lora_" in k for k in keys)
    from rcmed_engine.cli import main as rcmed_main
    from rcmed_engine.model.presets import load_preset

    loaded = load_preset("tiny", final)
    assert loaded.model.config.trained and not loaded.report.missing
    out = tmp_path / "seg.nii.gz"
    assert rcmed_main(["segment", str(synth / "imagesTs" / "cTs0_0000.nii.gz"), "--prompt", "ball", "-o", str(out),
                       "--preset", "tiny", "--weights", str(final), "--modality", "MR"]) == 0
    assert out.is_file()


def test_resume_continues_exactly(synth, tmp_path):
    a = Trainer(tiny_cfg(synth, tmp_path / "a"))
    a.fit()
    b = Trainer(tiny_cfg(synth, tmp_path / "b", **{"run.save_every": 2}))
    b.fit(stop_after=3)  # stops at 3; the last step is saved too
    assert b.step == 3 and (tmp_path / "b" / "checkpoints" / "step-3").is_dir()
    c = Trainer(tiny_cfg(synth, tmp_path / "b", **{"run.save_every": 2}))
    c.resume(tmp_path / "b")
    assert c.step == 3 and c.scheduler.last_epoch == 3
    c.fit()
    assert c.step == 6
    assert param_digest(a.model) == param_digest(c.model)
    pa, pc = dict(a.model.named_parameters()), dict(c.model.named_parameters())
    assert all(torch.equal(pa[n], pc[n]) for n in a.trainable)
    steps = {int(s["step"]) for s in c.optimizer.state_dict()["state"].values()}
    assert steps == {6}


def child_env() -> dict[str, str]:
    """A torchrun child imports the rcmed_training this process imported (the installed one may be another
    checkout's), and this checkout's rcmed_engine."""
    import rcmed_training

    here = str(Path(rcmed_training.__file__).parent.parent)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([here, str(REPO)])}


def torchrun_fit(cfg: TrainConfig, path: Path, *extra: str) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "rcmed_training.cli",
           "fit", str(path), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=child_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]


def log_rows(run: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if key in r}


# Five steps, a checkpoint at 3, validation at 5: the run DDP and FSDP both make.
TWO_PROCESS = {"optim.total_steps": 5, "run.save_every": 3, "run.val_every": 5}


@pytest.fixture(scope="module")
def ddp_run(synth, tmp_path_factory) -> tuple[TrainConfig, Path]:
    out = tmp_path_factory.mktemp("two") / "ddp"
    cfg = tiny_cfg(synth, out, **TWO_PROCESS)
    torchrun_fit(cfg, out.with_suffix(".yaml"))
    return cfg, out


def test_two_process_gloo_ranks_stay_in_sync(ddp_run):
    cfg, out = ddp_run
    r0 = json.loads((out / "params_rank0.json").read_text())
    r1 = json.loads((out / "params_rank1.json").read_text())
    assert r0["step"] == r1["step"] == 5
    assert r0["digest"] == r1["digest"]
    assert sorted(log_rows(out, "total")) == [1, 2, 3, 4, 5]
    # Trained: the synced parameters moved away from the common initialisation.
    init = param_digest(Trainer(cfg).model)
    assert init != r0["digest"]


def test_fsdp_matches_ddp_and_resumes_exactly(synth, ddp_run, tmp_path):
    """2 gloo processes, FSDP2 with activation checkpointing: DDP's losses step by step, a gathered final
    checkpoint the engine loads, and a resume from the sharded step-3 checkpoint that is the same run."""
    _, ddp = ddp_run
    run = tmp_path / "fsdp"
    cfg = tiny_cfg(synth, run, **TWO_PROCESS, **{"run.strategy": "fsdp", "run.activation_checkpointing": True})
    torchrun_fit(cfg, tmp_path / "fsdp.yaml")
    want, got = log_rows(ddp, "total"), log_rows(run, "total")
    assert sorted(got) == [1, 2, 3, 4, 5]
    assert max(abs(got[s] - want[s]) for s in want) <= 1e-5, (want, got)
    assert log_rows(run, "val_dice") == pytest.approx(log_rows(ddp, "val_dice"), abs=1e-5)
    r0, r1 = (json.loads((run / f"params_rank{r}.json").read_text()) for r in (0, 1))
    assert r0["digest"] == r1["digest"]  # both ranks gathered the same full parameters
    # The gathered trained parts: DDP's keys and values, and the engine takes them as --weights.
    a, b = load_file(str(ddp / "final" / "model.safetensors")), load_file(str(run / "final" / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    from rcmed_engine.model.presets import load_preset

    assert not load_preset("tiny", run / "final").report.missing
    step3 = run / "checkpoints" / "step-3"
    assert (step3 / "sharded" / ".metadata").is_file() and not (step3 / "trainable.safetensors").exists()
    assert torch.load(step3 / "trainer_state.pt", weights_only=True)["step"] == 3
    # Resumed from step 3 in another folder: steps 4 and 5 and the parameters are the uninterrupted run's.
    resumed = tmp_path / "resumed"
    torchrun_fit(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out=str(resumed))),
                 tmp_path / "resumed.yaml", "--resume", str(step3))
    assert log_rows(resumed, "total") == {s: got[s] for s in (4, 5)}
    assert json.loads((resumed / "params_rank0.json").read_text()) == r0


def test_fsdp_recomputes_layers_in_bf16_with_fp32_master_weights(synth, tmp_path, monkeypatch):
    """A 1-rank gloo group in this process: with activation checkpointing each decoder layer runs twice a step
    (forward, then recomputed in backward), in bf16 under run.mixed_precision: bf16, while the sharded LoRA
    weights and their gradients stay fp32; the frozen encoder (not sharded) serves the feature cache."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        tr = Trainer(tiny_cfg(synth, tmp_path / "run", **{"run.strategy": "fsdp", "run.mixed_precision": "bf16",
                                                          "run.activation_checkpointing": True,
                                                          "model.cache_features": True}))
        seen = []
        layers = tr.model.language_model.model.layers
        for layer in layers:
            # A pre-hook: the recomputation stops inside the MLP once backward has what it needs.
            layer.mlp.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
        assert np.isfinite(tr.train_step()["total"])
        assert seen == [torch.bfloat16] * (2 * len(layers))
        lora = [p for n, p in tr.model.named_parameters() if ".lora_" in n and p.requires_grad]
        assert lora and all(isinstance(p, DTensor) and p.dtype == p.grad.dtype == torch.float32 for p in lora)
        assert tr.feature_cache.misses == 2
    finally:
        dist.destroy_process_group()


def test_unsupported_launch_fails_before_any_work(synth, tmp_path, monkeypatch, capsys):
    import rcmed_training.trainer as trainer_module
    from rcmed_training.cli import main

    def no_work(*args, **kwargs):
        raise AssertionError("the model was built before the launch was checked")

    monkeypatch.setattr(trainer_module, "build_training_model", no_work)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_cfg(synth, tmp_path / "run").to_dict()))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert main(["fit", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "DeepSpeed" in err and "accelerate_syre7b_fsdp.yaml" in err
    assert not (tmp_path / "run").exists()
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["fit", str(path), "--set", "run.strategy=fsdp"]) == 2  # FSDP outside a launcher
    assert "needs a launcher" in capsys.readouterr().err


@pytest.mark.parametrize("env, reason", [
    ({"FSDP_VERSION": "1"}, "fsdp_version: 2"),
    ({"FSDP_OFFLOAD_PARAMS": "true"}, "fsdp_offload_params"),
    ({"ACCELERATE_MIXED_PRECISION": "fp16"}, "fp16"),
])
def test_fsdp_launch_settings_refused(env, reason):
    from rcmed_training.sharding import UnsupportedLaunch, launch_settings
    from rcmed_training.trainer import RunConfig

    base = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "WORLD_SIZE": "2"}
    with pytest.raises(UnsupportedLaunch, match=reason):
        launch_settings(RunConfig(), {**base, **env})


def test_shipped_accelerate_fsdp_config_launches_fsdp():
    """accelerate's own launcher reads configs/accelerate_syre7b_fsdp.yaml; the loop takes what it sets."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env
    from rcmed_training.sharding import launch_settings
    from rcmed_training.trainer import RunConfig

    args = launch_command_parser().parse_args(["--config_file", str(REPO / "configs" / "accelerate_syre7b_fsdp.yaml"),
                                               "-m", "rcmed_training.cli", "fit", "x.yaml"])
    env = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    run = launch_settings(RunConfig(), {**env, "WORLD_SIZE": "8"})
    assert (run.strategy, run.mixed_precision, run.activation_checkpointing) == ("fsdp", "bf16", True)
    assert launch_settings(RunConfig(), {"WORLD_SIZE": "2"}).strategy == "ddp"  # torchrun alone: DDP


def test_shipped_configs_parse():
    for name in ("tiny.yaml", "lite.yaml", "syre7b.yaml"):
        cfg = TrainConfig.load(REPO / "configs" / name)
        assert cfg.data.mix == {"seg_all_crd": 0.4, "seg_all": 0.4, "seg_subset": 0.2}
        assert cfg.loss == LossWeights()
    lite = TrainConfig.load(REPO / "configs" / "lite.yaml")
    assert lite.model.preset == "lite" and lite.model.cache_features and "image_encoder" not in lite.model.train
    stage2 = TrainConfig.load(REPO / "configs" / "lite_decoder.yaml")
    assert stage2.model.init_weights == lite.run.out + "/final"
    assert stage2.model.feature_cache == lite.run.out + "/feature_cache"
    assert json.loads((REPO / "configs" / "deepspeed_zero2.json").read_text())["zero_optimization"]["stage"] == 2
    with pytest.raises(ValueError, match="frozen image encoder"):
        TrainConfig.from_dict({"model": {"cache_features": True, "train": ["image_encoder"]}})


def test_mni_tissue_maps_are_scaled_before_thresholding(tmp_path):
    """nilearn stores the tissue probabilities as uint8 x 255: thresholding the raw values at 0.5 would
    label every non-zero voxel (the whole brain) as white matter."""
    import SimpleITK as sitk

    from rcmed_engine.demo import tissue_probability
    from rcmed_training.builtin import prepare_mni

    assert tissue_probability(np.array([0, 127, 128, 255], np.uint8)).tolist() == pytest.approx(
        [0.0, 127 / 255, 128 / 255, 1.0])
    root = prepare_mni(tmp_path, crop=(slice(80, 110), slice(40, 190), slice(30, 170)))
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(next((root / "labelsTs").glob("*.nii.gz")))))
    frac = np.bincount(label.ravel(), minlength=3) / label.size
    assert 0.05 < frac[1] < 0.45 and 0.05 < frac[2] < 0.45  # white and grey matter, each a fraction of the brain


# ------------------------------------------------------------------------------- the CPU lite recipe
def test_gathered_cross_entropy_equals_the_full_one():
    """forward_losses scores only the answer's positions; the loss is the one over (B, L, V) logits."""
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 9, 11), torch.randint(0, 11, (2, 9))
    labels[:, :4] = -100
    labels[1, 7:] = -100
    scored = labels[:, 1:] != -100
    full = rcmed_loss(logits, labels, torch.zeros(0, 4, 4), torch.zeros(0, 4, 4))["ce"]
    gathered = rcmed_loss(logits[:, :-1][scored], labels[:, 1:][scored], torch.zeros(0, 4, 4),
                          torch.zeros(0, 4, 4))["ce"]
    assert torch.allclose(full, gathered)


def test_lora_layers_limits_what_trains_and_where_backward_stops(synth, tmp_path):
    cfg = tiny_cfg(synth, tmp_path / "run", **{"model.train": ["text_hidden_fcs", "lv_projection", "lora",
                                                               "mask_decoder"], "model.lora_layers": 1})
    tr = Trainer(cfg)
    lora = [n for n in tr.trainable if ".lora_" in n]
    assert lora and all(".layers.1." in n for n in lora)  # the tiny model has 2 layers: only the last trains
    assert not any(n.startswith("vl_projection.") for n in tr.trainable)
    assert any(n.startswith("text_hidden_fcs.") for n in tr.trainable)
    frozen = [m for n, m in tr.model.language_model.named_modules() if n.endswith("lora_dropout") and ".layers.0." in n]
    assert frozen and all(isinstance(d, torch.nn.Identity) for m in frozen for d in m.values())
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    tr.fit(stop_after=2)
    changed = {n for n, p in tr.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(tr.trainable)
    with pytest.raises(ValueError, match="lora_layers"):
        tiny_cfg(synth, tmp_path / "x", **{"model.lora_layers": 0})


def test_foreign_negatives_ask_for_another_data_sets_class(synth, tmp_path):
    other = make_synthetic(tmp_path / "other", n_tr=1, seed=1)
    meta = json.loads((other / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "nucleus": 1, "cell": 2}
    meta["channel_names"] = {"0": "CT"}
    (other / "dataset.json").write_text(json.dumps(meta))
    cfg = tiny_cfg(synth, tmp_path / "run", **{"data.root": [str(synth), str(other)],
                                               "data.foreign_fraction": 0.5, "data.negative_fraction": 0.0})
    tr = Trainer(cfg)
    samples = [tr.sampler.draw(0, i) for i in range(40)]
    foreign = [s for s in samples if not s.present]
    assert 8 <= len(foreign) <= 32
    for s in foreign:  # the slice's own data set says which classes are foreign to it
        assert s.masks.shape[0] == 0 and "does not contain" in s.answer and len(s.targets) == 1
        mr = s.answer.startswith("This is a <p> magnetic resonance </p> image.")
        assert s.targets[0] in ({"nucleus", "cell"} if mr else {"ball", "box"})
    assert {s.answer.startswith("This is a <p> magnetic resonance") for s in foreign} == {True, False}
    assert tr.sampler.draw(0, 3).answer == samples[3].answer  # still deterministic


def test_final_checkpoint_in_half_precision_loads(synth, tmp_path):
    from safetensors import safe_open

    from rcmed_engine.model.presets import load_preset

    cfg = tiny_cfg(synth, tmp_path / "run", **{"optim.total_steps": 2, "run.save_dtype": "float16"})
    tr = Trainer(cfg)
    tr.fit()
    final = tmp_path / "run" / "final"
    with safe_open(str(final / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    loaded = load_preset("tiny", final)
    assert next(loaded.model.parameters()).dtype == torch.float32
    w = dict(tr.model.named_parameters())["text_hidden_fcs.mlp.0.weight"]
    got = dict(loaded.model.named_parameters())["text_hidden_fcs.mlp.0.weight"]
    assert torch.allclose(got, w.detach().half().float())
    with pytest.raises(ValueError, match="save_dtype"):
        tiny_cfg(synth, tmp_path / "x", **{"run.save_dtype": "int8"})


def test_added_tokens_start_at_the_vocabulary_mean():
    """init_lite's added-token rows: near the mean row, apart from each other, not the std-0.02 default."""
    from rcmed_engine.model.presets import build_model, tiny_config
    from rcmed_engine.model.rcmed import added_token_rows
    from rcmed_training.init_lite import init_added_tokens

    torch.manual_seed(0)
    model = build_model(tiny_config())
    init_added_tokens(model)
    embed = model.language_model.get_input_embeddings().weight.detach()
    rows = added_token_rows(model)
    base, added = embed[: rows.start], embed[rows]
    mean = base.mean(0)
    spread = (base - mean).norm(dim=1).median()
    assert ((added - mean).norm(dim=1) < spread).all()
    assert torch.cdist(added, added).add(torch.eye(len(added)) * 1e9).min() > 0


def test_tiny_preset_leaves_the_global_rng_alone():
    from rcmed_engine.model.presets import load_preset

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = load_preset("tiny").model
    assert torch.equal(torch.rand(3), expected)
    b = load_preset("tiny").model
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_presence_term_scores_the_engines_read_out():
    """LossWeights.presence: CE of "contains" against "does" at the answer's presence position, the very
    pair of logits the engine's presence score is the softmax of."""
    from rcmed_engine.model.presets import load_preset
    from rcmed_training.step import collate, encode_sample, expand_labels, forward_losses, presence_ids, presence_pairs

    model = load_preset("tiny").model
    samples = [encode_sample(model, ["ball"], "MR", True), encode_sample(model, ["box"], "MR", False),
               encode_sample(model, ["ball", "box"], "MR", True)]
    pixels = torch.randn(3, 3, 64, 64)
    masks = [torch.zeros(1, 64, 64), torch.zeros(0, 64, 64), torch.zeros(2, 64, 64)]
    with torch.no_grad():
        off = forward_losses(model.eval(), pixels, samples, masks, LossWeights())
        on = forward_losses(model, pixels, samples, masks, LossWeights(presence=2.0))
        ids, attn, labels = collate(samples, model.tokenizer.pad_id)
        _, hidden, _ = model.forward_train(pixels, ids, attn, with_logits=False)
        exp = expand_labels(labels, ids, model.config.num_image_tokens)
        scored = exp[:, 1:] != -100
        logits = model.language_model.get_output_embeddings()(hidden[:, :-1][scored])
        pair, present = presence_pairs(model, logits, exp[:, 1:][scored], scored)
    assert present.tolist() == [True, False, True]
    pos, neg = presence_ids(model)
    # the engine's read-out for sample 0, by its own plan, at its own position
    plan = model.plan_prompt(["ball"], "magnetic resonance")
    assert (pos, neg) == (plan.positive_id, plan.negative_id)
    want = torch.nn.functional.cross_entropy(pair, (~present).long())
    assert torch.isclose(on["presence"], want) and float(off["presence"]) == 0.0
    assert torch.isclose(on["total"], off["total"] + 2.0 * want, atol=1e-5)


# --------------------------------------------------------------------------------- the decoder stage
def test_decoder_stage_caches_the_engines_inputs_and_trains_only_the_decoder(synth, tmp_path):
    """fit-decoder: the cached embedding and prompt are what the engine computes; absent and foreign
    classes have empty targets; only mask_decoder.* changes; the result loads as --weights."""
    from rcmed_engine.engine import Engine
    from rcmed_engine.model.presets import load_preset
    from rcmed_training.decoder_stage import build_decoder_set, fit_decoder

    other = make_synthetic(tmp_path / "other", n_tr=1, seed=1)
    meta = json.loads((other / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "nucleus": 1}
    (other / "dataset.json").write_text(json.dumps(meta))
    stage1 = tmp_path / "stage1"
    Trainer(tiny_cfg(synth, stage1, **{"optim.total_steps": 2})).fit()

    model = load_preset("tiny", stage1 / "final").model
    ds = build_decoder_set(model, [str(synth), str(other)], "Tr", ("axial",), None, stride=3)
    assert ds.classes == ["ball", "box", "nucleus"]
    present = ds.targets.flatten(2).any(-1)
    assert present.any() and (~present).any()
    # the "nucleus" target is empty on every slice of the ball/box data set (one case, first in the list)
    first = len(LabelledVolumes(synth, "Tr", ("axial",)).slices[::3])
    assert not present[:first, 2].any()
    # the prompt is the engine's: same [SEG] prompt as Engine.segment's suffix on that slice
    engine = Engine(load_preset("tiny", stage1 / "final"), device="cpu")
    data = LabelledVolumes(synth, "Tr", ("axial",))
    img, _, _ = data.slice_arrays(data.slices[3])
    prep = engine.prepare(img.astype(np.float32), "MR", "axial")
    rgb = to_uint8_rgb(prep.stack, data.entries[0].window)
    state, _ = engine._prefix_states(rgb, prep.transform)
    with torch.no_grad():
        want = engine.model.suffix(state, engine.model.plan_prompt(["ball"], "magnetic resonance")).prompts[0, 0]
    assert torch.allclose(ds.prompts[1, 0], want, atol=1e-5)

    cfg = tiny_cfg(synth, tmp_path / "dec", **{"data.root": [str(synth), str(other)], "data.stride": 2,
                                               "model.init_weights": str(stage1 / "final"),
                                               "optim.total_steps": 4, "optim.batch_size": 4, "run.val_every": 2})
    summary = fit_decoder(cfg)
    assert summary["step"] == 4 and summary["train_slices"] > 0
    log = [json.loads(l) for l in (tmp_path / "dec" / "log.jsonl").read_text().splitlines()]
    assert any("val_dice" in r for r in log)
    before = load_preset("tiny", stage1 / "final").model.state_dict()
    after = load_preset("tiny", tmp_path / "dec" / "final").model
    assert after.config.trained
    changed = {k for k, v in after.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("mask_decoder.") for k in changed)


def test_presence_threshold_is_written_into_the_saved_config(synth, tmp_path):
    from rcmed_engine.model.checkpoint import read_config

    tr = Trainer(tiny_cfg(synth, tmp_path / "run", **{"optim.total_steps": 1, "model.presence_threshold": 0.0}))
    assert tr.model.config.presence_threshold == 0.0
    tr.fit()
    assert read_config(tmp_path / "run" / "final").presence_threshold == 0.0


def test_fit_decoder_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    from rcmed_training.cli import main

    assert main(["fit-decoder", str(tmp_path / "missing.yaml")]) == 2
    assert main(["fit-decoder", str(REPO / "configs" / "lite_decoder.yaml"), "--set", "bogus.key=1"]) == 2
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"root": str(tmp_path / "nowhere")},
                                   "model": {"preset": "tiny"}, "run": {"out": str(tmp_path / "o")}}))
    assert main(["fit-decoder", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("rcmed-train: error: ") for line in err)
