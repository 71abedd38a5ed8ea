"""Correcting a text prompt's segment with include / exclude clicks, without Slicer.

The Segment Editor effect keeps the clicks of each segment in a markups fiducial node (the user sees, moves and
deletes them) and calls these helpers:

- ``clicks_from_markups``: the node's defined control points -> ``rcmed_engine.clicks.Click`` in world RAS
  (``GetNthControlPointPositionWorld``: a parent transform on the markups node is applied), include or exclude
  from the point's description;
- ``segment_on_grid``: the segment's labelmap brought onto the source volume's voxels (the previous mask);
- ``make_request`` / ``run``: one correction, copied on the main thread, run in a worker (``Engine.refine``);
- ``Corrections``: per segment, the mask the clicks correct (the segment as it was before the first click, so
  moving or deleting a click re-derives the correction instead of stacking on it), what was last written,
  and a generation counter: a result is written only if no newer correction was asked for meanwhile;
- ``near_point``: whether a view click lands on an existing point (then the markups widget moves it).

Nothing here imports slicer, qt, vtk or torch; the markups node and the matrices are duck-typed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from rcmed_engine.clicks import EXCLUDE, INCLUDE, Click
from rcmed_engine.geometry import Geometry, Volume

from . import geometry as rgeom
from .settings import clean_prompt

# Attributes of a click node: which segment it belongs to, and the prompt and plane its corrections use.
SEGMENTATION_ATTRIBUTE = "RCMed.SegmentationNodeID"
SEGMENT_ATTRIBUTE = "RCMed.SegmentID"
PROMPT_ATTRIBUTE = "RCMed.Prompt"
AXIS_ATTRIBUTE = "RCMed.Axis"
# vtkMRMLMarkupsNode::PositionDefined (Libs/MRML/Core/vtkMRMLMarkupsNode.h: PositionUndefined, PositionPreview,
# PositionDefined, PositionMissing = 0..3); only defined points are clicks.
POSITION_DEFINED = 2


class RefineError(ValueError):
    """A correction that cannot run; the message says what to do."""


def node_name(segment_name: str) -> str:
    return f"RCMed clicks: {segment_name}"


def point_text(include: bool, number: int) -> tuple[str, str]:
    """(label shown in the views, description kept on the point) of a new click."""
    return (f"+{number}" if include else f"-{number}"), (INCLUDE if include else EXCLUDE)


def is_include(description: str, label: str = "") -> bool:
    """A point's kind: its description ("include" / "exclude"), else its label's sign ("-3" is exclude)."""
    word = str(description or "").strip().lower()
    if word in (INCLUDE, EXCLUDE):
        return word == INCLUDE
    return not str(label or "").strip().startswith("-")


@dataclass(frozen=True)
class ClickPoint:
    """One control point as the panel lists it."""

    index: int  # control point index in the node
    label: str
    ras: tuple[float, float, float]  # world RAS (mm)
    include: bool

    def describe(self) -> str:
        r, a, s = self.ras
        return f"{self.label}  {'include' if self.include else 'exclude'}  R {r:.1f}, A {a:.1f}, S {s:.1f}"

    def click(self) -> Click:
        return Click(self.ras, self.include)


def points_from_markups(node: Any) -> list[ClickPoint]:
    """The defined control points of a markups node, positions in world RAS (parent transforms applied)."""
    if node is None:
        return []
    out = []
    for n in range(int(node.GetNumberOfControlPoints())):
        if int(node.GetNthControlPointPositionStatus(n)) != POSITION_DEFINED:
            continue  # being placed, or skipped: not a click yet
        ras = [0.0, 0.0, 0.0]
        node.GetNthControlPointPositionWorld(n, ras)
        label = node.GetNthControlPointLabel(n)
        out.append(ClickPoint(n, label, (float(ras[0]), float(ras[1]), float(ras[2])),
                              is_include(node.GetNthControlPointDescription(n), label)))
    return out


def clicks_from_markups(node: Any) -> tuple[Click, ...]:
    """The clicks a markups node holds, as the engine takes them (world RAS, include / exclude)."""
    return tuple(p.click() for p in points_from_markups(node))


def next_number(node: Any) -> int:
    """The number of the next click's label: one more than the highest "+n" / "-n" label in the node."""
    numbers = [0]
    for n in range(int(node.GetNumberOfControlPoints()) if node is not None else 0):
        text = str(node.GetNthControlPointLabel(n)).strip().lstrip("+-")
        if text.isdigit():
            numbers.append(int(text))
    return max(numbers) + 1


