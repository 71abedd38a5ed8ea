"""STAND-IN Slicer widgets and Segment Editor machinery (test use only).

* ``qMRMLWidget``: a widget with ``setMRMLScene`` and the ``mrmlSceneChanged(vtkMRMLScene*)`` signal that
  ``.ui`` files connect to their MRML widgets.
* ``qMRMLNodeComboBox``: node selector with the properties Slicer modules set (``nodeTypes``,
  ``noneEnabled``, ``addEnabled``, ``baseName``...), ``currentNode()``/``setCurrentNode()``, ``addNode()``
  and ``currentNodeChanged(vtkMRMLNode*)``.
* ``qMRMLSegmentEditorWidget`` with ``qSlicerSegmentEditorScriptedEffect`` (the C++ adaptor of scripted
  effects) and ``qSlicerSegmentEditorEffectFactory``: effects are loaded from their Python source, cloned
  per editor, get an options frame and parameters stored on the segment editor node, and edit the selected
  segment through ``modifySelectedSegmentByLabelmap``, which applies the editor's editable area (mask mode,
  mask segment, source intensity range) and "modify other segments" (overwrite) settings, as Slicer does.
  ``saveStateForUndo``/``undo``/``redo`` snapshot the segmentation.
"""

from __future__ import annotations

import importlib.util
import itertools
import os

import numpy as np
import vtk
from PySide6 import QtCore, QtWidgets

import qt
from qt import PythonQtMixin, lay_out_in_row

from .mrml import vtkMRMLSegmentEditorNode, matrix_to_numpy
from .segmentation import (extent_matrix, image_to_numpy, make_oriented, resample_nearest)


def _world(node) -> np.ndarray:
    t = node.GetParentTransformNode() if node is not None else None
    if t is None:
        return np.eye(4)
    m = vtk.vtkMatrix4x4()
    if not t.GetMatrixTransformToWorld(m):
        raise RuntimeError("stand-in: non-linear transform")
    return matrix_to_numpy(m)


class qMRMLWidget(PythonQtMixin, QtWidgets.QWidget):
    mrmlSceneChanged = QtCore.Signal(object)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._scene = None

    def setMRMLScene(self, scene):
        self._scene = scene
        self.mrmlSceneChanged.emit(scene)

    def mrmlScene(self):
        return self._scene


