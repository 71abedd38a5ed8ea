"""Correcting a text prompt's segment with include / exclude clicks in the RCMed Segment Editor effect, on
slicer-core: Slicer's REAL markups fiducial nodes (world positions through parent transforms, their point
events), slice nodes (XYToRAS), segment editor node and logic (masking, undo), and vtkSlicerSegmentEditorLogic's
own XyzToRas behind the adaptor's xyToRas (Testing/SlicerCoreGlue). The engine is a fake whose ``refine``
returns a known mask and records what it was given, so every written voxel is known.

Also the Slicer-free logic of RCMedSlicerLib.refining (generation counter, base mask, point kinds).
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "Testing" / "SlicerCoreGlue"))
sys.path.insert(0, str(ROOT / "RCMedSlicer"))
import rcmed_slicer_core as glue  # noqa: E402
from rotations import rotation, vtk_matrix  # noqa: E402
from test_slicer_core import scene  # noqa: E402,F401 (fixture: the scene of this module's core, cleared)

from rcmed_engine.clicks import Click, ras_to_stack  # noqa: E402
from rcmed_engine.geometry import slice_frame  # noqa: E402

vtk = pytest.importorskip("vtk")

OBLIQUE = rotation("z", 0.5) @ rotation("x", 0.3)
PARENT = np.array([[0.9, -0.3, 0.1, 12.0], [0.3, 0.95, 0.0, -7.0], [-0.1, 0.05, 1.0, 3.0], [0, 0, 0, 1]])
SHAPE = (7, 9, 8)


# ------------------------------------------------------------------------------------------ Slicer-free logic
def test_point_kinds_and_labels():
    from RCMedSlicerLib import refining

    assert refining.point_text(True, 3) == ("+3", "include")
    assert refining.point_text(False, 4) == ("-4", "exclude")
    assert refining.is_include("include", "-1") and not refining.is_include("exclude", "+1")
    assert refining.is_include("", "+2") and not refining.is_include("", "-2")  # description cleared: the label


def test_generation_drops_stale_results_per_segment():
    from RCMedSlicerLib import refining

    c = refining.Corrections()
    a, b = ("seg", "A"), ("seg", "B")
    g1 = c.next_generation(a)
    gb = c.next_generation(b)
    g2 = c.next_generation(a)
    assert not c.is_current(a, g1) and c.is_current(a, g2)
    assert c.is_current(b, gb)  # another segment's click does not make A's correction stale, nor B's
    c.forget(a)
    assert not c.is_current(a, g2)  # Clear clicks: what still runs is stale


def test_base_mask_is_kept_until_the_segment_is_edited_elsewhere():
    from RCMedSlicerLib import refining

    c = refining.Corrections()
    key, lattice = ("s", "1"), np.eye(4)
    text = np.zeros((2, 3, 3), bool)
    text[0, 1, 1] = True
    assert np.array_equal(c.previous(key, text, lattice), text)
    corrected = text.copy()
    corrected[1] = True
    c.written(key, corrected)
    # the next click corrects the text's mask again, not the corrected one
    assert np.array_equal(c.previous(key, corrected, lattice), text)
    painted = corrected.copy()
    painted[0, 0, 0] = True  # the user painted (or undid): that is what the clicks correct now
    assert np.array_equal(c.previous(key, painted, lattice), painted)


def test_near_point_finds_points_on_the_view_slice_only():
    from RCMedSlicerLib import refining

    xy_to_ras = np.diag([0.5, 0.5, 2.0, 1.0])
    xy_to_ras[:3, 3] = [10.0, 20.0, 30.0]
    on = refining.ClickPoint(0, "+1", (15.0, 25.0, 30.0), True)  # xy (10, 10), on the slice
    off = refining.ClickPoint(1, "+2", (15.0, 25.0, 36.0), True)  # xy (10, 10), three slices away
    assert refining.near_point((12, 11), xy_to_ras, [on, off]) is on
    assert refining.near_point((30, 30), xy_to_ras, [on, off]) is None
    assert refining.near_point((10, 10), xy_to_ras, [off]) is None


def test_request_checks():
    from RCMedSlicerLib import refining
    from RCMedSlicerLib import geometry as rgeom

    geometry = rgeom.geometry_from_ijk_to_ras(np.eye(4))
    a = np.zeros(SHAPE, np.int16)
    with pytest.raises(refining.RefineError, match="press Apply"):
        refining.make_request(a, geometry, " ", [Click((0, 0, 0))], np.zeros(SHAPE))
    with pytest.raises(refining.RefineError, match="grid"):
        refining.make_request(a, geometry, "liver", [Click((0, 0, 0))], np.zeros((1, 2, 3)))
    r = refining.make_request(a, geometry, "liver", [Click((0, 0, 0)), Click((1, 1, 1), False)], np.ones(SHAPE),
                              "CT", "coronal", ("n", "s"), 3)
    assert (r.modality, r.axis, r.generation, r.previous.dtype) == ("CT", "coronal", 3, np.uint8)
    assert r.describe() == "'liver' with 1 include and 1 exclude click"
    with pytest.raises(refining.RefineError, match="no 'refine'"):
        refining.run(object(), r)


# ----------------------------------------------------------------------------------------- on slicer-core
@pytest.fixture(scope="module")
def core():
    env = glue.start()
    glue.qt_application()
    yield env
    env.stop()



def add_transform(core, matrix, name="T"):
    t = core.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    t.SetMatrixTransformToParent(vtk_matrix(matrix))
    return t


def add_volume(core, directions=np.eye(3), parent=None):
    node = core.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "vol")
    array = np.random.default_rng(0).integers(0, 100, size=SHAPE).astype(np.int16)
    image = vtk.vtkImageData()
    image.SetDimensions(SHAPE[2], SHAPE[1], SHAPE[0])
    image.AllocateScalars(vtk.VTK_SHORT, 1)
    from vtk.util import numpy_support
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(SHAPE)[:] = array
    node.SetAndObserveImageData(image)
    node.SetSpacing(0.9, 0.8, 2.0)
    node.SetOrigin(4.0, -12.0, 20.0)
    node.SetIJKToRASDirectionMatrix(vtk_matrix(np.block([[np.asarray(directions), np.zeros((3, 1))],
                                                         [np.zeros((1, 3)), np.ones((1, 1))]])))
    if parent is not None:
        node.SetAndObserveTransformNodeID(add_transform(core, parent, "parent").GetID())
    return node


def segment_array(core, segmentation, segmentId, volume):
    return np.asarray(core.slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentId, volume)) > 0


def set_segment(core, mask, segmentation, segmentId, volume):
    core.slicer.util.updateSegmentBinaryLabelmapFromArray(mask.astype(np.uint8), segmentation, segmentId, volume)


class FakeEngine:
    """``refine`` returns the next of ``masks`` (as label 1) and records its arguments. ``gate``: the first call
    waits for it (ignoring cancel, as an engine between two checks would), so a newer click can come meanwhile."""

    def __init__(self, *masks, gate=None):
        self.masks = list(masks)
        self.calls = []
        self.gate = gate
        self.started = threading.Event()

    def refine(self, image, prompt, clicks, *, previous=None, modality=None, axis="axial", progress=None,
               cancel=None, **kwargs):
        n = len(self.calls)
        self.calls.append(SimpleNamespace(image=image, prompt=prompt, clicks=list(clicks),
                                          previous=np.array(previous), modality=modality, axis=axis))
        self.started.set()
        if self.gate is not None and n == 0:
            assert self.gate.wait(30)
        return SimpleNamespace(labels=self.masks[min(n, len(self.masks) - 1)].astype(np.uint8))


def setup(core, engine, directions=np.eye(3), parent=None, prompt="liver"):
    volume = add_volume(core, directions, parent)
    segmentation, ids = glue.add_segmentation(core, volume, ("liver", "other", "mask"))
    rng = np.random.default_rng(3)
    masks = [rng.random(SHAPE) < 0.3 for _ in ids]
    for sid, mask in zip(ids, masks):
        set_segment(core, mask, segmentation, sid, volume)
    editorNode, editorLogic = glue.make_editor(core, segmentation, volume)
    editorNode.SetSelectedSegmentID(ids[0])
    editorNode.SetOverwriteMode(core.slicer.vtkMRMLSegmentEditorNode.OverwriteNone)
    effect, adaptor = glue.make_effect_with_options(core, editorNode, editorLogic)
    effect.promptComboBox.setEditText(prompt)
    effect._engineSpec = lambda: "fake spec"
    effect.logic.engine = lambda spec: engine
    effect.activate()
    sliceNode = glue.add_slice_node(core, "Red")
    sliceNode.SetDimensions(200, 200, 1)
    sliceNode.SetFieldOfView(60.0, 60.0, 1.0)
    return SimpleNamespace(volume=volume, segmentation=segmentation, ids=ids, before=masks, editorNode=editorNode,
                           editorLogic=editorLogic, effect=effect, sliceNode=sliceNode,
                           widget=glue.SliceWidget(core, sliceNode))


def states(core, s):
    return [segment_array(core, s.segmentation, sid, s.volume) for sid in s.ids]


def voxel_world_ras(core, volume, zyx):
    logic = core.RCMedSlicer.RCMedSlicerLogic()
    return (logic.volumeIjkToWorld(volume) @ np.array([zyx[2], zyx[1], zyx[0], 1.0]))[:3]


def click(core, s, zyx, shift=False, orientation="Axial"):
    """A left press in the Red view on the centre of voxel ``zyx``, as Slicer's interactor hands it to the effect."""
    from RCMedSlicerLib import refining

    ras = voxel_world_ras(core, s.volume, zyx)
    s.sliceNode.SetOrientation(orientation)
    s.sliceNode.JumpSliceByCentering(*ras)
    xy = np.round(refining.ras_to_xy(s.sliceNode.GetXYToRAS(), ras)).astype(int)
    interactor = vtk.vtkRenderWindowInteractor()
    interactor.SetEventPosition(int(xy[0]), int(xy[1]))
    interactor.SetShiftKey(1 if shift else 0)
    handled = s.effect.processInteractionEvents(interactor, vtk.vtkCommand.LeftButtonPressEvent, s.widget)
    return handled, ras


