"""SAM's prompt encoder and mask decoder, with one image embedding per prompt.

segment-anything's MaskDecoder repeats a single image embedding for every prompt. RCMed batches many
slices, each with its own embedding and its own [SEG] prompts, so ``predict_masks`` here pairs them.
"""

from __future__ import annotations

import torch
from .sam_modules import MaskDecoder, PositionEmbeddingRandom, PromptEncoder, TwoWayTransformer


class RCMedMaskDecoder(MaskDecoder):
    def predict_masks(  # type: ignore[override]
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks for N prompts.

        image_embeddings: (1, C, h, w), shared by all prompts, or (N, C, h, w), one per prompt.
        sparse_prompt_embeddings: (N, T, C); dense_prompt_embeddings: (1 or N, C, h, w).
        Returns masks (N, 4, 4h, 4w) and IoU predictions (N, 4).
        """
        n = sparse_prompt_embeddings.size(0)
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(n, -1, -1).to(sparse_prompt_embeddings.dtype)
        tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)

        src = image_embeddings if image_embeddings.size(0) == n else image_embeddings.expand(n, -1, -1, -1)
        src = src + dense_prompt_embeddings
        pos_src = image_pe.expand(n, -1, -1, -1)
        b, c, h, w = src.shape

        hs, src = self.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : (1 + self.num_mask_tokens), :]

        src = src.transpose(1, 2).reshape(b, c, h, w)
        upscaled = self.output_upscaling(src)
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(b, c, h * w)).reshape(b, -1, h, w)
        return masks, self.iou_prediction_head(iou_token_out)


class _PositionEmbeddingInMatrixDtype(PositionEmbeddingRandom):
    """SAM builds its coordinate grids in fp32; in a bf16 model the Gaussian matrix is bf16 and the
    product fails. Compute in the matrix's dtype, as the released bf16 model does (SYRE_SPEC §3.9)."""

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        return super()._pe_encoding(coords.to(self.positional_encoding_gaussian_matrix.dtype))


class RCMedPromptEncoder(PromptEncoder):
    """segment-anything's PromptEncoder whose positional encoding works in any dtype (same keys)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        pe = _PositionEmbeddingInMatrixDtype(self.pe_layer.positional_encoding_gaussian_matrix.shape[1])
        pe.positional_encoding_gaussian_matrix.copy_(self.pe_layer.positional_encoding_gaussian_matrix)
        self.pe_layer = pe


def build_prompt_encoder(out_dim: int, embedding_size: int, image_size: int) -> PromptEncoder:
    return RCMedPromptEncoder(
        embed_dim=out_dim,
        image_embedding_size=(embedding_size, embedding_size),
        input_image_size=(image_size, image_size),
        mask_in_chans=16,
    )


def build_mask_decoder(out_dim: int, mlp_dim: int = 2048, num_heads: int = 8) -> RCMedMaskDecoder:
    return RCMedMaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=out_dim, mlp_dim=mlp_dim, num_heads=num_heads),
        transformer_dim=out_dim,
        iou_head_depth=3,
        iou_head_hidden_dim=out_dim,
    )
