"""The RCMed Slicer module's segment writing and Segment Editor effect on slicer-core: Slicer's REAL MRML scene,
volume / segmentation / segment editor nodes, vtkSlicerSegmentationsModuleLogic, vtkSlicerSegmentEditorLogic
(the editor's masking, overwrite and undo), terminology logic and slicer.util (Testing/SlicerCoreGlue).

Properties, for each scope (one slice, a range, the whole volume):
- what the module writes lands on the source volume's voxels (read back by Slicer's own
  arrayFromSegmentBinaryLabelmap), also for a cropped image extent, a linear parent transform, oblique and
  flipped directions; voxels of the segment outside the slab and of every other segment are kept;
- the effect's Apply obeys the editor node's editable area, intensity range and overwrite mode as Slicer's
  vtkSlicerSegmentEditorLogic applies them, and one Undo restores every segment exactly;
- terminology entries round-trip through vtkSlicerTerminologiesModuleLogic to the same string.
"""

from __future__ import annotations

import inspect
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "Testing" / "SlicerCoreGlue"))
import rcmed_slicer_core as glue  # noqa: E402
from rotations import rotation, vtk_matrix  # noqa: E402

vtk = pytest.importorskip("vtk")


@pytest.fixture(scope="module")
def core():
    env = glue.start()
    yield env
    env.stop()


@pytest.fixture
def scene(core):
    core.scene.Clear(0)
    return core.scene


# ----------------------------------------------------------------------------------------------- helpers


OBLIQUE = rotation("z", 0.5) @ rotation("x", 0.3)
FLIPPED = np.diag([-1.0, 1.0, -1.0]) @ rotation("y", 0.2)
PARENT = np.array([[0.9, -0.3, 0.1, 12.0], [0.3, 0.95, 0.0, -7.0], [-0.1, 0.05, 1.0, 3.0], [0, 0, 0, 1]])

# "cropped-extent": the volume's image extent starts at (3, 2, 5), as after cropping to a region; the fixture fills
# it in place (slicer.util.updateVolumeFromArray would reset the extent to start at 0). arrayFromVolume holds the
# voxels of the extent, so its (0, 0, 0) is IJK (3, 2, 5); IJKToRAS maps IJK of the whole index space.

GEOMETRIES = {
    "axis-aligned": dict(),
    "cropped-extent": dict(start=(3, 2, 5)),
    "parent-transform": dict(parent=PARENT),
    "oblique": dict(directions=OBLIQUE),
    "flipped": dict(directions=FLIPPED),  # had start=(1, 0, 2), never applied (see above): cropped-extent has it
}


def add_volume(core, array, directions=np.eye(3), spacing=(0.9, 0.8, 2.0), origin=(4.0, -12.0, 20.0),
               start=(0, 0, 0), parent=None, name="vol"):
    """A real scalar volume; ``array`` is (k, j, i); its image extent starts at ``start`` (a cropped ROI)."""
    slicer = core.slicer
    node = core.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    k, j, i = array.shape
    image = vtk.vtkImageData()
    image.SetExtent(start[0], start[0] + i - 1, start[1], start[1] + j - 1, start[2], start[2] + k - 1)
    image.AllocateScalars(vtk.VTK_SHORT, 1)
    # filled in place: slicer.util.updateVolumeFromArray would reset the extent to start at 0
    from vtk.util import numpy_support
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(array.shape)[:] = array
    node.SetAndObserveImageData(image)
    node.SetSpacing(*spacing)
    node.SetOrigin(*origin)
    node.SetIJKToRASDirectionMatrix(vtk_matrix(np.block([[np.asarray(directions), np.zeros((3, 1))],
                                                         [np.zeros((1, 3)), np.ones((1, 1))]])))
    assert tuple(node.GetImageData().GetExtent()[0::2]) == tuple(start)
    if parent is not None:
        t = core.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "parent")
        t.SetMatrixTransformToParent(vtk_matrix(parent))
        node.SetAndObserveTransformNodeID(t.GetID())
    return node


def make_volume(core, shape=(7, 9, 8), **geometry):
    rng = np.random.default_rng(0)
    return add_volume(core, rng.integers(0, 100, size=shape), **geometry)


def fake_result(labels, targets):
    """What the engine's SegmentResult offers segmenting.targets(): labels (z, y, x), target names, presence."""
    return SimpleNamespace(labels=labels, targets=list(targets), presence=[[1.0]] * len(targets),
                           segments=lambda: [], answer="")


