"""SAM's prompt encoder and mask decoder run on one embedding with box, point, mask or [SEG] prompts.

Shared by the adaptation (box prompts) and the PerSAM baseline (point prompts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


def decode_prompts(model, embedding: torch.Tensor, *, boxes: torch.Tensor | None = None,
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


_decode = decode_prompts  # the name OTFA's modules import


@dataclass
class AdaptOutput:
    """Per slice: logits (B, H, W) at slice resolution, presence (B,), and, for calibration, the three
    terms the fusion weighs (each (B, H, W)) and the gate."""

    logits: torch.Tensor
    presence: torch.Tensor
    terms: dict[str, torch.Tensor]
    gate: torch.Tensor
