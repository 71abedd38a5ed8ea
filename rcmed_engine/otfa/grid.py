"""Maps on the model's embedding grid (n x n cells over the padded S x S frame), shared by shots and adaptation.

Normalised slice coordinates are (row, column) in [0, 1] of the slice as the engine cuts it; cells whose centre
falls on the padding are not part of the image.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


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


def grey_levels(rgb: np.ndarray) -> np.ndarray:
    """(…, H, W, 3) uint8 → (…, H, W) uint8 grey (the mean of the channels; grey input has equal ones)."""
    rgb = np.asarray(rgb)
    return np.rint(rgb.astype(np.float32).mean(-1)).astype(np.uint8)
