"""`rcmed-train fit CONFIG.yaml`: the training loop.

One process, or many under ``torchrun``/``accelerate launch`` (DDP: gloo on CPU, NCCL on CUDA; the
process group comes from the launcher's environment). Each rank draws its own samples from a
deterministic stream (seed, step, rank), so a run and its resumed continuation see the same data.
Dropout is reseeded per step for the same reason: resuming reproduces the uninterrupted run exactly.

A run folder holds ``log.jsonl`` (one object per step and per validation), ``curves.png``,
``checkpoints/step-N/`` (``save_checkpoint``'s config.json + model.safetensors with only the trained
parts, which ``rcmed segment --weights`` reads, plus ``trainable.safetensors`` and ``trainer_state.pt``
for resuming) and ``final/``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file

from rcmed_engine.io import write_atomic
from rcmed_engine.model.checkpoint import load_checkpoint, save_checkpoint
from rcmed_engine.model.language_model import add_lora
from rcmed_engine.model.presets import build_model, load_preset, tiny_config
from rcmed_engine.model.rcmed import ImageFeatures, RCMed, added_token_rows
from rcmed_engine.model.tokenizer import IGNORE_INDEX
from rcmed_engine.prompts import build_conversation

from .crd import DescriptionCache, make_describer
from .data import DEFAULT_MIX, LabelledVolumes, Sample, SliceRef, TripletSampler
from .features import FeatureCache
from .losses import LossWeights
from .sharding import Sharded, full, full_trained_state, launch_settings, load_sharded, save_sharded, shard_loss_module
from .step import EncodedSample, forward_losses

PARTS = ("rcmed", "vl_projection", "text_hidden_fcs", "lv_projection", "lora", "added_tokens", "mask_decoder",
         "prompt_encoder", "image_encoder", "language_model")
RCMED_PARTS = ("vl_projection", "text_hidden_fcs", "lv_projection")  # what "rcmed" stands for
# SAM's IoU head: no loss reads its output, so it never has a gradient and never trained. Frozen, it stays out of
# the optimizer (AdamW would decay the zero gradient FSDP hands every trainable parameter of a forward's root).
NO_GRADIENT = ("mask_decoder.iou_prediction_head.",)
SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SAVE_PREFIXES = {"mask_decoder": "mask_decoder.", "prompt_encoder": "prompt_encoder.",
                 "image_encoder": "image_encoder.", "language_model": "language_model."}


# ----------------------------------------------------------------------------------------------- config
class MultiSampler:
    """Several data sets: each draw picks one uniformly (deterministically from the draw number).

    A ``foreign_fraction`` of draws asks for a class of another data set ("cell nuclei" on a brain slice),
    answered "does not contain": within one data set the model never meets such a prompt, and the
    words must still matter there.
    """

    def __init__(self, samplers: list[TripletSampler], foreign_fraction: float = 0.0) -> None:
        self.samplers = samplers
        self.foreign_fraction = float(foreign_fraction)

    def draw(self, seed: int, number: int) -> Sample:
        import random

        rng = random.Random(f"pick:{seed}:{number}")
        sampler = rng.choice(self.samplers)
        if rng.random() < self.foreign_fraction:
            own = set(sampler.data.classes)
            foreign = sorted({c for s in self.samplers for c in s.data.classes if c not in own})
            if foreign:
                return sampler.build(rng.choice(sampler.data.slices), "seg_all", [rng.choice(foreign)], False, rng)
        return sampler.draw(seed, number)


@dataclass
class DataConfig:
    root: str | list[str] = ""  # one nnU-Net v2 raw data set folder, or a list of them
    split: str = "Tr"
    axes: list[str] = field(default_factory=lambda: ["axial"])
    val_split: str | None = "Ts"
    val_slices: int = 16
    limit_cases: int | None = None
    mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    negative_fraction: float = 0.25
    foreign_fraction: float = 0.0  # with several data sets: ask for another data set's class (absent)
    stride: int = 1  # fit-decoder: every stride-th slice
    dihedral_2d: bool = True  # fit-decoder: 2D images in their 8 rotations/flips
    synth: dict | None = None  # fit-decoder: a pool of synthetic slices instead of root (SynthData keys, slices, val_slices)
    describer: str = "geometric"  # or "vlm" (with vlm_dir)
    vlm_dir: str | None = None

    def roots(self) -> list[str]:
        roots = [self.root] if isinstance(self.root, str) else list(self.root)
        if not roots or not all(roots):
            raise ValueError("data.root names no data set folder")
        return roots


@dataclass
class ModelConfig:
    preset: str = "tiny"
    init_weights: str | None = None  # an RCMed weights folder to start from
    train: list[str] = field(default_factory=lambda: ["rcmed", "lora", "added_tokens", "mask_decoder"])
    lora_layers: int | None = None  # train the LoRA of only the last N decoder layers (None: all)
    presence_threshold: float | None = None  # written into the saved weights' config (None: keep)
    lora_dropout: bool = True  # False: the adapters' dropout is switched off (fit-synth)
    prompt_head_init: str = "random"  # "standardised": fit-synth centres text_hidden_fcs on measured [SEG] states
    cache_features: bool = False  # needs a frozen image encoder
    feature_cache: str | None = None  # default: <out>/feature_cache
    seed: int = 0


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    batch_size: int = 2  # per process
    grad_accum: int = 1
    warmup_steps: int = 100
    total_steps: int = 5000  # linear decay to 0 here (the released WarmupDecayLR)


@dataclass
class RunConfig:
    out: str = "runs/tiny"
    seed: int = 0
    log_every: int = 1
    val_every: int = 50
    save_every: int = 100
    threads: int | None = None
    save_dtype: str = "float32"  # the final checkpoint's tensors: float32, float16 or bfloat16
    strategy: str = "ddp"  # several processes: "ddp" (replicas) or "fsdp" (sharded; an accelerate FSDP launch sets it)
    mixed_precision: str = "auto"  # fsdp: "bf16" layers with fp32 master weights, "no", or "auto" (bf16 on CUDA)
    activation_checkpointing: bool = False  # fsdp: recompute each decoder layer / encoder block in backward


FLOAT_KEYS = ("lr", "weight_decay", "ce", "bce", "dice", "boundary", "presence", "negative_fraction",
              "foreign_fraction")


def config_sections(d: dict[str, Any], kinds: dict[str, type]) -> dict[str, Any]:
    """A run config's sections as dataclasses, refusing unknown sections and keys by name (YAML may give
    ints where floats are meant, and lists where tuples are)."""
    unknown = set(d) - set(kinds)
    if unknown:
        raise ValueError(f"unknown config sections: {sorted(unknown)}")
    out = {}
    for name, kind in kinds.items():
        sub = dict(d.get(name) or {})
        bad = set(sub) - {f.name for f in dataclasses.fields(kind)}
        if bad:
            raise ValueError(f"unknown keys in {name}: {sorted(bad)}")
        if "betas" in sub:
            sub["betas"] = tuple(sub["betas"])
        for k in FLOAT_KEYS:
            if k in sub:
                sub[k] = float(sub[k])
        out[name] = kind(**sub)
    return out


class ConfigFile:
    """A run config (a dataclass of section dataclasses, one of them ``optim``) read from and written to YAML."""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        return cls(**config_sections(d, {f.name: f.default_factory for f in dataclasses.fields(cls)}))  # type: ignore[arg-type,misc]

    @classmethod
    def load(cls, path: str | Path) -> Any:
        return cls.from_dict(yaml.safe_load(Path(path).read_text()) or {})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)  # type: ignore[call-overload]
        d["optim"]["betas"] = list(d["optim"]["betas"])
        return d


@dataclass
class TrainConfig(ConfigFile):
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossWeights = field(default_factory=LossWeights)
    run: RunConfig = field(default_factory=RunConfig)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        cfg = super().from_dict(d)
        bad_parts = set(cfg.model.train) - set(PARTS)
        if bad_parts:
            raise ValueError(f"unknown trainable parts {sorted(bad_parts)}; choose from {PARTS}")
        if cfg.run.save_dtype not in SAVE_DTYPES:
            raise ValueError(f"run.save_dtype must be one of {sorted(SAVE_DTYPES)}, not {cfg.run.save_dtype!r}")
        if cfg.model.lora_layers is not None and cfg.model.lora_layers < 1:
            raise ValueError("model.lora_layers must be at least 1 (or null for every layer)")
        if cfg.model.cache_features and "image_encoder" in cfg.model.train:
            raise ValueError("cache_features needs a frozen image encoder: drop image_encoder from model.train")
        return cfg


# ------------------------------------------------------------------------------------------------ model
def build_training_model(cfg: ModelConfig) -> RCMed:
    torch.manual_seed(cfg.seed)
    if cfg.preset == "tiny":
        model = build_model(tiny_config())
        if cfg.init_weights:
            load_checkpoint(model, cfg.init_weights)
    else:
        model = load_preset(cfg.preset, cfg.init_weights).model
    if "lora" in cfg.train:  # syre-7b's released weights have their LoRA merged: train a fresh one on them
        lm = model.config.language_model
        add_lora(model.language_model, lm.lora_r, lm.lora_alpha, lm.lora_dropout, lm.lora_targets)
    if cfg.presence_threshold is not None:
        model.config.presence_threshold = float(cfg.presence_threshold)
    return model


def _layer_index(name: str) -> int | None:
    match = re.search(r"\.layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def set_trainable(model: RCMed, parts: list[str], lora_layers: int | None = None) -> list[str]:
    """Freeze everything, then unfreeze the named parts. Returns the trainable parameter names.

    ``lora_layers``: only the LoRA of the last N decoder layers trains. With the V-L projection frozen
    too, nothing below those layers needs a gradient, so the backward pass stops there (CPU runs).
    """
    model.requires_grad_(False)
    own = tuple(f"{p}." for p in RCMED_PARTS if p in parts or "rcmed" in parts)
    first_lora = 0
    if lora_layers is not None:
        first_lora = max(0, model.language_model.config.num_hidden_layers - lora_layers)
    embed = model.language_model.get_input_embeddings().weight
    whole = tuple(prefix for part, prefix in SAVE_PREFIXES.items() if part in parts)
    for name, p in model.named_parameters():
        lora = "lora" in parts and ".lora_" in name and (_layer_index(name) or 0) >= first_lora
        if ((own and name.startswith(own)) or lora or (whole and name.startswith(whole))) \
                and not name.startswith(NO_GRADIENT):
            p.requires_grad_(True)
    if first_lora:
        # Frozen adapters below the trained layers: their dropout masks are a tenth of a CPU step for nothing.
        for name, module in model.language_model.named_modules():
            if name.endswith("lora_dropout") and (_layer_index(name + ".") or 0) < first_lora:
                for key in list(module.keys()):
                    module[key] = nn.Identity()
    if "added_tokens" in parts and not embed.requires_grad:
        embed.requires_grad_(True)
        rows = added_token_rows(model)
        keep = torch.zeros_like(embed[:, :1])
        keep[rows] = 1.0
        embed.register_hook(lambda g: g * keep.to(g))  # only the added tokens' rows learn
        embed._rcmed_row_mask = keep  # type: ignore[attr-defined]  (no weight decay; FSDP re-applies it: its parameter drops the hook)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def encode_qa(model: RCMed, question: str, answer: str) -> EncodedSample:
    """Ids and labels for any question/answer (``encode_sample`` with the template's own text)."""
    conv = build_conversation(model.config.prompt.system, question, answer, model.tokenizer.eos_token)
    ids = model.tokenizer.encode(conv.text)
    head = conv.text[: conv.text.index(" ASSISTANT: ") + len(" ASSISTANT:")]
    n_head = len(model.tokenizer.encode(head))
    return EncodedSample(ids, [IGNORE_INDEX] * n_head + ids[n_head:])


@contextlib.contextmanager
def cached_encoder(model: RCMed, features: ImageFeatures | None):
    """Make ``model.encode_image`` return precomputed features for one pass (frozen-encoder runs)."""
    if features is None:
        yield
        return
    model.encode_image = lambda pixels: features  # type: ignore[method-assign]
    try:
        yield
    finally:
        del model.encode_image


class LossModule(nn.Module):
    """RCMed plus its losses as one module, so DDP's reducer and FSDP's root see the whole pass through
    ``forward``. Without ``masks`` it returns ``predict_masks`` (validation: under FSDP only a forward of
    the root gathers the parameters)."""

    def __init__(self, model: RCMed, weights: LossWeights) -> None:
        super().__init__()
        self.rcmed = model
        self.weights = weights
        self.touch_unused = False  # set by shard_loss_module

    def forward(self, pixels: torch.Tensor, samples: list[EncodedSample], masks: list[torch.Tensor] | None = None,
                features: ImageFeatures | None = None) -> dict[str, torch.Tensor] | list[torch.Tensor]:
        if masks is None:
            return predict_masks(self.rcmed, pixels, samples, features)
        with cached_encoder(self.rcmed, features):
            losses = forward_losses(self.rcmed, pixels, samples, masks, self.weights)
        if self.touch_unused:
            losses["total"] = losses["total"] + _zero_touch(self)
        return losses


def _zero_touch(module: nn.Module) -> torch.Tensor | float:
    """0 x the trainable parameters FSDP has gathered for this forward (the root's). A rank whose batch
    skipped the mask decoder (all negatives) then still hands FSDP a zero gradient for it, as DDP's
    find_unused_parameters does: FSDP2's reduce-scatter needs the same gradients on every rank."""
    from torch.distributed.tensor import DTensor

    sums = [p.sum().float() for p in module.parameters() if p.requires_grad and not isinstance(p, DTensor)]
    return 0.0 * torch.stack(sums).sum() if sums else 0.0


@torch.no_grad()
def predict_masks(model: RCMed, pixels: torch.Tensor, samples: list[EncodedSample],
                  features: ImageFeatures | None = None) -> list[torch.Tensor]:
    """Teacher-forced mask logits (T_b, S, S) per sample, with the [SEG] state that training uses."""
    from .step import collate

    ids, attn, _ = collate(samples, model.tokenizer.pad_id)
    with cached_encoder(model, features):
        _, hidden, emb = model.forward_train(pixels, ids.to(model.device), attn.to(model.device),
                                             with_logits=False)
    n_img, size, out = model.config.num_image_tokens, pixels.shape[-1], []
    for b in range(ids.shape[0]):
        seg = (ids[b] == model.seg_token_id).nonzero().flatten().to(hidden.device)
        low = model.decode_masks(emb[b:b + 1], model.text_hidden_fcs(hidden[b, seg - 1 + n_img - 1])[None])[0]
        out.append(F.interpolate(low[None].float(), size=(size, size), mode="bilinear", align_corners=False)[0])
    return out


# ------------------------------------------------------------------------------------------- the loop
def _dist_env() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return f


def make_optimizer(parameters, o: OptimConfig):
    """AdamW over the parameters that require grad (no decay on biases, norms and rows-only embeddings)
    and the released WarmupDecayLR schedule."""
    decay, no_decay = [], []
    for p in parameters:
        if p.requires_grad:
            # Rows-only embeddings must not decay: AdamW would shrink the frozen base rows too.
            (no_decay if hasattr(p, "_rcmed_row_mask") or p.ndim < 2 else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=o.lr, betas=o.betas)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o.warmup_steps, o.total_steps))