def random_mask(shape, seed, p=0.4):
    return np.random.default_rng(seed).random(shape) < p


def set_segment_array(core, mask, segmentation, segmentId, volume):
    """A segment set from a (k, j, i) array on the volume's voxels, as slicer.util.updateSegmentBinaryLabelmapFromArray
    does (a temporary labelmap volume from CreateAndAddLabelVolume, imported by ImportLabelmapToSegmentationNode),
    but keeping the volume's image extent: Slicer's helper fills that labelmap with updateVolumeFromArray, whose
    vtkImageData.SetDimensions resets the extent to start at 0 (slicer/util.py), so on a cropped volume it writes
    the array shifted by the extent start, while arrayFromSegmentBinaryLabelmap (ExportSegmentsToLabelmapNode on
    the reference volume) reads the volume's own extent; the two do not round-trip there."""
    slicer = core.slicer
    from vtk.util import numpy_support

    labelmap = slicer.modules.volumes.logic().CreateAndAddLabelVolume(volume, "__temp__")
    try:
        image = labelmap.GetImageData()
        assert image.GetExtent() == volume.GetImageData().GetExtent()
        numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(mask.shape)[:] = mask
        image.Modified()
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segmentId)
        assert slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelmap, segmentation, ids)
    finally:
        core.scene.RemoveNode(labelmap)


def segment_array(core, segmentation, segmentId, volume):
    """The segment on the volume's voxels, read back by Slicer's own slicer.util (through transforms)."""
    return np.asarray(core.slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentId, volume)) > 0


def slab(shape, axis, lo, hi):
    m = np.zeros(shape, dtype=bool)
    index = [slice(None)] * 3
    index[axis] = slice(lo, hi)
    m[tuple(index)] = True
    return m


SCOPES = {"slice": (3, 4), "range": (2, 5), "volume": None}


# ----------------------------------------------------------------------------- the module's own writing
def test_core_is_slicer_core(core):
    assert not getattr(core.slicer, "STANDIN", False)
    assert "site-packages" in core.slicer.__file__
    assert type(core.scene).__module__.startswith("slicer_core") or "MRMLCore" in type(core.scene).__module__


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("scope", list(SCOPES))
def test_module_writes_on_the_source_voxels_and_keeps_the_rest(core, scene, geometry, scope):
    RCMedSlicer = core.RCMedSlicer
    logic = RCMedSlicer.RCMedSlicerLogic()
    volume = make_volume(core, **GEOMETRIES[geometry])
    shape = core.slicer.util.arrayFromVolume(volume).shape
    slices = SCOPES[scope]
    kind = RCMedSlicer.Scope.VOLUME if slices is None else RCMedSlicer.Scope.RANGE
    request = logic.prepareRequest(volume, "liver", kind, axis="axial",
                                   firstSlice=slices[0] if slices else 0,
                                   lastSlice=slices[1] - 1 if slices else 0)
    segmentation = logic.createOutputSegmentation(volume)
    # earlier content: the target segment and another one, everywhere
    before = random_mask(shape, 1)
    other = random_mask(shape, 2)
    first = logic.applyResult(fake_result(before.astype(np.uint8) + 2 * (other & ~before), ["liver", "spleen"]),
                              logic.prepareRequest(volume, "liver and spleen"), volume, segmentation)
    assert [t.name for t in first] == ["liver", "spleen"]
    seg = segmentation.GetSegmentation()
    liver, spleen = seg.GetSegmentIdBySegmentName("liver"), seg.GetSegmentIdBySegmentName("spleen")
    np.testing.assert_array_equal(segment_array(core, segmentation, liver, volume), before)

    new = random_mask(shape, 3)
    labels = np.where(new, 1, 0).astype(np.uint8)
    logic.applyResult(fake_result(labels, ["liver"]), request, volume, segmentation)

    inside = np.ones(shape, bool) if slices is None else slab(shape, request.slice_axis, *slices)
    expected = np.where(inside, new, before)
    got = segment_array(core, segmentation, liver, volume)
    assert (got != expected).sum() == 0, f"{(got != expected).sum()} voxels differ"
    np.testing.assert_array_equal(segment_array(core, segmentation, spleen, volume), other & ~before)


