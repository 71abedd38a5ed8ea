"""Image geometry in patient space (ITK/DICOM LPS convention) and anatomical slicing.

Conventions used throughout the engine:

* ``Geometry.direction`` is the row-major 3x3 ITK direction matrix: column ``k`` is the
  unit vector, in LPS patient coordinates, along which index axis ``k`` grows
  (index axes ``i, j, k`` = ``x, y, z``).
* Arrays are in numpy order ``(z, y, x)`` (what ``sitk.GetArrayFromImage`` returns), or
  ``(z, y, x, c)`` for RGB pixels. Numpy axis ``a`` is therefore index axis ``2 - a``.
* The physical position of voxel index ``(i, j, k)`` is
  ``origin + direction @ (spacing * (i, j, k))`` in LPS millimetres.

The engine works on 2D slices. ``slice_frame`` chooses, from the direction matrix, which
array axis to step through for an anatomical plane and how to transpose/flip each slice
into the radiological display convention; ``to_slices``/``from_slices`` apply that
exactly (pure transposes and flips, no resampling), so masks predicted on slices land
on the right voxels.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

__all__ = [
    "Geometry",
    "Volume",
    "PLANES",
    "SliceFrame",
    "slice_frame",
    "to_slices",
    "from_slices",
    "closest_axes",
]

PLANES = ("axial", "coronal", "sagittal")

# LPS -> RAS for homogeneous 4x4 matrices (Slicer works in RAS).
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _floats(values: Any, n: int, what: str) -> tuple[float, ...]:
    out = tuple(float(v) for v in np.asarray(values, dtype=np.float64).ravel())
    if len(out) != n:
        raise ValueError(f"geometry {what} needs {n} numbers, got {len(out)}")
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"geometry {what} contains NaN or infinite values: {out}")
    return out


@dataclass(frozen=True)
class Geometry:
    """Where the voxel grid sits in patient space (LPS, millimetres).

    ``origin`` is the LPS position of voxel (0, 0, 0); ``spacing`` is (x, y, z) voxel size;
    ``direction`` is 9 floats, row-major 3x3, column k = LPS direction of index axis k.
    Values are stored as Python floats exactly as given (no re-normalisation), so a
    geometry read from a file compares bit-exactly with the one written to it.
    """

    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    direction: tuple[float, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "origin", _floats(self.origin, 3, "origin"))
        object.__setattr__(self, "spacing", _floats(self.spacing, 3, "spacing"))
        object.__setattr__(self, "direction", _floats(self.direction, 9, "direction"))
        if min(self.spacing) <= 0:
            raise ValueError(f"geometry spacing must be positive, got {self.spacing}")
        if abs(np.linalg.det(self.direction_matrix)) < 1e-6:
            raise ValueError(f"geometry direction matrix is singular: {self.direction}")

    # -- matrices -------------------------------------------------------------------
    @property
    def direction_matrix(self) -> np.ndarray:
        """3x3 direction matrix (columns = LPS directions of the i, j, k axes)."""
        return np.array(self.direction, dtype=np.float64).reshape(3, 3)

    def ijk_to_lps_matrix(self) -> np.ndarray:
        """4x4 homogeneous matrix from voxel index (i, j, k) to LPS millimetres."""
        m = np.eye(4)
        # Column-wise product, the same rounding ITK and NRRD 'space directions' use.
        m[:3, :3] = self.direction_matrix * np.array(self.spacing)[None, :]
        m[:3, 3] = self.origin
        return m

    def ijk_to_ras_matrix(self) -> np.ndarray:
        """4x4 IJK -> RAS matrix, i.e. Slicer's ``IJKToRASMatrix`` for this volume."""
        return _LPS_TO_RAS @ self.ijk_to_lps_matrix()

    def ijk_to_lps(self, points: Any) -> np.ndarray:
        """Map continuous indices (..., 3) in (i, j, k) = (x, y, z) order to LPS mm."""
        p = np.asarray(points, dtype=np.float64)
        m = self.ijk_to_lps_matrix()
        return p @ m[:3, :3].T + m[:3, 3]

    def lps_to_ijk(self, points: Any) -> np.ndarray:
        """Map LPS mm points (..., 3) to continuous (i, j, k) indices (not rounded)."""
        p = np.asarray(points, dtype=np.float64)
        m = self.ijk_to_lps_matrix()
        return np.linalg.solve(m[:3, :3], (p - m[:3, 3]).reshape(-1, 3).T).T.reshape(p.shape)

    @classmethod
    def from_ijk_to_lps(cls, matrix: Any) -> "Geometry":
        """Decompose a 4x4 (or 3x4) IJK->LPS matrix into origin/spacing/direction."""
        m = np.asarray(matrix, dtype=np.float64)
        cols = m[:3, :3]
        spacing = [math.hypot(*cols[:, k]) for k in range(3)]
        direction = cols / np.array(spacing)[None, :]
        return cls(tuple(m[:3, 3]), tuple(spacing), tuple(direction.ravel()))

    # -- SimpleITK ------------------------------------------------------------------
    @classmethod
    def from_sitk(cls, image: Any) -> "Geometry":
        """Geometry of a 2D or 3D SimpleITK image.

        A 2D image is embedded as a one-slice 3D grid: origin (ox, oy, 0), spacing
        (sx, sy, 1), the 2D direction in the upper-left 2x2 and 1 at [2, 2].
        """
        dim = image.GetDimension()
        if dim == 3:
            return cls(image.GetOrigin(), image.GetSpacing(), image.GetDirection())
        if dim == 2:
            ox, oy = image.GetOrigin()
            sx, sy = image.GetSpacing()
            d = image.GetDirection()
            return cls((ox, oy, 0.0), (sx, sy, 1.0), (d[0], d[1], 0.0, d[2], d[3], 0.0, 0.0, 0.0, 1.0))
        raise ValueError(f"only 2D and 3D images have a Geometry, got {dim}D")

    @property
    def is_2d_embedding(self) -> bool:
        """True when this is exactly what ``from_sitk`` makes of a 2D image."""
        d = self.direction
        return (
            self.origin[2] == 0.0
            and self.spacing[2] == 1.0
            and d[2] == 0.0 and d[5] == 0.0 and d[6] == 0.0 and d[7] == 0.0 and d[8] == 1.0
        )

    def apply_to(self, image: Any) -> Any:
        """Set this geometry on a SimpleITK image (in place) and return it.

        For a 2D image the geometry must be a 2D embedding (see ``from_sitk``).
        """
        dim = image.GetDimension()
        if dim == 3:
            image.SetOrigin(self.origin)
            image.SetSpacing(self.spacing)
            image.SetDirection(self.direction)
            return image
        if dim == 2:
            if not self.is_2d_embedding:
                raise ValueError("cannot put a 3D geometry on a 2D image")
            d = self.direction
            image.SetOrigin(self.origin[:2])
            image.SetSpacing(self.spacing[:2])
            image.SetDirection((d[0], d[1], d[3], d[4]))
            return image
        raise ValueError(f"only 2D and 3D images have a Geometry, got {dim}D")