def param_digest(model: nn.Module) -> dict[str, str]:
    """SHA-256 per trainable parameter: equal across ranks iff they are in sync. Sharded parameters are
    gathered first (then every rank must call this)."""
    return {n: hashlib.sha256(full(p.detach()).cpu().float().contiguous().numpy().tobytes()).hexdigest()[:16]
            for n, p in model.named_parameters() if p.requires_grad}


def checkpoint_folder(folder: str | Path) -> Path:
    """A checkpoints/step-N folder as given, or a run folder's latest complete one (trainer_state.pt is
    written last)."""
    folder = Path(folder)
    if folder.name != "latest" and (folder / "trainer_state.pt").is_file():
        return folder
    found = [p for p in (folder / "checkpoints").glob("step-*") if (p / "trainer_state.pt").is_file()] \
        if (folder / "checkpoints").is_dir() else []
    if not found:
        raise FileNotFoundError(f"no checkpoint to resume from in {folder}")
    return max(found, key=lambda p: int(p.name.split("-")[1]))


class CheckpointMixin:
    """Saving and resuming a run: ``self`` has cfg (with model.train, run.save_dtype, to_dict()), model,
    trainable, optimizer, scheduler and step; under FSDP also ``sharded`` and ``rank``, and then every rank
    calls save and resume."""

    sharded: Sharded | None = None

    def save(self, folder: Path, final: bool = False) -> Path:
        include = tuple(SAVE_PREFIXES[p] for p in self.cfg.model.train if p in SAVE_PREFIXES)
        if final:
            self.model.config.trained = True
        dtype = SAVE_DTYPES[self.cfg.run.save_dtype] if final else torch.float32
        meta = {"trained": "true", "step": str(self.step), "parts": ",".join(self.cfg.model.train)}
        if self.sharded is not None:
            return self._save_sharded(folder, include, dtype, meta)
        save_checkpoint(self.model, folder, include=include, dtype=dtype, metadata=meta)
        state = {n: p.detach().cpu().contiguous() for n, p in self.model.named_parameters() if p.requires_grad}
        write_atomic(folder / "trainable.safetensors", lambda p: save_file(state, str(p)))
        write_atomic(folder / "trainer_state.pt", lambda p: torch.save(
            {"step": self.step, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
             "config": self.cfg.to_dict()}, p))
        (folder / "train_config.yaml").write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        return folder

    def _save_sharded(self, folder: Path, include: tuple[str, ...], dtype: torch.dtype, meta: dict) -> Path:
        """The gathered trained parts (rank 0 writes model.safetensors, what ``--weights`` reads), every
        rank's shards in sharded/, then trainer_state.pt (step and schedule), which marks it complete."""
        state = full_trained_state(self.model, include, dtype, keep=self.rank == 0)
        if self.rank == 0:
            save_checkpoint(self.model, folder, include=include, dtype=dtype, metadata=meta, state=state)
        save_sharded(folder / "sharded", self.sharded.module, self.optimizer)
        if self.rank == 0:
            write_atomic(folder / "trainer_state.pt", lambda p: torch.save(
                {"step": self.step, "scheduler": self.scheduler.state_dict(), "config": self.cfg.to_dict(),
                 "strategy": "fsdp"}, p))
            (folder / "train_config.yaml").write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        dist.barrier()
        return folder

    def resume(self, folder: str | Path) -> None:
        folder = checkpoint_folder(folder)
        # Optimizer and scheduler state are tensors and plain numbers: no pickled objects are accepted.
        ts = torch.load(folder / "trainer_state.pt", map_location="cpu", weights_only=True)
        if self.sharded is not None:
            if not (folder / "sharded").is_dir():
                raise ValueError(f"{folder} was written by a DDP run (no sharded/): resume it with run.strategy: ddp")
            load_sharded(folder / "sharded", self.sharded.module, self.optimizer)
        else:
            if not (folder / "trainable.safetensors").is_file():
                raise ValueError(f"{folder} was written by an FSDP run (sharded/): resume it under an FSDP launch")
            self._load_trainable(folder)
            self.optimizer.load_state_dict(ts["optimizer"])
        self.scheduler.load_state_dict(ts["scheduler"])
        self.step = int(ts["step"])

    def _load_trainable(self, folder: Path) -> None:
        state = load_file(str(folder / "trainable.safetensors"))
        params = dict(self.model.named_parameters())
        missing = [n for n in self.trainable if n not in state]
        if missing:
            raise ValueError(f"{folder} lacks trainable parameters {missing[:3]}… (was model.train changed?)")
        with torch.no_grad():
            for n in self.trainable:
                params[n].copy_(state[n].to(params[n]))


