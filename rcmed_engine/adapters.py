"""Adapters that never forget: a small set of trained tensors (LoRA plus RCMed heads) for new classes or a site.

An adapter folder, as `rcmed-train fit --adapter NAME` writes it (peft's file names):

- ``adapter_model.safetensors``: the adapter's tensors, named as the model's parameters;
- ``adapter_config.json``: peft's LoRA keys (r, lora_alpha, target_modules) plus ``rcmed``: name, classes,
  base (the base weights' identity it was trained on), data_sha256, parts and figures.

The engine never merges an adapter into the base weights: for the targets an adapter knows, its tensors are
swapped in (the same Parameter objects get the adapter's storage) and swapped back afterwards, so every other
target runs on the untouched base and gives the base model's exact masks.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn

from .results import EngineError

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"


class AdapterError(EngineError):
    """An adapter folder the engine cannot use; the message is one line."""


def base_identity(preset: str, weights_sha256: str | None, weights_label: str) -> str:
    """What an adapter is bound to: the base weights file's SHA-256, or for random weights their recipe."""
    if weights_sha256 and weights_sha256 != "none":
        return f"sha256:{weights_sha256}"
    return f"{preset} {weights_label}"  # e.g. "tiny random (seed 0)"


def normalise(name: str) -> str:
    return " ".join(name.lower().split())


@dataclass
class Adapter:
    name: str
    folder: str
    classes: list[str]
    tensors: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)

    def knows(self, target: str) -> str | None:
        """The adapter's own spelling of ``target`` when it is one of its classes."""
        key = normalise(target)
        return next((c for c in self.classes if normalise(c) == key), None)

    def summary(self) -> dict[str, object]:
        return {"name": self.name, "folder": self.folder, "classes": list(self.classes),
                "parameters": int(sum(t.numel() for t in self.tensors.values())),
                "figures": self.meta.get("figures", {})}

    @classmethod
    def from_pretrained(cls, folder: str | Path, model: nn.Module, base: str) -> "Adapter":
        """Read an adapter folder and check it against ``model`` (shapes) and its ``base`` identity."""
        folder = Path(folder)
        peft, meta = _read_config(folder)
        if meta.get("base") != base:
            raise AdapterError(f"adapter {folder} was trained on base weights {meta.get('base')!r}, "
                               f"not on the loaded {base!r}")
        tensors = _read_tensors(folder)
        _add_missing_lora(model, tensors, peft)
        params = dict(model.named_parameters())
        for key, t in tensors.items():
            if key not in params:
                raise AdapterError(f"adapter {folder} holds {key!r}, which this model has no parameter for")
            if tuple(t.shape) != tuple(params[key].shape):
                raise AdapterError(f"adapter {folder}: {key} has shape {tuple(t.shape)}, the model "
                                   f"{tuple(params[key].shape)}")
        ref = next(iter(params.values()))
        tensors = {k: t.to(ref.device, params[k].dtype) for k, t in tensors.items()}
        return cls(str(meta["name"]), str(folder), [str(c) for c in meta["classes"]], tensors, meta)

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """The model with this adapter's tensors in place; the base tensors come back untouched afterwards."""
        params = dict(model.named_parameters())
        saved = {k: params[k].data for k in self.tensors}
        try:
            for k, t in self.tensors.items():
                params[k].data = t  # a storage swap, no arithmetic on the base tensor
            yield
        finally:
            for k, t in saved.items():
                params[k].data = t


def _read_config(folder: Path) -> tuple[dict, dict]:
    """The whole adapter_config.json (peft's keys) and its rcmed section."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise AdapterError(f"not an adapter folder (no {CONFIG_NAME}): {folder}")
    try:
        whole = json.loads(path.read_text())
        meta = whole.get("rcmed")
    except (ValueError, AttributeError) as exc:
        raise AdapterError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or not meta.get("name") or not isinstance(meta.get("classes"), list) \
            or not meta["classes"]:
        raise AdapterError(f"{path} lacks the rcmed section with a name and a list of classes")
    return whole, meta


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / WEIGHTS_NAME
    if not path.is_file():
        raise AdapterError(f"adapter {folder} lacks {WEIGHTS_NAME}")
    try:  # safetensors only: an adapter file can carry no code
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"cannot read {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") \
            from None


def _add_missing_lora(model: nn.Module, tensors: dict[str, torch.Tensor], peft: dict) -> None:
    """A LoRA adapter on a base that ships without LoRA layers (syre-7b, merged): add zero ones first,
    shaped as the adapter's peft keys say. With B = 0 they add exact zeros, so the base's answers stay."""
    from .model.language_model import add_lora, has_lora

    lm = getattr(model, "language_model", None)
    if lm is None or has_lora(lm) or not any(".lora_" in k for k in tensors):
        return
    try:
        r, alpha, targets = int(peft["r"]), peft["lora_alpha"], list(peft["target_modules"])
    except (KeyError, TypeError, ValueError):
        raise AdapterError("the adapter holds LoRA tensors but its config lacks peft's r, lora_alpha and "
                           "target_modules") from None
    add_lora(lm, r, alpha, 0.0, targets)


def check_no_overlap(loaded: list[Adapter], new: Adapter) -> None:
    """Two adapters may not claim one class: routing must have one answer."""
    for a in loaded:
        if a.name == new.name:
            raise AdapterError(f"an adapter named {new.name!r} is already loaded (from {a.folder})")
        both = sorted({normalise(c) for c in a.classes} & {normalise(c) for c in new.classes})
        if both:
            raise AdapterError(f"adapter {new.name!r} and adapter {a.name!r} both claim {', '.join(both)}")


def route(targets: list[str], adapters: list[Adapter]) -> tuple[list[str], dict[int, list[int]]]:
    """Targets renamed to the adapters' spelling, and for each adapter index the target positions it answers
    (targets no adapter knows stay with the base model)."""
    out, routes = list(targets), {}
    for i, t in enumerate(targets):
        for a_i, a in enumerate(adapters):
            name = a.knows(t)
            if name is not None:
                out[i] = name
                routes.setdefault(a_i, []).append(i)
                break
    return out, routes


__all__ = ["Adapter", "AdapterError", "CONFIG_NAME", "WEIGHTS_NAME", "base_identity", "check_no_overlap", "route"]
