"""syre-7b speed: the released code's way (naive) against ours, random weights at full size.

The output does not matter for speed, so the weights are random (the real 16 GB are the user's to
download). For one 1024x1024 slice and for a volume (64 slices by default) it runs two paths in one run:

* naive: what the released code does. bf16, one slice at a time, segment-anything's and LLaMA's eager
  attention, one teacher-forced pass over the whole sequence with no cache, LM logits over every
  position (a CausalLM forward), all hidden states kept.
* ours: ``Engine`` with ``enable_fast_path``: SDPA in the SAM blocks (relative positions as one bias, no
  projection work on window padding) and in LLaMA, the text before the image run once per batch, the
  prompt-free prefix cached per slice and the prompt's suffix run on it, slices batched (``--batch``)
  through the encoder and the LLM, LM logits only where the presence score reads them.
  ``--compile`` adds a third path with the SAM blocks under torch.compile.

It prints ms per slice for each path, their ratio, peak GPU memory, the FLOP count per slice
(SAM ViT-H + the 7B prefill + the rest, counted from the config) and the compute floor it implies at
``--peak-tflops`` (800 by default), and writes everything to JSON.

No GPU here? ``--small`` (or ``--width-scale``/``--depth-scale``) runs a narrower model on the CPU and
reports the achieved GFLOP/s, from which it estimates the full-size CPU time per slice.

    python bench/syre_gpu.py                      # CUDA, full size, 64-slice volume
    python bench/syre_gpu.py --small              # CPU, width 1/8, depth 1/4, 4-slice volume
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rcmed_engine.engine import Engine  # noqa: E402
from rcmed_engine.model.config import ImageEncoderConfig, LanguageModelConfig, PromptConfig, RCMedConfig  # noqa: E402
from rcmed_engine.model.fast_path import enable_fast_path, enable_naive_path  # noqa: E402
from rcmed_engine.model.llama_tokenizer import LlamaSlowTokenizer, train_llama_sentencepiece  # noqa: E402
from rcmed_engine.model.presets import LoadedModel  # noqa: E402
from rcmed_engine.model.projections import lv_to_grid  # noqa: E402
from rcmed_engine.model.syre import build_syre_model  # noqa: E402
from rcmed_engine.preprocess import MODALITY_TEXT, plan_resize, postprocess_logits, prepare_slices  # noqa: E402
from rcmed_engine.prompts import build_answer, build_conversation, build_question  # noqa: E402

TARGET = "liver"
MODALITY = "CT"


# ------------------------------------------------------------------------------------------------ model
def bench_config(width: float = 1.0, depth: float = 1.0) -> RCMedConfig:
    """The syre-7b architecture (SYRE_SPEC §1), optionally narrower/shallower with the same head sizes."""
    vit_heads = max(1, round(16 * width))
    vit_depth = max(4, round(32 * depth) // 4 * 4)
    step = vit_depth // 4
    lm_heads = max(1, round(32 * width))
    return RCMedConfig(
        preset="syre-7b",
        image_encoder=ImageEncoderConfig(kind="vit", image_size=1024, patch_size=16, embed_dim=80 * vit_heads,
                                         depth=vit_depth, num_heads=vit_heads, window_size=14,
                                         global_attn_indexes=tuple(step * k - 1 for k in range(1, 5)),
                                         neck_dim=256, pre_neck_dim=80 * vit_heads),
        language_model=LanguageModelConfig(source="local", hidden_size=128 * lm_heads,
                                           intermediate_size=max(64, round(11008 * width / 64) * 64),
                                           num_hidden_layers=max(1, round(32 * depth)), num_attention_heads=lm_heads,
                                           vocab_size=32007, rms_norm_eps=1e-6, max_position_embeddings=2048,
                                           use_lora=False),
        prompt=PromptConfig(question_index=0, channel_order="bgr"),
        out_dim=256, decoder_mlp_dim=2048, decoder_heads=8, vl_grid=32, vl_pool="bilinear",
        presence_threshold=0.0, trained=False)


def offline_tokenizer(folder: Path) -> LlamaSlowTokenizer:
    """A LLaMA-style SentencePiece tokenizer trained here (the real one ships with the weights)."""
    from rcmed_engine.prompts import MED_SEG_QUESTIONS, PREFIX_TEMPLATE

    system = PromptConfig().system
    corpus = [PREFIX_TEMPLATE.format(system=system), *MED_SEG_QUESTIONS,
              "This is a computed tomography image. The image contains the liver, spleen and left kidney."] * 4
    train_llama_sentencepiece(folder, corpus, vocab_size=600)
    tok = LlamaSlowTokenizer.from_folder(folder)
    # The released vocabulary puts the added tokens at 32000..32006; keep that layout.
    tok.added_tokens_encoder = {t: 32000 + i for i, t in enumerate(tok.added_tokens_encoder)}
    tok.added_tokens_decoder = {v: k for k, v in tok.added_tokens_encoder.items()}
    tok.vocab_size = 32000
    return tok


@torch.no_grad()
def random_model(config: RCMedConfig, tokenizer: LlamaSlowTokenizer, device: torch.device, dtype: torch.dtype):
    """The architecture with random weights, allocated once on the device in the run dtype."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    model = build_syre_model(config, tokenizer, meta=True)
    model = model.to_empty(device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith(("embed_tokens.weight", "pos_embed")):
            p.normal_(0.0, 1.0, generator=gen)
        elif p.ndim >= 2:
            p.normal_(0.0, math.prod(p.shape[1:]) ** -0.5, generator=gen)
        elif name.endswith("weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=gen)
    lm = model.language_model
    lm.model.rotary_emb = LlamaRotaryEmbedding(config=lm.config).to(device)
    lm.config.use_cache = True
    return model.eval()


# ------------------------------------------------------------------------------------------------ FLOPs
def flop_count(config: RCMedConfig, seq_len: int) -> dict[str, float]:
    """Multiply-adds x 2 per slice, counted from the config (the work any implementation must do)."""
    enc = config.image_encoder
    c, e = enc.embed_dim, enc.embedding_size
    n = e * e
    ws = enc.window_size
    padded = math.ceil(e / ws) * ws
    windows = (padded // ws) ** 2
    vit = 2 * n * 3 * enc.patch_size ** 2 * c  # patch embedding
    for i in range(enc.depth):
        vit += 2 * n * (3 * c * c + c * c + 2 * c * int(c * enc.mlp_ratio))  # qkv, proj, mlp
        if i in enc.global_attn_indexes:
            vit += 2 * 2 * n * n * c  # QK^T and PV
            vit += 2 * 2 * n * e * c  # relative-position terms
        else:
            vit += 2 * 2 * windows * (ws * ws) ** 2 * c
            vit += 2 * 2 * windows * ws * ws * ws * c
    vit += 2 * n * c * enc.neck_dim + 2 * n * enc.neck_dim * enc.neck_dim * 9  # neck
    lm = config.language_model
    h, inter, layers = lm.hidden_size, lm.intermediate_size, lm.num_hidden_layers
    kv = h * (lm.num_key_value_heads or lm.num_attention_heads) // lm.num_attention_heads
    llm = layers * (2 * seq_len * (2 * h * h + 2 * h * kv + 3 * h * inter) + 2 * seq_len * seq_len * h)  # causal
    tokens = config.num_image_tokens
    bridges = 2 * tokens * (enc.pre_neck_dim * h + h * h)  # mm_projector
    bridges += 2 * tokens * (h * h + h * config.out_dim)  # t2i (text_hidden_fcs on the [SEG] rows is tiny)
    d, inner = config.out_dim, config.out_dim // 2
    # mask decoder per prompt: the projections that touch the image tokens (k/v of two token-to-image and
    # the final attention; q/out of two image-to-token attentions), then the two transposed convolutions
    decoder = 2 * n * d * inner * (2 * 2 + 2 * 2 + 2)
    decoder += 2 * n * d * (d // 4) * 4 + 2 * (4 * n) * (d // 4) * (d // 8) * 4
    return {"image_encoder": float(vit), "llm": float(llm), "bridges_decoder": float(bridges + decoder),
            "total": float(vit + llm + bridges + decoder)}


# ------------------------------------------------------------------------------------------------ paths
def conversation_ids(model) -> list[int]:
    mod = MODALITY_TEXT[MODALITY]
    text = build_conversation(model.config.prompt.system, build_question([TARGET], mod, 0),
                              build_answer([TARGET], mod), model.tokenizer.eos_token).text
    return model.tokenizer.encode(text)


@torch.inference_mode()
def naive_volume(model, slices: np.ndarray, device: torch.device, dtype: torch.dtype) -> np.ndarray:
    """The released code's inference, one slice at a time (SYRE_SPEC §3, §6)."""
    ids = conversation_ids(model)
    s = ids.index(-200)
    seg_id = model.tokenizer.token_id("[SEG]")
    transform = plan_resize(slices.shape[1:3], model.config.image_encoder.image_size)
    embed = model.language_model.get_input_embeddings()
    before = torch.tensor(ids[:s], device=device)
    after = torch.tensor(ids[s + 1:], device=device)
    n_img = model.config.num_image_tokens
    seg = torch.tensor([False] * (n_img - 1) + [i == seg_id for i in ids[1:]] + [False], device=device)
    out = np.zeros(slices.shape[:3], dtype=np.uint8)
    for i in range(slices.shape[0]):
        rgb = np.repeat(slices[i:i + 1, ..., None], 3, axis=-1)
        px = prepare_slices(rgb, transform, bgr=True).to(device, dtype)
        neck, pre = model.image_encoder(px)
        image_tokens = model.vl_projection(pre)
        embeds = torch.cat([embed(before)[None], image_tokens, embed(after)[None]], dim=1)
        lm_out = model.language_model.model(inputs_embeds=embeds, use_cache=False, output_hidden_states=True)
        hidden = lm_out.last_hidden_state
        model.language_model.lm_head(hidden)  # a CausalLM forward computes logits at every position
        prompts = model.text_hidden_fcs(hidden[0, seg])[None]
        lv = model.lv_projection(hidden[:, s:s + n_img])
        image = neck + lv_to_grid(lv, model.config.vl_grid, model.config.image_encoder.embedding_size).to(neck)
        low = model.decode_masks(image, prompts)
        out[i] = (postprocess_logits(low.float(), transform)[0, 0] > 0).cpu().numpy()
    return out


def ours_volume(engine: Engine, slices: np.ndarray) -> np.ndarray:
    engine.clear_cache()
    result = engine.segment(slices, TARGET, modality=MODALITY)
    return result.labels


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> tuple[float, object, float]:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return seconds, out, peak


def random_slices(n: int, size: int, seed: int) -> np.ndarray:
    """Smooth random grey slices (uint8 CT, identity window), distinct so no cache can help."""
    import cv2

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(n, 32, 32), dtype=np.uint8)
    return np.stack([cv2.resize(s, (size, size), interpolation=cv2.INTER_CUBIC) for s in small])


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--width-scale", type=float, default=None, help="widths x this (heads kept 80/128 wide)")
    parser.add_argument("--depth-scale", type=float, default=None, help="ViT blocks and LLM layers x this")
    parser.add_argument("--small", action="store_true", help="width 1/8, depth 1/4, 4-slice volume (for the CPU)")
    parser.add_argument("--slices", type=int, default=None, help="slices in the volume (default 64; 4 with --small)")
    parser.add_argument("--batch", type=int, default=8, help="our slices per batch (default 8)")
    parser.add_argument("--repeats", type=int, default=3, help="single-slice timings to take the median of")
    parser.add_argument("--peak-tflops", type=float, default=800.0, help="the accelerator's dense bf16 peak")
    parser.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--compile", action="store_true", help="also time ours with torch.compile on the SAM blocks")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--out", default=None, help="JSON file (default bench/results/syre_gpu[_cpu].json)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    width = args.width_scale if args.width_scale is not None else (0.125 if args.small else 1.0)
    depth = args.depth_scale if args.depth_scale is not None else (0.25 if args.small else 1.0)
    n_slices = args.slices if args.slices is not None else (4 if args.small else 64)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype or "",
                                                              torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    config = bench_config(width, depth)
    full = bench_config(1.0, 1.0)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = offline_tokenizer(Path(tmp))
    t0 = time.perf_counter()
    model = random_model(config, tokenizer, device, dtype)
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    seq_len = len(conversation_ids(model)) - 1 + config.num_image_tokens
    flops = flop_count(config, seq_len)
    flops_full = flop_count(full, seq_len)
    floor_ms = flops["total"] / (args.peak_tflops * 1e12) * 1e3
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'}), "
          f"dtype {str(dtype).replace('torch.', '')}, threads {torch.get_num_threads()}")
    print(f"model: width x{width}, depth x{depth}: {n_params / 1e9:.3f} B parameters (full size 7.437 B), "
          f"built in {build_s:.1f} s; sequence {seq_len} tokens")
    print(f"FLOPs per slice: {flops['total'] / 1e12:.3f} T (image encoder {flops['image_encoder'] / 1e12:.3f} T, "
          f"LLM {flops['llm'] / 1e12:.3f} T, rest {flops['bridges_decoder'] / 1e12:.3f} T); full size "
          f"{flops_full['total'] / 1e12:.2f} T; floor at {args.peak_tflops:.0f} TFLOP/s: {floor_ms:.1f} ms/slice")

    engine = Engine(LoadedModel(model, "random", None), device=device, batch_size=args.batch, dtype=dtype)
    # name -> (switch the model to this path, run the path on slices)
    paths = {"naive": (lambda: enable_naive_path(model), lambda s: naive_volume(model, s, device, dtype)),
             "ours": (lambda: enable_fast_path(model), lambda s: ours_volume(engine, s))}
    if args.compile:
        paths["ours+compile"] = (lambda: enable_fast_path(model, compile=True), lambda s: ours_volume(engine, s))

    results: dict[str, dict] = {}
    masks: dict[str, np.ndarray] = {}
    volume = random_slices(n_slices, 1024, seed=1)
    for name, (switch, run) in paths.items():
        switch()
        run(random_slices(1, 1024, seed=100))  # warm-up (allocator, kernels, compilation) not timed
        singles = []
        peak_single = None
        for r in range(args.repeats):
            sec, _, peak_single = timed(lambda: run(random_slices(1, 1024, seed=200 + r)), device)
            singles.append(sec)
        sec_vol, out, peak_vol = timed(lambda: run(volume), device)
        masks[name] = np.asarray(out).reshape(volume.shape) > 0
        results[name] = {"slice_ms": 1e3 * statistics.median(singles), "volume_ms_per_slice": 1e3 * sec_vol / n_slices,
                         "peak_gib_slice": peak_single, "peak_gib_volume": peak_vol}
        r = results[name]
        peak = f"peak {r['peak_gib_volume']:.1f} GiB" if r["peak_gib_volume"] is not None else "peak n/a (CPU)"
        print(f"{name:13s} one slice {r['slice_ms']:9.1f} ms   volume {r['volume_ms_per_slice']:9.1f} ms/slice   {peak}")

    best = min((k for k in results if k != "naive"), key=lambda k: results[k]["volume_ms_per_slice"])
    ratio_slice = results["naive"]["slice_ms"] / results[best]["slice_ms"]
    ratio_volume = results["naive"]["volume_ms_per_slice"] / results[best]["volume_ms_per_slice"]
    agree = float((masks["naive"] == masks[best]).mean())
    achieved = flops["total"] / (results[best]["volume_ms_per_slice"] / 1e3) / 1e9
    summary = {
        "device": str(device), "dtype": str(dtype).replace("torch.", ""), "width_scale": width, "depth_scale": depth,
        "parameters": n_params, "sequence_tokens": seq_len, "volume_slices": n_slices, "batch": args.batch,
        "flops_per_slice": flops, "flops_per_slice_full_size": flops_full, "peak_tflops": args.peak_tflops,
        "floor_ms_per_slice": floor_ms, "paths": results, "best": best,
        "speedup_slice": ratio_slice, "speedup_volume": ratio_volume,
        "ours_over_floor_volume": results[best]["volume_ms_per_slice"] / floor_ms,
        "mask_agreement_naive_vs_ours": agree, "achieved_gflops_ours": achieved,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
    }
    print(f"ours ({best}) vs naive: {ratio_slice:.2f}x on one slice, {ratio_volume:.2f}x on the volume; "
          f"{summary['ours_over_floor_volume']:.2f}x the floor; masks agree on {100 * agree:.3f}% of pixels")
    if device.type == "cpu":
        est = flops_full["total"] / (achieved * 1e9)
        summary["estimated_full_size_cpu_s_per_slice"] = est
        print(f"CPU: ours reaches {achieved:.1f} GFLOP/s here; at that rate the full-size model would take about "
              f"{est:.0f} s per slice ({flops_full['total'] / 1e12:.1f} TFLOP each)")
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / (
        "syre_gpu.json" if device.type == "cuda" else "syre_gpu_cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
