"""The released SyRe weights (McGregorW/SyRe) in the ``syre-7b`` preset, and their one-time conversion.

Two folder layouts load here:

* **released**: what the released code saved with transformers 4.28: an HF ``config.json`` (LLaVA/LLaMA
  fields), the weights as ``pytorch_model.bin`` or ``model.safetensors``, sharded (``-0000k-of-0000n``)
  with or without an ``.index.json``, and the slow LLaMA tokenizer files. ``.bin`` shards are read only
  with ``torch.load(weights_only=True)``: a pickle that holds anything but tensors is refused.
* **converted**: ours, written once by ``convert_syre`` (``rcmed convert-syre SRC DST``): ``config.json``
  (an RCMedConfig), one ``model.safetensors`` under our module names (mmap-loaded, pickle-free), the
  tokenizer files and ``syre.json`` (checksum and provenance).

Every key of the released state dict is accounted for (SYRE_SPEC §1): it is consumed by one of our
parameters, or ignored by the spec's rule (``vision_tower``, ``region_encoder``, ``lora_*``,
``base_layer``, ``inv_freq``). Any other leftover key, any missing one and any shape that differs is a
``CheckpointError`` that names it.

The architecture is read from the checkpoint itself (LLaMA fields from ``config.json``; SAM widths,
depth, window and global blocks from tensor shapes), so the same code loads the 7B release and the
scaled-down copy the tests build. The model is built on the ``meta`` device and the tensors are
assigned into it, so loading never holds two copies of the weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .checkpoint import CONFIG_NAME, WEIGHTS_NAME, CheckpointError, LoadReport
from .config import ImageEncoderConfig, LanguageModelConfig, PromptConfig, RCMedConfig
from .llama_tokenizer import LlamaSlowTokenizer, TokenizerError, read_json_object
from .loaded import LoadedModel

PRESET = "syre-7b"
MARKER_NAME = "syre.json"  # marks a converted folder
BIN_INDEX = "pytorch_model.bin.index.json"
SAFE_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
SAFE_SINGLE = "model.safetensors"
_SHARD = re.compile(r"^(pytorch_model|model)-(\d+)-of-(\d+)\.(bin|safetensors)$")

# Released prefix → our prefix (SYRE_SPEC §1). Order matters: the LLaMA backbone ("model.") comes last.
KEY_MAP: tuple[tuple[str, str], ...] = (
    ("model.grounding_encoder.image_encoder.", "image_encoder."),
    ("model.grounding_encoder.prompt_encoder.", "prompt_encoder."),
    ("model.grounding_encoder.mask_decoder.", "mask_decoder."),
    ("model.mm_projector.", "vl_projection.mlp."),
    ("model.text_hidden_fcs.0.", "text_hidden_fcs.mlp."),
    ("model.t2i_projection.0.", "lv_projection.mlp."),
    ("lm_head.", "language_model.lm_head."),
    ("model.", "language_model.model."),
)
# Our modules that the checkpoint must fill completely.
OWN_PREFIXES = ("image_encoder.", "prompt_encoder.", "mask_decoder.", "vl_projection.", "text_hidden_fcs.",
                "lv_projection.", "language_model.")

# SYRE_SPEC §6: the reference runs LLaMA with the RoPE base of transformers 4.28 (fixed 10000).
ROPE_THETA = 10000.0
# SAM's mask decoder has 8 heads; the weights do not say it.
DECODER_HEADS = 8


def ignored_key(key: str) -> bool:
    """The spec's rule (SYRE_SPEC §1d): GLaMM leftovers, LoRA remnants and RoPE buffers are not weights."""
    parts = key.split(".")
    return ("vision_tower" in parts or "region_encoder" in parts or "base_layer" in parts
            or any(p.startswith("lora_") for p in parts) or parts[-1] == "inv_freq")


def map_key(key: str) -> str | None:
    """Our parameter name for a released key (None: no rule maps it)."""
    for src, dst in KEY_MAP:
        if key.startswith(src):
            return dst + key[len(src):]
    return None


def released_name(ours: str) -> str:
    """The released key for one of our parameter names (for error messages)."""
    for src, dst in KEY_MAP:
        if ours.startswith(dst):
            return src + ours[len(dst):]
    return ours


