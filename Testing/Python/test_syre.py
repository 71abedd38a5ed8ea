"""The released SyRe layout in the syre-7b preset: loader, converter, tokenizer, and every pitfall.

A scaled-down checkpoint is built here in exactly the released layout (SYRE_SPEC §1: the same key names
and nesting, small widths), saved as the released code would (two ``.bin`` shards plus an index; LLM and
projector in bf16, SAM and the two 4096→256 MLPs in fp32; 4.28's ``inv_freq`` buffers included), with a
SentencePiece tokenizer trained offline in tmp_path and the seven added tokens in the released order.

``SpecForward`` is an independent forward pass written from the spec with plain torch ops (no module of
the engine): the engine's masks must match it, and each pitfall of SYRE_SPEC §7/§8 is shown to matter by
switching it in ``SpecForward`` and seeing the masks move.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rcmed_engine.model.checkpoint import CheckpointError

SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")
ADDED = ["<im_start>", "<im_end>", "<bbox>", "<point>", "[SEG]", "<p>", "</p>"]
SPECIAL = ["<s>", "</s>", "<unk>"]

# Scaled-down widths and a 512 px input (patch 16, window 14 with padding, image tokens on half the grid),
# to keep the suite fast on two cores; test_full_size_architecture_on_meta checks the 1024 px / 7B shapes.
D, HEADS, LAYERS, INTER = 64, 4, 2, 128
VIT, VIT_HEADS, VIT_DEPTH, WINDOW, GLOBAL = 32, 2, 4, 14, (1, 3)
PATCH, IMG = 16, 512
GRID = IMG // PATCH
OUT, DEC_MLP = 32, 64
SP_VOCAB = 400
EPS = 1e-5  # not LLaMA's 1e-6: the loader must read it from config.json


# =============================================================================== the released checkpoint
def train_tokenizer(folder: Path) -> None:
    """A SentencePiece model with LLaMA's trainer settings, and the JSON files 4.28 writes beside it."""
    import sentencepiece as spm

    corpus = [SYSTEM + " USER: The provides an overview of the picture.",
              "Can you segment the liver in this computed tomography image? Please segment it.",
              "This is a magnetic resonance image. The image contains the left kidney, spleen and aorta.",
              "ASSISTANT: What is the tumor lesion? 2024 3.5 mm X-Ray ultrasound microscopy"] * 4
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buf, vocab_size=SP_VOCAB, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", add_dummy_prefix=True,
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, character_coverage=1.0, num_threads=1, minloglevel=2, hard_vocab_limit=False)
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    assert sp.GetPieceSize() == SP_VOCAB

    def added_token(content: str) -> dict:
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
                "rstrip": False, "single_word": False}

    (folder / "added_tokens.json").write_text(json.dumps({t: SP_VOCAB + i for i, t in enumerate(ADDED)}))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": added_token("<s>"), "eos_token": added_token("</s>"), "pad_token": "<unk>",
         "unk_token": added_token("<unk>")}))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": True, "add_eos_token": False, "bos_token": added_token("<s>"),
         "clean_up_tokenization_spaces": False, "eos_token": added_token("</s>"), "model_max_length": 1536,
         "pad_token": None, "padding_side": "right", "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
         "unk_token": added_token("<unk>")}))


