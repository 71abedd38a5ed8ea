"""One prepared device check: syre-7b inference, lite CUDA vs CPU, a syre-7b LoRA step, FSDP.

Made for a GPU machine lent for minutes (one H200, no internet): everything is built on the device
from random weights in the released layout, each part runs in its own process under its own time
budget (so a crash, an out-of-memory or a hang in one part is one line in the JSON and the others
still run), and the whole stays under 8 minutes. ``--dry-run`` runs the same code on the CPU with a
narrow model, for ``make test``.

    bash bench/gpu_check.sh              # writes bench/results/gpu.json and prints a table
    bash bench/gpu_check.sh --dry-run    # CPU rehearsal, tiny widths (bench/results/gpu_dry.json)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


class _NoFileIO(types.ModuleType):
    """SimpleITK's stand-in: the engine imports it for file I/O, which no part of this check does."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise RuntimeError(f"SimpleITK.{name}: gpu_check runs with a SimpleITK stand-in (no file I/O)")


def stand_in_simpleitk() -> bool:
    """Install the stand-in where SimpleITK is missing: its 53 MB wheel and transformers' would not fit
    together in the 64 MiB a device call takes, and only file reading needs it."""
    try:
        import SimpleITK  # noqa: F401
        return False
    except ImportError:
        sys.modules["SimpleITK"] = _NoFileIO("SimpleITK")
        return True


# Before syre_gpu: it imports the engine, which imports SimpleITK.
SIMPLEITK_STAND_IN = stand_in_simpleitk()

import syre_gpu as sg  # noqa: E402  (its model, paths and timers: one definition of the naive path)

# Seconds per part on the GPU; the sum (plus ~30 s of start-up) keeps the script under 8 minutes.
BUDGET_S = {"syre_7b": 200, "lite": 60, "lora_step": 60, "fsdp": 90}  # H200: 89, 31, 18, 35 s measured
DRY_BUDGET_S = {"syre_7b": 120, "lite": 25, "lora_step": 25, "fsdp": 30}
TOTAL_S = 450  # under gpu_check.sh's 470 s backstop: a part never gets more than what is left of this
PARTS = tuple(BUDGET_S)
SYRE_AGREE_MIN = 0.9999
LITE_AGREE_MIN = 0.999


