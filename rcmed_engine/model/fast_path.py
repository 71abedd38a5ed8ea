"""Fast inference without changing the answers: attention kernels, shared text prefix, compilation.

``enable_fast_path(model)`` switches an RCMed model with a SAM ViT encoder (tiny, syre-7b) to:

* **SAM blocks on ``scaled_dot_product_attention``.** segment-anything's attention materialises the
  (heads, N, N) score matrix, adds the decomposed relative-position terms to it and runs softmax as
  separate kernels; in the four global blocks of ViT-H that is 16 x 4096 x 4096 per image. Here the
  relative-position terms are folded into the queries and keys (``_attend``), so SDPA runs with no
  mask and its flash kernels apply (on an H200 an additive bias kept it off them: 2.7 ms per slice per
  global block, measured with bench/syre_profile.py).
* **Windowed blocks without the padded work.** segment-anything pads the 64x64 grid to 70x70 before the
  qkv projection; here qkv runs on the 4096 real tokens and the padding is filled with qkv(0) (= its
  bias), which is what the padded zeros would have produced, and the output projection runs after the
  windows are merged back. Same numbers, about 20% less projection work in 28 of 32 blocks.
* **The LLM on SDPA** (transformers' "sdpa": the flash kernel for the causal prefix on CUDA).
  (``RCMed.prefix`` itself runs the text before the image once per batch and shares its keys/values
  with every slice, on both paths; ``RCMed.suffix`` reuses each slice's prefix for every prompt.)
* optionally **``torch.compile``** of each SAM block (``compile=True``): fuses the LayerNorm / GELU /
  residual / bias work around the matmuls. The first batch then pays the compilation.

``enable_naive_path(model)`` restores segment-anything's and transformers' eager attention.
Both paths load the same weights; tests check that they give the same masks.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from .sam_modules import modeling

get_rel_pos = modeling.image_encoder.get_rel_pos
SamBlock = modeling.image_encoder.Block


def _rel_terms(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, h: int,
               w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query, its terms for every key row and key column: (N, heads, h*w, h) and (N, heads, h*w, w)."""
    n, heads, length, d = q.shape
    rh = get_rel_pos(h, h, rel_pos_h).to(q.dtype)
    rw = get_rel_pos(w, w, rel_pos_w).to(q.dtype)
    r_q = q.reshape(n * heads, h, w, d)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rh).reshape(n, heads, length, h)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rw).reshape(n, heads, length, w)
    return rel_h, rel_w


