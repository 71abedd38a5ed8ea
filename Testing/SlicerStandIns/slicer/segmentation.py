"""STAND-IN segmentations (test use only): vtkOrientedImageData, vtkSegment, vtkSegmentation,
vtkMRMLSegmentationNode and the parts of vtkSlicerSegmentationsModuleLogic the extension calls.

Model (a simplification of Slicer's, same observable geometry):

* A segmentation has a reference image geometry (ImageToWorld in the segmentation node's own coordinates,
  plus an extent), set by ``SetReferenceImageGeometryParameterFromVolumeNode`` as in Slicer: the volume's
  IJKToRAS carried through the volume's and the segmentation's parent transforms.
* Every segment stores a binary mask on that reference lattice (Slicer stores shared labelmap layers with
  effective extents; the voxels a segment covers, in RAS, are the same).
* Labelmaps given to ``SetBinaryLabelmapToSegment`` are resampled (nearest neighbour) onto the reference
  lattice when their geometry differs, as Slicer resamples them.
"""

from __future__ import annotations

import numpy as np
import vtk
from vtk.util import numpy_support

from .mrml import (vtkMRMLDisplayNode, vtkMRMLScene, vtkMRMLTransformableNode, matrix_to_numpy,
                   numpy_to_matrix)


# ------------------------------------------------------------------------------------- oriented image data
class vtkOrientedImageData(vtk.vtkImageData):
    """vtkImageData with axis directions: ImageToWorld = origin + directions * spacing (Slicer's class)."""

    def __init__(self) -> None:
        super().__init__()
        self._directions = np.eye(3)

    def SetDirections(self, dirs) -> None:
        self._directions = np.asarray(dirs, dtype=np.float64).reshape(3, 3)

    def GetDirections(self, dirs) -> None:
        for r in range(3):
            for c in range(3):
                dirs[r][c] = float(self._directions[r, c])

    def SetDirectionMatrix(self, matrix) -> None:  # Slicer's signature: a vtkMatrix4x4
        self._directions = matrix_to_numpy(matrix)[:3, :3]

    def GetDirectionMatrix(self, matrix) -> None:
        m = np.eye(4)
        m[:3, :3] = self._directions
        numpy_to_matrix(m, matrix)

    def imageToWorld(self) -> np.ndarray:
        m = np.eye(4)
        m[:3, :3] = self._directions * np.asarray(self.GetSpacing())[None, :]
        m[:3, 3] = self.GetOrigin()
        return m

    def GetImageToWorldMatrix(self, matrix) -> None:
        numpy_to_matrix(self.imageToWorld(), matrix)

    def SetImageToWorldMatrix(self, matrix) -> None:
        m = matrix_to_numpy(matrix) if hasattr(matrix, "GetElement") else np.asarray(matrix, dtype=np.float64)
        cols = m[:3, :3]
        spacing = np.linalg.norm(cols, axis=0)
        self.SetSpacing(*spacing)
        self.SetOrigin(*m[:3, 3])
        self._directions = cols / spacing[None, :]

    SetGeometryFromImageToWorldMatrix = SetImageToWorldMatrix

    def DeepCopy(self, other) -> None:
        vtk.vtkImageData.DeepCopy(self, other)
        if isinstance(other, vtkOrientedImageData):
            self._directions = other._directions.copy()

    def ShallowCopy(self, other) -> None:
        vtk.vtkImageData.ShallowCopy(self, other)
        if isinstance(other, vtkOrientedImageData):
            self._directions = other._directions.copy()

    def CopyDirections(self, other) -> None:
        self._directions = other._directions.copy()


def image_to_numpy(image: vtk.vtkImageData) -> np.ndarray:
    """Scalars as a (z, y, x) view (the layout ``slicer.util.arrayFromVolume`` returns)."""
    dims = image.GetDimensions()
    scalars = image.GetPointData().GetScalars()
    if scalars is None:
        return np.zeros(dims[::-1], dtype=np.uint8)
    return numpy_support.vtk_to_numpy(scalars).reshape(dims[::-1])


def make_oriented(array: np.ndarray, image_to_world: np.ndarray, extent=None) -> vtkOrientedImageData:
    a = np.ascontiguousarray(array)
    img = vtkOrientedImageData()
    nz, ny, nx = a.shape
    ext = extent if extent is not None else (0, nx - 1, 0, ny - 1, 0, nz - 1)
    img.SetExtent(*ext)
    img.SetImageToWorldMatrix(image_to_world)
    vt = numpy_support.numpy_to_vtk(a.ravel(), deep=True,
                                    array_type=numpy_support.get_vtk_array_type(a.dtype))
    img.GetPointData().SetScalars(vt)
    return img


