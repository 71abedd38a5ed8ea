"""Colour Region Description (CRD): a mask drawn as a coloured region over its slice, turned into words.

Two describers share one interface, ``describe(rgb, mask, class_name, modality_text) -> str``:

* ``GeometricDescriber``: deterministic. Shape from image moments and convexity, location by quadrant
  (and the patient's side for axial/coronal cuts, which the engine displays radiologically), size
  relative to the slice, and the number of connected components. It states only what the mask
  measures, so it cannot hallucinate.
* ``VLMDescriber``: renders the coloured overlay and asks a vision-language model loaded with
  transformers from a local folder. Without that folder it raises ``DescriberError`` (or, when given a
  fallback describer, uses it and says so in ``last_source``).

``DescriptionCache`` keeps descriptions in a JSONL file next to the data set, keyed by describer, case,
plane, slice, class and the mask's content hash, so they are computed once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np

from rcmed_engine.preprocess import content_hash

OVERLAY_COLOUR = (255, 0, 0)  # red, the colour named in the VLM prompt


class DescriberError(RuntimeError):
    """A describer that cannot run (e.g. the VLM folder is missing)."""


def render_overlay(rgb: np.ndarray, mask: np.ndarray, colour=OVERLAY_COLOUR, alpha: float = 0.45) -> np.ndarray:
    """(H, W, 3) uint8 with the mask blended in ``colour`` and its outline drawn fully opaque."""
    rgb = np.asarray(rgb)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=-1)
    out = rgb.astype(np.float32).copy()
    m = np.asarray(mask, bool)
    out[m] = (1 - alpha) * out[m] + alpha * np.asarray(colour, np.float32)
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, tuple(int(c) for c in colour), 1)
    return out


# ------------------------------------------------------------------------------------------- geometric
def _components(mask: np.ndarray, min_pixels: int) -> tuple[int, np.ndarray]:
    n, lab, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = [i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= min_pixels]
    return len(keep), np.isin(lab, keep)


def shape_word(mask: np.ndarray) -> str:
    """round / oval / elongated / irregular, from the moments' axis ratio and the solidity."""
    ys, xs = np.nonzero(mask)
    if len(ys) < 3:
        return "small"
    cov = np.cov(np.stack([ys, xs]).astype(np.float64)) + np.eye(2) * (1.0 / 12)  # pixel extent
    ev = np.sort(np.linalg.eigvalsh(cov))
    elongation = float(np.sqrt(ev[1] / max(ev[0], 1e-9)))
    pts = np.stack([xs, ys], axis=1).astype(np.int32)
    hull = cv2.convexHull(pts)
    hull_area = cv2.contourArea(hull) + 0.5 * cv2.arcLength(hull, True) + 1.0  # pixel-centre hull, grown
    solidity = min(1.0, len(ys) / hull_area)
    if solidity < 0.75:
        return "irregular"
    if elongation >= 3.0:
        return "elongated"
    if elongation >= 1.4:
        return "oval"
    return "round"


def location_words(cy: float, cx: float) -> str:
    """Quadrant words from a centroid in normalised (0..1) slice coordinates."""
    v = "upper" if cy < 0.4 else "lower" if cy > 0.6 else ""
    h = "left" if cx < 0.4 else "right" if cx > 0.6 else ""
    if v and h:
        return f"in the {v} {h} quadrant of the image"
    if v or h:
        return f"in the {v or h} part of the image"
    return "in the centre of the image"


def size_words(fraction: float) -> str:
    pct = 100.0 * fraction
    word = "tiny" if pct < 0.5 else "small" if pct < 5 else "medium-sized" if pct < 20 else "large"
    return f"{word} ({pct:.1f}% of the slice)" if pct >= 0.1 else f"{word} (under 0.1% of the slice)"


class GeometricDescriber:
    """Deterministic shape, location, size and count: no words that the mask does not support."""

    name = "geometric"

    def __init__(self, min_component_pixels: int = 4) -> None:
        self.min_component_pixels = min_component_pixels
        self.last_source = self.name

    def describe(self, rgb: np.ndarray | None, mask: np.ndarray, class_name: str = "", modality_text: str = "",
                 plane: str | None = None) -> str:
        m = np.asarray(mask, bool)
        if not m.any():
            return "absent from this slice"
        n, kept = _components(m, self.min_component_pixels)
        if n == 0:
            n, kept = 1, m
        h, w = m.shape
        ys, xs = np.nonzero(kept)
        cy, cx = (ys.mean() + 0.5) / h, (xs.mean() + 0.5) / w
        where = location_words(cy, cx)
        if plane in ("axial", "coronal") and (cx < 0.4 or cx > 0.6):
            # The engine shows axial and coronal cuts radiologically: image left is the patient's right.
            where += f", on the patient's {'right' if cx < 0.5 else 'left'} side"
        size = size_words(m.sum() / m.size)
        if n == 1:
            return f"a single {shape_word(kept)} region {where}, {size}"
        return f"{n} separate regions, centred {where}, together {size}"


