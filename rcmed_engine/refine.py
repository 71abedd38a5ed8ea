"""Correct a target's mask with clicks and boxes on a slice, and carry the correction through the volume.

The decoder is SAM's, but the `lite` preset's is LiteMedSAM's, which was trained with boxes only: a point
prompt changes nothing it returns (measured: Dice 0.00 from a click at a structure's centre, 0.6-0.75 from
its box). So a click is turned into what the decoder understands. "The object under a click" is the mask
the decoder draws for square boxes of a few sizes centred on it, with and without the target's [SEG]
prompt; the candidate that holds the click and no exclude click, is not cut off by its box, and has the
highest predicted IoU wins. Then each click edits locally, keeping what was right elsewhere:

* an include click on a pixel the mask misses adds the object under it;
* an exclude click on a pixel the mask covers removes the object under it (minus what lies nearer an
  include click of the same slice than the exclude click);
* a box replaces the slice's mask with the object in the box.

Carrying: each object a click adds (or takes away) is followed on its own: its bounding box (a little
larger) prompts the next slice, and so on both ways,
until the mask is empty, shrinks to almost nothing, or the decoder's own IoU estimate falls below a floor
(the target has ended), or the range the user allows ends. Carrying uses the image's embedding alone: it
needs no language pass, so a correction spreads through 40 slices in seconds on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from scipy import ndimage as ndi

from .otfa.decode import decode_prompts
from .preprocess import SliceTransform, postprocess_logits

# Half-widths (mm) of the square boxes tried around a click: from a small nucleus to a kidney's slice.
CLICK_BOX_MM = (4.0, 7.0, 11.0, 16.0, 24.0, 36.0)
# A candidate whose object touches its box's edge was likely cut off by a box too small.
EDGE_PENALTY = 0.25
# Carrying stops where the decoder rates its own mask below this IoU, or where it shrinks below this share.
CARRY_MIN_SCORE = 0.45
CARRY_MIN_SHRINK = 0.15
CARRY_MARGIN = 0.15
# ... or where the carried mask's median grey differs from the clicked object's by more than this many of its
# robust deviations (at least CARRY_MIN_GREY levels): a box over tissue that is not the object still
# gets a confident mask from a box-trained decoder.
CARRY_MAX_GREY_SD = 2.5
CARRY_MIN_GREY = 12.0
REMOVAL_MAX_SHARE = 0.6  # an excluded object may take at most this share of the mask piece it lies on
TEXT_AGREEMENT = 0.5  # the text's mask joins the candidates where it overlaps the image's this much (IoU)  # the neighbour's box grows by this share of its size on each side (at least 2 pixels)


@dataclass
class SliceView:
    """What the decoder needs of one slice.

    neck: the image encoder's embedding (1, C, E, E); text_embedding: the same with the language model's
    L-V term (1, C, E, E) and seg: the target's [SEG] prompt (C,), both None where the text is not used."""

    neck: torch.Tensor
    transform: SliceTransform
    pixel_spacing: tuple[float, float]
    pixels: np.ndarray | None = None  # (H, W) the slice as the encoder saw it, grey 0-255
    text_embedding: torch.Tensor | None = None
    seg: torch.Tensor | None = None


@dataclass
class SliceEdits:
    """One target's prompts on one slice, in stack pixels (row, col; integer = pixel centre)."""

    include: list[tuple[float, float]] = field(default_factory=list)
    exclude: list[tuple[float, float]] = field(default_factory=list)
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)  # (r0, c0, r1, c1)


@dataclass
class Candidate:
    mask: np.ndarray  # (H, W) bool
    score: float  # the decoder's IoU estimate, less the edge penalty


# ------------------------------------------------------------------------------------------ decoding
def _box_to_frame(box: np.ndarray, t: SliceTransform) -> np.ndarray:
    """(K, 4) boxes (r0, c0, r1, c1) over pixel centres -> SAM's (x0, y0, x1, y1) in the padded frame."""
    (H, W), (h, w) = t.in_hw, t.resized_hw
    sy, sx = h / H, w / W
    return np.stack([box[:, 1] * sx, box[:, 0] * sy, (box[:, 3] + 1) * sx, (box[:, 2] + 1) * sy], 1)


