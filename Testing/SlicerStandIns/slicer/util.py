"""STAND-IN for ``slicer.util`` (test use only): the functions the RCMed extension and its tests call,
with the signatures and behaviour of Slicer's ``Base/Python/slicer/util.py``.

Dialogs do not block: ``errorDisplay``/``warningDisplay``/``infoDisplay`` append to ``displayLog``;
``confirmOkCancelDisplay``/``confirmYesNoDisplay`` append too and return ``confirmAnswer`` (tests set it).
``pip_install`` records its argument in ``pipInstallCalls`` instead of installing.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import types
import xml.etree.ElementTree as ET

import numpy as np
import vtk
from PySide6 import QtCore, QtUiTools
from vtk.util import numpy_support

import ctk
import qt

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


def confirmOkCancelDisplay(text, windowTitle=None, parent=None, **kwargs):
    displayLog.append(("confirm", str(text)))
    return bool(confirmAnswer)


def confirmYesNoDisplay(text, windowTitle=None, parent=None, **kwargs):
    displayLog.append(("confirm", str(text)))
    return bool(confirmAnswer)


@contextlib.contextmanager
def tryWithErrorDisplay(message=None, show=True, waitCursor=False):
    try:
        yield
    except Exception as e:
        if show:
            errorDisplay((message + "\n\n" if message else "") + str(e))
        raise


@contextlib.contextmanager
def NodeModify(node):
    wasModifying = node.StartModify()
    try:
        yield
    finally:
        node.EndModify(wasModifying)


@contextlib.contextmanager
def MessageDialog(message, *args, **kwargs):
    yield


class VTKObservationMixin:
    """Keeps track of VTK observers added by an object, as Slicer's mixin of the same name."""

    def __init__(self):
        super().__init__()
        self.Observations = []

    def removeObservers(self, method=None):
        for obj, event, m, group, tag, priority in list(self.Observations):
            if method is None or m == method:
                obj.RemoveObserver(tag)
                self.Observations.remove([obj, event, m, group, tag, priority])

    def addObserver(self, obj, event, method, group="none", priority=0.0):
        if self.hasObserver(obj, event, method):
            return
        tag = obj.AddObserver(event, method, priority)
        self.Observations.append([obj, event, method, group, tag, priority])

    def removeObserver(self, obj, event, method):
        for o in list(self.Observations):
            if o[0] is obj and o[1] == event and o[2] == method:
                obj.RemoveObserver(o[4])
                self.Observations.remove(o)

    def hasObserver(self, obj, event, method):
        return any(o[0] is obj and o[1] == event and o[2] == method for o in self.Observations)

    def observer(self, event, method):
        for o in self.Observations:
            if o[1] == event and o[2] == method:
                return o[0]
        return None


def pip_install(requirements, **kwargs):
    """Slicer 5.12+: forwards ``**kwargs`` to slicer.packaging.pip_install; recorded, not installed."""
    pipInstallCalls.append(requirements if isinstance(requirements, str) else " ".join(requirements))


def settingsValue(key, default, converter=lambda v: v, settings=None):
    settings = qt.QSettings() if settings is None else settings
    if settings.contains(key):
        return converter(settings.value(key))
    return default


def toBool(value):
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes", "on")
    return bool(value)


def tempDirectory(key="__SlicerTemp__", tempDir=None, includeDateTime=True):
    return tempfile.mkdtemp(prefix=key)


def modulePath(moduleName):
    import slicer
    return getattr(slicer.modules, moduleName.lower()).path


def getNode(pattern="*", index=0, scene=None):
    import fnmatch

    import slicer
    scene = slicer.mrmlScene if scene is None else scene
    nodes = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
    hits = [n for n in nodes if fnmatch.fnmatchcase(n.GetName(), pattern) or fnmatch.fnmatchcase(n.GetID(), pattern)]
    if len(hits) <= index:
        raise slicer.util.MRMLNodeNotFoundException(f"could not find nodes in the scene by name or id '{pattern}'")
    return hits[index]


class MRMLNodeNotFoundException(Exception):
    pass


def getNodesByClass(className, scene=None):
    import slicer
    scene = slicer.mrmlScene if scene is None else scene
    return [scene.GetNthNodeByClass(i, className) for i in range(scene.GetNumberOfNodesByClass(className))]


# ------------------------------------------------------------------------------------------------ arrays
def arrayFromVolume(volumeNode):
    """A numpy view (k, j, i) of a volume's voxels; changes need ``arrayFromVolumeModified``."""
    image = volumeNode.GetImageData()
    dims = image.GetDimensions()
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1])


def arrayFromVolumeModified(volumeNode):
    volumeNode.GetImageData().Modified()
    volumeNode.Modified()