# -------------------------------------------------------------------------------------------- slice views
def ras_to_xy(xy_to_ras: Any, ras: Sequence[float]) -> np.ndarray:
    """A world RAS point in a slice view's XY (pixels), through the inverse of the slice node's XYToRAS."""
    m = rgeom.as_matrix(xy_to_ras)
    xyz = np.linalg.solve(m, np.array([float(ras[0]), float(ras[1]), float(ras[2]), 1.0]))
    return xyz[:2]


def near_point(xy: Sequence[float], xy_to_ras: Any, points: Sequence[ClickPoint], tolerance_px: float = 6.0,
               tolerance_slices: float = 0.5) -> ClickPoint | None:
    """The click point shown under view position ``xy`` (within ``tolerance_px`` pixels, on the view's slice), if any.

    A press there is left to the markups widget, so that the user drags the point instead of adding one."""
    m = rgeom.as_matrix(xy_to_ras)
    best, best_d = None, float(tolerance_px)
    for p in points:
        xyz = np.linalg.solve(m, np.array([*p.ras, 1.0]))
        if abs(xyz[2]) > tolerance_slices:
            continue  # on another slice: not shown here
        d = float(np.hypot(xyz[0] - float(xy[0]), xyz[1] - float(xy[1])))
        if d <= best_d:
            best, best_d = p, d
    return best


# ------------------------------------------------------------------------------------------- the previous mask
def segment_on_grid(segment_array: np.ndarray | None, segment_extent: Sequence[int] | None, segment_matrix: Any,
                    grid_extent: Sequence[int], grid_matrix: Any) -> np.ndarray:
    """A segment's labelmap (its own extent) on the source grid's voxels, as a bool (z, y, x) array.

    Both matrices map IJK to segmentation coordinates (vtkOrientedImageData ImageToWorld); they must describe
    the same lattice, as they do when the segmentation's geometry comes from the source volume."""
    e = [int(v) for v in grid_extent]
    shape = (e[5] - e[4] + 1, e[3] - e[2] + 1, e[1] - e[0] + 1)
    if segment_array is None or segment_extent is None or np.asarray(segment_array).size == 0:
        return np.zeros(shape, bool)
    if not rgeom.same_lattice(segment_matrix, grid_matrix):
        raise RefineError("the segment's geometry differs from the source volume's; "
                          "set the segmentation geometry from the source volume")
    return rgeom.paste_extent(np.asarray(segment_array), segment_extent, grid_extent) > 0


# --------------------------------------------------------------------------------------------- one correction
@dataclass
class RefineRequest:
    volume: Volume  # the source voxels (z, y, x) copied from Slicer, with the world geometry
    prompt: str
    clicks: tuple[Click, ...]
    previous: np.ndarray  # uint8 (z, y, x): 1 where the segment was before the clicks
    modality: str | None
    axis: str
    key: tuple[str, str]  # (segmentation node ID, segment ID)
    generation: int = 0

    def describe(self) -> str:
        inc = sum(c.include for c in self.clicks)
        exc = len(self.clicks) - inc
        return f"'{self.prompt}' with {inc} include and {exc} exclude click{'s' if exc != 1 else ''}"


def make_request(array: np.ndarray, geometry: Geometry, prompt: str, clicks: Sequence[Click],
                 previous: np.ndarray, modality: str | None = "auto", axis: str = "axial",
                 key: tuple[str, str] = ("", ""), generation: int = 0) -> RefineRequest:
    text = clean_prompt(prompt)
    if not text:
        raise RefineError("type what the segment is (e.g. 'liver') and press Apply before clicking")
    a = np.asarray(array)
    if a.ndim != 3 or a.size == 0:
        raise RefineError(f"the source volume must be a 3D scalar volume, got voxels of shape {a.shape}")
    prev = np.asarray(previous)
    if prev.shape != a.shape:
        raise RefineError(f"the segment ({prev.shape}) is not on the source volume's grid ({a.shape})")
    if not clicks:
        raise RefineError("no clicks to correct with")
    if axis not in ("axial", "coronal", "sagittal"):
        axis = "axial"
    mod = None if (modality is None or str(modality).strip().lower() in ("", "auto")) else str(modality)
    meta = {"modality": mod} if mod else {}
    return RefineRequest(Volume(a, geometry, meta), text, tuple(clicks), (prev > 0).astype(np.uint8), mod, axis,
                         (str(key[0]), str(key[1])), int(generation))


