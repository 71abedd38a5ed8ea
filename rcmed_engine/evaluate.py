"""Evaluation on an nnU-Net v2 raw data set (dataset.json, imagesTs/labelsTs), DESIGN.md's JSON contract."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .io import read_image


class DatasetError(ValueError):
    """A data set folder that is not in the nnU-Net v2 raw layout."""


@dataclass
class Case:
    case_id: str
    image: Path
    label: Path


@dataclass
class Dataset:
    root: Path
    classes: dict[str, int]  # foreground name -> label value
    modality: str
    file_ending: str

    def cases(self, split: str = "Ts") -> list[Case]:
        images, labels = self.root / f"images{split}", self.root / f"labels{split}"
        if not images.is_dir() or not labels.is_dir():
            raise DatasetError(f"{self.root} has no images{split}/labels{split} folders")
        out = []
        for label in sorted(labels.glob(f"*{self.file_ending}")):
            case_id = label.name[: -len(self.file_ending)]
            image = images / f"{case_id}_0000{self.file_ending}"
            if not image.is_file():
                raise DatasetError(f"case {case_id} has a label but no image {image.name}")
            out.append(Case(case_id, image, label))
        if not out:
            raise DatasetError(f"no cases in {labels} (files ending {self.file_ending})")
        return out


def read_dataset(root: str | Path) -> Dataset:
    root = Path(root)
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise DatasetError(f"no dataset.json in {root}: not an nnU-Net v2 raw data set")
    try:
        meta = json.loads(meta_path.read_text())
        labels = meta["labels"]
        modality = meta["channel_names"]["0"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DatasetError(f"{meta_path} lacks 'labels' or 'channel_names' ({exc})") from None
    classes = {}
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):  # nnU-Net region labels: take the first value
            value = value[0]
        if int(value) != 0:
            classes[name] = int(value)
    if not classes:
        raise DatasetError(f"{meta_path} names no foreground class")
    return Dataset(root, classes, str(modality), meta.get("file_ending", ".nii.gz"))


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean arrays; 1.0 when both are empty."""
    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    denom = int(p.sum()) + int(t.sum())
    return 1.0 if denom == 0 else 2.0 * int(np.logical_and(p, t).sum()) / denom


def slices_along(path: str | Path, axis: str) -> int:
    """How many slices the engine cuts from an image along ``axis``, from its header alone."""
    import SimpleITK as sitk

    from .geometry import Geometry, slice_frame

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    shape_zyx = (tuple(reader.GetSize()) + (1,))[:3][::-1] if reader.GetDimension() == 2 else tuple(reader.GetSize())[::-1]
    frame = slice_frame(Geometry.from_sitk(reader), axis, shape_zyx)
    return int(shape_zyx[frame.slice_axis])


def evaluate_dataset(engine, root: str | Path, split: str = "Ts", axis: str = "axial", limit: int | None = None,
                     progress: Callable[[int, int], None] | None = None) -> dict:
    """Prompt every foreground class by its name on every case; Dice per case and class."""
    ds = read_dataset(root)
    cases = ds.cases(split)[:limit]
    started = time.perf_counter()
    rows = []
    names = list(ds.classes)
    counts = [slices_along(case.image, axis) for case in cases]  # progress counts slices, not cases
    total, done = sum(counts), 0

    def case_progress(k: int, n: int) -> None:
        if progress:
            progress(done + k, total)

    for n, case in enumerate(cases):
        image = read_image(case.image)
        truth = read_image(case.label).array
        if truth.shape != image.array.shape[:3]:
            raise DatasetError(f"case {case.case_id}: label shape {truth.shape} != image shape {image.array.shape}")
        t0 = time.perf_counter()
        results = engine.segment_many(image, names, modality=ds.modality, axis=axis, progress=case_progress)
        seconds = (time.perf_counter() - t0) / len(names)
        for name, result in zip(names, results):
            rows.append({"case": case.case_id, "class": name,
                         "dice": round(dice(result.labels == 1, truth == ds.classes[name]), 6),
                         "seconds": round(seconds, 4)})
        done += counts[n]
        if progress:
            progress(done, total)
    classes = {}
    for name in names:
        scores = [r["dice"] for r in rows if r["class"] == name]
        classes[name] = {"dice": round(float(np.mean(scores)), 6), "cases": len(scores)}
    return {
        "mean_dice": round(float(np.mean([c["dice"] for c in classes.values()])), 6),
        "classes": classes,
        "cases": rows,
        "seconds": round(time.perf_counter() - started, 3),
        "preset": engine.preset,
    }