@torch.inference_mode()
def decode_boxes(model, view: SliceView, boxes: np.ndarray, text: bool) -> tuple[np.ndarray, np.ndarray]:
    """Masks (K, H, W) bool and IoU estimates (K,) for boxes (K, 4) (r0, c0, r1, c1) on one slice; with
    ``text`` the [SEG] prompt joins each box on the text embedding (the neck alone otherwise)."""
    frame = torch.from_numpy(_box_to_frame(np.asarray(boxes, np.float64), view.transform)).float()
    if text:
        emb, seg = view.text_embedding, view.seg.reshape(1, -1).expand(len(boxes), -1)
        masks, iou = decode_prompts(model, emb, boxes=frame, text=seg)
    else:
        masks, iou = decode_prompts(model, view.neck, boxes=frame)
    full = postprocess_logits(masks[:, :1], view.transform)[:, 0] > 0
    return full.cpu().numpy(), iou[:, 0].cpu().numpy()


def _candidates(model, view: SliceView, boxes: np.ndarray) -> list[tuple[np.ndarray, float, np.ndarray]]:
    """(mask, IoU estimate, box) for each box from the image alone; and, where the view has the text, the
    box with the [SEG] prompt too, when it agrees with the image's object (IoU >= TEXT_AGREEMENT). The
    text then draws the boundary of the object the box holds; where it points elsewhere (weights that do
    not know this scan) it cannot take a click's object away."""
    masks, iou = decode_boxes(model, view, boxes, text=False)
    out = [(m, float(s), b) for m, s, b in zip(masks, iou, boxes)]
    if view.seg is not None:
        t_masks, t_iou = decode_boxes(model, view, boxes, text=True)
        for m, s, b, image_only in zip(t_masks, t_iou, boxes, masks):
            union = int((m | image_only).sum())
            if union and (m & image_only).sum() / union >= TEXT_AGREEMENT:
                out.append((m, float(s), b))
    return out


def _touches_edge(mask: np.ndarray, box: np.ndarray) -> bool:
    """Whether the object reaches a side of its box (r0, c0, r1, c1) that is not the image's own border."""
    H, W = mask.shape
    r0, c0 = max(int(np.floor(box[0])), 0), max(int(np.floor(box[1])), 0)
    r1, c1 = min(int(np.ceil(box[2])), H - 1), min(int(np.ceil(box[3])), W - 1)
    sides = []
    if box[0] > 0:
        sides.append(mask[r0, c0:c1 + 1])
    if box[2] < H - 1:
        sides.append(mask[r1, c0:c1 + 1])
    if box[1] > 0:
        sides.append(mask[r0:r1 + 1, c0])
    if box[3] < W - 1:
        sides.append(mask[r0:r1 + 1, c1])
    return any(side.any() for side in sides)


def _component_at(mask: np.ndarray, point: tuple[float, float]) -> np.ndarray:
    r, c = _pixel(point, mask.shape)
    if not mask[r, c]:
        return np.zeros_like(mask)
    labels, _ = ndi.label(mask)
    return labels == labels[r, c]


def _pixel(point: tuple[float, float], shape: tuple[int, ...]) -> tuple[int, int]:
    return (int(np.clip(np.floor(point[0] + 0.5), 0, shape[0] - 1)),
            int(np.clip(np.floor(point[1] + 0.5), 0, shape[1] - 1)))