def extent_matrix(image_to_world: np.ndarray, extent) -> np.ndarray:
    """Matrix from numpy-array index (as IJK, i.e. reversed zyx) to world, for an image with ``extent``."""
    shift = np.eye(4)
    shift[:3, 3] = [extent[0], extent[2], extent[4]]
    return image_to_world @ shift


def resample_nearest(src: np.ndarray, src_index_to_world: np.ndarray, dst_shape,
                     dst_index_to_world: np.ndarray, fill=0) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-neighbour pull of ``src`` (z, y, x) onto a destination grid. Returns (values, inside)."""
    nz, ny, nx = dst_shape
    k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    ijk = np.stack([i, j, k, np.ones_like(i)], axis=-1).reshape(-1, 4).astype(np.float64)
    m = np.linalg.inv(src_index_to_world) @ dst_index_to_world
    src_ijk = np.floor(ijk @ m.T + 0.5).astype(np.int64)[:, :3]
    sz, sy, sx = src.shape
    inside = ((src_ijk[:, 0] >= 0) & (src_ijk[:, 0] < sx) & (src_ijk[:, 1] >= 0) & (src_ijk[:, 1] < sy)
              & (src_ijk[:, 2] >= 0) & (src_ijk[:, 2] < sz))
    out = np.full(ijk.shape[0], fill, dtype=src.dtype)
    idx = src_ijk[inside]
    out[inside] = src[idx[:, 2], idx[:, 1], idx[:, 0]]
    return out.reshape(dst_shape), inside.reshape(dst_shape)


# ------------------------------------------------------------------------------------------------- segments
class vtkSegment(vtk.vtkObject):
    _TERMINOLOGY_TAG = "TerminologyEntry"

    def __init__(self) -> None:
        super().__init__()
        self._name = ""
        self._color = (0.5, 0.5, 0.5)
        self._tags: dict[str, str] = {}
        self._labelValue = 1
        self._mask: np.ndarray | None = None  # uint8 on the segmentation's reference lattice

    def GetName(self):
        return self._name

    def SetName(self, name) -> None:
        self._name = str(name)
        self.Modified()

    def GetColor(self):
        return tuple(self._color)

    def SetColor(self, *rgb) -> None:
        c = rgb[0] if len(rgb) == 1 else rgb
        self._color = tuple(float(v) for v in c)
        self.Modified()

    def SetTag(self, key, value) -> None:
        self._tags[str(key)] = str(value)
        self.Modified()

    def GetTag(self, key, value) -> bool:
        """Slicer's ``bool GetTag(std::string tag, std::string& value)``: pass a ``vtk.reference("")``."""
        if key not in self._tags:
            return False
        value.set(self._tags[key])
        return True

    def HasTag(self, key) -> bool:
        return key in self._tags

    def RemoveTag(self, key) -> None:
        self._tags.pop(key, None)

    def GetTags(self, tags=None):
        return dict(self._tags)

    def GetLabelValue(self) -> int:
        return self._labelValue

    def SetLabelValue(self, v) -> None:
        self._labelValue = int(v)

    @staticmethod
    def GetTerminologyEntryTagName() -> str:
        return vtkSegment._TERMINOLOGY_TAG


