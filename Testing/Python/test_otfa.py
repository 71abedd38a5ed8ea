"""One-shot adaptation (rcmed_engine.otfa): the class registry, the Engine methods, the CLI, the adaptation."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from rcmed_engine import otfa
from rcmed_engine.cli import main
from rcmed_engine.engine import Engine, EngineError
from rcmed_engine.evaluate import dice
from rcmed_engine.geometry import Geometry, Volume
from rcmed_engine.io import read_image
from rcmed_engine.otfa import ClassNotFound, ClassRegistry, OTFAConfig, RegistryError


# ---------------------------------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True)
def _no_user_registry(tmp_path_factory, monkeypatch):
    """Engines given no registry fall back to the user's default folder: point it at an empty temp one."""
    monkeypatch.setenv("RCMED_REGISTRY", str(tmp_path_factory.mktemp("default-registry") / "classes"))


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.from_preset("tiny", device="cpu")


def scene(centre=(24, 30), radius=10, n=3, shape=(64, 64), seed=0, present=None):
    """Noisy background with a bright disc (the structure) and a dark square (a distractor)."""
    rng = np.random.default_rng(seed)
    H, W = shape
    yy, xx = np.mgrid[0:H, 0:W]
    image = rng.normal(100.0, 6.0, (n, H, W)).astype(np.float32)
    mask = np.zeros((n, H, W), dtype=np.uint8)
    disc = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < radius * radius
    square = (yy > 44) & (yy < 58) & (xx > 6) & (xx < 20)
    for k in range(n):
        image[k][square] = 30.0
        if present is None or present[k]:
            image[k][disc] = 200.0 + rng.normal(0.0, 6.0, int(disc.sum()))
            mask[k][disc] = 1
    return image, mask


def snapshot(folder: Path) -> dict[str, bytes]:
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def fake_shot(dim=32, seed=0, centre=(0.4, 0.5)) -> otfa.Shot:
    g = torch.Generator().manual_seed(seed)
    return otfa.Shot(
        prototype=torch.randn(dim, generator=g), background=torch.randn(dim, generator=g),
        centroid=torch.tensor(centre), covariance=torch.tensor([[0.01, 0.002], [0.002, 0.02]]),
        slice_position=0.5, area_fraction=0.1, sim_fg=0.9, sim_bg=0.5,
        hist_fg=torch.softmax(torch.randn(otfa.HIST_BINS, generator=g), 0),
        hist_bg=torch.softmax(torch.randn(otfa.HIST_BINS, generator=g), 0),
        scores={"decoder": 0.2, "appearance": 0.9, "fused": 0.5})


# ---------------------------------------------------------------------------------------------- names
@pytest.mark.parametrize("bad", ["", "   ", "!!!", "...", "-_-", "liver and spleen", "a, b", "x" * 101, 3])
def test_bad_names_are_refused(bad):
    with pytest.raises(RegistryError):
        otfa.validate_name(bad)


def test_names_are_normalised():
    assert otfa.validate_name("  Lateral   ventricles ") == "Lateral ventricles"
    assert otfa.normalise_name("Lateral_Ventricles") == otfa.normalise_name("lateral  ventricles")


