"""The Engine on the tiny preset: geometry, anatomical axes, slice ranges, the embedding cache, cancel,
progress, 2D inputs and provenance.

Where a test needs to know the right answer, the model is replaced by a known function of the slice
("bright pixels are the target"), so the assertions check that every mask lands on the right voxels.
"""

from __future__ import annotations

import threading

import cv2
import numpy as np
import pytest
import SimpleITK as sitk
import torch

import rcmed_engine
from rcmed_engine import engine as engine_mod
from rcmed_engine.cli import main
from rcmed_engine.engine import Cancelled, Engine, EngineError
from rcmed_engine.geometry import Geometry, Volume, from_slices, to_slices
from rcmed_engine.io import read_image, read_labelmap, write_labelmap
from rcmed_engine.results import as_volume
from rcmed_engine.model.checkpoint import WEIGHTS_NAME, file_sha256, save_checkpoint
from rcmed_engine.model.presets import load_preset
from rcmed_engine.model.rcmed import ImageFeatures, PrefixState, RCMed, SliceOutput
from rotations import rotation

PLANES = ("axial", "coronal", "sagittal")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for the module


# ------------------------------------------------------------------------------------------- helpers



# Oblique (~25 degrees) and left-handed, so the anatomical cut needs transposes and flips.
FLIPPED_OBLIQUE = rotation([0.3, -0.5, 0.8], 0.45) @ np.diag([-1.0, 1.0, 1.0]) @ np.array(
    [[0, 1, 0], [0, 0, 1], [1, 0, 0]], float)
assert np.linalg.det(FLIPPED_OBLIQUE) < 0
GEOMETRY = Geometry(origin=(12.345678901234567, -98.76543210987654, 3.3333333333333335),
                    spacing=(0.7031249999999999, 0.8123456789012345, 2.4999999999999996),
                    direction=tuple(FLIPPED_OBLIQUE.ravel()))


