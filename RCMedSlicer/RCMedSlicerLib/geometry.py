"""Geometry between Slicer and the engine, with plain numpy 4x4 matrices.

Conventions:

* Slicer works in RAS. A volume node's ``IJKToRAS`` maps voxel index (i, j, k) to RAS millimetres in the
  node's own coordinate system; a parent transform maps that to world RAS. ``slicer.util.arrayFromVolume``
  gives the voxels as a numpy array (k, j, i) = (z, y, x), the layout the engine expects.
* The engine's ``rcmed_engine.geometry.Geometry`` is ITK/LPS: the world IJK->LPS matrix is
  ``diag(-1, -1, 1, 1) @ IJKToRAS_world``.
* A vtkOrientedImageData (what the Segment Editor hands out) has an extent that need not start at 0:
  numpy index (0, 0, 0) of its scalars is IJK (extent[0], extent[2], extent[4]).

The slice axis for a plane is chosen by the engine (``rcmed_engine.geometry.slice_frame``) from the world
direction matrix, so a view's plane and the engine's slicing agree for any orientation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from rcmed_engine.geometry import PLANES, Geometry, slice_frame

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# Slicer slice node orientation names -> engine planes.
_ORIENTATION_PLANES = {"axial": "axial", "coronal": "coronal", "sagittal": "sagittal"}


class GeometryError(ValueError):
    """Geometry the extension cannot work with; the message says what to do."""


def as_matrix(m: Any) -> np.ndarray:
    """A 4x4 float matrix from a nested sequence, a numpy array or anything with ``GetElement(r, c)``."""
    if hasattr(m, "GetElement"):
        return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)
    a = np.asarray(m, dtype=np.float64)
    if a.shape == (3, 4):
        a = np.vstack([a, [0.0, 0.0, 0.0, 1.0]])
    if a.shape != (4, 4):
        raise GeometryError(f"expected a 4x4 matrix, got shape {a.shape}")
    return a


def check_affine(m: np.ndarray, what: str = "matrix") -> np.ndarray:
    m = as_matrix(m)
    if not np.all(np.isfinite(m)):
        raise GeometryError(f"the {what} contains NaN or infinite values")
    if not np.allclose(m[3], [0.0, 0.0, 0.0, 1.0], atol=1e-9):
        raise GeometryError(f"the {what} is not affine (last row {m[3].tolist()})")
    if abs(np.linalg.det(m[:3, :3])) < 1e-12:
        raise GeometryError(f"the {what} is singular")
    return m


def world_ijk_to_ras(ijk_to_ras: Any, node_to_world: Any | None = None) -> np.ndarray:
    """IJK -> world RAS: the node's IJKToRAS, then its (linear) parent transform, if any."""
    m = check_affine(as_matrix(ijk_to_ras), "IJK to RAS matrix")
    if node_to_world is not None:
        m = check_affine(as_matrix(node_to_world), "parent transform") @ m
    return m


def extent_origin_matrix(image_to_world: Any, extent: Sequence[int]) -> np.ndarray:
    """IJK of numpy index (0, 0, 0) is (extent[0], extent[2], extent[4]); fold that offset into the matrix."""
    m = as_matrix(image_to_world)
    shift = np.eye(4)
    shift[:3, 3] = [extent[0], extent[2], extent[4]]
    return m @ shift


def geometry_from_ijk_to_ras(ijk_to_ras_world: Any) -> Geometry:
    """The engine Geometry (LPS) of a grid whose world IJK->RAS matrix is given."""
    m = check_affine(as_matrix(ijk_to_ras_world), "IJK to RAS matrix")
    try:
        return Geometry.from_ijk_to_lps(LPS_TO_RAS @ m)
    except ValueError as exc:
        raise GeometryError(str(exc)) from None


def ijk_to_ras_from_geometry(geometry: Geometry) -> np.ndarray:
    return geometry.ijk_to_ras_matrix()


