"""STAND-IN MRML scene and nodes (test use only; 3D Slicer's real ones are C++ classes wrapped for Python).

The nodes are Python subclasses of the real ``vtkObject`` from the ``vtk`` wheel, so ``AddObserver``,
``RemoveObserver``, ``InvokeEvent`` and ``ModifiedEvent`` behave as in Slicer. Method names and semantics
follow Slicer's C++ API (vtkMRMLNode, vtkMRMLScene, vtkMRMLVolumeNode, vtkMRMLTransformNode,
vtkMRMLSliceNode, vtkMRMLSegmentEditorNode...) for the subset the RCMed extension and its tests use:

* matrices are real ``vtkMatrix4x4`` objects, image data real ``vtkImageData``;
* a volume's IJKToRAS is origin + directions * spacing, as vtkMRMLVolumeNode composes it;
* parent transforms chain through ``SetAndObserveTransformNodeID``; ``GetMatrixTransformToWorld`` composes
  them; a grid (non-linear) transform reports ``IsTransformToWorldLinear() == False``;
* ``StartModify``/``EndModify`` hold back ``ModifiedEvent`` until the outermost ``EndModify``.
"""

from __future__ import annotations

import numpy as np
import vtk

_USER = vtk.vtkCommand.UserEvent


def matrix_to_numpy(m: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def numpy_to_matrix(a, m: vtk.vtkMatrix4x4 | None = None) -> vtk.vtkMatrix4x4:
    m = m if m is not None else vtk.vtkMatrix4x4()
    a = np.asarray(a, dtype=np.float64)
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r, c]))
    return m


class vtkMRMLNode(vtk.vtkObject):
    """Base of all stand-in nodes: name, ID, attributes, node references, batched Modified events."""

    ReferenceAddedEvent = _USER + 101
    ReferenceModifiedEvent = _USER + 102

    def __init__(self) -> None:
        super().__init__()
        self._name = ""
        self._id: str | None = None
        self._scene = None
        self._attributes: dict[str, str] = {}
        self._references: dict[str, list[str]] = {}
        self._modifyDisabled = 0
        self._modifiedPending = False
        self._hideFromEditors = False
        self._singletonTag: str | None = None
        self._selectable = True

    # -- identity
    def GetClassName(self) -> str:  # the MRML class name, as the C++ object reports it
        return type(self).__name__

    def IsA(self, className: str) -> bool:
        return any(c.__name__ == className for c in type(self).__mro__)

    def GetID(self):
        return self._id

    def GetName(self):
        return self._name

    def SetName(self, name) -> None:
        if name != self._name:
            self._name = str(name)
            self.Modified()

    def GetScene(self):
        return self._scene

    def GetNodeTagName(self) -> str:
        return type(self).__name__.replace("vtkMRML", "").replace("Node", "")

    def SetHideFromEditors(self, hide) -> None:
        self._hideFromEditors = bool(hide)

    def GetHideFromEditors(self) -> bool:
        return self._hideFromEditors

    def SetSingletonTag(self, tag) -> None:
        self._singletonTag = tag

    def GetSingletonTag(self):
        return self._singletonTag

    # -- attributes
    def SetAttribute(self, name, value) -> None:
        if value is None:
            self._attributes.pop(name, None)
        else:
            self._attributes[name] = str(value)
        self.Modified()

    def GetAttribute(self, name):
        return self._attributes.get(name)

    def RemoveAttribute(self, name) -> None:
        self.SetAttribute(name, None)

    def GetAttributeNames(self):
        return tuple(self._attributes)

    # -- references
    def SetNodeReferenceID(self, role, nodeId) -> None:
        if nodeId:
            self._references[role] = [str(nodeId)]
        else:
            self._references.pop(role, None)
        self.Modified()

    def AddNodeReferenceID(self, role, nodeId) -> None:
        self._references.setdefault(role, []).append(str(nodeId))
        self.Modified()

    def GetNodeReferenceID(self, role):
        ids = self._references.get(role)
        return ids[0] if ids else None

    def GetNodeReference(self, role):
        nodeId = self.GetNodeReferenceID(role)
        return self._scene.GetNodeByID(nodeId) if (nodeId and self._scene is not None) else None

    def RemoveNodeReferenceIDs(self, role) -> None:
        self._references.pop(role, None)
        self.Modified()

    # -- batched modification
    def StartModify(self) -> int:
        previous = self._modifyDisabled
        self._modifyDisabled += 1
        return previous

    def EndModify(self, previous) -> int:
        self._modifyDisabled = int(previous)
        if self._modifyDisabled == 0 and self._modifiedPending:
            self._modifiedPending = False
            self.Modified()
        return self._modifyDisabled

    def GetDisableModifiedEvent(self) -> int:
        return self._modifyDisabled

    def Modified(self) -> None:
        if self._modifyDisabled:
            self._modifiedPending = True
            return
        vtk.vtkObject.Modified(self)

    def CreateDefaultDisplayNodes(self) -> None:
        pass

    def Copy(self, other) -> None:
        self._name = other._name
        self._attributes = dict(other._attributes)


