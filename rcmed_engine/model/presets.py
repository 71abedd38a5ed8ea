"""A registry of model builders, one per preset (the names are the contract, DESIGN.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..data_locations import lite_weights_dir
from .checkpoint import load_checkpoint, read_config
from .config import ImageEncoderConfig, LanguageModelConfig, PromptConfig, RCMedConfig
from .image_encoder import build_image_encoder
from .language_model import build_language_model
from .loaded import LoadedModel
from .mask_decoder import build_mask_decoder, build_prompt_encoder
from .rcmed import RCMed

PRESETS = ("tiny", "lite", "syre-7b")

__all__ = ["PRESETS", "BUILDERS", "LoadedModel", "build_model", "lite_config", "lite_weights_dir", "load_preset",
           "syre7b_config", "tiny_config"]


def tiny_config() -> RCMedConfig:
    """A small random model for tests: 64 px input, 8x8 embedding, 2-layer Llama."""
    return RCMedConfig(
        preset="tiny",
        image_encoder=ImageEncoderConfig(kind="vit", image_size=64, patch_size=8, embed_dim=48, depth=2,
                                         num_heads=2, window_size=4, global_attn_indexes=(1,), neck_dim=32,
                                         pre_neck_dim=48),
        language_model=LanguageModelConfig(source="random_llama", hidden_size=64, intermediate_size=128,
                                           num_hidden_layers=2, num_attention_heads=4, vocab_size=0,
                                           max_position_embeddings=512, lora_r=4, lora_alpha=8),
        prompt=PromptConfig(channel_order="rgb"),
        out_dim=32,
        decoder_mlp_dim=64,
        decoder_heads=2,
        vl_grid=4,
        vl_pool="avg",
    )


def lite_config() -> RCMedConfig:
    """LiteMedSAM's TinyViT (256 px) with SmolLM2-135M-Instruct; 8x8 image tokens.

    64 image tokens (each pooled from 8x8 cells of the 64x64 embedding, 32x32 input pixels) keep the
    language model's sequence at ~140 tokens: training and the per-slice prefix cost scale with it, and
    the mask's detail comes from the neck embedding, not from the tokens.
    """
    return RCMedConfig(
        preset="lite",
        image_encoder=ImageEncoderConfig(kind="tiny_vit", image_size=256, neck_dim=256, pre_neck_dim=320,
                                         embed_dim=320, depth=0, num_heads=0, global_attn_indexes=()),
        language_model=LanguageModelConfig(source="smollm2_gguf", hidden_size=576, intermediate_size=1536,
                                           num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                           vocab_size=49152, tie_word_embeddings=True, lora_r=16, lora_alpha=16),
        prompt=PromptConfig(channel_order="rgb"),
        vl_grid=8,
        vl_pool="avg",
    )


def syre7b_config() -> RCMedConfig:
    """The released architecture (SYRE_SPEC §1): SAM ViT-H 1024 px and a LLaMA-7B, 32x32 image tokens."""
    return RCMedConfig(
        preset="syre-7b",
        image_encoder=ImageEncoderConfig(kind="vit"),
        language_model=LanguageModelConfig(source="local", vocab_size=32007, use_lora=False),
        prompt=PromptConfig(channel_order="bgr"),
        vl_grid=32,
        vl_pool="bilinear",
        presence_threshold=0.0,  # no gating: the released model's masks (SYRE_SPEC §3.10)
        trained=True,
    )


def build_model(config: RCMedConfig, lm_folder: str | Path | None = None,
                dtype: torch.dtype = torch.float32) -> RCMed:
    """Build the architecture a config describes, with base weights where the config names them."""
    enc_cfg = config.image_encoder
    if config.preset == "lite":
        from .litemedsam import load_litemedsam_state_dict, split_litemedsam_state_dict

        parts = split_litemedsam_state_dict(load_litemedsam_state_dict())
    else:
        parts = None
    image_encoder = build_image_encoder(enc_cfg)
    prompt_encoder = build_prompt_encoder(config.out_dim, enc_cfg.embedding_size, enc_cfg.image_size)
    mask_decoder = build_mask_decoder(config.out_dim, config.decoder_mlp_dim, config.decoder_heads)
    if parts is not None:
        image_encoder.load_state_dict(parts["image_encoder"], strict=True)
        prompt_encoder.load_state_dict(parts["prompt_encoder"], strict=True)
        mask_decoder.load_state_dict(parts["mask_decoder"], strict=True)
    language_model, tokenizer, base_vocab = build_language_model(config.language_model, lm_folder, dtype)
    model = RCMed(config, image_encoder, language_model, tokenizer, prompt_encoder, mask_decoder, base_vocab)
    return model.to(dtype).eval()


def _tiny(weights: str | Path | None, dtype: torch.dtype) -> LoadedModel:
    config = read_config(weights) if weights else tiny_config()
    with torch.random.fork_rng(devices=[]):  # seed 0 for the weights, without touching the caller's RNG
        torch.manual_seed(0)
        model = build_model(config, dtype=dtype)
    report = load_checkpoint(model, weights) if weights else None
    return LoadedModel(model, str(weights) if weights else "random (seed 0)", report)


def _lite(weights: str | Path | None, dtype: torch.dtype) -> LoadedModel:
    folder = Path(weights) if weights else lite_weights_dir()
    config = read_config(folder)
    model = build_model(config, dtype=dtype)
    report = load_checkpoint(model, folder)
    return LoadedModel(model, str(folder), report)


def _syre7b(weights: str | Path | None, dtype: torch.dtype) -> LoadedModel:
    """The released McGregorW/SyRe weights: the released folder itself or one `rcmed convert-syre` wrote."""
    if weights is None:
        raise ValueError("the syre-7b preset needs --weights DIR: a folder with the released McGregorW/SyRe "
                         "weights, as downloaded or as converted once by `rcmed convert-syre SRC DST`")
    from .syre import load_syre  # lazily: the released-weights reader is only needed for this preset

    return load_syre(weights, dtype)


BUILDERS: dict[str, Callable[[str | Path | None, torch.dtype], LoadedModel]] = {
    "tiny": _tiny,
    "lite": _lite,
    "syre-7b": _syre7b,
}


def load_preset(name: str, weights: str | Path | None = None, dtype: torch.dtype = torch.float32) -> LoadedModel:
    if name not in BUILDERS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    if weights is not None and not Path(weights).is_dir():
        raise FileNotFoundError(f"weights folder not found: {weights}")
    return BUILDERS[name](weights, dtype)
