"""What one outlined slice (a *shot*) keeps, and how the shots of a class are merged.

From each shot: a semantic prototype (the mask-pooled neck embedding, SYRE_SPEC §4 "Registration") and the
mean embedding outside the mask; a spatial prior (a Gaussian on the mask's centroid and covariance, plus the
relative slice position); a calibration of the similarity map on the support itself; intensity histograms
inside the mask and in a ring around it. Several shots merge by their mean (prototypes, calibrations,
histograms) and by moment matching (the Gaussians).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .config import STRATEGIES
from .errors import RegistryError
from .grid import _grid_coords, cosine_map, grey_levels, mask_to_grid


HIST_BINS = 32


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


def _smooth_hist(values: np.ndarray) -> torch.Tensor:
    hist = np.bincount(np.clip(values.astype(np.int64) * HIST_BINS // 256, 0, HIST_BINS - 1),
                       minlength=HIST_BINS).astype(np.float64)
    kernel = np.array([0.25, 0.5, 0.25])
    hist = np.convolve(np.pad(hist, 1, mode="edge"), kernel, mode="valid")
    hist = hist + 1e-3 * max(hist.sum(), 1.0) / HIST_BINS
    return torch.from_numpy(hist / hist.sum()).float()


def _ring(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage as ndi

    radius = int(max(3, round(0.15 * np.sqrt(mask.sum()))))
    return ndi.binary_dilation(mask, iterations=radius) & ~mask


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