@dataclass
class SyreLoadReport(LoadReport):
    """LoadReport plus what the spec's rule ignored, the layout and the files read."""

    ignored: list[str] = field(default_factory=list)
    layout: str = ""
    files: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = super().summary()
        if self.ignored:
            shown = ", ".join(self.ignored[:3]) + (f" (+{len(self.ignored) - 3} more)" if len(self.ignored) > 3 else "")
            text += f"; {len(self.ignored)} ignored by the spec's rule: {shown}"
        return text


# ------------------------------------------------------------------------------------------------ layout
def detect_layout(folder: str | Path) -> str | None:
    """``"converted"``, ``"released"`` or None (not a SyRe folder)."""
    folder = Path(folder)
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        return None
    if (folder / MARKER_NAME).is_file() and (folder / WEIGHTS_NAME).is_file():
        return "converted"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(cfg, dict) or "preset" in cfg or "hidden_size" not in cfg:
        return None
    names = {p.name for p in folder.iterdir()}
    if names & {BIN_INDEX, SAFE_INDEX, BIN_SINGLE, SAFE_SINGLE} or any(_SHARD.match(n) for n in names):
        return "released"
    return None


def weight_files(folder: str | Path) -> tuple[list[Path], dict[str, str] | None]:
    """The released weight files and the index's key → file map (None without an index).

    Safetensors is preferred when both kinds are present (no pickle at all). Shards without an index
    must be complete (every k of -of-n present).
    """
    folder = Path(folder)
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    for index_name, single, ext in ((SAFE_INDEX, SAFE_SINGLE, "safetensors"), (BIN_INDEX, BIN_SINGLE, "bin")):
        if index_name in names:
            try:
                index = json.loads((folder / index_name).read_text())
                weight_map = {str(k): str(v) for k, v in index["weight_map"].items()}
            except (OSError, json.JSONDecodeError, KeyError, AttributeError, TypeError) as exc:
                raise CheckpointError(f"{folder / index_name} is not a valid weight index: {exc}") from exc
            files = sorted(set(weight_map.values()))
            outside = [f for f in files if Path(f).name != f]
            if outside:
                raise CheckpointError(f"the index {index_name} names files outside the folder: {', '.join(outside)}")
            absent = [f for f in files if not (folder / f).is_file()]
            if absent:
                raise CheckpointError(f"the index {index_name} names shards that are not in {folder}: "
                                      f"{', '.join(absent)}")
            return [folder / f for f in files], weight_map
        shards = [n for n in names if (m := _SHARD.match(n)) and m.group(4) == ext]
        if shards:
            totals = {int(_SHARD.match(n).group(3)) for n in shards}  # type: ignore[union-attr]
            if len(totals) != 1:
                raise CheckpointError(f"shards of different sets in {folder}: {', '.join(shards)}")
            total = totals.pop()
            have = {int(_SHARD.match(n).group(2)) for n in shards}  # type: ignore[union-attr]
            lacking = sorted(set(range(1, total + 1)) - have)
            if lacking:
                raise CheckpointError(f"shard(s) {lacking} of {total} are missing in {folder}")
            return [folder / n for n in shards], None
        if single in names:
            return [folder / single], None
    raise CheckpointError(f"no weights in {folder}: expected {SAFE_INDEX}, {BIN_INDEX}, {SAFE_SINGLE}, "
                          f"{BIN_SINGLE} or shards named like pytorch_model-00001-of-00002.bin")


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    """A .bin shard, tensors only (``weights_only=True``), memory-mapped where the format allows."""
    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc) and "zip" not in str(exc):
                raise
            data = torch.load(path, map_location="cpu", weights_only=True)  # pre-zip format: no mmap
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"refusing to load {path.name}: it holds more than tensors (read with "
                              f"torch.load(weights_only=True)): {first}") from exc
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{path.name} is not a readable PyTorch weights file: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path.name} holds a {type(data).__name__}, not a state dict")
    bad = [str(k) for k, v in data.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path.name} holds entries that are not tensors: {', '.join(bad[:5])}")
    return data


