"""Slice preprocessing and mask postprocessing, exactly as the released RCMed/SyRe model expects.

The released model (SYRE_SPEC.md §3.1, §3.10, §8) was trained on 8-bit images read with
``cv2.imread`` and never converted to RGB, resized with albumentations' ``LongestMaxSize`` (OpenCV
``INTER_LINEAR`` on uint8, target size rounded with Python's ``round``), normalised with SAM's
constants, and zero-padded on the right and bottom *after* normalising. Its low-resolution logits are
upsampled to the padded square, cropped to the resized region, and resized to the original slice.
Each of those details moves the logits measurably (§8), so this module reproduces them literally.

Array conventions used throughout:

* grey slices: ``(n, H, W)`` of any real dtype; one 2D image is ``n = 1``;
* colour slices: ``(n, H, W, 3)`` uint8 in RGB order. A 3D array is always grey: an ``(n, H, 3)``
  array is read as ``n`` grey slices three pixels wide, never as colour;
* encoder input: ``(n, 3, S, S)`` float32 torch tensor;
* logits: ``(n, k, h, w)`` low-res in, ``(n, k, H, W)`` float32 out.

Pipeline for one volume::

    window = intensity_window(volume, modality)          # one mapping for the whole volume
    rgb = to_uint8_rgb(slices, window)                   # (n, H, W, 3) uint8
    t = plan_resize((H, W), image_size, pixel_spacing)   # one plan for all slices of the cut
    x = prepare_slices(rgb, t, bgr=True)                 # (n, 3, S, S), the released model reads BGR
    ...encoder / decoder -> low_res (n, k, 256, 256)...
    mask = postprocess_logits(low_res, t) > 0            # (n, k, H, W)
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "MODALITY_TEXT",
    "ModalityError",
    "canonical_modality",
    "infer_modality",
    "guess_modality",
    "IntensityWindow",
    "CT_WINDOW",
    "PERCENTILES",
    "MAX_PERCENTILE_VOXELS",
    "intensity_window",
    "to_uint8_rgb",
    "SliceTransform",
    "plan_resize",
    "SAM_PIXEL_MEAN",
    "SAM_PIXEL_STD",
    "prepare_slices",
    "postprocess_logits",
    "content_hash",
]

# ---------------------------------------------------------------------------------------------------
# Modalities
# ---------------------------------------------------------------------------------------------------

#: Canonical modality -> the words placed in the prompt ("... in this {modality} image", "<p> {modality}
#: </p>"). CT, MR and X-ray follow the released ``convert_true_modality`` exactly ("computed tomography",
#: "magnetic resonance", "X-Ray"). For every other modality the released code used the training file's
#: name prefix verbatim, and those prefixes are not published; the words below are the README's and
#: BiomedParse's names for them ("pathology", not "histopathology"). Caveat: ``convert_true_modality``
#: tests ``'ct' in prefix`` before anything else, so a prefix "oct" would have been read as "computed
#: tomography"; we give OCT its real name, which may be out of the training distribution. The dict is
#: plain data: a caller that knows better can override an entry.
MODALITY_TEXT: dict[str, str] = {
    "CT": "computed tomography",
    "MR": "magnetic resonance",
    "X-ray": "X-Ray",
    "US": "ultrasound",
    "PET": "positron emission tomography",
    "microscopy": "microscopy",
    "histopathology": "pathology",
    "endoscopy": "endoscopy",
    "dermoscopy": "dermoscopy",
    "fundus": "fundus",
    "OCT": "optical coherence tomography",
}

# Aliases in normalised form (see _norm): lower case, without spaces, hyphens, underscores and dots.
# DICOM Modality (0008,0060) defined terms are included so that a tag can be canonicalised directly.
_ALIASES: dict[str, tuple[str, ...]] = {
    "CT": ("ct", "computedtomography", "computerizedtomography", "computerisedtomography",
           "cta", "cect", "ncct"),
    "MR": ("mr", "mri", "magneticresonance", "magneticresonanceimaging",
           # sequence names, as nnU-Net / MSD channel_names use them
           "t1", "t1w", "t1c", "t1ce", "t1gd", "t1post", "t2", "t2w", "t2star", "flair", "t2flair",
           "dwi", "adc", "pd", "pdw", "swi"),
    "X-ray": ("xray", "x", "xr", "cr", "dx", "dr", "rg", "radiograph", "radiography", "cxr",
              "mg", "mammography", "mammogram", "xa", "rf", "fluoroscopy", "io", "px"),
    "US": ("us", "ultrasound", "ultrasonography", "sonography", "usg", "echo", "echocardiography",
           "ivus"),
    "PET": ("pet", "pt", "positronemissiontomography"),
    "microscopy": ("microscopy", "fluorescence", "fluorescencemicroscopy", "cell", "cells",
                   "lightmicroscopy", "brightfield", "gm"),
    "histopathology": ("histopathology", "histology", "pathology", "digitalpathology", "h&e",
                       "wsi", "wholeslide", "wholeslideimage", "sm"),
    "endoscopy": ("endoscopy", "endoscope", "endoscopic", "colonoscopy", "gastroscopy",
                  "laparoscopy", "capsuleendoscopy", "es"),
    "dermoscopy": ("dermoscopy", "dermatoscopy", "dermoscopic", "dermatoscopic"),
    "fundus": ("fundus", "fundusphotography", "retinalfundus", "cfp", "op"),
    "OCT": ("oct", "opticalcoherencetomography", "opt", "ivoct"),
}

_ALIAS_TO_CANONICAL: dict[str, str] = {
    alias: canon for canon, aliases in _ALIASES.items() for alias in aliases
}
assert set(_ALIASES) == set(MODALITY_TEXT)


class ModalityError(ValueError):
    """An unknown modality name. The message is one line, fit for a command-line error."""


def _norm(name: str) -> str:
    return re.sub(r"[\s\-_.]+", "", name.strip().lower())


def canonical_modality(name: str) -> str:
    """Map a modality name or alias (case-insensitive) to its canonical key in ``MODALITY_TEXT``.

    ``"ct"``, ``"Computed Tomography"`` -> ``"CT"``; ``"MRI"``, ``"T2"``, ``"FLAIR"`` -> ``"MR"``;
    ``"x-ray"``, ``"CR"``, ``"DX"`` -> ``"X-ray"``; DICOM Modality terms (``"PT"``, ``"SM"``, ``"OP"``...)
    are accepted too. Spaces, hyphens, underscores and dots are ignored.

    Raises:
        ModalityError: the name is unknown; the one-line message lists the accepted names.
    """
    if isinstance(name, str):
        canon = _ALIAS_TO_CANONICAL.get(_norm(name))
        if canon is not None:
            return canon
    accepted = ", ".join(MODALITY_TEXT)
    raise ModalityError(
        f"unknown modality {name!r}; use one of: {accepted} "
        "(case-insensitive; aliases such as MRI, T1, T2, FLAIR, ADC, xray, CR, DX, PT, ultrasound, "
        "pathology are accepted too)"
    )


# Keys under which a modality may appear in a metadata dict: our own, and the DICOM tag as
# SimpleITK names it in GetMetaData.
_META_KEYS = ("modality", "Modality", "0008|0060")


def _is_colour(array: np.ndarray) -> bool:
    return array.ndim == 4 and array.shape[-1] == 3


def infer_modality(array: np.ndarray, meta: Mapping[str, object] | None = None) -> str | None:
    """Guess the canonical modality of a volume, or return ``None`` when there is no honest guess.

    Args:
        array: grey ``(n, H, W)`` (or one ``(H, W)`` slice), or colour ``(n, H, W, 3)``.
        meta: may carry a modality under ``"modality"``, ``"Modality"`` or ``"0008|0060"`` (a DICOM
            Modality tag such as ``"CT"``, ``"MR"``, ``"CR"``, ``"PT"``, or any name
            ``canonical_modality`` accepts).

    Rules, in order:

    1. A recognised modality in ``meta`` wins. Uninformative tags (``"OT"``, ``"NM"``, ...) fall through.
    2. Colour data -> ``None``. Endoscopy, dermoscopy, fundus and histology photographs are all 8-bit
       RGB; nothing in the pixels separates them reliably, and guessing wrong puts the wrong word in
       the prompt.
    3. Grey data with a minimum at or below -500 -> ``"CT"``: Hounsfield units put air at -1000 and
       scanners pad outside the field of view with -1024 to -3024; no other modality stores values
       that negative.
    4. Otherwise ``None``: MR, PET, X-ray, ultrasound and microscopy all hold non-negative values of
       overlapping ranges. The caller should ask for ``--modality``.
    """
    if meta:
        for key in _META_KEYS:
            value = meta.get(key)
            if isinstance(value, str) and value.strip():
                try:
                    return canonical_modality(value)
                except ModalityError:
                    pass
    array = np.asarray(array)
    if _is_colour(array) or array.size == 0:
        return None
    if array.dtype.kind in "iuf":
        if array.dtype.kind == "u":
            return None  # cannot be negative, so cannot be Hounsfield units
        finite_min = np.nanmin(array) if array.dtype.kind == "f" else array.min()
        if np.isfinite(finite_min) and finite_min <= -500:
            return "CT"
    return None


def guess_modality(array: np.ndarray, meta: Mapping[str, object] | None = None) -> tuple[str, str]:
    """The modality to use when none was given: ``infer_modality``'s answer when it has one, else a guess
    from the pixels. Returns (modality, why); callers must tell the user when ``why`` says it is a guess.

    Guesses: colour pixels -> microscopy (photographs of tissue and cells are the colour images these
    weights know); non-negative grey volumes of several slices -> MR; a single non-negative grey
    image -> microscopy.
    """
    known = infer_modality(array, meta)
    if known is not None:
        source = (meta or {}).get("modality_from") or ("the DICOM header" if (meta or {}).get("dicom_modality")
                                                      else "the intensities (Hounsfield units)")
        return known, f"read from {source}"
    array = np.asarray(array)
    if _is_colour(array):
        return "microscopy", "guessed: a colour image"
    slices = array.shape[0] if array.ndim == 3 else 1
    if slices > 1:
        return "MR", "guessed: a grey volume with no negative values"
    return "microscopy", "guessed: a single grey image with no negative values"


# ---------------------------------------------------------------------------------------------------
# Intensity windows
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IntensityWindow:
    """A linear intensity mapping: ``low`` -> 0, ``high`` -> 255, clipped outside."""

    low: float
    high: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.high < self.low:
            raise ValueError(f"invalid intensity window [{self.low}, {self.high}]")

    @classmethod
    def from_level_width(cls, level: float, width: float) -> "IntensityWindow":
        """The radiological (level, width) form: ``[level - width/2, level + width/2]``."""
        return cls(float(level) - float(width) / 2.0, float(level) + float(width) / 2.0)


#: Soft-tissue CT window, level 40 width 400 HU.
CT_WINDOW = IntensityWindow.from_level_width(40.0, 400.0)
#: Percentiles used for every grey modality other than CT.
PERCENTILES: tuple[float, float] = (0.5, 99.5)
#: Above this many voxels the percentiles are taken on a regular strided subsample.
MAX_PERCENTILE_VOXELS = 1 << 24  # 16.8 M


def intensity_window(
    volume_array: np.ndarray,
    modality: str,
    ct_window: IntensityWindow = CT_WINDOW,
    percentiles: tuple[float, float] = PERCENTILES,
) -> IntensityWindow | None:
    """The intensity mapping for a whole volume, shared by all of its slices.

    Args:
        volume_array: grey ``(n, H, W)`` (any real dtype) or colour ``(n, H, W, 3)`` uint8.
        modality: a name ``canonical_modality`` accepts.
        ct_window: the fixed window for CT (default level 40 / width 400, i.e. -160..240 HU).
        percentiles: (low, high) percentiles for all other grey modalities.

    Returns:
        ``None`` for colour data (passed through unchanged); ``ct_window`` for CT in Hounsfield
        units; otherwise the ``percentiles`` of the finite values over the WHOLE volume, so that two
        slices keep their relative brightness (per-slice stretching would make an empty slice look
        like tissue). Volumes above ``MAX_PERCENTILE_VOXELS`` use a strided subsample.

    CT stored as uint8 cannot be Hounsfield units (it is an already-windowed 8-bit export, the form
    the released model was trained on), so it gets the identity window [0, 255] instead of the HU
    window, which would squash it into 102..255.
    """
    canon = canonical_modality(modality)
    volume_array = np.asarray(volume_array)
    if _is_colour(volume_array):
        if volume_array.dtype != np.uint8:
            raise ValueError(f"colour data must be uint8, got {volume_array.dtype}")
        return None
    if volume_array.dtype.kind not in "biuf":
        raise ValueError(f"unsupported dtype for intensity windowing: {volume_array.dtype}")
    if canon == "CT":
        if volume_array.dtype == np.uint8:
            return IntensityWindow(0.0, 255.0)
        return ct_window
    flat = volume_array.reshape(-1)
    if flat.size > MAX_PERCENTILE_VOXELS:
        flat = flat[:: math.ceil(flat.size / MAX_PERCENTILE_VOXELS)]
    if flat.dtype.kind == "f":
        flat = flat[np.isfinite(flat)]
    elif flat.dtype.kind == "b":
        flat = flat.view(np.uint8)  # np.percentile cannot subtract booleans
    if flat.size == 0:
        return IntensityWindow(0.0, 0.0)
    lo, hi = np.percentile(flat, percentiles)
    return IntensityWindow(float(lo), float(hi))


def to_uint8_rgb(slices: np.ndarray, window: IntensityWindow | None) -> np.ndarray:
    """Map slices to the 8-bit, 3-channel images the encoder was trained on.

    Args:
        slices: grey ``(n, H, W)`` of a real dtype, or colour ``(n, H, W, 3)`` uint8.
        window: from ``intensity_window``; ``None`` for colour (and allowed for uint8 grey, meaning
            identity).

    Returns:
        ``(n, H, W, 3)`` uint8, C-contiguous. Grey: clipped to the window, scaled to 0..255, rounded
        half-to-even, replicated to three channels (what ``cv2.imread`` does with a grey PNG). NaN
        maps to 0. A zero-width window (constant volume) maps everything to 0. Colour input is
        returned bit-identical.

    Raises:
        ValueError: other shapes or dtypes; a window given for colour data; no window for non-uint8
            grey data.
    """
    slices = np.asarray(slices)
    if slices.ndim == 4:
        if slices.shape[-1] != 3 or slices.dtype != np.uint8:
            raise ValueError(
                f"colour slices must be (n, H, W, 3) uint8, got {slices.shape} {slices.dtype}"
            )
        if window is not None:
            raise ValueError("colour slices take no intensity window (pass None)")
        return np.ascontiguousarray(slices)
    if slices.ndim != 3:
        raise ValueError(f"slices must be (n, H, W) grey or (n, H, W, 3) colour, got {slices.shape}")
    if slices.dtype.kind not in "biuf":
        raise ValueError(f"unsupported dtype for grey slices: {slices.dtype}")
    if window is None:
        if slices.dtype != np.uint8:
            raise ValueError(f"grey {slices.dtype} slices need an intensity window")
        grey = slices
    else:
        width = window.high - window.low
        if width <= 0:
            # A constant volume carries no contrast; 0 rather than a division by zero.
            grey = np.zeros(slices.shape, dtype=np.uint8)
        else:
            x = slices.astype(np.float32)
            x -= np.float32(window.low)
            x /= np.float32(width)  # division, not a reciprocal product: keeps low->0, high->255 exact
            np.clip(x, 0.0, 1.0, out=x)
            x *= np.float32(255.0)
            np.rint(x, out=x)
            if slices.dtype.kind == "f":
                x[np.isnan(x)] = 0.0
            grey = x.astype(np.uint8)
    return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=-1))


# ---------------------------------------------------------------------------------------------------
# Resize plan, encoder input, logits back to the slice
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SliceTransform:
    """Geometry shared by all slices of one cut.

    Attributes:
        in_hw: ``(H, W)`` of the slice as stored.
        resized_hw: ``(h', w')`` of the image inside the padded square (top-left aligned).
        image_size: ``S``, side of the padded square the encoder takes (1024 for SAM ViT-H, 256 for
            LiteMedSAM).
    """

    in_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    image_size: int


def plan_resize(
    in_hw: Sequence[int],
    image_size: int,
    pixel_spacing: Sequence[float] = (1.0, 1.0),
) -> SliceTransform:
    """Plan the single resize that makes the longest *physical* side ``image_size`` pixels.

    Args:
        in_hw: ``(H, W)`` of the stored slice.
        image_size: ``S``.
        pixel_spacing: ``(row spacing, column spacing)`` = ``(sy, sx)``, in the same order as
            ``in_hw``. Note SimpleITK's ``GetSpacing()`` is ``(x, y, z)``: reorder it.

    With square pixels (``sy == sx``) this is exactly albumentations' ``LongestMaxSize``:
    ``s = S / float(max(W, H))`` and ``(round(H * s), round(W * s))`` with Python's ``round``
    (half-to-even), computed in that order so the floating-point result matches bit for bit. With
    anisotropic pixels (a coronal cut across 5 mm slices) the physical extents ``H*sy`` and ``W*sx``
    are scaled instead, so the slice becomes square-pixelled in the same resize. Each side is at
    least 1 and at most ``S``.
    """
    H, W = (int(v) for v in in_hw)
    S = int(image_size)
    if H < 1 or W < 1 or S < 1:
        raise ValueError(f"invalid sizes: in_hw={tuple(in_hw)}, image_size={image_size}")
    sy, sx = (float(v) for v in pixel_spacing)
    if not (sy > 0 and sx > 0 and math.isfinite(sy) and math.isfinite(sx)):
        raise ValueError(f"pixel spacing must be positive and finite, got {tuple(pixel_spacing)}")
    if sy == sx:
        scale = S / float(max(W, H))
        h, w = round(H * scale), round(W * scale)
    else:
        eh, ew = H * sy, W * sx
        scale = S / max(eh, ew)
        h, w = round(eh * scale), round(ew * scale)
    h = min(max(h, 1), S)
    w = min(max(w, 1), S)
    return SliceTransform(in_hw=(H, W), resized_hw=(h, w), image_size=S)


#: SAM's normalisation constants (RGB order; the released model applies them to BGR input as is).
SAM_PIXEL_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
SAM_PIXEL_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)

# Slices resized and normalised per chunk: bounds the temporary uint8/float copies.
_CHUNK = 16


def prepare_slices(
    rgb: np.ndarray,
    t: SliceTransform,
    pixel_mean: Sequence[float] = SAM_PIXEL_MEAN,
    pixel_std: Sequence[float] = SAM_PIXEL_STD,
    bgr: bool = False,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Turn 8-bit colour slices into the encoder's padded, normalised input.

    Args:
        rgb: ``(n, H, W, 3)`` uint8, RGB order, ``(H, W) == t.in_hw``.
        t: the plan from ``plan_resize``.
        pixel_mean, pixel_std: per-channel constants, applied in the order given to the channels as
            they are after the optional flip.
        bgr: reverse the channel order before normalising. The released SyRe model reads BGR
            (``cv2.imread`` output never converted), with SAM's RGB constants applied in BGR order,
            so use ``bgr=True`` for it.
        device: where the result is made (default the CPU). The uint8 pixels travel and are
            normalised there: a quarter of the bytes of float32, and no float work on the CPU, which
            on a GPU machine was half the time per 1024² slice. fp32 subtraction and division are
            correctly rounded on every device, so the numbers are the CPU's bit for bit.

    Returns:
        ``(n, 3, S, S)`` float32 tensor on ``device``: ``cv2.resize(slice, (w', h'), INTER_LINEAR)`` on uint8
        (skipped when the size is unchanged, as albumentations does), then ``(x - mean) / std`` in
        float32, written into the top-left ``h' x w'`` of a zero tensor. The padding is exactly 0
        *after* normalisation (padding before normalising flips pixels, SYRE_SPEC §8).

    OpenCV rather than a torch resize because the model was trained on OpenCV's fixed-point
    bilinear, which for an exact 2x downscale switches to area averaging (SYRE_SPEC §8). Per-slice
    ``cv2.resize`` calls are used because stacking slices as channels is not bit-identical on the
    area path; 64 slices of 512² -> 1024² take about 0.1 s.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 4 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be (n, H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    if tuple(rgb.shape[1:3]) != tuple(t.in_hw):
        raise ValueError(f"slice size {tuple(rgb.shape[1:3])} does not match the plan {t.in_hw}")
    n = rgb.shape[0]
    h, w = t.resized_hw
    S = t.image_size
    # torch.tensor(list) in float32, as the reference's torch.Tensor([...]) constants are.
    device = torch.device(device) if device is not None else torch.device("cpu")
    mean = torch.tensor(list(pixel_mean), dtype=torch.float32).view(1, 3, 1, 1).to(device)
    std = torch.tensor(list(pixel_std), dtype=torch.float32).view(1, 3, 1, 1).to(device)
    out = torch.zeros((n, 3, S, S), dtype=torch.float32, device=device)
    same_size = (h, w) == tuple(t.in_hw)
    for start in range(0, n, _CHUNK):
        chunk = rgb[start : start + _CHUNK]
        if same_size:
            resized = np.ascontiguousarray(chunk)
        else:
            resized = np.stack(
                [
                    cv2.resize(np.ascontiguousarray(s), (w, h), interpolation=cv2.INTER_LINEAR)
                    for s in chunk
                ]
            )
        x = torch.from_numpy(resized).to(device).permute(0, 3, 1, 2)  # (k, 3, h', w') uint8
        if bgr:
            x = x.flip(1)
        out[start : start + len(chunk), :, :h, :w] = (x.to(torch.float32) - mean) / std
    return out


def postprocess_logits(low_res: torch.Tensor, t: SliceTransform) -> torch.Tensor:
    """Bring low-resolution mask logits back to the stored slice.

    Args:
        low_res: ``(n, k, h, w)`` logits from the mask decoder (any float dtype, any device).
        t: the plan the slices were prepared with.

    Returns:
        ``(n, k, H, W)`` float32 logits on ``low_res``'s device: bilinear (align_corners=False) to
        ``(S, S)`` in fp32, crop ``[..., :h', :w']`` (dropping the padding before it can bleed into
        the slice), bilinear to ``(H, W)``. Thresholding (``> 0``) is the caller's.
    """
    if low_res.ndim != 4:
        raise ValueError(f"low_res must be (n, k, h, w), got {tuple(low_res.shape)}")
    n, k = low_res.shape[:2]
    S = t.image_size
    h, w = t.resized_hw
    H, W = t.in_hw
    out = torch.empty((n, k, H, W), dtype=torch.float32, device=low_res.device)
    # Chunked: the (S, S) intermediate is 4 MiB per map at S = 1024.
    step = max(1, _CHUNK // max(1, k))
    for start in range(0, n, step):
        x = low_res[start : start + step].to(torch.float32)
        x = F.interpolate(x, size=(S, S), mode="bilinear", align_corners=False)
        x = x[..., :h, :w]
        out[start : start + step] = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)
    return out


def content_hash(array: np.ndarray) -> str:
    """SHA-256 hex digest over dtype, shape and C-order bytes: the embedding-cache key.

    The same bytes under another shape or dtype give another key. Note the key covers the array
    only: a cache of embeddings must also key on whatever else changes them (window, plan, model).
    """
    array = np.asarray(array)
    if array.dtype.hasobject:
        raise ValueError("cannot hash an object array")
    h = hashlib.sha256()
    h.update(f"{array.dtype.str}|{array.shape}|".encode())
    h.update(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
    return h.hexdigest()