def test_request_places_array_voxels_at_their_ijk_for_a_cropped_extent(core, scene):
    """The engine's geometry of a request maps arrayFromVolume index (k, j, i) to IJK (i, j, k) + extent start."""
    from RCMedSlicerLib import geometry as rgeom

    start = GEOMETRIES["cropped-extent"]["start"]
    volume = make_volume(core, **GEOMETRIES["cropped-extent"])
    request = core.RCMedSlicer.RCMedSlicerLogic().prepareRequest(volume, "liver")
    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    zyx = np.array([[0, 0, 0], [6, 8, 7], [2, 5, 1]])
    ijk = zyx[:, ::-1] + np.asarray(start)
    expected = np.array([m.MultiplyPoint([*map(float, p), 1.0])[:3] for p in ijk])
    got = rgeom.voxel_to_ras(rgeom.ijk_to_ras_from_geometry(request.volume.geometry), zyx)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_slicer_util_update_from_array_shifts_on_a_cropped_extent(core, scene):
    """Why the effect tests fill segments with set_segment_array: on a volume whose extent does not start at 0,
    Slicer's updateSegmentBinaryLabelmapFromArray and arrayFromSegmentBinaryLabelmap do not round-trip (the
    former's updateVolumeFromArray resets the extent). If this starts failing, Slicer changed: revisit the helper."""
    volume = make_volume(core, **GEOMETRIES["cropped-extent"])
    segmentation = core.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    sid = segmentation.GetSegmentation().AddEmptySegment("", "a")
    mask = random_mask(core.slicer.util.arrayFromVolume(volume).shape, 1)
    core.slicer.util.updateSegmentBinaryLabelmapFromArray(mask.astype(np.uint8), segmentation, sid, volume)
    assert (segment_array(core, segmentation, sid, volume) != mask).any()
    set_segment_array(core, mask.astype(np.uint8), segmentation, sid, volume)
    np.testing.assert_array_equal(segment_array(core, segmentation, sid, volume), mask)


# ----------------------------------------------------------------------------------------------- the effect
def signature_names(func):
    return [p for p in inspect.signature(func).parameters if p != "self"]


def test_adaptor_signatures_follow_slicer_source():
    import slicer_api_table as T

    # The table is taken from Slicer main's qSlicerSegmentEditorAbstractEffect.h / qSlicerSegmentEditorScriptedEffect.h.
    for name, params in T.EFFECT_ADAPTOR.items():
        assert signature_names(getattr(glue.CoreScriptedEffect, name)) == params, name


def test_effect_base_class_and_hooks_follow_slicer_source(core):
    """The stand-in base class (AbstractScriptedSegmentEditorEffect.py) and the hooks the RCMed effect offers the
    adaptor have the parameters Slicer's source gives them."""
    import SegmentEditorEffects
    import slicer_api_table as T

    assert T.mismatches(SegmentEditorEffects.AbstractScriptedSegmentEditorEffect, T.ABSTRACT_SCRIPTED_EFFECT) == {}
    assert T.mismatches(core.effectModule.SegmentEditorEffect, T.EFFECT_HOOKS) == {}


def test_signature_table_matches_slicer_cores_own_util(core):
    """The table the stand-ins are held to agrees with Slicer's util.py as slicer-core ships it."""
    import slicer_api_table as T

    assert T.mismatches(core.slicer.util, T.SLICER_UTIL) == {}