def iter_released_tensors(folder: str | Path) -> Iterator[tuple[str, torch.Tensor, str]]:
    """(key, tensor, file name) for every tensor of a released folder, shard by shard.

    Checks the index against the shards: a key the index puts in a shard that lacks it, or a key in two
    shards, is an error that names it.
    """
    from safetensors import safe_open

    files, weight_map = weight_files(folder)
    seen: dict[str, str] = {}
    for path in files:
        if path.suffix == ".safetensors":
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
            except Exception as exc:  # safetensors raises its own error types
                raise CheckpointError(f"{path.name} is not a readable safetensors file: {exc}") from exc
            with handle:
                keys = list(handle.keys())
                items = ((k, handle.get_tensor(k)) for k in keys)
                yield from _check_items(items, path.name, seen)
        else:
            state = _torch_load(path)
            keys = list(state)
            yield from _check_items(state.items(), path.name, seen)
            del state
        if weight_map is not None:
            listed = [k for k, f in weight_map.items() if f == path.name and k not in keys]
            if listed:
                raise CheckpointError(f"the index puts {len(listed)} key(s) in {path.name} that it does not hold: "
                                      f"{', '.join(listed[:5])}")


def _check_items(items, name: str, seen: dict[str, str]):
    for key, tensor in items:
        if key in seen:
            raise CheckpointError(f"key {key} is in two shards: {seen[key]} and {name}")
        seen[key] = name
        yield key, tensor, name


# ------------------------------------------------------------------------------------------------ config
def _rel_pos_rows(shapes: dict[str, tuple[int, ...]], block: int) -> tuple[int, int]:
    key = f"image_encoder.blocks.{block}.attn.rel_pos_h"
    if key not in shapes:
        raise CheckpointError(f"missing key {released_name(key)} (needed to read the image encoder's layout)")
    return shapes[key][0], shapes[key][1]


def _need(shapes: dict[str, tuple[int, ...]], key: str) -> tuple[int, ...]:
    if key not in shapes:
        raise CheckpointError(f"missing key {released_name(key)}")
    return shapes[key]


def config_from_released(hf: dict, shapes: dict[str, tuple[int, ...]]) -> RCMedConfig:
    """The syre-7b RCMedConfig for a released folder: LLaMA fields from its config.json, the rest from the
    tensor shapes (keyed by our names). For the release this gives SYRE_SPEC §1's numbers exactly."""
    def field_(name: str, default=None):
        value = hf.get(name, default)
        if value is None:
            raise CheckpointError(f"config.json lacks {name!r}")
        return value

    hidden = int(field_("hidden_size"))
    heads = int(field_("num_attention_heads"))
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"config.json says hidden_act {hf['hidden_act']!r}; LLaMA uses 'silu'")
    # The embedding is authoritative (resize_token_embeddings updates config.json too, but a hand-edited
    # config should not block a load); lm_head.weight is then checked against the same number.
    vocab = _need(shapes, "language_model.model.embed_tokens.weight")[0]
    lm = LanguageModelConfig(
        source="local", hidden_size=hidden, intermediate_size=int(field_("intermediate_size")),
        num_hidden_layers=int(field_("num_hidden_layers")), num_attention_heads=heads,
        num_key_value_heads=int(hf.get("num_key_value_heads") or heads), vocab_size=vocab,
        # transformers 4.28's LlamaConfig defaults, for a config.json that omits them
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)), use_lora=False)

    patch = _need(shapes, "image_encoder.patch_embed.proj.weight")
    embed_dim, patch_size = patch[0], patch[2]
    grid = _need(shapes, "image_encoder.pos_embed")[1]
    depth = len({k.split(".")[2] for k in shapes if k.startswith("image_encoder.blocks.")})
    rows = [_rel_pos_rows(shapes, i) for i in range(depth)]
    head_dim = rows[0][1]
    global_blocks = tuple(i for i, (r, _) in enumerate(rows) if r == 2 * grid - 1)
    window_rows = {r for r, _ in rows if r != 2 * grid - 1}
    if len(window_rows) > 1:
        raise CheckpointError(f"the image encoder's windowed blocks disagree on the window size: {sorted(window_rows)}")
    window = (window_rows.pop() + 1) // 2 if window_rows else 0
    mlp_hidden = _need(shapes, "image_encoder.blocks.0.mlp.lin1.weight")[0]
    neck = _need(shapes, "image_encoder.neck.0.weight")[0]
    out_dim = _need(shapes, "text_hidden_fcs.mlp.2.weight")[0]
    if "out_dim" in hf and int(hf["out_dim"]) != out_dim:
        raise CheckpointError(f"config.json says out_dim {hf['out_dim']} but text_hidden_fcs gives {out_dim}")
    mm_in = _need(shapes, "vl_projection.mlp.0.weight")[1]
    if mm_in != embed_dim:
        raise CheckpointError(f"model.mm_projector.0.weight takes {mm_in} inputs, the image encoder gives {embed_dim}")
    encoder = ImageEncoderConfig(
        kind="vit", image_size=grid * patch_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
        num_heads=embed_dim // head_dim, window_size=window, global_attn_indexes=global_blocks,
        mlp_ratio=mlp_hidden / embed_dim, neck_dim=neck, pre_neck_dim=embed_dim)
    return RCMedConfig(
        preset=PRESET, image_encoder=encoder, language_model=lm,
        # question_index 0: the reference draws one of seven templates at random; we always ask the first.
        prompt=PromptConfig(question_index=0, channel_order="bgr", per_target_rows=False),  # the released answer form
        out_dim=out_dim,
        decoder_mlp_dim=_need(shapes, "mask_decoder.transformer.layers.0.mlp.lin1.weight")[0],
        decoder_heads=DECODER_HEADS,
        vl_grid=grid // 2,  # bilinear by 1/2 (SYRE_SPEC §3.3)
        vl_pool="bilinear",
        # No presence gating: the released model's masks, whatever its "contains" score says.
        presence_threshold=0.0,
        trained=True,
    )


