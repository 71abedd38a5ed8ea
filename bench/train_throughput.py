"""Training throughput: samples per second of one RCMed training step (a script, never a test).

CPU path (default): the ``lite`` preset with a frozen image encoder whose features come from the on-disk
cache, training the parts configs/lite.yaml trains (``--all-parts``: every RCMed part, all LoRA layers,
the added tokens and the mask decoder; ``--train``/``--lora-layers`` to choose), on slices of the MNI152
data set that ``rcmed-train prepare-builtin`` writes. The cache is filled for the timed steps first, so
the figure is the steady state of a run whose features are cached: language model + projections + mask
decoder, forward and backward, and the AdamW step.

Accelerator path (``--preset syre-7b --weights DIR`` on a CUDA machine): the same step on the released
architecture in bf16, encoder trainable as in the released run. No accelerator is lent to the session
that wrote this script, so that path has not been run; it records why it was skipped.

    python bench/train_throughput.py [--preset lite] [--batch 2] [--steps 4] [--warmup 1] [--all-parts]

Writes bench/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rcmed_training.builtin import prepare_mni  # noqa: E402
from rcmed_training.trainer import TrainConfig, Trainer  # noqa: E402
from report import write_report  # noqa: E402


def run(preset: str, weights: str | None, batch: int, steps: int, warmup: int, threads: int | None,
        parts: list[str] | None = None, lora_layers: int | None = None) -> dict:
    if preset == "syre-7b" and not torch.cuda.is_available():
        return {"preset": preset, "skipped": "no CUDA accelerator on this machine; the syre-7b training step "
                                             "(bf16, ZeRO-2 in the released run) needs one"}
    tmp = Path(tempfile.mkdtemp(prefix="rcmed_bench_"))
    try:
        return _measure(tmp, preset, weights, batch, steps, warmup, threads, parts, lora_layers)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _measure(tmp: Path, preset: str, weights: str | None, batch: int, steps: int, warmup: int,
             threads: int | None, parts: list[str] | None, lora_layers: int | None) -> dict:
    data = prepare_mni(tmp, gap=4, stride=2)
    cached = preset != "syre-7b"
    cfg = TrainConfig.from_dict({
        "data": {"root": str(data), "axes": ["axial", "coronal", "sagittal"], "val_split": None},
        "model": {"preset": preset, "init_weights": weights, "cache_features": cached, "lora_layers": lora_layers,
                  "train": parts or (["rcmed", "lora", "added_tokens", "mask_decoder"]
                                     + ([] if cached else ["image_encoder"]))},
        "optim": {"batch_size": batch, "total_steps": 10_000, "warmup_steps": 10},
        "run": {"out": str(tmp / "run"), "save_every": 0, "val_every": 0, "threads": threads},
    })
    t0 = time.perf_counter()
    tr = Trainer(cfg)
    build_s = time.perf_counter() - t0
    if cached:  # fill the feature cache for every step that will be timed
        t0 = time.perf_counter()
        for s in range(warmup + steps):
            tr._batch(s, 0)
        fill_s = time.perf_counter() - t0
    times = []
    for s in range(warmup + steps):
        t0 = time.perf_counter()
        tr.train_step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if s >= warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    n_train = sum(p.numel() for p in tr.model.parameters() if p.requires_grad)
    return {
        "preset": preset, "parts": tr.cfg.model.train, "lora_layers": lora_layers,
        "image_tokens": tr.model.config.num_image_tokens,
        "device": str(tr.device), "threads": torch.get_num_threads(), "batch": batch,
        "feature_cache": cached, "timed_steps": steps, "step_s_median": round(med, 3),
        "step_s_all": [round(t, 3) for t in times], "samples_per_s": round(batch / med, 3),
        "trainable_params": n_train, "model_build_s": round(build_s, 1),
        "cache_fill_s_per_sample": round(fill_s / ((warmup + steps) * batch), 3) if cached else None,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="lite", choices=("tiny", "lite", "syre-7b"))
    p.add_argument("--weights")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int)
    p.add_argument("--train", nargs="+", help="the parts that train (default: all RCMed parts, LoRA, added "
                                              "tokens and the mask decoder)")
    p.add_argument("--lora-layers", type=int, help="train the LoRA of only the last N layers")
    p.add_argument("--all-parts", action="store_true", help="lite: train all RCMed parts, every LoRA layer, the "
                                                            "added tokens and the mask decoder (not the recipe)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "train_throughput.json"))
    a = p.parse_args(argv)
    parts, lora_layers = a.train, a.lora_layers
    if a.preset == "lite" and parts is None and not a.all_parts:  # the shipped recipe's parts by default
        recipe = TrainConfig.load(ROOT / "configs" / "lite.yaml").model
        parts, lora_layers = recipe.train, recipe.lora_layers if lora_layers is None else lora_layers
    result = run(a.preset, a.weights, a.batch, a.steps, a.warmup, a.threads, parts, lora_layers)
    result.update(machine=platform.machine(), cpus=os.cpu_count(), torch=torch.__version__,
                  loadavg_1m=round(os.getloadavg()[0], 2))
    if a.preset != "syre-7b":
        result["syre_7b"] = "not measured: no accelerator was lent to this session (run with --preset syre-7b " \
                            "--weights DIR on a CUDA machine)"
    write_report(a.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
