"""Clicks and boxes that correct a text prompt's mask: what the user gives, and where it lands.

A click is a point in patient space (RAS millimetres, as Slicer's markups hold them) labelled include or
exclude, for one target of the prompt. A box is two opposite corners in RAS on one slice. Both are mapped
through the volume's geometry (any direction, oblique or flipped, anisotropic spacing) to the slice stack
that the engine cuts (``geometry.to_slices``): a slice index and a continuous (row, col) position whose
integer values are pixel centres. Torch-free: the CLI, the server and the Slicer module parse and check
clicks with it before any model is loaded.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from .geometry import Geometry, SliceFrame
from .results import EngineError

INCLUDE, EXCLUDE = "include", "exclude"
_RAS_TO_LPS = np.array([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class Click:
    """An include or exclude point at ``ras`` (mm) for ``target`` (a name of the prompt; None: the first)."""

    ras: tuple[float, float, float]
    include: bool = True
    target: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "ras", _ras(self.ras, "a click"))

    def to_json(self) -> dict[str, object]:
        return {"ras": list(self.ras), "label": INCLUDE if self.include else EXCLUDE, "target": self.target}

    @classmethod
    def from_json(cls, data: dict) -> "Click":
        if not isinstance(data, dict) or "ras" not in data:
            raise EngineError(f"a click must be an object with 'ras' (and 'label', 'target'), got {data!r}")
        return cls(tuple(data["ras"]), _label(data.get("label", INCLUDE)), data.get("target"))


@dataclass(frozen=True)
class Box:
    """A box on one slice given by two opposite corners in RAS (mm), for ``target``."""

    first: tuple[float, float, float]
    second: tuple[float, float, float]
    target: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "first", _ras(self.first, "a box corner"))
        object.__setattr__(self, "second", _ras(self.second, "a box corner"))

    def to_json(self) -> dict[str, object]:
        return {"corners_ras": [list(self.first), list(self.second)], "target": self.target}

    @classmethod
    def from_json(cls, data: dict) -> "Box":
        corners = data.get("corners_ras") if isinstance(data, dict) else None
        if not isinstance(corners, (list, tuple)) or len(corners) != 2:
            raise EngineError(f"a box must be an object with 'corners_ras': [[R,A,S], [R,A,S]], got {data!r}")
        return cls(tuple(corners[0]), tuple(corners[1]), data.get("target"))


def _ras(values: Sequence[float], what: str) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise EngineError(f"{what} needs three numbers R,A,S in mm, got {values!r}") from None
    if len(out) != 3 or not all(math.isfinite(v) for v in out):
        raise EngineError(f"{what} needs three finite numbers R,A,S in mm, got {values!r}")
    return out  # type: ignore[return-value]


def _label(text: str) -> bool:
    word = str(text).strip().lower()
    if word in (INCLUDE, "+", "in", "positive"):
        return True
    if word in (EXCLUDE, "-", "out", "negative"):
        return False
    raise EngineError(f"a click's label must be 'include' or 'exclude', got {text!r}")


def parse_click(text: str) -> Click:
    """``R,A,S[:include|exclude[:TARGET]]`` (as ``--click`` takes it) -> Click."""
    parts = text.split(":", 2)
    coords = parts[0].split(",")
    if len(coords) != 3:
        raise EngineError(f"--click wants R,A,S[:include|exclude[:TARGET]] in mm, got {text!r}")
    include = _label(parts[1]) if len(parts) > 1 and parts[1].strip() else True
    target = parts[2].strip() if len(parts) > 2 and parts[2].strip() else None
    return Click(tuple(coords), include, target)  # type: ignore[arg-type]


def parse_box(text: str) -> Box:
    """``R,A,S:R,A,S[:TARGET]`` (two opposite corners, as ``--box`` takes it) -> Box."""
    parts = text.split(":", 2)
    if len(parts) < 2 or any(len(p.split(",")) != 3 for p in parts[:2]):
        raise EngineError(f"--box wants two corners R,A,S:R,A,S[:TARGET] in mm, got {text!r}")
    target = parts[2].strip() if len(parts) > 2 and parts[2].strip() else None
    return Box(tuple(parts[0].split(",")), tuple(parts[1].split(",")), target)  # type: ignore[arg-type]


def to_json(clicks: Iterable[Click], boxes: Iterable[Box] = ()) -> str:
    """The clicks and boxes as one JSON string (a result's provenance keeps it)."""
    return json.dumps({"clicks": [c.to_json() for c in clicks], "boxes": [b.to_json() for b in boxes]},
                      separators=(",", ":"))


# ------------------------------------------------------------------------------------------ geometry
@dataclass(frozen=True)
class SlicePoint:
    """A point in the slice stack: ``index`` along the cut, ``row``/``col`` continuous (pixel centres integer)."""

    index: int
    row: float
    col: float


def ras_to_stack(ras: Sequence[float], geometry: Geometry, shape_zyx: Sequence[int], frame: SliceFrame,
                 what: str = "the click") -> SlicePoint:
    """Where a RAS point falls in ``to_slices(array, frame)``; a one-line error when it is outside the image.

    A point counts as inside when it lies within half a voxel of the grid (the voxel's own extent)."""
    lps = np.asarray(ras, dtype=np.float64) * _RAS_TO_LPS
    ijk = geometry.lps_to_ijk(lps)
    zyx = ijk[::-1]
    shape = [int(s) for s in shape_zyx[:3]]
    if any(v < -0.5 or v > n - 0.5 for v, n in zip(zyx, shape)):
        r, a, s = (float(v) for v in ras)
        raise EngineError(f"{what} at R,A,S = {r:.1f},{a:.1f},{s:.1f} mm is outside the image "
                          f"(voxel i,j,k = {ijk[0]:.1f},{ijk[1]:.1f},{ijk[2]:.1f}; size {shape[2]}x{shape[1]}x{shape[0]})")
    index = int(np.clip(np.floor(zyx[frame.slice_axis] + 0.5), 0, shape[frame.slice_axis] - 1))
    row, col = zyx[frame.row_axis], zyx[frame.col_axis]
    if frame.flip_rows:
        row = shape[frame.row_axis] - 1 - row
    if frame.flip_cols:
        col = shape[frame.col_axis] - 1 - col
    return SlicePoint(index, float(row), float(col))


def stack_to_ras(point: SlicePoint, geometry: Geometry, shape_zyx: Sequence[int], frame: SliceFrame) -> np.ndarray:
    """Inverse of ``ras_to_stack``: the RAS position (mm) of a stack point (used by the simulated user)."""
    shape = [int(s) for s in shape_zyx[:3]]
    zyx = [0.0, 0.0, 0.0]
    row = shape[frame.row_axis] - 1 - point.row if frame.flip_rows else point.row
    col = shape[frame.col_axis] - 1 - point.col if frame.flip_cols else point.col
    zyx[frame.slice_axis], zyx[frame.row_axis], zyx[frame.col_axis] = float(point.index), row, col
    return geometry.ijk_to_lps(np.array(zyx[::-1])) * _RAS_TO_LPS
