"""TinyViT image encoder in LiteMedSAM's configuration (256 px input, 64x64 embedding).

TinyViT (Wu et al., ECCV 2022) is a hierarchical hybrid: a convolutional first stage (MobileNetV2-style
MBConv blocks) followed by three stages of windowed self-attention with a LeViT-style learned relative
position bias, each block also carrying a depthwise "local" 3x3 convolution between attention and MLP.
MobileSAM distilled SAM's ViT-H into it and added SAM's neck; LiteMedSAM (Ma et al.) then retrained it on
medical images at 256 px.

LiteMedSAM differs from the ImageNet TinyViT in how it reaches a 64x64 embedding from a 256 px image:

* the patch embedding is two *pointwise* (1x1, stride 1) conv+BN layers instead of two stride-2 3x3 ones,
  so stage 0 runs at the full 256x256 input resolution (this stage dominates the cost);
* every patch merging halves the resolution except the last one, whose depthwise conv has stride 1
  (256 -> 128 -> 64 -> 64), so stages 2 and 3 both work at 64x64, the resolution of the neck output.

The module layout (and therefore every state-dict key) follows the reference implementation so that
LiteMedSAM's ``image_encoder.*`` weights load with ``strict=True``; the code is our own, and at inference
it folds each BatchNorm into its convolution on the fly and runs windowed attention through
:func:`torch.nn.functional.scaled_dot_product_attention` with the relative bias as an additive mask.

Feature maps between blocks are NCHW tensors in ``channels_last`` memory format, so the token view
(B, H, W, C) used by attention, LayerNorm and the MLP is a free ``permute`` rather than a copy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .sam_modules import LayerNorm2d  # segment-anything's, imported without torchvision

__all__ = [
    "Attention",
    "ConvBN",
    "ConvStage",
    "MBConv",
    "Mlp",
    "PatchEmbed",
    "PatchMerging",
    "TinyViT",
    "TinyViTBlock",
    "TransformerStage",
    "relative_position_index",
]




def relative_position_index(window_size: int) -> Tensor:
    """Index table of the relative attention bias for one ``window_size`` x ``window_size`` window.

    Tokens are numbered row-major inside the window. The bias between tokens at (y1, x1) and (y2, x2)
    depends only on (|y1 - y2|, |x1 - x2|); that offset pair is stored in column ``|dy| * w + |dx|`` of the
    per-head bias table, which therefore has ``w * w`` columns.

    Returns:
        LongTensor (w*w, w*w).
    """
    coords = torch.arange(window_size)
    ys = coords.repeat_interleave(window_size)  # (N,)
    xs = coords.repeat(window_size)  # (N,)
    dy = (ys[:, None] - ys[None, :]).abs()
    dx = (xs[:, None] - xs[None, :]).abs()
    return dy * window_size + dx


def _gelu_(x: Tensor) -> Tensor:
    """GELU (exact, erf) that overwrites ``x`` unless autograd needs it.

    Only ever called on fresh temporaries. In-place matters on CPU: stage 0's activations are hundreds of
    MB, and a new buffer of that size costs more in page faults than the GELU itself.
    """
    if x.requires_grad:
        return F.gelu(x)
    return torch.ops.aten.gelu_(x)


def _residual_(branch: Tensor, shortcut: Tensor) -> Tensor:
    """``shortcut + branch``, accumulated into ``branch`` (a fresh temporary) where that pays.

    Out of place when autograd records, or when ``branch`` is a strided view (a crop of a padded map):
    adding into the view would leave a non-dense result that the next convolution copies again.
    """
    dense = branch.is_contiguous() or branch.is_contiguous(memory_format=torch.channels_last)
    if branch.requires_grad or shortcut.requires_grad or not dense:
        return shortcut + branch
    return branch.add_(shortcut)


def _drop_path(x: Tensor, drop_prob: float, training: bool) -> Tensor:
    """Stochastic depth: zero whole samples of a residual branch with probability ``drop_prob``."""
    if drop_prob <= 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class ConvBN(nn.Module):
    """Conv2d (no bias) followed by BatchNorm2d; state-dict keys ``c.*`` and ``bn.*``.

    In eval mode the BatchNorm is folded into the convolution's weight and bias on every call (a
    per-channel rescale of the small weight tensor), which saves a full pass over the activation.

    Shapes: (B, in_chans, H, W) -> (B, out_chans, H', W').
    """

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        bn_weight_init: float = 1.0,
    ) -> None:
        super().__init__()
        self.c = nn.Conv2d(in_chans, out_chans, kernel_size, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chans)
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.zeros_(self.bn.bias)

    def fused_weight_and_bias(self) -> tuple[Tensor, Tensor]:
        """The equivalent conv weight (out, in/groups, k, k) and bias (out,) using the running stats."""
        bn = self.bn
        assert bn.running_var is not None and bn.running_mean is not None
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        weight = self.c.weight * scale[:, None, None, None]
        bias = bn.bias - bn.running_mean * scale
        return weight, bias

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            return self.bn(self.c(x))
        weight, bias = self.fused_weight_and_bias()
        conv = self.c
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


class PatchEmbed(nn.Module):
    """LiteMedSAM's patch embedding: 1x1 ConvBN -> GELU -> 1x1 ConvBN, no downsampling.

    Shapes: (B, in_chans, H, W) -> (B, embed_dim, H, W).
    """

    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        hidden = embed_dim // 2
        self.seq = nn.Sequential(ConvBN(in_chans, hidden), nn.GELU(), ConvBN(hidden, embed_dim))

    def forward(self, x: Tensor) -> Tensor:
        conv_in, _, conv_out = self.seq  # seq.1 (nn.GELU) only keeps the checkpoint's key numbering
        return conv_out(_gelu_(conv_in(x)))


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand -> GELU -> 3x3 depthwise -> GELU -> 1x1 project, + skip, GELU.

    Shapes: (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, dim: int, expand_ratio: float, drop_path: float = 0.0) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = ConvBN(dim, hidden)
        self.conv2 = ConvBN(hidden, hidden, kernel_size=3, padding=1, groups=hidden)
        self.conv3 = ConvBN(hidden, dim, bn_weight_init=0.0)
        self.drop_path = drop_path

    def forward(self, x: Tensor) -> Tensor:
        y = _gelu_(self.conv1(x))
        y = _gelu_(self.conv2(y))
        y = _drop_path(self.conv3(y), self.drop_path, self.training)
        return _gelu_(_residual_(y, x))


class PatchMerging(nn.Module):
    """Downsampling between stages: 1x1 ConvBN -> GELU -> 3x3 depthwise ConvBN (stride) -> GELU -> 1x1 ConvBN.

    Shapes: (B, dim, H, W) -> (B, out_dim, ceil(H / stride), ceil(W / stride)).
    """

    def __init__(self, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, kernel_size=3, stride=stride, padding=1, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = _gelu_(self.conv1(x))
        x = _gelu_(self.conv2(x))
        return self.conv3(x)


class _Stage(nn.Module):
    """A stage: its ``blocks`` in turn, then the optional ``downsample`` (a :class:`PatchMerging`)."""

    blocks: nn.ModuleList
    downsample: PatchMerging | None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


class ConvStage(_Stage):
    """Stage 0: ``depth`` MBConv blocks, then an optional :class:`PatchMerging`.

    Shapes: (B, dim, H, W) -> (B, out_dim, H', W').
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        expand_ratio: float,
        drop_path: Sequence[float],
        downsample: PatchMerging | None,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio, drop_path[i]) for i in range(depth))
        self.downsample = downsample