class vtkMRMLScriptedModuleNode(vtkMRMLNode):
    """A module's parameter node: string parameters plus node references."""

    def __init__(self) -> None:
        super().__init__()
        self._parameters: dict[str, str] = {}

    def SetParameter(self, name, value) -> None:
        value = str(value)
        if self._parameters.get(name) != value:
            self._parameters[name] = value
            self.Modified()

    def GetParameter(self, name) -> str:
        return self._parameters.get(name, "")

    def HasParameter(self, name) -> bool:
        return name in self._parameters

    def UnsetParameter(self, name) -> None:
        if self._parameters.pop(name, None) is not None:
            self.Modified()

    def GetParameterNames(self):
        return tuple(self._parameters)

    def GetParameterNamesAsCommaSeparatedList(self) -> str:
        return ",".join(self._parameters)


# ----------------------------------------------------------------------------------------------- transforms
class vtkMRMLTransformableNode(vtkMRMLNode):
    TransformModifiedEvent = _USER + 201
    TRANSFORM_NODE_REFERENCE_ROLE = "transform"

    def SetAndObserveTransformNodeID(self, nodeId) -> bool:
        self.SetNodeReferenceID(self.TRANSFORM_NODE_REFERENCE_ROLE, nodeId)
        self.InvokeEvent(self.TransformModifiedEvent)
        return True

    def GetTransformNodeID(self):
        return self.GetNodeReferenceID(self.TRANSFORM_NODE_REFERENCE_ROLE)

    def GetParentTransformNode(self):
        return self.GetNodeReference(self.TRANSFORM_NODE_REFERENCE_ROLE)

    def HardenTransform(self) -> None:
        raise NotImplementedError("stand-in: HardenTransform is not implemented")


class vtkMRMLTransformNode(vtkMRMLTransformableNode):
    """A transform to its parent. Linear unless it is a grid (non-linear) transform."""

    def __init__(self) -> None:
        super().__init__()
        self._toParent = np.eye(4)
        self._linear = True

    def IsLinear(self) -> bool:
        return self._linear

    def IsTransformToWorldLinear(self) -> bool:
        node = self
        while node is not None:
            if not node.IsLinear():
                return False
            node = node.GetParentTransformNode()
        return True

    def SetMatrixTransformToParent(self, matrix) -> None:
        self._toParent = matrix_to_numpy(matrix)
        self.Modified()
        self.InvokeEvent(self.TransformModifiedEvent)

    def GetMatrixTransformToParent(self, matrix=None):
        if matrix is None:
            return numpy_to_matrix(self._toParent)
        numpy_to_matrix(self._toParent, matrix)
        return True

    def _toWorldNumpy(self) -> np.ndarray:
        if not self.IsTransformToWorldLinear():
            raise RuntimeError("transform to world is not linear")
        m = np.eye(4)
        node = self
        while node is not None:
            m = node._toParent @ m
            node = node.GetParentTransformNode()
        return m

    def GetMatrixTransformToWorld(self, matrix) -> bool:
        if not self.IsTransformToWorldLinear():
            return False
        numpy_to_matrix(self._toWorldNumpy(), matrix)
        return True

    def GetMatrixTransformFromWorld(self, matrix) -> bool:
        if not self.IsTransformToWorldLinear():
            return False
        numpy_to_matrix(np.linalg.inv(self._toWorldNumpy()), matrix)
        return True

    @staticmethod
    def GetMatrixTransformBetweenNodes(sourceNode, targetNode, matrix) -> bool:
        def toWorld(node):
            return np.eye(4) if node is None else node._toWorldNumpy()
        for node in (sourceNode, targetNode):
            if node is not None and not node.IsTransformToWorldLinear():
                return False
        numpy_to_matrix(np.linalg.inv(toWorld(targetNode)) @ toWorld(sourceNode), matrix)
        return True


class vtkMRMLLinearTransformNode(vtkMRMLTransformNode):
    pass


