"""One-shot, training-free adaptation (OTFA): a class registry and the adaptation applied at inference.

A radiologist outlines one slice of a structure, names it, and from then on the name works as a prompt.
Nothing is trained. From each outlined slice (a *shot*) the registry keeps:

* a **semantic prototype**: the mask-pooled neck embedding F of the support slice, taken before the L-V
  term is added, with the mask resized bilinearly to the embedding grid in the padded frame
  (SYRE_SPEC §4 "Registration"), plus the mean embedding outside the mask;
* a **spatial prior**: a Gaussian on the mask's centroid and spread (covariance) in normalised slice
  coordinates (row, column in [0, 1] of the slice as the engine cuts it), plus the relative slice position;
* a **calibration** of the similarity map on the support itself (mean cosine inside and outside the mask)
  and an **appearance model**: intensity histograms inside the mask and in a ring around it.

More shots of one class are averaged: prototypes by their mean (SYRE_SPEC §4), the Gaussians by moment
matching (the mixture's mean and covariance), calibrations and histograms by their mean.

At inference, for a target that names a registered class (per slice, SYRE_SPEC §4 "Adaptation"):

1. similarity map s = cos(p̄, F(x, y)) on the embedding grid; S = σ((s - mean s) / (std s + 1e-6));
2. F' = F ⊙ (1 + α S), α = 0.3;  location prior L (the Gaussian on the grid);
3. when the language side is used (a trained model): the pre-neck features G' = G ⊙ (1 + β L), β = 0.5,
   go through the prefix again, giving the L-V term and the [SEG] prompt for this target;
4. beyond the released code (it has no prompts from the shot, and never says how L is built): the cells
   where the calibrated similarity and the prior agree form a coarse region R; each connected part of R
   gives a **box prompt** (LiteMedSAM's decoder was trained on boxes) to SAM's prompt encoder, next to the
   [SEG] prompt when the language side is used. No cell in R means the class is absent from the slice;
5. decoder logits M' = M + 0.5 (mean|M| + 1e-6) L (SYRE_SPEC §4 step 5);
6. the final logit fuses the decoder's logit, the coarse similarity evidence and the appearance log-ratio
   with weights chosen **on the shot itself** at registration (the candidate that best reproduces the
   support mask from the support image): for thin, dark structures that a box decoder segments poorly
   (the lateral ventricles on T1) appearance wins, for blob-like organs the decoder does.

Plain prompts never reach this module: their path is unchanged, bit for bit.

The registry on disk (a folder):

* ``registry.json``: format, version and per class the display name, the key, the tensor file, the
  preset and embedding size it was registered with, and one record per shot (source image hash, slice,
  axis, modality, area, date);
* ``classes/<key>.<hash>.safetensors``: the shots' tensors, stacked.

Writes are atomic: a new tensor file under a new name, then ``registry.json`` through a temporary file and
``os.replace`` (the commit), then the old tensor file is removed. An error before the commit removes what it
wrote, so a failed registration leaves the folder byte-identical. A lock file serialises writers.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import re
import tempfile
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

REGISTRY_FORMAT = "rcmed-otfa-registry"
REGISTRY_VERSION = 1
REGISTRY_JSON = "registry.json"
CLASSES_DIR = "classes"
LOCK_NAME = ".lock"
MAX_NAME_CHARS = 100
HIST_BINS = 32

#: Released defaults (SYRE_SPEC §4): adapt_alpha, location_scale, the hard-coded decoder prior weight.
ADAPT_ALPHA = 0.3
LOCATION_SCALE = 0.5
LOGIT_PRIOR = 0.5

#: Fusion candidates (decoder, coarse similarity, appearance), chosen per class on the shot itself.
STRATEGIES: dict[str, tuple[float, float, float]] = {
    "decoder": (1.0, 0.0, 0.0),
    "appearance": (0.0, 1.0, 1.0),
    "fused": (1.0, 1.0, 1.0),
}


class RegistryError(ValueError):
    """A registry operation that cannot be done; the message says what to change."""


class ClassNotFound(RegistryError, KeyError):
    """No class of that name is registered (a KeyError too, so that lookups can catch it as one)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "no such class"


# =============================================================================================== names
def normalise_name(name: str) -> str:
    """The lookup key of a class name: NFKC, lower case, underscores as spaces, single spaces."""
    text = unicodedata.normalize("NFKC", str(name)).replace("_", " ").lower()
    return " ".join(text.split())


def validate_name(name: object) -> str:
    """A class name as it will be shown: stripped and single-spaced. Raises RegistryError if unusable.

    A usable name has a letter or digit, is at most 100 characters, and reads as exactly one prompt target
    (no commas, "and", brackets), so that ``--prompt NAME`` finds it again.
    """
    from .prompts import PromptError, parse_targets

    if not isinstance(name, str):
        raise RegistryError("the class name must be text")
    shown = " ".join(unicodedata.normalize("NFKC", name).split())
    if not shown:
        raise RegistryError("the class name is empty: give the structure a name, e.g. 'lateral ventricles'")
    if not any(ch.isalnum() for ch in shown):
        raise RegistryError(f"the class name {name!r} has no letter or digit: give the structure a real name")
    if len(shown) > MAX_NAME_CHARS:
        raise RegistryError(f"the class name is {len(shown)} characters long; the limit is {MAX_NAME_CHARS}")
    try:
        targets = parse_targets(shown)
    except PromptError as exc:
        raise RegistryError(f"the class name {name!r} cannot be used as a prompt: {exc}") from None
    if len(targets) != 1 or normalise_name(targets[0]) != normalise_name(shown):
        raise RegistryError(
            f"the class name {name!r} would be read as the prompt target(s) {targets}; use a name without "
            "commas, 'and', brackets or a leading verb or article, e.g. 'lateral ventricles'")
    return shown


