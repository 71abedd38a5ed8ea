"""Properties of rcmed_engine.preprocess: the released model's exact preprocessing and postprocessing."""

from __future__ import annotations

import warnings

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from rcmed_engine import preprocess as pp
from rcmed_engine.preprocess import (
    CT_WINDOW,
    MODALITY_TEXT,
    IntensityWindow,
    ModalityError,
    SliceTransform,
    canonical_modality,
    content_hash,
    infer_modality,
    intensity_window,
    plan_resize,
    postprocess_logits,
    prepare_slices,
    to_uint8_rgb,
)

MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)


def albumentations_longest_max_size(h: int, w: int, max_size: int) -> tuple[int, int]:
    """albumentations 1.4.x ``_func_max_size`` with ``func=max``, transcribed (it is not installed)."""
    scale = max_size / float(max(w, h))
    if scale != 1.0:
        return tuple(round(dim * scale) for dim in (h, w))  # type: ignore[return-value]
    return h, w


def reference_prepare(rgb: np.ndarray, t: SliceTransform, bgr: bool) -> np.ndarray:
    """The released pipeline written out plainly in numpy: cv2.resize, (flip), normalise, zero pad."""
    h, w = t.resized_hw
    S = t.image_size
    out = np.zeros((rgb.shape[0], 3, S, S), dtype=np.float32)
    for i, s in enumerate(rgb):
        r = s if (h, w) == tuple(t.in_hw) else cv2.resize(s, (w, h), interpolation=cv2.INTER_LINEAR)
        if bgr:
            r = r[..., ::-1]
        out[i, :, :h, :w] = ((r.astype(np.float32) - MEAN) / STD).transpose(2, 0, 1)
    return out


# --------------------------------------------------------------------------------------- plan_resize


@pytest.mark.parametrize(
    "hw,S,expected",
    [
        ((512, 512), 1024, (1024, 1024)),
        ((300, 500), 1024, (614, 1024)),
        ((500, 300), 1024, (1024, 614)),
        ((1024, 1024), 1024, (1024, 1024)),
        ((2048, 1536), 1024, (1024, 768)),
        ((512, 512), 256, (256, 256)),
        # Python's round is half-to-even: 2.5 -> 2, 1.5 -> 2, 3.5 -> 4 (half-up would give 3, 2, 4)
        ((5, 2048), 1024, (2, 1024)),
        ((3, 2048), 1024, (2, 1024)),
        ((7, 2048), 1024, (4, 1024)),
    ],
)
def test_plan_resize_known_sizes(hw, S, expected):
    t = plan_resize(hw, S)
    assert t == SliceTransform(in_hw=hw, resized_hw=expected, image_size=S)
    assert albumentations_longest_max_size(*hw, S) == expected


@settings(max_examples=300, deadline=None)
@given(
    h=st.integers(1, 4096),
    w=st.integers(1, 4096),
    S=st.sampled_from([1024, 256, 512, 1000, 333]),
    spacing=st.sampled_from([1.0, 0.7, 0.488281, 2.5]),
)
def test_plan_resize_matches_albumentations_for_square_pixels(h, w, S, spacing):
    t = plan_resize((h, w), S, pixel_spacing=(spacing, spacing))
    ref = albumentations_longest_max_size(h, w, S)
    # albumentations would ask cv2 for a 0-pixel side on extreme aspect ratios; we clamp to 1.
    assert t.resized_hw == (max(ref[0], 1), max(ref[1], 1))
    assert max(t.resized_hw) == S
    assert 1 <= min(t.resized_hw)


@settings(max_examples=200, deadline=None)
@given(
    h=st.integers(2, 1024),
    w=st.integers(2, 1024),
    sy=st.floats(0.1, 10.0),
    sx=st.floats(0.1, 10.0),
    S=st.sampled_from([1024, 256]),
)
def test_plan_resize_anisotropic_squares_the_pixels(h, w, sy, sx, S):
    t = plan_resize((h, w), S, pixel_spacing=(sy, sx))
    rh, rw = t.resized_hw
    eh, ew = h * sy, w * sx
    scale = S / max(eh, ew)
    assert max(rh, rw) == S and min(rh, rw) >= 1
    # each side is the physical extent at one common scale, rounded (or clamped to 1)
    assert abs(rh - eh * scale) <= 0.5 or rh == 1
    assert abs(rw - ew * scale) <= 0.5 or rw == 1


