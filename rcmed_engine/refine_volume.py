"""``Engine.refine``: a text prompt's label map corrected by clicks and boxes, carried through the volume.

The per-slice logic is ``refine``'s; this module checks the input (clicks inside the image, boxes with an
area, an earlier result of the same geometry), segments clicked slices the text never reached, builds each
slice's decoder view from the engine's caches (so a click on a slice already segmented costs only the
decoder), and writes one label map with provenance that records the clicks.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from .clicks import Box, Click, SlicePoint, parse_box, parse_click, ras_to_stack, to_json
from .geometry import Volume, from_slices, to_slices
from .preprocess import MODALITY_TEXT, to_uint8_rgb
from .prompts import parse_targets
from .refine import SliceEdits, SliceView, add_to_slice, carry_object, remove_from_slice
from .results import Cancelled, EngineError, SegmentResult, as_volume
from .vocabulary import resolve_targets

if TYPE_CHECKING:
    from .engine import Engine, ProgressCallback, _Prepared
    from .results import CancelToken

def _as_clicks(clicks: Sequence[Click | str], boxes: Sequence[Box | str] | None) -> tuple[list[Click], list[Box]]:
    out_c = [c if isinstance(c, Click) else parse_click(str(c)) for c in clicks or ()]
    out_b = [b if isinstance(b, Box) else parse_box(str(b)) for b in boxes or ()]
    if not out_c and not out_b:
        raise EngineError("nothing to refine with: give at least one click or box")
    return out_c, out_b


def _target_index(target: str | None, typed: list[str], asked: list[str]) -> int:
    if target is None:
        return 0
    key = " ".join(target.lower().split())
    for names in (typed, asked):
        low = [" ".join(n.lower().split()) for n in names]
        if key in low:
            return low.index(key)
    raise EngineError(f"a click names the target {target!r}, which the prompt does not: it asks for {', '.join(typed)}")


def _edits(prep: "_Prepared", clicks: list[Click], boxes: list[Box], typed: list[str],
           asked: list[str], lo: int, hi: int) -> dict[int, dict[int, SliceEdits]]:
    """target -> slice -> its edits, in stack pixels; a one-line error for any prompt outside the image,
    outside the range, or a box without area."""
    geo, shape = prep.volume.geometry, prep.volume.shape_zyx
    edits: dict[int, dict[int, SliceEdits]] = defaultdict(lambda: defaultdict(SliceEdits))

    def locate(ras, what: str) -> SlicePoint:
        p = ras_to_stack(ras, geo, shape, prep.frame, what)
        if not lo <= p.index < hi:
            raise EngineError(f"{what} at R,A,S = {', '.join(f'{v:.1f}' for v in ras)} is on {prep.frame.plane} "
                              f"slice {p.index}, outside the range {lo}:{hi} being refined")
        return p

    for c in clicks:
        p = locate(c.ras, "the include click" if c.include else "the exclude click")
        e = edits[_target_index(c.target, typed, asked)][p.index]
        (e.include if c.include else e.exclude).append((p.row, p.col))
    for b in boxes:
        p, q = locate(b.first, "a box corner"), locate(b.second, "a box corner")
        if p.index != q.index:
            raise EngineError(f"a box's corners lie on {prep.frame.plane} slices {p.index} and {q.index}; "
                              "both must be on the slice the box is drawn on")
        r0, r1 = sorted((p.row, q.row))
        c0, c1 = sorted((p.col, q.col))
        if round(r1) - round(r0) < 1 or round(c1) - round(c0) < 1:
            raise EngineError(f"the box on {prep.frame.plane} slice {p.index} has zero area "
                              f"({r1 - r0:.1f} x {c1 - c0:.1f} pixels); drag two opposite corners")
        edits[_target_index(b.target, typed, asked)][p.index].boxes.append((r0, c0, r1, c1))
    return edits


def _previous_labels(previous, prep: "_Prepared", n_targets: int) -> tuple[np.ndarray | None, set[int] | None]:
    """The earlier label map on the image's grid and the slices it covers (None: every slice)."""
    if previous is None:
        return None, set()
    volume = prep.volume
    if isinstance(previous, SegmentResult):
        geometry, labels = previous.geometry, previous.labels
        if len(previous.targets) != n_targets:
            raise EngineError(f"the earlier result has {len(previous.targets)} targets and the prompt "
                              f"{n_targets}; refine it with the prompt that made it")
        covered = set(range(*previous.slices)) if previous.axis == prep.frame.plane else None
    elif isinstance(previous, Volume):
        geometry, labels, covered = previous.geometry, previous.array, None
    else:
        geometry, labels, covered = volume.geometry, np.asarray(previous), None
    if labels.shape != tuple(volume.shape_zyx) or not _same_geometry(geometry, volume.geometry):
        raise EngineError("the earlier result is on another grid than the image (shape "
                          f"{tuple(labels.shape)} vs {tuple(volume.shape_zyx)}, or origin/spacing/direction "
                          "differ): give the image it was made from")
    return np.asarray(labels).astype(np.uint8, copy=False), covered


