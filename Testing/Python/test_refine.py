"""Clicks and boxes that correct a mask: their geometry, the volume logic, bad input, and the real decoder."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage as ndi

from rcmed_engine import refine as refine_mod
from rcmed_engine import refine_volume
from rcmed_engine.clicks import Box, Click, SlicePoint, parse_box, parse_click, ras_to_stack, stack_to_ras
from rcmed_engine.engine import Engine
from rcmed_engine.geometry import PLANES, Geometry, Volume, slice_frame, to_slices
from rcmed_engine.model.presets import load_preset
from rcmed_engine.refine import SliceView
from rcmed_engine.results import Cancelled, EngineError, SegmentResult
from rotations import rotation

_RAS = np.array([-1.0, -1.0, 1.0])


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for the module


def geometry(angle: float = 0.0, axis=(1, 2, 3), flip=(1, 1, 1), spacing=(0.8, 1.1, 2.5)) -> Geometry:
    direction = rotation(axis, angle) @ np.diag(flip)
    return Geometry((12.0, -30.0, 7.5), spacing, tuple(direction.ravel()))


def voxel_ras(geo: Geometry, zyx) -> np.ndarray:
    return geo.ijk_to_lps(np.array(zyx[::-1], float)) * _RAS


# ------------------------------------------------------------------------------------------ geometry
@settings(max_examples=60, deadline=None)
@given(angle=st.floats(-0.6, 0.6), flips=st.tuples(*[st.sampled_from([1, -1])] * 3),
       plane=st.sampled_from(PLANES), zyx=st.tuples(st.integers(0, 6), st.integers(0, 8), st.integers(0, 9)))
def test_a_click_lands_on_the_voxel_it_was_put_on(angle, flips, plane, zyx):
    geo = geometry(angle, flip=flips)
    shape = (7, 9, 10)
    marked = np.zeros(shape, np.uint8)
    marked[zyx] = 1
    frame = slice_frame(geo, plane, shape)
    p = ras_to_stack(voxel_ras(geo, zyx), geo, shape, frame)
    assert to_slices(marked, frame)[p.index, round(p.row), round(p.col)] == 1
    back = stack_to_ras(p, geo, shape, frame)
    np.testing.assert_allclose(back, voxel_ras(geo, zyx), atol=1e-9)


@pytest.mark.parametrize("plane", PLANES)
def test_a_click_between_voxels_keeps_its_subpixel_position(plane):
    geo = geometry(0.4, flip=(-1, 1, -1))
    shape = (7, 9, 10)
    frame = slice_frame(geo, plane, shape)
    a, b = voxel_ras(geo, (3, 4, 5)), voxel_ras(geo, (3, 5, 5))
    p, q = (ras_to_stack(x, geo, shape, frame) for x in (a, b))
    mid = ras_to_stack((a + b) / 2, geo, shape, frame)
    assert mid.row == pytest.approx((p.row + q.row) / 2) and mid.col == pytest.approx((p.col + q.col) / 2)


def test_a_click_outside_the_image_is_refused_in_one_line():
    geo = geometry(0.3)
    frame = slice_frame(geo, "axial", (7, 9, 10))
    with pytest.raises(EngineError, match="outside the image") as info:
        ras_to_stack(voxel_ras(geo, (3, 4, 11)), geo, (7, 9, 10), frame)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text, expected", [
    ("1,2,3", Click((1, 2, 3), True)),
    ("-1.5, 2 ,3e1:exclude", Click((-1.5, 2, 30), False)),
    ("1,2,3:include:left kidney", Click((1, 2, 3), True, "left kidney")),
])
def test_click_syntax(text, expected):
    assert parse_click(text) == expected
    assert Click.from_json(expected.to_json()) == expected


@pytest.mark.parametrize("text", ["1,2", "1,2,x", "1,2,3:maybe", "1,2,nan", ""])
def test_bad_clicks_are_one_line_errors(text):
    with pytest.raises(EngineError) as info:
        parse_click(text)
    assert "\n" not in str(info.value)


def test_box_syntax():
    box = parse_box("1,2,3:4,5,3:liver")
    assert box == Box((1, 2, 3), (4, 5, 3), "liver") and Box.from_json(box.to_json()) == box
    with pytest.raises(EngineError):
        parse_box("1,2,3")


# ------------------------------------------------------------------------------------------ the volume logic
def blob_volume(geo: Geometry | None = None) -> tuple[Volume, np.ndarray, np.ndarray]:
    """Two bright blocks in dark noise: A spans axial slices 2..8, B (a second object) slices 3..5."""
    rng = np.random.default_rng(3)
    shape = (12, 24, 26)
    a = np.zeros(shape, bool)
    a[2:9, 5:12, 6:14] = True
    b = np.zeros(shape, bool)
    b[3:6, 15:21, 16:23] = True
    vox = rng.uniform(0, 10, shape).astype(np.float32)
    vox[a | b] += 500
    return Volume(vox, geo or Geometry((0, 0, 0), (1, 1, 1), (1, 0, 0, 0, 1, 0, 0, 0, 1)), {"modality": "CT"}), a, b


@pytest.fixture
def oracle(monkeypatch):
    """A decoder that draws exactly the bright objects its box touches (IoU estimate 0.9; 0.1 when empty), on
    the slice's own voxels: the test then checks only where clicks land and how corrections travel."""

    def view(self, k, text=True):
        bright = self.prep.stack[k] > 250
        return SliceView(torch.from_numpy(bright)[None, None], self.prep.transform, self.prep.frame.pixel_spacing)

    def decode(model, view, boxes, text):
        bright = view.neck[0, 0].numpy()
        labels, _ = ndi.label(bright)
        masks, scores = [], []
        for r0, c0, r1, c1 in np.asarray(boxes):
            inside = labels[int(np.ceil(r0)):int(r1) + 1, int(np.ceil(c0)):int(c1) + 1]
            m = np.isin(labels, np.unique(inside[inside > 0]))
            masks.append(m)
            scores.append(0.9 if m.any() else 0.1)
        return np.array(masks), np.array(scores)

    monkeypatch.setattr(refine_volume._Views, "__call__", view)
    monkeypatch.setattr(refine_mod, "decode_boxes", decode)