def _slug(key: str) -> str:
    ascii_key = unicodedata.normalize("NFKD", key).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_key).strip("-")[:40] or "class"
    return f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


# =============================================================================================== shots
@dataclass
class Shot:
    """What one outlined slice contributes. Tensors are float32 on the CPU."""

    prototype: torch.Tensor  # (C,) mask-pooled neck embedding
    background: torch.Tensor  # (C,) mean neck embedding outside the mask (valid, unpadded cells)
    centroid: torch.Tensor  # (2,) (row, col) in [0, 1] of the slice
    covariance: torch.Tensor  # (2, 2) in the same units
    slice_position: float  # (k + 0.5) / n along the cut axis
    area_fraction: float  # mask pixels / slice pixels
    sim_fg: float  # mean cosine(prototype, F) inside the mask, on the support
    sim_bg: float  # mean cosine outside it
    hist_fg: torch.Tensor  # (HIST_BINS,) intensity histogram inside the mask (sums to 1)
    hist_bg: torch.Tensor  # (HIST_BINS,) in a ring around it
    scores: dict[str, float] = field(default_factory=dict)  # support Dice per fusion strategy
    meta: dict = field(default_factory=dict)

    TENSORS = ("prototype", "background", "centroid", "covariance", "hist_fg", "hist_bg")
    SCALARS = ("slice_position", "area_fraction", "sim_fg", "sim_bg")


@dataclass
class ClassAdapter:
    """The shots of one class, merged for inference."""

    name: str
    prototype: torch.Tensor  # (C,)
    background: torch.Tensor
    centroid: torch.Tensor  # (2,)
    covariance: torch.Tensor  # (2, 2)
    slice_position: float
    slice_spread: float
    area_fraction: float
    sim_fg: float
    sim_bg: float
    hist_fg: torch.Tensor
    hist_bg: torch.Tensor
    strategy: str
    shots: int

    @classmethod
    def merge(cls, name: str, shots: Sequence[Shot]) -> "ClassAdapter":
        if not shots:
            raise RegistryError(f"class {name!r} has no shots")
        protos = torch.stack([s.prototype for s in shots])
        mus = torch.stack([s.centroid for s in shots]).double()
        covs = torch.stack([s.covariance for s in shots]).double()
        mu = mus.mean(0)
        d = mus - mu
        cov = (covs + d[:, :, None] * d[:, None, :]).mean(0)  # moment-matched mixture
        pos = torch.tensor([s.slice_position for s in shots], dtype=torch.float64)
        scores: dict[str, list[float]] = {}
        for s in shots:
            for k, v in s.scores.items():
                scores.setdefault(k, []).append(v)
        strategy = max(scores, key=lambda k: (float(np.mean(scores[k])), -list(STRATEGIES).index(k))) \
            if scores else "fused"
        return cls(
            name=name,
            prototype=protos.mean(0),
            background=torch.stack([s.background for s in shots]).mean(0),
            centroid=mu.float(),
            covariance=cov.float(),
            slice_position=float(pos.mean()),
            slice_spread=float(pos.std(unbiased=False)) if len(shots) > 1 else 0.0,
            area_fraction=float(np.mean([s.area_fraction for s in shots])),
            sim_fg=float(np.mean([s.sim_fg for s in shots])),
            sim_bg=float(np.mean([s.sim_bg for s in shots])),
            hist_fg=torch.stack([s.hist_fg for s in shots]).mean(0),
            hist_bg=torch.stack([s.hist_bg for s in shots]).mean(0),
            strategy=strategy,
            shots=len(shots),
        )


# =============================================================================================== config
@dataclass
class OTFAConfig:
    """How a registered class is applied. The defaults are the ones the benchmark ran with.

    method: "otfa" (this module's adaptation) or "persam" (the PerSAM-style baseline, for comparison).
    alpha, beta, logit_prior: the released weights of S on F, of L on the pre-neck features, and of L on
        the decoder logits (SYRE_SPEC §4).
    prior_scale: the spatial Gaussian's spread is widened by this factor: other scans are placed
        differently than the shot.
    prior_floor: cells where the widened Gaussian is below this value are never part of the coarse region.
    tau: the coarse threshold, as a fraction of the way from the support's mean similarity outside the
        mask (0) to inside it (1).
    language: use the language side (G' = G ⊙ (1 + βL), L-V term, [SEG] prompt); None means "when the
        model's RCMed parts are trained" (for untrained ones they add only noise).
    strategy: force a fusion strategy ("decoder", "appearance", "fused") instead of the one the class
        chose on its shot.
    max_boxes: at most this many connected parts of the coarse region become box prompts.
    """

    method: str = "otfa"
    alpha: float = ADAPT_ALPHA
    beta: float = LOCATION_SCALE
    logit_prior: float = LOGIT_PRIOR
    prior_scale: float = 1.5
    prior_floor: float = 0.01
    tau: float = 0.75
    language: bool | None = None
    strategy: str | None = None
    min_cells: int = 2
    max_boxes: int = 4

    def __post_init__(self) -> None:
        if self.method not in ("otfa", "persam"):
            raise ValueError(f"unknown adaptation method {self.method!r}; use otfa or persam")
        if self.strategy is not None and self.strategy not in STRATEGIES:
            raise ValueError(f"unknown fusion strategy {self.strategy!r}; use one of {', '.join(STRATEGIES)}")


