"""Run the RCMed extension's Slicer code on slicer-core: Slicer's REAL C++ core from PyPI (test use only).

``slicer`` here is slicer-core's package: the real vtkMRMLScene, volume / segmentation / segment editor nodes,
vtkSlicerSegmentationsModuleLogic, vtkSlicerSegmentEditorLogic, vtkSlicerTerminologiesModuleLogic and Slicer's
own ``slicer.util``. The core has no Qt application and no widgets, so only these are added, as in Slicer's
start-up: ``slicer.mrmlScene`` with the Segmentations module's node classes and converter rules registered
(vtkSlicerSegmentationsModuleLogic::RegisterNodes), ``slicer.modules.<name>.logic()`` for the two logics used,
a minimal ``slicer.app``, and from Testing/SlicerStandIns the Python glue the core lacks: ``qt`` / ``ctk``
(PySide6), ``slicer.ScriptedLoadableModule``, ``slicer.parameterNodeWrapper``, ``SegmentEditorEffects``.

``CoreScriptedEffect`` stands in for the C++ adaptor qSlicerSegmentEditorScriptedEffect (a Qt class). It keeps
no segment state of its own: every read and every modification goes to the real vtkSlicerSegmentEditorLogic
bound to the real vtkMRMLSegmentEditorNode, as qSlicerSegmentEditorAbstractEffect does in Slicer (main:
``modifySegmentByLabelmap`` -> ``vtkSlicerSegmentEditorLogic::ModifySegmentByLabelmap(..., perSegment(),
bypassMasking)``), so the editor node's masking settings are applied by Slicer's own code.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[2]
STANDINS = ROOT / "Testing" / "SlicerStandIns"
MODULE_DIR = ROOT / "RCMedSlicer"
PURGE = ("slicer", "slicer_core", "qt", "ctk", "SegmentEditorEffects", "RCMedSlicer", "SegmentEditorRCMedLib",
         "PyTorchUtils")


def _purge() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in PURGE:
            del sys.modules[name]


class _App:
    """What ``slicer.app`` offers that the Logic and effect touch; no Qt application exists in slicer-core."""

    def __init__(self):
        self._startup = []

    def connect(self, signal, slot):
        self._startup.append(slot)
        return True

    def processEvents(self):
        """Runs Qt's queued events (the module's QTimer polls its jobs) when a Qt application exists."""
        from PySide6 import QtWidgets

        if QtWidgets.QApplication.instance() is not None:
            QtWidgets.QApplication.processEvents()

    def testingEnabled(self):
        return True

    def layoutManager(self):
        return None


# qSlicerSegmentEditorAbstractEffect::ModificationMode (EditorEffects/qSlicerSegmentEditorAbstractEffect.h).
# The adaptor casts it to vtkSlicerSegmentEditorLogic::ModificationMode; tests hold the two equal.
ABSTRACT_EFFECT_MODES = {"ModificationModeSet": 0, "ModificationModeAdd": 1, "ModificationModeRemove": 2,
                         "ModificationModeRemoveAll": 3}


class CoreScriptedEffect:
    """The parts of qSlicerSegmentEditorScriptedEffect / qSlicerSegmentEditorAbstractEffect the RCMed effect
    calls, each forwarding to the real vtkSlicerSegmentEditorLogic (signatures held by test_slicer_core.py)."""

    def __init__(self, editorLogic, editorNode):
        self._logic = editorLogic
        self._node = editorNode
        self.name = ""
        self.perSegment = False
        self.requireSegments = False
        self.widgets = []

    # options frame (Qt): kept as a list; the tests do not build the panel here
    def addOptionsWidget(self, widget):
        self.widgets.append(widget)

    def addLabeledOptionsWidget(self, label, widget):
        self.widgets.append((label, widget))

    def parameterSetNode(self):
        return self._node

    # effect parameters live on the segment editor node as "<effect name>.<parameter>" attributes
    def _key(self, name):
        return f"{self.name}.{name}"

    def parameter(self, name):
        return self._node.GetAttribute(self._key(name)) or ""

    def parameterDefined(self, name):
        return self._node.GetAttribute(self._key(name)) is not None

    def setParameter(self, name, value):
        self._node.SetAttribute(self._key(name), str(value))

    def setParameterDefault(self, name, value):
        if not self.parameterDefined(name):
            self.setParameter(name, value)

    # segment data: all through vtkSlicerSegmentEditorLogic
    def sourceVolumeImageData(self):
        self._logic.UpdateAlignedSourceVolume()
        return self._logic.GetAlignedSourceVolume()

    def selectedSegmentLabelmap(self):
        self._logic.UpdateSelectedSegmentLabelmap()
        return self._logic.GetSelectedSegmentLabelmap()

    def saveStateForUndo(self):
        self._logic.SaveStateForUndo()

    # views: what qSlicerSegmentEditorAbstractEffect does with a qMRMLSliceWidget, on the real slice node
    @staticmethod
    def viewNode(viewWidget):
        """qSlicerSegmentEditorAbstractEffect::viewNode: a slice widget's sliceLogic()->GetSliceNode()."""
        if viewWidget is None:
            return None
        return viewWidget.sliceLogic().GetSliceNode()

    @staticmethod
    def xyToRas(xy, sliceWidget):
        """qSlicerSegmentEditorAbstractEffect::xyToRas(QPoint, qMRMLSliceWidget*): (x, y, 0) through the real
        vtkSlicerSegmentEditorLogic::XyzToRas on the widget's slice node, as a QVector3D."""
        import qt
        import slicer

        ras = [0.0, 0.0, 0.0]
        slicer.vtkSlicerSegmentEditorLogic.XyzToRas([float(xy.x()), float(xy.y()), 0.0], ras,
                                                   CoreScriptedEffect.viewNode(sliceWidget))
        return qt.QVector3D(*ras)

    def _mode(self, value):
        """qSlicerSegmentEditorAbstractEffect::ModificationMode -> vtkSlicerSegmentEditorLogic::ModificationMode."""
        name = {v: k for k, v in ABSTRACT_EFFECT_MODES.items()}[int(value)]
        return getattr(type(self._logic), name)

    def modifySelectedSegmentByLabelmap(self, modifierLabelmap, modificationMode, extent=None, bypassMasking=False):
        if extent is None:
            extent = [0, -1, 0, -1, 0, -1]
        if isinstance(extent, bool):  # the (labelmap, mode, bypassMasking) overload
            extent, bypassMasking = [0, -1, 0, -1, 0, -1], extent
        if len(extent) != 6:
            raise ValueError("extent must have 6 int values")
        self._logic.ModifySegmentByLabelmap(self._node.GetSegmentationNode(), self._node.GetSelectedSegmentID() or "",
                                            modifierLabelmap, self._mode(modificationMode),
                                            [int(v) for v in extent],
                                            bool(self.perSegment), bool(bypassMasking))