class Trainer(CheckpointMixin):
    def __init__(self, cfg: TrainConfig) -> None:
        # What this launch runs is settled before any work: one the loop cannot run fails here, in one line.
        cfg = dataclasses.replace(cfg, run=launch_settings(cfg.run))
        self.cfg = cfg
        self.rank, self.world = _dist_env()
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        self.device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available()
                                   else "cpu")
        fsdp = cfg.run.strategy == "fsdp"
        self.owns_process_group = (self.world > 1 or fsdp) and not dist.is_initialized()
        if self.owns_process_group:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.out = Path(cfg.run.out)
        self.model = build_training_model(cfg.model)
        if not fsdp:  # FSDP moves each group to the device as it shards it: no full copy per GPU
            self.model.to(self.device)
        self.trainable = set_trainable(self.model, cfg.model.train, cfg.model.lora_layers)
        self.model.train()
        self.module = LossModule(self.model, cfg.loss)
        self.ddp: nn.Module = self.module
        if fsdp:
            self.sharded = shard_loss_module(self.module, self.device, cfg.run.mixed_precision,
                                             cfg.run.activation_checkpointing)
        elif self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(self.module, find_unused_parameters=True,
                                               device_ids=[self.device.index] if self.device.type == "cuda" else None)
        # After sharding, which replaces the parameters the optimizer must hold.
        self.optimizer, self.scheduler = make_optimizer(self.model.parameters(), cfg.optim)
        self.feature_cache = None
        if cfg.model.cache_features:
            self.feature_cache = FeatureCache(cfg.model.feature_cache or self.out / "feature_cache", self.model)
        self._data()
        self.step = 0

    def _data(self) -> None:
        cfg, mc = self.cfg, self.model.config
        bgr = mc.prompt.channel_order == "bgr"
        self.describer = make_describer(cfg.data.describer, cfg.data.vlm_dir)
        samplers, self.val = [], []
        for root in cfg.data.roots():
            samplers.append(self._sampler(root, mc, bgr))
            if cfg.data.val_split:
                vdata = LabelledVolumes(root, cfg.data.val_split, tuple(cfg.data.axes))
                vs = TripletSampler(vdata, mc.image_encoder.image_size, mc.pixel_mean, mc.pixel_std, bgr)
                self.val += vs.validation(cfg.data.val_slices, cfg.run.seed)
        self.sampler = samplers[0] if len(samplers) == 1 else MultiSampler(samplers, cfg.data.foreign_fraction)

    def _sampler(self, root: str, mc, bgr: bool) -> TripletSampler:
        cfg = self.cfg
        data = LabelledVolumes(root, cfg.data.split, tuple(cfg.data.axes), cfg.data.limit_cases)
        cache = DescriptionCache(Path(root))

        def describe(ref: SliceRef, name: str, rgb: np.ndarray, mask: np.ndarray) -> str:
            e = data.entries[ref.case]
            return cache.get_or_make(self.describer, e.case_id, ref.axis, ref.index, name, rgb, mask,
                                     data.modality_text)

        return TripletSampler(data, mc.image_encoder.image_size, mc.pixel_mean, mc.pixel_std, bgr,
                              cfg.data.mix, cfg.data.negative_fraction, mc.prompt.question_index, describe)

    # ------------------------------------------------------------------------------------ data per step
    def _batch(self, step: int, micro: int) -> tuple[torch.Tensor, list[EncodedSample], list[torch.Tensor], ImageFeatures | None]:
        o = self.cfg.optim
        base = ((step * o.grad_accum + micro) * self.world + self.rank) * o.batch_size
        samples = [self.sampler.draw(self.cfg.run.seed, base + i) for i in range(o.batch_size)]
        return self._tensors(samples)

    def _tensors(self, samples: list[Sample]):
        pixels = torch.stack([s.pixels for s in samples]).to(self.device)
        enc = [encode_qa(self.model, s.question, s.answer) for s in samples]
        masks = [s.masks for s in samples]
        feats = self.feature_cache.features(pixels) if self.feature_cache else None
        return pixels, enc, masks, feats

    # ---------------------------------------------------------------------------------------- one step
    def train_step(self) -> dict[str, float]:
        o = self.cfg.optim
        torch.manual_seed(self.cfg.run.seed * 1_000_003 + self.step * 997 + self.rank)  # dropout: resumable
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for micro in range(o.grad_accum):
            pixels, enc, masks, feats = self._batch(self.step, micro)
            last = micro == o.grad_accum - 1
            ctx = contextlib.nullcontext()
            if self.sharded is not None:
                self.sharded.grad_sync(last)  # reduce-scatter once, after the last micro-batch
            elif self.world > 1 and not last:
                ctx = self.ddp.no_sync()
            with ctx:
                losses = self.ddp(pixels, enc, masks, feats)
                (losses["total"] / o.grad_accum).backward()
            for k, v in losses.items():
                totals[k] = totals.get(k, 0.0) + float(v.detach()) / o.grad_accum
        if self.sharded is not None:
            self.sharded.mask_rows()
        params = [p for p in self.model.parameters() if p.requires_grad]
        if o.grad_clip:  # over sharded gradients the norm is a DTensor: its full value is the global norm
            totals["grad_norm"] = float(full(torch.nn.utils.clip_grad_norm_(params, o.grad_clip)))
        totals["lr"] = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return totals

    @torch.no_grad()
    def validate(self) -> float:
        """Mean Dice of the teacher-forced masks over the validation slices (within the unpadded area).
        Under FSDP every rank runs it (each forward gathers parameters from all)."""
        if not self.val:
            return float("nan")
        self.model.eval()
        scores = []
        try:
            for i in range(0, len(self.val), max(1, self.cfg.optim.batch_size)):
                chunk = self.val[i:i + self.cfg.optim.batch_size]
                pixels, enc, masks, feats = self._tensors(chunk)
                for logit, truth in zip(self.module(pixels, enc, None, feats), masks):
                    for lg, t in zip(logit, truth.to(logit.device)):
                        p, g = lg > 0, t > 0.5
                        denom = int(p.sum() + g.sum())
                        scores.append(1.0 if denom == 0 else 2.0 * int((p & g).sum()) / denom)
        finally:
            self.model.train()
        return float(np.mean(scores))

    # --------------------------------------------------------------------------------------------- fit
    def log(self, record: dict) -> None:
        if self.rank == 0:
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def fit(self, stop_after: int | None = None) -> dict:
        from tqdm import tqdm

        r = self.cfg.run
        total = self.cfg.optim.total_steps
        end = total if stop_after is None else min(total, self.step + stop_after)
        self.out.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            (self.out / "train_config.yaml").write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        bar = tqdm(total=end, initial=self.step, disable=self.rank != 0, desc="train", unit="step")
        samples_per_step = self.cfg.optim.batch_size * self.cfg.optim.grad_accum * self.world
        last: dict = {}
        while self.step < end:
            t0 = time.perf_counter()
            m = self.train_step()
            dt = time.perf_counter() - t0
            last = {"step": self.step, **{k: round(v, 6) for k, v in m.items()},
                    "samples_per_s": round(samples_per_step / dt, 3), "seconds": round(dt, 3)}
            if self.step % r.log_every == 0 or self.step == end:
                self.log(last)
            bar.update(1)
            bar.set_postfix(loss=f"{m['total']:.3f}")
            every_rank = self.rank == 0 or self.sharded is not None  # sharded: collectives, every rank takes part
            if r.val_every and (self.step % r.val_every == 0 or self.step == end) and every_rank and self.val:
                d = self.validate()
                self.log({"step": self.step, "val_dice": round(d, 6)})
            if every_rank and r.save_every and (self.step % r.save_every == 0 or self.step == end):
                self.save(self.out / "checkpoints" / f"step-{self.step}")
        bar.close()
        if (self.rank == 0 or self.sharded is not None) and self.step >= total:
            self.save(self.out / "final", final=True)
        if self.rank == 0:
            plot_curves(self.out / "log.jsonl", self.out / "curves.png")
        digest = param_digest(self.model)
        (self.out / f"params_rank{self.rank}.json").write_text(json.dumps({"step": self.step, "digest": digest}))
        if dist.is_initialized():
            dist.barrier()
        return last


