"""The causal language model: base weights, added tokens and LoRA adapters (peft)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from peft import LoraConfig, inject_adapter_in_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from ..data_locations import cache_dir  # noqa: F401 (re-exported: one RCMED_CACHE rule for weights and data)
from ..data_locations import smollm2_gguf_path
from .config import LanguageModelConfig
from .tokenizer import PromptTokenizer, build_tiny_tokenizer


def _load_smollm2(dtype: torch.dtype) -> tuple[PreTrainedModel, object]:
    """SmolLM2-135M-Instruct from the package's GGUF file.

    De-quantising the GGUF takes ~20 s, so the result is saved once as safetensors in the cache folder.
    """
    gguf = smollm2_gguf_path()
    target = cache_dir() / f"smollm2-135m-instruct-{gguf.stat().st_size}"
    if not (target / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
        try:
            # A GGUF-loaded model refuses save_pretrained; the de-quantised tensors are plain fp32.
            config = model.config.to_dict()
            config.pop("quantization_config", None)
            LlamaConfig.from_dict(config).save_pretrained(str(tmp))
            state = {k: v.contiguous() for k, v in model.state_dict().items()}
            if model.config.tie_word_embeddings:
                state.pop("lm_head.weight", None)
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            tok.save_pretrained(str(tmp))
            os.replace(tmp, target)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not (target / "config.json").is_file():
                raise
    with _quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(str(target), dtype=dtype)
        tok = AutoTokenizer.from_pretrained(str(target))
    return model, tok


@contextlib.contextmanager
def _quiet_transformers():
    """Hide transformers' per-load progress bars; the engine reports its own progress."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _random_llama(cfg: LanguageModelConfig, vocab_size: int) -> PreTrainedModel:
    llama = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads or cfg.num_attention_heads,
        rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(llama)


def has_lora(model: torch.nn.Module) -> bool:
    return any(".lora_" in name for name, _ in model.named_parameters())


def add_lora(model: torch.nn.Module, r: int, alpha: float, dropout: float, targets: tuple[str, ...] | list[str]) -> bool:
    """Inject peft LoRA layers into ``model`` (in place) where it has none; True if it did.

    peft starts B at zero, so the model's outputs do not change by one bit (each target adds an exact 0).
    The released syre-7b weights ship with their LoRA merged: this is how it trains LoRA and how it takes a
    LoRA adapter. The new tensors follow the model's device and dtype.
    """
    if has_lora(model):
        return False
    ref = next(model.parameters())
    inject_adapter_in_model(LoraConfig(r=int(r), lora_alpha=alpha, lora_dropout=float(dropout),
                                       target_modules=list(targets), bias="none"), model)
    for name, p in model.named_parameters():
        if ".lora_" in name:
            p.data = p.data.to(ref.device, ref.dtype)
    return True


def build_language_model(
    cfg: LanguageModelConfig, folder: str | Path | None = None, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PromptTokenizer, int]:
    """Base language model with RCMed's added tokens (and LoRA adapters when ``cfg.use_lora``).

    Returns the model, its prompt tokenizer and the base vocabulary size (rows below it are base
    weights; rows from it on are the added tokens, which RCMed checkpoints carry).
    """
    if cfg.source == "random_llama":
        hf_tok = build_tiny_tokenizer()
        base_vocab = hf_tok.vocab_size  # the added tokens come after
        model = _random_llama(cfg, len(hf_tok))
        add_bos = True
    elif cfg.source == "smollm2_gguf":
        model, hf_tok = _load_smollm2(dtype)
        base_vocab = model.get_input_embeddings().weight.shape[0]
        add_bos = False
    elif cfg.source == "local":
        if folder is None:
            raise ValueError("this preset needs --weights DIR with the language model")
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
        hf_tok = AutoTokenizer.from_pretrained(str(folder))
        base_vocab = model.get_input_embeddings().weight.shape[0]
        add_bos = True
    else:
        raise ValueError(f"unknown language model source {cfg.source!r}")

    tokenizer = PromptTokenizer(hf_tok, add_bos=add_bos)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if cfg.use_lora:
        add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    model.config.use_cache = True
    return model.to(dtype), tokenizer, min(base_vocab, len(tokenizer))