def bright_volume(shape=(9, 14, 11), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A float volume of dark noise with a few bright, asymmetric boxes; returns (voxels, bright mask)."""
    rng = np.random.default_rng(seed)
    z, y, x = shape
    bright = np.zeros(shape, bool)
    bright[1:5, 2:7, 1:4] = True
    bright[4:8, 8:12, 5:10] = True
    bright[0:3, 10:13, 7:9] = True
    vol = rng.uniform(0, 10, shape).astype(np.float32)
    vol[bright] += 1000
    return vol, bright


def tiny_engine(**kw) -> Engine:
    return Engine(load_preset("tiny"), device="cpu", **kw)


@pytest.fixture
def exact_model(monkeypatch):
    """The model answers "bright pixels of the slice" exactly, in the slice's own pixels.

    The engine's own 8-bit slices are recorded as it makes them, and the postprocessing returns
    +1/-1 from them: this checks the slicing, stacking and un-slicing plumbing voxel for voxel.
    """
    seen: dict[str, np.ndarray] = {}
    real_rgb = engine_mod.to_uint8_rgb

    def recording_rgb(slices, window):
        out = real_rgb(slices, window)
        seen["rgb"] = out
        return out

    def from_slice(low_res, transform):
        rgb = seen["rgb"]
        assert tuple(rgb.shape[1:3]) == tuple(transform.in_hw)
        logits = torch.from_numpy(np.where(rgb[..., 0] > 127, 1.0, -1.0).astype(np.float32))[:, None]
        return logits.expand(-1, low_res.shape[1], -1, -1)

    def fake_suffix(self, state, plan):
        b, t = state.image_embedding.shape[0], len(plan.targets)
        return SliceOutput(torch.zeros((b, t, 2, 2)), torch.ones((b, t)))

    monkeypatch.setattr(engine_mod, "to_uint8_rgb", recording_rgb)
    monkeypatch.setattr(engine_mod, "postprocess_logits", from_slice)
    monkeypatch.setattr(RCMed, "suffix", fake_suffix)
    return seen


@pytest.fixture
def pixel_model(monkeypatch):
    """The model's logits are the encoder input itself minus the "bright" level, at full resolution:
    the real resize, padding, crop and resize back all run."""

    def encode(self, pixels):
        x = pixels[:, :1].to(self.device, self.dtype)
        return ImageFeatures(neck=x, pre_neck=x)

    def prefix(self, features):
        return PrefixState(kv=[], image_embedding=features.neck, length=0)

    def suffix(self, state, plan):
        level = (127.5 - self.config.pixel_mean[0]) / self.config.pixel_std[0]
        t = len(plan.targets)
        logits = (state.image_embedding - level).expand(-1, t, -1, -1)
        return SliceOutput(logits, torch.ones(logits.shape[:2]))

    monkeypatch.setattr(RCMed, "encode_image", encode)
    monkeypatch.setattr(RCMed, "prefix", prefix)
    monkeypatch.setattr(RCMed, "suffix", suffix)


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Voxels with a face neighbour of the other value."""
    out = np.zeros_like(mask)
    for ax in range(mask.ndim):
        diff = np.diff(mask, axis=ax)
        lo = [slice(None)] * mask.ndim
        hi = [slice(None)] * mask.ndim
        lo[ax], hi[ax] = slice(0, -1), slice(1, None)
        out[tuple(lo)] |= diff
        out[tuple(hi)] |= diff
    return out


# ------------------------------------------------------------------------------------------- axes

@pytest.mark.parametrize("axis", PLANES)
def test_every_axis_puts_masks_on_the_right_voxels(exact_model, axis):
    vol, bright = bright_volume()
    volume = Volume(vol, GEOMETRY, {})
    frame = volume.slice_frame(axis)
    result = tiny_engine(batch_size=4).segment(volume, "bright thing", modality="MR", axis=axis)
    assert result.labels.shape == vol.shape and result.labels.dtype == np.uint8
    np.testing.assert_array_equal(result.labels == 1, bright)
    # The cut really went along the asked axis: one presence per slice of that axis.
    assert result.presence.shape == (1, vol.shape[frame.slice_axis])
    assert result.geometry == GEOMETRY


def test_the_three_planes_cut_differently():
    """The volume above is a real test of the plumbing: each plane uses another array axis, and flips."""
    frames = [Volume(np.zeros((9, 14, 11)), GEOMETRY, {}).slice_frame(p) for p in PLANES]
    assert len({f.slice_axis for f in frames}) == 3
    assert any(f.flip_rows or f.flip_cols for f in frames)
    assert any(f.axes != (0, 1, 2) for f in frames)
    vol = np.arange(9 * 14 * 11).reshape(9, 14, 11)
    for f in frames:
        np.testing.assert_array_equal(from_slices(to_slices(vol, f), f), vol)


@pytest.mark.parametrize("axis", PLANES)
def test_real_resize_and_crop_keep_masks_in_place(pixel_model, axis):
    """Anisotropic slices are resized and padded and come back: errors only on the bright boundary."""
    vol, bright = bright_volume(shape=(8, 20, 13), seed=2)
    result = tiny_engine().segment(Volume(vol, GEOMETRY, {}), "bright thing", modality="MR", axis=axis)
    pred = result.labels == 1
    wrong = pred != bright
    assert 2 * (pred & bright).sum() / (pred.sum() + bright.sum()) > 0.9
    assert not (wrong & ~_boundary(bright)).any(), "a mask voxel away from any edge is wrong: misplaced"


# ------------------------------------------------------------------------------------------- slice ranges

@pytest.mark.parametrize("axis", ["axial", "coronal"])
def test_slice_range_leaves_other_slices_empty(exact_model, axis):
    vol, bright = bright_volume()
    volume = Volume(vol, GEOMETRY, {})
    frame = volume.slice_frame(axis)
    n = vol.shape[frame.slice_axis]
    result = tiny_engine().segment(volume, "bright thing", modality="MR", axis=axis, slices=(2, 5))
    got = to_slices(result.labels, frame)
    want = to_slices(bright, frame)
    assert result.slices == (2, 5)
    assert not got[:2].any() and not got[5:].any()
    np.testing.assert_array_equal(got[2:5] == 1, want[2:5])
    assert want[2:5].any()
    # Presence: measured inside the range, NaN outside.
    assert np.isfinite(result.presence[0, 2:5]).all() and np.isnan(result.presence[0, [0, 1, *range(5, n)]]).all()


@pytest.mark.parametrize("bad", [(5, 5), (-1, 3), (0, 99), (7, 2)])
def test_slice_range_out_of_bounds_is_refused(bad):
    with pytest.raises(EngineError, match="out of bounds"):
        tiny_engine().segment(np.zeros((6, 10, 10), np.float32), "disc", modality="MR", slices=bad)


# ------------------------------------------------------------------------------------------- geometry via the CLI

@pytest.mark.parametrize("suffix", [".nrrd", ".seg.nrrd", ".nii.gz"])
def test_cli_output_keeps_the_input_geometry(tmp_path, suffix, capsys):
    vol, _ = bright_volume(shape=(5, 12, 10))
    src = tmp_path / "in.nrrd"
    write_plain = GEOMETRY.apply_to(sitk.GetImageFromArray(vol))
    sitk.WriteImage(write_plain, str(src))
    image = read_image(src)
    out = tmp_path / f"out{suffix}"
    rc = main(["segment", str(src), "--prompt", "disc", "-o", str(out), "--preset", "tiny", "--device", "cpu",
               "--modality", "MR", "--axis", "coronal"])
    assert rc == 0, capsys.readouterr().err
    labels, geometry, segments = read_labelmap(out)
    assert labels.shape == vol.shape
    if suffix == ".nii.gz":  # NIfTI stores float32 (see rcmed_engine.io)
        np.testing.assert_allclose(geometry.origin, image.geometry.origin, rtol=0, atol=1e-4)
        np.testing.assert_allclose(geometry.spacing, image.geometry.spacing, rtol=1e-6)
        np.testing.assert_allclose(geometry.direction, image.geometry.direction, rtol=0, atol=1e-6)
    else:
        assert geometry == image.geometry
        # sitk.WriteImage's NRRD keeps the geometry to the last bit too, so this is the original.
        np.testing.assert_allclose(geometry.direction, GEOMETRY.direction, rtol=0, atol=1e-12)
    # The command gives what the API gives.
    expected = Engine.from_preset("tiny", device="cpu").segment(image, "disc", modality="MR", axis="coronal")
    np.testing.assert_array_equal(labels, expected.labels)
    if suffix == ".seg.nrrd":
        assert [s.name for s in segments] == ["disc"] and segments[0].label_value == 1


# ------------------------------------------------------------------------------------------- cache

class Spy:
    def __init__(self, monkeypatch, model, name):
        self.calls = 0
        self.slices = 0
        real = getattr(model, name)

        def wrapped(x, *a, **kw):
            self.calls += 1
            self.slices += (x.shape[0] if torch.is_tensor(x) else x.neck.shape[0])
            return real(x, *a, **kw)

        monkeypatch.setattr(model, name, wrapped)


def test_second_prompt_reuses_encoder_and_prefix(monkeypatch):
    engine = tiny_engine()
    enc, pre = Spy(monkeypatch, engine.model, "encode_image"), Spy(monkeypatch, engine.model, "prefix")
    vol, _ = bright_volume(shape=(3, 16, 16))
    first = engine.segment(vol, "liver", modality="MR")
    assert (enc.slices, pre.slices) == (3, 3)
    second = engine.segment(vol.copy(), "spleen", modality="MR")  # same content, another array
    assert (enc.slices, pre.slices) == (3, 3), "the cached slices ran the encoder or the prefix again"
    assert second.timings["encoder_s"] == 0.0 and second.timings["prefix_s"] == 0.0
    assert first.answer != second.answer
    # The key is the 8-bit slice the encoder sees: a brightness offset is windowed away (a hit) ...
    engine.segment(vol[:1] + 1, "liver", modality="MR")
    assert enc.slices == 3
    # ... while other content misses.
    engine.segment(np.ascontiguousarray(vol[:1, ::-1]), "liver", modality="MR")
    assert enc.slices == 4
    # set_image warms the cache: segmenting afterwards encodes nothing.
    other = np.ascontiguousarray(vol[:, :, ::-1])
    engine.set_image(other, modality="MR")
    n = enc.slices
    engine.segment(other, "kidney", modality="MR")
    assert enc.slices == n


def test_small_cache_evicts(monkeypatch):
    probe = tiny_engine()
    a = np.random.default_rng(1).normal(size=(1, 16, 16)).astype(np.float32)
    b = np.ascontiguousarray(a[:, ::-1])
    probe.segment(a, "liver", modality="MR")
    f, p = probe._features.nbytes, probe._prefixes.nbytes
    assert 0 < f < p  # encoder features are smaller than a prefix state (its key/value cache)

    def run(cache_bytes):
        engine = tiny_engine(cache_bytes=cache_bytes)  # split in two halves: features, prefixes
        enc, pre = Spy(monkeypatch, engine.model, "encode_image"), Spy(monkeypatch, engine.model, "prefix")
        for image, prompt in ((a, "liver"), (a, "spleen"), (b, "liver"), (a, "liver")):
            engine.segment(image, prompt, modality="MR")
        for lru in (engine._features, engine._prefixes):
            assert lru.nbytes <= lru.max_bytes
        return engine, enc.slices, pre.slices

    # Room for one prefix state: b evicts a's, but a's features are still cached (no encoder run).
    engine, n_enc, n_pre = run(3 * p)
    assert (n_enc, n_pre) == (2, 3) and len(engine._prefixes.items) == 1
    # Room for one feature set and no prefix state: every call runs the prefix, and b evicts a's features.
    engine, n_enc, n_pre = run(3 * f)
    assert (n_enc, n_pre) == (3, 4) and len(engine._features.items) == 1 and not engine._prefixes.items
    # A cache of nothing caches nothing.
    engine, n_enc, n_pre = run(0)
    assert (n_enc, n_pre) == (4, 4)


def test_cache_hits_give_the_same_answer():
    engine = tiny_engine()
    vol, _ = bright_volume(shape=(3, 16, 16))
    cold = engine.segment(vol, "liver", modality="MR")
    warm = engine.segment(vol, "liver", modality="MR")
    np.testing.assert_array_equal(cold.labels, warm.labels)
    np.testing.assert_array_equal(cold.presence, warm.presence)


# ------------------------------------------------------------------------------------------- cancel, progress

class Flag:
    def __init__(self, after: int) -> None:
        self.after, self.calls = after, 0

    def is_set(self) -> bool:
        self.calls += 1
        return self.calls > self.after


@pytest.mark.parametrize("after", [0, 1])
def test_cancel_raises_cancelled(after, monkeypatch):
    engine = tiny_engine(batch_size=2)
    enc = Spy(monkeypatch, engine.model, "encode_image")
    vol = np.random.default_rng(0).normal(size=(6, 12, 12)).astype(np.float32)
    with pytest.raises(Cancelled):
        engine.segment(vol, "liver", modality="MR", cancel=Flag(after))
    assert enc.slices == 2 * after  # it stopped at the next batch boundary
    event = threading.Event()
    event.set()
    with pytest.raises(Cancelled):
        engine.segment(vol, "liver", modality="MR", cancel=event)


def test_progress_reaches_n_of_n():
    calls = []
    vol = np.random.default_rng(0).normal(size=(7, 12, 12)).astype(np.float32)
    tiny_engine(batch_size=3).segment(vol, "liver", modality="MR", progress=lambda d, n: calls.append((d, n)))
    assert calls[0] == (0, 7) and calls[-1] == (7, 7)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls) and {n for _, n in calls} == {7}
    ranged = []
    tiny_engine(batch_size=3).segment(vol, "liver", modality="MR", slices=(1, 3),
                                      progress=lambda d, n: ranged.append((d, n)))
    assert ranged[-1] == (2, 2)