def _same_geometry(a, b) -> bool:
    return all(np.allclose(getattr(a, k), getattr(b, k), rtol=0, atol=1e-4) for k in ("origin", "spacing", "direction"))


class _Views:
    """Decoder views of one target's slices, built from the engine's caches."""

    def __init__(self, engine: "Engine", prep: "_Prepared", target: str, text: bool) -> None:
        self.engine, self.prep = engine, prep
        self.plan = engine.model.plan_prompt([target], MODALITY_TEXT[prep.modality]) if text else None
        self._with_text: dict[int, SliceView] = {}  # a clicked slice is viewed by both phases: one suffix pass

    @torch.inference_mode()
    def __call__(self, k: int, text: bool = True) -> SliceView:
        if text and self.plan is not None and k in self._with_text:
            return self._with_text[k]
        prep, engine = self.prep, self.engine
        rgb = to_uint8_rgb(np.ascontiguousarray(prep.stack[k:k + 1]), prep.window)
        feats, _ = engine._image_features(rgb, prep.transform)
        view = SliceView(feats.neck, prep.transform, prep.frame.pixel_spacing, rgb[0].mean(axis=-1))
        if text and self.plan is not None:
            state, _ = engine._prefix_states(rgb, prep.transform)
            out = engine.model.suffix(state, self.plan)
            view.text_embedding, view.seg = state.image_embedding, out.prompts[0, 0]
            self._with_text[k] = view
        return view


def refine(engine: "Engine", image, prompt: str, clicks: Sequence[Click | str], *,
           boxes: Sequence[Box | str] | None = None, previous=None, propagate: bool = True,
           modality: str | None = None, axis: str = "axial", slices: tuple[int | None, int | None] | None = None,
           progress: "ProgressCallback | None" = None, cancel: "CancelToken | None" = None,
           rgb: bool | None = None, text: bool = True) -> SegmentResult:
    """See ``Engine.refine``."""
    t_start = time.perf_counter()
    clicks, boxes = _as_clicks(clicks, boxes)
    with engine._lock:
        prep = engine.prepare(image, modality, axis, rgb)
        n = prep.stack.shape[0]
        lo, hi = engine._check_range(slices, n)
        typed = parse_targets(prompt)
        asked = resolve_targets(typed, engine.model.config.vocabulary, f"the {engine.preset} weights")[0]
        edits = _edits(prep, clicks, boxes, typed, asked, lo, hi)
        labels, covered = _previous_labels(previous, prep, len(typed))
        base = _segment_first(engine, prep, prompt, typed, labels, covered, edits, (lo, hi), axis, text)
        stack = to_slices(base.labels, prep.frame).copy()
        _check_excludes(edits, stack, asked, prep.frame.plane)
        timings = {"click_s": 0.0, "propagate_s": 0.0, "slices_carried": 0.0}
        stop = (lambda: cancel is not None and cancel.is_set())
        for step, (t, per_slice) in enumerate(sorted(edits.items())):
            if progress:
                progress(step, len(edits))
            mask = stack == t + 1
            touched = _correct_target(engine, _Views(engine, prep, asked[t], text), mask, per_slice, lo, hi,
                                      propagate, stop, timings)
            if stop():
                raise Cancelled("cancelled; nothing was written")
            for k in touched:
                stack[k][stack[k] == t + 1] = 0
                stack[k][mask[k]] = t + 1
        if progress:
            progress(len(edits), len(edits))
        out = np.ascontiguousarray(from_slices(stack, prep.frame))
        provenance = {**engine.provenance(prompt), "RCMed.clicks": to_json(clicks, boxes)}
        return SegmentResult(labels=out, geometry=prep.volume.geometry, targets=asked, presence=base.presence,
                             slices=base.slices, axis=axis, modality=prep.modality, answer=base.answer,
                             prompt=prompt, timings={**base.timings, **timings,
                                                     "total_s": time.perf_counter() - t_start},
                             provenance=provenance, notes=base.notes)