def _key_position_codes(h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """(h*w, h + w): key (kh, kw) as one-hot of its row then one-hot of its column."""
    rows = torch.eye(h, dtype=like.dtype, device=like.device).repeat_interleave(w, 0)
    cols = torch.eye(w, dtype=like.dtype, device=like.device).repeat(h, 1)
    return torch.cat([rows, cols], dim=1)


def _attend(attn: nn.Module, qkv: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """qkv (N, h*w, 3C) → attention output before the projection, (N, h*w, C).

    The relative-position terms ride inside the attention product instead of a (N, heads, L, L) bias:
    q' = [q * scale, rel_h(q), rel_w(q)] and k' = [k, onehot(kh), onehot(kw)] give
    q'.k' = scale q.k + rel_h[q, kh] + rel_w[q, kw], segment-anything's score. With no mask the flash
    kernels apply; the bias (512 MB per image in each global block of ViT-H) is never built.
    """
    n, length, three_c = qkv.shape
    heads = attn.num_heads
    d = three_c // 3 // heads
    q, k, v = qkv.view(n, length, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
    if not attn.use_rel_pos:
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(n, length, heads * d)
    rel_h, rel_w = _rel_terms(q, attn.rel_pos_h, attn.rel_pos_w, h, w)
    width = d + h + w
    padded = -(-width // 8) * 8  # the fused kernels want head sizes in multiples of 8
    q_aug = q.new_zeros(n, heads, length, padded)
    q_aug[..., :d] = q * attn.scale
    q_aug[..., d:d + h] = rel_h
    q_aug[..., d + h:width] = rel_w
    k_aug = k.new_zeros(n, heads, length, padded)
    k_aug[..., :d] = k
    k_aug[..., d:width] = _key_position_codes(h, w, k)
    v_aug = v.new_zeros(n, heads, length, padded)  # flash wants one head size for q, k and v
    v_aug[..., :d] = v
    out = F.scaled_dot_product_attention(q_aug, k_aug, v_aug, scale=1.0)[..., :d]
    return out.transpose(1, 2).reshape(n, length, heads * d)


def fast_block_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """segment-anything ``Block.forward``, same numbers, with SDPA and no projection work on padding."""
    shortcut = x
    x = self.norm1(x)
    b, hh, ww, c = x.shape
    attn = self.attn
    qkv = attn.qkv(x)  # (B, H, W, 3C)
    ws = self.window_size
    if ws > 0:
        ph, pw = (ws - hh % ws) % ws, (ws - ww % ws) % ws
        hp, wp = hh + ph, ww + pw
        if ph or pw:
            full = qkv.new_empty(b, hp, wp, qkv.shape[-1])
            if attn.qkv.bias is not None:
                full.copy_(attn.qkv.bias.to(qkv.dtype).expand_as(full))  # qkv of the zero padding
            else:
                full.zero_()
            full[:, :hh, :ww] = qkv
            qkv = full
        windows = qkv.view(b, hp // ws, ws, wp // ws, ws, -1).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, qkv.shape[-1])
        out = _attend(attn, windows, ws, ws)
        out = out.view(b, hp // ws, wp // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
        if ph or pw:
            out = out[:, :hh, :ww]
    else:
        out = _attend(attn, qkv.reshape(b, hh * ww, -1), hh, ww).view(b, hh, ww, c)
    x = shortcut + attn.proj(out)
    return x + self.mlp(self.norm2(x))


def _sam_blocks(model: nn.Module) -> list[nn.Module]:
    encoder = getattr(model, "image_encoder", None)
    blocks = getattr(encoder, "blocks", None)
    if blocks is None:
        return []
    return [blk for blk in blocks if isinstance(blk, SamBlock)]


def _set_lm_attention(model: nn.Module, implementation: str) -> None:
    lm = getattr(model, "language_model", None)
    if lm is None:
        return
    if hasattr(lm, "set_attn_implementation"):
        lm.set_attn_implementation(implementation)
    else:  # pragma: no cover - older transformers
        lm.config._attn_implementation = implementation


def _lm_layers(model: nn.Module) -> list[nn.Module]:
    lm = getattr(model, "language_model", None)
    return list(getattr(getattr(lm, "model", None), "layers", None) or [])


def enable_fast_path(model: nn.Module, compile: bool = False, compile_language_model: bool = False) -> nn.Module:
    """Switch ``model`` (an RCMed) to the fast kernels, in place; returns it. Weights are untouched.

    ``compile_language_model`` also compiles each LLM decoder layer (fusing RMSNorm's fp32 round trips,
    rotary and SiLU around the matmuls); shapes change with the batch and the prompt, so it is dynamic.
    """
    for blk in _sam_blocks(model):
        blk.forward = types.MethodType(fast_block_forward, blk)
        if compile:
            blk.compile(dynamic=False)
        else:
            blk._compiled_call_impl = None
    for layer in _lm_layers(model):
        if compile_language_model:
            layer.compile(dynamic=True)
        else:
            layer._compiled_call_impl = None
    _set_lm_attention(model, "sdpa")
    return model


def enable_naive_path(model: nn.Module) -> nn.Module:
    """The released code's kernels: segment-anything's eager attention, eager LLaMA attention."""
    for blk in _sam_blocks(model):
        blk.__dict__.pop("forward", None)
        blk._compiled_call_impl = None
    for layer in _lm_layers(model):
        layer._compiled_call_impl = None
    _set_lm_attention(model, "eager")
    return model


__all__ = ["enable_fast_path", "enable_naive_path", "fast_block_forward"]