# ---------------------------------------------------------------------------------------------- registry
def test_registry_round_trip(tmp_path):
    reg = ClassRegistry(tmp_path / "reg")
    a, b = fake_shot(seed=1, centre=(0.3, 0.5)), fake_shot(seed=2, centre=(0.5, 0.5))
    info = reg.add_shot("Lateral ventricles", a, preset="tiny", embedding_dim=32, record={"slice": 4})
    assert info.shots == 1 and info.name == "Lateral ventricles" and info.strategy == "appearance"
    [shot] = ClassRegistry(tmp_path / "reg").shots("lateral ventricles")  # a fresh reader, another spelling
    for key in otfa.Shot.TENSORS:
        assert torch.equal(getattr(shot, key), getattr(a, key)), key
    for key in otfa.Shot.SCALARS:
        assert getattr(shot, key) == pytest.approx(getattr(a, key)), key
    assert shot.meta["slice"] == 4 and shot.scores == a.scores
    first_file = json.loads((tmp_path / "reg" / "registry.json").read_text())["classes"]["lateral ventricles"]["file"]

    info = reg.add_shot("lateral ventricles", b, preset="tiny", embedding_dim=32)  # a second shot, not a new class
    assert info.shots == 2 and reg.names() == ["Lateral ventricles"]
    assert not (tmp_path / "reg" / first_file).exists()  # the replaced tensor file is gone
    adapter = ClassRegistry(tmp_path / "reg").adapter("LATERAL VENTRICLES")
    assert adapter.shots == 2
    assert torch.allclose(adapter.prototype, (a.prototype + b.prototype) / 2)
    assert torch.allclose(adapter.centroid, torch.tensor([0.4, 0.5]))
    # moment matching: the mixture's covariance includes the spread of the two centroids
    assert adapter.covariance[0, 0] == pytest.approx(0.01 + 0.01, abs=1e-6)
    assert adapter.covariance[1, 1] == pytest.approx(0.02, abs=1e-6)

    reg.add_shot("spleen", fake_shot(seed=3), preset="tiny", embedding_dim=32)
    assert [c.name for c in reg.list()] == ["Lateral ventricles", "spleen"]
    removed = reg.remove("Lateral Ventricles")
    assert removed.shots == 2 and reg.names() == ["spleen"] and "lateral ventricles" not in reg
    files = sorted(p.name for p in (tmp_path / "reg" / "classes").iterdir())
    assert len(files) == 1 and files[0].startswith("spleen")
    with pytest.raises(ClassNotFound) as err:
        reg.remove("lateral ventricles")
    assert isinstance(err.value, KeyError) and "spleen" in str(err.value)


def test_registry_refuses_other_preset_and_keeps_bytes(tmp_path):
    reg = ClassRegistry(tmp_path)
    reg.add_shot("nodule", fake_shot(), preset="tiny", embedding_dim=32)
    before = snapshot(tmp_path)
    with pytest.raises(RegistryError, match="preset"):
        reg.add_shot("nodule", fake_shot(dim=256), preset="lite", embedding_dim=256)
    with pytest.raises(RegistryError):
        reg.add_shot("", fake_shot(), preset="tiny", embedding_dim=32)
    assert snapshot(tmp_path) == before


def test_failed_write_leaves_registry_byte_identical(tmp_path, monkeypatch):
    reg = ClassRegistry(tmp_path)
    reg.add_shot("nodule", fake_shot(), preset="tiny", embedding_dim=32)
    before = snapshot(tmp_path)
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(dst).endswith(otfa.REGISTRY_JSON):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(otfa.os, "replace", failing_replace)
    with pytest.raises(OSError):
        reg.add_shot("nodule", fake_shot(seed=5), preset="tiny", embedding_dim=32)
    monkeypatch.setattr(otfa.os, "replace", real_replace)
    assert snapshot(tmp_path) == before
    assert reg.get("nodule").shots == 1


def test_corrupt_registry_is_reported(tmp_path):
    (tmp_path / "registry.json").write_text("{not json")
    with pytest.raises(RegistryError, match="not a readable class registry"):
        ClassRegistry(tmp_path).list()
    (tmp_path / "registry.json").write_text(json.dumps({"format": otfa.REGISTRY_FORMAT, "version": 1, "classes": {
        "x": {"name": "x", "key": "x", "file": "classes/missing.safetensors", "preset": "tiny", "embedding_dim": 32,
              "created": "", "updated": "", "shots": [{}]}}}))
    with pytest.raises(RegistryError, match="missing"):
        ClassRegistry(tmp_path).adapter("x")


# ---------------------------------------------------------------------------------------------- math
def test_prior_and_mask_grid_follow_the_resize_plan():
    from rcmed_engine.preprocess import plan_resize

    t = plan_resize((40, 80), 64)  # resized to 32 x 64: the lower half of the square is padding
    prior = otfa.prior_map(torch.tensor([0.5, 0.5]), torch.eye(2) * 0.01, t, 8)
    assert prior[4:].sum() == 0  # padding rows get nothing
    r, c = divmod(int(prior.argmax()), 8)
    assert (r, c) in {(1, 3), (1, 4), (2, 3), (2, 4)}
    m = np.zeros((40, 80), bool)
    m[:, 40:] = True
    grid = otfa.mask_to_grid(m, t, 8)
    assert grid[4:].sum() == 0 and grid[:3, 5:].min() > 0.9 and grid[:3, :3].max() < 0.1