def plot_curves(log: Path, png: Path) -> None:
    """Training loss and validation Dice against step, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(l) for l in log.read_text().splitlines() if l.strip()] if log.is_file() else []
    tr = [(r["step"], r["total"]) for r in rows if "total" in r]
    va = [(r["step"], r["val_dice"]) for r in rows if "val_dice" in r and not math.isnan(r["val_dice"])]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    if tr:
        ax[0].plot(*zip(*tr), lw=1)
    ax[0].set(title="training loss (total)", xlabel="step")
    if va:
        ax[1].plot(*zip(*va), marker="o")
        ax[1].set(title="validation Dice (teacher-forced)", xlabel="step", ylim=(0, 1))
    else:  # fit-synth: every step's slices are new draws, so its own figures are out-of-sample
        drawn = False
        for key, label in (("dice_hard", "mask Dice (present targets)"), ("presence_acc", "presence accuracy")):
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax[1].plot(*zip(*pts), lw=1, label=label)
                drawn = True
        if drawn:
            ax[1].legend(loc="lower right", fontsize=8)
        ax[1].set(title="on each step's new slices", xlabel="step", ylim=(0, 1))
    fig.tight_layout()
    tmp = png.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, png)


def _apply_overrides(cfg: TrainConfig, overrides: dict) -> TrainConfig:
    d = cfg.to_dict()
    for dotted, value in overrides.items():
        sec, key = dotted.split(".", 1)
        if sec not in d:
            raise ValueError(f"unknown config section in --set {dotted}")
        d[sec][key] = value
    return TrainConfig.from_dict(d)


def fit(config: str | Path | TrainConfig, resume: str | None = None, stop_after: int | None = None,
        overrides: dict | None = None) -> dict:
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.load(config)
    if overrides:
        cfg = _apply_overrides(cfg, overrides)
    trainer = Trainer(cfg)
    if resume:
        trainer.resume(resume)
    try:
        return trainer.fit(stop_after)
    finally:
        if trainer.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
