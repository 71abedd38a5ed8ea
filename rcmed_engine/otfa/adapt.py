"""Inference-time adaptation for a registered class: the maths of the package docstring's steps 1-6.

Similarity and location maps reshape the embedding, the coarse region gives box prompts, and the decoder's
logit, the coarse similarity evidence and the appearance log-ratio are fused with weights the class chose on
its own shot (calibrate_shot).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .config import STRATEGIES, OTFAConfig
from .decode import AdaptOutput, _decode
from .grid import _grid_coords, cosine_map, grey_levels, prior_map, standardised_sigmoid
from .persam import persam_slices
from .shot import HIST_BINS, ClassAdapter, Shot


def appearance_lut(hist_fg: torch.Tensor, hist_bg: torch.Tensor, clip: float = 4.0) -> torch.Tensor:
    """Log-likelihood ratio of fore- over background for each grey level 0..255, clipped to ±clip."""
    ratio = torch.log(hist_fg.double() / hist_bg.double()).clamp(-clip, clip).float()
    return ratio.repeat_interleave(256 // HIST_BINS)


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


@torch.inference_mode()
def adapt_slices(model, adapter: ClassAdapter, cfg: OTFAConfig, neck: torch.Tensor, rgb: np.ndarray, transform,
                 *, image_embedding: torch.Tensor | None = None, text_prompts: torch.Tensor | None = None,
                 strategy: str | None = None) -> AdaptOutput:
    """The adaptation for one registered class on B slices (see the module docstring).

    neck: (B, C, E, E) neck embeddings; rgb: (B, H, W, 3) uint8 slices as the encoder saw them;
    image_embedding: neck + L-V term computed from G' (language side), or None; text_prompts: (B, C) [SEG]
    prompts for this class (language side), or None.
    """
    from ..preprocess import postprocess_logits

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


def language_inputs(model, adapter: ClassAdapter, cfg: OTFAConfig, neck: torch.Tensor, pre_neck: torch.Tensor,
                    transform, target: str, modality_text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The released code's language-side adaptation for one class on B slices (SYRE_SPEC §4 steps 1, 4).

    G' = G ⊙ (1 + β L) goes through the prompt-free prefix again; returns the image embedding with the L-V
    term computed from G' (B, C, E, E) and the [SEG] prompt of this target (B, C).
    """
    from ..model.rcmed import ImageFeatures

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
