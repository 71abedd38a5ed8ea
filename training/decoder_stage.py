"""The mask-decoder stage: train SAM's mask decoder alone on cached image embeddings and [SEG] prompts.

After a full run (``rcmed-train fit``) everything upstream of the mask decoder is fixed, so each slice's
image embedding (neck + L-V term) and each class's [SEG] prompt can be computed once, exactly as the
engine computes them at inference (``RCMed.prefix`` and ``RCMed.suffix`` with the engine's own prompt
plan), and the decoder trained on them at a few milliseconds per mask instead of a language-model pass.
Two things come with it that the full run cannot afford on a CPU:

* many more mask updates per hour, so the decoder sees every training slice many times;
* **empty targets**: the prompt of a class that is absent from the slice, or that belongs to another
  data set ("cell nuclei" on a brain slice), is trained towards an empty mask, so the words matter in the
  mask itself and not only in the presence score.

2D images (a single slice) also enter in their 8 dihedral variants (rotations and flips), encoded anew.

    rcmed-train fit-decoder CONFIG.yaml      # the config's data/model/optim/loss/run sections
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rcmed_engine.evaluate import dice
from rcmed_engine.model.checkpoint import save_checkpoint
from rcmed_engine.model.rcmed import ImageFeatures

from .data import LabelledVolumes, mask_to_frame
from .features import FeatureCache
from .losses import boundary_bce, mask_bce, mask_dice
from .trainer import SAVE_DTYPES, TrainConfig, build_training_model, config_sections, make_optimizer, plot_curves


@dataclass
class DecoderSet:
    """Cached inputs of the mask decoder for N slices and C classes (the union over the data sets)."""

    embeddings: torch.Tensor  # (N, 256, E, E) float16
    prompts: torch.Tensor  # (N, C, 256) float32
    targets: torch.Tensor  # (N, C, S, S) bool; all False where the class is absent or foreign
    classes: list[str]
    asked: torch.Tensor | None = None  # (N, C) bool: the pairs to train on (None: all)
    states: torch.Tensor | None = None  # (N, C, D) float16 [SEG] states, to train text_hidden_fcs too

    def prompt(self, model, n_idx: torch.Tensor, c_idx: torch.Tensor) -> torch.Tensor:
        """(K, 256) prompts of the pairs; through the live text_hidden_fcs when states are cached."""
        if self.states is not None:
            return model.text_hidden_fcs(self.states[n_idx, c_idx].to(model.device, model.dtype))
        return self.prompts[n_idx, c_idx].to(model.device, model.dtype)

    def pairs(self) -> tuple[list[list[int]], list[list[int]]]:
        """(slice, class) pairs whose target is present, and those asked whose target is empty."""
        present = self.targets.flatten(2).any(-1)
        asked = self.asked if self.asked is not None else torch.ones_like(present)
        return (present & asked).nonzero().tolist(), (~present & asked).nonzero().tolist()

    def __len__(self) -> int:
        return self.embeddings.shape[0]


@torch.no_grad()
def build_decoder_set(model, roots: list[str], split: str, axes: tuple[str, ...], cache: FeatureCache | None,
                      stride: int = 1, dihedral_2d: bool = True, limit: int | None = None,
                      positives_only: bool = False, seed: int = 0, progress=None) -> DecoderSet:
    """Every (stride-th) slice of the split along ``axes`` (2D images in 8 variants), with the prompt of
    every class of every data set and its target in the padded square frame."""
    cfg = model.config
    size = cfg.image_encoder.image_size
    bgr = cfg.prompt.channel_order == "bgr"
    sets = [LabelledVolumes(r, split, axes) for r in roots]
    classes = sorted({c for d in sets for c in d.classes})
    items = []  # (data set, ref, dihedral k)
    for d in sets:
        for i, ref in enumerate(d.slices):
            if i % stride or (positives_only and not ref.present):
                continue
            single = d.entries[ref.case].volume.slice_frame(ref.axis).single_slice
            for k in (range(8) if single and dihedral_2d else (0,)):
                items.append((d, ref, k))
    if limit is not None and len(items) > limit:
        items = random.Random(seed).sample(items, limit)
    embeddings, prompts, targets = [], [], []
    plans: dict[tuple[str, str], object] = {}
    batch = 8
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        pixels, masks = [], []
        for d, ref, k in chunk:
            px, lab, plan, _ = d.prepare(ref, size, cfg.pixel_mean, cfg.pixel_std, bgr, dihedral=k)
            pixels.append(px)
            t = torch.zeros((len(classes), size, size), dtype=torch.bool)
            for ci, name in enumerate(classes):
                if name in d.classes:
                    t[ci] = torch.from_numpy(mask_to_frame(lab == d.classes[name], plan) > 0.5)
            masks.append(t)
        px = torch.stack(pixels).to(model.device, model.dtype)
        feats = cache.features(px) if cache is not None else model.encode_image(px)
        # one data set per chunk keeps the modality text shared; mixed chunks are split
        rows_emb, rows_prompt = [None] * len(chunk), [None] * len(chunk)
        for d in {id(c[0]): c[0] for c in chunk}.values():
            idx = [j for j, c in enumerate(chunk) if c[0] is d]
            prefix = model.prefix(ImageFeatures(feats.neck[idx], feats.pre_neck[idx]))
            per_class = []
            for name in classes:
                key = (name, d.modality_text)
                if key not in plans:
                    plans[key] = model.plan_prompt([name], d.modality_text)
                per_class.append(model.suffix(prefix, plans[key]).prompts[:, 0].float().cpu())
            stacked = torch.stack(per_class, dim=1)  # (b, C, 256)
            for n, j in enumerate(idx):
                rows_emb[j] = prefix.image_embedding[n].to(torch.float16).cpu()
                rows_prompt[j] = stacked[n]
        embeddings += rows_emb
        prompts += rows_prompt
        targets += masks
        if progress:
            progress(min(start + batch, len(items)), len(items))
    return DecoderSet(torch.stack(embeddings), torch.stack(prompts), torch.stack(targets), classes)


def fit_decoder(config: str | Path | TrainConfig, overrides: dict | None = None) -> dict:
    """Train the mask decoder on cached inputs; writes <out>/final (all parts, decoder included)."""
    from tqdm import tqdm

    from .trainer import _apply_overrides

    cfg = config if isinstance(config, TrainConfig) else TrainConfig.load(config)
    if overrides:
        cfg = _apply_overrides(cfg, overrides)
    torch.manual_seed(cfg.run.seed)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    out = Path(cfg.run.out)
    out.mkdir(parents=True, exist_ok=True)
    model = build_training_model(cfg.model).eval()
    model.requires_grad_(False)
    d = cfg.data
    cache = None if d.synth else FeatureCache(cfg.model.feature_cache or out / "feature_cache", model)
    t0 = time.perf_counter()
    bars: list = []  # made on the first report: a bad data set fails before any bar is drawn

    def progress(done, total):
        if not bars:
            bars.append(tqdm(total=total, desc="cache decoder inputs", unit="slice"))
        bars[0].n = done
        bars[0].refresh()

    if d.synth:
        train, val = _synth_sets(model, d.synth, cfg.run.seed, progress)
    else:
        train = build_decoder_set(model, d.roots(), d.split, tuple(d.axes), cache, stride=d.stride,
                                  dihedral_2d=d.dihedral_2d, progress=progress)
        val = None
        if d.val_split:
            val = build_decoder_set(model, d.roots(), d.val_split, tuple(d.axes), cache, limit=d.val_slices,
                                    positives_only=True, seed=cfg.run.seed)
    for bar in bars:
        bar.close()
    cache_s = time.perf_counter() - t0

    decoder = model.mask_decoder
    decoder.train().requires_grad_(True)
    params = list(decoder.parameters())
    # With cached [SEG] states the prompt head trains too (it costs one small MLP per mask).
    head = train.states is not None and "text_hidden_fcs" in cfg.model.train
    if head:
        model.text_hidden_fcs.train().requires_grad_(True)
        params += list(model.text_hidden_fcs.parameters())
    o = cfg.optim
    optimizer, scheduler = make_optimizer(params, o)
    pos, neg = train.pairs()
    rng = random.Random(cfg.run.seed)
    log = out / "log.jsonl"
    log.write_text("")
    w = cfg.loss
    last: dict = {}
    bar = tqdm(total=o.total_steps, desc="train decoder", unit="step")
    for step in range(1, o.total_steps + 1):
        ts = time.perf_counter()
        pairs = [rng.choice(neg) if neg and rng.random() < d.negative_fraction else rng.choice(pos)
                 for _ in range(o.batch_size)]
        n_idx = torch.tensor([p[0] for p in pairs])
        c_idx = torch.tensor([p[1] for p in pairs])
        emb = train.embeddings[n_idx].to(model.device, model.dtype)
        prompt = train.prompt(model, n_idx, c_idx)[:, None]
        target = train.targets[n_idx, c_idx].to(model.device).float()
        low = model.decode_masks(emb, prompt)[:, 0]
        logits = F.interpolate(low[:, None].float(), size=target.shape[-2:], mode="bilinear",
                               align_corners=False)[:, 0]
        has = target.flatten(1).any(1)
        losses = {"bce": mask_bce(logits, target)}
        if bool(has.any()):
            losses["dice"] = mask_dice(logits[has], target[has])
            losses["boundary"] = boundary_bce(logits[has], target[has])
        else:
            losses["dice"] = losses["boundary"] = logits.sum() * 0.0
        total = w.bce * losses["bce"] + w.dice * losses["dice"] + w.boundary * losses["boundary"]
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, o.grad_clip)) if o.grad_clip else float("nan")
        optimizer.step()
        scheduler.step()
        last = {"step": step, **{k: round(float(v.detach()), 6) for k, v in losses.items()},
                "total": round(float(total.detach()), 6),
                "grad_norm": round(grad_norm, 4), "lr": scheduler.get_last_lr()[0],
                "seconds": round(time.perf_counter() - ts, 3)}
        record = [last] if step % cfg.run.log_every == 0 else []
        if val is not None and cfg.run.val_every and (step % cfg.run.val_every == 0 or step == o.total_steps):
            record.append({"step": step, "val_dice": round(_validate(model, val), 6)})
        with open(log, "a") as f:
            for r in record:
                f.write(json.dumps(r) + "\n")
        bar.update(1)
        bar.set_postfix(loss=f"{float(total.detach()):.3f}")
    bar.close()
    decoder.eval()
    model.text_hidden_fcs.eval()
    model.config.trained = True
    if d.synth:
        from rcmed_engine.vocabulary import ALL_CLASSES

        model.config.vocabulary = tuple(ALL_CLASSES)
    save_checkpoint(model, out / "final", include=("mask_decoder.",), dtype=SAVE_DTYPES[cfg.run.save_dtype],
                    metadata={"trained": "true", "stage": "decoder", "steps": str(o.total_steps),
                              "init": str(cfg.model.init_weights)})
    plot_curves(log, out / "curves.png")
    summary = {**last, "train_slices": len(train), "cache_s": round(cache_s, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _synth_sets(model, synth: dict, seed: int, progress) -> tuple[DecoderSet, DecoderSet]:
    """Training and validation pools of synthetic slices. ``synth``: SynthData keys plus ``slices`` and
    ``val_slices``. The draws use seeds of their own, never fit-synth's (seed + 1000 and + 2000)."""
    from .synth_stage import SynthData, build_synth_decoder_set

    keys = dict(synth)
    slices, val_slices = int(keys.pop("slices", 400)), int(keys.pop("val_slices", 32))
    data = config_sections({"data": keys}, {"data": SynthData})["data"]
    train = build_synth_decoder_set(model, data, slices, seed + 1000, progress)
    val = build_synth_decoder_set(model, data, val_slices, seed + 2000)
    return train, val


@torch.no_grad()
def _validate(model, val: DecoderSet) -> float:
    """Mean Dice at logit 0 over the validation slices' present classes (their own prompts)."""
    head_mode = model.text_hidden_fcs.training
    model.mask_decoder.eval()
    model.text_hidden_fcs.eval()
    scores = []
    present = val.targets.flatten(2).any(-1)
    try:
        for n in range(len(val)):
            cs = present[n].nonzero().flatten()
            if cs.numel() == 0:
                continue
            emb = val.embeddings[n:n + 1].to(model.device, model.dtype).expand(len(cs), -1, -1, -1)
            low = model.decode_masks(emb, val.prompt(model, torch.full_like(cs, n), cs)[:, None])[:, 0]
            logits = F.interpolate(low[:, None].float(), size=val.targets.shape[-2:], mode="bilinear",
                                   align_corners=False)[:, 0]
            scores += [dice(p.numpy(), g.numpy()) for p, g in zip(logits.cpu() > 0, val.targets[n, cs])]
    finally:
        model.mask_decoder.train()
        model.text_hidden_fcs.train(head_mode)
    return float(np.mean(scores)) if scores else math.nan
