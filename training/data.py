"""nnU-Net v2 raw data sets as RCMed training triplets (image slice, mask, description).

Slices are cut exactly as the engine cuts them at inference (``Volume.slice_frame`` + ``to_slices``, the
whole-volume ``intensity_window``, ``plan_resize`` with the frame's pixel spacing, ``prepare_slices``);
masks go through the same plan with nearest-neighbour resizing into the same padded square.

Prompt formats follow SYRE_SPEC §5: seg-all-crd 0.4, seg-all 0.4, seg-subset 0.2. A fraction of samples
(``negative_fraction``) asks for a class that is absent from the slice, with the answer "… does not
contain <p> X </p>.", so the model learns to say no (the engine reads presence from that word).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch

from rcmed_engine.evaluate import Case, read_dataset
from rcmed_engine.geometry import SliceFrame, Volume, to_slices
from rcmed_engine.io import read_image
from rcmed_engine.preprocess import (MODALITY_TEXT, IntensityWindow, SliceTransform, canonical_modality,
                                     intensity_window, plan_resize, prepare_slices, to_uint8_rgb)
from rcmed_engine.prompts import build_answer, build_question

FORMATS = ("seg_all_crd", "seg_all", "seg_subset")
DEFAULT_MIX = {"seg_all_crd": 0.4, "seg_all": 0.4, "seg_subset": 0.2}

# The released CRD format draws its question from GCG_QUESTIONS, whose text SYRE_SPEC does not give; these
# are the project's own wording, in the same spirit (segment, then describe).
CRD_QUESTIONS = (
    "Can you segment the {class_name} in this {modality} image and describe where it is?",
    "Please segment {class_name} in this {modality} image and describe its shape, location and size.",
    "Segment the {class_name} in this {modality} image and explain what the mask covers.",
)


@dataclass
class VolumeEntry:
    case_id: str
    volume: Volume
    labels: np.ndarray  # (z, y, x) integer labels, same grid as the image
    window: IntensityWindow | None


@dataclass
class SliceRef:
    case: int  # index into LabelledVolumes.entries
    axis: str
    index: int
    present: tuple[str, ...]  # class names with at least one pixel on this slice


@dataclass
class Sample:
    """One training triplet plus what the step needs."""

    pixels: torch.Tensor  # (3, S, S) normalised and padded, as the encoder takes it
    masks: torch.Tensor  # (T, S, S) float, one per [SEG] of the answer; T = 0 for a negative
    question: str
    answer: str
    targets: list[str]
    present: bool
    fmt: str
    ref: SliceRef
    slice_hw: tuple[int, int] = (0, 0)
    descriptions: dict[str, str] = field(default_factory=dict)


class LabelledVolumes:
    """The cases of one split of an nnU-Net v2 raw data set, indexed by slice along the chosen planes."""

    def __init__(self, root: str | Path, split: str = "Tr", axes: tuple[str, ...] = ("axial",),
                 limit: int | None = None) -> None:
        self.root = Path(root)
        self.dataset = read_dataset(self.root)
        self.split = split
        self.axes = tuple(axes)
        self.modality = canonical_modality(self.dataset.modality)
        self.modality_text = MODALITY_TEXT[self.modality]
        self.classes = dict(self.dataset.classes)
        cases: list[Case] = self.dataset.cases(split)[:limit]
        self.entries: list[VolumeEntry] = []
        self.slices: list[SliceRef] = []
        for case in cases:
            vol = read_image(case.image)
            lab = read_image(case.label).array
            if lab.ndim == 4:
                lab = lab[..., 0]
            if lab.shape != vol.shape_zyx:
                raise ValueError(f"{case.case_id}: label shape {lab.shape} differs from image {vol.shape_zyx}")
            entry = VolumeEntry(case.case_id, vol, lab.astype(np.int32), intensity_window(vol.array, self.modality))
            self.entries.append(entry)
            ci = len(self.entries) - 1
            seen_single = False
            for axis in self.axes:
                frame = vol.slice_frame(axis)
                if frame.single_slice:  # a 2D image has one plane only: index it once
                    if seen_single:
                        continue
                    seen_single = True
                stack = to_slices(entry.labels, frame)
                for k in range(stack.shape[0]):
                    values = np.unique(stack[k])
                    present = tuple(n for n, v in self.classes.items() if v in values)
                    self.slices.append(SliceRef(ci, axis, k, present))

    def __len__(self) -> int:
        return len(self.slices)

    def frame(self, ref: SliceRef) -> SliceFrame:
        return self.entries[ref.case].volume.slice_frame(ref.axis)

    def slice_arrays(self, ref: SliceRef) -> tuple[np.ndarray, np.ndarray, SliceFrame]:
        """(image slice as stored dtype, label slice, frame) in the engine's display orientation."""
        e = self.entries[ref.case]
        frame = e.volume.slice_frame(ref.axis)
        img = np.ascontiguousarray(to_slices(e.volume.array, frame)[ref.index])
        lab = np.ascontiguousarray(to_slices(e.labels, frame)[ref.index])
        return img, lab, frame

    def slice_rgb(self, ref: SliceRef) -> np.ndarray:
        img, _, _ = self.slice_arrays(ref)
        return to_uint8_rgb(img[None], self.entries[ref.case].window)[0]

    def prepare(self, ref: SliceRef, image_size: int, pixel_mean, pixel_std, bgr: bool, dihedral: int = 0
                ) -> tuple[torch.Tensor, np.ndarray, SliceTransform, np.ndarray]:
        """Encoder input (3, S, S), the label slice, the plan and the 8-bit RGB slice.

        dihedral: 0-7, the slice and its labels rotated by 90° x (k % 4), then mirrored when k >= 4
        (an augmentation; 0 is the slice as the engine cuts it)."""
        img, lab, frame = self.slice_arrays(ref)
        spacing = frame.pixel_spacing
        if dihedral:
            img, lab = _dihedral(img, dihedral), _dihedral(lab, dihedral)
            spacing = spacing if dihedral % 2 == 0 else spacing[::-1]
        rgb = to_uint8_rgb(img[None], self.entries[ref.case].window)
        plan = plan_resize(img.shape[:2], image_size, spacing)
        pixels = prepare_slices(rgb, plan, pixel_mean, pixel_std, bgr=bgr)[0]
        return pixels, lab, plan, rgb[0]


