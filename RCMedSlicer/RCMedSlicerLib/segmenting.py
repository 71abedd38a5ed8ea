"""One segmentation request, from a copied volume to per-target masks, without Slicer.

The Slicer layer builds a ``Request`` on the main thread (a copy of the voxels and the world geometry),
``run`` calls the engine (in a worker thread), and ``targets`` turns the result into what the scene gets:
one mask per target with its name, colour, terminology entry and tags.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from rcmed_engine.geometry import Geometry, Volume

from . import terminology
from .geometry import GeometryError, slice_axis
from .settings import clean_prompt


class RequestError(ValueError):
    """A request that cannot be run; the message says what to change."""


@dataclass
class Request:
    volume: Volume  # voxels (z, y, x) copied from Slicer, with the world geometry (LPS)
    prompt: str
    modality: str | None  # None: let the engine infer it
    axis: str  # plane the engine steps through
    slices: tuple[int, int] | None  # half-open range along ``slice_axis``; None = all
    slice_axis: int  # numpy axis of ``axis`` for this volume
    source: str = ""  # node name, for messages

    def describe(self) -> str:
        where = "the whole volume" if self.slices is None else (
            f"slice {self.slices[0]}" if self.slices[1] - self.slices[0] == 1
            else f"slices {self.slices[0]}..{self.slices[1] - 1}")
        return f"'{self.prompt}' on {where} ({self.axis})"


def make_request(array: np.ndarray, geometry: Geometry, prompt: str, modality: str | None = "auto",
                 axis: str = "axial", slices: tuple[int, int] | None = None, source: str = "") -> Request:
    text = clean_prompt(prompt)
    if not text:
        raise RequestError("type what to segment, e.g. 'liver' or 'liver and spleen'")
    a = np.asarray(array)
    if a.ndim != 3:
        raise RequestError(f"the input must be a 3D scalar volume, got voxels of shape {a.shape}")
    if a.size == 0:
        raise RequestError("the input volume is empty")
    try:
        ax = slice_axis(geometry, a.shape, axis)
    except GeometryError as exc:
        raise RequestError(str(exc)) from None
    if slices is not None:
        lo, hi = int(slices[0]), int(slices[1])
        if not 0 <= lo < hi <= a.shape[ax]:
            raise RequestError(f"slices {lo}..{hi - 1} are outside the volume (0..{a.shape[ax] - 1} along {axis})")
        slices = (lo, hi)
    mod = None if (modality is None or str(modality).strip().lower() in ("", "auto")) else str(modality)
    meta = {"modality": mod} if mod else {}
    return Request(Volume(a, geometry, meta), text, mod, axis, slices, ax, source)


def run(engine: Any, request: Request, progress: Callable[[int, int], None] | None = None,
        cancel: Any = None) -> Any:
    """The engine's ``segment`` on a request (safe in a worker thread: no Slicer objects involved)."""
    return engine.segment(request.volume, request.prompt, modality=request.modality, axis=request.axis,
                          slices=request.slices, progress=progress, cancel=cancel)


def _tag_text(text: Any, forbid: str = "") -> str:
    """Slicer stores segment tags as ``key:value|``; keep them on one line without separators."""
    s = " ".join(str(text).split())
    for ch in forbid + "|":
        s = s.replace(ch, "/")
    return s


@dataclass
class TargetMask:
    name: str
    label_value: int
    mask: np.ndarray  # bool (z, y, x) on the request's voxels
    color: tuple[float, float, float]
    terminology_entry: str  # "" when the General Anatomy list has no match
    tags: dict[str, str] = field(default_factory=dict)
    presence: float = float("nan")  # highest presence score over the processed slices
    slices_found: int = 0  # processed slices where the mask is not empty
    slices_processed: int = 0


def targets(result: Any, request: Request) -> list[TargetMask]:
    """One TargetMask per target of a SegmentResult, named after the target."""
    out = []
    infos = {s.label_value: s for s in result.segments()}
    lo, hi = request.slices if request.slices is not None else (0, result.labels.shape[request.slice_axis])
    for t, name in enumerate(result.targets):
        value = t + 1
        mask = result.labels == value
        info = infos.get(value)
        scores = np.asarray(result.presence[t], dtype=np.float64)
        scores = scores[np.isfinite(scores)]
        per_slice = np.moveaxis(mask, request.slice_axis, 0)[lo:hi].reshape(hi - lo, -1).any(axis=1)
        match = terminology.lookup(name)
        tags = {_tag_text(k, ":"): _tag_text(v) for k, v in (info.tags if info else {}).items()}
        out.append(TargetMask(
            name=name, label_value=value, mask=mask,
            color=tuple(info.color) if info else terminology.color_for(name, t),
            terminology_entry=match.entry if match else "",
            tags=tags, presence=float(scores.max()) if scores.size else float("nan"),
            slices_found=int(per_slice.sum()), slices_processed=int(hi - lo)))
    return out


def readable_answer(answer: str) -> str:
    """The model's answer without its markup tokens (<p>, </p>, [SEG]), for display."""
    text = str(answer)
    for token in ("<p>", "</p>", "[SEG]"):
        text = text.replace(token, " ")
    text = " ".join(text.split())
    for mark in (".", ",", ";", ":"):
        text = text.replace(" " + mark, mark)
    return text


def presence_text(items: list[TargetMask]) -> str:
    lines = []
    for m in items:
        score = "n/a" if not np.isfinite(m.presence) else f"{m.presence:.2f}"
        found = (f"found on {m.slices_found} of {m.slices_processed} slices" if m.slices_found
                 else f"not found on the {m.slices_processed} slices processed")
        lines.append(f"{m.name}: presence {score}, {found}")
    return "\n".join(lines)