def released_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the released key names (SYRE_SPEC §1), in the released dtypes (§1e)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    def lin(p: str, out: int, inp: int, bias: bool = True) -> None:
        sd[p + "weight"] = rnd(out, inp, scale=inp ** -0.5)
        if bias:
            sd[p + "bias"] = rnd(out, scale=0.1)

    def norm(p: str, n: int, bias: bool = True) -> None:
        sd[p + "weight"] = 1 + rnd(n, scale=0.1)
        if bias:
            sd[p + "bias"] = rnd(n, scale=0.1)

    vocab = SP_VOCAB + len(ADDED)
    hd = D // HEADS
    sd["model.embed_tokens.weight"] = rnd(vocab, D)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for n in "qkvo":
            lin(f"{p}self_attn.{n}_proj.", D, D, bias=False)
        lin(p + "mlp.gate_proj.", INTER, D, bias=False)
        lin(p + "mlp.up_proj.", INTER, D, bias=False)
        lin(p + "mlp.down_proj.", D, INTER, bias=False)
        norm(p + "input_layernorm.", D, bias=False)
        norm(p + "post_attention_layernorm.", D, bias=False)
        # transformers 4.28 saved the RoPE table as a persistent buffer; the spec says ignore it.
        sd[p + "self_attn.rotary_emb.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, hd, 2).float() / hd)
    norm("model.norm.", D, bias=False)
    lin("model.mm_projector.0.", D, VIT)
    lin("model.mm_projector.2.", D, D)
    ge = "model.grounding_encoder."
    ie = ge + "image_encoder."
    sd[ie + "patch_embed.proj.weight"] = rnd(VIT, 3, PATCH, PATCH, scale=(3 * PATCH * PATCH) ** -0.5)
    sd[ie + "patch_embed.proj.bias"] = rnd(VIT, scale=0.1)
    sd[ie + "pos_embed"] = rnd(1, GRID, GRID, VIT, scale=0.5)
    for i in range(VIT_DEPTH):
        p = f"{ie}blocks.{i}."
        norm(p + "norm1.", VIT)
        norm(p + "norm2.", VIT)
        lin(p + "attn.qkv.", 3 * VIT, VIT)
        lin(p + "attn.proj.", VIT, VIT)
        size = GRID if i in GLOBAL else WINDOW
        sd[p + "attn.rel_pos_h"] = rnd(2 * size - 1, VIT // VIT_HEADS, scale=0.5)
        sd[p + "attn.rel_pos_w"] = rnd(2 * size - 1, VIT // VIT_HEADS, scale=0.5)
        lin(p + "mlp.lin1.", 4 * VIT, VIT)
        lin(p + "mlp.lin2.", VIT, 4 * VIT)
    sd[ie + "neck.0.weight"] = rnd(OUT, VIT, 1, 1, scale=VIT ** -0.5)
    norm(ie + "neck.1.", OUT)
    sd[ie + "neck.2.weight"] = rnd(OUT, OUT, 3, 3, scale=(9 * OUT) ** -0.5)
    norm(ie + "neck.3.", OUT)
    pe = ge + "prompt_encoder."
    sd[pe + "pe_layer.positional_encoding_gaussian_matrix"] = rnd(2, OUT // 2)
    for i in range(4):
        sd[f"{pe}point_embeddings.{i}.weight"] = rnd(1, OUT)
    sd[pe + "not_a_point_embed.weight"] = rnd(1, OUT)
    sd[pe + "no_mask_embed.weight"] = rnd(1, OUT)
    sd[pe + "mask_downscaling.0.weight"], sd[pe + "mask_downscaling.0.bias"] = rnd(4, 1, 2, 2), rnd(4)
    norm(pe + "mask_downscaling.1.", 4)
    sd[pe + "mask_downscaling.3.weight"], sd[pe + "mask_downscaling.3.bias"] = rnd(16, 4, 2, 2), rnd(16)
    norm(pe + "mask_downscaling.4.", 16)
    sd[pe + "mask_downscaling.6.weight"], sd[pe + "mask_downscaling.6.bias"] = rnd(OUT, 16, 1, 1), rnd(OUT)
    md = ge + "mask_decoder."
    sd[md + "iou_token.weight"] = rnd(1, OUT)
    sd[md + "mask_tokens.weight"] = rnd(4, OUT)

    def attn(p: str, inner: int) -> None:
        for n in "qkv":
            lin(f"{p}{n}_proj.", inner, OUT)
        lin(p + "out_proj.", OUT, inner)

    for i in range(2):
        p = f"{md}transformer.layers.{i}."
        attn(p + "self_attn.", OUT)
        attn(p + "cross_attn_token_to_image.", OUT // 2)
        attn(p + "cross_attn_image_to_token.", OUT // 2)
        for n in range(1, 5):
            norm(f"{p}norm{n}.", OUT)
        lin(p + "mlp.lin1.", DEC_MLP, OUT)
        lin(p + "mlp.lin2.", OUT, DEC_MLP)
    attn(md + "transformer.final_attn_token_to_image.", OUT // 2)
    norm(md + "transformer.norm_final_attn.", OUT)
    sd[md + "output_upscaling.0.weight"] = rnd(OUT, OUT // 4, 2, 2, scale=OUT ** -0.5)
    sd[md + "output_upscaling.0.bias"] = rnd(OUT // 4, scale=0.1)
    norm(md + "output_upscaling.1.", OUT // 4)
    sd[md + "output_upscaling.3.weight"] = rnd(OUT // 4, OUT // 8, 2, 2, scale=(OUT // 4) ** -0.5)
    sd[md + "output_upscaling.3.bias"] = rnd(OUT // 8, scale=0.1)
    for m in range(4):
        p = f"{md}output_hypernetworks_mlps.{m}.layers."
        lin(p + "0.", OUT, OUT)
        lin(p + "1.", OUT, OUT)
        lin(p + "2.", OUT // 8, OUT)
    lin(md + "iou_prediction_head.layers.0.", OUT, OUT)
    lin(md + "iou_prediction_head.layers.1.", OUT, OUT)
    lin(md + "iou_prediction_head.layers.2.", 4, OUT)
    for name in ("text_hidden_fcs", "t2i_projection"):
        lin(f"model.{name}.0.0.", D, D)
        lin(f"model.{name}.0.2.", OUT, D)
    sd["lm_head.weight"] = rnd(vocab, D, scale=D ** -0.5)
    # SYRE_SPEC §1e: the merge script leaves the LLM and mm_projector in bf16, the rest in fp32.
    for k in list(sd):
        if not (k.startswith(("model.grounding_encoder.", "model.text_hidden_fcs.", "model.t2i_projection."))
                or k.endswith("inv_freq")):
            sd[k] = sd[k].to(torch.bfloat16)
    return sd


def hf_config(**changes) -> dict:
    cfg = {"_name_or_path": "./SyRe-7B", "architectures": ["SyReForCausalLM"], "model_type": "llava",
           "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "hidden_act": "silu", "hidden_size": D,
           "initializer_range": 0.02, "intermediate_size": INTER, "max_position_embeddings": 2048,
           "num_attention_heads": HEADS, "num_hidden_layers": LAYERS, "rms_norm_eps": EPS,
           "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.28.0",
           "use_cache": False, "vocab_size": SP_VOCAB + len(ADDED), "use_mm_proj": True, "mm_hidden_size": VIT,
           "mm_use_im_start_end": True, "mm_use_image_start_end": True, "out_dim": OUT,
           "mm_vision_tower": "openai/clip-vit-large-patch14", "mm_vision_select_layer": -2,
           "mm_vision_select_feature": "patch", "train_mask_decoder": True, "with_region": False}
    cfg.update(changes)
    return cfg


def write_release(folder: Path, state: dict[str, torch.Tensor], tok_dir: Path, layout: str = "bin-index",
                  **config_changes) -> Path:
    """Save as the released code (transformers 4.28 save_pretrained) would: shards in state-dict order."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.model", "added_tokens.json", "special_tokens_map.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tok_dir / name).read_bytes())
    (folder / "config.json").write_text(json.dumps(hf_config(**config_changes), indent=2))
    keys = list(state)
    half = len(keys) // 2
    st = layout.startswith("st")
    stem, ext = ("model", "safetensors") if st else ("pytorch_model", "bin")

    def save(part: dict, path: Path) -> None:
        if st:
            save_file({k: v.contiguous() for k, v in part.items()}, str(path), metadata={"format": "pt"})
        else:
            torch.save(part, path)

    if layout.endswith("single"):
        save(state, folder / f"{stem}.{ext}")
        return folder
    shards = [f"{stem}-00001-of-00002.{ext}", f"{stem}-00002-of-00002.{ext}"]
    parts = [{k: state[k] for k in keys[:half]}, {k: state[k] for k in keys[half:]}]
    for name, part in zip(shards, parts):
        save(part, folder / name)
    if layout.endswith("index"):
        total = sum(v.numel() * v.element_size() for v in state.values())
        weight_map = {k: shards[0] if i < half else shards[1] for i, k in enumerate(keys)}
        (folder / f"{stem}.{ext}.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return folder


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return released_state()


@pytest.fixture(scope="module")
def release(tmp_path_factory, state, tok_dir) -> Path:
    return write_release(tmp_path_factory.mktemp("syre") / "SyRe", state, tok_dir)


@pytest.fixture(scope="module")
def engine(release):
    from rcmed_engine.engine import Engine

    return Engine.from_pretrained(str(release), device="cpu", batch_size=4)


# =============================================================================== independent forward
def spec_ids(sp, text: str) -> list[int]:
    """SYRE_SPEC §3.4 + §8, transcribed: 4.28's slow LlamaTokenizer under tokenizer_image_token."""
    added = {t: SP_VOCAB + i for i, t in enumerate(ADDED)}
    pattern = "(" + "|".join(re.escape(t) for t in sorted(ADDED + SPECIAL, key=len, reverse=True)) + ")"
    ids = [1]
    for c, chunk in enumerate(text.split("<image>")):
        if c:
            ids.append(-200)
        parts = [p for p in re.split(pattern, chunk) if p]
        for i, p in enumerate(parts):
            if p in added:  # the added tokens strip whitespace on both sides; <s>, </s>, <unk> do not
                if i > 0:
                    parts[i - 1] = parts[i - 1].rstrip()
                if i + 1 < len(parts):
                    parts[i + 1] = parts[i + 1].lstrip()
        for p in parts:
            if not p:
                continue
            if p in added:
                ids.append(added[p])
            elif p in SPECIAL:
                ids.append(sp.piece_to_id(p))
            else:
                ids.extend(sp.encode(p))  # each chunk on its own: each gets the dummy-prefix "▁"
    return ids


def spec_conversation(targets: list[str], modality: str, double_space: bool = True) -> str:
    question = f"Can you segment the {', '.join(targets).lower()} in this {modality} image? "
    items = [f"<p> {t} </p> [SEG]" for t in targets]
    listed = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    answer = f"This is a <p> {modality} </p> image. The image contains {listed}."
    sep = " ASSISTANT: " if double_space else "ASSISTANT: "
    return (f"{SYSTEM} USER: The <im_start><image><im_end> provides an overview of the picture.\n"
            f"{question}{sep}{answer}</s>")


def layer_norm_2d(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean(1, keepdim=True)
    return w[:, None, None] * ((x - u) / torch.sqrt(s + eps)) + b[:, None, None]


class SpecForward:
    """SYRE_SPEC §3 in plain torch, fp32, from the released state dict. Knobs switch single pitfalls."""

    def __init__(self, state: dict[str, torch.Tensor], tok_dir: Path) -> None:
        import sentencepiece as spm

        self.w = {k: v.float() for k, v in state.items()}
        self.sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
        self._vit: dict = {}

    # -- §3.1
    def pixels(self, rgb: np.ndarray, bgr: bool = True, resize: str = "cv2") -> tuple[torch.Tensor, tuple]:
        h, w = rgb.shape[:2]
        s = IMG / float(max(w, h))
        nh, nw = (round(h * s), round(w * s)) if s != 1.0 else (h, w)
        img = rgb[..., ::-1] if bgr else rgb  # cv2.imread gives BGR and nothing converts it
        img = np.ascontiguousarray(img)
        if resize == "cv2":
            img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR) if (nh, nw) != (h, w) else img
            x = torch.from_numpy(img.astype(np.float32)).permute(2, 0, 1)
        else:  # a float bilinear resize instead of OpenCV's fixed-point one
            x = torch.from_numpy(img.astype(np.float32)).permute(2, 0, 1)[None]
            x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False)[0].round().clamp(0, 255)
        mean = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
        std = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
        out = torch.zeros(1, 3, IMG, IMG)
        out[0, :, :nh, :nw] = (x - mean) / std  # pad after normalising
        return out, (nh, nw)

    # -- §3.2
    def _attention(self, x: torch.Tensor, p: str) -> torch.Tensor:
        n, h, w, c = x.shape
        hd = c // VIT_HEADS
        qkv = (x.reshape(n, h * w, c) @ self.w[p + "qkv.weight"].T + self.w[p + "qkv.bias"])
        q, k, v = qkv.view(n, h * w, 3, VIT_HEADS, hd).permute(2, 0, 3, 1, 4)
        logits = (q @ k.transpose(-1, -2)) * hd ** -0.5
        idx_h = torch.arange(h)[:, None] - torch.arange(h)[None, :] + h - 1
        idx_w = torch.arange(w)[:, None] - torch.arange(w)[None, :] + w - 1
        rh, rw = self.w[p + "rel_pos_h"][idx_h], self.w[p + "rel_pos_w"][idx_w]
        qg = q.reshape(n, VIT_HEADS, h, w, hd)
        bias_h = torch.einsum("nahwc,hkc->nahwk", qg, rh)
        bias_w = torch.einsum("nahwc,wkc->nahwk", qg, rw)
        logits = logits.view(n, VIT_HEADS, h, w, h, w) + bias_h[..., :, None] + bias_w[..., None, :]
        attn = logits.view(n, VIT_HEADS, h * w, h * w).softmax(-1)
        out = (attn @ v).permute(0, 2, 1, 3).reshape(n, h, w, c)
        return out @ self.w[p + "proj.weight"].T + self.w[p + "proj.bias"]

    def vit(self, px: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = px.sum().item(), px.abs().sum().item()
        if key in self._vit:
            return self._vit[key]
        w, p = self.w, "model.grounding_encoder.image_encoder."
        x = F.conv2d(px, w[p + "patch_embed.proj.weight"], w[p + "patch_embed.proj.bias"], stride=PATCH)
        x = x.permute(0, 2, 3, 1) + w[p + "pos_embed"]
        for i in range(VIT_DEPTH):
            b = f"{p}blocks.{i}."
            y = F.layer_norm(x, (VIT,), w[b + "norm1.weight"], w[b + "norm1.bias"], 1e-6)
            if i in GLOBAL:
                y = self._attention(y, b + "attn.")
            else:
                pad = (WINDOW - GRID % WINDOW) % WINDOW
                y = F.pad(y, (0, 0, 0, pad, 0, pad))  # zeros after the norm, before qkv
                g = (GRID + pad) // WINDOW
                y = y.view(1, g, WINDOW, g, WINDOW, VIT).permute(0, 1, 3, 2, 4, 5).reshape(-1, WINDOW, WINDOW, VIT)
                y = self._attention(y, b + "attn.")
                y = y.view(1, g, g, WINDOW, WINDOW, VIT).permute(0, 1, 3, 2, 4, 5).reshape(1, g * WINDOW, g * WINDOW, VIT)
                y = y[:, :GRID, :GRID]
            x = x + y
            y = F.layer_norm(x, (VIT,), w[b + "norm2.weight"], w[b + "norm2.bias"], 1e-6)
            y = F.gelu(y @ w[b + "mlp.lin1.weight"].T + w[b + "mlp.lin1.bias"])
            x = x + y @ w[b + "mlp.lin2.weight"].T + w[b + "mlp.lin2.bias"]
        pre = x.permute(0, 3, 1, 2)
        f = F.conv2d(pre, w[p + "neck.0.weight"])
        f = layer_norm_2d(f, w[p + "neck.1.weight"], w[p + "neck.1.bias"])
        f = F.conv2d(f, w[p + "neck.2.weight"], padding=1)
        f = layer_norm_2d(f, w[p + "neck.3.weight"], w[p + "neck.3.bias"])
        self._vit[key] = (f, pre)
        return f, pre

    # -- §3.5
    def llama(self, embeds: torch.Tensor, final_norm: bool = True) -> torch.Tensor:
        w, t = self.w, embeds.shape[0]
        hd = D // HEADS
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
        freqs = torch.outer(torch.arange(t).float(), inv)
        cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()

        def rms(x, g):
            return g * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS))

        def rope(x):
            return x * cos + torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], -1) * sin

        causal = torch.full((t, t), float("-inf")).triu(1)
        h = embeds
        for i in range(LAYERS):
            p = f"model.layers.{i}."
            x = rms(h, w[p + "input_layernorm.weight"])
            q, k, v = ((x @ w[f"{p}self_attn.{n}_proj.weight"].T).view(t, HEADS, hd).transpose(0, 1) for n in "qkv")
            att = (rope(q) @ rope(k).transpose(-1, -2) / math.sqrt(hd) + causal).softmax(-1)
            h = h + (att @ v).transpose(0, 1).reshape(t, D) @ w[p + "self_attn.o_proj.weight"].T
            x = rms(h, w[p + "post_attention_layernorm.weight"])
            mlp = F.silu(x @ w[p + "mlp.gate_proj.weight"].T) * (x @ w[p + "mlp.up_proj.weight"].T)
            h = h + mlp @ w[p + "mlp.down_proj.weight"].T
        return rms(h, w["model.norm.weight"]) if final_norm else h

    def mlp2(self, x: torch.Tensor, p: str, act) -> torch.Tensor:
        return act(x @ self.w[p + "0.weight"].T + self.w[p + "0.bias"]) @ self.w[p + "2.weight"].T + self.w[p + "2.bias"]

    # -- §3.9
    def dense_pe(self, gaussian: torch.Tensor | None = None) -> torch.Tensor:
        g = self.w["model.grounding_encoder.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"]
        g = g if gaussian is None else gaussian
        c = (torch.arange(GRID).float() + 0.5) / GRID
        coords = torch.stack([c[None, :].expand(GRID, GRID), c[:, None].expand(GRID, GRID)], -1)  # (x, y)
        proj = 2 * math.pi * ((2 * coords - 1) @ g)
        return torch.cat([proj.sin(), proj.cos()], -1).permute(2, 0, 1)

    def _dattn(self, p: str, q, k, v) -> torch.Tensor:
        w = self.w
        q, k, v = (x @ w[f"{p}{n}_proj.weight"].T + w[f"{p}{n}_proj.bias"] for n, x in zip("qkv", (q, k, v)))
        n, _, inner = q.shape
        split = [x.view(n, x.shape[1], 8, inner // 8).transpose(1, 2) for x in (q, k, v)]
        att = (split[0] @ split[1].transpose(-1, -2) / math.sqrt(inner // 8)).softmax(-1)
        out = (att @ split[2]).transpose(1, 2).reshape(n, -1, inner)
        return out @ w[p + "out_proj.weight"].T + w[p + "out_proj.bias"]

    def decoder(self, image: torch.Tensor, prompts: torch.Tensor, gaussian=None) -> torch.Tensor:
        """image (1, OUT, 64, 64), prompts (N, OUT) → low-res logits of all four mask tokens (N, 4, 256, 256)."""
        w, md = self.w, "model.grounding_encoder.mask_decoder."
        ln = lambda x, p: F.layer_norm(x, (OUT,), w[p + "weight"], w[p + "bias"], 1e-5)  # noqa: E731
        n = prompts.shape[0]
        tokens = torch.cat([w[md + "iou_token.weight"], w[md + "mask_tokens.weight"]])[None].expand(n, -1, -1)
        tokens = torch.cat([tokens, prompts[:, None]], 1)  # sparse = [] ++ text embedding
        dense = w["model.grounding_encoder.prompt_encoder.no_mask_embed.weight"].reshape(1, OUT, 1, 1)
        src = (image + dense).expand(n, -1, -1, -1).flatten(2).transpose(1, 2)
        pos = self.dense_pe(gaussian)[None].expand(n, -1, -1, -1).flatten(2).transpose(1, 2)
        queries, keys = tokens, src
        for i in range(2):
            p = f"{md}transformer.layers.{i}."
            if i == 0:
                queries = self._dattn(p + "self_attn.", queries, queries, queries)
            else:
                q = queries + tokens
                queries = queries + self._dattn(p + "self_attn.", q, q, queries)
            queries = ln(queries, p + "norm1.")
            queries = queries + self._dattn(p + "cross_attn_token_to_image.", queries + tokens, keys + pos, keys)
            queries = ln(queries, p + "norm2.")
            mlp = F.relu(queries @ w[p + "mlp.lin1.weight"].T + w[p + "mlp.lin1.bias"])
            queries = ln(queries + mlp @ w[p + "mlp.lin2.weight"].T + w[p + "mlp.lin2.bias"], p + "norm3.")
            keys = keys + self._dattn(p + "cross_attn_image_to_token.", keys + pos, queries + tokens, queries)
            keys = ln(keys, p + "norm4.")
        p = md + "transformer."
        queries = queries + self._dattn(p + "final_attn_token_to_image.", queries + tokens, keys + pos, keys)
        queries = ln(queries, p + "norm_final_attn.")
        up = keys.transpose(1, 2).reshape(n, OUT, GRID, GRID)
        up = F.conv_transpose2d(up, w[md + "output_upscaling.0.weight"], w[md + "output_upscaling.0.bias"], stride=2)
        up = F.gelu(layer_norm_2d(up, w[md + "output_upscaling.1.weight"], w[md + "output_upscaling.1.bias"]))
        up = F.gelu(F.conv_transpose2d(up, w[md + "output_upscaling.3.weight"], w[md + "output_upscaling.3.bias"],
                                       stride=2))
        hyper = []
        for m in range(4):
            x = queries[:, 1 + m]
            p = f"{md}output_hypernetworks_mlps.{m}.layers."
            x = F.relu(x @ w[p + "0.weight"].T + w[p + "0.bias"])
            x = F.relu(x @ w[p + "1.weight"].T + w[p + "1.bias"])
            hyper.append(x @ w[p + "2.weight"].T + w[p + "2.bias"])
        hyper = torch.stack(hyper, 1)  # (N, 4, OUT/8)
        return (hyper @ up.flatten(2)).view(n, 4, 4 * GRID, 4 * GRID)

    # -- the whole pass
    def __call__(self, rgb: np.ndarray, targets: list[str], modality: str = "computed tomography", *,
                 bgr: bool = True, resize: str = "cv2", seg_shift: int = 0, t2i: bool = True, mask_token: int = 0,
                 final_norm: bool = True, crop: bool = True, double_space: bool = True, gaussian=None,
                 ids: list[int] | None = None) -> dict[str, torch.Tensor]:
        px, (nh, nw) = self.pixels(rgb, bgr=bgr, resize=resize)
        f, g = self.vit(px)
        # §3.3
        pooled = F.interpolate(g, size=(GRID // 2, GRID // 2), mode="bilinear", align_corners=False)
        v = self.mlp2(pooled.flatten(2).transpose(1, 2)[0], "model.mm_projector.", F.gelu)  # (g*g, D)
        # §3.4
        ids = ids if ids is not None else spec_ids(self.sp, spec_conversation(targets, modality, double_space))
        s = ids.index(-200)
        emb = self.w["model.embed_tokens.weight"]
        seq = torch.cat([emb[ids[:s]], v, emb[ids[s + 1:]]])
        hidden = self.llama(seq, final_norm=final_norm)
        n_img = v.shape[0]
        # §3.6: [n_img - 1 zeros] + (ids[1:] == [SEG]) + [1 zero]: the state one position before [SEG]
        seg = SP_VOCAB + ADDED.index("[SEG]")
        mask = [False] * (n_img - 1) + [i == seg for i in ids[1:]] + [False]
        if seg_shift:
            mask = [False] * seg_shift + mask[:-seg_shift]
        q = self.mlp2(hidden[torch.tensor(mask)], "model.text_hidden_fcs.0.", F.relu)  # §3.7
        # §3.8
        pgrid = self.mlp2(hidden[s:s + n_img], "model.t2i_projection.0.", F.relu)
        pgrid = pgrid.reshape(1, GRID // 2, GRID // 2, OUT).permute(0, 3, 1, 2)
        image = f + F.interpolate(pgrid, size=(GRID, GRID), mode="bilinear", align_corners=False) if t2i else f
        low = self.decoder(image, q, gaussian)[:, mask_token:mask_token + 1]  # §3.9: mask token 0
        # §3.10
        up = F.interpolate(low, size=(IMG, IMG), mode="bilinear", align_corners=False)
        if crop:
            up = up[..., :nh, :nw]
        logits = F.interpolate(up, size=rgb.shape[:2], mode="bilinear", align_corners=False)[:, 0]
        return {"low": low[:, 0], "logits": logits, "mask": logits > 0, "ids": ids}


@pytest.fixture(scope="module")
def spec(state, tok_dir) -> SpecForward:
    return SpecForward(state, tok_dir)


def test_image(h: int = 300, w: int = 440, seed: int = 1) -> np.ndarray:
    """Smooth random colour content whose three channels differ (so RGB against BGR shows)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(12, 16, 3)).astype(np.uint8)
    img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    img[..., 2] = 255 - img[..., 2]
    return img


test_image.__test__ = False  # a helper, not a test


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    return test_image()


@pytest.fixture(scope="module")
def liver_mask(engine, rgb) -> np.ndarray:
    """The engine's label map for "liver" on the test image."""
    return engine_mask(engine, rgb)


@pytest.fixture(scope="module")
def ref(spec, rgb) -> dict:
    """The spec forward on the test image, prompt "liver"."""
    return spec(rgb, ["liver"])


def engine_mask(engine, rgb: np.ndarray, prompt: str = "liver") -> np.ndarray:
    result = engine.segment(rgb, prompt, modality="CT")
    return result.labels[0]


def engine_low_res(engine, rgb: np.ndarray, targets: list[str]) -> torch.Tensor:
    """The engine's low-res logits for one slice (model API: prefix cached, suffix per prompt)."""
    from rcmed_engine.preprocess import plan_resize, prepare_slices

    model = engine.model
    t = plan_resize(rgb.shape[:2], IMG)
    px = prepare_slices(rgb[None], t, bgr=True)
    with torch.inference_mode():
        prefix = model.prefix(model.encode_image(px))
        out = model.suffix(prefix, model.plan_prompt(targets, "computed tomography"))
    return out.low_res_logits[0].float()


def assert_masks_match(ours: np.ndarray, ref: dict[str, torch.Tensor], tol: float = 1e-3) -> None:
    logits = ref["logits"][0]
    ref_mask = (logits > 0).numpy()
    differ = ours.astype(bool) != ref_mask
    sure = (logits.abs() > tol).numpy()
    assert not (differ & sure).any(), f"{int((differ & sure).sum())} confident pixels differ"
    assert differ.mean() < 1e-3


def changed_fraction(ref: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> float:
    return float((ref["mask"] != other["mask"]).float().mean())


# =============================================================================== loading
def test_every_key_is_accounted_for(release, state):
    from rcmed_engine.model.syre import load_syre

    loaded = load_syre(release)
    report = loaded.report
    ignored = sorted(k for k in state if k.endswith("inv_freq"))
    assert sorted(report.ignored) == ignored
    assert sorted(report.loaded) == sorted(set(state) - set(ignored))
    assert not report.missing and not report.unexpected and not report.mismatched
    assert report.layout == "released" and report.files == ["pytorch_model-00001-of-00002.bin",
                                                            "pytorch_model-00002-of-00002.bin"]
    own = loaded.model.state_dict()
    assert torch.equal(own["language_model.model.layers.1.mlp.down_proj.weight"],
                       state["model.layers.1.mlp.down_proj.weight"].float())  # bf16 → fp32, exact
    assert torch.equal(own["text_hidden_fcs.mlp.2.bias"], state["model.text_hidden_fcs.0.2.bias"])
    assert torch.equal(own["lv_projection.mlp.0.weight"], state["model.t2i_projection.0.0.weight"])
    assert torch.equal(own["image_encoder.blocks.3.attn.rel_pos_h"],
                       state["model.grounding_encoder.image_encoder.blocks.3.attn.rel_pos_h"])
    cfg = loaded.model.config
    assert cfg.image_encoder.global_attn_indexes == GLOBAL and cfg.image_encoder.window_size == WINDOW
    assert cfg.image_encoder.image_size == IMG and cfg.vl_grid == GRID // 2 and cfg.out_dim == OUT
    assert cfg.language_model.rms_norm_eps == EPS
    assert loaded.model.language_model.config.rms_norm_eps == EPS
    assert not any(t.is_meta for t in loaded.model.state_dict().values())


@pytest.mark.parametrize("use_mm_proj", [True, False])
def test_projector_is_built_whatever_use_mm_proj_says(tmp_path, state, tok_dir, use_mm_proj):
    """Pitfall 1: the released config says use_mm_proj true; the projector exists and loads either way."""
    from rcmed_engine.model.syre import load_syre

    folder = write_release(tmp_path / "r", state, tok_dir, use_mm_proj=use_mm_proj)
    loaded = load_syre(folder)
    assert {"model.mm_projector.0.weight", "model.mm_projector.2.bias"} <= set(loaded.report.loaded)
    w = loaded.model.vl_projection.mlp[0].weight
    assert w.shape == (D, VIT) and torch.equal(w, state["model.mm_projector.0.weight"].float())


@pytest.mark.parametrize("layout", ["bin-single", "bin-shards", "st-index", "st-single"])
def test_other_released_layouts_load_the_same(tmp_path, state, tok_dir, release, layout):
    from rcmed_engine.model.syre import load_syre

    reference = load_syre(release).model.state_dict()
    loaded = load_syre(write_release(tmp_path / layout, state, tok_dir, layout=layout))
    ours = loaded.model.state_dict()
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[k], reference[k]) for k in ours)
    assert len(loaded.report.ignored) == LAYERS


def test_ignored_keys_follow_the_spec_rule(tmp_path, state, tok_dir):
    from rcmed_engine.model.syre import load_syre

    extra = dict(state)
    leftovers = ["model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight",
                 "model.region_encoder.mlvl_fuse.0.weight",
                 "model.layers.0.self_attn.q_proj.lora_A.default.weight",
                 "model.layers.0.self_attn.q_proj.base_layer.weight"]
    for k in leftovers:
        extra[k] = torch.zeros(2, 2)
    report = load_syre(write_release(tmp_path / "r", extra, tok_dir)).report
    assert set(leftovers) <= set(report.ignored)


@pytest.mark.parametrize("change, named", [
    ("extra", "model.foo.weight"),
    ("extra_llm", "model.layers.0.self_attn.q_norm.weight"),
    ("missing", "model.layers.1.mlp.up_proj.weight"),
    ("missing_pe", "model.grounding_encoder.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"),
    ("shape", "model.grounding_encoder.mask_decoder.iou_token.weight"),
])
def test_leftover_missing_or_misshapen_keys_are_named(tmp_path, state, tok_dir, change, named):
    from rcmed_engine.model.syre import convert_syre, load_syre

    bad = dict(state)
    if change.startswith("extra"):
        bad[named] = torch.zeros(3)
    elif change.startswith("missing"):
        del bad[named]
    else:
        bad[named] = torch.zeros(2, OUT)
    folder = write_release(tmp_path / "r", bad, tok_dir)
    with pytest.raises(CheckpointError, match=re.escape(named)):
        load_syre(folder)
    with pytest.raises(CheckpointError, match=re.escape(named)):
        convert_syre(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bin_shards_load_only_tensors(tmp_path, state, tok_dir):
    """.bin shards go through torch.load(weights_only=True): a pickle with code in it is refused."""
    from rcmed_engine.model.syre import load_syre

    folder = write_release(tmp_path / "r", state, tok_dir)
    shard = folder / "pytorch_model-00002-of-00002.bin"
    part = torch.load(shard, weights_only=True)
    part["evil"] = _Payload()
    torch.save(part, shard)
    with pytest.raises(CheckpointError, match="refusing to load pytorch_model-00002-of-00002.bin"):
        load_syre(folder)
    assert not (tmp_path / "pwned").exists()


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_index_must_agree_with_the_shards(tmp_path, state, tok_dir):
    from rcmed_engine.model.syre import load_syre

    folder = write_release(tmp_path / "r", state, tok_dir)
    index = json.loads((folder / "pytorch_model.bin.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "pytorch_model-00002-of-00002.bin"
    index["weight_map"]["lm_head.weight"] = "pytorch_model-00001-of-00002.bin"
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="does not hold"):
        load_syre(folder)
    (folder / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(CheckpointError, match="pytorch_model-00002-of-00002.bin"):
        load_syre(folder)


def test_full_size_architecture_on_meta(tok_dir):
    """SYRE_SPEC §1 at full size, without allocating: every released key of the 7B model maps onto our
    modules with its shape, nothing is left over, and the parameter count is the logged one."""
    from rcmed_engine.model.llama_tokenizer import LlamaSlowTokenizer
    from rcmed_engine.model.syre import build_syre_model, config_from_released, expected_shapes, map_key

    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (32007, 4096), "lm_head.weight": (32007, 4096),
                                          "model.norm.weight": (4096,)}
    for i in range(32):
        p = f"model.layers.{i}."
        shapes.update({p + f"self_attn.{n}_proj.weight": (4096, 4096) for n in "qkvo"})
        shapes.update({p + "mlp.gate_proj.weight": (11008, 4096), p + "mlp.up_proj.weight": (11008, 4096),
                       p + "mlp.down_proj.weight": (4096, 11008), p + "input_layernorm.weight": (4096,),
                       p + "post_attention_layernorm.weight": (4096,)})
    shapes.update({"model.mm_projector.0.weight": (4096, 1280), "model.mm_projector.0.bias": (4096,),
                   "model.mm_projector.2.weight": (4096, 4096), "model.mm_projector.2.bias": (4096,)})
    for name in ("text_hidden_fcs", "t2i_projection"):
        shapes.update({f"model.{name}.0.0.weight": (4096, 4096), f"model.{name}.0.0.bias": (4096,),
                       f"model.{name}.0.2.weight": (256, 4096), f"model.{name}.0.2.bias": (256,)})
    ie = "model.grounding_encoder.image_encoder."
    shapes.update({ie + "patch_embed.proj.weight": (1280, 3, 16, 16), ie + "patch_embed.proj.bias": (1280,),
                   ie + "pos_embed": (1, 64, 64, 1280), ie + "neck.0.weight": (256, 1280, 1, 1),
                   ie + "neck.1.weight": (256,), ie + "neck.1.bias": (256,), ie + "neck.2.weight": (256, 256, 3, 3),
                   ie + "neck.3.weight": (256,), ie + "neck.3.bias": (256,)})
    for i in range(32):
        b = f"{ie}blocks.{i}."
        rel = 127 if i in (7, 15, 23, 31) else 27
        shapes.update({b + "norm1.weight": (1280,), b + "norm1.bias": (1280,), b + "norm2.weight": (1280,),
                       b + "norm2.bias": (1280,), b + "attn.qkv.weight": (3840, 1280), b + "attn.qkv.bias": (3840,),
                       b + "attn.proj.weight": (1280, 1280), b + "attn.proj.bias": (1280,),
                       b + "attn.rel_pos_h": (rel, 80), b + "attn.rel_pos_w": (rel, 80),
                       b + "mlp.lin1.weight": (5120, 1280), b + "mlp.lin1.bias": (5120,),
                       b + "mlp.lin2.weight": (1280, 5120), b + "mlp.lin2.bias": (1280,)})
    pe = "model.grounding_encoder.prompt_encoder."
    shapes.update({pe + "pe_layer.positional_encoding_gaussian_matrix": (2, 128), pe + "not_a_point_embed.weight": (1, 256),
                   pe + "no_mask_embed.weight": (1, 256), pe + "mask_downscaling.0.weight": (4, 1, 2, 2),
                   pe + "mask_downscaling.0.bias": (4,), pe + "mask_downscaling.1.weight": (4,),
                   pe + "mask_downscaling.1.bias": (4,), pe + "mask_downscaling.3.weight": (16, 4, 2, 2),
                   pe + "mask_downscaling.3.bias": (16,), pe + "mask_downscaling.4.weight": (16,),
                   pe + "mask_downscaling.4.bias": (16,), pe + "mask_downscaling.6.weight": (256, 16, 1, 1),
                   pe + "mask_downscaling.6.bias": (256,)})
    shapes.update({f"{pe}point_embeddings.{i}.weight": (1, 256) for i in range(4)})
    md = "model.grounding_encoder.mask_decoder."
    shapes.update({md + "iou_token.weight": (1, 256), md + "mask_tokens.weight": (4, 256)})

    def attn(p, inner):
        for n in "qkv":
            shapes.update({f"{p}{n}_proj.weight": (inner, 256), f"{p}{n}_proj.bias": (inner,)})
        shapes.update({p + "out_proj.weight": (256, inner), p + "out_proj.bias": (256,)})

    for i in range(2):
        p = f"{md}transformer.layers.{i}."
        attn(p + "self_attn.", 256)
        attn(p + "cross_attn_token_to_image.", 128)
        attn(p + "cross_attn_image_to_token.", 128)
        shapes.update({f"{p}norm{n}.{t}": (256,) for n in range(1, 5) for t in ("weight", "bias")})
        shapes.update({p + "mlp.lin1.weight": (2048, 256), p + "mlp.lin1.bias": (2048,),
                       p + "mlp.lin2.weight": (256, 2048), p + "mlp.lin2.bias": (256,)})
    attn(md + "transformer.final_attn_token_to_image.", 128)
    shapes.update({md + "transformer.norm_final_attn.weight": (256,), md + "transformer.norm_final_attn.bias": (256,),
                   md + "output_upscaling.0.weight": (256, 64, 2, 2), md + "output_upscaling.0.bias": (64,),
                   md + "output_upscaling.1.weight": (64,), md + "output_upscaling.1.bias": (64,),
                   md + "output_upscaling.3.weight": (64, 32, 2, 2), md + "output_upscaling.3.bias": (32,)})
    for m in range(4):
        p = f"{md}output_hypernetworks_mlps.{m}.layers."
        shapes.update({p + "0.weight": (256, 256), p + "0.bias": (256,), p + "1.weight": (256, 256),
                       p + "1.bias": (256,), p + "2.weight": (32, 256), p + "2.bias": (32,)})
    p = md + "iou_prediction_head.layers."
    shapes.update({p + "0.weight": (256, 256), p + "0.bias": (256,), p + "1.weight": (256, 256), p + "1.bias": (256,),
                   p + "2.weight": (4, 256), p + "2.bias": (4,)})

    ours = {map_key(k): v for k, v in shapes.items()}
    hf = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
          "vocab_size": 32007, "rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "out_dim": 256}
    config = config_from_released(hf, ours)
    enc = config.image_encoder
    assert (enc.image_size, enc.patch_size, enc.embed_dim, enc.depth, enc.num_heads, enc.window_size,
            enc.global_attn_indexes, enc.mlp_ratio, enc.neck_dim) == (1024, 16, 1280, 32, 16, 14, (7, 15, 23, 31),
                                                                      4.0, 256)
    assert config.vl_grid == 32 and config.out_dim == 256 and config.decoder_mlp_dim == 2048
    model = build_syre_model(config, LlamaSlowTokenizer.from_folder(tok_dir), meta=True)
    assert expected_shapes(model) == ours  # every key consumed, none missing, every shape equal
    total = sum(p.numel() for p in model.parameters())
    lora = 32 * 4 * 16 * (4096 + 4096)  # r = 16 on q/k/v/o during training, merged in the release
    assert total == 7_437_252_144 and total + lora == 7_454_029_360  # the training log's count (SYRE_SPEC §0)
    counts = {n: sum(p.numel() for p in getattr(model, n).parameters())
              for n in ("image_encoder", "prompt_encoder", "mask_decoder")}
    assert counts == {"image_encoder": 637_026_048, "prompt_encoder": 6_220, "mask_decoder": 4_058_340}


# =============================================================================== converting
def test_convert_writes_our_layout_once(tmp_path, release, state):
    from safetensors import safe_open

    from rcmed_engine.model.checkpoint import file_sha256
    from rcmed_engine.model.syre import convert_syre, detect_layout, load_syre

    dst = convert_syre(release, tmp_path / "converted")
    assert detect_layout(dst) == "converted"
    assert sorted(p.name for p in dst.iterdir()) == ["added_tokens.json", "config.json", "model.safetensors",
                                                    "special_tokens_map.json", "syre.json", "tokenizer.model",
                                                    "tokenizer_config.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    marker = json.loads((dst / "syre.json").read_text())
    assert marker["sha256"] == file_sha256(dst / "model.safetensors")
    assert marker["tensors"] == len(state) - LAYERS and len(marker["ignored"]) == LAYERS
    with safe_open(str(dst / "model.safetensors"), "pt") as fh:
        # each tensor keeps its released dtype: LLM bf16, SAM fp32
        assert fh.get_tensor("language_model.model.norm.weight").dtype == torch.bfloat16
        assert fh.get_tensor("image_encoder.pos_embed").dtype == torch.float32
    released, converted = load_syre(release), load_syre(dst)
    a, b = released.model.state_dict(), converted.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert converted.report.sha256 == marker["sha256"] and converted.report.layout == "converted"
    with pytest.raises(CheckpointError, match="already exists"):
        convert_syre(release, dst)


def test_convert_is_atomic(tmp_path, release, monkeypatch):
    from rcmed_engine.model import syre

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(syre, "write_safetensors", boom)
    with pytest.raises(OSError, match="disk full"):
        syre.convert_syre(release, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_converted_folder_names_bad_keys(tmp_path, release):
    from safetensors import safe_open

    from rcmed_engine.model.syre import convert_syre, load_syre, write_safetensors

    dst = convert_syre(release, tmp_path / "c")
    with safe_open(str(dst / "model.safetensors"), "pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    tensors["mask_decoder.extra.weight"] = torch.zeros(1)
    del tensors["vl_projection.mlp.2.bias"]
    write_safetensors(dst / "model.safetensors", tensors, {"format": "pt"})
    with pytest.raises(CheckpointError, match=r"mask_decoder\.extra\.weight.*|vl_projection\.mlp\.2\.bias"):
        load_syre(dst)


# =============================================================================== tokenizer (SYRE_SPEC §8)
def test_tokenizer_follows_the_4_28_slow_tokenizer(tok_dir, spec):
    from rcmed_engine.model.llama_tokenizer import LlamaSlowTokenizer

    tok = LlamaSlowTokenizer.from_folder(tok_dir)
    sp = spec.sp
    assert [tok.token_id(t) for t in ADDED] == list(range(SP_VOCAB, SP_VOCAB + 7)) and len(tok) == SP_VOCAB + 7
    # added tokens strip whitespace on both sides: "</p> [SEG]" → [</p>, [SEG]]
    assert tok.tokenize("</p> [SEG]") == ["</p>", "[SEG]"]
    # each remaining chunk is encoded on its own and gets SentencePiece's leading "▁"
    dot = tok.tokenize("[SEG].")
    assert dot[0] == "[SEG]" and dot[1:] == sp.encode(".", out_type=str) and dot[1].startswith("\u2581")
    # <s>, </s>, <unk> are cut out but strip nothing
    assert tok.tokenize("a </s> b") == sp.encode("a ", out_type=str) + ["</s>"] + sp.encode(" b", out_type=str)
    # newlines are whitespace to the strip rule
    assert tok.tokenize("<im_end>\n x\n <p>") == ["<im_end>"] + sp.encode("x", out_type=str) + ["<p>"]
    texts = [spec_conversation(["liver"], "computed tomography"),
             spec_conversation(["Left Kidney", "gall bladder", "IVC"], "magnetic resonance"),
             "<im_start><image><im_end>", "x <s> y</s>", " \t<p>  a  b  </p>\n[SEG] [SEG].</s>", "", "plain"]
    for text in texts:
        assert tok.encode(text) == spec_ids(sp, text), text


def test_engine_prompt_is_the_released_text_to_the_character(engine, spec):
    """Pitfall 6: template 1 always (the reference draws one of seven at random), two spaces before
    ASSISTANT, CT as "computed tomography", and the ids of that exact text."""
    from rcmed_engine.prompts import build_answer, build_conversation, build_question

    model = engine.model
    assert model.config.prompt.question_index == 0
    text = build_conversation(model.config.prompt.system, build_question(["liver"], "computed tomography", 0),
                              build_answer(["liver"], "computed tomography"), "</s>").text
    expected = (f"{SYSTEM} USER: The <im_start><image><im_end> provides an overview of the picture.\n"
                "Can you segment the liver in this computed tomography image?  ASSISTANT: "
                "This is a <p> computed tomography </p> image. The image contains <p> liver </p> [SEG].</s>")
    assert text == expected == spec_conversation(["liver"], "computed tomography")
    plan = model.plan_prompt(["liver"], "computed tomography")
    pre_a, pre_b = model._prefix_ids
    ids = pre_a + [-200] + pre_b + plan.rows[0]
    assert ids == spec_ids(spec.sp, expected)
    # Pitfall 4: the [SEG] state is the one before [SEG], i.e. </p>
    prefix_len = len(pre_a) + 1 + len(pre_b)
    assert [ids[prefix_len + p] for p in plan.seg_positions] == [SP_VOCAB + ADDED.index("</p>")]
    assert ids[prefix_len + plan.seg_positions[0] + 1] == SP_VOCAB + ADDED.index("[SEG]")


@pytest.mark.skipif(not os.environ.get("RCMED_TF428"), reason="set RCMED_TF428 to a folder with transformers "
                    "4.28.0 (pip install --no-deps --target DIR transformers==4.28.0 huggingface_hub==0.14.1)")
def test_tokenizer_against_real_transformers_4_28(tok_dir):
    from rcmed_engine.model.llama_tokenizer import LlamaSlowTokenizer

    texts = [spec_conversation(["liver"], "computed tomography"),
             spec_conversation(["Left Kidney", "gall bladder"], "X-Ray"), "a </s> b<s>\n<p> x </p> [SEG].", "[SEG]."]
    script = ("import json,sys; sys.path.insert(0, sys.argv[1]); from transformers import AutoTokenizer;"
              "t = AutoTokenizer.from_pretrained(sys.argv[2], use_fast=False); t.pad_token = t.unk_token;"
              "out = []\nfor p in json.loads(sys.argv[3]):\n"
              " c = [t(x).input_ids for x in p.split('<image>')]; ids = [c[0][0]]\n"
              " for i, x in enumerate(c):\n  ids += ([-200] if i else []) + x[1:]\n out.append(ids)\n"
              "print(json.dumps(out))")
    out = subprocess.run([sys.executable, "-c", script, os.environ["RCMED_TF428"], str(tok_dir), json.dumps(texts)],
                         capture_output=True, text=True, check=True, cwd=str(tok_dir))
    tok = LlamaSlowTokenizer.from_folder(tok_dir)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [tok.encode(t) for t in texts]


# =============================================================================== the forward pass
def test_engine_masks_match_the_spec_forward(engine, ref, rgb, liver_mask):
    assert 0.05 < float(ref["mask"].float().mean()) < 0.95  # a mask with something in it
    low = engine_low_res(engine, rgb, ["liver"])
    torch.testing.assert_close(low[0], ref["low"][0], rtol=1e-4, atol=1e-4)
    assert_masks_match(liver_mask, ref)


def test_two_targets_and_an_exact_2x_downscale(engine, spec):
    """Several [SEG]s in one answer, in order; and OpenCV's exact-2x (area) resize path."""
    big = test_image(2 * IMG, 3 * IMG // 2, seed=3)
    ref = spec(big, ["liver", "Spleen"])
    low = engine_low_res(engine, big, ["liver", "Spleen"])
    torch.testing.assert_close(low, ref["low"], rtol=1e-4, atol=1e-4)
    from rcmed_engine.preprocess import plan_resize, prepare_slices

    ours = prepare_slices(big[None], plan_resize(big.shape[:2], IMG), bgr=True)
    torch.testing.assert_close(ours, spec.pixels(big)[0], rtol=0, atol=1e-6)  # OpenCV's area path, bit for bit
    assert not torch.allclose(ours, spec.pixels(big, resize="torch")[0], atol=1e-3)


def test_fast_path_gives_the_naive_paths_answers(engine, rgb):
    from rcmed_engine.model.fast_path import enable_fast_path, enable_naive_path

    model = engine.model
    fast = engine_low_res(engine, rgb, ["liver"])
    assert model.language_model.config._attn_implementation == "sdpa"
    assert all("forward" in vars(blk) for blk in model.image_encoder.blocks)
    enable_naive_path(model)
    assert model.language_model.config._attn_implementation == "eager"
    try:
        naive = engine_low_res(engine, rgb, ["liver"])
    finally:
        enable_fast_path(model)
    torch.testing.assert_close(fast, naive, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pitfall, knobs", [
    ("the [SEG] state taken at [SEG] itself", {"seg_shift": 1}),
    ("no t2i term before the decoder", {"t2i": False}),
    ("mask token 1 instead of 0", {"mask_token": 1}),
    ("RGB instead of BGR", {"bgr": False}),
    ("the state before the final RMSNorm", {"final_norm": False}),
    ("no crop before the final resize", {"crop": False}),
    ("one space instead of two before ASSISTANT", {"double_space": False}),
    ("CT instead of computed tomography", {"modality": "CT"}),
    ("a fresh Gaussian positional matrix", {"gaussian": torch.randn(2, OUT // 2, generator=torch.Generator().manual_seed(9))}),
    ("a float resize instead of OpenCV's", {"resize": "torch"}),
])
def test_each_pitfall_moves_the_masks(spec, ref, rgb, pitfall, knobs):
    """The engine matches the spec forward (test_engine_masks_match_the_spec_forward); switching any one
    pitfall in the spec forward moves the mask, so each is pinned by that match."""
    other = spec(rgb, ["liver"], **knobs)
    assert changed_fraction(ref, other) > 1e-4, pitfall


def test_gaussian_matrix_and_threshold_after_resize(engine, spec, ref, rgb, state):
    """Pitfall 2: the positional matrix is the checkpoint's; pitfall 7: > 0 after crop and resize."""
    g = state["model.grounding_encoder.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"]
    pe = engine.model.prompt_encoder
    assert torch.equal(pe.pe_layer.positional_encoding_gaussian_matrix, g)
    torch.testing.assert_close(pe.get_dense_pe()[0], spec.dense_pe(), rtol=1e-5, atol=1e-5)
    low = ref["low"][:1, None]
    t = (round(300 * IMG / 440), IMG)
    early = F.interpolate((F.interpolate(low, size=(IMG, IMG), mode="bilinear") > 0).float()[..., :t[0], :t[1]],
                          size=rgb.shape[:2], mode="bilinear")[0, 0] > 0.5
    assert (early != ref["mask"][0]).any()


# =============================================================================== entry points
def test_cli_convert_and_segment(tmp_path, release, rgb, liver_mask):
    from rcmed_engine import cli
    from rcmed_engine.io import read_image, read_labelmap

    png = tmp_path / "slice.png"
    cv2.imwrite(str(png), rgb[..., ::-1])  # cv2 writes BGR arrays: the file holds our RGB image
    assert np.array_equal(read_image(png).array[0], rgb)
    expected = liver_mask
    assert cli.main(["convert-syre", str(release), str(tmp_path / "conv")]) == 0
    for weights in (release, tmp_path / "conv"):
        out = tmp_path / f"{Path(weights).name}.nii.gz"
        code = cli.main(["segment", str(png), "--prompt", "liver", "--modality", "CT", "--weights", str(weights),
                         "--device", "cpu", "-o", str(out)])
        assert code == 0
        labels, _, _ = read_labelmap(out)
        assert np.array_equal(labels.reshape(expected.shape), expected)
    assert cli.main(["convert-syre", str(release), str(tmp_path / "conv")]) == 1  # exists: one-line error


def test_from_pretrained_refuses_other_folders(tmp_path):
    from rcmed_engine.engine import Engine

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="not a SyRe weights folder"):
        Engine.from_pretrained(str(tmp_path), device="cpu")


@pytest.mark.parametrize("grid, window", [(16, 0), (20, 7), (14, 14)])
def test_fast_sam_block_matches_segment_anything(grid, window):
    """Relative positions folded into q and k give segment-anything's block output (global, padded and
    exact windows)."""
    from rcmed_engine.model.fast_path import SamBlock, fast_block_forward

    torch.manual_seed(0)
    size = window if window else grid
    blk = SamBlock(dim=64, num_heads=4, use_rel_pos=True, window_size=window, input_size=(size, size)).eval()
    with torch.no_grad():
        blk.attn.rel_pos_h.normal_(0, 0.5)
        blk.attn.rel_pos_w.normal_(0, 0.5)
        x = torch.randn(2, grid, grid, 64)
        torch.testing.assert_close(fast_block_forward(blk, x), SamBlock.forward(blk, x), rtol=1e-5, atol=1e-5)
