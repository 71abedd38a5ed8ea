"""STAND-IN for the parts of ``slicer.util`` that need Slicer's Qt application (test use only), with the
signatures of Slicer's ``Base/Python/slicer/util.py``. slicer-core ships Slicer's own util.py (array helpers,
VTKObservationMixin, NodeModify...); Testing/SlicerCoreGlue replaces in it only the names in ``OVERRIDES``:
the dialogs, .ui loading (Slicer's CTK/qMRML classes become the stand-in widgets), pip and exit.

Dialogs do not block: ``errorDisplay``/``warningDisplay``/``infoDisplay`` append to ``displayLog``;
``confirmOkCancelDisplay``/``confirmYesNoDisplay`` append too and return ``confirmAnswer`` (tests set it).
``pip_install`` records its argument in ``pipInstallCalls`` instead of installing.
"""

from __future__ import annotations

import contextlib
import os
import types
import xml.etree.ElementTree as ET

from PySide6 import QtCore, QtUiTools

import ctk
import qt

OVERRIDES = ("loadUI", "childWidgetVariables", "findChild", "exit", "mainWindow", "setSliceViewerLayers",
             "resetSliceViews", "delayDisplay", "errorDisplay", "warningDisplay", "infoDisplay", "messageBox",
             "confirmOkCancelDisplay", "confirmYesNoDisplay", "tryWithErrorDisplay", "MessageDialog", "pip_install",
             "modulePath")

displayLog: list[tuple[str, str]] = []
confirmAnswer = True
pipInstallCalls: list[str] = []

SlicerParameterNamePropertyName = "SlicerParameterName"


# ------------------------------------------------------------------------------------------------ UI
class _Loader(QtUiTools.QUiLoader):
    def createWidget(self, className, parent=None, name=""):
        import slicer
        classes = {**qt.wrapped_classes(), **ctk.wrapped_classes(), **slicer.widgets.wrapped_classes()}
        klass = classes.get(className)
        if klass is None:
            return super().createWidget(className, parent, name)
        widget = klass(parent)
        widget.setObjectName(name)
        return widget


def loadUI(path):
    """Load a Qt Designer .ui file; Slicer (qMRML*, ctk*) classes become the stand-in widgets.

    ``<connections>`` between them (e.g. ``mrmlSceneChanged(vtkMRMLScene*)`` ->
    ``setMRMLScene(vtkMRMLScene*)``) are made in Python, as their signals are Python signals here.
    """
    tree = ET.parse(path)
    root = tree.getroot()
    connections = root.find("connections")
    wiring = []
    if connections is not None:
        for c in connections.findall("connection"):
            wiring.append(tuple(c.findtext(t) for t in ("sender", "signal", "receiver", "slot")))
        root.remove(connections)
    data = ET.tostring(root, encoding="utf-8")
    buffer = QtCore.QBuffer()
    buffer.setData(QtCore.QByteArray(data))
    buffer.open(QtCore.QIODevice.ReadOnly)
    loader = _Loader()
    loader.setWorkingDirectory(QtCore.QDir(os.path.dirname(os.path.abspath(path))))
    widget = loader.load(buffer)
    if widget is None:
        raise RuntimeError(f"stand-in loadUI could not load {path}: {loader.errorString()}")

    def find(name):
        if QtCore.QObject.objectName(widget) == name:
            return widget
        return widget.findChild(QtCore.QObject, name)

    for sender, signal, receiver, slot in wiring:
        s, r = find(sender), find(receiver)
        if s is None or r is None:
            raise RuntimeError(f"stand-in loadUI: connection {sender}->{receiver} names a missing widget")
        getattr(s, signal.split("(")[0]).connect(getattr(r, slot.split("(")[0]))
    return widget


def childWidgetVariables(widget):
    """An object with every named child widget of ``widget`` as an attribute."""
    ui = types.SimpleNamespace()
    for child in widget.findChildren(QtCore.QObject):
        name = QtCore.QObject.objectName(child)
        if name:
            setattr(ui, name, child)
    return ui


def findChild(widget, name):
    child = widget.findChild(QtCore.QObject, name)
    if child is None:
        raise RuntimeError(f"Widget named {name} does not exist or is not unique")
    return child


def exit(status=0):
    import slicer
    slicer.app.exit(status)


def mainWindow(verbose=True):
    return None


def setSliceViewerLayers(*args, **kwargs):
    pass


def resetSliceViews():
    pass


def delayDisplay(message, autoCloseMsec=1000, parent=None, **kwargs):
    displayLog.append(("delay", str(message)))


def errorDisplay(text, windowTitle=None, parent=None, standardButtons=None, **kwargs):
    displayLog.append(("error", str(text)))


def warningDisplay(text, windowTitle=None, parent=None, standardButtons=None, **kwargs):
    displayLog.append(("warning", str(text)))


def infoDisplay(text, windowTitle=None, parent=None, standardButtons=None, **kwargs):
    displayLog.append(("info", str(text)))


def messageBox(text, parent=None, **kwargs):
    displayLog.append(("message", str(text)))
    return 0


def _confirmAnswer():
    import slicer

    return bool(getattr(slicer.util, "confirmAnswer", confirmAnswer))  # tests set slicer.util.confirmAnswer


def confirmOkCancelDisplay(text, windowTitle=None, parent=None, **kwargs):
    displayLog.append(("confirm", str(text)))
    return _confirmAnswer()


def confirmYesNoDisplay(text, windowTitle=None, parent=None, **kwargs):
    displayLog.append(("confirm", str(text)))
    return _confirmAnswer()


@contextlib.contextmanager
def tryWithErrorDisplay(message=None, show=True, waitCursor=False):
    try:
        yield
    except Exception as e:
        if show:
            errorDisplay((message + "\n\n" if message else "") + str(e))
        raise


@contextlib.contextmanager
def MessageDialog(message, *args, **kwargs):
    yield


def pip_install(requirements, **kwargs):
    """Slicer 5.12+: forwards ``**kwargs`` to slicer.packaging.pip_install; recorded, not installed."""
    pipInstallCalls.append(requirements if isinstance(requirements, str) else " ".join(requirements))


def modulePath(moduleName):
    import slicer
    return getattr(slicer.modules, moduleName.lower()).path