class Attention(nn.Module):
    """Multi-head self-attention inside non-overlapping square windows, with a relative position bias.

    The bias table ``attention_biases`` (heads, w*w) is a parameter; the index table
    ``attention_bias_idxs`` (w*w, w*w) is derived from the window size and kept out of the state dict.
    The qkv projection is laid out per head as [q | k | v] (each ``head_dim`` wide), as in LeViT/TinyViT.
    Window partitioning happens here so that merging heads and un-partitioning windows is one copy.

    Shapes: (B, H, W, dim) -> (B, H, W, dim); H and W must be multiples of ``window_size``.
    """

    attention_bias_idxs: Tensor

    def __init__(self, dim: int, num_heads: int, window_size: int) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = window_size
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window_size * window_size))
        self.register_buffer("attention_bias_idxs", relative_position_index(window_size), persistent=False)

    def bias(self) -> Tensor:
        """The additive attention bias (heads, N, N), N = window_size**2."""
        return self.attention_biases[:, self.attention_bias_idxs]

    def forward(self, x: Tensor) -> Tensor:
        batch, height, width, dim = x.shape
        w, heads, head_dim = self.window_size, self.num_heads, self.head_dim
        rows, cols = height // w, width // w
        if rows * w != height or cols * w != width:
            raise ValueError(f"feature map {height}x{width} is not a multiple of the window size {w}")
        # (B, H, W, C) -> (B*rows*cols, w*w, C): one window per row of the batch.
        windows = x.view(batch, rows, w, cols, w, dim).transpose(2, 3).reshape(-1, w * w, dim)
        qkv = self.qkv(self.norm(windows)).view(windows.shape[0], w * w, heads, 3, head_dim)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each (B', heads, N, head_dim)
        # A 4-D mask keeps SDPA on its fused CPU kernel; a 3-D one sends it to the slower math path.
        bias = self.bias().to(q.dtype)[None]  # (1, heads, N, N)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # scale = head_dim ** -0.5
        # (B', heads, N, hd) viewed as (B, rows, cols, heads, wy, wx, hd) -> (B, rows, wy, cols, wx, heads, hd)
        out = out.view(batch, rows, cols, heads, w, w, head_dim).permute(0, 1, 4, 2, 5, 3, 6)
        return self.proj(out.reshape(batch, height, width, dim))


class Mlp(nn.Module):
    """Pre-norm feed-forward: LayerNorm -> Linear -> GELU -> Linear. Shapes: (..., dim) -> (..., dim)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(_gelu_(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Window attention (+ residual) -> depthwise local conv -> MLP (+ residual).

    The feature map is zero-padded on the bottom/right to a multiple of the window size before it is
    cut into windows. As in the reference, the padded tokens are not masked: they pass through the
    attention's LayerNorm (becoming its bias) and take part as keys/values; they are cropped afterwards.

    Shapes: (B, dim, H, W) -> (B, dim, H, W); channels_last input keeps the token view copy-free.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float = 4.0,
        local_conv_size: int = 3,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.attn = Attention(dim, num_heads, window_size)
        self.local_conv = ConvBN(
            dim, dim, kernel_size=local_conv_size, padding=local_conv_size // 2, groups=dim
        )
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def window_attention(self, x: Tensor) -> Tensor:
        """Zero-pad to whole windows, attend, crop. Shapes: (B, H, W, C) -> (B, H, W, C)."""
        height, width = x.shape[1:3]
        pad_h, pad_w = (-height) % self.window_size, (-width) % self.window_size
        if not (pad_h or pad_w):
            return self.attn(x)
        return self.attn(F.pad(x, (0, 0, 0, pad_w, 0, pad_h)))[:, :height, :width]

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.permute(0, 2, 3, 1)  # (B, H, W, C), a view when x is channels_last
        tokens = _residual_(_drop_path(self.window_attention(tokens), self.drop_path, self.training), tokens)
        x = self.local_conv(tokens.permute(0, 3, 1, 2))
        tokens = x.permute(0, 2, 3, 1)
        tokens = _residual_(_drop_path(self.mlp(tokens), self.drop_path, self.training), tokens)
        return tokens.permute(0, 3, 1, 2)


class TransformerStage(_Stage):
    """Stages 1-3: ``depth`` :class:`TinyViTBlock` s, then an optional :class:`PatchMerging`.

    Shapes: (B, dim, H, W) -> (B, out_dim, H', W').
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        local_conv_size: int,
        drop_path: Sequence[float],
        downsample: PatchMerging | None,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim, num_heads, window_size, mlp_ratio, local_conv_size, drop_path[i])
            for i in range(depth)
        )
        self.downsample = downsample