class Recorder:
    """A part's results, rewritten to its file after every figure: a part stopped at its budget
    still hands back what it measured."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {}

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        tmp.replace(self.path)


def device_and_dtype(dry: bool) -> tuple[torch.device, torch.dtype]:
    if dry:
        return torch.device("cpu"), torch.float32
    return torch.device("cuda"), torch.bfloat16


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


# ------------------------------------------------------------------------------------------------ syre-7b
def syre_config(dry: bool):
    """Full size, or a narrow/shallow model of the same classes at 256 px (8x8 image tokens)."""
    if not dry:
        return sg.bench_config(1.0, 1.0)
    cfg = sg.bench_config(1 / 16, 1 / 8)
    return dataclasses.replace(cfg, image_encoder=dataclasses.replace(cfg.image_encoder, image_size=256), vl_grid=8)


def build_syre(dry: bool):
    device, dtype = device_and_dtype(dry)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = sg.offline_tokenizer(Path(tmp))
    return sg.random_model(syre_config(dry), tokenizer, device, dtype), device, dtype


def time_path(run: Callable[[np.ndarray], np.ndarray], slices: np.ndarray, device: torch.device,
              repeats: int) -> tuple[float, float | None, np.ndarray]:
    """Median ms per slice over ``repeats`` runs after one untimed warm-up, peak GiB, the last masks."""
    run(slices)  # warm-up: allocator, kernels, compilation
    reset_peak(device)
    times, out = [], None
    for _ in range(repeats):
        sec, out, _ = sg.timed(lambda: run(slices), device)
        times.append(1e3 * sec / len(slices))
    return float(np.median(times)), peak_gib(device), np.asarray(out).reshape(slices.shape) > 0


def part_syre(rec: Recorder, dry: bool) -> None:
    """ms per slice for naive / fast / fast+compile at batch 1 and 8, peak memory, mask agreement."""
    from rcmed_engine.engine import Engine
    from rcmed_engine.model.fast_path import enable_fast_path, enable_naive_path
    from rcmed_engine.model.presets import LoadedModel

    t0 = time.perf_counter()
    model, device, dtype = build_syre(dry)
    rec.set("build_s", time.perf_counter() - t0)
    rec.set("parameters", sum(p.numel() for p in model.parameters()))
    rec.set("dtype", str(dtype).replace("torch.", ""))
    engine = Engine(LoadedModel(model, "random", None), device=device, batch_size=8, dtype=dtype)
    size = model.config.image_encoder.image_size
    repeats = 1 if dry else 3

    def fast(s: np.ndarray) -> np.ndarray:
        engine.batch_size = engine.encoder_batch = len(s)  # the batch under test, through the engine
        return sg.ours_volume(engine, s)

    paths = {"naive": (lambda: enable_naive_path(model), lambda s: sg.naive_volume(model, s, device, dtype)),
             "fast": (lambda: enable_fast_path(model), fast),
             "fast_compile": (lambda: enable_fast_path(model, compile=True), fast),
             "fast_compile_llm": (lambda: enable_fast_path(model, compile=True, compile_language_model=True), fast)}
    masks: dict[str, np.ndarray] = {}
    # The figures that matter most first, so a budget cut loses only compile's. The naive path runs one
    # slice at a time whatever the batch (as the released code does): its b8 is 8 slices in a row.
    for name in paths:
        paths[name][0]()
        for batch in (1, 8):
            slices = sg.random_slices(batch, size, seed=10 + batch)
            ms, peak, out = time_path(paths[name][1], slices, device, repeats)
            rec.set(f"{name}_b{batch}", {"ms_per_slice": ms, "peak_gib": peak})
            masks[f"{name}_b{batch}"] = out
        if name == "naive":  # random weights could draw empty masks, which would agree trivially
            rec.set("foreground_naive_b8", float(masks["naive_b8"].mean()))
        else:
            rec.set(f"agreement_{name}_vs_naive", float((masks[f"{name}_b8"] == masks["naive_b8"]).mean()))
    rec.set("speedup_b8", rec.data["naive_b8"]["ms_per_slice"] / rec.data["fast_b8"]["ms_per_slice"])
    best = min((f"{k}_b8" for k in paths if k != "naive"), key=lambda k: rec.data[k]["ms_per_slice"])
    rec.set("best_b8", best)
    rec.set("speedup_best_b8", rec.data["naive_b8"]["ms_per_slice"] / rec.data[best]["ms_per_slice"])
    fp32_agreement(rec, model, device, masks["naive_b8"], sg.random_slices(8, size, seed=18), dry)
    rec.set("agree_pass", rec.data["agreement_fp32_fast_vs_naive"] >= SYRE_AGREE_MIN)


def fp32_agreement(rec: Recorder, model, device: torch.device, naive_low: np.ndarray, slices: np.ndarray,
                   dry: bool) -> None:
    """Fast against naive on the same weights in fp32 (TF32 off): whether the two compute the same thing.

    In bf16 the masks of random weights move by themselves: the naive path against its own fp32 run is
    recorded beside it, the noise any bf16 comparison carries."""
    from rcmed_engine.engine import Engine
    from rcmed_engine.model.fast_path import enable_fast_path, enable_naive_path
    from rcmed_engine.model.presets import LoadedModel

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model.to(torch.float32)  # the bf16 weights, exactly, in fp32
    enable_naive_path(model)
    naive = sg.naive_volume(model, slices, device, torch.float32) > 0
    enable_fast_path(model)
    engine = Engine(LoadedModel(model, "random", None), device=device, batch_size=len(slices), dtype=torch.float32)
    fast = np.asarray(sg.ours_volume(engine, slices)).reshape(slices.shape) > 0
    rec.set("agreement_fp32_fast_vs_naive", float((fast == naive).mean()))
    rec.set("agreement_bf16_naive_vs_fp32_naive", float((naive_low == naive).mean()))


# ------------------------------------------------------------------------------------------------ lite
def lite_model(dry: bool):
    """The shipped lite weights where their packages are installed; else the lite layout at random
    (the device has no SmolLM2 package: the GGUF is larger than what travels), with no presence gate
    so random weights still draw masks."""
    from rcmed_engine.model.presets import build_model, lite_config, load_preset

    if not dry:
        try:
            return load_preset("lite").model, "shipped"
        except Exception as exc:  # noqa: BLE001 - any missing file or package means the random fallback
            reason = f"random (shipped weights not loadable: {type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    else:
        reason = "random (dry run)"
    cfg = lite_config()
    lm = dataclasses.replace(cfg.language_model, source="random_llama", vocab_size=0)
    if dry:
        lm = dataclasses.replace(lm, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)
    cfg = dataclasses.replace(cfg, preset="tiny", language_model=lm, presence_threshold=0.0)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.config.preset = "lite"
    return model, reason


def part_lite(rec: Recorder, dry: bool) -> None:
    """The lite engine on the accelerator against the CPU: mask agreement and ms per slice."""
    from rcmed_engine.engine import Engine
    from rcmed_engine.model.presets import LoadedModel

    model, weights = lite_model(dry)
    rec.set("weights", weights)
    slices = sg.random_slices(1 if dry else 16, 256, seed=3)
    runs = [("cpu", torch.device("cpu"), torch.float32)]
    accel = torch.device("cpu") if dry else torch.device("cuda")
    runs += [(f"{accel.type}_fp32", accel, torch.float32), (f"{accel.type}_bf16", accel, torch.bfloat16)]
    masks: dict[str, np.ndarray] = {}
    for name, device, dtype in runs:
        engine = Engine(LoadedModel(copy.deepcopy(model), weights, None), device=device, batch_size=8, dtype=dtype)
        ms, peak, masks[name] = time_path(lambda s: sg.ours_volume(engine, s), slices, device, 1)
        rec.set(name, {"ms_per_slice": ms, "peak_gib": peak, "foreground": float(masks[name].mean())})
        if name != "cpu":
            rec.set(f"agreement_{name}_vs_cpu", float((masks[name] == masks["cpu"]).mean()))
        del engine
    rec.set("agree_pass", rec.data[f"agreement_{accel.type}_fp32_vs_cpu"] >= LITE_AGREE_MIN)
    rec.set("agree_pass_bf16", rec.data[f"agreement_{accel.type}_bf16_vs_cpu"] >= LITE_AGREE_MIN)


# ------------------------------------------------------------------------------------------------ LoRA step
def add_lora(model) -> None:
    """LoRA on the LLaMA as the trainer puts it on syre-7b (the released weights ship merged, without)."""
    from rcmed_engine.model.language_model import add_lora as inject

    lm = model.config.language_model
    inject(model.language_model, lm.lora_r, lm.lora_alpha, lm.lora_dropout, lm.lora_targets)


def training_batch(model, batch: int, device: torch.device, dtype: torch.dtype):
    """Random pixels and one positive 'liver' sample with its mask per row, as the trainer feeds."""
    from rcmed_engine.preprocess import MODALITY_TEXT
    from rcmed_training.step import encode_sample

    size = model.config.image_encoder.image_size
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, 3, size, size, generator=gen).to(device, dtype)
    samples = [encode_sample(model, ["liver"], MODALITY_TEXT["CT"], True) for _ in range(batch)]
    masks = [(torch.rand(1, size, size, generator=gen) > 0.5).float() for _ in range(batch)]
    return pixels, samples, masks


def training_step(model, module, batch: int, device: torch.device, dtype: torch.dtype,
                  clip: float | None = None) -> Callable[[], float]:
    """One AdamW step of ``module`` on a fixed batch; returns the loss. The optimizer is ``step.optimizer``."""
    from rcmed_training.trainer import OptimConfig, make_optimizer

    optimizer, _ = make_optimizer(model.parameters(), OptimConfig(warmup_steps=0, total_steps=10))
    params = [p for p in model.parameters() if p.requires_grad]
    data = training_batch(model, batch, device, dtype)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        losses = module(*data)
        losses["total"].backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        return float(losses["total"].detach())

    step.optimizer = optimizer  # type: ignore[attr-defined]
    return step


def time_steps(rec: Recorder, step: Callable[[], float], device: torch.device, batch: int, dry: bool) -> None:
    """Seconds per training step after one warm-up (optimizer state, kernels), samples/s, peak memory."""
    step()
    reset_peak(device)
    steps = 1 if dry else 3
    sec, loss, _ = sg.timed(lambda: [step() for _ in range(steps)][-1], device)
    rec.set("loss", loss)
    rec.set("step_s", sec / steps)
    rec.set("samples_per_s", batch * steps / sec)
    rec.set("peak_gib", peak_gib(device))


def part_lora_step(rec: Recorder, dry: bool) -> None:
    """One syre-7b LoRA step through the trainer's own pieces: samples per second and peak memory."""
    from rcmed_training.losses import LossWeights
    from rcmed_training.trainer import LossModule, set_trainable

    model, device, dtype = build_syre(dry)
    add_lora(model)
    trainable = set_trainable(model, ["lora", "rcmed"])
    rec.set("trainable_parameters", sum(p.numel() for n, p in model.named_parameters() if n in set(trainable)))
    rec.set("dtype", str(dtype).replace("torch.", ""))
    model.train()
    module = LossModule(model, LossWeights())
    batch = 2 if dry else 4
    rec.set("batch", batch)
    time_steps(rec, training_step(model, module, batch, device, dtype), device, batch, dry)