# ------------------------------------------------------------------------------------------------ model
def _llama_config(cfg: LanguageModelConfig):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads or cfg.num_attention_heads, rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
        rope_theta=ROPE_THETA, attention_bias=False, mlp_bias=False, hidden_act="silu",
        bos_token_id=1, eos_token_id=2, pad_token_id=0, use_cache=True)


def build_syre_model(config: RCMedConfig, tokenizer: LlamaSlowTokenizer, meta: bool = False):
    """The syre-7b architecture for a config, with the weighty parts on the ``meta`` device.

    The image encoder, prompt encoder, mask decoder and LLaMA are built without memory; RCMed's own
    layers are built normally unless ``meta`` (then everything is on meta: for counting parameters).
    The RoPE table is computed for real (it is not a weight).
    """
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from .image_encoder import build_image_encoder
    from .mask_decoder import build_mask_decoder, build_prompt_encoder
    from .rcmed import RCMed

    enc = config.image_encoder
    llama_cfg = _llama_config(config.language_model)
    with torch.device("meta"):
        image_encoder = build_image_encoder(enc)
        prompt_encoder = build_prompt_encoder(config.out_dim, enc.embedding_size, enc.image_size)
        mask_decoder = build_mask_decoder(config.out_dim, config.decoder_mlp_dim, config.decoder_heads)
        language_model = LlamaForCausalLM(llama_cfg)
    language_model.model.rotary_emb = LlamaRotaryEmbedding(config=llama_cfg)
    language_model.config.use_cache = True
    if len(tokenizer) > config.language_model.vocab_size:
        raise CheckpointError(f"the tokenizer has {len(tokenizer)} tokens but the embedding only "
                              f"{config.language_model.vocab_size} rows")
    if meta:
        with torch.device("meta"):
            model = RCMed(config, image_encoder, language_model, tokenizer, prompt_encoder, mask_decoder,
                          tokenizer.vocab_size)
    else:
        model = RCMed(config, image_encoder, language_model, tokenizer, prompt_encoder, mask_decoder,
                      tokenizer.vocab_size)
    return model.eval()


def expected_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Our state-dict entries that a SyRe checkpoint must fill, with their shapes."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith(OWN_PREFIXES)}


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is None or not tensor.is_floating_point():
        return tensor
    return tensor.to(dtype)


def _install(model: nn.Module, state: dict[str, torch.Tensor], report: LoadReport) -> None:
    """Assign the tensors (no copy beyond the dtype cast) and make sure nothing is left on meta."""
    model.load_state_dict(state, strict=False, assign=True)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        report.missing.extend(released_name(n) for n in left if released_name(n) not in report.missing)
        raise CheckpointError(f"these weights are not in the checkpoint: {', '.join(left[:5])}")
    model.requires_grad_(False)
    model.eval()