def updateVolumeFromArray(volumeNode, narray):
    a = np.ascontiguousarray(narray)
    if a.ndim != 3:
        raise RuntimeError(f"stand-in updateVolumeFromArray: expected a 3D array, got shape {a.shape}")
    image = vtk.vtkImageData()
    image.SetDimensions(a.shape[2], a.shape[1], a.shape[0])
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(
        a.ravel(), deep=True, array_type=numpy_support.get_vtk_array_type(a.dtype)))
    volumeNode.SetAndObserveImageData(image)


def _world(node):
    from .widgets import _world as w
    return w(node)


def arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, referenceVolumeNode=None):
    """The segment as a (k, j, i) array on the reference volume's voxels (through parent transforms)."""
    from .segmentation import resample_nearest
    import slicer
    if referenceVolumeNode is None:
        referenceVolumeNode = segmentationNode.GetNodeReference(
            slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole())
        if referenceVolumeNode is None:
            raise RuntimeError("No reference volume is found in the input segmentationNode, "
                               "therefore a valid referenceVolumeNode input is required.")
    seg = segmentationNode.GetSegmentation()
    if seg.GetSegment(segmentId) is None:
        raise RuntimeError(f"segment {segmentId!r} not found")
    dims = referenceVolumeNode.GetImageData().GetDimensions()
    vol_index_to_seg = (np.linalg.inv(_world(segmentationNode)) @ _world(referenceVolumeNode)
                        @ referenceVolumeNode._ijkToRas())
    values, _ = resample_nearest(seg.maskOf(segmentId), seg.referenceIndexToWorld(), dims[::-1], vol_index_to_seg)
    return values


def updateSegmentBinaryLabelmapFromArray(narray, segmentationNode, segmentId, referenceVolumeNode=None):
    import slicer
    from .segmentation import make_oriented
    if referenceVolumeNode is None:
        referenceVolumeNode = segmentationNode.GetNodeReference(
            slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole())
    m = np.linalg.inv(_world(segmentationNode)) @ _world(referenceVolumeNode) @ referenceVolumeNode._ijkToRas()
    image = make_oriented(np.asarray(narray).astype(np.uint8), m)
    if not slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(image, segmentationNode, segmentId):
        raise RuntimeError("Importing of segment failed.")


# ------------------------------------------------------------------------------------------------ files
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def loadVolume(filename, properties=None, returnNode=False):
    """Read a scalar volume (any SimpleITK format) into a new vtkMRMLScalarVolumeNode (LPS -> RAS)."""
    import SimpleITK as sitk

    import slicer
    image = sitk.ReadImage(str(filename))
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise RuntimeError(f"stand-in loadVolume reads 3D scalar volumes only: {filename}")
    m = np.eye(4)
    m[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())[None, :]
    m[:3, 3] = image.GetOrigin()
    name = (properties or {}).get("name") or os.path.basename(str(filename)).split(".")[0]
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    updateVolumeFromArray(node, sitk.GetArrayFromImage(image))
    from .mrml import numpy_to_matrix
    node.SetIJKToRASMatrix(numpy_to_matrix(_LPS_TO_RAS @ m))
    node.CreateDefaultDisplayNodes()
    return (True, node) if returnNode else node


def saveNode(node, filename, properties=None):
    """Write a segmentation node to .seg.nrrd (segment names, colours and tags) with slicerio."""
    import slicerio

    if not node.IsA("vtkMRMLSegmentationNode"):
        raise RuntimeError("stand-in saveNode writes segmentation nodes only")
    seg = node.GetSegmentation()
    if seg.reference() is None:
        return False
    if node.GetParentTransformNode() is not None:
        raise RuntimeError("stand-in saveNode: harden the segmentation's transform first")
    shape = seg.referenceShape()
    labels = np.zeros(shape, dtype=np.uint8)
    segments = []
    for value, sid in enumerate(seg.GetSegmentIDs(), start=1):
        s = seg.GetSegment(sid)
        labels[seg.maskOf(sid).astype(bool)] = value
        tags = {str(k).replace(":", "/").replace("|", "/"): str(v).replace("|", "/") for k, v in s._tags.items()}
        segments.append({"id": sid, "name": s.GetName(), "color": list(s.GetColor()), "labelValue": value,
                         "layer": 0, "extent": [0, shape[2] - 1, 0, shape[1] - 1, 0, shape[0] - 1], "tags": tags})
    ijk_to_lps = _LPS_TO_RAS @ seg.referenceIndexToWorld()
    slicerio.write_segmentation(str(filename), {
        "voxels": labels.transpose(2, 1, 0), "ijkToLPS": ijk_to_lps, "encoding": "gzip",
        "containedRepresentationNames": ["Binary labelmap"], "masterRepresentation": "Binary labelmap",
        "referenceImageExtentOffset": [0, 0, 0], "segments": segments})
    return True