# Every MRML / logic method the module, effect and batch script call (docs/slicer-api.md), on the real classes.
CORE_CALLS = {
    "vtkMRMLScene": ["AddNewNodeByClass", "GetFirstNodeByClass", "GetNodeByID", "Clear", "StartCloseEvent",
                     "EndCloseEvent", "GetNodesByClass"],
    "vtkMRMLScalarVolumeNode": ["GetIJKToRASMatrix", "GetImageData", "GetTransformNodeID", "GetParentTransformNode",
                                "GetName", "GetID", "GetScene", "SetIJKToRASMatrix", "CreateDefaultDisplayNodes"],
    "vtkMRMLLinearTransformNode": ["IsTransformToWorldLinear", "GetMatrixTransformToWorld"],
    "vtkMRMLSliceNode": ["GetSliceToRAS", "GetOrientation", "JumpSliceByCentering", "SetOrientation", "GetXYToRAS"],
    "vtkMRMLSegmentationNode": ["GetReferenceImageGeometryReferenceRole",
                                "SetReferenceImageGeometryParameterFromVolumeNode", "CreateDefaultDisplayNodes",
                                "SetAndObserveTransformNodeID", "GetSegmentation", "StartModify", "EndModify",
                                "SetNodeReferenceID", "GetNodeReference", "SetName"],
    "vtkSegmentation": ["GetSegmentIdBySegmentName", "AddEmptySegment", "GetSegment", "GetNumberOfSegments"],
    "vtkSegment": ["SetColor", "SetTag", "GetTerminologyEntryTagName", "GetName", "GetColor"],
    "vtkSlicerSegmentationsModuleLogic": ["SetBinaryLabelmapToSegment", "MODE_REPLACE", "MODE_MERGE_MIN",
                                          "MODE_MERGE_MASK"],
    "vtkOrientedImageData": ["SetImageToWorldMatrix", "GetImageToWorldMatrix", "SetExtent", "AllocateScalars",
                             "GetExtent"],
    "vtkMRMLSegmentEditorNode": ["GetSegmentationNode", "GetSelectedSegmentID", "SetSelectedSegmentID"],
    "vtkMRMLMarkupsFiducialNode": ["AddControlPointWorld", "GetNthControlPointPositionWorld",
                                   "GetNthControlPointPositionStatus", "PositionDefined",
                                   "GetNthControlPointDescription", "SetNthControlPointDescription",
                                   "GetNthControlPointLabel", "GetNumberOfControlPoints", "RemoveAllControlPoints",
                                   "SetAttribute", "GetAttribute", "CreateDefaultDisplayNodes", "GetDisplayNode",
                                   "PointAddedEvent", "PointModifiedEvent", "PointRemovedEvent",
                                   "PointStartInteractionEvent", "PointEndInteractionEvent", "TransformModifiedEvent",
                                   "AddObserver", "RemoveObserver"],
    "vtkMRMLMarkupsDisplayNode": ["SetSelectedColor"],
    "vtkSlicerSegmentEditorLogic": ["XyzToRas"],

    "vtkSlicerTerminologiesModuleLogic": ["DeserializeTerminologyEntry", "SerializeTerminologyEntry",
                                          "GetNumberOfTypesInTerminologyCategory", "GetNthTypeInTerminologyCategory",
                                          "GetNumberOfTypeModifiersInTerminologyType",
                                          "GetNthTypeModifierInTerminologyType"],
    "vtkSlicerTerminologyEntry": ["GetTerminologyContextName", "GetCategoryObject", "GetTypeObject",
                                  "GetTypeModifierObject"],
    "vtkSlicerTerminologyType": ["GetRecommendedDisplayRGBValue", "GetCodeValue"],
}


def test_every_mrml_call_exists_on_slicer_core(core):
    missing = {cls: [m for m in names if not hasattr(getattr(core.slicer, cls), m)] for cls, names in CORE_CALLS.items()}
    assert {cls: m for cls, m in missing.items() if m} == {}


def test_modification_modes_match_the_real_logic(core):
    L = core.slicer.vtkSlicerSegmentEditorLogic
    for name, value in glue.ABSTRACT_EFFECT_MODES.items():
        assert int(getattr(L, name)) == value, name


def effect_setup(core, geometry, seed=5):
    volume = make_volume(core, **GEOMETRIES[geometry])
    shape = core.slicer.util.arrayFromVolume(volume).shape
    segmentation, ids = glue.add_segmentation(core, volume, ("target", "other", "mask"))
    masks = [random_mask(shape, seed + n, 0.3) for n in range(3)]
    for sid, mask in zip(ids, masks):
        set_segment_array(core, mask.astype(np.uint8), segmentation, sid, volume)
    editorNode, editorLogic = glue.make_editor(core, segmentation, volume)
    editorNode.SetSelectedSegmentID(ids[0])
    effect, adaptor = glue.make_effect(core, editorNode, editorLogic)
    return SimpleNamespace(volume=volume, shape=shape, segmentation=segmentation, ids=ids, editorNode=editorNode,
                           editorLogic=editorLogic, effect=effect, adaptor=adaptor,
                           intensities=np.asarray(core.slicer.util.arrayFromVolume(volume)))


def states(core, s):
    return [segment_array(core, s.segmentation, sid, s.volume) for sid in s.ids]