class vtkMRMLGridTransformNode(vtkMRMLTransformNode):
    """Non-linear (displacement grid) transform: only its linearity matters to the stand-in."""

    def __init__(self) -> None:
        super().__init__()
        self._linear = False


# -------------------------------------------------------------------------------------------------- volumes
class vtkMRMLDisplayNode(vtkMRMLNode):
    def __init__(self) -> None:
        super().__init__()
        self._visibility = True

    def SetVisibility(self, v) -> None:
        self._visibility = bool(v)
        self.Modified()

    def GetVisibility(self) -> bool:
        return self._visibility


class vtkMRMLVolumeDisplayNode(vtkMRMLDisplayNode):
    pass


class vtkMRMLVolumeNode(vtkMRMLTransformableNode):
    ImageDataModifiedEvent = _USER + 301

    def __init__(self) -> None:
        super().__init__()
        self._origin = np.zeros(3)
        self._spacing = np.ones(3)
        self._directions = np.eye(3)
        self._imageData = None

    # -- voxels
    def GetImageData(self):
        return self._imageData

    def SetAndObserveImageData(self, imageData) -> None:
        self._imageData = imageData
        self.Modified()
        self.InvokeEvent(self.ImageDataModifiedEvent)

    # -- geometry (IJKToRAS = origin + directions @ diag(spacing))
    def SetOrigin(self, *origin) -> None:
        self._origin = np.asarray(origin[0] if len(origin) == 1 else origin, dtype=np.float64).reshape(3)
        self.Modified()

    def GetOrigin(self):
        return tuple(float(v) for v in self._origin)

    def SetSpacing(self, *spacing) -> None:
        self._spacing = np.asarray(spacing[0] if len(spacing) == 1 else spacing, dtype=np.float64).reshape(3)
        self.Modified()

    def GetSpacing(self):
        return tuple(float(v) for v in self._spacing)

    def SetIJKToRASDirections(self, *dirs) -> None:
        """Nine values (row-major) or a 3x3 nested sequence; columns are the I, J, K directions."""
        a = np.asarray(dirs[0] if len(dirs) == 1 else dirs, dtype=np.float64).reshape(3, 3)
        self._directions = a
        self.Modified()

    def GetIJKToRASDirections(self, dirs) -> None:
        for r in range(3):
            for c in range(3):
                dirs[r][c] = float(self._directions[r, c])

    def SetIJKToRASDirectionMatrix(self, matrix) -> None:
        self._directions = matrix_to_numpy(matrix)[:3, :3]
        self.Modified()

    def GetIJKToRASDirectionMatrix(self, matrix) -> None:
        m = np.eye(4)
        m[:3, :3] = self._directions
        numpy_to_matrix(m, matrix)

    def _ijkToRas(self) -> np.ndarray:
        m = np.eye(4)
        m[:3, :3] = self._directions * self._spacing[None, :]
        m[:3, 3] = self._origin
        return m

    def GetIJKToRASMatrix(self, matrix) -> None:
        numpy_to_matrix(self._ijkToRas(), matrix)

    def GetRASToIJKMatrix(self, matrix) -> None:
        numpy_to_matrix(np.linalg.inv(self._ijkToRas()), matrix)

    def SetIJKToRASMatrix(self, matrix) -> None:
        m = matrix_to_numpy(matrix)
        cols = m[:3, :3]
        spacing = np.linalg.norm(cols, axis=0)
        self._spacing = spacing
        self._directions = cols / spacing[None, :]
        self._origin = m[:3, 3].copy()
        self.Modified()

    def CopyOrientation(self, other) -> None:
        self._origin = other._origin.copy()
        self._spacing = other._spacing.copy()
        self._directions = other._directions.copy()
        self.Modified()

    def CreateDefaultDisplayNodes(self) -> None:
        if self.GetNodeReference("display") is None and self._scene is not None:
            d = self._scene.AddNewNodeByClass("vtkMRMLVolumeDisplayNode")
            self.SetNodeReferenceID("display", d.GetID())

    def GetDisplayNode(self):
        return self.GetNodeReference("display")


class vtkMRMLScalarVolumeNode(vtkMRMLVolumeNode):
    pass


class vtkMRMLLabelMapVolumeNode(vtkMRMLVolumeNode):
    pass