# ------------------------------------------------------------------------------------------ one slice
def object_at(model, view: SliceView, point: tuple[float, float],
              avoid: list[tuple[float, float]] = ()) -> np.ndarray:
    """The object under ``point``: the best box-prompted mask around it that holds it and no ``avoid`` point."""
    H, W = view.transform.in_hw
    sr, sc = view.pixel_spacing
    boxes = np.array([[point[0] - mm / sr, point[1] - mm / sc, point[0] + mm / sr, point[1] + mm / sc]
                      for mm in CLICK_BOX_MM])
    boxes = np.clip(boxes, 0, [H - 1, W - 1, H - 1, W - 1])
    best: Candidate | None = None
    fallback: Candidate | None = None  # the best object that holds an ``avoid`` point too
    for mask, score, box in _candidates(model, view, boxes):
        obj = _component_at(mask, point)
        if not obj.any():
            continue
        score -= EDGE_PENALTY * _touches_edge(obj, box)
        holds_avoid = any(obj[_pixel(a, obj.shape)] for a in avoid)
        if holds_avoid and (fallback is None or score > fallback.score):
            fallback = Candidate(obj, score)
        if not holds_avoid and (best is None or score > best.score):
            best = Candidate(obj, score)
    if best is None and fallback is not None:
        # Where the decoder cannot tell the two clicks' objects apart, the line half-way between them does.
        return fallback.mask & nearer(fallback.mask.shape, point, avoid)
    return best.mask if best is not None else np.zeros((H, W), bool)


def nearer(shape: tuple[int, ...], point: tuple[float, float], others: list[tuple[float, float]]) -> np.ndarray:
    """(H, W) bool: the pixels at least as near ``point`` as any of ``others`` (all of them without others)."""
    if not others:
        return np.ones(shape, bool)
    rows, cols = np.indices(shape)
    d_point = (rows - point[0]) ** 2 + (cols - point[1]) ** 2
    return d_point <= np.min([(rows - r) ** 2 + (cols - c) ** 2 for r, c in others], axis=0)


def object_in_box(model, view: SliceView, box: tuple[float, float, float, float]) -> np.ndarray:
    """The object a box frames: the better of the box with and without the text, within the box."""
    r0, c0, r1, c1 = box
    cands = _candidates(model, view, np.array([[r0, c0, r1, c1]], dtype=np.float64))
    mask, _, _ = max(cands, key=lambda c: c[1])
    inside = np.zeros_like(mask)
    inside[int(np.ceil(r0)):int(np.floor(r1)) + 1, int(np.ceil(c0)):int(np.floor(c1)) + 1] = True
    return mask & inside


def add_to_slice(model, view: SliceView, mask: np.ndarray, edits: SliceEdits) -> tuple[np.ndarray, list[np.ndarray]]:
    """Apply one slice's boxes and include clicks to ``mask`` (H, W) bool; returns the new mask and the
    objects they added (each to be carried to the neighbours)."""
    out, added = mask.copy(), []
    for box in edits.boxes:
        obj = object_in_box(model, view, box)
        out, added = obj.copy(), [obj]  # a box says what the target is on its slice
    for point in edits.include:
        if not out[_pixel(point, out.shape)]:
            obj = object_at(model, view, point, avoid=edits.exclude)
            out |= obj
            added.append(obj)
    return out, [a for a in added if a.any()]


def remove_from_slice(model, view: SliceView, mask: np.ndarray, edits: SliceEdits) -> tuple[np.ndarray, list[np.ndarray]]:
    """Apply one slice's exclude clicks to ``mask``; returns the new mask and the removed regions that may be
    carried (a separate object under the click; not a local cut, which belongs to this slice alone)."""
    out, carried = mask.copy(), []
    for point in edits.exclude:
        if out[_pixel(point, out.shape)]:
            region, separate = _removal(model, view, out, point, edits.include)
            out &= ~region
            if separate and region.any():
                carried.append(region)
    return out, carried