class qMRMLNodeComboBox(PythonQtMixin, QtWidgets.QWidget):
    currentNodeChanged = QtCore.Signal(object)
    currentNodeIDChanged = QtCore.Signal(str)
    nodeAddedByUser = QtCore.Signal(object)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._combo = QtWidgets.QComboBox(self)
        lay_out_in_row(self, self._combo)
        self._nodeTypes: list[str] = []
        self._flags = {"noneEnabled": False, "addEnabled": True, "removeEnabled": True, "renameEnabled": False,
                       "editEnabled": False, "showHidden": False, "showChildNodeTypes": True,
                       "selectNodeUponCreation": True}
        self._baseName = ""
        self._noneDisplay = "None"
        self._scene = None
        self._observers: list[int] = []
        self._nodes: list = []
        self._current = None
        self._combo.currentIndexChanged.connect(self._onIndexChanged)

    # -- properties (Qt properties so .ui files can set them)
    def _getTypes(self):
        return list(self._nodeTypes)

    def _setTypes(self, types):
        self._nodeTypes = [str(t) for t in types]
        self._refresh()

    nodeTypes = QtCore.Property("QStringList", _getTypes, _setTypes)

    def _flag(name):  # noqa: N805 - property factory
        return QtCore.Property(bool, lambda s: s._flags[name], lambda s, v: s._setFlag(name, v))

    def _setFlag(self, name, value):
        self._flags[name] = bool(value)
        self._refresh()

    noneEnabled = _flag("noneEnabled")
    addEnabled = _flag("addEnabled")
    removeEnabled = _flag("removeEnabled")
    renameEnabled = _flag("renameEnabled")
    editEnabled = _flag("editEnabled")
    showHidden = _flag("showHidden")
    showChildNodeTypes = _flag("showChildNodeTypes")
    selectNodeUponCreation = _flag("selectNodeUponCreation")
    baseName = QtCore.Property(str, lambda s: s._baseName, lambda s, v: setattr(s, "_baseName", str(v)))
    noneDisplay = QtCore.Property(str, lambda s: s._noneDisplay, lambda s, v: setattr(s, "_noneDisplay", str(v)))
    currentNodeID = QtCore.Property(str, lambda s: s._current.GetID() if s._current is not None else "",
                                    lambda s, v: s.setCurrentNodeID(v))

    # -- scene
    def setMRMLScene(self, scene):
        if self._scene is not None:
            for tag in self._observers:
                self._scene.RemoveObserver(tag)
        self._observers = []
        self._scene = scene
        if scene is not None:
            for event in (scene.NodeAddedEvent, scene.NodeRemovedEvent, scene.EndCloseEvent):
                self._observers.append(scene.AddObserver(event, lambda caller, ev: self._refresh()))
        self._refresh()

    def mrmlScene(self):
        return self._scene

    def _accepts(self, node) -> bool:
        if node.GetHideFromEditors() and not self._flags["showHidden"]:
            return False
        for t in self._nodeTypes:
            if (node.IsA(t) if self._flags["showChildNodeTypes"] else node.GetClassName() == t):
                return True
        return False

    def nodes(self):
        return list(self._nodes)

    def _refresh(self):
        nodes = []
        if self._scene is not None:
            nodes = [self._scene.GetNthNode(i) for i in range(self._scene.GetNumberOfNodes())]
            nodes = [n for n in nodes if self._accepts(n)]
        self._nodes = nodes
        previous = self._current
        blocked = self._combo.blockSignals(True)
        self._combo.clear()
        if self._flags["noneEnabled"]:
            self._combo.addItem(self._noneDisplay)
        for n in nodes:
            self._combo.addItem(n.GetName())
        current = previous if previous in nodes else None
        if current is None and not self._flags["noneEnabled"] and nodes:
            current = nodes[0]
        self._current = current
        self._combo.setCurrentIndex(self._indexOf(current))
        self._combo.blockSignals(blocked)
        if current is not previous:
            self._emitChanged()

    def _indexOf(self, node) -> int:
        offset = 1 if self._flags["noneEnabled"] else 0
        if node is None:
            return 0 if self._flags["noneEnabled"] else -1
        return self._nodes.index(node) + offset

    def _onIndexChanged(self, index):
        offset = 1 if self._flags["noneEnabled"] else 0
        node = self._nodes[index - offset] if 0 <= index - offset < len(self._nodes) else None
        if node is not self._current:
            self._current = node
            self._emitChanged()

    def _emitChanged(self):
        self.currentNodeChanged.emit(self._current)
        self.currentNodeIDChanged.emit(self._current.GetID() if self._current is not None else "")

    # -- selection
    def currentNode(self):
        return self._current

    def setCurrentNode(self, node):
        if node is not None and node not in self._nodes:
            self._refresh()
            if node not in self._nodes:
                return
        if node is None and not self._flags["noneEnabled"] and self._nodes:
            return
        if node is not self._current:
            self._current = node
            blocked = self._combo.blockSignals(True)
            self._combo.setCurrentIndex(self._indexOf(node))
            self._combo.blockSignals(blocked)
            self._emitChanged()

    def setCurrentNodeID(self, nodeId):
        self.setCurrentNode(self._scene.GetNodeByID(nodeId) if (self._scene is not None and nodeId) else None)

    def addNode(self, nodeType=None):
        if self._scene is None or not self._nodeTypes:
            return None
        className = nodeType or self._nodeTypes[0]
        base = self._baseName or className.replace("vtkMRML", "").replace("Node", "")
        names = {n.GetName() for n in self._nodes}
        name = base if base not in names else next(f"{base}_{i}" for i in itertools.count(1)
                                                       if f"{base}_{i}" not in names)
        node = self._scene.AddNewNodeByClass(className, name)
        node.CreateDefaultDisplayNodes()
        if self._flags["selectNodeUponCreation"]:
            self.setCurrentNode(node)
        self.nodeAddedByUser.emit(node)
        return node