def _fail_if_bad(report: LoadReport, folder: Path) -> None:
    if report.missing or report.unexpected or report.mismatched:
        raise CheckpointError(f"{folder} does not fit the syre-7b model: {report.summary()}")


def _fingerprint(files: list[Path], extra: list[Path]) -> str:
    """A quick identity for a released folder: sha256 over the index/config text and each weight file's
    name, size and first and last MiB. (Hashing 16 GB on every load would take minutes; a converted
    folder carries the full sha256 of its weights, computed once by the converter.)"""
    digest = hashlib.sha256()
    for path in extra:
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with open(path, "rb") as fh:
            digest.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(size - (1 << 20))
                digest.update(fh.read(1 << 20))
    return digest.hexdigest()


@dataclass
class ReleasedCheckpoint:
    """A released folder read and checked against the architecture it describes."""

    config: RCMedConfig
    tokenizer: LlamaSlowTokenizer
    model: nn.Module
    state: dict[str, torch.Tensor]  # our names, source dtypes
    report: SyreLoadReport


def read_released(folder: str | Path, meta_model: bool = False) -> ReleasedCheckpoint:
    """Read a released folder, map every key, and check it against the architecture (no weights copied)."""
    folder = Path(folder)
    hf = _read_hf_config(folder)
    tokenizer = _tokenizer(folder)
    files, _ = weight_files(folder)
    report = SyreLoadReport(layout="released", files=[p.name for p in files])
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for key, tensor, _ in iter_released_tensors(folder):
        if ignored_key(key):
            report.ignored.append(key)
            continue
        ours = map_key(key)
        if ours is None:
            report.unexpected.append(key)
            continue
        state[ours] = tensor
        origin[ours] = key
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    config = config_from_released(hf, shapes)
    model = build_syre_model(config, tokenizer, meta=meta_model)
    expected = expected_shapes(model)
    for ours, tensor in list(state.items()):
        if ours not in expected:
            report.unexpected.append(origin[ours])
            del state[ours]
        elif tuple(tensor.shape) != expected[ours]:
            report.mismatched.append(f"{origin[ours]} {tuple(tensor.shape)} != {expected[ours]}")
            del state[ours]
    bad_shape = {m.split(" ", 1)[0] for m in report.mismatched}
    report.missing = [released_name(k) for k in expected if k not in state and released_name(k) not in bad_shape]
    report.loaded = [origin[k] for k in state]
    report.sha256 = _fingerprint(files, [folder / CONFIG_NAME, folder / BIN_INDEX, folder / SAFE_INDEX])
    _fail_if_bad(report, folder)
    return ReleasedCheckpoint(config, tokenizer, model, state, report)


def _read_hf_config(folder: Path) -> dict:
    return read_json_object(folder / CONFIG_NAME, CheckpointError)


def _tokenizer(folder: Path) -> LlamaSlowTokenizer:
    try:
        return LlamaSlowTokenizer.from_folder(folder)
    except TokenizerError as exc:
        raise CheckpointError(str(exc)) from exc


