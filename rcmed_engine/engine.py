"""The Engine: one loaded model, an embedding cache, and segmentation of 2D slices and 3D volumes.

Like segment-anything's predictor, the expensive part (image encoder plus the prompt-free prefix of the
language pass) is computed once per slice and cached by the slice's content hash; each prompt then
costs only its own short suffix and the mask decoder.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np
import torch

from . import __version__
from .geometry import SliceFrame, Volume, from_slices, parse_slice_range, to_slices  # noqa: F401 (re-exported)
from .model.loaded import LoadedModel
from .model.presets import load_preset
from .model.rcmed import ImageFeatures, PrefixState, RCMed
from .preprocess import (MODALITY_TEXT, IntensityWindow, SliceTransform, canonical_modality, content_hash,
                         infer_modality, intensity_window, plan_resize, postprocess_logits, prepare_slices,
                         to_uint8_rgb)
from .prompts import parse_targets
from .vocabulary import resolve_targets
from .adapters import Adapter, base_identity, check_no_overlap, route
from .results import Cancelled, CancelToken, EngineError, SegmentResult, as_volume  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from .clicks import Box, Click
    from .otfa import ClassRegistry, OTFAConfig

ProgressCallback = Callable[[int, int], None]

# Split evenly between encoder features (~9 MB a lite slice) and prefix states (~18 MB a lite slice);
# 512 MB keeps a dozen recent slices ready for new prompts and the whole process under 3 GB.
DEFAULT_CACHE_BYTES = 512 << 20


@dataclass
class _Prepared:
    """A volume cut into slices and mapped to 8-bit colour, ready for the encoder."""

    volume: Volume
    frame: SliceFrame
    stack: np.ndarray  # (n, rows, cols[, c]), a view of the volume
    window: IntensityWindow | None
    transform: SliceTransform
    modality: str


class _LRU:
    """A least-recently-used cache bounded by bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.items: OrderedDict[str, tuple[object, int]] = OrderedDict()
        self.nbytes = 0

    def get(self, key: str) -> object | None:
        hit = self.items.get(key)
        if hit is None:
            return None
        self.items.move_to_end(key)
        return hit[0]

    def put(self, key: str, value: object, size: int) -> None:
        if key in self.items:
            self.nbytes -= self.items.pop(key)[1]
        if size > self.max_bytes:
            return
        self.items[key] = (value, size)
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            _, (_, freed) = self.items.popitem(last=False)
            self.nbytes -= freed

    def clear(self) -> None:
        self.items.clear()
        self.nbytes = 0


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise EngineError("--device cuda was asked for, but no CUDA device is available; use --device cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise EngineError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


def _as_label_volume(mask: Volume | np.ndarray) -> Volume:
    """A mask as a Volume: a plain 2D or 3D array is a label map, never colour, even when its last axis is 3."""
    if not isinstance(mask, Volume) and np.ndim(mask) in (2, 3):
        return as_volume(mask, rgb=False)
    return as_volume(mask)  # a Volume, or a shape the scalar check rejects with its own message


class Engine:
    """A loaded RCMed model that segments what a prompt names.

    ``segment`` takes a Volume (any geometry; 2D images are volumes with z = 1) or a 2D/3D numpy
    array, and returns the label map in the input's exact geometry.
    """

    def __init__(self, loaded: LoadedModel, device: torch.device | str = "cpu", batch_size: int = 8,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, preset: str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        if batch_size < 1:
            raise EngineError(f"--batch must be at least 1, got {batch_size}")
        self.device = resolve_device(device) if isinstance(device, str) else device
        dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.model: RCMed = loaded.model.to(self.device, dtype).eval()
        self.preset = preset or self.model.config.preset
        self.weights = loaded.weights
        self.weights_sha256 = loaded.report.sha256 if loaded.report else "none"
        self.batch_size = batch_size
        self.encoder_batch = batch_size if self.device.type == "cuda" else 1
        self._features = _LRU(cache_bytes // 2)
        self._prefixes = _LRU(cache_bytes // 2)
        self._lock = threading.RLock()  # one model: calls from several threads run one at a time
        self.adapters: list[Adapter] = []

    @classmethod
    def from_preset(cls, preset: str = "lite", weights: str | None = None, device: str = "auto",
                    batch_size: int = 8, cache_bytes: int = DEFAULT_CACHE_BYTES) -> "Engine":
        if preset == "syre-7b" and weights is not None:  # loaded straight into the run dtype, fast kernels on
            return cls.from_pretrained(weights, device=device, batch_size=batch_size, cache_bytes=cache_bytes)
        loaded = load_preset(preset, weights)
        return cls(loaded, device=device, batch_size=batch_size, cache_bytes=cache_bytes, preset=preset)

    @classmethod
    def from_pretrained(cls, folder: str, device: str = "auto", batch_size: int = 8,
                        cache_bytes: int = DEFAULT_CACHE_BYTES,
                        dtype: torch.dtype | None = None, fast: bool = True, compile: bool = False) -> "Engine":
        """The syre-7b preset from a folder of the released McGregorW/SyRe weights, as downloaded
        (config.json, .bin or .safetensors shards, tokenizer.model) or as `rcmed convert-syre` wrote it.

        dtype: bf16 on CUDA, fp32 on CPU unless given (bf16 on CPU halves the memory, ~15 GB). The
        weights are loaded straight into that dtype. ``fast`` (default) switches on the fast kernels
        (model/fast_path.py), which leave the answers unchanged; ``compile`` adds torch.compile.
        """
        from .model.fast_path import enable_fast_path
        from .model.syre import load_syre

        dev = resolve_device(device)
        dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
        loaded = load_syre(folder, dtype)
        if fast:
            enable_fast_path(loaded.model, compile=compile)
        return cls(loaded, device=dev, batch_size=batch_size, cache_bytes=cache_bytes, preset="syre-7b",
                   dtype=dtype)

    # ----------------------------------------------------------------------------------------- adapters
    @property
    def base_identity(self) -> str:
        return base_identity(self.preset, self.weights_sha256, str(self.weights))

    def load_adapter(self, folder: str) -> Adapter:
        """Load an adapter folder (`rcmed-train fit --adapter`); its classes are then routed to it. The base
        weights are never changed, so every other class keeps the base model's exact masks."""
        with self._lock:
            adapter = Adapter.from_pretrained(folder, self.model, self.base_identity)
            check_no_overlap(self.adapters, adapter)
            self.adapters.append(adapter)
            return adapter

    @torch.inference_mode()
    def _adapter_outputs(self, rgb: np.ndarray, transform: SliceTransform, routes: dict[int, tuple[list[int], object]],
                         logits: torch.Tensor, pres: np.ndarray) -> float:
        """Overwrite the routed targets' logits and presence with their adapters' answers; returns the encoder
        seconds. The adapter's prefix is not cached: its LoRA changes the prefix states too."""
        feats, seconds = self._image_features(rgb, transform)
        for a_i, (positions, plan) in routes.items():
            with self.adapters[a_i].applied(self.model):
                out = self.model.suffix(self.model.prefix(feats), plan)  # type: ignore[arg-type]
            logits[:, positions] = postprocess_logits(out.low_res_logits.float(), transform)
            pres[:, positions] = out.presence.float().cpu().numpy()
        return seconds

    # ----------------------------------------------------------------------------------------- info
    def info(self) -> dict[str, object]:
        cfg = self.model.config
        n_params = sum(p.numel() for p in self.model.parameters())
        return {
            "engine_version": __version__,
            "preset": self.preset,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "trained": cfg.trained,
            "device": str(self.device),
            "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
            "parameters": n_params,
            "image_size": cfg.image_encoder.image_size,
            "image_tokens": cfg.num_image_tokens,
            "language_model": cfg.language_model.source,
            "cache_mb": round((self._features.nbytes + self._prefixes.nbytes) / 2**20, 1),
            "presence_threshold": cfg.presence_threshold,
            "vocabulary": list(cfg.vocabulary),
            "adapters": [a.summary() for a in self.adapters],
            "licence": cfg.licence or "not stated by these weights",
        }

    def provenance(self, prompt: str) -> dict[str, str]:
        return {"RCMed.preset": self.preset, "RCMed.weights_sha256": self.weights_sha256,
                "RCMed.prompt": prompt, "RCMed.engine_version": __version__,
                "RCMed.trained": str(self.model.config.trained).lower()}

    def clear_cache(self) -> None:
        with self._lock:
            self._features.clear()
            self._prefixes.clear()

    # ----------------------------------------------------------------------------------------- input
    def _validate(self, volume: Volume) -> None:
        a = volume.array
        if a.size == 0:
            raise EngineError(f"the image is empty (shape {a.shape})")
        if a.ndim == 4 and a.shape[3] != 3:
            raise EngineError(f"images with {a.shape[3]} channels are not supported; give grey or RGB")
        if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
            raise EngineError(f"unsupported voxel type {a.dtype}")
        if np.issubdtype(a.dtype, np.floating):
            bad = int(np.count_nonzero(~np.isfinite(a)))
            if bad:
                raise EngineError(f"the image contains {bad} NaN or infinite voxels; fix or mask them first")

    def prepare(self, image: Volume | np.ndarray, modality: str | None, axis: str,
                rgb: bool | None = None) -> _Prepared:
        volume = as_volume(image, rgb)
        self._validate(volume)
        if modality is None or modality == "auto":
            modality = infer_modality(volume.array, volume.meta)
            if modality is None:
                raise EngineError("cannot tell the image's modality; pass --modality (e.g. CT, MR, X-ray, US)")
        modality = canonical_modality(modality)
        try:
            frame = volume.slice_frame(axis)
        except ValueError as exc:
            raise EngineError(str(exc)) from None
        stack = to_slices(volume.array, frame)
        window = intensity_window(volume.array, modality)
        transform = plan_resize(stack.shape[1:3], self.model.config.image_encoder.image_size, frame.pixel_spacing)
        return _Prepared(volume, frame, stack, window, transform, modality)

    # ----------------------------------------------------------------------------------------- embedding
    def _slice_keys(self, rgb: np.ndarray, transform: SliceTransform) -> list[str]:
        tag = f"{self.preset}:{self.weights_sha256[:16]}:{transform.resized_hw}"
        return [f"{tag}:{content_hash(s)}" for s in rgb]

    @torch.inference_mode()
    def _image_features(self, rgb: np.ndarray, transform: SliceTransform,
                        keys: list[str] | None = None) -> tuple[ImageFeatures, float]:
        """Encoder features for a batch of slices, from the cache where possible; and the seconds spent."""
        keys = keys if keys is not None else self._slice_keys(rgb, transform)
        feats: list[ImageFeatures | None] = [self._features.get(k) for k in keys]  # type: ignore[misc]
        todo = [i for i, f in enumerate(feats) if f is None]
        seconds = 0.0
        if todo:
            t0 = time.perf_counter()
            cfg = self.model.config
            pixels = prepare_slices(rgb[todo], transform, cfg.pixel_mean, cfg.pixel_std,
                                    bgr=cfg.prompt.channel_order == "bgr", device=self.model.device)
            # On a CPU the encoder is memory-bound (LiteMedSAM's first stage is 256 channels at full
            # resolution): batching slows it and multiplies its activations, so it runs in small chunks.
            for start in range(0, len(todo), self.encoder_batch):
                out = self.model.encode_image(pixels[start:start + self.encoder_batch])
                for j, i in enumerate(todo[start:start + self.encoder_batch]):
                    f = ImageFeatures(out.neck[j:j + 1], out.pre_neck[j:j + 1])
                    self._features.put(keys[i], f, f.neck.nbytes + f.pre_neck.nbytes)
                    feats[i] = f
            seconds = time.perf_counter() - t0
        done = [f for f in feats if f is not None]
        return ImageFeatures(torch.cat([f.neck for f in done]), torch.cat([f.pre_neck for f in done])), seconds

    @torch.inference_mode()
    def _prefix_states(self, rgb: np.ndarray, transform: SliceTransform,
                       keys: list[str] | None = None) -> tuple[PrefixState, dict[str, float]]:
        """Prefix states for a batch of slices, from the cache where possible."""
        keys = keys if keys is not None else self._slice_keys(rgb, transform)
        timings = {"encoder_s": 0.0, "prefix_s": 0.0}
        states: list[PrefixState | None] = [self._prefixes.get(k) for k in keys]  # type: ignore[misc]
        todo = [i for i, s in enumerate(states) if s is None]
        if todo:
            batch, timings["encoder_s"] = self._image_features(rgb[todo], transform, [keys[i] for i in todo])
            t0 = time.perf_counter()
            prefix = self.model.prefix(batch)
            for j, i in enumerate(todo):
                state = prefix.select(j)
                states[i] = state
                self._prefixes.put(keys[i], state, state.nbytes())
            timings["prefix_s"] = time.perf_counter() - t0
        return PrefixState.stack(states), timings  # type: ignore[arg-type]

    def _batches(self, prep: _Prepared, lo: int, hi: int) -> Iterator[tuple[list[int], np.ndarray, list[str]]]:
        """(slice indices, 8-bit RGB, cache keys) per batch of slices ``lo..hi``.

        On a GPU the next batch's windowing and hashing (NumPy and hashlib, which release the GIL) run
        on a helper thread while this batch's kernels run: on 1024² slices they were a fifth of the time.
        """
        def make(start: int) -> tuple[list[int], np.ndarray, list[str]]:
            idx = list(range(start, min(start + self.batch_size, hi)))
            rgb = to_uint8_rgb(np.ascontiguousarray(prep.stack[idx]), prep.window)
            return idx, rgb, self._slice_keys(rgb, prep.transform)

        starts = range(lo, hi, self.batch_size)
        if self.device.type != "cuda" or len(starts) < 2:  # a CPU's cores are busy with the model already
            yield from (make(s) for s in starts)
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rcmed-prepare") as pool:
            ahead = pool.submit(make, starts[0])
            for s in starts[1:]:
                current, ahead = ahead.result(), pool.submit(make, s)
                yield current
            yield ahead.result()

    def set_image(self, image: Volume | np.ndarray, modality: str | None = None, axis: str = "axial",
                  slices: Sequence[int] | None = None, rgb: bool | None = None) -> list[str]:
        """Compute and cache the prompt-free part for slices of an image; returns their cache keys.

        Later ``segment`` calls on the same content (same slice bytes) reuse it.
        """
        with self._lock:
            prep = self.prepare(image, modality, axis, rgb)
            index = list(range(prep.stack.shape[0])) if slices is None else list(slices)
            keys: list[str] = []
            for start in range(0, len(index), self.batch_size):
                chunk = index[start:start + self.batch_size]
                rgb = to_uint8_rgb(np.ascontiguousarray(prep.stack[chunk]), prep.window)
                self._prefix_states(rgb, prep.transform)
                keys += self._slice_keys(rgb, prep.transform)
            return keys

    # ----------------------------------------------------------------------------------------- segment
    def segment(self, image: Volume | np.ndarray, prompt: str, *, modality: str | None = None,
                axis: str = "axial", slices: tuple[int | None, int | None] | None = None,
                progress: ProgressCallback | None = None, cancel: CancelToken | None = None,
                registry: "ClassRegistry | str | None" = None, otfa: "OTFAConfig | None" = None,
                rgb: bool | None = None) -> SegmentResult:
        """Segment what ``prompt`` names. Several targets ("liver, spleen and left kidney") give one
        label each, through one [SEG] per target in a single answer. A target that names a class of
        ``registry`` (a ClassRegistry or its folder; default: the one ``use_registry`` set, else the user's
        default registry folder when it exists, see otfa.default_registry_dir) is segmented
        with one-shot adaptation (rcmed_engine.otfa); other targets are untouched. ``rgb`` says whether a
        plain array's last axis is colour (see results.as_volume); a Volume's colour is its own."""
        return self.segment_many(image, [prompt], modality=modality, axis=axis, slices=slices,
                                 progress=progress, cancel=cancel, registry=registry, otfa=otfa, rgb=rgb)[0]

    def segment_many(self, image: Volume | np.ndarray, prompts: Sequence[str], *, modality: str | None = None,
                     axis: str = "axial", slices: tuple[int | None, int | None] | None = None,
                     progress: ProgressCallback | None = None,
                     cancel: CancelToken | None = None, registry: "ClassRegistry | str | None" = None,
                     otfa: "OTFAConfig | None" = None, rgb: bool | None = None) -> list[SegmentResult]:
        """Several prompts on one image, sharing the encoder and prefix work of every slice."""
        t_start = time.perf_counter()
        parsed = [parse_targets(p) for p in prompts]
        with self._lock:
            prep = self.prepare(image, modality, axis, rgb)
            n = prep.stack.shape[0]
            lo, hi = self._check_range(slices, n)
            modality_text = MODALITY_TEXT[prep.modality]
            adapt = self._plan_adaptation(parsed, registry, otfa)  # None: no registered class, the plain path
            # Typed words become the class names the weights were trained on; registered classes stay as typed.
            routed = [route(t, self.adapters) for t in parsed]  # targets an adapter knows go to it
            resolved = [resolve_targets(routed[p][0], self.model.config.vocabulary, f"the {self.preset} weights",
                                        keep=(set(adapt.adapters[p]) if adapt is not None else set())
                                        | {i for pos in routed[p][1].values() for i in pos})
                        for p, t in enumerate(parsed)]
            targets = [r[0] for r in resolved]
            plans = [self.model.plan_prompt(t, modality_text) for t in targets]
            adapter_plans = [{a: (pos, self.model.plan_prompt([targets[p][i] for i in pos], modality_text))
                              for a, pos in routed[p][1].items()} for p in range(len(plans))]
            rows, cols = prep.stack.shape[1:3]
            stacks = [np.zeros((n, rows, cols), dtype=np.uint8) for _ in plans]
            presence = [np.full((len(t), n), np.nan, dtype=np.float32) for t in targets]
            timings = {"encoder_s": 0.0, "prefix_s": 0.0, "prompt_s": 0.0}
            threshold = self.model.config.presence_threshold
            done = 0
            if progress:
                progress(0, hi - lo)
            for idx, rgb, keys in self._batches(prep, lo, hi):
                if cancel is not None and cancel.is_set():
                    raise Cancelled("cancelled; nothing was written")
                state, t = (self._prefix_states(rgb, prep.transform, keys) if adapt is None or adapt.needs_prefix
                            else (None, {}))
                for k in t:
                    timings[k] += t[k]
                if adapt is not None:
                    feats, t_enc = self._image_features(rgb, prep.transform, keys)
                    timings["encoder_s"] += t_enc
                t0 = time.perf_counter()
                with torch.inference_mode():
                    for p, plan in enumerate(plans):
                        logits = pres = None
                        if adapt is None or adapt.needs_text(p):
                            out = self.model.suffix(state, plan)
                            logits = postprocess_logits(out.low_res_logits.float(), prep.transform)  # (b, T, H, W)
                            pres = out.presence.float().cpu().numpy()
                            if adapter_plans[p]:  # the base answered every target; adapters overwrite theirs
                                timings["encoder_s"] += self._adapter_outputs(rgb, prep.transform, adapter_plans[p],
                                                                              logits, pres)
                        if adapt is not None and adapt.adapters[p]:
                            logits, pres = adapt.apply(self.model, p, feats, rgb, prep.transform, logits, pres,
                                                       modality_text)
                        presence[p][:, idx] = pres.T
                        keep = torch.from_numpy(pres >= threshold)[..., None, None]
                        logits = torch.where(keep.to(logits.device), logits, torch.full_like(logits, -1.0))
                        best = logits.max(dim=1)
                        label = torch.where(best.values > 0, best.indices + 1, 0)
                        stacks[p][idx] = label.to(torch.uint8).cpu().numpy()
                timings["prompt_s"] += time.perf_counter() - t0
                done += len(idx)
                if progress:
                    progress(done, hi - lo)
            total = time.perf_counter() - t_start
            results = []
            for p, prompt in enumerate(prompts):
                labels = np.ascontiguousarray(from_slices(stacks[p], prep.frame))
                results.append(SegmentResult(
                    labels=labels, geometry=prep.volume.geometry, targets=targets[p], presence=presence[p],
                    slices=(lo, hi), axis=axis, modality=prep.modality, answer=plans[p].answer, prompt=prompt,
                    timings={**timings, "total_s": total, "slices": float(hi - lo)},
                    provenance=self.provenance(prompt), notes=resolved[p][1]))
            return results

    def refine(self, image: Volume | np.ndarray, prompt: str, clicks: "Sequence[Click | str]", *,
               boxes: "Sequence[Box | str] | None" = None, previous: "SegmentResult | Volume | np.ndarray | None" = None,
               propagate: bool = True, modality: str | None = None, axis: str = "axial",
               slices: tuple[int | None, int | None] | None = None, progress: ProgressCallback | None = None,
               cancel: CancelToken | None = None, rgb: bool | None = None, text: bool = True) -> SegmentResult:
        """Correct what ``prompt`` gave with include/exclude clicks and boxes (RAS mm; see rcmed_engine.clicks).

        ``previous``: the result to correct (a SegmentResult, or a label map on the image's grid); without it
        the text segments ``slices`` first. Each click edits its own slice (refine.correct_slice); with
        ``propagate`` the corrected slices are carried to their neighbours, both ways, until the target ends,
        within ``slices``. Returns one label map, as ``segment`` does, whose provenance records the clicks.
        ``text=False`` ignores the words (clicks alone, as SAM users work; for comparison)."""
        from .refine_volume import refine

        return refine(self, image, prompt, clicks, boxes=boxes, previous=previous, propagate=propagate,
                      modality=modality, axis=axis, slices=slices, progress=progress, cancel=cancel, rgb=rgb,
                      text=text)

    @staticmethod
    def _check_range(slices: tuple[int | None, int | None] | None, n: int) -> tuple[int, int]:
        if slices is None:
            return 0, n
        lo = 0 if slices[0] is None else slices[0]
        hi = n if slices[1] is None else slices[1]
        if not (0 <= lo < hi <= n):
            raise EngineError(f"slice range {lo}:{hi} is out of bounds: this axis has slices 0:{n}")
        return lo, hi

    # ----------------------------------------------------------------------------------------- one-shot adaptation
    def use_registry(self, registry: "ClassRegistry | str | None") -> None:
        """Set the class registry that segment/segment_many use when they are given none (None: no default)."""
        from .otfa import as_registry

        self.registry = as_registry(registry)

    def _registry(self, registry: "ClassRegistry | str | None", must_exist: bool = False,
                  create: bool = False) -> "ClassRegistry | None":
        """The registry to use: the one given, else the one use_registry set, else the user's default folder
        (otfa.default_registry_dir(); $RCMED_REGISTRY) when it holds a registry, or ``create`` is set."""
        from .otfa import as_registry, default_registry_dir

        chosen = registry if registry is not None else getattr(self, "registry", None)
        if chosen is None:
            default = default_registry_dir()
            if create or (default / "registry.json").is_file():
                chosen = default
        return as_registry(chosen, must_exist)

    def _plan_adaptation(self, targets: list[list[str]], registry, otfa):
        """The OTFA plan for a call, or None when no target names a registered class."""
        from .otfa import RegistryError, plan_adaptation

        try:
            reg = self._registry(registry)
            if reg is None:
                return None
            return plan_adaptation(self.model, targets, reg, otfa, self.preset, self.model.config.out_dim)
        except RegistryError as exc:
            raise EngineError(str(exc)) from None

    def register_class(self, image: Volume | np.ndarray, mask: Volume | np.ndarray, name: str, axis: str = "axial",
                       slice_index: int | None = None, modality: str | None = None,
                       registry: "ClassRegistry | str | None" = None, label: int | None = None,
                       otfa: "OTFAConfig | None" = None, slice: int | None = None,
                       rgb: bool | None = None) -> dict[str, object]:
        """Register the class ``name`` from one outlined slice of ``image`` (a new shot when it exists).

        mask: a label map on the image's grid (same shape; same geometry when both are Volumes); the
        structure is ``mask == label``, or every non-zero voxel when label is None. slice_index: the slice
        along ``axis`` as the engine cuts it (what ``--slices`` counts); None takes the slice with the
        largest area (``slice`` is an alias). Every check runs before the registry is touched: a failed
        registration leaves it byte-identical. Returns what was registered (name, shots, slice, area, support Dice per strategy).
        """
        from . import otfa as _otfa

        if slice is not None:  # the name RemoteEngine and the server use
            if slice_index is not None and int(slice_index) != int(slice):
                raise EngineError(f"slice_index={slice_index} and slice={slice} disagree; give one of them")
            slice_index = slice
        try:
            shown = _otfa.validate_name(name)
            reg = self._registry(registry, create=True)
        except _otfa.RegistryError as exc:
            raise EngineError(str(exc)) from None
        volume = as_volume(image, rgb)
        mvol = _as_label_volume(mask)
        if mvol.array.ndim != 3:
            raise EngineError(f"the mask must be a scalar label map, got an array of shape {mvol.array.shape}")
        if mvol.shape_zyx != volume.shape_zyx:
            raise EngineError(f"the mask's shape {'x'.join(map(str, mvol.shape_zyx))} (z, y, x) differs from the "
                              f"image's {'x'.join(map(str, volume.shape_zyx))}: draw the mask on this image")
        if isinstance(image, Volume) and isinstance(mask, Volume):
            g, h = volume.geometry, mvol.geometry
            atol = 1e-3 * min(g.spacing)
            if (not np.allclose(g.origin, h.origin, rtol=0, atol=atol)
                    or not np.allclose(g.spacing, h.spacing, rtol=1e-4, atol=0)
                    or not np.allclose(g.direction, h.direction, rtol=0, atol=1e-4)):
                raise EngineError(f"the mask's geometry (origin {h.origin}, spacing {h.spacing}) differs from the "
                                  f"image's (origin {g.origin}, spacing {g.spacing}): resample the mask onto the image")
        values = mvol.array
        if not (np.issubdtype(values.dtype, np.number) or values.dtype == np.bool_):
            raise EngineError(f"unsupported mask voxel type {values.dtype}")
        if label is None:
            structure = values != 0
            what = "it has no non-zero voxel"
        else:
            structure = values == label
            present = sorted(int(v) for v in np.unique(values) if v != 0)[:20]
            what = f"it has no voxel with label {label} (labels present: {present or 'none'})"
        if not structure.any():
            raise EngineError(f"the mask is empty: {what}; outline the structure on at least one slice")
        with self._lock:
            try:
                prep = self.prepare(volume, modality, axis)
            except EngineError:
                if modality not in (None, "auto") or infer_modality(volume.array, volume.meta) is not None:
                    raise
                # The modality only sets the intensity window here: an unknown one gets the percentile
                # window every modality but CT uses (the record says so).
                prep = self.prepare(volume, "MR", axis)
                modality = "unknown"
            mstack = to_slices(structure, prep.frame)
            n = mstack.shape[0]
            areas = mstack.reshape(n, -1).sum(1)
            if slice_index is None:
                k = int(np.argmax(areas))
            else:
                k = int(slice_index)
                if not 0 <= k < n:
                    raise EngineError(f"slice {k} is out of range: the {axis} axis of this image has {n} slices "
                                      f"(0..{n - 1})")
                if areas[k] == 0:
                    on = np.nonzero(areas)[0]
                    raise EngineError(f"slice {k} of the mask is empty along the {axis} axis; the structure is on "
                                      f"slices {int(on.min())}..{int(on.max())}")
            rgb = to_uint8_rgb(np.ascontiguousarray(prep.stack[k:k + 1]), prep.window)
            feats, _ = self._image_features(rgb, prep.transform)
            support = np.ascontiguousarray(mstack[k])
            record = {"source_sha256": content_hash(np.asarray(volume.array)), "slice": k, "axis": axis,
                      "mask_sha256": content_hash(np.ascontiguousarray(mstack[k]).astype(np.uint8)),
                      "slices_on_axis": n, "modality": "unknown" if modality == "unknown" else prep.modality,
                      "area_pixels": int(areas[k]),
                      "image_shape": list(volume.shape_zyx), "preset": self.preset,
                      "weights_sha256": self.weights_sha256, "engine_version": __version__}
            if isinstance(volume.meta, dict) and volume.meta.get("source"):
                record["source"] = str(volume.meta["source"])
            try:
                shot = _otfa.make_shot(feats.neck[0], rgb[0], support, prep.transform, (k + 0.5) / n)
                shot.scores = _otfa.calibrate_shot(self.model, shot, otfa or _otfa.OTFAConfig(), feats.neck,
                                                   rgb[0], support, prep.transform)
                info = reg.add_shot(shown, shot, preset=self.preset, embedding_dim=int(feats.neck.shape[1]),
                                    record=record)
            except _otfa.RegistryError as exc:
                raise EngineError(str(exc)) from None
        return {"registry": str(reg.folder), "name": info.name, "shots": info.shots, "slice": k, "axis": axis,
                "area_pixels": int(areas[k]), "strategy": info.strategy, "support_dice": dict(shot.scores),
                "modality": record["modality"]}

    def list_classes(self, registry: "ClassRegistry | str | None" = None) -> list[dict[str, object]]:
        """The registered classes (name, shots, preset, strategy, dates, per-shot records)."""
        from .otfa import RegistryError

        try:
            reg = self._registry(registry)
            return [] if reg is None else [i.as_dict() for i in reg.list()]
        except RegistryError as exc:
            raise EngineError(str(exc)) from None

    def remove_class(self, name: str, registry: "ClassRegistry | str | None" = None) -> dict[str, object]:
        """Remove a registered class and its tensors; returns what it was (ClassNotFound, a KeyError, if none)."""
        from .otfa import ClassNotFound, RegistryError

        try:
            reg = self._registry(registry)
            if reg is None:
                raise ClassNotFound(f"no class named {name!r}: no class registry is in use")
            return reg.remove(name).as_dict()
        except RegistryError as exc:
            if isinstance(exc, KeyError):  # ClassNotFound: a ValueError and a KeyError already
                raise
            raise EngineError(str(exc)) from None
