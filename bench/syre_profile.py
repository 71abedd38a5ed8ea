"""Where syre-7b's time per slice goes on a GPU.

A diagnostic to run beside ``bench/gpu_check.sh`` when a device is lent (random weights, full size):

* **stages**: ms per slice of each stage of the engine's fast path at batch 8 (CPU preparation, image
  encoder, prefix, suffix LLM, mask decoder, postprocessing), and of the naive path's encoder and LLM;
* **backends**: the whole engine call at batch 1 and 8 under each order of SDPA kernels;
* **blocks**: one global and one windowed SAM block, segment-anything's forward against ours, eager and
  compiled, and which SDPA kernels accept our call;
* **profile**: the top CUDA kernels of one engine call on 8 slices, and GPU busy time against wall time.

Mask agreement (fast against naive in fp32, and bf16's own noise) is gpu_check's syre_7b part.

    python bench/syre_profile.py --out bench/results/syre_profile.json
    python bench/syre_profile.py --dry-run          # CPU, narrow model: the same code in seconds
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_check as gc  # noqa: E402  (SimpleITK stand-in, the model builders)
import syre_gpu as sg  # noqa: E402

from rcmed_engine.engine import Engine  # noqa: E402
from rcmed_engine.model.fast_path import enable_fast_path, enable_naive_path, fast_block_forward  # noqa: E402
from rcmed_engine.model.presets import LoadedModel  # noqa: E402
from rcmed_engine.preprocess import MODALITY_TEXT, postprocess_logits, prepare_slices, to_uint8_rgb  # noqa: E402


def clock(fn: Callable[[], Any], device: torch.device, repeats: int = 3) -> tuple[float, Any]:
    """Median seconds of ``fn`` over ``repeats`` runs after one warm-up, and its last output."""
    out = fn()
    times = []
    for _ in range(repeats):
        sec, out, _ = sg.timed(fn, device)
        times.append(sec)
    return float(np.median(times)), out


def stages(model, device: torch.device, dtype: torch.dtype, batch: int, repeats: int) -> dict[str, float]:
    """ms per slice of each stage of the fast path, through the engine's own pieces."""
    enable_fast_path(model)
    engine = Engine(LoadedModel(model, "random", None), device=device, batch_size=batch, dtype=dtype)
    size = model.config.image_encoder.image_size
    slices = sg.random_slices(batch, size, seed=5)
    prep = engine.prepare(slices, "CT", "axial")
    cfg = model.config
    plan = model.plan_prompt(["liver"], MODALITY_TEXT["CT"])
    res: dict[str, float] = {}
    with torch.inference_mode():
        t, rgb = clock(lambda: to_uint8_rgb(np.ascontiguousarray(prep.stack), prep.window), device, repeats)
        res["cpu_window_rgb"] = t
        res["cpu_hash"], _ = clock(lambda: engine._slice_keys(rgb, prep.transform), device, repeats)
        res["cpu_prepare_slices"], px = clock(
            lambda: prepare_slices(rgb, prep.transform, cfg.pixel_mean, cfg.pixel_std, bgr=True), device, repeats)
        res["to_device"], px_dev = clock(lambda: px.to(device, dtype), device, repeats)
        res["image_encoder"], feats = clock(lambda: model.encode_image(px_dev), device, repeats)
        res["prefix"], state = clock(lambda: model.prefix(feats), device, repeats)
        res["suffix_with_decoder"], out = clock(lambda: model.suffix(state, plan), device, repeats)
        res["mask_decoder"], _ = clock(lambda: model.decode_masks(state.image_embedding, out.prompts), device, repeats)
        res["postprocess_to_cpu"], _ = clock(
            lambda: (postprocess_logits(out.low_res_logits.float(), prep.transform) > 0).cpu(), device, repeats)
        res["engine_segment"], _ = clock(lambda: sg.ours_volume(engine, slices), device, repeats)
        enable_naive_path(model)
        res["naive_image_encoder"], _ = clock(lambda: model.image_encoder(px_dev[:1]), device, repeats)
        ids = sg.conversation_ids(model)
        s = ids.index(-200)
        embed = model.language_model.get_input_embeddings()
        tokens = model.vl_projection(feats.pre_neck[:1])
        seq = torch.cat([embed(torch.tensor(ids[:s], device=device))[None], tokens,
                         embed(torch.tensor(ids[s + 1:], device=device))[None]], dim=1)
        res["naive_llm"], _ = clock(lambda: model.language_model.model(inputs_embeds=seq, use_cache=False,
                                                                       output_hidden_states=True), device, repeats)
        res["sequence_tokens"] = float(seq.shape[1])
        enable_fast_path(model)
    per_slice = {k: (1e3 * v / (1 if k.startswith("naive") or k == "sequence_tokens" else batch))
                 for k, v in res.items()}
    per_slice["sequence_tokens"] = res["sequence_tokens"]
    return per_slice


