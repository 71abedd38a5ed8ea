"""RCMed checkpoints: a folder with ``config.json`` and ``model.safetensors``.

A checkpoint holds what was trained on top of the base weights (for ``lite``: projections, [SEG] head,
added-token embeddings and LoRA; optionally the mask decoder) or a whole model (converted syre-7b).
Keys load by name; anything missing, unexpected or of the wrong shape is an error that names it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import RCMedConfig
from .rcmed import RCMed, added_token_rows

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
ADDED_TOKENS_KEY = "language_model.added_token_embeddings"


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model."""


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    sha256: str = ""

    def summary(self) -> str:
        parts = [f"{len(self.loaded)} tensors loaded"]
        for name in ("missing", "unexpected", "mismatched"):
            keys = getattr(self, name)
            if keys:
                shown = ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
                parts.append(f"{len(keys)} {name}: {shown}")
        return "; ".join(parts)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def trained_state_dict(model: RCMed, include: tuple[str, ...] = (),
                       dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The RCMed parts of a model (plus any module prefixes in ``include``), ready to save.

    ``dtype`` casts floating-point tensors (half precision halves a shipped checkpoint; loading casts
    back to the model's dtype)."""
    params = dict(model.named_parameters())
    state = {n: params[n] for n in model.rcmed_parameter_names()}
    if include:
        state.update({n: t for n, t in model.state_dict().items() if n.startswith(include)})
    rows = model.language_model.get_input_embeddings().weight[added_token_rows(model)]
    state[ADDED_TOKENS_KEY] = rows
    out = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    if dtype is not None:
        out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in out.items()}
    return out


def save_checkpoint(model: RCMed, folder: str | Path, include: tuple[str, ...] = (),
                    metadata: dict[str, str] | None = None, dtype: torch.dtype | None = None,
                    state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write config and trained parts atomically (temp files, then rename). ``state``: the tensors, where the
    caller gathered them itself (a sharded model); else ``trained_state_dict(model, include, dtype)``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if state is None:
        state = trained_state_dict(model, include, dtype)
    meta = {"format": "pt", "rcmed_preset": model.config.preset, **(metadata or {})}
    for name, writer in ((WEIGHTS_NAME, lambda p: save_file(state, p, metadata=meta)),
                         (CONFIG_NAME, lambda p: model.config.save(p))):
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=folder)
        os.close(fd)
        try:
            writer(tmp)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; weights are shared files
            os.replace(tmp, folder / name)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return folder


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_config(folder: str | Path) -> RCMedConfig:
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"no {CONFIG_NAME} in {folder}: not an RCMed weights folder")
    try:
        return RCMedConfig.load(path)
    except (ValueError, TypeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not a valid RCMed config: {exc}") from exc


def load_checkpoint(model: RCMed, folder: str | Path, require_parts: bool = True) -> LoadReport:
    """Load a checkpoint folder's tensors into ``model`` by name.

    Every RCMed part must be present when ``require_parts``; base weights that the file does not
    carry stay as the base models gave them. Raises CheckpointError naming what does not fit.
    """
    path = Path(folder) / WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(f"no {WEIGHTS_NAME} in {folder}")
    report = LoadReport(sha256=file_sha256(path))
    own = model.state_dict()
    embed = model.language_model.get_input_embeddings().weight
    rows = added_token_rows(model)
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc
    with handle:
        for key in handle.keys():
            tensor = handle.get_tensor(key)
            if key == ADDED_TOKENS_KEY:
                target = embed[rows]
                if tuple(tensor.shape) != tuple(target.shape):
                    report.mismatched.append(f"{key} {tuple(tensor.shape)} != {tuple(target.shape)}")
                    continue
                with torch.no_grad():
                    embed[rows] = tensor.to(embed)
                report.loaded.append(key)
            elif key not in own:
                report.unexpected.append(key)
            elif tuple(own[key].shape) != tuple(tensor.shape):
                report.mismatched.append(f"{key} {tuple(tensor.shape)} != {tuple(own[key].shape)}")
            else:
                with torch.no_grad():
                    own[key].copy_(tensor.to(own[key].dtype))
                report.loaded.append(key)
    if require_parts:
        have = set(report.loaded)
        report.missing = [n for n in model.rcmed_parameter_names() + [ADDED_TOKENS_KEY] if n not in have]
    if report.missing or report.unexpected or report.mismatched:
        raise CheckpointError(f"weights in {folder} do not fit the {model.config.preset} model: {report.summary()}")
    return report