def run(engine: Any, request: RefineRequest, progress: Callable[[int, int], None] | None = None,
        cancel: Any = None) -> Any:
    """The engine's ``refine`` on a request (safe in a worker thread: no Slicer objects involved)."""
    refine = getattr(engine, "refine", None)
    if not callable(refine):
        raise RefineError("this engine cannot correct with clicks (it has no 'refine'); update RCMed or the server")
    return refine(request.volume, request.prompt, list(request.clicks), previous=request.previous,
                  modality=request.modality, axis=request.axis, progress=progress, cancel=cancel)


def corrected_mask(result: Any) -> np.ndarray:
    """The corrected segment: the first target of the refined label map (the segment was given as label 1)."""
    return np.asarray(result.labels) == 1


def click_summary(points: Sequence[ClickPoint]) -> str:
    inc = sum(p.include for p in points)
    return f"{inc} include, {len(points) - inc} exclude"


# ------------------------------------------------------------------------------------------------ bookkeeping
@dataclass
class _Base:
    mask: np.ndarray  # bool, on the source grid: what the clicks correct
    lattice: np.ndarray  # 4x4 IJK -> segmentation of numpy index (0, 0, 0) of that grid
    written: np.ndarray | None = None  # what the last correction wrote


@dataclass
class Corrections:
    """Per effect and per segment: the base mask, a generation counter, and the correction waiting to start.

    One job runs at a time (the engine is shared). A new click on a segment bumps that segment's generation:
    the correction still running for it is stale (cancelled, and its result dropped even if it finished
    first), and only the newest correction asked for waits in ``queued``; segments do not cancel each other.
    """

    _generations: dict = field(default_factory=dict)
    _bases: dict = field(default_factory=dict)
    queued: dict = field(default_factory=dict)  # key -> what starts the newest correction of that segment

    def next_generation(self, key: tuple[str, str]) -> int:
        self._generations[key] = self._generations.get(key, 0) + 1
        return self._generations[key]

    def is_current(self, key: tuple[str, str], generation: int) -> bool:
        """True when no correction of ``key`` was asked for after the one of ``generation``: it may be written."""
        return int(generation) == self._generations.get(key, 0)

    def previous(self, key: tuple[str, str], current: np.ndarray, lattice: Any) -> np.ndarray:
        """The mask a correction of ``key`` starts from.

        The segment as it was before its first click, so that moving or deleting a click re-derives the
        correction. If the segment is no longer what the last correction wrote (the user painted, undid or
        applied a prompt), its current mask becomes the new start."""
        current = np.asarray(current, bool)
        lattice = rgeom.as_matrix(lattice)
        base = self._bases.get(key)
        if (base is None or base.mask.shape != current.shape or not rgeom.same_lattice(base.lattice, lattice)
                or (base.written is not None and not np.array_equal(base.written, current))
                or (base.written is None and not np.array_equal(base.mask, current))):
            base = _Base(current.copy(), lattice)
            self._bases[key] = base
        return base.mask

    def written(self, key: tuple[str, str], mask: np.ndarray) -> None:
        """Record what the segment holds after a correction was written (read back: masking may have kept voxels)."""
        if key in self._bases:
            self._bases[key].written = np.asarray(mask, bool).copy()

    def forget(self, key: tuple[str, str]) -> None:
        """Drop the base and any waiting correction (Clear clicks: the segment as it is becomes the next base)."""
        self._bases.pop(key, None)
        self.queued.pop(key, None)
        self.next_generation(key)  # a correction still running for it is stale

    def has_base(self, key: tuple[str, str]) -> bool:
        return key in self._bases

    def take_queued(self) -> Any:
        """The oldest waiting correction (removed), or None."""
        if not self.queued:
            return None
        key = next(iter(self.queued))
        return self.queued.pop(key)
