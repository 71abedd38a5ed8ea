"""STAND-IN for 3D Slicer's ``slicer`` Python package. Test use only: NOT 3D Slicer.

It lets the RCMed scripted module and Segment Editor effect run under plain pytest, off screen (PySide6 for
Qt, the ``vtk`` wheel for VTK). It reproduces the parts of Slicer's API they use, with the names, signatures
and behaviour Slicer's source defines (see ``Testing/SlicerStandIns/README.md`` for the list and for what is
simplified). Import it only from test code, after putting ``Testing/SlicerStandIns`` on ``sys.path``.
"""

from __future__ import annotations

import os
import tempfile
import types

import vtk
from PySide6 import QtWidgets

import qt

STANDIN = True  # lets code and tests tell the stand-in from Slicer

from . import mrml, segmentation, widgets  # noqa: E402
from .mrml import (  # noqa: E402,F401
    vtkMRMLDisplayNode, vtkMRMLGridTransformNode, vtkMRMLLabelMapVolumeNode, vtkMRMLLinearTransformNode,
    vtkMRMLNode, vtkMRMLScalarVolumeNode, vtkMRMLScene, vtkMRMLScriptedModuleNode, vtkMRMLSegmentEditorNode,
    vtkMRMLSliceNode, vtkMRMLTransformableNode, vtkMRMLTransformNode, vtkMRMLVolumeNode)
from .segmentation import (  # noqa: E402,F401
    vtkMRMLSegmentationDisplayNode, vtkMRMLSegmentationNode, vtkOrientedImageData, vtkSegment, vtkSegmentation,
    vtkSlicerSegmentationsModuleLogic)
from .widgets import (  # noqa: E402,F401
    qMRMLNodeComboBox, qMRMLSegmentEditorWidget, qMRMLWidget, qSlicerSegmentEditorAbstractEffect,
    qSlicerSegmentEditorEffectFactory, qSlicerSegmentEditorScriptedEffect)


class _ModuleManager(qt.PythonQtMixin, qt.QObject):
    from PySide6.QtCore import Signal as _Signal
    moduleAboutToBeUnloaded = _Signal(str)


class _Application:
    """What ``slicer.app`` offers that the extension uses."""

    def __init__(self) -> None:
        self._startup: list = []
        self._moduleManager = _ModuleManager()
        self.temporaryPath = tempfile.mkdtemp(prefix="slicer-standin-")
        self.exitCode = None
        self.slicerHome = os.path.dirname(__file__)

    # PythonQt-style connection to the application's signals
    def connect(self, signal, slot):
        if signal.startswith("startupCompleted"):
            self._startup.append(slot)
        return True

    def emitStartupCompleted(self) -> None:
        """Stand-in helper: what Slicer does once at the end of its start-up."""
        for slot in list(self._startup):
            slot()

    def moduleManager(self):
        return self._moduleManager

    def processEvents(self) -> None:
        QtWidgets.QApplication.processEvents()

    testing = False  # Slicer's --testing; tests set it

    def testingEnabled(self) -> bool:
        return bool(self.testing)

    def setOverrideCursor(self, cursor) -> None:
        QtWidgets.QApplication.setOverrideCursor(cursor)

    def restoreOverrideCursor(self) -> None:
        QtWidgets.QApplication.restoreOverrideCursor()

    def layoutManager(self):
        return None  # as with --no-main-window

    def settings(self):
        return qt.QSettings()

    userSettings = settings

    def exit(self, status=0) -> None:
        self.exitCode = int(status)

    def restart(self) -> None:
        pass


app = _Application()
mrmlScene = vtkMRMLScene()
modules = types.SimpleNamespace()
vtkCommand = vtk.vtkCommand


class qSlicerScriptedLoadableModuleWidget(qMRMLWidget):
    """The panel Slicer creates for a scripted module; the module's Widget class fills it."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setLayout(qt.QVBoxLayout())
        self.isEntered = False


class qSlicerScriptedLoadableModule:
    """How Slicer loads a scripted module: import ``<Name>.py`` from its folder, construct ``<Name>(parent)``
    with this object as ``parent`` (title, categories, path...), expose it as ``slicer.modules.<name>``;
    the panel is built on first ``widgetRepresentation()``."""

    def __init__(self, path):
        import importlib
        import sys

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
        setattr(modules, self.name.lower(), self)
        setattr(modules, self.name + "Instance", self.instance)

    def widgetRepresentation(self):
        if self._widget is None:
            parent = qSlicerScriptedLoadableModuleWidget()
            parent.setMRMLScene(mrmlScene)
            widget = getattr(self.pythonModule, self.name + "Widget")(parent)
            widget.setup()
            setattr(modules, self.name + "Widget", widget)
            self._widget = widget
            parent.isEntered = True
            if hasattr(widget, "enter"):
                widget.enter()
        return self._widget.parent

    def widget(self):
        self.widgetRepresentation()
        return self._widget


def _addSliceNodes(scene) -> None:
    """The three slice views' nodes, as Slicer's layout creates them (IDs vtkMRMLSliceNodeRed...)."""
    for name, orientation in (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal")):
        if scene.GetNodeByID("vtkMRMLSliceNode" + name) is None:
            node = vtkMRMLSliceNode()
            node._id = "vtkMRMLSliceNode" + name
            node._name = name
            node.SetSingletonTag(name)
            node.SetOrientation(orientation)
            scene.AddNode(node)


_addSliceNodes(mrmlScene)

from . import util  # noqa: E402
from . import packaging  # noqa: E402,F401