# ------------------------------------------------------------------------------------------------ FSDP
FSDP_ONE_PROCESS = ("one GPU: NCCL refuses two ranks on one device, so this is a 1-rank FSDP2 run (sharding hooks, "
                    "NCCL all-gather/reduce-scatter, mixed precision, activation checkpointing, DCP); the 2-rank "
                    "equality with DDP is tested on the CPU with gloo")


def one_rank_group(device: torch.device) -> None:
    """A world of one for this process (the part runs outside any launcher): NCCL on CUDA, gloo on the CPU."""
    import socket

    import torch.distributed as dist

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if device.type == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def part_fsdp(rec: Recorder, dry: bool) -> None:
    """The trainer's FSDP2 path on syre-7b with LoRA: shard, LoRA steps (bf16 layers, fp32 reduction,
    activation checkpointing), a sharded checkpoint saved and loaded back."""
    import torch.distributed as dist
    from rcmed_training.losses import LossWeights
    from rcmed_training.sharding import load_sharded, save_sharded, shard_loss_module
    from rcmed_training.trainer import LossModule, set_trainable

    model, device, dtype = build_syre(dry)
    rec.set("world_size", 1)
    rec.set("why_one_process", FSDP_ONE_PROCESS if not dry else "dry run: the same 1-rank code on the CPU (gloo)")
    one_rank_group(device)
    try:
        add_lora(model)
        set_trainable(model, ["lora", "rcmed"])
        model.train()
        module = LossModule(model, LossWeights())
        t0 = time.perf_counter()
        mixed = "auto" if dry else "bf16"
        shard_loss_module(module, device, mixed, checkpointing=True)
        rec.set("shard_s", time.perf_counter() - t0)
        rec.set("fsdp_groups", sum(1 for m in module.modules() if type(m).__name__.startswith("FSDP")))
        rec.set("mixed_precision", "fp32 (CPU)" if dry else "bf16 layers, fp32 gradient reduction")
        batch = 2 if dry else 4
        rec.set("batch", batch)
        step = training_step(model, module, batch, device, dtype, clip=1.0)
        optimizer = step.optimizer
        time_steps(rec, step, device, batch, dry)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "sharded"
            t0 = time.perf_counter()
            save_sharded(folder, module, optimizer)
            rec.set("dcp_save_s", time.perf_counter() - t0)
            rec.set("dcp_mib", sum(f.stat().st_size for f in folder.iterdir()) / 2**20)
            t0 = time.perf_counter()
            load_sharded(folder, module, optimizer)
            rec.set("dcp_load_s", time.perf_counter() - t0)
        rec.set("loss_after_load", step())
    finally:
        dist.destroy_process_group()


