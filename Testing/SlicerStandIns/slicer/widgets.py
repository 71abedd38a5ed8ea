"""STAND-IN Slicer Qt widgets (test use only): what slicer-core (Slicer's C++ core without Qt) lacks. They work on
any scene with vtkMRMLScene's API; Testing/SlicerCoreGlue puts them on slicer-core's real scene.

* ``qMRMLWidget``: a widget with ``setMRMLScene`` and the ``mrmlSceneChanged(vtkMRMLScene*)`` signal that
  ``.ui`` files connect to their MRML widgets.
* ``qMRMLNodeComboBox``: node selector with the properties Slicer modules set (``nodeTypes``,
  ``noneEnabled``, ``addEnabled``, ``baseName``...), ``currentNode()``/``setCurrentNode()``, ``addNode()``
  and ``currentNodeChanged(vtkMRMLNode*)``.
* ``qSlicerSegmentEditorEffectFactory`` (registered effects by name) and the ModificationMode values of
  ``qSlicerSegmentEditorAbstractEffect``. The effect adaptor and the Segment Editor widget are in the glue
  (Testing/SlicerCoreGlue/rcmed_slicer_core.py): they delegate every segment read, modification and undo to
  slicer-core's real vtkSlicerSegmentEditorLogic.
* ``qSlicerScriptedLoadableModule``: how Slicer loads a scripted module and builds its panel.
"""

from __future__ import annotations

import itertools
import os

from PySide6 import QtCore, QtWidgets

import qt
from qt import PythonQtMixin, lay_out_in_row


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


class qSlicerScriptedLoadableModuleWidget(qMRMLWidget):
    """The panel Slicer creates for a scripted module; the module's Widget class fills it."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setLayout(qt.QVBoxLayout())
        self.isEntered = False


class qSlicerScriptedLoadableModule:
    """How Slicer loads a scripted module: import ``<Name>.py`` from its folder, construct ``<Name>(parent)``
    with this object as ``parent`` (title, categories, path...), expose it as ``slicer.modules.<name>``;
    the panel is built on first ``widgetRepresentation()``, on ``slicer.mrmlScene``."""

    def __init__(self, path):
        import importlib
        import sys

        import slicer

        self.path = os.path.abspath(path)
        self.name = os.path.splitext(os.path.basename(self.path))[0]
        folder = os.path.dirname(self.path)
        if folder not in sys.path:
            sys.path.insert(0, folder)
        self.pythonModule = importlib.import_module(self.name)
        self.title = self.name
        self.icon = None
        self.hidden = False
        self._widget = None
        self.instance = getattr(self.pythonModule, self.name)(self)
        setattr(slicer.modules, self.name.lower(), self)
        setattr(slicer.modules, self.name + "Instance", self.instance)

    def widgetRepresentation(self):
        import slicer

        if self._widget is None:
            parent = qSlicerScriptedLoadableModuleWidget()
            parent.setMRMLScene(slicer.mrmlScene)
            widget = getattr(self.pythonModule, self.name + "Widget")(parent)
            widget.setup()
            setattr(slicer.modules, self.name + "Widget", widget)
            self._widget = widget
            parent.isEntered = True
            if hasattr(widget, "enter"):
                widget.enter()
        return self._widget.parent

    def widget(self):
        self.widgetRepresentation()
        return self._widget


for _cls in (qMRMLWidget, qMRMLNodeComboBox):
    qt.add_pythonqt_properties(_cls)


def wrapped_classes() -> dict[str, type]:
    return {"qMRMLWidget": qMRMLWidget, "qMRMLNodeComboBox": qMRMLNodeComboBox}