def engine() -> Engine:
    return Engine(load_preset("tiny"), device="cpu")


def centre_click(vol: Volume, zyx, include=True, target=None) -> Click:
    return Click(tuple(voxel_ras(vol.geometry, zyx)), include, target)


@pytest.mark.parametrize("geo", [None, geometry(0.35, flip=(-1, 1, -1), spacing=(1.0, 0.9, 1.2))])
def test_an_include_click_is_carried_through_the_object_and_no_further(oracle, geo):
    vol, a, b = blob_volume(geo)
    frame = slice_frame(vol, "axial")
    result = engine().refine(vol, "tumour", [centre_click(vol, (5, 8, 9))], text=False)
    got = result.mask(0)
    # Each object, on the axial slices (of the volume's own frame) that a carried box reaches.
    expected = to_slices(a, frame).any((1, 2))
    assert to_slices(got, frame).any((1, 2)).tolist() == expected.tolist()
    assert np.array_equal(got, a) if geo is None else got[a].mean() > 0.9 and not (got & b).any()
    assert "RCMed.clicks" in result.provenance and "include" in result.provenance["RCMed.clicks"]


def test_without_carrying_only_the_clicked_slice_changes(oracle):
    vol, a, _ = blob_volume()
    got = engine().refine(vol, "tumour", [centre_click(vol, (5, 8, 9))], propagate=False, text=False).mask(0)
    assert got.any((1, 2)).nonzero()[0].tolist() == [5] and np.array_equal(got[5], a[5])


def test_the_range_limits_the_carrying(oracle):
    vol, a, _ = blob_volume()
    got = engine().refine(vol, "tumour", [centre_click(vol, (5, 8, 9))], slices=(4, 7), text=False).mask(0)
    assert got.any((1, 2)).nonzero()[0].tolist() == [4, 5, 6]


def test_clicks_on_two_slices_both_hold(oracle):
    vol, a, b = blob_volume()
    clicks = [centre_click(vol, (5, 8, 9)), centre_click(vol, (4, 18, 19))]
    got = engine().refine(vol, "tumour", clicks, text=False).mask(0)
    assert np.array_equal(got, a | b)


def test_an_exclude_click_removes_a_leak_and_the_rest_stays(oracle):
    vol, a, b = blob_volume()
    earlier = (a | b).astype(np.uint8)  # a result that leaked into B
    got = engine().refine(vol, "tumour", [centre_click(vol, (4, 18, 19), include=False)], previous=earlier,
                          text=False).mask(0)
    assert np.array_equal(got, a)


def test_include_and_exclude_on_one_object_split_it_half_way(oracle):
    """Where the decoder sees one object under both clicks, the include keeps its half (nearer to it)."""
    vol, a, _ = blob_volume()
    inc, exc = (5, 8, 7), (5, 8, 12)  # A spans columns 6..13 on rows 5..11
    got = engine().refine(vol, "tumour", [centre_click(vol, inc), centre_click(vol, exc, include=False)],
                          propagate=False, text=False).mask(0)
    cols = np.arange(a.shape[2])
    half = a[5] & (np.abs(cols - 7) <= np.abs(cols - 12))[None, :]
    assert np.array_equal(got[5], half) and not got[np.arange(12) != 5].any()


def test_other_labels_and_untouched_slices_are_kept(oracle):
    vol, a, b = blob_volume()
    earlier = np.zeros(a.shape, np.uint8)
    earlier[b] = 2  # the second target's mask
    earlier[0, 0, 0] = 1
    got = engine().refine(vol, "tumour and cyst", [centre_click(vol, (5, 8, 9), target="tumour")],
                          previous=earlier, text=False).labels
    assert np.array_equal(got == 2, b) and got[0, 0, 0] == 1 and np.array_equal(got[1:] == 1, a[1:])