def _correct_target(engine: "Engine", views: _Views, mask: np.ndarray, per_slice: dict[int, SliceEdits], lo: int,
                    hi: int, propagate: bool, stop, timings: dict[str, float]) -> set[int]:
    """One target's corrections on ``mask`` (n, H, W) bool, in place; returns the slices it changed.

    Adding comes first (boxes and include clicks on their slices, each added object carried on its own),
    then taking away (exclude clicks, on the mask as adding left it, so a leak that carrying brought can be
    clicked away too; each removed region carried along the leak). Carried objects reach clicked slices
    too (two objects clicked on two slices both continue), but a carried removal never takes an include
    click's pixel."""
    model, clicked = engine.model, set(per_slice)
    touched = set(clicked)
    for phase in ("add", "remove"):
        t0 = time.perf_counter()
        carried: dict[int, np.ndarray] = {}
        for k in sorted(per_slice):
            edit = add_to_slice if phase == "add" else remove_from_slice
            mask[k], objects = edit(model, views(k), mask[k], per_slice[k])
            for obj in objects if propagate else ():
                t1 = time.perf_counter()
                within = mask if phase == "remove" else None
                for j, m in carry_object(model, views, obj, k, lo, hi, within, stop).items():
                    if phase == "remove" and j in clicked and _holds_include(m, per_slice[j]):
                        continue  # never take away what a click on that slice asked for
                    carried[j] = carried[j] | m if j in carried else m
                timings["propagate_s"] += time.perf_counter() - t1
                t0 += time.perf_counter() - t1
        for j, m in carried.items():
            mask[j] = mask[j] | m if phase == "add" else mask[j] & ~m
        touched |= set(carried)
        timings["slices_carried"] += len(carried)
        timings["click_s"] += time.perf_counter() - t0
    return touched


def _holds_include(region: np.ndarray, edits: SliceEdits) -> bool:
    H, W = region.shape
    return any(region[min(max(int(round(r)), 0), H - 1), min(max(int(round(c)), 0), W - 1)] for r, c in edits.include)


def _segment_first(engine: "Engine", prep: "_Prepared", prompt: str, typed: list[str], labels: np.ndarray | None,
                   covered: set[int] | None, edits, span: tuple[int, int], axis: str, text: bool) -> SegmentResult:
    """The earlier result to correct: the one given, with any clicked slice it never reached segmented first;
    without one, the text's own result over the range (an empty map when the text is not used)."""
    image = prep.volume
    if labels is None and text:
        return engine.segment(image, prompt, modality=prep.modality, axis=axis, slices=span)
    result = SegmentResult(np.zeros(image.shape_zyx, np.uint8) if labels is None else labels.copy(), image.geometry,
                           typed, np.full((len(typed), prep.stack.shape[0]), np.nan, np.float32), span, axis,
                           prep.modality, "", prompt, {}, engine.provenance(prompt))
    clicked = sorted({k for per in edits.values() for k in per})
    missing = [k for k in clicked if covered is not None and k not in covered]
    if labels is not None and missing and text:
        stack = to_slices(result.labels, prep.frame)
        for k in missing:
            first = engine.segment(image, prompt, modality=prep.modality, axis=axis, slices=(k, k + 1))
            stack[k] = to_slices(first.labels, prep.frame)[k]
            result.presence[:, k] = first.presence[:, k]
    return result


def _check_excludes(edits, stack: np.ndarray, asked: list[str], plane: str) -> None:
    """An exclude click can only take away: a target with no mask anywhere and no include click or box has
    nothing for it to act on."""
    for t, per_slice in edits.items():
        adds = any(e.include or e.boxes for e in per_slice.values())
        if not adds and not (stack == t + 1).any():
            k = min(per_slice)
            raise EngineError(f"an exclude click on {plane} slice {k} has nothing to remove: {asked[t]!r} has no "
                              "mask yet; add an include click or a box first")