# =============================================================================================== maps
def _grid_coords(transform, n: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor]:
    """Normalised slice coordinates (rows u, cols v; each (n, n)) of the centres of an n x n grid laid over
    the padded S x S frame, and a mask of the cells whose centre lies on the image (not the padding)."""
    S = transform.image_size
    h, w = transform.resized_hw
    centres = (torch.arange(n, dtype=torch.float64, device=device) + 0.5) * (S / n)
    u = (centres / h)[:, None].expand(n, n)
    v = (centres / w)[None, :].expand(n, n)
    valid = (u < 1.0) & (v < 1.0)
    return u, v, valid


def prior_map(centroid: torch.Tensor, covariance: torch.Tensor, transform, n: int, scale: float = 1.0,
              device: torch.device | None = None) -> torch.Tensor:
    """The spatial Gaussian (peak 1) at the cells of an n x n grid over the padded frame; 0 on padding."""
    u, v, valid = _grid_coords(transform, n, device)
    d = torch.stack([u - float(centroid[0]), v - float(centroid[1])], -1)
    cov = covariance.double().to(d.device) * (scale * scale)
    q = torch.einsum("hwi,ij,hwj->hw", d, torch.linalg.inv(cov), d)
    return (torch.exp(-0.5 * q) * valid).float()


def mask_to_grid(mask: np.ndarray | torch.Tensor, transform, n: int) -> torch.Tensor:
    """A slice mask (H, W) → (n, n) on the embedding grid: bilinear to the resized size, zero-padded to the
    S x S frame, bilinear to n x n (the released registration resizes the padded mask, SYRE_SPEC §4)."""
    m = torch.as_tensor(np.asarray(mask, dtype=np.float32))[None, None]
    h, w = transform.resized_hw
    S = transform.image_size
    m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
    m = F.pad(m, (0, S - w, 0, S - h))
    return F.interpolate(m, size=(n, n), mode="bilinear", align_corners=False)[0, 0]


def cosine_map(neck: torch.Tensor, prototype: torch.Tensor) -> torch.Tensor:
    """cos(p, F(x, y)) for neck (B, C, E, E) → (B, E, E), in float32."""
    f = neck.float()
    p = prototype.float().to(f.device)
    return torch.einsum("bchw,c->bhw", f, p) / (f.norm(dim=1) * p.norm() + 1e-6)