class vtkSegmentation(vtk.vtkObject):
    SegmentAdded = vtk.vtkCommand.UserEvent + 501
    SegmentRemoved = vtk.vtkCommand.UserEvent + 502
    SegmentModified = vtk.vtkCommand.UserEvent + 503

    def __init__(self) -> None:
        super().__init__()
        self._segments: dict[str, vtkSegment] = {}
        self._reference: tuple[np.ndarray, tuple[int, ...]] | None = None  # (ImageToWorld, extent)

    # -- reference lattice
    def setReference(self, image_to_world: np.ndarray, extent) -> None:
        self._reference = (np.asarray(image_to_world, dtype=np.float64), tuple(int(v) for v in extent))

    def reference(self):
        return self._reference

    def referenceShape(self):
        e = self._reference[1]
        return (e[5] - e[4] + 1, e[3] - e[2] + 1, e[1] - e[0] + 1)

    def referenceIndexToWorld(self) -> np.ndarray:
        return extent_matrix(*self._reference)

    # -- segments
    def GenerateUniqueSegmentID(self, base="Segment") -> str:
        base = base or "Segment"
        if base not in self._segments:
            return base
        n = 1
        while f"{base}_{n}" in self._segments:
            n += 1
        return f"{base}_{n}"

    def AddEmptySegment(self, segmentId="", segmentName="", color=None) -> str:
        segmentId = self.GenerateUniqueSegmentID(segmentId or segmentName or "Segment_1")
        s = vtkSegment()
        s._name = segmentName or segmentId
        if color is not None:
            s._color = tuple(float(v) for v in color)
        self._segments[segmentId] = s
        self.InvokeEvent(self.SegmentAdded)
        return segmentId

    def AddSegment(self, segment, segmentId="", insertBeforeSegmentId="") -> bool:
        segmentId = self.GenerateUniqueSegmentID(segmentId or segment.GetName() or "Segment")
        self._segments[segmentId] = segment
        self.InvokeEvent(self.SegmentAdded)
        return True

    def RemoveSegment(self, segmentId) -> None:
        if self._segments.pop(segmentId, None) is not None:
            self.InvokeEvent(self.SegmentRemoved)

    def RemoveAllSegments(self) -> None:
        self._segments.clear()

    def GetSegment(self, segmentId):
        return self._segments.get(segmentId)

    def GetSegmentIdBySegmentName(self, name) -> str:
        for sid, s in self._segments.items():
            if s._name.lower() == str(name).lower():
                return sid
        return ""

    def GetSegmentIdBySegment(self, segment) -> str:
        for sid, s in self._segments.items():
            if s is segment:
                return sid
        return ""

    def GetNumberOfSegments(self) -> int:
        return len(self._segments)

    def GetNthSegmentID(self, index) -> str:
        return list(self._segments)[index]

    def GetNthSegment(self, index):
        return list(self._segments.values())[index]

    def GetSegmentIDs(self):
        return tuple(self._segments)

    # -- stand-in helpers
    def maskOf(self, segmentId) -> np.ndarray:
        s = self._segments[segmentId]
        if s._mask is None:
            return np.zeros(self.referenceShape(), dtype=np.uint8) if self._reference else np.zeros((0, 0, 0), np.uint8)
        return s._mask

    def snapshot(self):
        return ({sid: (s._name, s._color, dict(s._tags), None if s._mask is None else s._mask.copy())
                 for sid, s in self._segments.items()}, self._reference)

    def restore(self, state) -> None:
        segs, ref = state
        self._reference = ref
        self._segments = {}
        for sid, (name, color, tags, mask) in segs.items():
            s = vtkSegment()
            s._name, s._color, s._tags, s._mask = name, color, dict(tags), None if mask is None else mask.copy()
            self._segments[sid] = s


class vtkMRMLSegmentationDisplayNode(vtkMRMLDisplayNode):
    def __init__(self) -> None:
        super().__init__()
        self._hidden: set[str] = set()
        self._segmentationNode = None

    def SetSegmentVisibility(self, segmentId, visible) -> None:
        (self._hidden.discard if visible else self._hidden.add)(segmentId)
        self.Modified()

    def GetSegmentVisibility(self, segmentId) -> bool:
        return segmentId not in self._hidden

    def GetVisibleSegmentIDs(self, ids) -> None:
        seg = self._segmentationNode.GetSegmentation()
        for sid in seg.GetSegmentIDs():
            if sid not in self._hidden:
                ids.InsertNextValue(sid)


class vtkMRMLSegmentationNode(vtkMRMLTransformableNode):
    # vtkMRMLSegmentationNode::EditAllowed... (current Slicer names of the editable-area modes)
    EditAllowedEverywhere = 0
    EditAllowedInsideAllSegments = 1
    EditAllowedInsideVisibleSegments = 2
    EditAllowedOutsideAllSegments = 3
    EditAllowedOutsideVisibleSegments = 4
    EditAllowedInsideSingleSegment = 5

    def __init__(self) -> None:
        super().__init__()
        self._segmentation = vtkSegmentation()

    def GetSegmentation(self):
        return self._segmentation

    @staticmethod
    def GetReferenceImageGeometryReferenceRole() -> str:
        return "referenceImageGeometryRef"

    def SetReferenceImageGeometryParameterFromVolumeNode(self, volumeNode) -> None:
        """Reference lattice = the volume's voxels, expressed in this segmentation's coordinates."""
        if volumeNode is None or volumeNode.GetImageData() is None:
            return
        m = volumeNode._ijkToRas()
        vt = volumeNode.GetParentTransformNode()
        st = self.GetParentTransformNode()
        if vt is not None or st is not None:
            between = vtk.vtkMatrix4x4()
            if not vtkMRMLTransformableNode_transformBetween(vt, st, between):
                raise RuntimeError("stand-in: non-linear transform between volume and segmentation")
            m = matrix_to_numpy(between) @ m
        dims = volumeNode.GetImageData().GetDimensions()
        self._segmentation.setReference(m, (0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1))
        self.Modified()

    def SetSourceRepresentationToBinaryLabelmap(self) -> None:
        pass

    SetMasterRepresentationToBinaryLabelmap = SetSourceRepresentationToBinaryLabelmap

    def CreateDefaultDisplayNodes(self) -> None:
        if self.GetDisplayNode() is None and self._scene is not None:
            d = self._scene.AddNewNodeByClass("vtkMRMLSegmentationDisplayNode")
            d._segmentationNode = self
            self.SetNodeReferenceID("display", d.GetID())

    def GetDisplayNode(self):
        return self.GetNodeReference("display")

    def GetBinaryLabelmapRepresentation(self, segmentId, outputLabelmap) -> bool:
        seg = self._segmentation
        if seg.GetSegment(segmentId) is None or seg.reference() is None:
            return False
        img = make_oriented(seg.maskOf(segmentId).astype(np.uint8), seg.reference()[0], seg.reference()[1])
        outputLabelmap.DeepCopy(img)
        return True