PART_FUNCS: dict[str, Callable[[Recorder, bool], None]] = {
    "syre_7b": part_syre, "lite": part_lite, "lora_step": part_lora_step, "fsdp": part_fsdp}


# ------------------------------------------------------------------------------------------------ runner
def run_child(part: str, dry: bool, out: Path) -> int:
    """Inside a part's own process: run it, and on failure add a one-line error to what it measured."""
    rec = Recorder(out)
    t0 = time.perf_counter()
    try:
        PART_FUNCS[part](rec, dry)
        rec.set("status", "skipped" if "skipped" in rec.data else "ok")
    except Exception as exc:  # noqa: BLE001 - a part's failure is a figure too, never the end of the check
        traceback.print_exc()
        rec.set("status", "error")
        rec.set("error", f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}")
    rec.set("seconds", time.perf_counter() - t0)
    return 0


def run_part(part: str, dry: bool, budget: float) -> dict[str, Any]:
    """A part in a fresh process under a wall-clock budget: a hang, an OOM or a crashed CUDA context
    in one part cannot take the others with it."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{part}.json"
        cmd = [sys.executable, __file__, "--child", part, "--child-out", str(out)] + (["--dry-run"] if dry else [])
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, timeout=budget, capture_output=True, text=True)
            tail = (proc.stderr or "").strip().splitlines()[-1:] or [""]
            failed = proc.returncode != 0
        except subprocess.TimeoutExpired:
            proc, tail, failed = None, [""], False
        data = json.loads(out.read_text()) if out.is_file() else {}
        if proc is None:
            data.update(status="timeout", error=f"stopped at its {budget:.0f} s budget")
        elif failed or "status" not in data:
            data.update(status="error", error=f"process exited {proc.returncode}: {tail[0][:300]}")
        data["seconds"] = time.perf_counter() - t0
        return data


# What the parts import beyond torch; the device image lacks segment_anything and has another
# transformers than the pinned one, so those travel as wheels in .whl/ (SimpleITK has its stand-in).
NEEDED_MODULES = ("transformers", "peft", "accelerate", "segment_anything", "cv2", "sentencepiece", "safetensors",
                  "yaml", "scipy")


def preflight() -> dict[str, Any]:
    """Missing modules and a transformers other than the pinned one, found before any part runs."""
    import importlib.metadata
    import importlib.util
    import re

    missing = [m for m in NEEDED_MODULES if importlib.util.find_spec(m) is None]
    pin = re.search(r'"transformers==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    try:
        have = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        have = None
    info: dict[str, Any] = {"missing_modules": missing, "transformers": have,
                            "simpleitk": "stand-in" if SIMPLEITK_STAND_IN else "installed",
                            "transformers_pinned": pin.group(1) if pin else None}
    if missing:
        print(f"gpu_check: missing modules {missing}: put their wheels in .whl/ (bench/gpu_check.sh)", file=sys.stderr)
    if pin and have != pin.group(1):
        print(f"gpu_check: transformers {have}, pinned {pin.group(1)}: figures may differ", file=sys.stderr)
    return info


def environment(dry: bool) -> dict[str, Any]:
    info: dict[str, Any] = {"dry_run": dry, "torch": torch.__version__, "python": sys.version.split()[0],
                            "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    info["preflight"] = preflight()
    return info


def fmt(value: Any, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def table(result: dict[str, Any]) -> str:
    """The figures as a plain table for the terminal."""
    lines = [f"{'part':30s} {'figure':>14s}  note"]
    s = result["syre_7b"]
    for key in ("naive_b1", "naive_b8", "fast_b1", "fast_b8", "fast_compile_b1", "fast_compile_b8",
                "fast_compile_llm_b1", "fast_compile_llm_b8"):
        r = s.get(key, {})
        lines.append(f"{'syre-7b ' + key:30s} {fmt(r.get('ms_per_slice')):>11s} ms  peak {fmt(r.get('peak_gib'))} GiB")
    for key in ("agreement_fast_vs_naive", "agreement_fast_compile_vs_naive", "agreement_fast_compile_llm_vs_naive",
                "agreement_fp32_fast_vs_naive", "agreement_bf16_naive_vs_fp32_naive"):
        lines.append(f"{'syre-7b ' + key.replace('agreement_', ''):30s} {fmt(s.get(key), '.4%'):>14s}")
    lite = result["lite"]
    for key in ("cpu", "cuda_fp32", "cuda_bf16", "cpu_fp32", "cpu_bf16"):
        if key in lite:
            agree = lite.get(f"agreement_{key}_vs_cpu")
            lines.append(f"{'lite ' + key:30s} {fmt(lite[key].get('ms_per_slice')):>11s} ms  "
                         f"agree {fmt(agree, '.4%')}  {lite.get('weights', '')[:40]}")
    lo = result["lora_step"]
    lines.append(f"{'syre-7b LoRA step':30s} {fmt(lo.get('samples_per_s'), '.2f'):>9s} smp/s  "
                 f"peak {fmt(lo.get('peak_gib'))} GiB, batch {lo.get('batch', '-')}")
    fs = result["fsdp"]
    lines.append(f"{'syre-7b FSDP LoRA step':30s} {fmt(fs.get('samples_per_s'), '.2f'):>9s} smp/s  "
                 f"peak {fmt(fs.get('peak_gib'))} GiB, batch {fs.get('batch', '-')}, world {fs.get('world_size', '-')}")
    for part in PARTS:
        r = result[part]
        lines.append(f"{'status ' + part:30s} {r.get('status', '?'):>14s}  {fmt(r.get('seconds'), '.0f')} s  "
                     f"{r.get('error') or r.get('skipped') or ''}"[:160])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny widths: the same code, in seconds")
    parser.add_argument("--out", default=None, help="JSON (default bench/results/gpu.json, gpu_dry.json dry)")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of " + ",".join(PARTS))
    parser.add_argument("--child", choices=PARTS, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return run_child(args.child, args.dry_run, Path(args.child_out))
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --dry-run for the CPU rehearsal", file=sys.stderr)
        return 2
    budgets = DRY_BUDGET_S if args.dry_run else BUDGET_S
    t0 = time.perf_counter()
    result: dict[str, Any] = environment(args.dry_run)
    for part in PARTS:
        if part in args.parts.split(","):
            left = TOTAL_S - (time.perf_counter() - t0)  # the JSON must be written before the backstop
            result[part] = run_part(part, args.dry_run, max(1.0, min(budgets[part], left)))
        else:
            result[part] = {"status": "not run", "skipped": "not in --parts"}
        print(f"gpu_check: {part}: {result[part].get('status')} in {result[part].get('seconds', 0):.0f} s", flush=True)
    result["wall_s"] = time.perf_counter() - t0
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / ("gpu_dry.json" if args.dry_run else "gpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(table(result))
    print(f"wrote {out} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