def standardised_sigmoid(sim: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """S = σ((s - mean s) / (std s + 1e-6)) per slice, statistics over the image cells (unbiased std)."""
    out = torch.zeros_like(sim)
    for b in range(sim.shape[0]):
        vals = sim[b][valid]
        out[b] = torch.sigmoid((sim[b] - vals.mean()) / (vals.std() + 1e-6)) * valid
    return out


def _smooth_hist(values: np.ndarray) -> torch.Tensor:
    hist = np.bincount(np.clip(values.astype(np.int64) * HIST_BINS // 256, 0, HIST_BINS - 1),
                       minlength=HIST_BINS).astype(np.float64)
    kernel = np.array([0.25, 0.5, 0.25])
    hist = np.convolve(np.pad(hist, 1, mode="edge"), kernel, mode="valid")
    hist = hist + 1e-3 * max(hist.sum(), 1.0) / HIST_BINS
    return torch.from_numpy(hist / hist.sum()).float()


def appearance_lut(hist_fg: torch.Tensor, hist_bg: torch.Tensor, clip: float = 4.0) -> torch.Tensor:
    """Log-likelihood ratio of fore- over background for each grey level 0..255, clipped to ±clip."""
    ratio = torch.log(hist_fg.double() / hist_bg.double()).clamp(-clip, clip).float()
    return ratio.repeat_interleave(256 // HIST_BINS)


def grey_levels(rgb: np.ndarray) -> np.ndarray:
    """(…, H, W, 3) uint8 → (…, H, W) uint8 grey (the mean of the channels; grey input has equal ones)."""
    rgb = np.asarray(rgb)
    return np.rint(rgb.astype(np.float32).mean(-1)).astype(np.uint8)


def _ring(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage as ndi

    radius = int(max(3, round(0.15 * np.sqrt(mask.sum()))))
    return ndi.binary_dilation(mask, iterations=radius) & ~mask


# =============================================================================================== shots
def make_shot(neck: torch.Tensor, rgb: np.ndarray, mask: np.ndarray, transform, slice_position: float,
              meta: dict | None = None) -> Shot:
    """Build a Shot from one support slice.

    neck: (C, E, E) neck embedding of the slice (before any L-V term); rgb: (H, W, 3) uint8, the slice as
    the encoder saw it; mask: (H, W) bool; transform: the slice's resize plan.
    """
    mask = np.asarray(mask, dtype=bool)
    H, W = mask.shape
    n = neck.shape[-1]
    f = neck.float().cpu()
    m = mask_to_grid(mask, transform, n)
    if float(m.sum()) < 1.0:
        raise RegistryError(
            f"the outline covers {int(mask.sum())} pixels, less than one cell of the model's {n}x{n} embedding "
            "grid; outline a larger part of the structure")
    _, _, valid = _grid_coords(transform, n)
    prototype = (f * m).sum((1, 2)) / (m.sum() + 1e-6)
    w_bg = (1.0 - m) * valid
    background = (f * w_bg).sum((1, 2)) / (w_bg.sum() + 1e-6)
    sim = cosine_map(f[None], prototype)[0]
    sim_fg = float((sim * m).sum() / (m.sum() + 1e-6))
    sim_bg = float((sim * w_bg).sum() / (w_bg.sum() + 1e-6))
    ys, xs = np.nonzero(mask)
    pts = np.stack([(ys + 0.5) / H, (xs + 0.5) / W])
    mu = pts.mean(1)
    cov = np.cov(pts, bias=True) if pts.shape[1] > 1 else np.zeros((2, 2))
    cov = cov + np.diag([(0.5 / H) ** 2 + 1e-6, (0.5 / W) ** 2 + 1e-6])
    grey = grey_levels(rgb)
    ring = _ring(mask)
    return Shot(
        prototype=prototype, background=background,
        centroid=torch.tensor(mu, dtype=torch.float32), covariance=torch.tensor(cov, dtype=torch.float32),
        slice_position=float(slice_position), area_fraction=float(mask.mean()),
        sim_fg=sim_fg, sim_bg=sim_bg,
        hist_fg=_smooth_hist(grey[mask]), hist_bg=_smooth_hist(grey[ring] if ring.any() else grey[~mask]),
        meta=dict(meta or {}),
    )


# =============================================================================================== inference
NEG_LOGIT = -20.0


def _components(region: np.ndarray, min_cells: int, max_parts: int) -> list[tuple[int, int, int, int]]:
    """Bounding boxes (r0, c0, r1, c1), inclusive, of the largest 8-connected parts of a grid region."""
    from scipy import ndimage as ndi

    labels, n = ndi.label(region, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return []
    sizes = ndi.sum(region, labels, range(1, n + 1))
    keep = [i for i in np.argsort(-sizes)[:max_parts] if sizes[i] >= min_cells]
    boxes = []
    for sl_index in keep:
        rows, cols = np.nonzero(labels == sl_index + 1)
        boxes.append((int(rows.min()), int(cols.min()), int(rows.max()), int(cols.max())))
    return boxes


def _prompt_encoder_fp32(model):
    """The prompt encoder in float32: segment-anything encodes coordinates in float32, which fails against a
    bf16 Gaussian matrix (the model on CUDA), so a float32 copy is kept beside a model that is not fp32."""
    pe = model.prompt_encoder
    if pe.pe_layer.positional_encoding_gaussian_matrix.dtype == torch.float32:
        return pe
    cached = getattr(model, "_otfa_prompt_encoder_fp32", None)
    if cached is None or cached[0] is not pe:
        import copy

        cached = (pe, copy.deepcopy(pe).float())
        object.__setattr__(model, "_otfa_prompt_encoder_fp32", cached)  # not a registered submodule
    return cached[1]


def _decode(model, embedding: torch.Tensor, *, boxes: torch.Tensor | None = None,
            points: tuple[torch.Tensor, torch.Tensor] | None = None, mask_input: torch.Tensor | None = None,
            text: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's prompt encoder and the mask decoder for K prompts on one image embedding (1, C, E, E).

    boxes (K, 4) in the padded S-frame (x0, y0, x1, y1); points ((K, P, 2), (K, P)); mask_input (K, 1, 4E, 4E)
    logits; text (K, C) [SEG] prompts appended as sparse tokens. Returns all four masks (K, 4, 4E, 4E) and
    the IoU predictions (K, 4).
    """
    dtype = embedding.dtype
    dev = embedding.device
    pe = _prompt_encoder_fp32(model)
    sparse, dense = pe(points=None if points is None else (points[0].to(dev, torch.float32), points[1].to(dev)),
                       boxes=None if boxes is None else boxes.to(dev, torch.float32),
                       masks=None if mask_input is None else mask_input.to(dev, torch.float32))
    k = sparse.shape[0]
    if text is not None:
        sparse = torch.cat([sparse.to(dtype), text.reshape(k, 1, -1).to(dtype)], dim=1)
    masks, iou = model.mask_decoder.predict_masks(
        image_embeddings=embedding.expand(k, -1, -1, -1),
        image_pe=pe.get_dense_pe().to(dtype),
        sparse_prompt_embeddings=sparse.to(dtype),
        dense_prompt_embeddings=dense.to(dtype),
    )
    return masks.float(), iou.float()


@dataclass
class AdaptOutput:
    """Per slice: logits (B, H, W) at slice resolution, presence (B,), and, for calibration, the three
    terms the fusion weighs (each (B, H, W)) and the gate."""

    logits: torch.Tensor
    presence: torch.Tensor
    terms: dict[str, torch.Tensor]
    gate: torch.Tensor


@torch.inference_mode()
def adapt_slices(model, adapter: ClassAdapter, cfg: OTFAConfig, neck: torch.Tensor, rgb: np.ndarray, transform,
                 *, image_embedding: torch.Tensor | None = None, text_prompts: torch.Tensor | None = None,
                 strategy: str | None = None) -> AdaptOutput:
    """The adaptation for one registered class on B slices (see the module docstring).

    neck: (B, C, E, E) neck embeddings; rgb: (B, H, W, 3) uint8 slices as the encoder saw them;
    image_embedding: neck + L-V term computed from G' (language side), or None; text_prompts: (B, C) [SEG]
    prompts for this class (language side), or None.
    """
    from .preprocess import postprocess_logits

    if cfg.method == "persam":
        return persam_slices(model, adapter, neck, transform, rgb.shape[1:3])
    b, _, n, _ = neck.shape
    dev = neck.device
    S = transform.image_size
    h, w = transform.resized_hw
    _, _, valid = _grid_coords(transform, n, dev)
    sim = cosine_map(neck, adapter.prototype)  # (B, E, E)
    S_map = standardised_sigmoid(sim, valid)
    embedding = neck.float() * (1.0 + cfg.alpha * S_map[:, None])
    if image_embedding is not None:
        embedding = embedding + (image_embedding.float() - neck.float())
    embedding = embedding.to(neck.dtype)
    prior = prior_map(adapter.centroid, adapter.covariance, transform, n, cfg.prior_scale, dev)
    prior_hi = prior_map(adapter.centroid, adapter.covariance, transform, 4 * n, cfg.prior_scale, dev)
    spread = max(adapter.sim_fg - adapter.sim_bg, 1e-3)
    tau = adapter.sim_bg + cfg.tau * spread
    region = (sim >= tau) & (prior >= cfg.prior_floor) & valid

    dec = torch.full((b, 4 * n, 4 * n), NEG_LOGIT, device=dev)
    scale = S / n
    presence = torch.zeros(b)
    for i in range(b):
        boxes = _components(region[i].cpu().numpy(), cfg.min_cells, cfg.max_boxes)
        if not boxes:
            continue
        presence[i] = 1.0
        xy = torch.tensor([[c0 * scale, r0 * scale, min((c1 + 1) * scale, w), min((r1 + 1) * scale, h)]
                           for r0, c0, r1, c1 in boxes], dtype=torch.float32)
        text = None if text_prompts is None else text_prompts[i:i + 1].expand(len(boxes), -1)
        masks, _ = _decode(model, embedding[i:i + 1], boxes=xy, text=text)
        m = masks[:, 0] + cfg.logit_prior * (masks.abs().mean((1, 2, 3))[:, None, None] + 1e-6) * prior_hi
        dec[i] = m.max(0).values
    dec_full = postprocess_logits(dec[:, None], transform)[:, 0].clamp(-10.0, 10.0)
    coarse = 4.0 * (sim - tau) / spread + torch.log(prior.clamp_min(1e-4))
    coarse = F.interpolate(coarse[:, None], size=(4 * n, 4 * n), mode="bilinear", align_corners=False)
    coarse_full = postprocess_logits(coarse, transform)[:, 0].clamp(-10.0, 10.0)
    lut = appearance_lut(adapter.hist_fg, adapter.hist_bg).to(dev)
    grey = torch.from_numpy(grey_levels(rgb)).to(dev).long()
    app_full = lut[grey]
    # The fusion stays local: a pixel counts only near the coarse region (one cell of margin).
    gate_grid = F.max_pool2d(region[:, None].float(), 3, stride=1, padding=1)
    gate_grid = F.interpolate(gate_grid, size=(4 * n, 4 * n), mode="nearest")
    gate = postprocess_logits(gate_grid, transform)[:, 0] > 0.5
    terms = {"decoder": dec_full, "coarse": coarse_full, "appearance": app_full}
    name = strategy or cfg.strategy or adapter.strategy
    logits = fuse(terms, gate, name)
    return AdaptOutput(logits=logits, presence=presence, terms=terms, gate=gate)


def fuse(terms: dict[str, torch.Tensor], gate: torch.Tensor, strategy: str) -> torch.Tensor:
    w_dec, w_coarse, w_app = STRATEGIES[strategy]
    logits = w_dec * terms["decoder"] + w_coarse * terms["coarse"] + w_app * terms["appearance"]
    return torch.where(gate, logits, torch.full_like(logits, NEG_LOGIT))


def dice_score(pred: np.ndarray | torch.Tensor, truth: np.ndarray | torch.Tensor) -> float:
    p = np.asarray(pred, dtype=bool)
    t = np.asarray(truth, dtype=bool)
    denom = int(p.sum()) + int(t.sum())
    return 1.0 if denom == 0 else 2.0 * int((p & t).sum()) / denom


@torch.inference_mode()
def calibrate_shot(model, shot: Shot, cfg: OTFAConfig, neck: torch.Tensor, rgb: np.ndarray, mask: np.ndarray,
                   transform) -> dict[str, float]:
    """Dice of every fusion strategy at reproducing the support mask from the support image."""
    adapter = ClassAdapter.merge("support", [shot])
    out = adapt_slices(model, adapter, OTFAConfig(**{**cfg.__dict__, "method": "otfa", "language": False}),
                       neck, rgb[None], transform)
    return {name: round(dice_score(fuse(out.terms, out.gate, name)[0].cpu().numpy() > 0, mask), 6)
            for name in STRATEGIES}


# =============================================================================================== PerSAM
@torch.inference_mode()
def persam_slices(model, adapter: ClassAdapter, neck: torch.Tensor, transform, hw: tuple[int, int]) -> AdaptOutput:
    """A PerSAM-style baseline on the same encoder and decoder (Zhang et al., PerSAM, training-free variant).

    Per slice: cosine similarity of the mask-pooled prototype with every cell; the best cell is a positive
    point and the worst a negative one; a first mask from the points, then two cascaded refinements (the
    points plus the previous logits as a mask prompt, then also the previous mask's box; the mask the IoU
    head rates best among the multimask outputs). PerSAM's target-guided attention and target-semantic
    prompting change the decoder's attention and are left out. PerSAM always answers: every slice gets a mask.
    """
    from .preprocess import postprocess_logits

    b, _, n, _ = neck.shape
    dev = neck.device
    S = transform.image_size
    scale = S / n
    _, _, valid = _grid_coords(transform, n, dev)
    sim = cosine_map(neck, adapter.prototype)
    out = torch.empty((b, 4 * n, 4 * n), device=dev)
    for i in range(b):
        s = torch.where(valid, sim[i], torch.full_like(sim[i], float("nan")))
        flat = torch.nan_to_num(s, nan=-2.0).flatten()
        best = int(flat.argmax())
        worst = int(torch.nan_to_num(s, nan=2.0).flatten().argmin())
        pts = torch.tensor([[[(best % n + 0.5) * scale, (best // n + 0.5) * scale],
                             [(worst % n + 0.5) * scale, (worst // n + 0.5) * scale]]], dtype=torch.float32)
        labels = torch.tensor([[1, 0]])
        emb = neck[i:i + 1]
        masks, iou = _decode(model, emb, points=(pts, labels))
        logits = masks[:, :1]
        masks, iou = _decode(model, emb, points=(pts, labels), mask_input=logits)
        k = int(iou[0, 1:].argmax()) + 1
        logits = masks[:, k:k + 1]
        fg = (logits[0, 0] > 0).nonzero()
        if len(fg):
            f = 4 * n / S  # low-res cells per S-frame pixel
            box = torch.tensor([[fg[:, 1].min() / f, fg[:, 0].min() / f, (fg[:, 1].max() + 1) / f,
                                 (fg[:, 0].max() + 1) / f]], dtype=torch.float32)
            masks, iou = _decode(model, emb, points=(pts, labels), boxes=box, mask_input=logits)
            k = int(iou[0, 1:].argmax()) + 1
            logits = masks[:, k:k + 1]
        out[i] = logits[0, 0]
    full = postprocess_logits(out[:, None], transform)[:, 0]
    return AdaptOutput(logits=full, presence=torch.ones(b), terms={"decoder": full},
                       gate=torch.ones_like(full, dtype=torch.bool))


# =============================================================================================== language side
def language_inputs(model, adapter: ClassAdapter, cfg: OTFAConfig, neck: torch.Tensor, pre_neck: torch.Tensor,
                    transform, target: str, modality_text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The released code's language-side adaptation for one class on B slices (SYRE_SPEC §4 steps 1, 4).

    G' = G ⊙ (1 + β L) goes through the prompt-free prefix again; returns the image embedding with the L-V
    term computed from G' (B, C, E, E) and the [SEG] prompt of this target (B, C).
    """
    from .model.rcmed import ImageFeatures

    n = pre_neck.shape[-1]
    prior = prior_map(adapter.centroid, adapter.covariance, transform, n, cfg.prior_scale, pre_neck.device)
    adapted = (pre_neck.float() * (1.0 + cfg.beta * prior)).to(pre_neck.dtype)
    state = model.prefix(ImageFeatures(neck=neck, pre_neck=adapted))
    out = model.suffix(state, model.plan_prompt([target], modality_text))
    prompts = getattr(out, "prompts", None)
    if prompts is None:
        raise RuntimeError("this model's suffix does not return its [SEG] prompts")
    return state.image_embedding, prompts[:, 0]


def uses_language(model, cfg: OTFAConfig) -> bool:
    if cfg.method != "otfa":
        return False
    if cfg.language is None:
        return bool(getattr(model.config, "trained", False))
    return bool(cfg.language)


# =============================================================================================== registry
def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


@dataclass
class ClassInfo:
    """A registered class as ``list`` shows it."""

    name: str
    key: str
    shots: int
    preset: str
    embedding_dim: int
    strategy: str
    created: str
    updated: str
    records: list[dict]

    def as_dict(self) -> dict:
        return {"name": self.name, "shots": self.shots, "preset": self.preset, "embedding_dim": self.embedding_dim,
                "strategy": self.strategy, "created": self.created, "updated": self.updated,
                "records": self.records}


class ClassRegistry:
    """Registered classes in a folder (see the module docstring for the layout and the write protocol)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder).expanduser()
        if self.folder.exists() and not self.folder.is_dir():
            raise RegistryError(f"the registry path {self.folder} is a file, not a folder")
        self._adapters: dict[str, ClassAdapter] = {}

    def __repr__(self) -> str:
        return f"ClassRegistry({str(self.folder)!r})"

    # ------------------------------------------------------------------------------------------ reading
    @property
    def index_path(self) -> Path:
        return self.folder / REGISTRY_JSON

    def _read_index(self) -> dict:
        path = self.index_path
        if not path.is_file():
            return {"format": REGISTRY_FORMAT, "version": REGISTRY_VERSION, "classes": {}}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RegistryError(f"{path} is not a readable class registry ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != REGISTRY_FORMAT or not isinstance(
                data.get("classes"), dict):
            raise RegistryError(f"{path} is not an RCMed class registry (format {REGISTRY_FORMAT!r} expected)")
        if int(data.get("version", 0)) > REGISTRY_VERSION:
            raise RegistryError(f"{path} was written by a newer RCMed (registry version {data.get('version')}); "
                                "update rcmed")
        return data

    @staticmethod
    def _info(entry: dict) -> ClassInfo:
        records = list(entry.get("shots", []))
        return ClassInfo(name=entry["name"], key=entry["key"], shots=len(records), preset=entry["preset"],
                         embedding_dim=int(entry["embedding_dim"]), strategy=entry.get("strategy", "fused"),
                         created=entry["created"], updated=entry["updated"], records=records)

    def list(self) -> list[ClassInfo]:
        """Registered classes, sorted by name."""
        entries = self._read_index()["classes"].values()
        return sorted((self._info(e) for e in entries), key=lambda i: i.key)

    def names(self) -> list[str]:
        return [i.name for i in self.list()]

    def get(self, name: str) -> ClassInfo | None:
        entry = self._read_index()["classes"].get(normalise_name(name))
        return None if entry is None else self._info(entry)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and normalise_name(name) in self._read_index()["classes"]

    def _load_tensors(self, entry: dict) -> dict[str, torch.Tensor]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self.folder / entry["file"]
        try:
            tensors = load_file(str(path))
        except FileNotFoundError:
            raise RegistryError(f"class {entry['name']!r}: its tensor file {path} is missing") from None
        except (SafetensorError, OSError) as exc:
            raise RegistryError(f"class {entry['name']!r}: {path} is not a readable safetensors file ({exc})") from None
        n = len(entry.get("shots", []))
        for key in Shot.TENSORS + ("scalars",):
            if key not in tensors or tensors[key].shape[0] != n:
                raise RegistryError(f"class {entry['name']!r}: {path} lacks {key!r} for its {n} shot(s)")
        return tensors

    def shots(self, name: str) -> list[Shot]:
        """The shots of a class, as registered (tensors and per-shot records)."""
        data = self._read_index()
        entry = data["classes"].get(normalise_name(name))
        if entry is None:
            raise ClassNotFound(self._unknown(name, data))
        return self._shots(entry)

    def _shots(self, entry: dict) -> list[Shot]:
        t = self._load_tensors(entry)
        out = []
        for i, record in enumerate(entry["shots"]):
            scalars = dict(zip(Shot.SCALARS, (float(v) for v in t["scalars"][i])))
            out.append(Shot(**{k: t[k][i].clone() for k in Shot.TENSORS}, **scalars,
                            scores=dict(record.get("scores", {})), meta=dict(record)))
        return out

    def adapter(self, name: str) -> ClassAdapter | None:
        """The merged adapter of a class, or None when the name is not registered."""
        for attempt in range(2):
            entry = self._read_index()["classes"].get(normalise_name(name))
            if entry is None:
                return None
            cached = self._adapters.get(entry["file"])
            if cached is not None:
                return cached
            try:
                adapter = ClassAdapter.merge(entry["name"], self._shots(entry))
            except RegistryError:
                if attempt == 0 and not (self.folder / entry["file"]).exists():
                    continue  # a writer replaced the file between our two reads
                raise
            adapter.strategy = entry.get("strategy", adapter.strategy)
            self._adapters[entry["file"]] = adapter
            return adapter
        return None

    @staticmethod
    def _unknown(name: str, data: dict) -> str:
        known = sorted(e["name"] for e in data["classes"].values())
        listing = ", ".join(repr(k) for k in known) if known else "none"
        return f"no class named {name!r} in the registry (registered: {listing})"

    # ------------------------------------------------------------------------------------------ writing
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # Windows: writers are not serialised across processes
            yield
            return
        with open(self.folder / LOCK_NAME, "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _atomic_write(self, rel: str, writer) -> Path:
        target = self.folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        try:
            writer(tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return target

    def _commit(self, data: dict, new_file: tuple[str, dict[str, torch.Tensor]] | None,
                old_files: Sequence[str]) -> None:
        """Write a new tensor file (if any), then the index (the commit), then drop replaced files."""
        from safetensors.torch import save_file

        written: Path | None = None
        try:
            if new_file is not None:
                rel, tensors = new_file
                written = self._atomic_write(rel, lambda p: save_file(tensors, p, metadata={"format": REGISTRY_FORMAT}))
            text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
            self._atomic_write(REGISTRY_JSON, lambda p: Path(p).write_text(text, encoding="utf-8"))
        except BaseException:
            if written is not None and written.name not in {Path(f).name for f in old_files}:
                written.unlink(missing_ok=True)
            raise
        for rel in old_files:
            if new_file is None or rel != new_file[0]:
                (self.folder / rel).unlink(missing_ok=True)

    def add_shot(self, name: str, shot: Shot, *, preset: str, embedding_dim: int, record: dict | None = None) -> ClassInfo:
        """Register a class, or add a shot to it when the name exists (nothing is ever overwritten)."""
        shown = validate_name(name)
        key = normalise_name(shown)
        if shot.prototype.shape != (embedding_dim,):
            raise RegistryError(f"the shot's prototype has shape {tuple(shot.prototype.shape)}, "
                                f"expected ({embedding_dim},)")
        with self._locked():
            data = self._read_index()
            entry = data["classes"].get(key)
            now = _now()
            if entry is None:
                entry = {"name": shown, "key": key, "preset": preset, "embedding_dim": int(embedding_dim),
                         "created": now, "shots": []}
                shots: list[Shot] = []
                old_files: list[str] = []
            else:
                if entry["preset"] != preset or int(entry["embedding_dim"]) != int(embedding_dim):
                    raise RegistryError(
                        f"class {entry['name']!r} was registered with the {entry['preset']} preset "
                        f"({entry['embedding_dim']}-channel embeddings); this model is {preset} "
                        f"({embedding_dim} channels). Register it under another name or in another registry")
                same = ("source_sha256", "axis", "slice", "mask_sha256")
                if record and all(record.get(f) is not None for f in same) and any(
                        all(old.get(f) == record[f] for f in same) for old in entry.get("shots", [])):
                    raise RegistryError(f"class {entry['name']!r} already has this shot (the same image, slice "
                                        f"{record['slice']} and outline); nothing was added")
                shots = self._shots(entry)
                old_files = [entry["file"]]
            rec = {"date": now, **(record or {}), "scores": dict(shot.scores)}
            shots = shots + [Shot(**{**shot.__dict__, "meta": rec})]
            tensors = {k: torch.stack([s.__dict__[k].float().cpu() for s in shots]).contiguous()
                       for k in Shot.TENSORS}
            tensors["scalars"] = torch.tensor([[float(s.__dict__[k]) for k in Shot.SCALARS] for s in shots],
                                              dtype=torch.float32)
            digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in tensors.values())
                                    + now.encode()).hexdigest()[:12]
            rel = f"{CLASSES_DIR}/{_slug(key)}.{digest}.safetensors"
            merged = ClassAdapter.merge(shown, shots)
            new_entry = {**entry, "file": rel, "updated": now, "strategy": merged.strategy,
                         "shots": [s.meta for s in shots]}
            new_data = {**data, "format": REGISTRY_FORMAT, "version": REGISTRY_VERSION,
                        "classes": {**data["classes"], key: new_entry}}
            self._commit(new_data, (rel, tensors), old_files)
            return self._info(new_entry)

    def remove(self, name: str) -> ClassInfo:
        """Remove a class and its tensors. Raises RegistryError when it is not registered."""
        key = normalise_name(name)
        if not self.index_path.is_file():
            raise ClassNotFound(f"no class named {name!r}: {self.folder} holds no registry")
        with self._locked():
            data = self._read_index()
            entry = data["classes"].get(key)
            if entry is None:
                raise ClassNotFound(self._unknown(name, data))
            classes = {k: v for k, v in data["classes"].items() if k != key}
            self._commit({**data, "classes": classes}, None, [entry["file"]])
            self._adapters.pop(entry["file"], None)
            return self._info(entry)


def default_registry_dir() -> Path:
    """Where an engine keeps classes when it is given no registry: $RCMED_REGISTRY, else the user's data folder
    (~/.local/share/rcmed/classes, ~/Library/Application Support/rcmed/classes, %APPDATA%/rcmed/classes)."""
    env = os.environ.get("RCMED_REGISTRY")
    if env:
        return Path(env).expanduser()
    if os.name == "nt":
        base = Path(os.environ.get("APPDATA") or Path.home() / "AppData" / "Roaming")
    elif os.uname().sysname == "Darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "rcmed" / "classes"


def as_registry(registry: "ClassRegistry | str | os.PathLike | None", must_exist: bool = False) -> ClassRegistry | None:
    """A ClassRegistry from a registry or a folder path (None stays None)."""
    if registry is None or isinstance(registry, ClassRegistry):
        return registry
    reg = ClassRegistry(registry)
    if must_exist and not reg.index_path.is_file():
        raise RegistryError(f"no class registry in {reg.folder} (register a class first: rcmed register ...)")
    return reg


# =============================================================================================== engine glue
@dataclass
class PromptAdaptation:
    """Which targets of which prompts name registered classes, for one segment_many call."""

    cfg: OTFAConfig
    targets: list[list[str]]
    adapters: list[dict[int, ClassAdapter]]
    language: bool

    def needs_text(self, p: int) -> bool:
        """Prompt p has targets that go through the plain text path."""
        return len(self.adapters[p]) < len(self.targets[p])

    @property
    def needs_prefix(self) -> bool:
        return self.language or any(self.needs_text(p) for p in range(len(self.targets)))

    def apply(self, model, p: int, features, rgb: np.ndarray, transform, logits: torch.Tensor | None,
              presence: np.ndarray | None, modality_text: str) -> tuple[torch.Tensor, np.ndarray]:
        """Replace the logits (b, T, H, W) and presence (b, T) of prompt p's registered targets."""
        b = rgb.shape[0]
        n_targets = len(self.targets[p])
        H, W = transform.in_hw
        if logits is None:
            logits = torch.full((b, n_targets, H, W), -1.0)
            presence = np.zeros((b, n_targets), dtype=np.float32)
        for t, adapter in self.adapters[p].items():
            image_embedding = text = None
            if self.language:
                image_embedding, text = language_inputs(model, adapter, self.cfg, features.neck, features.pre_neck,
                                                        transform, self.targets[p][t], modality_text)
            out = adapt_slices(model, adapter, self.cfg, features.neck, rgb, transform,
                               image_embedding=image_embedding, text_prompts=text)
            logits[:, t] = out.logits.to(logits.device, logits.dtype)
            presence[:, t] = out.presence.numpy()
        return logits, presence


def plan_adaptation(model, targets: list[list[str]], registry, cfg: OTFAConfig | None, preset: str,
                    embedding_dim: int) -> PromptAdaptation | None:
    """The adaptation for a call, or None when no target names a registered class (the plain path)."""
    reg = as_registry(registry, must_exist=True)
    if reg is None:
        return None
    cfg = cfg or OTFAConfig()
    adapters: list[dict[int, ClassAdapter]] = []
    for names in targets:
        found: dict[int, ClassAdapter] = {}
        for t, name in enumerate(names):
            info = reg.get(name)
            if info is None:
                continue
            if info.preset != preset or info.embedding_dim != embedding_dim:
                raise RegistryError(
                    f"class {info.name!r} was registered with the {info.preset} preset ({info.embedding_dim}-channel "
                    f"embeddings) and cannot adapt the {preset} model ({embedding_dim} channels); register it again "
                    "with this preset")
            adapter = reg.adapter(name)
            if adapter is not None:
                found[t] = adapter
        adapters.append(found)
    if not any(adapters):
        return None
    return PromptAdaptation(cfg=cfg, targets=[list(t) for t in targets], adapters=adapters,
                            language=uses_language(model, cfg))
