"""The engine's side: which targets of a segment_many call name registered classes, and their adaptation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .adapt import adapt_slices, language_inputs, uses_language
from .config import OTFAConfig
from .errors import RegistryError
from .registry import as_registry
from .shot import ClassAdapter


@dataclass
class PromptAdaptation:
    """Which targets of which prompts name registered classes, for one segment_many call."""

    cfg: OTFAConfig
    targets: list[list[str]]
    adapters: list[dict[int, ClassAdapter]]
    language: bool

    def needs_text(self, p: int) -> bool:
        """Prompt p has targets that go through the plain text path."""
        return len(self.adapters[p]) < len(self.targets[p])

    @property
    def needs_prefix(self) -> bool:
        return self.language or any(self.needs_text(p) for p in range(len(self.targets)))

    def apply(self, model, p: int, features, rgb: np.ndarray, transform, logits: torch.Tensor | None,
              presence: np.ndarray | None, modality_text: str) -> tuple[torch.Tensor, np.ndarray]:
        """Replace the logits (b, T, H, W) and presence (b, T) of prompt p's registered targets."""
        b = rgb.shape[0]
        n_targets = len(self.targets[p])
        H, W = transform.in_hw
        if logits is None:
            logits = torch.full((b, n_targets, H, W), -1.0)
            presence = np.zeros((b, n_targets), dtype=np.float32)
        for t, adapter in self.adapters[p].items():
            image_embedding = text = None
            if self.language:
                image_embedding, text = language_inputs(model, adapter, self.cfg, features.neck, features.pre_neck,
                                                        transform, self.targets[p][t], modality_text)
            out = adapt_slices(model, adapter, self.cfg, features.neck, rgb, transform,
                               image_embedding=image_embedding, text_prompts=text)
            logits[:, t] = out.logits.to(logits.device, logits.dtype)
            presence[:, t] = out.presence.numpy()
        return logits, presence


def plan_adaptation(model, targets: list[list[str]], registry, cfg: OTFAConfig | None, preset: str,
                    embedding_dim: int) -> PromptAdaptation | None:
    """The adaptation for a call, or None when no target names a registered class (the plain path)."""
    reg = as_registry(registry, must_exist=True)
    if reg is None:
        return None
    cfg = cfg or OTFAConfig()
    adapters: list[dict[int, ClassAdapter]] = []
    for names in targets:
        found: dict[int, ClassAdapter] = {}
        for t, name in enumerate(names):
            info = reg.get(name)
            if info is None:
                continue
            if info.preset != preset or info.embedding_dim != embedding_dim:
                raise RegistryError(
                    f"class {info.name!r} was registered with the {info.preset} preset ({info.embedding_dim}-channel "
                    f"embeddings) and cannot adapt the {preset} model ({embedding_dim} channels); register it again "
                    "with this preset")
            adapter = reg.adapter(name)
            if adapter is not None:
                found[t] = adapter
        adapters.append(found)
    if not any(adapters):
        return None
    return PromptAdaptation(cfg=cfg, targets=[list(t) for t in targets], adapters=adapters,
                            language=uses_language(model, cfg))
