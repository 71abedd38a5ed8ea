"""Adapters that never forget: train one on the frozen `tiny` base for a new synthetic class, then check that
old classes keep the base model's exact masks, the new class gets better, and bad adapters fail in one line.

Data are made here (synthetic rings); nothing held out is read.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from rcmed_engine.adapters import CONFIG_NAME, WEIGHTS_NAME, AdapterError
from rcmed_engine.engine import Engine
from rcmed_training.trainer import TrainConfig

OLD = ["ball", "box", "cell nuclei"]  # the base model's answers to these must not change by one bit


def make_rings(root: Path, n_tr: int = 3, n_ts: int = 1, shape=(6, 48, 48), seed: int = 0) -> Path:
    """An nnU-Net v2 raw data set with one new class, "ring": a bright annulus in noise."""
    rng = np.random.default_rng(seed)
    for d in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / d).mkdir(parents=True, exist_ok=True)
    z, y, x = shape
    _, yy, xx = np.mgrid[:z, :y, :x]
    for split, n in (("Tr", n_tr), ("Ts", n_ts)):
        for i in range(n):
            cy, cx = rng.integers(18, 30, 2)
            r = np.hypot(yy - cy, xx - cx)
            ring = (r >= 7) & (r <= 13)
            img = rng.normal(40, 8, shape).astype(np.float32) + 120 * ring
            for a, name in ((img, f"images{split}/r{split}{i}_0000.nii.gz"),
                            (ring.astype(np.uint8), f"labels{split}/r{split}{i}.nii.gz")):
                im = sitk.GetImageFromArray(a)
                im.SetSpacing((1.0, 1.0, 3.0))
                sitk.WriteImage(im, str(root / name))
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MR"}, "file_ending": ".nii.gz",
                                                   "labels": {"background": 0, "ring": 1}}))
    return root


def ring_cfg(root: Path, out: Path, steps: int = 40) -> TrainConfig:
    return TrainConfig.from_dict({
        "data": {"root": str(root), "axes": ["axial"], "val_split": None, "negative_fraction": 0.0},
        "model": {"preset": "tiny", "train": ["rcmed", "lora", "mask_decoder"], "lora_dropout": False},
        "optim": {"lr": 3e-3, "batch_size": 2, "warmup_steps": 2, "total_steps": steps},
        "run": {"out": str(out), "val_every": 0, "save_every": 0, "threads": 1}})


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    from rcmed_training.adapter import fit_adapter

    base = tmp_path_factory.mktemp("adapters")
    return fit_adapter(ring_cfg(make_rings(base / "rings"), base / "run"), "rings")


def _case(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    img = sitk.GetArrayFromImage(sitk.ReadImage(str(next((folder / "imagesTs").glob("*.nii.gz")))))
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(next((folder / "labelsTs").glob("*.nii.gz")))))
    return img, lab > 0


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum()))


def test_adapter_folder_holds_only_the_adapter(adapter_dir):
    from safetensors.torch import load_file

    meta = json.loads((adapter_dir / CONFIG_NAME).read_text())
    assert meta["peft_type"] == "LORA" and meta["r"] == 4
    info = meta["rcmed"]
    assert info["name"] == "rings" and info["classes"] == ["ring"] and info["base"] == "tiny random (seed 0)"
    assert len(info["data_sha256"]) == 64 and info["figures"]["steps"] == 40
    keys = set(load_file(str(adapter_dir / WEIGHTS_NAME)))
    assert any(".lora_" in k for k in keys) and any(k.startswith("mask_decoder.") for k in keys)
    assert not any(k.startswith(("image_encoder.", "prompt_encoder.")) or "embed_tokens" in k for k in keys)


def test_old_classes_bit_identical_and_new_class_better(adapter_dir):
    img, truth = _case(adapter_dir.parent.parent / "rings")
    base = Engine.from_preset("tiny", device="cpu")
    with_adapter = Engine.from_preset("tiny", device="cpu")
    with_adapter.load_adapter(str(adapter_dir))
    prompts = OLD + [", ".join(OLD), "ring", "ball and ring"]
    before = base.segment_many(img, prompts, modality="MR")
    after = with_adapter.segment_many(img, prompts, modality="MR")
    for p in range(len(OLD) + 1):  # prompts of old classes only: the same masks and presence, bit for bit
        assert np.array_equal(before[p].labels, after[p].labels), prompts[p]
        assert np.array_equal(before[p].presence, after[p].presence), prompts[p]
    # A mixed prompt: the base target's row and presence are the base model's own.
    assert np.array_equal(before[-1].presence[0], after[-1].presence[0])
    d_base, d_adapter = _dice(before[len(OLD) + 1].labels > 0, truth), _dice(after[len(OLD) + 1].labels > 0, truth)
    assert d_adapter > d_base + 0.2 and d_adapter > 0.5, (d_base, d_adapter)
    info = with_adapter.info()["adapters"]
    assert [a["name"] for a in info] == ["rings"] and info[0]["classes"] == ["ring"]


def _copy(src: Path, dst: Path, **rcmed) -> Path:
    shutil.copytree(src, dst)
    meta = json.loads((dst / CONFIG_NAME).read_text())
    meta["rcmed"].update(rcmed)
    (dst / CONFIG_NAME).write_text(json.dumps(meta))
    return dst


def test_bad_adapters_fail_in_one_line(adapter_dir, tmp_path):
    engine = Engine.from_preset("tiny", device="cpu")
    other = _copy(adapter_dir, tmp_path / "other", base="sha256:" + "0" * 64)
    corrupt = _copy(adapter_dir, tmp_path / "corrupt")
    (corrupt / WEIGHTS_NAME).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    twin = _copy(adapter_dir, tmp_path / "twin", name="rings-2", classes=["Ring"])
    for folder, words in ((other, "trained on base weights"), (corrupt, "cannot read"),
                          (tmp_path, "not an adapter folder")):
        with pytest.raises(AdapterError, match=words) as err:
            engine.load_adapter(str(folder))
        assert "\n" not in str(err.value)
    engine.load_adapter(str(adapter_dir))
    with pytest.raises(AdapterError, match="both claim ring") as err:
        engine.load_adapter(str(twin))
    assert "\n" not in str(err.value) and len(engine.adapters) == 1


def test_adapter_refuses_shared_parts(tmp_path):
    from rcmed_training.adapter import fit_adapter

    cfg = ring_cfg(tmp_path, tmp_path / "run")
    cfg.model.train = ["lora", "added_tokens"]
    with pytest.raises(ValueError, match="cannot train added_tokens"):
        fit_adapter(cfg, "x")


def test_cli_segment_and_info_with_adapters(adapter_dir, tmp_path, capsys):
    from rcmed_engine.cli import main

    rings = adapter_dir.parent.parent / "rings"
    image = str(next((rings / "imagesTs").glob("*.nii.gz")))
    common = ["--preset", "tiny", "--device", "cpu", "--adapter", str(adapter_dir)]
    out = tmp_path / "ring.nii.gz"
    assert main(["segment", image, "--prompt", "ring", "-o", str(out), "--modality", "MR", *common]) == 0
    _, truth = _case(rings)
    assert _dice(sitk.GetArrayFromImage(sitk.ReadImage(str(out))) > 0, truth) > 0.5
    capsys.readouterr()
    assert main(["info", *common]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["adapters"][0]["name"] == "rings" and info["adapters"][0]["classes"] == ["ring"]
    # Twice the same adapter: the second claims the same class, one line, exit 2.
    assert main(["info", *common, "--adapter", str(adapter_dir)]) != 0
    err = capsys.readouterr().err.strip()
    assert "already loaded" in err and "\n" not in err


def test_server_info_lists_adapters(adapter_dir):
    from fastapi.testclient import TestClient

    from rcmed_engine.server import ServerSettings, create_app

    engine = Engine.from_preset("tiny", device="cpu")
    engine.load_adapter(str(adapter_dir))
    with TestClient(create_app(engine, ServerSettings(token="t"))) as client:
        info = client.get("/v1/info", headers={"Authorization": "Bearer t"}).json()
    assert [(a["name"], a["classes"]) for a in info["adapters"]] == [("rings", ["ring"])]


def _merged_release(engine: Engine) -> Engine:
    """The engine's model with its LoRA layers replaced by their base layers, as syre-7b's released weights
    come (LoRA merged; the tiny base's B is 0, so merging changes nothing)."""
    from peft.tuners.lora import LoraLayer

    lm = engine.model.language_model
    for name, module in list(lm.named_modules()):
        if isinstance(module, LoraLayer):
            parent, _, child = name.rpartition(".")
            setattr(lm.get_submodule(parent), child, module.base_layer)
    return engine


def test_a_base_without_lora_takes_a_lora_adapter_exactly(adapter_dir):
    from rcmed_engine.model.language_model import has_lora

    img, _ = _case(adapter_dir.parent.parent / "rings")
    reference = Engine.from_preset("tiny", device="cpu")
    reference.load_adapter(str(adapter_dir))
    merged = _merged_release(Engine.from_preset("tiny", device="cpu"))
    assert not has_lora(merged.model.language_model)
    before = {p: merged.segment(img, p, modality="MR").labels for p in ["ring", *OLD]}
    merged.load_adapter(str(adapter_dir))  # adds zero LoRA layers, then the adapter's are swapped in
    assert has_lora(merged.model.language_model)
    for prompt in ["ring", *OLD]:
        got = merged.segment(img, prompt, modality="MR").labels
        assert np.array_equal(got, reference.segment(img, prompt, modality="MR").labels), prompt
        if prompt in OLD:
            assert np.array_equal(got, before[prompt]), prompt  # the zero layers moved nothing
    assert not np.array_equal(before["ring"], reference.segment(img, "ring", modality="MR").labels)


def test_training_adds_lora_where_the_base_has_none():
    from rcmed_engine.model.language_model import add_lora, has_lora
    from rcmed_engine.model.presets import load_preset

    model = _merged_release(Engine(load_preset("tiny"))).model
    lm = model.language_model
    ids = torch.arange(12)[None]
    plain = lm(input_ids=ids).logits
    cfg = model.config.language_model
    assert add_lora(lm, cfg.lora_r, cfg.lora_alpha, 0.0, cfg.lora_targets) and has_lora(lm)
    assert not add_lora(lm, cfg.lora_r, cfg.lora_alpha, 0.0, cfg.lora_targets)  # once only
    assert torch.equal(lm(input_ids=ids).logits, plain)