# ------------------------------------------------------------------------------------------- 2D inputs

def test_2d_numpy_array(exact_model):
    img = np.zeros((30, 22), np.float32)
    img[5:12, 3:19] = 500
    result = tiny_engine().segment(img, "bar", modality="X-ray")
    assert result.labels.shape == (1, 30, 22)
    np.testing.assert_array_equal(result.labels[0] == 1, img > 0)


def test_rgb_uint8_array(exact_model):
    img = np.zeros((25, 31, 3), np.uint8)
    img[4:20, 2:9] = (250, 200, 220)
    img[18:24, 20:30, 1] = 255  # bright only in green: the fake model reads red, so not a target
    result = tiny_engine().segment(img, "lesion", modality="dermoscopy")
    assert result.labels.shape == (1, 25, 31)
    np.testing.assert_array_equal(result.labels[0] == 1, img[..., 0] > 127)
    with pytest.raises(EngineError, match="modality"):
        tiny_engine().segment(img, "lesion")  # colour photographs have no honest modality guess


def test_grey_volume_three_columns_wide(exact_model):
    """A uint8 (n, H, 3) array is a grey volume three voxels wide when the caller says rgb=False; the
    default still reads it as one colour picture, and rgb=True says so explicitly."""
    vol = np.zeros((4, 9, 3), np.uint8)
    vol[1:3, 2:7, 0] = 200
    vol[2:4, 5:8, 2] = 255
    result = tiny_engine().segment(vol, "spot", modality="MR", rgb=False)
    assert result.labels.shape == (4, 9, 3)
    np.testing.assert_array_equal(result.labels == 1, vol > 127)
    assert as_volume(vol, rgb=False).array.shape == (4, 9, 3)
    assert as_volume(vol, rgb=True).array.shape == (1, 4, 9, 3)
    assert as_volume(vol).array.shape == (1, 4, 9, 3)
    assert as_volume(vol.astype(np.int16)).array.shape == (4, 9, 3)  # only uint8 was ever taken for colour
    with pytest.raises(EngineError, match="rgb=True"):
        as_volume(np.zeros((4, 9, 5), np.uint8), rgb=True)
    with pytest.raises(EngineError, match="rgb=False"):
        as_volume(np.zeros((2, 4, 9, 3), np.uint8), rgb=False)
    with pytest.raises(EngineError, match="grey image"):
        as_volume(Volume(vol, GEOMETRY), rgb=True)  # a Volume's colour is what its reader found