# ------------------------------------------------------------------------------------------ segment editor
class qSlicerSegmentEditorAbstractEffect(QtCore.QObject):
    ModificationModeSet = 0
    ModificationModeAdd = 1
    ModificationModeRemove = 2
    ModificationModeRemoveAll = 3


class qSlicerSegmentEditorEffectFactory:
    _instance = None

    def __init__(self):
        self._effects: dict[str, object] = {}

    @classmethod
    def instance(cls):
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def registerEffect(self, effect) -> bool:
        if not effect.name or effect.name in self._effects:
            return False
        self._effects[effect.name] = effect
        return True

    def registeredEffects(self):
        return list(self._effects.values())

    def effectByName(self, name):
        return self._effects.get(name)

    def reset(self):
        self._effects.clear()


_source_counter = itertools.count()


class qSlicerSegmentEditorScriptedEffect(PythonQtMixin, qSlicerSegmentEditorAbstractEffect):
    """The adaptor between the Segment Editor and an effect written in Python."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.name = ""
        self.perSegment = True
        self.requireSegments = True
        self._python = None
        self._source = ""
        self._parameterSetNode = None
        self._editor = None
        self._optionsFrame = QtWidgets.QFrame()
        self._optionsLayout = QtWidgets.QFormLayout(self._optionsFrame)
        self._active = False

    # -- Python side
    def setPythonSource(self, filePath) -> bool:
        if not os.path.isfile(filePath):
            return False
        spec = importlib.util.spec_from_file_location(f"_standin_effect_{next(_source_counter)}", filePath)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        self._source = filePath
        self._python = module.SegmentEditorEffect(self)
        return True

    def pythonSource(self):
        return self._source

    def self(self):  # noqa: PLE0202 - PythonQt exposes the Python effect as self()
        return self._python

    # -- options
    def optionsFrame(self):
        return self._optionsFrame

    def addOptionsWidget(self, widget):
        if isinstance(widget, QtWidgets.QLayout):
            self._optionsLayout.addRow(widget)
        else:
            self._optionsLayout.addRow(widget)

    def addLabeledOptionsWidget(self, label, widget):
        self._optionsLayout.addRow(label, widget)
        return self._optionsLayout.labelForField(widget)

    # -- parameters (stored on the segment editor node, prefixed by the effect name)
    def parameterSetNode(self):
        return self._parameterSetNode

    def setParameterSetNode(self, node):
        self._parameterSetNode = node

    def _key(self, name):
        return f"{self.name}.{name}"

    def parameter(self, name) -> str:
        node = self._parameterSetNode
        return (node.GetAttribute(self._key(name)) or "") if node is not None else ""

    def parameterDefined(self, name) -> bool:
        node = self._parameterSetNode
        return node is not None and node.GetAttribute(self._key(name)) is not None

    def integerParameter(self, name) -> int:
        try:
            return int(float(self.parameter(name)))
        except ValueError:
            return 0

    def doubleParameter(self, name) -> float:
        try:
            return float(self.parameter(name))
        except ValueError:
            return 0.0

    def setParameter(self, name, value):
        if self._parameterSetNode is not None:
            self._parameterSetNode.SetAttribute(self._key(name), str(value))

    def setParameterDefault(self, name, value):
        if not self.parameterDefined(name):
            self.setParameter(name, value)

    def setCommonParameter(self, name, value):
        if self._parameterSetNode is not None:
            self._parameterSetNode.SetAttribute(name, str(value))

    def commonParameter(self, name):
        node = self._parameterSetNode
        return (node.GetAttribute(name) or "") if node is not None else ""

    # -- GUI sync
    def updateGUIFromMRML(self):
        if self._python is not None and hasattr(self._python, "updateGUIFromMRML"):
            self._python.updateGUIFromMRML()

    def updateMRMLFromGUI(self):
        if self._python is not None and hasattr(self._python, "updateMRMLFromGUI"):
            self._python.updateMRMLFromGUI()

    # -- image data
    def _segmentationNode(self):
        return self._parameterSetNode.GetSegmentationNode() if self._parameterSetNode is not None else None

    def _ensureReference(self):
        segNode = self._segmentationNode()
        if segNode is None:
            return None
        seg = segNode.GetSegmentation()
        if seg.reference() is None:
            src = self._parameterSetNode.GetSourceVolumeNode()
            if src is not None:
                segNode.SetReferenceImageGeometryParameterFromVolumeNode(src)
        return seg if seg.reference() is not None else None

    def sourceVolumeImageData(self):
        """The source volume's voxels on the segmentation's reference lattice (segmentation coordinates)."""
        seg = self._ensureReference()
        src = self._parameterSetNode.GetSourceVolumeNode() if self._parameterSetNode is not None else None
        if seg is None or src is None or src.GetImageData() is None:
            return None
        segNode = self._segmentationNode()
        vol_index_to_seg = np.linalg.inv(_world(segNode)) @ _world(src) @ src._ijkToRas()
        values, _ = resample_nearest(image_to_numpy(src.GetImageData()), vol_index_to_seg,
                                     seg.referenceShape(), seg.referenceIndexToWorld())
        return make_oriented(values, *seg.reference())

    masterVolumeImageData = sourceVolumeImageData  # name before Slicer 5.2

    def defaultModifierLabelmap(self):
        seg = self._ensureReference()
        if seg is None:
            return None
        return make_oriented(np.zeros(seg.referenceShape(), dtype=np.uint8), *seg.reference())

    def selectedSegmentLabelmap(self):
        seg = self._ensureReference()
        sid = self._parameterSetNode.GetSelectedSegmentID() if self._parameterSetNode is not None else ""
        if seg is None or not sid or seg.GetSegment(sid) is None:
            return None
        return make_oriented(seg.maskOf(sid).astype(np.uint8), *seg.reference())

    def _editableArea(self, seg, selected) -> np.ndarray:
        node = self._parameterSetNode
        shape = seg.referenceShape()
        segNode = self._segmentationNode()
        display = segNode.GetDisplayNode()
        others = [sid for sid in seg.GetSegmentIDs() if sid != selected]
        visible = [sid for sid in others if display is None or display.GetSegmentVisibility(sid)]

        def union(ids):
            u = np.zeros(shape, dtype=bool)
            for sid in ids:
                u |= seg.maskOf(sid).astype(bool)
            return u

        mode = node.GetMaskMode()
        E = vtkMRMLSegmentEditorNode
        if mode == E.PaintAllowedEverywhere:
            area = np.ones(shape, dtype=bool)
        elif mode == E.PaintAllowedInsideAllSegments:
            area = union(others)
        elif mode == E.PaintAllowedInsideVisibleSegments:
            area = union(visible)
        elif mode == E.PaintAllowedOutsideAllSegments:
            area = ~union(others)
        elif mode == E.PaintAllowedOutsideVisibleSegments:
            area = ~union(visible)
        elif mode == E.PaintAllowedInsideSingleSegment:
            mid = node.GetMaskSegmentID()
            area = seg.maskOf(mid).astype(bool) if seg.GetSegment(mid) is not None else np.zeros(shape, bool)
        else:
            raise ValueError(f"stand-in: unknown mask mode {mode}")
        if node.GetSourceVolumeIntensityMask():
            lo, hi = node.GetSourceVolumeIntensityMaskRange()
            src = image_to_numpy(self.sourceVolumeImageData())
            area &= (src >= lo) & (src <= hi)
        return area

    def modifySelectedSegmentByLabelmap(self, modifierLabelmap, modificationMode, *args):
        # Overloads: (labelmap, mode[, bypassMasking]) and (labelmap, mode, modificationExtent[, bypassMasking])
        bypassMasking = bool(args[-1]) if args and isinstance(args[-1], bool) else False
        modificationExtent = args[0] if args and not isinstance(args[0], bool) else None
        seg = self._ensureReference()
        node = self._parameterSetNode
        selected = node.GetSelectedSegmentID()
        if seg is None or seg.GetSegment(selected) is None:
            raise RuntimeError("stand-in: no segmentation or no selected segment")
        values, inside = resample_nearest((image_to_numpy(modifierLabelmap) != 0).astype(np.uint8),
                                          extent_matrix(modifierLabelmap.imageToWorld(), modifierLabelmap.GetExtent()),
                                          seg.referenceShape(), seg.referenceIndexToWorld())
        new = values.astype(bool) & inside
        editable = np.ones(seg.referenceShape(), bool) if bypassMasking else self._editableArea(seg, selected)
        region = inside.copy()  # voxels outside the modifier's extent are not modified
        if modificationExtent is not None:  # only voxels inside the extent (IJK of the modifier) change
            e = [int(v) for v in modificationExtent]
            ext = modifierLabelmap.GetExtent()
            indicator = np.zeros(image_to_numpy(modifierLabelmap).shape, dtype=np.uint8)
            lo = [max(e[2 * d], ext[2 * d]) - ext[2 * d] for d in range(3)]
            hi = [min(e[2 * d + 1], ext[2 * d + 1]) - ext[2 * d] for d in range(3)]
            if all(lo[d] <= hi[d] for d in range(3)):
                indicator[lo[2]:hi[2] + 1, lo[1]:hi[1] + 1, lo[0]:hi[0] + 1] = 1
            inExtent, _ = resample_nearest(indicator, extent_matrix(modifierLabelmap.imageToWorld(), ext),
                                           seg.referenceShape(), seg.referenceIndexToWorld())
            region &= inExtent.astype(bool)
        area = editable & region
        A = qSlicerSegmentEditorAbstractEffect
        current = seg.maskOf(selected).astype(bool).copy()
        if modificationMode == A.ModificationModeSet:
            # As vtkSlicerSegmentEditorLogic::ModifySegmentByLabelmap: the segment's voxels outside the editable
            # area join the modifier, the whole segment is cleared (no extent), then the modifier is written
            # within the extent; so with an extent, Set empties the segment outside it.
            modifier = (new & editable) | (current & ~editable)
            current = modifier & region
            added = current
        elif modificationMode == A.ModificationModeAdd:
            added = new & area
            current |= added
        elif modificationMode in (A.ModificationModeRemove, A.ModificationModeRemoveAll):
            added = None
            current &= ~(new & area)
        else:
            raise ValueError(f"stand-in: unknown modification mode {modificationMode}")
        seg.GetSegment(selected)._mask = current.astype(np.uint8)
        # "Modify other segments": the others are erased under the (masked) modifier, within the extent
        display = self._segmentationNode().GetDisplayNode()
        for sid in seg.GetSegmentIDs():
            if sid == selected:
                continue
            other = seg.GetSegment(sid)
            if modificationMode == A.ModificationModeRemoveAll:
                other._mask = (seg.maskOf(sid).astype(bool) & ~(new & area)).astype(np.uint8)
                continue
            if added is None or bypassMasking or node.GetOverwriteMode() == vtkMRMLSegmentEditorNode.OverwriteNone:
                continue
            if (node.GetOverwriteMode() == vtkMRMLSegmentEditorNode.OverwriteVisibleSegments
                    and display is not None and not display.GetSegmentVisibility(sid)):
                continue
            if other._mask is not None:
                other._mask = (other._mask.astype(bool) & ~added).astype(np.uint8)
        self._segmentationNode().Modified()

    # -- undo
    def saveStateForUndo(self):
        if self._editor is not None:
            self._editor.saveStateForUndo()

    # -- views (qSlicerSegmentEditorAbstractEffect::viewNode / xyToRas, static in Slicer)
    @staticmethod
    def viewNode(viewWidget):
        return None if viewWidget is None else viewWidget.sliceLogic().GetSliceNode()

    @staticmethod
    def xyToRas(xy, sliceWidget):
        """(x, y, 0, 1) through the slice node's XYToRAS, as vtkSlicerSegmentEditorLogic::XyzToRas does."""
        m = qSlicerSegmentEditorScriptedEffect.viewNode(sliceWidget).GetXYToRAS()
        ras = m.MultiplyPoint([float(xy.x()), float(xy.y()), 0.0, 1.0])
        return qt.QVector3D(ras[0], ras[1], ras[2])

    # -- misc adaptor API
    def cursor(self):
        return qt.QCursor()

    def selectEffect(self, name):
        if self._editor is not None:
            self._editor.setActiveEffectByName(name)


