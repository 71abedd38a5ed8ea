"""STAND-IN for Slicer's compiled ``vtkSegmentationCorePython`` module (test use only)."""

from slicer.segmentation import vtkOrientedImageData, vtkSegment, vtkSegmentation  # noqa: F401