def effect_apply(core, s, new, slices):
    """What the effect's Apply does once the engine has answered (onApply -> job -> _writeResult)."""
    array, ijkToWorld, ijkToSegmentation, sourceExtent = s.effect._sourceGrid()
    np.testing.assert_array_equal(array, s.intensities)  # the aligned source volume is the volume's voxels
    from RCMedSlicerLib import segmenting
    from RCMedSlicerLib import geometry as rgeom

    request = segmenting.make_request(array, rgeom.geometry_from_ijk_to_ras(ijkToWorld), "liver", "auto",
                                      "axial", slices)
    s.effect._writeResult(fake_result(new.astype(np.uint8), ["liver"]), request, ijkToSegmentation,
                          s.segmentation, s.ids[0], sourceExtent)
    return request


MASKINGS = {
    "everywhere-overwrite-all": dict(mask="EditAllowedEverywhere", overwrite="OverwriteAllSegments"),
    "everywhere-allow-overlap": dict(mask="EditAllowedEverywhere", overwrite="OverwriteNone"),
    "inside-mask-segment": dict(mask="EditAllowedInsideSingleSegment", overwrite="OverwriteNone"),
    "outside-all-segments": dict(mask="EditAllowedOutsideAllSegments", overwrite="OverwriteAllSegments"),
    "intensity-range": dict(mask="EditAllowedEverywhere", overwrite="OverwriteAllSegments", intensity=(20, 60)),
}


@pytest.mark.parametrize("masking", list(MASKINGS))
@pytest.mark.parametrize("scope", list(SCOPES))
@pytest.mark.parametrize("geometry", ["axis-aligned", "cropped-extent", "oblique"])
def test_effect_apply_obeys_editor_masking_and_undo(core, scene, geometry, scope, masking):
    s = effect_setup(core, geometry)
    cfg = MASKINGS[masking]
    E = core.slicer.vtkMRMLSegmentEditorNode
    s.editorNode.SetMaskMode(getattr(core.slicer.vtkMRMLSegmentationNode, cfg["mask"]))
    s.editorNode.SetMaskSegmentID(s.ids[2])
    s.editorNode.SetOverwriteMode(getattr(E, cfg["overwrite"]))
    if "intensity" in cfg:
        s.editorNode.SetSourceVolumeIntensityMask(True)
        s.editorNode.SetSourceVolumeIntensityMaskRange(*cfg["intensity"])
    before = states(core, s)
    new = random_mask(s.shape, 11, 0.5)
    request = effect_apply(core, s, new, SCOPES[scope])

    inside = np.ones(s.shape, bool) if SCOPES[scope] is None else slab(s.shape, request.slice_axis, *SCOPES[scope])
    if cfg["mask"] == "EditAllowedEverywhere":
        editable = np.ones(s.shape, bool)
    elif cfg["mask"] == "EditAllowedInsideSingleSegment":
        editable = before[2]
    else:  # outside all other segments
        editable = ~(before[1] | before[2])
    if "intensity" in cfg:
        lo, hi = cfg["intensity"]
        editable &= (s.intensities >= lo) & (s.intensities <= hi)
    change = inside & editable
    expected_target = np.where(change, new, before[0])
    after = states(core, s)
    assert (after[0] != expected_target).sum() == 0, f"{(after[0] != expected_target).sum()} voxels differ"
    # Slicer's ModificationModeSet with an editable area first adds the segment's own voxels outside that area
    # to the modifier ("we don't want to erase the existing labelmap outside the mask region"), and "modify
    # other segments" then erases the other segments under the whole modifier, within the modification extent
    # (vtkSlicerSegmentEditorLogic::ModifySegmentByLabelmap: segmentOutsideMask -> MERGE_MAX into the modifier;
    # segmentsToErase -> MODE_MERGE_MIN of the inverted modifier with the extent). So what is overwritten is the
    # target as it is in the slab after the Apply, not only the new voxels.
    written = inside & expected_target
    for n in (1, 2):
        expected = before[n] & ~written if cfg["overwrite"] == "OverwriteAllSegments" else before[n]
        assert (after[n] != expected).sum() == 0, (n, int((after[n] != expected).sum()))
    # one Apply is one undo state
    s.editorLogic.Undo()
    for n, b in enumerate(before):
        np.testing.assert_array_equal(segment_array(core, s.segmentation, s.ids[n], s.volume), b)


