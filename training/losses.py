"""RCMed's training losses (SYRE_SPEC §5): token cross-entropy, mask BCE, Dice and boundary BCE.

Defaults are the released weights: 1.0 CE + 0.5 BCE + 2.0 Dice + 0.2 boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rcmed_engine.model.tokenizer import IGNORE_INDEX


@dataclass
class LossWeights:
    ce: float = 1.0
    bce: float = 0.5
    dice: float = 2.0
    boundary: float = 0.2
    presence: float = 0.0  # not in the released loss: see presence_ce


def token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy.

    Either logits (B, L, V) with labels (B, L), IGNORE_INDEX where not scored (shifted here), or logits
    (N, V) already gathered at the scored positions with their next-token targets (N,).
    """
    if logits.ndim == 2:
        return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)


def mask_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE with logits averaged over pixels per mask, then over masks. (N, H, W) each."""
    return F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none").flatten(1).mean(1).mean()


def mask_dice(logits: torch.Tensor, target: torch.Tensor, scale: float = 1000.0, eps: float = 1e-6) -> torch.Tensor:
    """1 - Dice per mask on sigmoid probabilities (the released scaled form), averaged over masks."""
    p = logits.float().sigmoid().flatten(1) / scale
    g = target.float().flatten(1)
    return (1 - (2 * (p * g).sum(1) + eps) / (p.sum(1) + g.sum(1) / scale + eps)).mean()


def _gradient(x: torch.Tensor) -> torch.Tensor:
    """Morphological gradient (3x3 dilation minus erosion), clamped to [0, 1]."""
    x = x.unsqueeze(1)
    dil = F.max_pool2d(x, 3, 1, 1)
    ero = -F.max_pool2d(-x, 3, 1, 1)
    return (dil - ero).clamp(0, 1).squeeze(1)


def boundary_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    pb = _gradient(logits.float().sigmoid()).clamp(1e-6, 1 - 1e-6)
    gb = _gradient(target.float())
    return F.binary_cross_entropy(pb, gb, reduction="none").flatten(1).mean(1).mean()


def presence_ce(pair_logits: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the engine's presence read-out: the answer's "contains" against "does (not
    contain)" logits, (N, 2), with present (N,) bool. In the token CE this one decision is one of ~20-80
    scored tokens per answer; a short run needs it said louder (``LossWeights.presence``)."""
    return F.cross_entropy(pair_logits.float(), (~present).long())


def rcmed_loss(lm_logits: torch.Tensor | None, labels: torch.Tensor | None, mask_logits: torch.Tensor,
               mask_targets: torch.Tensor, weights: LossWeights = LossWeights(),
               presence: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """All terms and their weighted total. Mask terms skip when there are no masks (negative samples).
    ``presence``: (pair logits (N, 2), present (N,)) for ``presence_ce``."""
    zero = mask_logits.sum() * 0.0
    out = {"ce": token_ce(lm_logits, labels) if lm_logits is not None else zero}
    out["presence"] = presence_ce(*presence) if presence is not None and presence[0].numel() else zero
    if mask_logits.numel():
        out.update(bce=mask_bce(mask_logits, mask_targets), dice=mask_dice(mask_logits, mask_targets),
                   boundary=boundary_bce(mask_logits, mask_targets))
    else:
        out.update(bce=zero, dice=zero, boundary=zero)
    out["total"] = (weights.ce * out["ce"] + weights.bce * out["bce"] + weights.dice * out["dice"]
                    + weights.boundary * out["boundary"] + weights.presence * out["presence"])
    return out