# ---------------------------------------------------------------------------------------------- engine
def test_adaptation_moves_the_mask_to_the_registered_structure(engine, tmp_path):
    image, mask = scene(centre=(24, 30), seed=0)
    info = engine.register_class(image, mask, "bright disc", registry=tmp_path, modality="MR")
    assert info["shots"] == 1 and info["slice"] == 0 and info["area_pixels"] == int(mask[0].sum())
    # another "scan": the disc moved and the noise differs; the distractor stays
    target, truth = scene(centre=(30, 36), seed=1)
    plain = engine.segment(target, "bright disc", modality="MR")
    adapted = engine.segment(target, "bright disc", modality="MR", registry=tmp_path)
    d_plain, d_adapted = dice(plain.labels == 1, truth), dice(adapted.labels == 1, truth)
    assert d_adapted >= 0.85 and d_adapted >= d_plain + 0.3, (d_plain, d_adapted)
    assert not (adapted.labels == 1)[:, 44:58, 6:20].any()  # the dark distractor stays out


def test_absent_structure_gives_an_empty_slice(engine, tmp_path):
    image, mask = scene(seed=0)
    engine.register_class(image, mask, "bright disc", registry=tmp_path, modality="MR")
    target, truth = scene(seed=2, present=[True, False, True])
    result = engine.segment(target, "bright disc", modality="MR", registry=tmp_path)
    assert not result.mask(0)[1].any()
    assert result.presence[0, 1] == 0 and result.presence[0, 0] == 1
    assert dice(result.mask(0), truth) > 0.85


def test_plain_prompts_are_bit_identical(engine, tmp_path):
    image, mask = scene(seed=0)
    engine.register_class(image, mask, "bright disc", registry=tmp_path, modality="MR")
    target, _ = scene(seed=3)
    fresh = Engine.from_preset("tiny", device="cpu")
    reference = fresh.segment(target, "liver", modality="MR")
    with_registry = engine.segment(target, "liver", modality="MR", registry=tmp_path)
    engine.use_registry(tmp_path)
    try:
        default_registry = engine.segment(target, "liver", modality="MR")
    finally:
        engine.use_registry(None)
    for other in (with_registry, default_registry):
        assert np.array_equal(other.labels, reference.labels)
        assert np.array_equal(other.presence, reference.presence, equal_nan=True)
        assert other.answer == reference.answer


def test_mixed_prompt_and_variants(engine, tmp_path):
    image, mask = scene(seed=0)
    engine.register_class(image, mask, "bright disc", registry=tmp_path, modality="MR")
    target, truth = scene(centre=(28, 33), seed=4)
    mixed = engine.segment(target, "liver and bright disc", modality="MR", registry=tmp_path)
    assert mixed.targets == ["liver", "bright disc"]
    assert dice(mixed.labels == 2, truth) > 0.7
    # the released formulas' language side (forced on: tiny is untrained) and the PerSAM baseline both run
    lang = engine.segment(target, "bright disc", modality="MR", registry=tmp_path, otfa=OTFAConfig(language=True))
    assert lang.labels.shape == target.shape and dice(lang.labels == 1, truth) > 0.7
    persam = engine.segment(target, "bright disc", modality="MR", registry=tmp_path, otfa=OTFAConfig(method="persam"))
    assert persam.labels.shape == target.shape
    assert persam.presence[0].min() == 1.0  # PerSAM always answers


def test_more_shots_are_averaged(engine, tmp_path):
    image, mask = scene(centre=(24, 30), seed=0)
    engine.register_class(image, mask, "bright disc", registry=tmp_path, modality="MR")
    image2, mask2 = scene(centre=(34, 40), seed=5)
    info = engine.register_class(image2, mask2, "Bright Disc", registry=tmp_path, modality="MR")
    assert info["shots"] == 2 and info["name"] == "bright disc"  # the first spelling stays
    listed = engine.list_classes(tmp_path)
    assert [c["name"] for c in listed] == ["bright disc"] and listed[0]["shots"] == 2
    adapter = ClassRegistry(tmp_path).adapter("bright disc")
    assert float(adapter.centroid[0]) == pytest.approx((24.5 / 64 + 34.5 / 64) / 2, abs=0.01)
    removed = engine.remove_class("bright disc", registry=tmp_path)
    assert removed["shots"] == 2 and engine.list_classes(tmp_path) == []
    with pytest.raises(KeyError):
        engine.remove_class("bright disc", registry=tmp_path)