def vtkMRMLTransformableNode_transformBetween(sourceTransformNode, targetTransformNode, matrix) -> bool:
    from .mrml import vtkMRMLTransformNode
    return vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(sourceTransformNode, targetTransformNode, matrix)


vtkMRMLScene.registerNodeClass(vtkMRMLSegmentationNode)
vtkMRMLScene.registerNodeClass(vtkMRMLSegmentationDisplayNode)


# ------------------------------------------------------------------------------------------------- logic
class vtkSlicerSegmentationsModuleLogic(vtk.vtkObject):
    MODE_REPLACE = 0
    MODE_MERGE_MAX = 1
    MODE_MERGE_MIN = 2
    MODE_MERGE_MASK = 3

    @staticmethod
    def SetBinaryLabelmapToSegment(labelmap, segmentationNode, segmentId, mergeMode=0, extent=None) -> bool:
        """Write ``labelmap`` (in the segmentation's coordinates) into a segment.

        With ``extent`` (IJK of ``labelmap``), only that part of the labelmap is used. The merge modes leave the
        segment outside it as it is; MODE_REPLACE, as in Slicer, does not (the segment becomes the clipped
        labelmap).
        """
        seg = segmentationNode.GetSegmentation()
        segment = seg.GetSegment(segmentId)
        if segment is None:
            return False
        src = image_to_numpy(labelmap)
        src_ext = labelmap.GetExtent()
        if seg.reference() is None:
            seg.setReference(labelmap.imageToWorld(), src_ext)
        region_ext = src_ext if extent is None else tuple(int(v) for v in extent)
        indicator = np.zeros(src.shape, dtype=np.uint8)
        lo = [max(region_ext[2 * d], src_ext[2 * d]) - src_ext[2 * d] for d in range(3)]
        hi = [min(region_ext[2 * d + 1], src_ext[2 * d + 1]) - src_ext[2 * d] for d in range(3)]
        if all(lo[d] <= hi[d] for d in range(3)):
            indicator[lo[2]:hi[2] + 1, lo[1]:hi[1] + 1, lo[0]:hi[0] + 1] = 1
        src_m = extent_matrix(labelmap.imageToWorld(), src_ext)
        ref_m = seg.referenceIndexToWorld()
        shape = seg.referenceShape()
        values, inside = resample_nearest((src != 0).astype(np.uint8), src_m, shape, ref_m)
        region, _ = resample_nearest(indicator, src_m, shape, ref_m)
        region = region.astype(bool) & inside
        current = seg.maskOf(segmentId).copy()
        if mergeMode == vtkSlicerSegmentationsModuleLogic.MODE_REPLACE:
            # as Slicer (vtkOrientedImageDataResample::CopyImage padded to the extent): the labelmap clipped to
            # the extent becomes the whole segment; nothing of the segment outside the extent is kept
            current = np.where(region, values, 0)
        elif mergeMode == vtkSlicerSegmentationsModuleLogic.MODE_MERGE_MAX:
            current[region] = np.maximum(current[region], values[region])
        elif mergeMode == vtkSlicerSegmentationsModuleLogic.MODE_MERGE_MIN:
            current[region] = np.minimum(current[region], values[region])
        elif mergeMode == vtkSlicerSegmentationsModuleLogic.MODE_MERGE_MASK:
            # as Slicer's OPERATION_MASKING: the segment's label where the labelmap is non-zero, nothing cleared
            current[region & (values != 0)] = 1
        else:
            raise ValueError(f"unknown merge mode {mergeMode}")
        segment._mask = current.astype(np.uint8)
        segment.Modified()
        seg.InvokeEvent(vtkSegmentation.SegmentModified)
        segmentationNode.Modified()
        return True