# ------------------------------------------------------------------------------------------------- VLM
VLM_PROMPT = ("The region drawn in red on this {modality} image is the {class_name}. In one sentence, "
              "describe the red region's shape, its location in the image and its size relative to the "
              "image. Describe only what is visible; do not guess a diagnosis.")


class VLMDescriber:
    """A vision-language model from a local folder (transformers image-text-to-text), loaded lazily."""

    name = "vlm"

    def __init__(self, model_dir: str | Path | None, fallback: GeometricDescriber | None = None,
                 max_new_tokens: int = 60, device: str = "cpu") -> None:
        self.model_dir = Path(model_dir) if model_dir else None
        self.fallback = fallback
        self.max_new_tokens = max_new_tokens
        self.device = device
        self._model = None
        self._processor = None
        self.last_source = self.name

    def build_messages(self, class_name: str, modality_text: str) -> list[dict]:
        """The chat messages (one image, one text) that go to the processor's chat template."""
        text = VLM_PROMPT.format(modality=modality_text or "medical", class_name=class_name.replace("_", " "))
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]

    def _load(self) -> None:
        if self._model is not None:
            return
        if self.model_dir is None or not (self.model_dir / "config.json").is_file():
            raise DescriberError(f"no vision-language model folder at {self.model_dir} (it needs config.json "
                                 "and weights, loadable with transformers AutoModelForImageTextToText)")
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self._processor = AutoProcessor.from_pretrained(self.model_dir, local_files_only=True)
        self._model = AutoModelForImageTextToText.from_pretrained(self.model_dir, local_files_only=True)
        self._model.to(self.device).eval()

    def describe(self, rgb: np.ndarray, mask: np.ndarray, class_name: str = "", modality_text: str = "",
                 plane: str | None = None) -> str:
        try:
            self._load()
        except DescriberError:
            if self.fallback is None:
                raise
            self.last_source = self.fallback.name
            return self.fallback.describe(rgb, mask, class_name, modality_text, plane)
        import torch
        from PIL import Image

        overlay = Image.fromarray(render_overlay(rgb, mask))
        prompt = self._processor.apply_chat_template(self.build_messages(class_name, modality_text),
                                                     add_generation_prompt=True)
        inputs = self._processor(images=[overlay], text=prompt, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            out = self._model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        text = self._processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
        self.last_source = self.name
        return " ".join(text.split()).rstrip(".")


def make_describer(kind: str, vlm_dir: str | None = None, fallback: bool = True):
    if kind == "geometric":
        return GeometricDescriber()
    if kind == "vlm":
        return VLMDescriber(vlm_dir, fallback=GeometricDescriber() if fallback else None)
    raise ValueError(f"unknown describer {kind!r}; use geometric or vlm")


# ------------------------------------------------------------------------------------------------ cache
class DescriptionCache:
    """JSONL cache of descriptions: one object per line, appended as new ones are made."""

    FILE = "crd_descriptions.jsonl"

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        self.path = path / self.FILE if path.is_dir() else path
        self.entries: dict[str, dict] = {}
        self.hits = self.misses = 0
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    rec = json.loads(line)
                    self.entries[rec["key"]] = rec

    @staticmethod
    def key(describer: str, case: str, plane: str, index: int, class_name: str, mask: np.ndarray) -> str:
        return f"{describer}|{case}|{plane}|{index}|{class_name}|{content_hash(np.asarray(mask, bool))[:16]}"

    def get_or_make(self, describer, case: str, plane: str, index: int, class_name: str, rgb: np.ndarray,
                    mask: np.ndarray, modality_text: str) -> str:
        k = self.key(describer.name, case, plane, index, class_name, mask)
        rec = self.entries.get(k)
        if rec is not None:
            self.hits += 1
            return rec["text"]
        self.misses += 1
        text = describer.describe(rgb, mask, class_name, modality_text, plane)
        rec = {"key": k, "describer": describer.name, "source": getattr(describer, "last_source", describer.name),
               "case": case, "plane": plane, "slice": index, "class": class_name, "text": text}
        self.entries[k] = rec
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:  # one line per write: safe to append concurrently
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return text