def test_learn_reads_the_selected_segment_on_the_source_lattice(core, scene):
    s = effect_setup(core, "cropped-extent")
    image = s.adaptor.selectedSegmentLabelmap()
    source = s.adaptor.sourceVolumeImageData()
    from RCMedSlicerLib import geometry as rgeom

    a, b = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(a)
    source.GetImageToWorldMatrix(b)
    assert rgeom.same_lattice(a, b)
    got = rgeom.paste_extent(core.RCMedSlicer.arrayFromOrientedImage(image), image.GetExtent(),
                             source.GetExtent()) > 0
    np.testing.assert_array_equal(got, segment_array(core, s.segmentation, s.ids[0], s.volume))


# -------------------------------------------------------------------------------------------- terminology
def test_terminology_entries_round_trip_through_slicer(core):
    from RCMedSlicerLib import terminology

    tlogic = core.terminologiesLogic
    for name in terminology._ENTRIES:
        entry = terminology.lookup(name).entry
        parsed = core.slicer.vtkSlicerTerminologyEntry()
        assert tlogic.DeserializeTerminologyEntry(entry, parsed), name
        assert tlogic.SerializeTerminologyEntry(parsed) == entry, name
        assert parsed.GetTypeObject().GetCodeMeaning() == terminology.lookup(name).type_meaning


# -------------------------------------------------------------------------------------------- the self-test
def test_self_test_runs_on_slicer_core(core, scene, monkeypatch):
    """The module's one-click self-test (RCMedSlicerTest.runTest), every step, on slicer-core's real scene and logics.

    Only what the core lacks is replaced: slicer.util.loadVolume (it needs the application's IO manager) by the real
    vtkSlicerVolumesLogic.AddArchetypeVolume; the Segment Editor widget (Qt) by the real segment editor node and
    logic behind the adaptor stand-in, whose undo is vtkSlicerSegmentEditorLogic.Undo; the Red slice node, which
    Slicer's layout creates, is added as the layout adds it."""
    pytest.importorskip("torch")
    from rcmed_engine.engine import Engine

    from RCMedSlicerLib import engines

    RCMedSlicer = core.RCMedSlicer
    spec = RCMedSlicer.RCMedSlicerTest.SPEC
    engines.SHARED_CACHE.put(spec, Engine.from_preset("tiny", device="cpu"))
    volumesLogic = core.slicer.modules.volumes.logic()
    monkeypatch.setattr(core.slicer.util, "loadVolume",
                        lambda path, *a, **k: volumesLogic.AddArchetypeVolume(str(path), Path(path).stem))
    monkeypatch.setenv("RCMED_REGISTRY", str(Path(pytest.importorskip("tempfile").mkdtemp())))
    glue.qt_application()
    test = RCMedSlicer.RCMedSlicerTest()
    shown = []
    test.delayDisplay = lambda message, *a, **k: shown.append(str(message))

    def setUp():
        core.scene.Clear(0)
        glue.add_slice_node(core, "Red")

    def editorEffect(segmentation, volume, segmentId):
        editorNode, editorLogic = glue.make_editor(core, segmentation, volume)
        editorNode.SetSelectedSegmentID(segmentId)
        effect, _ = glue.make_effect_with_options(core, editorNode, editorLogic)
        test._keep = (editorNode, editorLogic, effect)
        return test._ctModality(effect), editorLogic.Undo

    test.setUp = setUp
    test._editorEffect = editorEffect
    test.runTest()
    assert not [t for t in shown if "skipped" in t], shown
    assert [t.split(".")[0] for t in shown if ". passed" in t] == ["1", "2", "3", "4", "5"], shown


def test_slicer_reads_the_self_test_volume_with_k_reversed(core, scene):
    """Why the self-test compares the test volume by RAS position: Slicer's archetype reader (what
    slicer.util.loadVolume calls) stores this file's voxels with K reversed and IJKToRAS to match."""
    sys.path.insert(0, str(ROOT / "RCMedSlicer"))
    from RCMedSlicerLib import geometry as rgeom
    from RCMedSlicerLib.testdata import FILE_NAME, oblique_test_volume, same_voxels_in_ras

    volume = core.slicer.modules.volumes.logic().AddArchetypeVolume(str(ROOT / "Testing" / "Data" / FILE_NAME), "t")
    array, ijkToRas = oblique_test_volume()
    got = np.asarray(core.slicer.util.arrayFromVolume(volume))
    np.testing.assert_array_equal(got, array[::-1])
    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    assert same_voxels_in_ras(got, rgeom.as_matrix(m), array, ijkToRas)