class TinyViT(nn.Module):
    """TinyViT image encoder with SAM's neck, returning ``(neck, pre_neck)``.

    With the defaults (LiteMedSAM) the stages run at 256, 128, 64 and 64 px for a 256 px input:

    ============  ==========  ===========  ===================================
    stage         channels    resolution   blocks
    ============  ==========  ===========  ===================================
    patch_embed   3 -> 64     256 x 256    two 1x1 ConvBN
    layers.0      64          256 x 256    2 MBConv, merge 64->128 stride 2
    layers.1      128         128 x 128    2 attention (w=7), merge stride 2
    layers.2      160         64 x 64      6 attention (w=14), merge stride 1
    layers.3      320         64 x 64      2 attention (w=7)
    neck          320 -> 256  64 x 64      1x1 conv, LN2d, 3x3 conv, LN2d
    ============  ==========  ===========  ===================================

    Attributes:
        pre_neck_dim: channels of the pre-neck features (``embed_dims[-1]``).
        neck_dim: channels of the neck embedding (256).
        embedding_size: side of both outputs (``img_size // 4`` for four stages).
    """

    def __init__(
        self,
        img_size: int = 256,
        in_chans: int = 3,
        embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (2, 4, 5, 10),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        drop_path_rate: float = 0.0,
        neck_dim: int = 256,
    ) -> None:
        super().__init__()
        num_stages = len(depths)
        if not (len(embed_dims) == len(num_heads) == len(window_sizes) == num_stages) or num_stages < 2:
            raise ValueError("embed_dims, depths, num_heads and window_sizes need one entry per stage (>= 2)")
        self.img_size = img_size
        self.in_chans = in_chans
        self.pre_neck_dim = int(embed_dims[-1])
        self.neck_dim = neck_dim

        # Stochastic depth rate grows linearly over all blocks (0 for LiteMedSAM inference).
        rates = torch.linspace(0.0, drop_path_rate, sum(depths)).tolist()
        per_stage = [rates[sum(depths[:i]) : sum(depths[: i + 1])] for i in range(num_stages)]

        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
        self.layers = nn.ModuleList()
        size = img_size
        for i in range(num_stages):
            downsample = None
            if i < num_stages - 1:
                # The merge into the last stage keeps the resolution (MobileSAM's change to TinyViT).
                stride = 1 if i == num_stages - 2 else 2
                downsample = PatchMerging(embed_dims[i], embed_dims[i + 1], stride)
            stage: nn.Module
            if i == 0:
                stage = ConvStage(embed_dims[0], depths[0], mbconv_expand_ratio, per_stage[0], downsample)
            else:
                stage = TransformerStage(
                    embed_dims[i],
                    depths[i],
                    num_heads[i],
                    window_sizes[i],
                    mlp_ratio,
                    local_conv_size,
                    per_stage[i],
                    downsample,
                )
            self.layers.append(stage)
            if downsample is not None:
                size = (size + downsample.stride - 1) // downsample.stride
        self.embedding_size = size

        self.neck = nn.Sequential(
            nn.Conv2d(self.pre_neck_dim, neck_dim, kernel_size=1, bias=False),
            LayerNorm2d(neck_dim),
            nn.Conv2d(neck_dim, neck_dim, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(neck_dim),
        )
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """Everything before the neck. Shapes: (B, 3, S, S) -> (B, pre_neck_dim, E, E), channels_last."""
        x = self.patch_embed(x.contiguous(memory_format=torch.channels_last))
        for layer in self.layers:
            x = layer(x)
        return x

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Encode images.

        Args:
            x: (B, in_chans, img_size, img_size), already normalised.

        Returns:
            ``(neck, pre_neck)``: (B, neck_dim, E, E) and (B, pre_neck_dim, E, E), E = ``embedding_size``
            (64 for LiteMedSAM). Both are contiguous NCHW tensors.
        """
        if x.ndim != 4 or x.shape[1] != self.in_chans or tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(
                f"TinyViT expects (B, {self.in_chans}, {self.img_size}, {self.img_size}) input, got {tuple(x.shape)}"
            )
        pre_neck = self.forward_features(x)
        neck = self.neck(pre_neck)
        return neck.contiguous(), pre_neck.contiguous()