def test_a_box_sets_its_slice(oracle):
    vol, a, b = blob_volume()
    box = Box(tuple(voxel_ras(vol.geometry, (4, 14, 14))), tuple(voxel_ras(vol.geometry, (4, 22, 24))))
    got = engine().refine(vol, "tumour", [], boxes=[box], propagate=False, text=False).mask(0)
    assert np.array_equal(got[4], b[4]) and not got[np.arange(12) != 4].any()


def test_cancel_leaves_nothing(oracle):
    vol, *_ = blob_volume()
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        engine().refine(vol, "tumour", [centre_click(vol, (5, 8, 9))], text=False, cancel=stop)


def test_a_clicked_slice_the_earlier_result_never_reached_is_segmented_first(oracle, monkeypatch):
    vol, a, _ = blob_volume()
    eng = engine()
    calls = []
    real = Engine.segment

    def spy(self, image, prompt, **kw):
        calls.append(kw.get("slices"))
        return real(self, image, prompt, **kw)

    monkeypatch.setattr(Engine, "segment", spy)
    earlier = eng.segment(vol, "tumour", slices=(0, 3))
    calls.clear()
    eng.refine(vol, "tumour", [centre_click(vol, (6, 8, 9))], previous=earlier, propagate=False)
    assert calls == [(6, 7)]


# ------------------------------------------------------------------------------------------ bad input
BAD_REFINE = [
    ("outside", "outside the image"),
    ("range", "outside the range"),
    ("zero box", "zero area"),
    ("two-slice box", "both must be on the slice"),
    ("exclude first", "nothing to remove"),
    ("geometry", "another grid"),
    ("target", "does not"),
    ("nothing", "nothing to refine"),
]


def bad_refine_call(case: str, vol: Volume) -> tuple[list[Click], dict]:
    """The clicks and keywords of one BAD_REFINE case on ``blob_volume()`` (shared with the server's tests)."""
    g = vol.geometry
    kw: dict = {"text": False}
    clicks = [centre_click(vol, (5, 8, 9))]
    corner = tuple(voxel_ras(g, (4, 3, 3)))
    if case == "outside":
        clicks = [centre_click(vol, (5, 8, 40))]
    elif case == "range":
        kw["slices"] = (0, 3)
    elif case in ("zero box", "two-slice box"):
        far = (4, 3, 9) if case == "zero box" else (5, 9, 9)
        clicks, kw["boxes"] = [], [Box(corner, tuple(voxel_ras(g, far)))]
    elif case == "exclude first":
        clicks = [centre_click(vol, (5, 8, 9), include=False)]
    elif case == "geometry":
        kw["previous"] = Volume(np.zeros(vol.array.shape, np.uint8), Geometry((0, 0, 1), (1, 1, 1), g.direction))
    elif case == "target":
        clicks = [centre_click(vol, (5, 8, 9), target="spleen")]
    elif case == "nothing":
        clicks = []
    return clicks, kw


@pytest.mark.parametrize("case, message", BAD_REFINE)
def test_bad_refine_input_is_one_line_and_writes_nothing(case, message, oracle):
    vol, *_ = blob_volume()
    clicks, kw = bad_refine_call(case, vol)
    before = vol.array.copy()
    with pytest.raises(EngineError, match=message) as info:
        engine().refine(vol, "tumour", clicks, **kw)
    assert "\n" not in str(info.value) and np.array_equal(vol.array, before)


# ------------------------------------------------------------------------------------------ the real decoder
@pytest.mark.lite
def test_the_lite_decoder_segments_a_clicked_object_through_the_volume():
    """The shipped `lite` weights, clicks alone: one click at an ellipsoid's centre gives most of it."""
    shape = (9, 48, 48)
    zz, yy, xx = np.indices(shape)
    ball = ((zz - 4) / 3.6) ** 2 + ((yy - 22) / 11) ** 2 + ((xx - 25) / 9) ** 2 <= 1
    vox = np.random.default_rng(0).normal(100, 5, shape).astype(np.float32)
    vox[ball] += 400
    vol = Volume(vox, Geometry((0, 0, 0), (1, 1, 1), (1, 0, 0, 0, 1, 0, 0, 0, 1)), {"modality": "CT"})
    eng = Engine.from_preset("lite", device="cpu")
    got = eng.refine(vol, "tumour", [centre_click(vol, (4, 22, 25))], text=False).mask(0)
    dice = 2 * (got & ball).sum() / (got.sum() + ball.sum())
    assert dice > 0.8, dice
    assert got[4].sum() > 0.8 * ball[4].sum() and got.any((1, 2)).sum() >= 5
