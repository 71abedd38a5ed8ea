"""Run the RCMed extension's Slicer code on slicer-core: Slicer's REAL C++ core from PyPI (test use only).

``slicer`` here is slicer-core's package: the real vtkMRMLScene, volume / segmentation / segment editor nodes,
vtkSlicerSegmentationsModuleLogic, vtkSlicerSegmentEditorLogic, vtkSlicerTerminologiesModuleLogic and Slicer's
own ``slicer.util``. The core has no Qt application and no widgets, so only these are added, as in Slicer's
start-up: ``slicer.mrmlScene`` with the Segmentations module's node classes and converter rules registered
(vtkSlicerSegmentationsModuleLogic::RegisterNodes), ``slicer.modules.<name>.logic()`` for the two logics used,
a minimal ``slicer.app``, and from Testing/SlicerStandIns the Python glue the core lacks: ``qt`` / ``ctk``
(PySide6), the Qt widgets (``slicer.widgets``: qMRMLNodeComboBox, the scripted-module loader, the effect
factory), the dialogs / .ui loading / pip of ``slicer.util`` (only those names are replaced in Slicer's own
util.py), ``slicer.packaging``, ``slicer.ScriptedLoadableModule``, ``slicer.parameterNodeWrapper``,
``SegmentEditorEffects``. ``slicer.util.loadVolume`` / ``saveNode`` use Slicer's reader and the node's storage
node, as the application's IO manager (absent) does.

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
         "PyTorchUtils", "qSlicerSegmentationsEditorEffectsPythonQt", "_rcmed_effect_source", "rcmed_batch_script")


def _purge() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in PURGE or name.startswith("_rcmed_effect_source"):
            del sys.modules[name]


class _App:
    """What ``slicer.app`` (qSlicerApplication, a Qt application absent from slicer-core) offers that the module,
    logic, effect and batch script touch."""

    testing = True  # Slicer's --testing; the module tests set it False, as Slicer without --testing

    def __init__(self):
        import tempfile

        self._startup = []
        self._moduleManager = None
        self.temporaryPath = tempfile.mkdtemp(prefix="rcmed-slicer-core-")
        self.exitCode = None

    def connect(self, signal, slot):
        if signal.startswith("startupCompleted"):
            self._startup.append(slot)
        return True

    def emitStartupCompleted(self):
        """What Slicer does once at the end of its start-up (qSlicerApplication::startupCompleted)."""
        for slot in list(self._startup):
            slot()

    def moduleManager(self):
        if self._moduleManager is None:
            import qt
            from PySide6.QtCore import Signal

            class ModuleManager(qt.PythonQtMixin, qt.QObject):
                moduleAboutToBeUnloaded = Signal(str)

            self._moduleManager = ModuleManager()
        return self._moduleManager

    def processEvents(self):
        """Runs Qt's queued events (the module's QTimer polls its jobs) when a Qt application exists."""
        from PySide6 import QtWidgets

        if QtWidgets.QApplication.instance() is not None:
            QtWidgets.QApplication.processEvents()

    def testingEnabled(self):
        return bool(self.testing)

    def layoutManager(self):
        return None  # as with --no-main-window

    def setOverrideCursor(self, cursor):
        from PySide6 import QtWidgets

        QtWidgets.QApplication.setOverrideCursor(cursor)

    def restoreOverrideCursor(self):
        from PySide6 import QtWidgets

        QtWidgets.QApplication.restoreOverrideCursor()

    def settings(self):
        import qt

        return qt.QSettings()

    userSettings = settings

    def exit(self, status=0):
        self.exitCode = int(status)


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


_effect_sources = iter(range(1 << 30))


class EditorScriptedEffect(CoreScriptedEffect):
    """qSlicerSegmentEditorScriptedEffect as the effect factory and the Segment Editor widget hold it: built with a
    Qt parent, its Python effect loaded by ``setPythonSource``, an options frame (Qt), and bound by the editor to
    its real segment editor node and vtkSlicerSegmentEditorLogic, which do every segment read and modification."""

    def __init__(self, parent=None):
        super().__init__(None, None)
        from PySide6 import QtWidgets

        self.perSegment = True
        self.requireSegments = True
        self._python = None
        self._source = ""
        self._editor = None
        self._optionsFrame = QtWidgets.QFrame()
        self._optionsLayout = QtWidgets.QFormLayout(self._optionsFrame)

    def setPythonSource(self, filePath):
        if not os.path.isfile(filePath):
            return False
        spec = importlib.util.spec_from_file_location(f"_rcmed_effect_source_{next(_effect_sources)}", filePath)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        self._source = filePath
        self._python = module.SegmentEditorEffect(self)
        return True

    def pythonSource(self):
        return self._source

    def self(self):  # noqa: PLE0202 - PythonQt exposes the Python effect as self()
        return self._python

    def optionsFrame(self):
        return self._optionsFrame

    def addOptionsWidget(self, widget):
        self._optionsLayout.addRow(widget)

    def addLabeledOptionsWidget(self, label, widget):
        self._optionsLayout.addRow(label, widget)
        return self._optionsLayout.labelForField(widget)

    def setParameterSetNode(self, node):
        self._node = node

    def updateGUIFromMRML(self):
        if self._python is not None and hasattr(self._python, "updateGUIFromMRML"):
            self._python.updateGUIFromMRML()

    def updateMRMLFromGUI(self):
        if self._python is not None and hasattr(self._python, "updateMRMLFromGUI"):
            self._python.updateMRMLFromGUI()

    def selectEffect(self, name):
        if self._editor is not None:
            self._editor.setActiveEffectByName(name)


class SegmentEditorWidget:
    """qMRMLSegmentEditorWidget (a Qt widget, absent from slicer-core) reduced to what the module, its self-test and
    the tests call. It holds a real vtkSlicerSegmentEditorLogic on the real segment editor node, as the widget does
    in Slicer main (qMRMLSegmentEditorWidget -> vtkSlicerSegmentEditorLogic): selection, undo and redo are the
    logic's; effects come from the effect factory, cloned per editor, with their options frame."""

    def __init__(self, parent=None):
        self._scene = None
        self._node = None
        self._logic = None
        self._effects = {}
        self._active = None

    def setMRMLScene(self, scene):
        self._scene = scene

    def setMRMLSegmentEditorNode(self, node):
        import slicer

        self._node = node
        self._logic = slicer.vtkSlicerSegmentEditorLogic()
        self._logic.SetMRMLScene(self._scene or slicer.mrmlScene)
        self._logic.SetSegmentEditorNode(node)
        for effect in self._effects.values():
            effect._logic, effect._node = self._logic, node

    def mrmlSegmentEditorNode(self):
        return self._node

    def _referenceFromSource(self):
        """A segmentation without reference geometry takes the source volume's, as the editor does on selection."""
        segmentation, source = self.segmentationNode(), self.sourceVolumeNode()
        if segmentation is None or source is None:
            return
        role = segmentation.GetReferenceImageGeometryReferenceRole()
        if not segmentation.GetNodeReference(role) and not segmentation.GetSegmentation().GetConversionParameter(
                "Reference image geometry"):
            segmentation.SetReferenceImageGeometryParameterFromVolumeNode(source)

    def setSegmentationNode(self, node):
        self._node.SetAndObserveSegmentationNode(node)
        if node is not None and node.GetDisplayNode() is None:
            node.CreateDefaultDisplayNodes()
        self._referenceFromSource()

    def segmentationNode(self):
        return self._node.GetSegmentationNode() if self._node is not None else None

    def setSourceVolumeNode(self, node):
        self._node.SetAndObserveSourceVolumeNode(node)
        self._referenceFromSource()

    def sourceVolumeNode(self):
        return self._node.GetSourceVolumeNode() if self._node is not None else None

    def setCurrentSegmentID(self, segmentId):
        self._node.SetSelectedSegmentID(segmentId)

    def currentSegmentID(self):
        return self._node.GetSelectedSegmentID()

    def effectByName(self, name):
        import slicer

        if name in self._effects:
            return self._effects[name]
        registered = slicer.qSlicerSegmentEditorEffectFactory.instance().effectByName(name)
        if registered is None:
            return None
        effect = registered.self().clone()
        effect._editor = self
        effect._logic, effect._node = self._logic, self._node
        effect.self().setupOptionsFrame()
        self._effects[name] = effect
        return effect

    def setActiveEffectByName(self, name):
        effect = self.effectByName(name) if name else None
        if self._active is not None and self._active is not effect and hasattr(self._active.self(), "deactivate"):
            self._active.self().deactivate()
        self._active = effect
        if effect is not None:
            python = effect.self()
            python.setMRMLDefaults()
            if hasattr(python, "activate"):
                python.activate()
            effect.updateGUIFromMRML()

    def activeEffect(self):
        return self._active

    def undo(self):
        self._logic.Undo()

    def redo(self):
        self._logic.Redo()


