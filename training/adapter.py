"""`rcmed-train fit CONFIG --adapter NAME`: train an adapter on frozen base weights and save it alone.

The run is the ordinary fit loop (same config, data, losses); only the parts an adapter may hold train
(LoRA, the RCMed projections and heads, the mask decoder), and what is saved is just those tensors, in
peft's file names (``adapter_model.safetensors``, ``adapter_config.json``), with the classes the adapter
answers, the base weights it belongs to and the data it saw. The engine routes those classes to it
(`rcmed segment --adapter DIR`) and leaves every other class on the base model, bit for bit.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from rcmed_engine.adapters import CONFIG_NAME, WEIGHTS_NAME, base_identity
from rcmed_engine.model.checkpoint import file_sha256
from rcmed_engine.data_locations import lite_weights_dir

from .data import LabelledVolumes
from .trainer import SAVE_DTYPES, TrainConfig, Trainer, _apply_overrides

# The embedding matrix, encoders and base LM weights are shared by every class: an adapter that held them
# would be a second model, and added token rows would change what the base model reads.
ADAPTER_PARTS = ("rcmed", "vl_projection", "text_hidden_fcs", "lv_projection", "lora", "mask_decoder")


def base_of(cfg: TrainConfig) -> str:
    """The identity of the base weights this config trains on, as the engine computes it (adapters.base_identity)."""
    m = cfg.model
    folder = Path(m.init_weights) if m.init_weights else (lite_weights_dir() if m.preset == "lite" else None)
    if folder is None:
        if m.preset != "tiny":
            raise ValueError(f"an adapter for preset {m.preset!r} needs model.init_weights (its base weights)")
        return base_identity("tiny", None, f"random (seed {m.seed})")
    return base_identity(m.preset, file_sha256(folder / "model.safetensors"), str(folder))


def data_sha256(cfg: TrainConfig) -> str:
    """SHA-256 over the training split's files (names and bytes), so an adapter says what it learnt from."""
    digest = hashlib.sha256()
    for root in cfg.data.roots():
        files = [Path(root) / "dataset.json"] + sorted(p for d in (f"images{cfg.data.split}", f"labels{cfg.data.split}")
                                                 for p in (Path(root) / d).glob("*") if p.is_file())
        for path in map(Path, files):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def adapter_classes(cfg: TrainConfig) -> list[str]:
    names: list[str] = []
    for root in cfg.data.roots():
        names += [c for c in LabelledVolumes(root, cfg.data.split, tuple(cfg.data.axes)).classes if c not in names]
    return names


def check_adapter_config(cfg: TrainConfig) -> None:
    bad = sorted(set(cfg.model.train) - set(ADAPTER_PARTS))
    if bad:
        raise ValueError(f"an adapter cannot train {', '.join(bad)} (shared by every class); set model.train to "
                         f"parts of {list(ADAPTER_PARTS)}, e.g. --set model.train=[rcmed,lora,mask_decoder]")


def _figures(trainer: Trainer, last: dict) -> dict:
    log = trainer.out / "log.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
    val = [r["val_dice"] for r in rows if "val_dice" in r]
    return {"steps": int(last.get("step", trainer.step)), "final_loss": last.get("total"),
            "val_dice": val[-1] if val else None}


def save_adapter(trainer: Trainer, folder: Path, name: str, meta: dict) -> Path:
    """The trained tensors alone plus adapter_config.json (peft's LoRA keys and an rcmed section)."""
    folder.mkdir(parents=True, exist_ok=True)
    dtype = SAVE_DTYPES[trainer.cfg.run.save_dtype]
    params = dict(trainer.model.named_parameters())
    tensors = {n: params[n].detach().to("cpu", dtype).contiguous() for n in trainer.trainable}
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt", "rcmed_adapter": name})
    lm = trainer.model.config.language_model
    config = {"peft_type": "LORA", "r": lm.lora_r, "lora_alpha": lm.lora_alpha,
              "target_modules": list(lm.lora_targets), "bias": "none",
              "base_model_name_or_path": trainer.cfg.model.init_weights or trainer.cfg.model.preset,
              "rcmed": {"name": name, **meta, "parts": list(trainer.cfg.model.train),
                        "tensors": len(tensors), "parameters": int(sum(t.numel() for t in tensors.values()))}}
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def fit_adapter(config: str | Path | TrainConfig, name: str, overrides: dict | None = None,
                stop_after: int | None = None) -> Path:
    """Train adapter ``name`` from a fit config; returns its folder (``<run.out>/adapter``)."""
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.load(config)
    if overrides:
        cfg = _apply_overrides(cfg, overrides)
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"adapter name {name!r}: use letters, digits, '-' and '_'")
    check_adapter_config(cfg)
    meta = {"classes": adapter_classes(cfg), "base": base_of(cfg), "preset": cfg.model.preset,
            "data_sha256": data_sha256(cfg)}
    trainer = Trainer(cfg)
    if "lora" in cfg.model.train and not any(".lora_" in n for n in trainer.trainable):
        raise ValueError(f"preset {cfg.model.preset!r} has no LoRA layers to train; drop lora from model.train")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    last = trainer.fit(stop_after)
    # Why: the promise is an untouched base; a frozen tensor that moved would break it silently.
    moved = [n for n, p in trainer.model.named_parameters() if n in before and not torch.equal(p, before[n])]
    if moved:
        raise RuntimeError(f"frozen base tensors changed during adapter training: {moved[:3]}")
    meta["figures"] = _figures(trainer, last)
    return save_adapter(trainer, Path(cfg.run.out) / "adapter", name, meta)


__all__ = ["ADAPTER_PARTS", "fit_adapter", "save_adapter", "base_of", "data_sha256"]
