"""Adapters against forgetting (a script, never a test): a class learnt as an adapter, beside plain fine-tuning
of the same layers on that class alone.

    python bench/adapter_forgetting.py --new DATASET --old DATASET [--old DATASET ...] [--preset lite]
        [--base-weights DIR] [--steps 200] [--out bench/results/adapter_forgetting.json]

``--new``: an nnU-Net v2 raw data set of the class to learn (its Tr split trains, its Ts split measures);
``--old``: data sets of classes the base already knows (Ts splits only). For the issue's figure, ``--base-weights``
is a `lite` run of the base recipe with one built-in class held out of `data.root` (`rcmed-train fit`
with that data set removed) and ``--new`` is that class's data set; with the shipped weights as the base
the "new" class is not new, and the figure only shows the no-forgetting half.

Three models answer the same Ts cases, each class asked alone (axial, Dice over each whole volume,
averaged per class): the base; the base with the adapter (`rcmed-train fit --adapter`); the base
fine-tuned on the new class with the same layers trainable and merged (`rcmed-train fit`). Target: the
new class +0.3 or more with the adapter, old classes unchanged with it (bit-identical masks), and lower
old-class Dice after plain fine-tuning (the forgetting). Writes the JSON to --out and prints a table.
Not run in this repository's sessions (a lite run is tens of CPU minutes); `--preset tiny` runs in seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rcmed_engine.engine import Engine  # noqa: E402
from rcmed_training.adapter import fit_adapter  # noqa: E402
from rcmed_training.trainer import TrainConfig, fit  # noqa: E402


def test_cases(root: Path) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """(image, labels, modality) of a data set's Ts split, first channel."""
    meta = json.loads((root / "dataset.json").read_text())
    modality = str(next(iter(meta["channel_names"].values())))
    out = []
    for lab in sorted((root / "labelsTs").glob(f"*{meta['file_ending']}")):
        case = lab.name[: -len(meta["file_ending"])]
        img = root / "imagesTs" / f"{case}_0000{meta['file_ending']}"
        out.append((sitk.GetArrayFromImage(sitk.ReadImage(str(img))), sitk.GetArrayFromImage(sitk.ReadImage(str(lab))),
                    modality))
    return out


def classes(root: Path) -> dict[str, int]:
    labels = json.loads((root / "dataset.json").read_text())["labels"]
    return {k: int(v) for k, v in labels.items() if k != "background" and isinstance(v, int)}


def dice_per_class(engine: Engine, roots: list[Path]) -> dict[str, float]:
    scores: dict[str, list[float]] = {}
    for root in roots:
        cases = test_cases(root)
        for name, value in classes(root).items():
            for img, lab, modality in cases:
                pred = engine.segment(img, name, modality=modality).labels > 0
                truth = lab == value
                scores.setdefault(name, []).append(float(2 * (pred & truth).sum() / max(1, pred.sum() + truth.sum())))
    return {k: round(float(np.mean(v)), 4) for k, v in scores.items()}


def run_config(args: argparse.Namespace, out: Path) -> TrainConfig:
    return TrainConfig.from_dict({
        "data": {"root": str(args.new), "axes": ["axial"], "val_split": None},
        "model": {"preset": args.preset, "init_weights": args.base_weights, "train": args.train.split(","),
                  "lora_dropout": False},
        "optim": {"lr": args.lr, "batch_size": 2, "warmup_steps": max(1, args.steps // 20), "total_steps": args.steps},
        "run": {"out": str(out), "val_every": 0, "save_every": 0}})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new", type=Path, required=True)
    ap.add_argument("--old", type=Path, action="append", default=[])
    ap.add_argument("--preset", default="lite")
    ap.add_argument("--base-weights", default=None)
    ap.add_argument("--train", default="rcmed,lora,mask_decoder")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "adapter_forgetting")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "adapter_forgetting.json")
    args = ap.parse_args(argv)
    adapter = fit_adapter(run_config(args, args.work / "adapter_run"), "new-class")
    fit(run_config(args, args.work / "plain_run"))  # the same layers, merged: what forgets
    base = Engine.from_preset(args.preset, weights=args.base_weights, device="cpu")
    with_adapter = Engine.from_preset(args.preset, weights=args.base_weights, device="cpu")
    with_adapter.load_adapter(str(adapter))
    plain = Engine.from_preset(args.preset, weights=str(args.work / "plain_run" / "final"), device="cpu")
    roots = [args.new, *args.old]
    rows = {name: dice_per_class(e, roots) for name, e in (("base", base), ("adapter", with_adapter), ("plain", plain))}
    new = set(classes(args.new))
    result = {"preset": args.preset, "base_weights": args.base_weights, "steps": args.steps, "train": args.train,
              "new_classes": sorted(new), "dice": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'class':24s} {'base':>7s} {'adapter':>8s} {'plain FT':>9s}")
    for name in rows["base"]:
        tag = " (new)" if name in new else ""
        print(f"{name + tag:24s} {rows['base'][name]:7.3f} {rows['adapter'][name]:8.3f} {rows['plain'][name]:9.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