@pytest.mark.parametrize("rgb", [False, True])
def test_png_via_read_image(tmp_path, exact_model, rgb):
    img = np.zeros((28, 40), np.uint8)
    img[3:10, 25:37] = 255
    path = tmp_path / "slide.png"
    cv2.imwrite(str(path), np.dstack([img] * 3) if rgb else img)
    volume = read_image(path)
    result = tiny_engine().segment(volume, "spot", modality="microscopy")
    assert result.labels.shape == (1, 28, 40)
    np.testing.assert_array_equal(result.labels[0] == 1, img > 127)
    out = tmp_path / "slide.seg.nrrd"
    write_labelmap(out, result.labels, result.geometry, result.segments(), reference_2d=True)
    back, geometry, _ = read_labelmap(out)
    np.testing.assert_array_equal(back, result.labels)
    assert geometry == volume.geometry


# ------------------------------------------------------------------------------------------- provenance

def test_segments_carry_provenance(tmp_path):
    model = load_preset("tiny").model
    save_checkpoint(model, tmp_path / "w")
    engine = Engine.from_preset("tiny", weights=str(tmp_path / "w"), device="cpu")
    vol, _ = bright_volume(shape=(2, 12, 12))
    prompt = "liver and spleen"
    result = engine.segment(vol, prompt, modality="MR")
    segs = result.segments()
    assert [s.name for s in segs] == ["liver", "spleen"] and [s.label_value for s in segs] == [1, 2]
    sha = file_sha256(tmp_path / "w" / WEIGHTS_NAME)
    for t, s in enumerate(segs):
        assert s.tags["RCMed.preset"] == "tiny"
        assert s.tags["RCMed.weights_sha256"] == sha
        assert s.tags["RCMed.prompt"] == prompt
        assert s.tags["RCMed.engine_version"] == rcmed_engine.__version__
        assert s.tags["RCMed.target"] == s.name
        assert float(s.tags["RCMed.presence"]) == pytest.approx(float(np.nanmax(result.presence[t])), abs=1e-4)
        assert s.tags["RCMed.trained"] == "false"
    assert len({s.color for s in segs}) == 2
    # They survive a .seg.nrrd round trip.
    out = tmp_path / "o.seg.nrrd"
    write_labelmap(out, result.labels, result.geometry, segs)
    _, _, back = read_labelmap(out)
    for s, b in zip(segs, back):
        for key in ("RCMed.preset", "RCMed.weights_sha256", "RCMed.prompt", "RCMed.engine_version",
                    "RCMed.presence"):
            assert b.tags[key] == s.tags[key]