def blocks(model, device: torch.device, dtype: torch.dtype, batch: int, repeats: int) -> dict[str, Any]:
    """One global and one windowed SAM block: naive, ours, ours compiled; and the SDPA kernels that accept it."""
    import copy
    import types

    from torch.nn.attention import SDPBackend, sdpa_kernel

    enc = model.image_encoder
    grid = model.config.image_encoder.embedding_size
    x = torch.randn(batch, grid, grid, model.config.image_encoder.embed_dim, device=device, dtype=dtype)
    out: dict[str, Any] = {}
    glob = model.config.image_encoder.global_attn_indexes[0]
    for name, index in (("global", glob), ("windowed", 0)):
        blk = copy.deepcopy(enc.blocks[index])
        naive = type(blk).forward
        with torch.inference_mode():
            out[f"{name}_naive_ms"] = 1e3 * clock(lambda: naive(blk, x), device, repeats)[0]
            out[f"{name}_fast_ms"] = 1e3 * clock(lambda: fast_block_forward(blk, x), device, repeats)[0]
            for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                            SDPBackend.MATH):
                try:
                    with sdpa_kernel([backend]):
                        t = clock(lambda: fast_block_forward(blk, x), device, 1)[0]
                    out[f"{name}_fast_{backend.name.lower()}_ms"] = 1e3 * t
                except Exception as exc:  # noqa: BLE001 - "not eligible" is the figure
                    out[f"{name}_fast_{backend.name.lower()}_ms"] = f"refused: {str(exc).splitlines()[0][:100]}"
            blk.forward = types.MethodType(fast_block_forward, blk)
            blk.compile(dynamic=False)
            out[f"{name}_fast_compile_ms"] = 1e3 * clock(lambda: blk(x), device, repeats)[0]
    return out


def backends(model, device: torch.device, dtype: torch.dtype, repeats: int) -> dict[str, Any]:
    """ms per slice of the whole engine call at batch 1 and 8 with each order of SDPA kernels."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    enable_fast_path(model)
    orders = {"default": None,
              "flash_efficient": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
              "efficient": [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
              "cudnn_first": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                              SDPBackend.MATH]}
    size = model.config.image_encoder.image_size
    res: dict[str, Any] = {}
    for batch in (1, 8):
        engine = Engine(LoadedModel(model, "random", None), device=device, batch_size=batch, dtype=dtype)
        slices = sg.random_slices(batch, size, seed=20 + batch)
        for name, order in orders.items():
            def run() -> Any:
                if order is None:
                    return sg.ours_volume(engine, slices)
                with sdpa_kernel(order, set_priority=True):
                    return sg.ours_volume(engine, slices)
            try:
                res[f"{name}_b{batch}_ms"] = 1e3 * clock(run, device, repeats)[0] / batch
            except Exception as exc:  # noqa: BLE001
                res[f"{name}_b{batch}_ms"] = f"error: {str(exc).splitlines()[0][:100]}"
    return res


def profile(model, device: torch.device, dtype: torch.dtype, batch: int) -> dict[str, Any]:
    """Top CUDA kernels of one engine call on ``batch`` slices; GPU busy time against wall time."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    enable_fast_path(model)
    engine = Engine(LoadedModel(model, "random", None), device=device, batch_size=batch, dtype=dtype)
    slices = sg.random_slices(batch, model.config.image_encoder.image_size, seed=6)
    sg.ours_volume(engine, slices)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        t0 = time.perf_counter()
        sg.ours_volume(engine, slices)
        sg.sync(device)
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    attr = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    kernels = [ev for ev in events if getattr(ev, attr, 0) > 0]
    kernels.sort(key=lambda ev: getattr(ev, attr), reverse=True)
    device_us = sum(getattr(ev, "self_device_time_total", 0) for ev in events) if device.type == "cuda" else None
    by_cpu = sorted(events, key=lambda ev: ev.self_cpu_time_total, reverse=True)[:10]
    return {"batch": batch, "wall_ms": 1e3 * wall, "device_busy_ms": None if device_us is None else device_us / 1e3,
            "top_cpu": [{"name": ev.key[:90], "self_cpu_ms": ev.self_cpu_time_total / 1e3, "calls": ev.count}
                        for ev in by_cpu],
            "top": [{"name": ev.key[:90], "total_ms": getattr(ev, attr) / 1e3, "calls": ev.count,
                     "self_ms": getattr(ev, "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total") / 1e3}
                    for ev in kernels[:30]]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--sections", default="stages,backends,profile,blocks")
    parser.add_argument("--profile-batch", type=int, default=None, help="slices in the profiled call (default 8)")
    args = parser.parse_args(argv)
    dry = args.dry_run
    out = Path(args.out or Path(__file__).parent / "results" / ("syre_profile_dry.json" if dry else "syre_profile.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"torch": torch.__version__, "dry_run": dry}
    batch, repeats = (2, 1) if dry else (8, 3)

    def record(name: str, fn: Callable[[], Any]) -> None:
        t0 = time.perf_counter()
        try:
            result[name] = fn()
        except Exception as exc:  # noqa: BLE001 - one failed section must not cost the others
            traceback.print_exc()
            result[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
        print(f"syre_profile: {name} in {time.perf_counter() - t0:.0f} s: {json.dumps(result[name])[:1500]}", flush=True)
        out.write_text(json.dumps(result, indent=2, default=str))

    wanted = args.sections.split(",")
    if {"stages", "backends", "blocks", "profile"} & set(wanted):
        torch.backends.cuda.matmul.allow_tf32 = True
        model, device, dtype = gc.build_syre(dry)
        for name, fn in (("stages", lambda: stages(model, device, dtype, batch, repeats)),
                         ("backends", lambda: backends(model, device, dtype, repeats)),
                         ("profile", lambda: profile(model, device, dtype, args.profile_batch or batch)),
                         ("blocks", lambda: blocks(model, device, dtype, batch, repeats))):
            if name in wanted:
                record(name, fn)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