def _volume(array, origin=(0.0, 0.0, 0.0), spacing=(1.0, 1.0, 2.0)):
    return Volume(np.asarray(array), Geometry(origin, spacing, (1, 0, 0, 0, 1, 0, 0, 0, 1)), {})


@pytest.mark.parametrize("case, message", [
    ("empty", "the mask is empty"),
    ("label", "no voxel with label 7"),
    ("shape", "differs from the image"),
    ("geometry", "geometry"),
    ("range", "out of range"),
    ("empty_slice", "slice 2 of the mask is empty"),
    ("name", "no letter or digit"),
    ("blank", "empty"),
    ("two", "would be read as"),
])
def test_bad_input_leaves_the_registry_as_it_was(engine, tmp_path, case, message):
    image, mask = scene(seed=0, present=[True, True, False])
    engine.register_class(_volume(image), _volume(mask), "bright disc", registry=tmp_path, modality="MR")
    before = snapshot(tmp_path)
    kwargs = {"registry": tmp_path, "modality": "MR"}
    img, msk, name = _volume(image), _volume(mask), "bright disc"
    if case == "empty":
        msk = _volume(np.zeros_like(mask))
    elif case == "label":
        kwargs["label"] = 7
    elif case == "shape":
        msk = _volume(mask[:, :32])
    elif case == "geometry":
        msk = _volume(mask, origin=(5.0, 0.0, 0.0))
    elif case == "range":
        kwargs["slice_index"] = 3
    elif case == "empty_slice":
        kwargs["slice_index"] = 2
    elif case == "name":
        name = "?!."
    elif case == "blank":
        name = "  "
    elif case == "two":
        name = "disc, square"
    with pytest.raises(EngineError, match=message):
        engine.register_class(img, msk, name, **kwargs)
    assert snapshot(tmp_path) == before
    # and a registry folder that did not exist is not created by a failed registration
    with pytest.raises(EngineError):
        engine.register_class(img, _volume(np.zeros_like(mask)), "x", registry=tmp_path / "new", modality="MR")
    assert not (tmp_path / "new").exists()


def test_default_registry_is_the_users_folder(engine, tmp_path, monkeypatch):
    monkeypatch.setenv("RCMED_REGISTRY", str(tmp_path / "mine"))
    assert otfa.default_registry_dir() == tmp_path / "mine"
    assert engine.list_classes() == []
    image, mask = scene(seed=0)
    engine.register_class(image, mask, "bright disc", modality="MR")  # no registry given: the default one
    assert (tmp_path / "mine" / "registry.json").is_file()
    target, truth = scene(centre=(30, 36), seed=1)
    assert dice(engine.segment(target, "bright disc", modality="MR").mask(0), truth) > 0.85
    engine.remove_class("bright disc")
    assert engine.list_classes() == []