def _removal(model, view: SliceView, mask: np.ndarray, point: tuple[float, float],
             keep: list[tuple[float, float]]) -> tuple[np.ndarray, bool]:
    """What an exclude click at ``point`` takes away from ``mask``, and whether it is an object of its own.

    A piece of the mask that is not its largest and holds no include click goes whole (a separate leak).
    Otherwise the object the decoder sees under the click goes, when it is a minor part of the piece (a
    leak the decoder tells apart); when the leak and the target are one object to the decoder, a local cut:
    the disc inside the mask around the click, as wide as the mask is deep there. Either way, less what
    lies nearer an include click than the exclude click."""
    r, c = _pixel(point, mask.shape)
    labels, n = ndi.label(mask)  # the caller made sure the click lies on the mask
    piece = labels == labels[r, c]
    largest = n <= 1 or piece.sum() >= np.bincount(labels.ravel())[1:].max()
    if not largest and not any(piece[_pixel(k, piece.shape)] for k in keep):
        return piece, True
    obj = object_at(model, view, point, avoid=keep) & piece
    if obj.any() and obj.sum() <= REMOVAL_MAX_SHARE * piece.sum():
        region, separate = obj, True
    else:
        depth = ndi.distance_transform_edt(np.pad(piece, 1))[1:-1, 1:-1][r, c]
        rows, cols = np.indices(mask.shape)
        region, separate = piece & ((rows - point[0]) ** 2 + (cols - point[1]) ** 2 <= (1.5 * depth) ** 2), False
    return region & nearer(mask.shape, point, keep), separate


# ------------------------------------------------------------------------------------------ carrying
def grey_stats(view: SliceView, mask: np.ndarray) -> tuple[float, float] | None:
    """Median and robust spread (1.4826 MAD) of the slice's grey values under ``mask`` (None without
    pixels): robust, because a mask drawn from a box often holds a rim of the surroundings."""
    if view.pixels is None or not mask.any():
        return None
    values = view.pixels[mask].astype(np.float64)
    median = float(np.median(values))
    return median, 1.4826 * float(np.median(np.abs(values - median)))


def carry(model, view: SliceView, neighbour: np.ndarray, grey: tuple[float, float] | None = None) -> np.ndarray | None:
    """The target on a slice next to one whose mask is ``neighbour`` (H, W) bool; None where it has ended.
    ``grey``: the clicked object's grey median and spread (see CARRY_MAX_GREY_SD)."""
    if not neighbour.any():
        return None
    rows, cols = np.nonzero(neighbour)
    H, W = neighbour.shape
    dr = max(2.0, CARRY_MARGIN * (rows.max() - rows.min() + 1))
    dc = max(2.0, CARRY_MARGIN * (cols.max() - cols.min() + 1))
    box = np.array([[max(rows.min() - dr, 0), max(cols.min() - dc, 0),
                     min(rows.max() + dr, H - 1), min(cols.max() + dc, W - 1)]])
    near = ndi.binary_dilation(neighbour, iterations=3)
    masks, scores = decode_boxes(model, view, box, text=False)
    labels, _ = ndi.label(masks[0])
    touching = np.unique(labels[near & (labels > 0)])
    obj = np.isin(labels, touching[touching > 0])  # pieces that do not touch the neighbour are a jump
    if float(scores[0]) < CARRY_MIN_SCORE or obj.sum() < CARRY_MIN_SHRINK * neighbour.sum():
        return None
    here = grey_stats(view, obj)
    if grey is not None and here is not None and abs(here[0] - grey[0]) > max(CARRY_MAX_GREY_SD * grey[1], CARRY_MIN_GREY):
        return None
    return obj


Views = Callable[[int, bool], SliceView]  # (slice, with the text?) -> its view


def carry_object(model, views: Views, start: np.ndarray, k: int, lo: int, hi: int,
                 within: np.ndarray | None = None, cancel: Callable[[], bool] = lambda: False) -> dict[int, np.ndarray]:
    """Where an object drawn on slice ``k`` (``start``, (H, W) bool) continues on the slices of [lo, hi), both
    ways, until it ends: slice -> (H, W) bool. With ``within`` (n, H, W) each step keeps only that part of
    the stack (a removal follows the leak it removes, never beyond the mask)."""
    out: dict[int, np.ndarray] = {}
    grey = grey_stats(views(k, False), start)
    for step in (-1, 1):
        previous, j = start, k + step
        while lo <= j < hi and not cancel():
            mask = carry(model, views(j, False), previous, grey)
            if mask is not None and within is not None:
                mask &= within[j]
                if mask.sum() > REMOVAL_MAX_SHARE * within[j].sum():
                    break  # no longer a leak beside the target but most of it
            if mask is None or not mask.any():
                break
            out[j] = mask
            previous, j = mask, j + step
    return out