# ------------------------------------------------------------------------------------------------ slice views
_ORIENTATION_MATRICES = {
    # SliceToRAS rotation for Slicer's standard orientations (columns: slice x, slice y, slice normal)
    "Axial": np.array([[-1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]),
    "Sagittal": np.array([[0, 0, 1.0], [-1.0, 0, 0], [0, 1.0, 0]]),
    "Coronal": np.array([[-1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0]]),
}


class vtkMRMLSliceNode(vtkMRMLNode):
    """A slice view's plane: SliceToRAS (rotation columns x, y, normal; translation = plane centre)."""

    def __init__(self) -> None:
        super().__init__()
        self._orientation = "Axial"
        self._sliceToRAS = vtk.vtkMatrix4x4()
        self._applyOrientation()

    def _applyOrientation(self) -> None:
        rot = _ORIENTATION_MATRICES.get(self._orientation)
        if rot is None:
            return
        m = matrix_to_numpy(self._sliceToRAS)
        m[:3, :3] = rot
        numpy_to_matrix(m, self._sliceToRAS)

    def SetOrientation(self, name) -> bool:
        self._orientation = str(name)
        self._applyOrientation()
        self.Modified()
        return True

    def SetOrientationToAxial(self) -> None:
        self.SetOrientation("Axial")

    def SetOrientationToSagittal(self) -> None:
        self.SetOrientation("Sagittal")

    def SetOrientationToCoronal(self) -> None:
        self.SetOrientation("Coronal")

    def SetOrientationToReformat(self) -> None:
        self.SetOrientation("Reformat")

    def GetOrientation(self) -> str:
        return self._orientation

    def GetOrientationString(self) -> str:
        return self._orientation

    def GetSliceToRAS(self):
        return self._sliceToRAS

    def UpdateMatrices(self) -> None:
        self.Modified()

    def SetSliceOffset(self, offset) -> None:
        m = matrix_to_numpy(self._sliceToRAS)
        normal = m[:3, 2]
        current = float(np.dot(m[:3, 3], normal))
        m[:3, 3] += (float(offset) - current) * normal
        numpy_to_matrix(m, self._sliceToRAS)
        self.Modified()

    def GetSliceOffset(self) -> float:
        m = matrix_to_numpy(self._sliceToRAS)
        return float(np.dot(m[:3, 3], m[:3, 2]))

    def JumpSliceByCentering(self, r, a, s) -> None:
        m = matrix_to_numpy(self._sliceToRAS)
        m[:3, 3] = [r, a, s]
        numpy_to_matrix(m, self._sliceToRAS)
        self.Modified()

    def GetLayoutName(self) -> str:
        return self._singletonTag or ""


# ------------------------------------------------------------------------------------------ segment editor
class vtkMRMLSegmentEditorNode(vtkMRMLNode):
    """The Segment Editor's parameter set: segmentation, source volume, selected segment, masking."""

    # Editable area (vtkMRMLSegmentationNode::EditAllowed... in current Slicer; PaintAllowed... before)
    PaintAllowedEverywhere = 0
    PaintAllowedInsideAllSegments = 1
    PaintAllowedInsideVisibleSegments = 2
    PaintAllowedOutsideAllSegments = 3
    PaintAllowedOutsideVisibleSegments = 4
    PaintAllowedInsideSingleSegment = 5
    # Modify other segments
    OverwriteAllSegments = 0
    OverwriteVisibleSegments = 1
    OverwriteNone = 2

    def __init__(self) -> None:
        super().__init__()
        self._selectedSegmentID = ""
        self._maskMode = self.PaintAllowedEverywhere
        self._maskSegmentID = ""
        self._overwriteMode = self.OverwriteAllSegments
        self._intensityMask = False
        self._intensityRange = (0.0, 0.0)

    def SetAndObserveSegmentationNode(self, node) -> None:
        self.SetNodeReferenceID("segmentation", node.GetID() if node is not None else None)

    def GetSegmentationNode(self):
        return self.GetNodeReference("segmentation")

    def SetAndObserveSourceVolumeNode(self, node) -> None:
        self.SetNodeReferenceID("sourceVolume", node.GetID() if node is not None else None)

    def GetSourceVolumeNode(self):
        return self.GetNodeReference("sourceVolume")

    SetAndObserveMasterVolumeNode = SetAndObserveSourceVolumeNode  # name before Slicer 5.2
    GetMasterVolumeNode = GetSourceVolumeNode

    def SetSelectedSegmentID(self, segmentId) -> None:
        self._selectedSegmentID = segmentId or ""
        self.Modified()

    def GetSelectedSegmentID(self) -> str:
        return self._selectedSegmentID

    def SetMaskMode(self, mode) -> None:
        self._maskMode = int(mode)
        self.Modified()

    def GetMaskMode(self) -> int:
        return self._maskMode

    def SetMaskSegmentID(self, segmentId) -> None:
        self._maskSegmentID = segmentId or ""
        self.Modified()

    def GetMaskSegmentID(self) -> str:
        return self._maskSegmentID

    def SetOverwriteMode(self, mode) -> None:
        self._overwriteMode = int(mode)
        self.Modified()

    def GetOverwriteMode(self) -> int:
        return self._overwriteMode

    def SetSourceVolumeIntensityMask(self, on) -> None:
        self._intensityMask = bool(on)
        self.Modified()

    def GetSourceVolumeIntensityMask(self) -> bool:
        return self._intensityMask

    def SetSourceVolumeIntensityMaskRange(self, lo, hi=None) -> None:
        if hi is None:
            lo, hi = lo
        self._intensityRange = (float(lo), float(hi))
        self.Modified()

    def GetSourceVolumeIntensityMaskRange(self):
        return self._intensityRange


# -------------------------------------------------------------------------------------------------- scene
class vtkMRMLScene(vtk.vtkObject):
    NodeAddedEvent = _USER + 1
    NodeRemovedEvent = _USER + 2
    StartCloseEvent = _USER + 3
    EndCloseEvent = _USER + 4

    _classes: dict[str, type] = {}

    def __init__(self) -> None:
        super().__init__()
        self._nodes: list[vtkMRMLNode] = []
        self._counter: dict[str, int] = {}
        self._closing = False

    @classmethod
    def registerNodeClass(cls, klass: type) -> None:
        cls._classes[klass.__name__] = klass

    def CreateNodeByClass(self, className):
        klass = self._classes.get(className)
        if klass is None:
            raise ValueError(f"stand-in scene cannot create nodes of class {className!r}")
        return klass()

    def AddNode(self, node):
        if node._id is None:
            base = node.GetClassName()
            n = self._counter.get(base, 0) + 1
            self._counter[base] = n
            node._id = f"{base}{n}"
        if not node._name:
            node._name = node.GetNodeTagName() + (str(self._counter.get(node.GetClassName(), 1))
                                                  if node._singletonTag is None else "")
        node._scene = self
        self._nodes.append(node)
        self.InvokeEvent(self.NodeAddedEvent)
        return node

    def AddNewNodeByClass(self, className, name=""):
        node = self.CreateNodeByClass(className)
        if name:
            node._name = str(name)
        return self.AddNode(node)

    def RemoveNode(self, node) -> None:
        if node in self._nodes:
            self._nodes.remove(node)
            node._scene = None
            self.InvokeEvent(self.NodeRemovedEvent)

    def GetNodeByID(self, nodeId):
        for n in self._nodes:
            if n._id == nodeId:
                return n
        return None

    def GetFirstNodeByClass(self, className):
        for n in self._nodes:
            if n.IsA(className):
                return n
        return None

    def GetFirstNodeByName(self, name):
        for n in self._nodes:
            if n._name == name:
                return n
        return None

    def GetNodesByClass(self, className):
        collection = vtk.vtkCollection()
        for n in self._nodes:
            if n.IsA(className):
                collection.AddItem(n)
        return collection

    def GetNumberOfNodesByClass(self, className) -> int:
        return sum(1 for n in self._nodes if n.IsA(className))

    def GetNthNodeByClass(self, index, className):
        nodes = [n for n in self._nodes if n.IsA(className)]
        return nodes[index] if 0 <= index < len(nodes) else None

    def GetNumberOfNodes(self) -> int:
        return len(self._nodes)

    def GetNthNode(self, index):
        return self._nodes[index]

    def GetSingletonNode(self, singletonTag, className):
        for n in self._nodes:
            if n._singletonTag == singletonTag and n.IsA(className):
                return n
        return None

    def Clear(self, removeSingletons=False) -> None:
        self._closing = True
        self.InvokeEvent(self.StartCloseEvent)
        for n in list(self._nodes):
            if removeSingletons or n._singletonTag is None:
                self.RemoveNode(n)
        self._closing = False
        self.InvokeEvent(self.EndCloseEvent)

    def IsClosing(self) -> bool:
        return self._closing

    def IsBatchProcessing(self) -> bool:
        return False


for _klass in (vtkMRMLScriptedModuleNode, vtkMRMLScalarVolumeNode, vtkMRMLLabelMapVolumeNode,
               vtkMRMLVolumeDisplayNode, vtkMRMLLinearTransformNode, vtkMRMLTransformNode,
               vtkMRMLGridTransformNode, vtkMRMLSliceNode, vtkMRMLSegmentEditorNode):
    vtkMRMLScene.registerNodeClass(_klass)
