"""Fast inference without changing the answers: attention kernels, shared text prefix, compilation.

``enable_fast_path(model)`` switches an RCMed model with a SAM ViT encoder (tiny, syre-7b) to:

* **SAM blocks on ``scaled_dot_product_attention``.** segment-anything's attention materialises the
  (heads, N, N) score matrix, adds the decomposed relative-position terms to it and runs softmax as
  separate kernels; in the four global blocks of ViT-H that is 16 x 4096 x 4096 per image. Here the
  relative-position terms become one additive bias and SDPA (memory-efficient kernel on CUDA, fused
  kernel on CPU) does the rest. Global blocks run a few images at a time so the bias stays within
  ``bias_budget_bytes``.
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

DEFAULT_BIAS_BUDGET = 1 << 30  # bytes of relative-position bias per global-attention call


def rel_pos_bias(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """segment-anything's decomposed relative position terms as an additive bias.

    q: (N, heads, h*w, d), unscaled, as ``add_decomposed_rel_pos`` takes it. Returns (N, heads, h*w, h*w)
    in q's dtype: bias[q, k] = <q, R_h[qh - kh]> + <q, R_w[qw - kw]>.
    """
    n, heads, length, d = q.shape
    rh = get_rel_pos(h, h, rel_pos_h).to(q.dtype)
    rw = get_rel_pos(w, w, rel_pos_w).to(q.dtype)
    r_q = q.reshape(n * heads, h, w, d)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rh)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rw)
    bias = rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]
    return bias.reshape(n, heads, length, h * w)


def _attend(attn: nn.Module, qkv: torch.Tensor, h: int, w: int, budget: int) -> torch.Tensor:
    """qkv (N, h*w, 3C) → attention output before the projection, (N, h*w, C)."""
    n, length, three_c = qkv.shape
    heads = attn.num_heads
    d = three_c // 3 // heads
    q, k, v = qkv.view(n, length, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
    per_item = heads * length * length * q.element_size()
    step = max(1, min(n, budget // max(per_item, 1)))
    outs = []
    for s in range(0, n, step):
        qs, ks, vs = q[s:s + step], k[s:s + step], v[s:s + step]
        bias = rel_pos_bias(qs, attn.rel_pos_h, attn.rel_pos_w, h, w) if attn.use_rel_pos else None
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=bias))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out.transpose(1, 2).reshape(n, length, heads * d)


def fast_block_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """segment-anything ``Block.forward``, same numbers, with SDPA and no projection work on padding."""
    shortcut = x
    x = self.norm1(x)
    b, hh, ww, c = x.shape
    attn = self.attn
    qkv = attn.qkv(x)  # (B, H, W, 3C)
    ws = self.window_size
    budget = getattr(self, "_bias_budget", DEFAULT_BIAS_BUDGET)
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
        out = _attend(attn, windows, ws, ws, budget)
        out = out.view(b, hp // ws, wp // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
        if ph or pw:
            out = out[:, :hh, :ww]
    else:
        out = _attend(attn, qkv.reshape(b, hh * ww, -1), hh, ww, budget).view(b, hh, ww, c)
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


def enable_fast_path(model: nn.Module, compile: bool = False,
                     bias_budget_bytes: int = DEFAULT_BIAS_BUDGET) -> nn.Module:
    """Switch ``model`` (an RCMed) to the fast kernels, in place; returns it. Weights are untouched."""
    for blk in _sam_blocks(model):
        blk.forward = types.MethodType(fast_block_forward, blk)
        blk._bias_budget = int(bias_budget_bytes)
        if compile:
            blk.compile(dynamic=False)
        else:
            blk._compiled_call_impl = None
    _set_lm_attention(model, "sdpa")
    return model


def enable_naive_path(model: nn.Module) -> nn.Module:
    """The released code's kernels: segment-anything's eager attention, eager LLaMA attention."""
    for blk in _sam_blocks(model):
        blk.__dict__.pop("forward", None)
        blk.__dict__.pop("_bias_budget", None)
        blk._compiled_call_impl = None
    _set_lm_attention(model, "eager")
    return model


__all__ = ["enable_fast_path", "enable_naive_path", "fast_block_forward", "rel_pos_bias"]