def ijk_to_segmentation(volume_ijk_to_ras: Any, volume_to_world: Any | None,
                        segmentation_to_world: Any | None) -> np.ndarray:
    """IJK of a volume -> the local (untransformed) RAS of a segmentation node.

    Segment labelmaps live in the segmentation node's own coordinates; when the volume and the segmentation
    sit under different (linear) transforms, voxels go volume IJK -> world -> segmentation local.
    """
    world = world_ijk_to_ras(volume_ijk_to_ras, volume_to_world)
    if segmentation_to_world is None:
        return world
    seg = check_affine(as_matrix(segmentation_to_world), "segmentation transform")
    return np.linalg.inv(seg) @ world


def voxel_to_ras(ijk_to_ras: Any, zyx: np.ndarray) -> np.ndarray:
    """RAS centres of voxels given as numpy indices (..., 3) in (z, y, x) order."""
    m = as_matrix(ijk_to_ras)
    ijk = np.asarray(zyx, dtype=np.float64)[..., ::-1]
    return ijk @ m[:3, :3].T + m[:3, 3]


def ras_to_continuous_zyx(ijk_to_ras: Any, ras: Any) -> np.ndarray:
    """Continuous numpy indices (z, y, x) of RAS points (..., 3)."""
    m = as_matrix(ijk_to_ras)
    p = np.asarray(ras, dtype=np.float64)
    ijk = np.linalg.solve(m[:3, :3], (p.reshape(-1, 3) - m[:3, 3]).T).T.reshape(p.shape)
    return ijk[..., ::-1]


# ---------------------------------------------------------------------------------------------- slice views
def plane_for_slice_view(orientation: str | None, slice_to_ras: Any | None = None) -> str:
    """The engine plane shown by a slice view.

    ``orientation`` is the slice node's orientation name ("Axial", "Coronal", "Sagittal", or "Reformat" and
    custom names); for the others the plane is the one whose normal is closest to the view's normal (the
    third column of SliceToRAS).
    """
    if orientation:
        plane = _ORIENTATION_PLANES.get(orientation.strip().lower())
        if plane:
            return plane
    if slice_to_ras is None:
        raise GeometryError(f"cannot tell the plane of a slice view oriented {orientation!r}")
    normal = as_matrix(slice_to_ras)[:3, 2]
    if not np.any(np.abs(normal) > 0):
        raise GeometryError("the slice view has no normal")
    # RAS axis 0 (R) is normal to sagittal, 1 (A) to coronal, 2 (S) to axial.
    return ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(normal)))]


@dataclass(frozen=True)
class SlicePick:
    """Where a slice view cuts a volume, in the engine's terms."""

    plane: str
    index: int  # voxel index along ``array_axis`` (what the engine's ``slices=(index, index + 1)`` takes)
    array_axis: int  # numpy axis (0 = z, 1 = y, 2 = x) the engine steps through for ``plane``
    count: int  # number of slices along that axis
    distance_mm: float  # distance from the view plane to the chosen voxel centre plane


def slice_axis(geometry: Geometry, shape_zyx: Sequence[int], plane: str) -> int:
    """Numpy axis the engine steps through for ``plane`` (taken in patient space from the directions)."""
    if plane not in PLANES:
        raise GeometryError(f"unknown plane {plane!r}; choose one of {', '.join(PLANES)}")
    return slice_frame(geometry, plane, tuple(int(n) for n in shape_zyx[:3])).slice_axis