def _load_standin(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def start():
    """Import slicer-core's ``slicer`` with a fresh scene, and the RCMed module on top of it."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    saved_path = list(sys.path)
    _purge()
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != STANDINS.resolve()]
    import slicer  # slicer-core's package, not the stand-in

    if getattr(slicer, "STANDIN", False) or not hasattr(slicer, "vtkSlicerSegmentEditorLogic"):
        raise ImportError(f"slicer-core is not the imported slicer ({slicer.__file__})")
    import slicer.util  # Slicer's own util.py, shipped in the wheel

    scene = slicer.vtkMRMLScene()
    segmentationsLogic = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentationsLogic.SetMRMLScene(scene)  # RegisterNodes: editor node class, converter rules
    terminologiesLogic = slicer.vtkSlicerTerminologiesModuleLogic()
    # no SetMRMLScene: that loads the default terminology files, which the wheel does not ship (Slicer's share/)
    segmentationsLogic.SetTerminologiesLogic(terminologiesLogic) if hasattr(
        segmentationsLogic, "SetTerminologiesLogic") else None
    volumesLogic = slicer.vtkSlicerVolumesLogic()
    volumesLogic.SetMRMLScene(scene)
    slicer.mrmlScene = scene
    slicer.app = _App()
    slicer.modules = SimpleNamespace(
        segmentations=SimpleNamespace(logic=lambda: segmentationsLogic),
        volumes=SimpleNamespace(logic=lambda: volumesLogic),
        terminologies=SimpleNamespace(logic=lambda: terminologiesLogic))
    slicer.qSlicerSegmentEditorAbstractEffect = SimpleNamespace(**ABSTRACT_EFFECT_MODES)

    # glue the core lacks: Qt (PySide6) and the scripted-module Python classes, from the stand-ins
    sys.path.append(str(STANDINS))
    sys.path.insert(0, str(MODULE_DIR))
    import ctk  # noqa: F401
    import qt  # noqa: F401
    slicer.ScriptedLoadableModule = _load_standin("slicer.ScriptedLoadableModule",
                                                  STANDINS / "slicer" / "ScriptedLoadableModule.py")
    slicer.parameterNodeWrapper = _load_standin("slicer.parameterNodeWrapper",
                                                STANDINS / "slicer" / "parameterNodeWrapper" / "__init__.py")
    import RCMedSlicer
    from SegmentEditorRCMedLib import SegmentEditorEffect as effectModule

    def stop():
        from RCMedSlicerLib import engines

        engines.SHARED_CACHE.clear()
        scene.Clear(1)
        _purge()
        sys.path[:] = saved_path

    return SimpleNamespace(slicer=slicer, scene=scene, segmentationsLogic=segmentationsLogic,
                           terminologiesLogic=terminologiesLogic, RCMedSlicer=RCMedSlicer,
                           effectModule=effectModule, stop=stop)


def make_editor(env, segmentationNode, sourceVolumeNode):
    """A real segment editor node and logic bound to a segmentation and source volume, as the editor widget does."""
    slicer = env.slicer
    node = env.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    logic = slicer.vtkSlicerSegmentEditorLogic()
    logic.SetMRMLScene(env.scene)
    logic.SetSegmentEditorNode(node)
    node.SetAndObserveSegmentationNode(segmentationNode)
    node.SetAndObserveSourceVolumeNode(sourceVolumeNode)
    return node, logic


def add_slice_node(env, name="Red"):
    """A slice node as Slicer's layout creates it: singleton tag = layout name, so its ID is vtkMRMLSliceNode<name>."""
    node = env.slicer.vtkMRMLSliceNode()
    node.SetLayoutName(name)
    node.SetSingletonTag(name)
    if hasattr(env.slicer.vtkMRMLSliceNode, "AddDefaultSliceOrientationPresets"):
        env.slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(env.scene)
    env.scene.AddNode(node)
    return node


class SliceWidget:
    """What the effect touches of a qMRMLSliceWidget (a Qt widget, absent from slicer-core): PythonQt's
    ``className()`` and ``sliceLogic()`` (a real vtkMRMLSliceLogic on a real slice node)."""

    def __init__(self, env, sliceNode):
        self._logic = env.slicer.vtkMRMLSliceLogic()
        self._logic.SetMRMLScene(env.scene)
        self._logic.SetSliceNode(sliceNode)

    def className(self):
        return "qMRMLSliceWidget"

    def sliceLogic(self):
        return self._logic

    def mrmlSliceNode(self):
        return self._logic.GetSliceNode()


def qt_application():
    """A PySide6 application (offscreen): the effect's options widgets and the job poller's QTimer need one."""
    from PySide6 import QtWidgets

    return QtWidgets.QApplication.instance() or QtWidgets.QApplication(["rcmed-slicer-core"])


def make_effect_with_options(env, editorNode, editorLogic):
    """The effect with its real options frame (Qt widgets), defaults on the editor node, as the editor activates it."""
    qt_application()
    adaptor = CoreScriptedEffect(editorLogic, editorNode)
    effect = env.effectModule.SegmentEditorEffect(adaptor)
    effect.setupOptionsFrame()
    effect.setMRMLDefaults()
    effect.updateGUIFromMRML()
    return effect, adaptor


def make_effect(env, editorNode, editorLogic):
    """The RCMed effect wrapped by the adaptor, as Slicer's effect factory builds it (without its options panel)."""
    adaptor = CoreScriptedEffect(editorLogic, editorNode)
    effect = env.effectModule.SegmentEditorEffect(adaptor)
    effect.statusLabel = SimpleNamespace(text="")
    return effect, adaptor