def settle(core, s, timeout=30.0):
    """Run Qt's events (the click timer, the job poller) until the effect is idle."""
    t0 = time.monotonic()
    while (s.effect.poller.running or s.effect.clickTimer.isActive() or s.effect.corrections.queued
           or s.effect._dirtyClickNodes):
        core.slicer.app.processEvents()
        time.sleep(0.01)
        assert time.monotonic() - t0 < timeout, s.effect.statusLabel.text
    core.slicer.app.processEvents()


def click_node(s):
    return s.effect._clickNode(s.segmentation, s.ids[0])


def test_clicks_from_a_real_fiducial_node_are_in_world_ras_under_a_transform(core, scene):
    from RCMedSlicerLib import refining

    node = core.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "clicks")
    local = [(1.0, 2.0, 3.0), (-4.0, 5.5, 6.0), (7.0, -8.0, 9.0)]
    for n, p in enumerate(local):
        node.AddControlPoint(*p, f"{'+' if n != 1 else '-'}{n + 1}")
        node.SetNthControlPointDescription(n, "exclude" if n == 1 else "include")
    node.UnsetNthControlPointPosition(2)  # being placed: not a click
    node.SetAndObserveTransformNodeID(add_transform(core, PARENT).GetID())
    clicks = refining.clicks_from_markups(node)
    assert [c.include for c in clicks] == [True, False]
    expected = [(PARENT @ np.array([*p, 1.0]))[:3] for p in local[:2]]
    np.testing.assert_allclose([c.ras for c in clicks], expected, atol=1e-9)
    assert refining.next_number(node) == 4