def test_plan_resize_coronal_cut_across_thick_slices():
    # 100 rows at 5 mm, 200 columns at 1 mm: 500 mm tall, 200 mm wide.
    t = plan_resize((100, 200), 1024, pixel_spacing=(5.0, 1.0))
    h, w = t.resized_hw
    assert h == 1024 and w == 410
    assert abs(h / w - 500 / 200) < 1.0 / w * (500 / 200) + 1e-9


def test_plan_resize_rejects_bad_input():
    for args in [((0, 5), 1024), ((5, 5), 0)]:
        with pytest.raises(ValueError):
            plan_resize(*args)
    with pytest.raises(ValueError):
        plan_resize((5, 5), 1024, pixel_spacing=(0.0, 1.0))


# ------------------------------------------------------------------------------------ prepare_slices


def _rgb(n, h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("hw,S", [((30, 50), 64), ((50, 30), 64), ((300, 500), 1024), ((64, 64), 64)])
@pytest.mark.parametrize("bgr", [False, True])
def test_prepare_slices_equals_released_pipeline(hw, S, bgr):
    rgb = _rgb(2, *hw)
    t = plan_resize(hw, S)
    x = prepare_slices(rgb, t, bgr=bgr)
    assert x.shape == (2, 3, S, S) and x.dtype == torch.float32
    np.testing.assert_array_equal(x.numpy(), reference_prepare(rgb, t, bgr))


def test_prepare_slices_padding_is_zero_after_normalising():
    rgb = _rgb(3, 30, 50)
    t = plan_resize((30, 50), 64)
    h, w = t.resized_hw
    assert (h, w) == (38, 64)
    x = prepare_slices(rgb, t)
    assert torch.count_nonzero(x[:, :, h:, :]) == 0
    # (0 - mean) / std would be about -2; the pad must not be that
    assert not torch.any(x[:, :, h:, :] < -1.0)
    # the image region holds real data right up to the pad edge
    assert torch.count_nonzero(x[:, :, h - 1, :]) > 0

    t2 = plan_resize((50, 30), 64)
    h2, w2 = t2.resized_hw
    x2 = prepare_slices(_rgb(1, 50, 30), t2)
    assert torch.count_nonzero(x2[..., w2:]) == 0
    assert torch.count_nonzero(x2[..., :h2, w2 - 1]) > 0


def test_prepare_slices_bgr_reverses_channels():
    rgb = _rgb(2, 40, 40)
    t = plan_resize((40, 40), 80)
    ones, zeros = (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)
    a = prepare_slices(rgb, t, pixel_mean=zeros, pixel_std=ones, bgr=False)
    b = prepare_slices(rgb, t, pixel_mean=zeros, pixel_std=ones, bgr=True)
    assert torch.equal(a.flip(1), b)
    # with SAM's constants, mean[0] goes to the blue channel when bgr=True (the released behaviour)
    c = prepare_slices(rgb, t, bgr=True)
    blue = cv2.resize(rgb[0], (80, 80), interpolation=cv2.INTER_LINEAR)[..., 2].astype(np.float32)
    np.testing.assert_array_equal(c[0, 0].numpy(), (blue - MEAN[0]) / STD[0])


def test_prepare_slices_uses_opencv_area_path_on_exact_2x_downscale():
    rgb = _rgb(2, 200, 100, seed=3)
    t = plan_resize((200, 100), 100)
    assert t.resized_hw == (100, 50)
    zeros, ones = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    x = prepare_slices(rgb, t, pixel_mean=zeros, pixel_std=ones)[:, :, :100, :50]
    cv_lin = np.stack([cv2.resize(s, (50, 100), interpolation=cv2.INTER_LINEAR) for s in rgb])
    cv_area = np.stack([cv2.resize(s, (50, 100), interpolation=cv2.INTER_AREA) for s in rgb])
    got = x.permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(got, cv_lin.astype(np.float32))
    # OpenCV switches INTER_LINEAR to area averaging here ...
    np.testing.assert_array_equal(cv_lin, cv_area)
    # ... which a torch bilinear resize does not reproduce
    torch_bilinear = F.interpolate(
        torch.from_numpy(rgb).permute(0, 3, 1, 2).float(), size=(100, 50), mode="bilinear",
        align_corners=False,
    )
    assert not torch.equal(torch_bilinear.round(), x)


@settings(max_examples=25, deadline=None)
@given(h=st.integers(1, 90), w=st.integers(1, 90), S=st.sampled_from([32, 64, 100]), bgr=st.booleans())
def test_prepare_slices_matches_reference_for_any_size(h, w, S, bgr):
    rgb = _rgb(2, h, w, seed=h * 1000 + w)
    t = plan_resize((h, w), S)
    np.testing.assert_array_equal(prepare_slices(rgb, t, bgr=bgr).numpy(), reference_prepare(rgb, t, bgr))


def test_prepare_slices_rejects_mismatch():
    t = plan_resize((10, 10), 32)
    with pytest.raises(ValueError):
        prepare_slices(_rgb(1, 10, 11), t)
    with pytest.raises(ValueError):
        prepare_slices(np.zeros((1, 10, 10, 3), dtype=np.float32), t)


# -------------------------------------------------------------------------------- postprocess_logits

# Two anisotropic/non-square cases: one padded on the right, one padded at the bottom.
POST_CASES = [((120, 200), (2.5, 1.0)), ((100, 300), (1.0, 1.0))]


@pytest.mark.parametrize("in_hw,spacing", POST_CASES)
def test_postprocess_maps_a_rectangle_back_to_slice_coordinates(in_hw, spacing):
    S, L = 256, 64  # padded square and low-res side (SAM: 1024 and 256; the same 4x ratio)
    t = plan_resize(in_hw, S, pixel_spacing=spacing)
    H, W = in_hw
    h, w = t.resized_hw
    cell = S // L
    # a rectangle on the low-res grid, inside the resized region
    r0, r1 = (h // cell) // 4, (h // cell) * 3 // 4
    c0, c1 = (w // cell) // 4, (w // cell) * 3 // 4
    low = -torch.ones((1, 1, L, L))
    low[..., r0:r1, c0:c1] = 1.0
    out = postprocess_logits(low, t)
    assert out.shape == (1, 1, H, W) and out.dtype == torch.float32
    mask = (out[0, 0] > 0).numpy()

    # the rectangle's edges in original pixel units: low-res -> padded square -> resized -> original
    top, bottom = r0 * cell * H / h, r1 * cell * H / h
    left, right = c0 * cell * W / w, c1 * cell * W / w
    yy, xx = np.mgrid[0:H, 0:W] + 0.5  # pixel centres
    inside = (yy > top) & (yy < bottom) & (xx > left) & (xx < right)
    near_edge = (
        (np.abs(yy - top) <= 1) | (np.abs(yy - bottom) <= 1) | (np.abs(xx - left) <= 1) | (np.abs(xx - right) <= 1)
    )
    assert np.array_equal(mask[~near_edge], inside[~near_edge])
    assert mask.sum() > 0.8 * inside.sum()


@pytest.mark.parametrize("in_hw,spacing", POST_CASES)
def test_postprocess_padding_does_not_leak(in_hw, spacing):
    S, L = 256, 64
    t = plan_resize(in_hw, S, pixel_spacing=spacing)
    H, W = in_hw
    h, w = t.resized_hw
    cell = S // L
    base = -torch.ones((2, 1, L, L))
    poisoned = base.clone()
    # every low-res cell that lies wholly in the padding becomes strongly positive
    poisoned[..., -(-h // cell):, :] = 100.0
    poisoned[..., :, -(-w // cell):] = 100.0
    assert h < S or w < S
    clean_out = postprocess_logits(base, t)
    out = postprocess_logits(poisoned, t)
    assert torch.all(clean_out < 0)
    # interpolation reaches one low-res cell into the image: cell * (H/h) original pixels, plus one
    band_y = int(np.ceil(cell * H / h)) + 1
    band_x = int(np.ceil(cell * W / w)) + 1
    assert torch.equal(out[..., : H - band_y, : W - band_x], clean_out[..., : H - band_y, : W - band_x])
    assert torch.all(out[..., : H - band_y, : W - band_x] < 0)
    # without the crop, the padding would flood the slice
    no_crop = F.interpolate(
        F.interpolate(poisoned, size=(S, S), mode="bilinear", align_corners=False), size=(H, W),
        mode="bilinear", align_corners=False,
    )
    assert (no_crop > 0).float().mean() > 0.1


def test_postprocess_batch_and_dtype():
    t = plan_resize((50, 70), 64)
    low = torch.randn(20, 3, 16, 16, dtype=torch.bfloat16)
    out = postprocess_logits(low, t)
    assert out.shape == (20, 3, 50, 70) and out.dtype == torch.float32
    # each map is processed independently of its batch neighbours
    assert torch.equal(out[7:8, 1:2], postprocess_logits(low[7:8, 1:2], t))
    # a constant map stays that constant
    assert torch.allclose(postprocess_logits(torch.full((1, 1, 16, 16), 2.5), t), torch.tensor(2.5))


# --------------------------------------------------------------------------------- intensity windows


def test_ct_window_maps_soft_tissue_range():
    vol = np.array([[[-1000, -160, 40, 240, 1000, -3024]]], dtype=np.int16)
    w = intensity_window(vol, "ct")
    assert w == CT_WINDOW == IntensityWindow(-160.0, 240.0)
    out = to_uint8_rgb(vol, w)
    assert out.shape == (1, 1, 6, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0, 0, :, 0], [0, 0, 128, 255, 255, 0])
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], out[..., 2])
    # overridable
    bone = IntensityWindow.from_level_width(400, 1800)
    assert intensity_window(vol, "CT", ct_window=bone) == bone


def test_ct_as_8bit_export_is_not_windowed_as_hounsfield():
    vol = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    w = intensity_window(vol, "CT")
    assert w == IntensityWindow(0.0, 255.0)
    np.testing.assert_array_equal(to_uint8_rgb(vol, w)[..., 0], vol)


def test_mr_percentiles_are_shared_across_slices():
    rng = np.random.default_rng(1)
    dim = rng.uniform(0, 100, (64, 64))
    bright = rng.uniform(0, 1000, (64, 64))
    vol = np.stack([dim, bright]).astype(np.float32)
    w = intensity_window(vol, "MRI")
    lo, hi = np.percentile(vol, [0.5, 99.5])
    assert w.low == pytest.approx(lo) and w.high == pytest.approx(hi)
    out = to_uint8_rgb(vol, w)[..., 0].astype(int)
    # the dim slice stays dim: one mapping, not a per-slice stretch
    assert out[0].max() <= 30
    assert out[1].max() == 255
    assert out[0].mean() * 5 < out[1].mean()


def test_percentiles_on_strided_subsample_for_huge_volumes(monkeypatch):
    rng = np.random.default_rng(2)
    vol = rng.normal(500, 100, (40, 100, 100)).astype(np.float32)
    full = intensity_window(vol, "MR")
    monkeypatch.setattr(pp, "MAX_PERCENTILE_VOXELS", 50_000)
    sub = intensity_window(vol, "MR")
    assert sub != full  # it really subsampled
    assert sub.low == pytest.approx(full.low, abs=15) and sub.high == pytest.approx(full.high, abs=15)


def test_constant_volume_maps_to_zero_without_warnings():
    vol = np.full((3, 8, 8), 7.0, dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w = intensity_window(vol, "PET")
        out = to_uint8_rgb(vol, w)
    assert w == IntensityWindow(7.0, 7.0)
    assert out.shape == (3, 8, 8, 3) and not out.any()


def test_nan_maps_to_zero():
    vol = np.array([[[np.nan, 0.0, 10.0, np.inf]]], dtype=np.float32)
    w = intensity_window(vol, "US")
    assert np.isfinite(w.low) and np.isfinite(w.high)
    out = to_uint8_rgb(vol, IntensityWindow(0.0, 10.0))[0, 0, :, 0]
    np.testing.assert_array_equal(out, [0, 0, 255, 255])


def test_rgb_passthrough_is_bit_identical():
    rgb = _rgb(2, 9, 11)
    assert intensity_window(rgb, "endoscopy") is None
    out = to_uint8_rgb(rgb, None)
    assert out.dtype == np.uint8 and np.array_equal(out, rgb)


def test_to_uint8_rgb_rejects_what_it_cannot_read():
    with pytest.raises(ValueError):
        to_uint8_rgb(np.zeros((1, 4, 4, 3), dtype=np.float32), None)
    with pytest.raises(ValueError):
        to_uint8_rgb(np.zeros((1, 4, 4, 4), dtype=np.uint8), None)
    with pytest.raises(ValueError):
        to_uint8_rgb(np.zeros((1, 4, 4), dtype=np.int16), None)
    with pytest.raises(ValueError):
        to_uint8_rgb(np.zeros((4, 4), dtype=np.uint8), IntensityWindow(0, 1))
    with pytest.raises(ValueError):
        intensity_window(np.zeros((1, 4, 4, 3), dtype=np.uint16), "microscopy")
    # uint8 grey without a window: identity, replicated
    g = np.arange(16, dtype=np.uint8).reshape(1, 4, 4)
    np.testing.assert_array_equal(to_uint8_rgb(g, None), np.repeat(g[..., None], 3, -1))


# ------------------------------------------------------------------------------------------ modality


@pytest.mark.parametrize(
    "names,canon",
    [
        (["ct", "CT", "Computed Tomography", "computed-tomography"], "CT"),
        (["mr", "MR", "mri", "MRI", "t1", "T2", "FLAIR", "t1gd", "ADC", "magnetic resonance"], "MR"),
        (["x-ray", "X-Ray", "xray", "XR", "cr", "DX", "radiograph", "X"], "X-ray"),
        (["us", "US", "ultrasound", "Ultrasound"], "US"),
        (["PET", "pt"], "PET"),
        (["microscopy", "fluorescence", "cell"], "microscopy"),
        (["histology", "histopathology", "Pathology"], "histopathology"),
        (["endoscopy", "Endoscope"], "endoscopy"),
        (["dermoscopy", "dermatoscopy"], "dermoscopy"),
        (["fundus"], "fundus"),
        (["OCT", "optical coherence tomography"], "OCT"),
    ],
)
def test_canonical_modality_aliases(names, canon):
    for name in names:
        assert canonical_modality(name) == canon
    assert canonical_modality(canon) == canon
    assert canon in MODALITY_TEXT


def test_modality_text_is_what_the_released_model_reads():
    assert MODALITY_TEXT["CT"] == "computed tomography"
    assert MODALITY_TEXT["MR"] == "magnetic resonance"
    assert MODALITY_TEXT["X-ray"] == "X-Ray"
    assert MODALITY_TEXT["US"] == "ultrasound"


def test_unknown_modality_error_is_one_line_and_lists_names():
    with pytest.raises(ModalityError) as info:
        canonical_modality("sonar")
    msg = str(info.value)
    assert "\n" not in msg and "'sonar'" in msg
    for canon in MODALITY_TEXT:
        assert canon in msg
    assert isinstance(info.value, ValueError)
    with pytest.raises(ModalityError):
        canonical_modality("")


def test_infer_modality():
    grey = np.zeros((2, 8, 8), dtype=np.uint16)
    assert infer_modality(grey, {"modality": "CT"}) == "CT"
    assert infer_modality(grey, {"Modality": "MR"}) == "MR"
    assert infer_modality(grey, {"0008|0060": "CR"}) == "X-ray"
    assert infer_modality(grey, {"modality": "PT"}) == "PET"
    # CT-like values without metadata (or with an uninformative tag)
    hu = np.full((2, 8, 8), -1024, dtype=np.int16)
    hu[:, 2:6, 2:6] = 40
    assert infer_modality(hu, {}) == "CT"
    assert infer_modality(hu.astype(np.float32), {"modality": "OT"}) == "CT"
    # no honest guess: non-negative grey, colour
    assert infer_modality(np.arange(128, dtype=np.int16).reshape(2, 8, 8), {}) is None
    assert infer_modality(grey, {}) is None
    assert infer_modality(_rgb(1, 8, 8), {}) is None
    # the tag wins over the values
    assert infer_modality(hu, {"modality": "MR"}) == "MR"


# ------------------------------------------------------------------------------------- content_hash


def test_content_hash_keys_on_dtype_shape_and_bytes():
    a = np.arange(12, dtype=np.int16)
    h = content_hash(a)
    assert len(h) == 64 and int(h, 16) >= 0
    assert content_hash(a) == h == content_hash(a.copy())
    assert content_hash(a.reshape(3, 4)) != h
    assert content_hash(a.reshape(3, 4)) != content_hash(a.reshape(4, 3))
    assert content_hash(a.view(np.uint16)) != h  # same bytes, other dtype
    assert content_hash(a.view(np.uint8)) != h
    b = a.copy()
    b[5] += 1
    assert content_hash(b) != h
    # a strided view hashes as its contiguous copy
    m = np.arange(48, dtype=np.float32).reshape(6, 8)
    assert content_hash(m[:, ::2]) == content_hash(np.ascontiguousarray(m[:, ::2]))
    assert content_hash(m.T) == content_hash(np.ascontiguousarray(m.T))


def test_content_hash_is_stable_across_versions():
    # pinned: embedding caches on disk depend on this key never changing silently
    assert content_hash(np.arange(6, dtype="<i2").reshape(2, 3)) == (
        "58717cc16aa4f7e872687f08ed9ddfce8838a6664afdf4771ecede077d3300e2"
    )
