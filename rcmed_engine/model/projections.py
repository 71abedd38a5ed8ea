"""The two bridges between vision and language (paper: V-L and L-V projection) and the [SEG] head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class VLProjection(nn.Module):
    """Pre-neck image features → image tokens in the language model's width.

    (B, C, E, E) is pooled to (B, C, g, g), flattened row-major to (B, g*g, C) (token k is row k // g,
    column k % g) and mapped by a two-layer MLP with exact GELU to (B, g*g, D) (SYRE_SPEC §3.3).
    """

    def __init__(self, in_dim: int, hidden_size: int, grid: int, pool: str = "bilinear") -> None:
        super().__init__()
        self.grid = grid
        self.pool = pool
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))

    def pool_features(self, pre_neck: torch.Tensor) -> torch.Tensor:
        if pre_neck.shape[-1] == self.grid:
            return pre_neck
        if self.pool == "avg":
            return F.adaptive_avg_pool2d(pre_neck, self.grid)
        # The released model resamples bilinearly in fp32 (equal to 2x2 averaging at factor 1/2).
        pooled = F.interpolate(pre_neck.float(), size=(self.grid, self.grid), mode="bilinear", align_corners=False)
        return pooled.to(pre_neck.dtype)

    def forward(self, pre_neck: torch.Tensor) -> torch.Tensor:
        tokens = self.pool_features(pre_neck).flatten(2).transpose(1, 2)
        return self.mlp(tokens)


class HiddenToPrompt(nn.Module):
    """Language hidden states (…, D) → (…, out_dim): Linear, ReLU, Linear, Dropout(0.1).

    Used twice: as ``text_hidden_fcs`` on the state that predicts each [SEG] (a sparse prompt for SAM),
    and as ``lv_projection`` on the states at the image-token positions (SYRE_SPEC §3.7, §3.8).
    """

    def __init__(self, hidden_size: int, out_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, hidden_size), nn.ReLU(inplace=True), nn.Linear(hidden_size, out_dim), nn.Dropout(0.1)
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.mlp(hidden)


def lv_to_grid(lv_tokens: torch.Tensor, grid: int, size: int) -> torch.Tensor:
    """(B, g*g, C) image-position prompts → (B, C, size, size), bilinear in fp32 (SYRE_SPEC §3.8)."""
    b, n, c = lv_tokens.shape
    spatial = lv_tokens.reshape(b, grid, grid, c).permute(0, 3, 1, 2)
    if grid == size:
        return spatial
    up = F.interpolate(spatial.float(), size=(size, size), mode="bilinear", align_corners=False)
    return up.to(lv_tokens.dtype)