@pytest.mark.parametrize("geometry", ["axis-aligned", "oblique-under-transform"])
def test_a_click_in_a_view_corrects_the_segment_on_the_right_voxels_and_undo_restores_it(core, scene, geometry):
    directions, parent = (np.eye(3), None) if geometry == "axis-aligned" else (OBLIQUE, PARENT)
    corrected = np.random.default_rng(9).random(SHAPE) < 0.5
    engine = FakeEngine(corrected)
    s = setup(core, engine, directions, parent)
    before = states(core, s)
    handled, ras = click(core, s, (3, 4, 5))
    assert handled
    settle(core, s)
    # the point: a real fiducial at the click's world RAS, an include point of the selected segment
    node = click_node(s)
    assert node.GetAttribute("RCMed.SegmentID") == s.ids[0]
    assert node.GetNthControlPointDescription(0) == "include" and node.GetNthControlPointLabel(0) == "+1"
    p = [0.0, 0.0, 0.0]
    node.GetNthControlPointPositionWorld(0, p)
    np.testing.assert_allclose(p, ras, atol=0.3)  # within the view's pixel (0.3 mm)
    # the engine got the click on voxel (3, 4, 5) of the source grid, the prompt, and the segment as previous
    call = engine.calls[0]
    assert call.prompt == "liver" and len(call.clicks) == 1 and call.clicks[0].include
    frame = slice_frame(call.image.geometry, "axial", SHAPE)
    point = ras_to_stack(call.clicks[0].ras, call.image.geometry, SHAPE, frame)
    zyx = [0, 0, 0]
    zyx[frame.slice_axis] = point.index
    row = SHAPE[frame.row_axis] - 1 - point.row if frame.flip_rows else point.row
    col = SHAPE[frame.col_axis] - 1 - point.col if frame.flip_cols else point.col
    zyx[frame.row_axis], zyx[frame.col_axis] = int(round(row)), int(round(col))
    assert tuple(zyx) == (3, 4, 5)
    np.testing.assert_array_equal(call.previous > 0, before[0])
    # the segment is the corrected mask; the other segments are untouched (overwrite: none)
    after = states(core, s)
    np.testing.assert_array_equal(after[0], corrected)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[2], before[2])
    assert "+1  include" in s.effect.clicksListWidget.item(0).text()
    # one correction, one undo step
    s.editorLogic.Undo()
    for n, b in enumerate(before):
        np.testing.assert_array_equal(segment_array(core, s.segmentation, s.ids[n], s.volume), b)


