"""What the engine returns and raises, without PyTorch: a remote-only client shares these types."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .geometry import Geometry, Volume
from .io import SegmentInfo
from .terminology import segment_color


class EngineError(ValueError):
    """Input the engine cannot work on; the message says what to change."""


class Cancelled(RuntimeError):
    """The caller cancelled a running job; nothing was written."""


class CancelToken(Protocol):
    def is_set(self) -> bool: ...


@dataclass
class SegmentResult:
    """One prompt on one image.

    labels: uint8 label map (z, y, x) in the input's exact geometry, label t + 1 for target t.
    presence: (T, n) presence probability per target and processed slice (NaN where not processed).
    """

    labels: np.ndarray
    geometry: Geometry
    targets: list[str]
    presence: np.ndarray
    slices: tuple[int, int]
    axis: str
    modality: str
    answer: str
    prompt: str
    timings: dict[str, float]
    provenance: dict[str, str]
    notes: list[str] = field(default_factory=list)  # e.g. a target the weights were not trained on

    def mask(self, target: int | str = 0) -> np.ndarray:
        index = self.targets.index(target) if isinstance(target, str) else target
        return self.labels == index + 1

    def segments(self) -> list[SegmentInfo]:
        out = []
        for t, name in enumerate(self.targets):
            scores = self.presence[t][np.isfinite(self.presence[t])]
            tags = dict(self.provenance)
            # Axis and range say which slices the text reached: `rcmed refine` segments a clicked slice beyond them first.
            tags.update({"RCMed.axis": self.axis, "RCMed.slices": f"{self.slices[0]}:{self.slices[1]}"})
            tags.update({"RCMed.target": name, "RCMed.presence": f"{float(scores.max()) if scores.size else 0:.4f}",
                         "RCMed.answer": self.answer})
            out.append(SegmentInfo(name=name, label_value=t + 1, color=segment_color(name, t), tags=tags))
        return out

    def volume(self) -> Volume:
        return Volume(self.labels, self.geometry, {"targets": list(self.targets)})


IDENTITY_GEOMETRY = Geometry((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))


def as_volume(image: Volume | np.ndarray, rgb: bool | None = None) -> Volume:
    """What both engines make of an input, so local and remote engines see the same voxels.

    A Volume is returned as is: its colour is what the file reader found (``Volume.is_rgb``); an ``rgb``
    that contradicts it is an error. A plain array gets identity geometry, and ``rgb`` says whether its
    last axis holds colour:

    - ``rgb=True``: ``(H, W, 3)`` is one colour image, ``(n, H, W, 3)`` a colour stack;
    - ``rgb=False``: ``(H, W)`` is one grey image, ``(n, H, W)`` a grey volume, even when ``W == 3``;
    - ``rgb=None`` (the default, kept for callers that do not say): a uint8 ``(H, W, 3)`` array is taken for
      one colour image, any other 3D array for a grey volume, a 4D array for a colour stack.
    """
    if isinstance(image, Volume):
        if rgb is not None and bool(rgb) != image.is_rgb:
            found = "colour" if image.is_rgb else "grey"
            raise EngineError(f"rgb={rgb} was given for a {found} image of shape {image.array.shape}")
        return image
    array = np.asarray(image)
    if rgb is None:  # the old guess: one uint8 RGB picture is far commoner than a 3-column grey volume
        if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] == 3 and array.dtype == np.uint8):
            array = array[None]
    elif rgb:
        if array.ndim not in (3, 4) or array.shape[-1] != 3:
            raise EngineError(f"rgb=True needs an (H, W, 3) image or an (n, H, W, 3) stack, got shape {array.shape}")
        if array.ndim == 3:
            array = array[None]
    else:
        if array.ndim == 2:
            array = array[None]
        if array.ndim != 3:
            raise EngineError(f"rgb=False needs an (H, W) image or an (n, H, W) volume, got shape {array.shape}")
    if array.ndim not in (3, 4):
        raise EngineError(f"expected a 2D slice or a 3D volume, got an array of shape {array.shape}")
    return Volume(array, IDENTITY_GEOMETRY, {})