class qMRMLSegmentEditorWidget(qMRMLWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        layout = QtWidgets.QVBoxLayout(self)
        self._optionsHolder = QtWidgets.QWidget(self)
        self._optionsHolderLayout = QtWidgets.QVBoxLayout(self._optionsHolder)
        layout.addWidget(self._optionsHolder)
        self._node = None
        self._effects: dict[str, qSlicerSegmentEditorScriptedEffect] = {}
        self._active = None
        self._undo: list = []
        self._redo: list = []
        self.maximumNumberOfUndoStates = 10

    def setMRMLSegmentEditorNode(self, node):
        self._node = node
        for e in self._effects.values():
            e.setParameterSetNode(node)

    def mrmlSegmentEditorNode(self):
        return self._node

    def setSegmentationNode(self, node):
        self._node.SetAndObserveSegmentationNode(node)
        if node is not None:
            node.CreateDefaultDisplayNodes()
            src = self._node.GetSourceVolumeNode()
            if src is not None and node.GetSegmentation().reference() is None:
                node.SetReferenceImageGeometryParameterFromVolumeNode(src)

    def segmentationNode(self):
        return self._node.GetSegmentationNode() if self._node is not None else None

    def setSourceVolumeNode(self, node):
        self._node.SetAndObserveSourceVolumeNode(node)
        seg = self.segmentationNode()
        if seg is not None and node is not None and seg.GetSegmentation().reference() is None:
            seg.SetReferenceImageGeometryParameterFromVolumeNode(node)

    setMasterVolumeNode = setSourceVolumeNode

    def sourceVolumeNode(self):
        return self._node.GetSourceVolumeNode() if self._node is not None else None

    def setCurrentSegmentID(self, segmentId):
        self._node.SetSelectedSegmentID(segmentId)

    def currentSegmentID(self):
        return self._node.GetSelectedSegmentID()

    def effectByName(self, name):
        if name in self._effects:
            return self._effects[name]
        registered = qSlicerSegmentEditorEffectFactory.instance().effectByName(name)
        if registered is None:
            return None
        effect = registered.self().clone()
        effect._editor = self
        effect.setParameterSetNode(self._node)
        effect.self().setupOptionsFrame()
        self._optionsHolderLayout.addWidget(effect.optionsFrame())
        effect.optionsFrame().setVisible(False)
        self._effects[name] = effect
        return effect

    def setActiveEffectByName(self, name):
        effect = self.effectByName(name) if name else None
        if self._active is not None and self._active is not effect:
            self._active.optionsFrame().setVisible(False)
            self._active._active = False
            if hasattr(self._active.self(), "deactivate"):
                self._active.self().deactivate()
        self._active = effect
        if effect is not None:
            py = effect.self()
            if hasattr(py, "setMRMLDefaults"):
                py.setMRMLDefaults()
            effect.optionsFrame().setVisible(True)
            effect._active = True
            if hasattr(py, "activate"):
                py.activate()
            effect.updateGUIFromMRML()

    def activeEffect(self):
        return self._active

    # -- undo/redo
    def saveStateForUndo(self):
        seg = self.segmentationNode()
        if seg is None:
            return
        self._undo.append(seg.GetSegmentation().snapshot())
        del self._undo[:-self.maximumNumberOfUndoStates]
        self._redo.clear()

    def undoStatesCount(self):
        return len(self._undo)

    def undo(self):
        self._step(self._undo, self._redo)

    def redo(self):
        self._step(self._redo, self._undo)

    def _step(self, back, forth):
        """Restore the newest state of ``back``, keeping the current one on ``forth`` (undo and redo mirrored)."""
        seg = self.segmentationNode()
        if seg is None or not back:
            return
        forth.append(seg.GetSegmentation().snapshot())
        seg.GetSegmentation().restore(back.pop())
        seg.Modified()


for _cls in (qMRMLWidget, qMRMLNodeComboBox, qMRMLSegmentEditorWidget):
    qt.add_pythonqt_properties(_cls)


def wrapped_classes() -> dict[str, type]:
    return {"qMRMLWidget": qMRMLWidget, "qMRMLNodeComboBox": qMRMLNodeComboBox,
            "qMRMLSegmentEditorWidget": qMRMLSegmentEditorWidget}