def _dihedral(array: np.ndarray, k: int) -> np.ndarray:
    out = np.rot90(array, k % 4, axes=(0, 1))
    return np.ascontiguousarray(out[:, ::-1] if k >= 4 else out)


def mask_to_frame(mask: np.ndarray, plan: SliceTransform) -> np.ndarray:
    """A (H, W) mask in the encoder's padded (S, S) frame: nearest-neighbour resize, top-left, zero pad."""
    S = plan.image_size
    h, w = plan.resized_hw
    out = np.zeros((S, S), np.float32)
    m = np.ascontiguousarray(mask.astype(np.uint8))
    if (h, w) != m.shape:
        m = cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST)
    out[:h, :w] = m
    return out


def crd_answer(targets: list[str], modality_text: str, descriptions: dict[str, str]) -> str:
    """The positive answer followed by one sentence of region description per target."""
    extra = " ".join(f"The {t.replace('_', ' ')} is {descriptions[t]}." for t in targets if descriptions.get(t))
    base = build_answer(targets, modality_text, present=True)
    return f"{base} {extra}" if extra else base


class TripletSampler:
    """Draws training samples from a ``LabelledVolumes``: deterministic given (seed, draw number)."""

    def __init__(self, data: LabelledVolumes, image_size: int, pixel_mean, pixel_std, bgr: bool = False,
                 mix: dict[str, float] | None = None, negative_fraction: float = 0.25, question_index: int = 0,
                 describe: Callable[[SliceRef, str, np.ndarray, np.ndarray], str] | None = None) -> None:
        self.data = data
        self.image_size, self.pixel_mean, self.pixel_std, self.bgr = image_size, pixel_mean, pixel_std, bgr
        self.mix = dict(mix or DEFAULT_MIX)
        unknown = set(self.mix) - set(FORMATS)
        if unknown:
            raise ValueError(f"unknown prompt formats {sorted(unknown)}; use {FORMATS}")
        self.negative_fraction = float(negative_fraction)
        self.question_index = question_index
        self.describe = describe
        self.positive = [r for r in data.slices if r.present]
        self.negative = [r for r in data.slices if len(r.present) < len(data.classes)]
        if not self.positive:
            raise ValueError(f"{data.root} split {data.split}: no slice contains any class")

    def choose(self, rng: random.Random) -> tuple[SliceRef, str, list[str], bool]:
        if self.negative and rng.random() < self.negative_fraction:
            ref = rng.choice(self.negative)
            absent = [c for c in self.data.classes if c not in ref.present]
            return ref, "seg_all", [rng.choice(absent)], False
        ref = rng.choice(self.positive)
        names, weights = zip(*self.mix.items())
        fmt = rng.choices(names, weights=weights)[0]
        if fmt == "seg_all_crd" and self.describe is None:
            fmt = "seg_all"
        targets = list(ref.present)
        if fmt == "seg_subset" and len(targets) > 1:
            targets = rng.sample(targets, rng.randint(1, len(targets) - 1))
            targets.sort(key=list(ref.present).index)
        return ref, fmt, targets, True

    def build(self, ref: SliceRef, fmt: str, targets: list[str], present: bool, rng: random.Random) -> Sample:
        pixels, lab, plan, rgb = self.data.prepare(ref, self.image_size, self.pixel_mean, self.pixel_std, self.bgr)
        mt = self.data.modality_text
        masks = []
        if present:
            masks = [torch.from_numpy(mask_to_frame(lab == self.data.classes[t], plan)) for t in targets]
        descriptions: dict[str, str] = {}
        if fmt == "seg_all_crd":
            for t in targets:
                descriptions[t] = self.describe(ref, t, rgb, lab == self.data.classes[t])
            question = rng.choice(CRD_QUESTIONS).format(class_name=", ".join(targets).replace("_", " ").lower(),
                                                        modality=mt)
            answer = crd_answer(targets, mt, descriptions)
        else:
            question = build_question(targets, mt, self.question_index)
            answer = build_answer(targets, mt, present)
        m = torch.stack(masks) if masks else torch.zeros((0, self.image_size, self.image_size))
        return Sample(pixels, m, question, answer, targets, present, fmt, ref, tuple(lab.shape), descriptions)

    def draw(self, seed: int, number: int) -> Sample:
        rng = random.Random(f"{seed}:{number}")
        return self.build(*self.choose(rng), rng)

    def validation(self, limit: int, seed: int = 0) -> list[Sample]:
        """Fixed positive seg-all samples (validation uses seg-all, SYRE_SPEC §5)."""
        rng = random.Random(f"val:{seed}")
        refs = self.positive if len(self.positive) <= limit else rng.sample(self.positive, limit)
        return [self.build(r, "seg_all", list(r.present), True, rng) for r in refs]