def test_registered_with_another_preset_is_refused(engine, tmp_path):
    ClassRegistry(tmp_path).add_shot("bright disc", fake_shot(dim=256), preset="lite", embedding_dim=256)
    target, _ = scene(seed=1)
    with pytest.raises(EngineError, match="lite preset"):
        engine.segment(target, "bright disc", modality="MR", registry=tmp_path)


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_register_segment_classes(tmp_path, capsys):
    import SimpleITK as sitk

    image, mask = scene(seed=0, n=4, present=[False, True, True, False])
    mask[2, 20:22, 20:22] = 0  # slice 1 has the largest area
    for array, name in ((image, "img.nii.gz"), (mask * 3, "mask.nii.gz")):
        itk = sitk.GetImageFromArray(array)
        itk.SetSpacing((1.0, 1.0, 2.0))
        sitk.WriteImage(itk, str(tmp_path / name))
    reg = tmp_path / "registry"
    common = ["--preset", "tiny", "--device", "cpu"]
    assert main(["register", str(tmp_path / "img.nii.gz"), "--mask", str(tmp_path / "mask.nii.gz"), "--name",
                 "bright disc", "--registry", str(reg), "--label", "3", "--modality", "MR", *common]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["slice"] == 1 and out["shots"] == 1
    before = snapshot(reg)
    # bad input: one clear line on stderr, a non-zero exit, the registry untouched
    assert main(["register", str(tmp_path / "img.nii.gz"), "--mask", str(tmp_path / "mask.nii.gz"), "--name",
                 "bright disc", "--registry", str(reg), "--slice", "9", "--modality", "MR", *common]) == 1
    err = capsys.readouterr().err.strip()
    assert "out of range" in err and len(err.splitlines()) == 1
    assert main(["register", str(tmp_path / "img.nii.gz"), "--mask", str(tmp_path / "mask.nii.gz"), "--name",
                 "***", "--registry", str(reg), *common]) == 1
    capsys.readouterr()
    assert snapshot(reg) == before

    out_path = tmp_path / "seg.nii.gz"
    assert main(["segment", str(tmp_path / "img.nii.gz"), "--prompt", "segment the bright disc", "-o", str(out_path),
                 "--registry", str(reg), "--modality", "MR", *common]) == 0
    capsys.readouterr()
    seg = read_image(out_path).array
    assert dice(seg == 1, mask > 0) > 0.85
    assert main(["segment", str(tmp_path / "img.nii.gz"), "--prompt", "x", "-o", str(out_path),
                 "--registry", str(tmp_path / "nowhere"), *common]) == 1
    assert "no class registry" in capsys.readouterr().err

    assert main(["classes", str(reg)]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [c["name"] for c in listed["classes"]] == ["bright disc"]
    assert main(["classes", str(reg), "--remove", "bright disc"]) == 0
    capsys.readouterr()
    assert ClassRegistry(reg).list() == []


def test_cli_evaluate_with_registry(tmp_path, capsys, engine):
    import SimpleITK as sitk

    ds = tmp_path / "Dataset900_Disc"
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (ds / sub).mkdir(parents=True)
    (ds / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MR"}, "labels": {"background": 0,
                                                 "bright disc": 1}, "numTraining": 1, "file_ending": ".nii.gz"}))
    for split, seed, centre in (("Tr", 0, (24, 30)), ("Ts", 1, (30, 35))):
        image, mask = scene(centre=centre, seed=seed)
        sitk.WriteImage(sitk.GetImageFromArray(image), str(ds / f"images{split}" / f"d_000_0000.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray(mask), str(ds / f"labels{split}" / f"d_000.nii.gz"))
    reg = tmp_path / "reg"
    common = ["--preset", "tiny", "--device", "cpu"]
    assert main(["register", str(ds / "imagesTr" / "d_000_0000.nii.gz"), "--mask", str(ds / "labelsTr" / "d_000.nii.gz"),
                 "--name", "bright disc", "--registry", str(reg), "--modality", "MR", *common]) == 0
    report = tmp_path / "report.json"
    assert main(["evaluate", str(ds), "-o", str(report), "--registry", str(reg), *common]) == 0
    capsys.readouterr()
    assert json.loads(report.read_text())["mean_dice"] > 0.85


# ---------------------------------------------------------------------------------------------- lite
def _mni_t1() -> Path | None:
    from rcmed_engine.data_locations import find_mni_t1

    return find_mni_t1()


@pytest.mark.lite
@pytest.mark.slow
def test_lite_one_shot_on_the_mni_ventricles(tmp_path):
    """The real encoder on real data: one outlined slice of the lateral ventricles, two other slices."""
    import sys

    t1 = _mni_t1()
    if t1 is None:
        pytest.skip("nilearn's MNI template is not installed")
    try:
        lite = Engine.from_preset("lite", device="cpu")
    except (FileNotFoundError, ValueError) as exc:
        pytest.skip(f"lite weights unavailable: {exc}")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    try:
        from one_shot import lateral_ventricles, mni_files
    finally:
        sys.path.pop(0)
    import SimpleITK as sitk

    arrays = {k: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for k, p in mni_files().items()}
    labels = lateral_ventricles(arrays["t1"], arrays["gm"], arrays["wm"]).astype(np.uint8)
    t1a = arrays["t1"].astype(np.float32)
    support = _volume(t1a[90:91], spacing=(1.0, 1.0, 1.0))
    lite.register_class(support, _volume(labels[90:91], spacing=(1.0, 1.0, 1.0)), "lateral ventricles",
                        registry=tmp_path, modality="MR")
    target = _volume(t1a[[80, 95]], spacing=(1.0, 1.0, 1.0))
    result = lite.segment(target, "lateral ventricles", modality="MR", registry=tmp_path)
    assert dice(result.mask(0), labels[[80, 95]]) > 0.75