@dataclass
class Volume:
    """Voxels plus geometry. ``array`` is (z, y, x) or (z, y, x, c) for RGB pixels.

    2D images (X-ray, microscopy, photos) are volumes with z = 1.
    ``meta`` carries e.g. ``{"modality": "CT", "source": "/path"}``.
    """

    array: np.ndarray
    geometry: Geometry
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.array.ndim not in (3, 4):
            raise ValueError(f"Volume array must be (z, y, x) or (z, y, x, c), got shape {self.array.shape}")

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.array.shape[:3])  # type: ignore[return-value]

    @property
    def n_channels(self) -> int:
        return 1 if self.array.ndim == 3 else int(self.array.shape[3])

    @property
    def is_rgb(self) -> bool:
        return self.n_channels == 3

    @property
    def is_2d(self) -> bool:
        """A single-slice (z = 1) image: sliced only in its own plane."""
        return self.shape_zyx[0] == 1

    def slice_frame(self, plane: str) -> "SliceFrame":
        """``slice_frame`` for this volume (knows its shape, so 2D images are handled)."""
        return slice_frame(self.geometry, plane, self.shape_zyx)


# ---------------------------------------------------------------------------------
# Anatomical planes
# ---------------------------------------------------------------------------------

# plane -> (LPS axis normal to the plane, (LPS axis, sign) that rows step along,
#           (LPS axis, sign) that columns step along). Radiological display convention:
#   axial:    top = anterior (rows go to +P), image left = patient right (cols go to +L)
#   coronal:  top = superior (rows go to -S), cols go to +L
#   sagittal: top = superior (rows go to -S), image left = anterior (cols go to +P)
_PLANE_LAYOUT: dict[str, tuple[int, tuple[int, int], tuple[int, int]]] = {
    "axial": (2, (1, +1), (0, +1)),
    "coronal": (1, (2, -1), (0, +1)),
    "sagittal": (0, (2, -1), (1, +1)),
}