def load_syre(folder: str | Path, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a released or converted SyRe folder into the syre-7b preset."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"weights folder not found: {folder}")
    layout = detect_layout(folder)
    if layout == "released":
        ckpt = read_released(folder)
        state = {k: _cast(v, dtype) for k, v in ckpt.state.items()}
        ckpt.state.clear()
        _install(ckpt.model, state, ckpt.report)
        return LoadedModel(ckpt.model, str(folder), ckpt.report)
    if layout == "converted":
        model, report = _load_converted(folder, dtype)
        return LoadedModel(model, str(folder), report)
    raise CheckpointError(
        f"{folder} is not a SyRe weights folder: expected the released layout (config.json with LLaMA fields, "
        f"pytorch_model*.bin or model*.safetensors, tokenizer.model) or one written by `rcmed convert-syre`")


def _load_converted(folder: Path, dtype: torch.dtype | None):
    from safetensors import safe_open

    from .checkpoint import read_config

    config = read_config(folder)
    if config.preset != PRESET:
        raise CheckpointError(f"{folder} holds a {config.preset!r} model, not {PRESET}")
    marker = read_json_object(folder / MARKER_NAME, CheckpointError)
    tokenizer = _tokenizer(folder)
    model = build_syre_model(config, tokenizer)
    expected = expected_shapes(model)
    report = SyreLoadReport(layout="converted", files=[WEIGHTS_NAME], sha256=str(marker.get("sha256", "")))
    state: dict[str, torch.Tensor] = {}
    path = folder / WEIGHTS_NAME
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc
    with handle:
        for key in handle.keys():
            if key not in expected:
                report.unexpected.append(key)
                continue
            shape = tuple(handle.get_slice(key).get_shape())
            if shape != expected[key]:
                report.mismatched.append(f"{key} {shape} != {expected[key]}")
                continue
            state[key] = _cast(handle.get_tensor(key), dtype)
            report.loaded.append(key)
    bad_shape = {m.split(" ", 1)[0] for m in report.mismatched}
    report.missing = [k for k in expected if k not in state and k not in bad_shape]
    _fail_if_bad(report, folder)
    _install(model, state, report)
    return model, report


# ------------------------------------------------------------------------------------------------ convert
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """Write a safetensors file one tensor at a time (``safetensors.save_file`` would first copy every
    tensor into memory: 16 GB here), through a temporary file renamed into place. Returns its sha256."""
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    order = sorted(tensors)
    for name in order:
        t = tensors[name]
        if t.dtype not in _ST_DTYPES:
            raise CheckpointError(f"cannot store {name} of dtype {t.dtype} in safetensors")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    digest = hashlib.sha256()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # never truncate a file that may be mmap-ed
    with open(tmp, "wb") as fh:
        for chunk in (struct.pack("<Q", len(raw)), raw):
            fh.write(chunk)
            digest.update(chunk)
        for name in order:
            t = tensors[name].detach().to("cpu").contiguous()
            data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
            view = memoryview(data)
            fh.write(view)
            digest.update(view)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return digest.hexdigest()


def convert_syre(src: str | Path, dst: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write a released SyRe folder once in our layout: config.json, model.safetensors (our names; each
    tensor in its source dtype unless ``dtype``), the tokenizer files and syre.json.

    Atomic: everything is written to a temporary folder beside ``dst`` and renamed into place at the end,
    so an interrupted conversion leaves no partial ``dst``. ``dst`` must not exist or be empty.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"source folder not found: {src}")
    if detect_layout(src) != "released":
        raise CheckpointError(f"{src} is not a released SyRe folder (config.json with LLaMA fields and "
                              "pytorch_model*.bin or model*.safetensors)")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise CheckpointError(f"destination {dst} already exists and is not an empty folder")
    if not dst.parent.is_dir():
        raise FileNotFoundError(f"destination's parent folder does not exist: {dst.parent}")
    ckpt = read_released(src, meta_model=True)
    state = {k: _cast(v, dtype) for k, v in ckpt.state.items()}
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        sha = write_safetensors(tmp / WEIGHTS_NAME, state, {"format": "pt", "rcmed_preset": PRESET})
        ckpt.config.save(tmp / CONFIG_NAME)
        ckpt.tokenizer.save(tmp)
        marker = {"format": 1, "preset": PRESET, "sha256": sha, "tensors": len(state),
                  "source": str(src.resolve()), "source_files": ckpt.report.files,
                  "source_fingerprint": ckpt.report.sha256, "ignored": ckpt.report.ignored,
                  "dtypes": sorted({str(v.dtype).replace("torch.", "") for v in state.values()})}
        (tmp / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)
        for p in tmp.iterdir():
            os.chmod(p, 0o666 & ~mask)
        if dst.exists():
            dst.rmdir()
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def is_syre_folder(folder: str | Path) -> bool:
    return Path(folder).is_dir() and detect_layout(folder) is not None


__all__ = ["CheckpointError", "KEY_MAP", "SyreLoadReport", "build_syre_model", "config_from_released",
           "convert_syre", "detect_layout", "ignored_key", "is_syre_folder", "iter_released_tensors", "load_syre",
           "map_key", "read_released", "weight_files", "write_safetensors"]