def test_a_correction_respects_the_editable_area(core, scene):
    corrected = np.ones(SHAPE, bool)
    s = setup(core, FakeEngine(corrected))
    s.editorNode.SetMaskMode(core.slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment)
    s.editorNode.SetMaskSegmentID(s.ids[2])
    before = states(core, s)
    click(core, s, (2, 2, 2))
    settle(core, s)
    np.testing.assert_array_equal(states(core, s)[0], before[0] | before[2])


def test_shift_click_is_an_exclude_point_and_a_press_on_a_point_is_left_to_the_markups_widget(core, scene):
    engine = FakeEngine(np.zeros(SHAPE, bool))
    s = setup(core, engine)
    assert click(core, s, (3, 4, 5), shift=True)[0]
    settle(core, s)
    node = click_node(s)
    assert node.GetNthControlPointDescription(0) == "exclude" and node.GetNthControlPointLabel(0) == "-1"
    assert engine.calls[0].clicks[0].include is False
    handled, _ = click(core, s, (3, 4, 5))  # on the point: the user drags it, nothing is added
    assert not handled and node.GetNumberOfControlPoints() == 1


def test_no_prompt_no_click(core, scene):
    engine = FakeEngine(np.zeros(SHAPE, bool))
    s = setup(core, engine, prompt="")
    handled, _ = click(core, s, (3, 4, 5))
    assert not handled and click_node(s) is None and not engine.calls
    assert "press Apply" in s.effect.statusLabel.text