def closest_axes(direction: Any) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Closest signed permutation to a direction matrix.

    Returns ``(index_axis, sign)`` where ``index_axis[r]`` is the index axis (0=i, 1=j,
    2=k) best aligned with LPS axis ``r`` (0=L, 1=P, 2=S) and ``sign[r]`` is +1 when that
    index grows towards +L/+P/+S. Maximises the summed |cos| over the 6 permutations,
    so every LPS axis gets a distinct index axis even for oblique matrices (ties go to
    the first permutation in itertools order, which keeps the choice deterministic).
    """
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    best: tuple[int, ...] | None = None
    best_score = -1.0
    for perm in itertools.permutations(range(3)):
        score = sum(abs(d[r, perm[r]]) for r in range(3))
        if score > best_score + 1e-12:
            best, best_score = perm, score
    assert best is not None
    signs = tuple(1 if d[r, best[r]] >= 0 else -1 for r in range(3))
    return tuple(best), signs  # type: ignore[return-value]


@dataclass(frozen=True)
class SliceFrame:
    """How to cut a (z, y, x[, c]) array into 2D slices for one plane, and back.

    ``to_slices`` returns ``array.transpose(slice_axis, row_axis, col_axis[, 3])`` with
    rows and/or columns reversed per ``flip_rows``/``flip_cols``. Slices are never
    reversed: stack index n is voxel index n along ``slice_axis`` (what Slicer's IJK
    shows), so ``--slices A:B`` means voxel indices A..B-1 along that axis.
    ``single_slice`` frames (2D images) keep rows/columns exactly as stored.
    """

    plane: str
    slice_axis: int
    row_axis: int
    col_axis: int
    flip_rows: bool
    flip_cols: bool
    pixel_spacing: tuple[float, float]
    slice_spacing: float
    single_slice: bool = False

    @property
    def axes(self) -> tuple[int, int, int]:
        return (self.slice_axis, self.row_axis, self.col_axis)


def slice_frame(
    geometry: "Geometry | Volume",
    plane: str,
    shape_zyx: Sequence[int] | None = None,
) -> SliceFrame:
    """Frame for cutting a volume along an anatomical ``plane`` (see ``PLANES``).

    The plane is taken in patient space from the direction matrix, not from the array
    order: a coronally acquired volume is still cut axially when "axial" is asked.

    Single-slice volumes (2D images): when the shape is known (pass ``shape_zyx`` or a
    ``Volume``) and one of its axes has size 1, the frame steps through that axis
    whatever plane was asked for, with no transpose or flip, because the only
    meaningful plane of a 2D X-ray/microscopy image is its own and it must not be
    re-oriented. Without a shape the volume is assumed to be 3D.
    """
    if isinstance(geometry, Volume):
        if shape_zyx is None:
            shape_zyx = geometry.shape_zyx
        geometry = geometry.geometry
    if plane not in _PLANE_LAYOUT:
        raise ValueError(f"unknown plane {plane!r}; choose one of {', '.join(PLANES)}")
    spacing_np = [geometry.spacing[2 - a] for a in range(3)]  # spacing per numpy axis

    if shape_zyx is not None:
        shape = tuple(int(n) for n in shape_zyx[:3])
        if 1 in shape:
            s_ax = shape.index(1)
            r_ax, c_ax = (a for a in range(3) if a != s_ax)
            return SliceFrame(
                plane=plane, slice_axis=s_ax, row_axis=r_ax, col_axis=c_ax,
                flip_rows=False, flip_cols=False,
                pixel_spacing=(spacing_np[r_ax], spacing_np[c_ax]),
                slice_spacing=spacing_np[s_ax], single_slice=True,
            )

    index_axis, sign = closest_axes(geometry.direction)
    normal, (row_lps, row_sign), (col_lps, col_sign) = _PLANE_LAYOUT[plane]
    s_ax = 2 - index_axis[normal]
    r_ax = 2 - index_axis[row_lps]
    c_ax = 2 - index_axis[col_lps]
    return SliceFrame(
        plane=plane, slice_axis=s_ax, row_axis=r_ax, col_axis=c_ax,
        flip_rows=sign[row_lps] != row_sign,
        flip_cols=sign[col_lps] != col_sign,
        pixel_spacing=(spacing_np[r_ax], spacing_np[c_ax]),
        slice_spacing=spacing_np[s_ax],
    )


def _check_ndim(a: np.ndarray, what: str) -> None:
    if a.ndim not in (3, 4):
        raise ValueError(f"{what} must have 3 dims (or 4 with a channel axis), got shape {a.shape}")


def to_slices(array: np.ndarray, frame: SliceFrame) -> np.ndarray:
    """(z, y, x[, c]) -> (n, rows, cols[, c]) for ``frame``.

    Returns a view when possible (no copy of a large CT); copy before writing into it.
    """
    _check_ndim(array, "array")
    out = np.transpose(array, frame.axes + tuple(range(3, array.ndim)))
    if frame.flip_rows:
        out = out[:, ::-1]
    if frame.flip_cols:
        out = out[:, :, ::-1]
    return out


def from_slices(stack: np.ndarray, frame: SliceFrame) -> np.ndarray:
    """Exact inverse of ``to_slices``: (n, rows, cols[, c]) -> (z, y, x[, c])."""
    _check_ndim(stack, "stack")
    if frame.flip_rows:
        stack = stack[:, ::-1]
    if frame.flip_cols:
        stack = stack[:, :, ::-1]
    inverse = tuple(int(a) for a in np.argsort(frame.axes))
    return np.transpose(stack, inverse + tuple(range(3, stack.ndim)))


def parse_slice_range(text: str | None) -> tuple[int | None, int | None] | None:
    """'A:B' -> (A, B); 'A:' and ':B' leave one end open; None -> None. Raises ValueError (one line)."""
    if text is None:
        return None
    parts = text.split(":")
    if len(parts) != 2:
        raise ValueError(f"--slices must look like A:B, got {text!r}")
    try:
        return tuple(int(p) if p.strip() else None for p in parts)  # type: ignore[return-value]
    except ValueError:
        raise ValueError(f"--slices must be two whole numbers A:B, got {text!r}") from None
