"""SAM-family image encoders that return both the neck embedding and the pre-neck features."""

from __future__ import annotations

from functools import partial

import torch
from .sam_modules import ImageEncoderViT
from torch import nn

from .config import ImageEncoderConfig


class SamImageEncoder(ImageEncoderViT):
    """segment-anything's ViT, returning ``(neck, pre_neck)``.

    The mask decoder reads the neck embedding F (B, 256, E, E); the language side reads the features
    G (B, embed_dim, E, E) of the last transformer block, before the neck (SYRE_SPEC §3.2).
    """

    def __init__(self, cfg: ImageEncoderConfig) -> None:
        super().__init__(
            img_size=cfg.image_size,
            patch_size=cfg.patch_size,
            embed_dim=cfg.embed_dim,
            depth=cfg.depth,
            num_heads=cfg.num_heads,
            mlp_ratio=cfg.mlp_ratio,
            out_chans=cfg.neck_dim,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=cfg.window_size,
            global_attn_indexes=tuple(cfg.global_attn_indexes),
        )
        self.pre_neck_dim = cfg.embed_dim
        self.neck_dim = cfg.neck_dim

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        pre_neck = x.permute(0, 3, 1, 2)
        return self.neck(pre_neck), pre_neck


def build_image_encoder(cfg: ImageEncoderConfig) -> nn.Module:
    """Build the encoder a config names; both kinds return ``(neck, pre_neck)``."""
    if cfg.kind == "vit":
        return SamImageEncoder(cfg)
    if cfg.kind == "tiny_vit":
        from .tiny_vit import TinyViT

        return TinyViT(img_size=cfg.image_size)
    raise ValueError(f"unknown image encoder kind {cfg.kind!r}")
