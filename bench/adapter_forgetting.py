"""Adapters against forgetting (a script, never a test): a class learnt as an adapter, beside plain fine-tuning
of the same layers on that class alone.

    python bench/adapter_forgetting.py --new DATASET --old DATASET [--old DATASET ...] [--preset lite]
        [--base-weights DIR] [--steps 200] [--train PARTS] [--lora-layers N] [--reuse]
        [--out bench/results/adapter_forgetting.json]

``--new``: an nnU-Net v2 raw data set of the class to learn (its Tr split trains, its Ts split measures);
``--old``: data sets of classes the base already knows (Ts splits only). For the issue's figure, ``--base-weights``
is a `lite` run of the base recipe with one built-in class held out of `data.root` (`rcmed-train fit`
with that data set removed) and ``--new`` is that class's data set; with the shipped weights as the base
the "new" class is not new, and the figure only shows the no-forgetting half.

Three models answer the same Ts cases, each class asked alone (axial, Dice over each whole volume,
averaged per class): the base; the base with the adapter (`rcmed-train fit --adapter`); the base
fine-tuned on the new class with the same layers trainable and merged (`rcmed-train fit`). Target: the
new class +0.3 or more with the adapter, old classes unchanged with it (bit-identical masks), and lower
old-class Dice after plain fine-tuning (the forgetting). The old classes' label arrays of the base and of
the base with the adapter are compared case by case (``identical``). Writes the JSON to --out and prints a
table. At `lite` size on a CPU use ``--train text_hidden_fcs,lv_projection,lora,mask_decoder --lora-layers 6``
(the recipe's parts plus the mask decoder): with ``rcmed`` the V-L projection trains and the backward pass
runs through every layer of the language model. Both runs cache the frozen encoder's features in one folder.
``--reuse`` skips a training run whose output is already in --work (to redo only the measuring).
``--presence-threshold 0`` measures as the shipped lite config does (masks never gated by presence).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
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


def dice_per_class(engine: Engine, roots: list[Path]) -> tuple[dict[str, float], dict[str, list[np.ndarray]]]:
    """Mean Dice per class and the label arrays it came from (per class, one per Ts case). Each class is
    its own prompt; segment_many only shares the encoder and prefix work of a slice between them."""
    scores: dict[str, list[float]] = {}
    masks: dict[str, list[np.ndarray]] = {}
    for root in roots:
        names = classes(root)
        for img, lab, modality in test_cases(root):
            for (name, value), res in zip(names.items(), engine.segment_many(img, list(names), modality=modality)):
                pred = res.labels > 0
                truth = lab == value
                masks.setdefault(name, []).append(res.labels)
                scores.setdefault(name, []).append(float(2 * (pred & truth).sum() / max(1, pred.sum() + truth.sum())))
    return {k: round(float(np.mean(v)), 4) for k, v in scores.items()}, masks


def run_config(args: argparse.Namespace, out: Path) -> TrainConfig:
    return TrainConfig.from_dict({
        "data": {"root": str(args.new), "axes": ["axial"], "val_split": None},
        "model": {"preset": args.preset, "init_weights": args.base_weights, "train": args.train.split(","),
                  "lora_dropout": False, "lora_layers": args.lora_layers,
                  # Frozen encoder: encode each slice once, shared by both runs (keyed by the encoder's weights).
                  "cache_features": "image_encoder" not in args.train.split(","),
                  "feature_cache": str(args.work / "feature_cache")},
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
    ap.add_argument("--lora-layers", type=int, default=None, help="train only the last N layers' LoRA (both runs)")
    ap.add_argument("--reuse", action="store_true", help="keep a finished adapter/plain run found in --work")
    ap.add_argument("--presence-threshold", type=float, default=None,
                    help="override the presence gate of all three models (0, as the shipped lite config: never gated)")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "adapter_forgetting")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "adapter_forgetting.json")
    args = ap.parse_args(argv)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    adapter = args.work / "adapter_run" / "adapter"
    if not (args.reuse and (adapter / "adapter_model.safetensors").is_file()):
        adapter = fit_adapter(run_config(args, args.work / "adapter_run"), "new-class")
    seconds["adapter_run"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    if not (args.reuse and (args.work / "plain_run" / "final" / "model.safetensors").is_file()):
        fit(run_config(args, args.work / "plain_run"))  # the same layers, merged: what forgets
    seconds["plain_run"] = round(time.perf_counter() - t0, 1)
    base = Engine.from_preset(args.preset, weights=args.base_weights, device="cpu")
    with_adapter = Engine.from_preset(args.preset, weights=args.base_weights, device="cpu")
    with_adapter.load_adapter(str(adapter))
    plain = Engine.from_preset(args.preset, weights=str(args.work / "plain_run" / "final"), device="cpu")
    if args.presence_threshold is not None:
        for engine in (base, with_adapter, plain):
            engine.model.config.presence_threshold = args.presence_threshold
    roots = [args.new, *args.old]
    rows, masks = {}, {}
    for name, engine in (("base", base), ("adapter", with_adapter), ("plain", plain)):
        t0 = time.perf_counter()
        rows[name], masks[name] = dice_per_class(engine, roots)
        seconds[f"measure_{name}"] = round(time.perf_counter() - t0, 1)
    new = set(classes(args.new))
    # The promise: an old class's masks with the adapter loaded are the base model's, bit for bit.
    identical = {name: {other: all(np.array_equal(a, b) for a, b in zip(masks["base"][name], masks[other][name]))
                        for other in ("adapter", "plain")} for name in rows["base"]}
    result = {"preset": args.preset, "base_weights": args.base_weights, "steps": args.steps, "train": args.train,
              "lora_layers": args.lora_layers, "lr": args.lr,
              "presence_threshold": base.model.config.presence_threshold, "new_classes": sorted(new), "dice": rows,
              "identical_to_base": identical, "seconds": seconds}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'class':24s} {'base':>7s} {'adapter':>8s} {'plain FT':>9s}  masks = base (adapter / plain FT)")
    for name in rows["base"]:
        tag = " (new)" if name in new else ""
        same = "  ".join("yes" if identical[name][o] else "no" for o in ("adapter", "plain"))
        print(f"{name + tag:24s} {rows['base'][name]:7.3f} {rows['adapter'][name]:8.3f} {rows['plain'][name]:9.3f}  {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