def pick_slice(ijk_to_ras_world: Any, shape_zyx: Sequence[int], plane: str, point_ras: Sequence[float]) -> SlicePick:
    """The slice of a volume through a world RAS point (e.g. a slice view's centre), along ``plane``'s axis."""
    m = check_affine(as_matrix(ijk_to_ras_world), "IJK to RAS matrix")
    geometry = geometry_from_ijk_to_ras(m)
    shape = tuple(int(n) for n in shape_zyx[:3])
    axis = slice_axis(geometry, shape, plane)
    zyx = ras_to_continuous_zyx(m, np.asarray(point_ras, dtype=np.float64)[:3])
    index = int(np.floor(zyx[axis] + 0.5))
    n = shape[axis]
    if not 0 <= index < n:
        raise GeometryError(
            f"the slice view is outside the volume along its {plane} axis "
            f"(slice {index}, the volume has 0..{n - 1}); move the view onto the volume")
    spacing = np.linalg.norm(m[:3, :3], axis=0)[2 - axis]
    return SlicePick(plane, index, axis, n, float(abs(zyx[axis] - index) * spacing))


def slice_range(first: int, last: int, count: int) -> tuple[int, int]:
    """A user's inclusive slice range (as shown in the panel) -> the engine's half-open (lo, hi)."""
    lo, hi = int(min(first, last)), int(max(first, last))
    if lo < 0 or hi >= count:
        raise GeometryError(f"slice range {lo}..{hi} is outside the volume (0..{count - 1} along this axis)")
    return lo, hi + 1


def slab_extent(shape_zyx: Sequence[int], array_axis: int | None = None,
                lo: int | None = None, hi: int | None = None) -> tuple[int, int, int, int, int, int]:
    """VTK extent (i0, i1, j0, j1, k0, k1) of a whole grid, or of the slab lo..hi-1 along ``array_axis``."""
    nz, ny, nx = (int(n) for n in shape_zyx[:3])
    ext = [0, nx - 1, 0, ny - 1, 0, nz - 1]
    if array_axis is not None:
        ijk_axis = 2 - array_axis
        ext[2 * ijk_axis] = int(lo)
        ext[2 * ijk_axis + 1] = int(hi) - 1
    return tuple(ext)  # type: ignore[return-value]


def shift_extent(extent: Sequence[int], start: Sequence[int]) -> tuple[int, int, int, int, int, int]:
    """A VTK extent moved by ``start`` (i, j, k): from 0-based numpy indices to an image's own IJK."""
    e = [int(v) for v in extent]
    return tuple(e[n] + int(start[n // 2]) for n in range(6))  # type: ignore[return-value]


def paste_extent(array: np.ndarray, array_extent: Sequence[int], target_extent: Sequence[int]) -> np.ndarray:
    """Re-grid a (z, y, x) array given on ``array_extent`` onto ``target_extent`` of the same lattice.

    Used to bring a segment's labelmap (its extent may be cropped or padded) onto the source volume's voxels.
    Voxels outside ``array_extent`` come out as 0.
    """
    a = np.asarray(array)
    t = [int(v) for v in target_extent]
    s = [int(v) for v in array_extent]
    out_shape = (t[5] - t[4] + 1, t[3] - t[2] + 1, t[1] - t[0] + 1)
    out = np.zeros(out_shape, dtype=a.dtype)
    if a.size == 0 or min(out_shape) <= 0:
        return out
    if a.shape != (s[5] - s[4] + 1, s[3] - s[2] + 1, s[1] - s[0] + 1):
        raise GeometryError(f"array of shape {a.shape} does not match extent {tuple(s)}")
    lo = [max(s[2 * d], t[2 * d]) for d in range(3)]  # per IJK axis
    hi = [min(s[2 * d + 1], t[2 * d + 1]) for d in range(3)]
    if any(lo[d] > hi[d] for d in range(3)):
        return out
    src = tuple(slice(lo[d] - s[2 * d], hi[d] - s[2 * d] + 1) for d in (2, 1, 0))
    dst = tuple(slice(lo[d] - t[2 * d], hi[d] - t[2 * d] + 1) for d in (2, 1, 0))
    out[dst] = a[src]
    return out


def same_lattice(a: Any, b: Any, tol: float = 1e-6) -> bool:
    """True when two IJK->RAS matrices describe the same voxel lattice (same directions, spacing, origin)."""
    return bool(np.allclose(as_matrix(a), as_matrix(b), atol=tol))