def test_info_reports_the_engine():
    info = tiny_engine().info()
    assert info["preset"] == "tiny" and info["trained"] is False
    assert info["engine_version"] == rcmed_engine.__version__
    assert info["image_size"] == 64 and info["image_tokens"] == 16
    assert info["parameters"] > 0 and info["device"] == "cpu"


def test_bf16_engine_matches_fp32_closely():
    """bf16 is the default on CUDA; the prompt encoder's positional encoding must work in it."""
    import torch

    from rcmed_engine.model.presets import load_preset

    vol = np.random.default_rng(0).random((2, 40, 40)).astype(np.float32)
    a = Engine(load_preset("tiny"), device="cpu").segment(vol, "liver", modality="MR").labels
    b = Engine(load_preset("tiny"), device="cpu", dtype=torch.bfloat16).segment(vol, "liver", modality="MR").labels
    assert a.shape == b.shape
    assert (a == b).mean() > 0.95


def test_vocabulary_maps_synonyms_and_notes_the_rest():
    """Weights that list a vocabulary: a synonym gets the trained class's own mask, bit for bit; a word
    outside it is still asked and the result says the weights never saw it."""
    engine = tiny_engine()
    engine.model.config.vocabulary = ("caudate nucleus", "left thalamus")
    vol = np.random.default_rng(3).random((3, 40, 40)).astype(np.float32)
    typed, named, other = engine.segment_many(vol, ["Caudate", "caudate nucleus", "left thalamus and liver"],
                                              modality="MR")
    assert typed.targets == named.targets == ["caudate nucleus"]
    assert np.array_equal(typed.labels, named.labels) and np.array_equal(typed.presence, named.presence)
    assert typed.notes == [] and other.targets == ["left thalamus", "liver"]
    assert len(other.notes) == 1 and "not trained on 'liver'" in other.notes[0]
    assert engine.info()["vocabulary"] == ["caudate nucleus", "left thalamus"]
    engine.model.config.vocabulary = ()
    assert engine.segment(vol, "Caudate", modality="MR").targets == ["Caudate"]  # no vocabulary: as typed


def test_gpu_lookahead_batches_match_the_plain_ones():
    """On CUDA the next batch is windowed and hashed on a helper thread: same batches, same order."""
    engine = Engine(load_preset("tiny"), device="cpu", batch_size=3)
    vol = np.random.default_rng(0).normal(0, 300, size=(8, 20, 24)).astype(np.int16)
    prep = engine.prepare(vol, "CT", "axial")
    plain = list(engine._batches(prep, 1, 8))
    engine.device = torch.device("cuda")  # only _batches reads it here: the lookahead branch on a CPU
    ahead = list(engine._batches(prep, 1, 8))
    assert [b[0] for b in plain] == [[1, 2, 3], [4, 5, 6], [7]]
    for (i1, r1, k1), (i2, r2, k2) in zip(plain, ahead, strict=True):
        assert i1 == i2 and k1 == k2 and np.array_equal(r1, r2)