def test_a_new_click_cancels_a_stale_correction(core, scene):
    first, second = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    first[1] = True
    second[5] = True
    gate = threading.Event()
    engine = FakeEngine(first, second, gate=gate)
    s = setup(core, engine)
    before = states(core, s)
    click(core, s, (3, 4, 5))
    assert engine.started.wait(10)
    click(core, s, (2, 2, 2), shift=True)  # while the first correction runs
    assert s.effect.poller.job.cancel_flag.is_set()  # the stale run was told to stop
    gate.set()  # it finishes anyway: its result must not be written
    settle(core, s)
    assert len(engine.calls) == 2
    assert [c.include for c in engine.calls[1].clicks] == [True, False]  # the newer run has both clicks
    np.testing.assert_array_equal(engine.calls[1].previous > 0, before[0])
    np.testing.assert_array_equal(states(core, s)[0], second)
    s.editorLogic.Undo()  # the stale run wrote nothing: one undo step back is the segment before the clicks
    np.testing.assert_array_equal(states(core, s)[0], before[0])


def test_moving_a_point_reruns_from_the_text_mask_and_deleting_the_last_restores_it(core, scene):
    first, moved = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    first[1] = True
    moved[4] = True
    engine = FakeEngine(first, moved)
    s = setup(core, engine)
    before = states(core, s)
    click(core, s, (3, 4, 5))
    settle(core, s)
    node = click_node(s)
    target = voxel_world_ras(core, s.volume, (4, 6, 2))
    node.SetNthControlPointPositionWorld(0, *target)  # what dragging the point (or editing it in Markups) does
    settle(core, s)
    assert len(engine.calls) == 2
    np.testing.assert_allclose(engine.calls[1].clicks[0].ras, target, atol=1e-9)
    np.testing.assert_array_equal(engine.calls[1].previous > 0, before[0])  # the text's mask, not the corrected one
    np.testing.assert_array_equal(states(core, s)[0], moved)
    node.RemoveNthControlPoint(0)
    settle(core, s)
    assert len(engine.calls) == 2  # no engine: no clicks left means the mask before the clicks
    np.testing.assert_array_equal(states(core, s)[0], before[0])
    assert s.effect.clicksListWidget.count == 0


def test_clear_clicks_keeps_the_segment(core, scene):
    corrected = np.zeros(SHAPE, bool)
    corrected[2:4] = True
    engine = FakeEngine(corrected)
    s = setup(core, engine)
    click(core, s, (3, 4, 5))
    settle(core, s)
    assert s.effect.clearClicksButton.enabled
    s.effect.onClearClicks()
    settle(core, s)
    assert click_node(s).GetNumberOfControlPoints() == 0 and s.effect.clicksListWidget.count == 0
    np.testing.assert_array_equal(states(core, s)[0], corrected)
    assert len(engine.calls) == 1


def test_the_request_binds_to_the_real_engines_refine():
    """The fake records what refining.run passes; the real Engine.refine must accept exactly that call."""
    import inspect

    engine_module = pytest.importorskip("rcmed_engine.engine")
    from RCMedSlicerLib import refining
    from RCMedSlicerLib import geometry as rgeom

    request = refining.make_request(np.zeros(SHAPE, np.int16), rgeom.geometry_from_ijk_to_ras(np.eye(4)), "liver",
                                    [Click((1, 2, 3))], np.zeros(SHAPE), "CT", "sagittal")
    seen = {}

    class Recorder:
        def refine(self, *args, **kwargs):
            seen["args"], seen["kwargs"] = args, kwargs

    refining.run(Recorder(), request, progress=lambda d, t: None, cancel=object())
    bound = inspect.signature(engine_module.Engine.refine).bind(object(), *seen["args"], **seen["kwargs"])
    assert bound.arguments["prompt"] == "liver" and bound.arguments["axis"] == "sagittal"
    assert bound.arguments["previous"] is request.previous and bound.arguments["modality"] == "CT"