def _loadVolume(filename, properties=None, returnNode=False):
    """slicer.util.loadVolume without the application's IO manager (absent from slicer-core): Slicer's volume reader,
    vtkSlicerVolumesLogic::AddArchetypeVolume (what the IO manager's volume reader calls); raises as loadVolume does."""
    import slicer

    name = (properties or {}).get("name") or Path(str(filename)).name.split(".")[0]
    node = slicer.modules.volumes.logic().AddArchetypeVolume(str(filename), name)
    if node is None:
        if returnNode:
            return False, None
        raise RuntimeError(f"Failed to load node from file: {filename}")
    return (True, node) if returnNode else node


def _saveNode(node, filename, properties=None):
    """slicer.util.saveNode without the application's IO manager: the node's own storage node (Slicer's writer:
    vtkMRMLSegmentationStorageNode for a segmentation), as the IO manager uses it."""
    storage = node.GetStorageNode()
    if storage is None:
        node.AddDefaultStorageNode()
        storage = node.GetStorageNode()
    storage.SetFileName(str(filename))
    return bool(storage.WriteData(node))


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

    # glue the core lacks: Qt (PySide6), the Qt widgets and the scripted-module Python classes, from the stand-ins
    sys.path.append(str(STANDINS))
    sys.path.insert(0, str(MODULE_DIR))
    import ctk  # noqa: F401
    import qt  # noqa: F401
    slicer.widgets = _load_standin("slicer.widgets", STANDINS / "slicer" / "widgets.py")
    for name in ("qMRMLWidget", "qMRMLNodeComboBox", "qSlicerScriptedLoadableModule",
                 "qSlicerScriptedLoadableModuleWidget", "qSlicerSegmentEditorEffectFactory"):
        setattr(slicer, name, getattr(slicer.widgets, name))
    slicer.widgets.qSlicerSegmentEditorEffectFactory._instance = None
    slicer.qMRMLSegmentEditorWidget = SegmentEditorWidget
    sys.modules["qSlicerSegmentationsEditorEffectsPythonQt"] = SimpleNamespace(
        qSlicerSegmentEditorScriptedEffect=EditorScriptedEffect,
        qSlicerSegmentEditorAbstractEffect=slicer.qSlicerSegmentEditorAbstractEffect)
    standinUtil = _load_standin("slicer._standin_util", STANDINS / "slicer" / "util.py")
    for name in standinUtil.OVERRIDES:  # dialogs, .ui loading, pip, exit: they need the Qt application
        setattr(slicer.util, name, getattr(standinUtil, name))
    slicer.util.displayLog = standinUtil.displayLog
    slicer.util.pipInstallCalls = standinUtil.pipInstallCalls
    slicer.util.confirmAnswer = True  # what the stand-in confirmation dialogs answer; tests set it
    slicer.util.loadVolume = _loadVolume
    slicer.util.saveNode = _saveNode
    slicer.packaging = _load_standin("slicer.packaging", STANDINS / "slicer" / "packaging.py")
    slicer.ScriptedLoadableModule = _load_standin("slicer.ScriptedLoadableModule",
                                                  STANDINS / "slicer" / "ScriptedLoadableModule.py")
    slicer.parameterNodeWrapper = _load_standin("slicer.parameterNodeWrapper",
                                                STANDINS / "slicer" / "parameterNodeWrapper" / "__init__.py")
    import RCMedSlicer
    from SegmentEditorRCMedLib import SegmentEditorEffect as effectModule

    def stop():
        from RCMedSlicerLib import engines

        engines.SHARED_CACHE.clear()
        slicer.widgets.qSlicerSegmentEditorEffectFactory.instance().reset()
        scene.Clear(1)
        _purge()
        sys.path[:] = saved_path

    return SimpleNamespace(slicer=slicer, scene=scene, segmentationsLogic=segmentationsLogic,
                           terminologiesLogic=terminologiesLogic, RCMedSlicer=RCMedSlicer,
                           effectModule=effectModule, stop=stop)


def add_segmentation(env, volume, names, name="seg"):
    """A segmentation node under ``volume``'s parent transform, on its grid, with empty segments ``names``;
    returns (node, segment ids)."""
    segmentation = env.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetAndObserveTransformNodeID(volume.GetTransformNodeID())
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    seg = segmentation.GetSegmentation()
    return segmentation, [seg.AddEmptySegment("", n) for n in names]


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
    if hasattr(env.slicer.vtkMRMLSliceNode, "AddDefaultSliceOrientationPresets"):
        # the presets (Axial, Sagittal, Coronal) go to the scene's default slice node, which new nodes copy
        env.slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(env.scene)
    node = env.scene.CreateNodeByClass("vtkMRMLSliceNode")
    node.SetLayoutName(name)
    node.SetSingletonTag(name)
    return env.scene.AddNode(node)


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
