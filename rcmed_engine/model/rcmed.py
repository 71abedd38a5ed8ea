"""RCMed: SAM image encoder and language model informing each other both ways.

Inference is one teacher-forced pass (DESIGN.md). The pass is split in two so that everything that does
not depend on the prompt is computed once per slice and cached:

* prefix: system text, the image tokens (V-L projection) and the text up to the question. Its key/value
  cache and the L-V term (hidden states at the image positions → lv_projection → added to the neck
  embedding) depend only on the slice.
* suffix: question and answer. The hidden state that predicts each [SEG] becomes a sparse prompt for
  the mask decoder; the logits where the answer says "contains" score whether the target is present.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from ..prompts import ADDED_TOKENS, SEG_TOKEN, build_answer, build_conversation, build_question
from .config import RCMedConfig
from .projections import HiddenToPrompt, VLProjection, lv_to_grid
from .tokenizer import IMAGE_TOKEN_INDEX, PromptTokenizer


@dataclass
class ImageFeatures:
    """Encoder outputs for B slices: neck (B, 256, E, E) and pre-neck (B, C, E, E)."""

    neck: torch.Tensor
    pre_neck: torch.Tensor


@dataclass
class PrefixState:
    """The prompt-free part of the pass for B slices.

    kv: per layer (keys, values), each (B, heads, L_prefix, head_dim); image_embedding: the neck
    embedding with the L-V term added, (B, 256, E, E).
    """

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    image_embedding: torch.Tensor
    length: int

    def select(self, index: int) -> "PrefixState":
        return PrefixState([(k[index:index + 1], v[index:index + 1]) for k, v in self.kv],
                           self.image_embedding[index:index + 1], self.length)

    @staticmethod
    def stack(states: list["PrefixState"]) -> "PrefixState":
        kv = [(torch.cat([s.kv[i][0] for s in states]), torch.cat([s.kv[i][1] for s in states]))
              for i in range(len(states[0].kv))]
        return PrefixState(kv, torch.cat([s.image_embedding for s in states]), states[0].length)

    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.kv) + self.image_embedding.nbytes


@dataclass
class PromptPlan:
    """Token rows for one prompt, shared by every slice.

    rows: suffix ids per row. seg_rows / seg_positions: for target t, the row and the suffix index of the
    token that predicts its [SEG] (one position before it, SYRE_SPEC §3.6). presence_rows /
    presence_positions: for target t, the row and the suffix index whose logits predict "contains".
    Per-target form (``PromptConfig.per_target_rows``): row t asks for target t alone and serves both. The
    released form: row 0 carries one [SEG] per target, and one extra row per target scores presence.
    """

    targets: list[str]
    modality_text: str
    rows: list[list[int]]
    seg_positions: list[int]
    presence_rows: list[int]
    presence_positions: list[int]
    answer: str
    positive_id: int
    negative_id: int
    lengths: list[int] = field(default_factory=list)
    seg_rows: list[int] = field(default_factory=list)

    @property
    def per_target(self) -> bool:
        """Each target on its own row (computed alone, so "A and B" gives what "A" and "B" give)."""
        return len(self.targets) > 1 and len(set(self.seg_rows)) == len(self.targets)


@dataclass
class SliceOutput:
    """Per slice and target: low-res mask logits (B, T, 4E, 4E) and presence probabilities (B, T)."""

    low_res_logits: torch.Tensor
    presence: torch.Tensor
    prompts: torch.Tensor | None = None  # the [SEG] prompts (B, T, 256) that gave the logits (used by OTFA)


class RCMed(nn.Module):
    def __init__(
        self,
        config: RCMedConfig,
        image_encoder: nn.Module,
        language_model: PreTrainedModel,
        tokenizer: PromptTokenizer,
        prompt_encoder: nn.Module,
        mask_decoder: nn.Module,
        base_vocab_size: int,
    ) -> None:
        super().__init__()
        self.config = config
        self.image_encoder = image_encoder
        self.language_model = language_model
        self.tokenizer = tokenizer
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.base_vocab_size = base_vocab_size
        hidden = language_model.config.hidden_size
        self.vl_projection = VLProjection(config.image_encoder.pre_neck_dim, hidden, config.vl_grid, config.vl_pool)
        self.text_hidden_fcs = HiddenToPrompt(hidden, config.out_dim)
        self.lv_projection = HiddenToPrompt(hidden, config.out_dim)
        self.seg_token_id = tokenizer.token_id(SEG_TOKEN)
        self._prefix_ids = self._split_prefix_ids()

    # ----------------------------------------------------------------------------------------- helpers
    @property
    def device(self) -> torch.device:
        return self.vl_projection.mlp[0].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.vl_projection.mlp[0].weight.dtype

    @property
    def embedding_size(self) -> int:
        return self.config.image_encoder.embedding_size

    def rcmed_parameter_names(self) -> list[str]:
        """Names of the parts RCMed adds to its two base models (what a lite checkpoint carries)."""
        own = ("vl_projection.", "text_hidden_fcs.", "lv_projection.")
        return [n for n, _ in self.named_parameters() if n.startswith(own) or ".lora_" in n]

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.get_input_embeddings()(ids)

    def _split_prefix_ids(self) -> tuple[list[int], list[int]]:
        """Ids before and after the image in the prompt-free prefix.

        Pieces are tokenised as the whole conversation would be: the part after the image is cut at the
        longest run of ids that two different questions share, so the cache never changes tokenisation.
        """
        system = self.config.prompt.system
        convs = [build_conversation(system, build_question([t], "x"), "") for t in ("alpha", "omega")]
        ids_a, ids_b = (self.tokenizer.encode(c.text) for c in convs)
        image_at = ids_a.index(IMAGE_TOKEN_INDEX)
        common = 0
        while ids_a[common] == ids_b[common]:
            common += 1
        # Leave the last shared id to the suffix: a BPE merge may still join it to the question.
        common = max(image_at + 1, common - 1)
        return ids_a[:image_at], ids_a[image_at + 1:common]

    # ----------------------------------------------------------------------------------------- planning
    def plan_prompt(self, targets: list[str], modality_text: str) -> PromptPlan:
        """Token rows for a prompt: row 0 segments every target; one extra row per target scores presence
        when there are several (row 0's single "contains" then covers the first target only)."""
        system, qi = self.config.prompt.system, self.config.prompt.question_index
        pre_a, pre_b = self._prefix_ids
        prefix_len = len(pre_a) + 1 + len(pre_b)

        def suffix_ids(names: list[str], present: bool) -> list[int]:
            conv = build_conversation(system, build_question(names, modality_text, qi),
                                      build_answer(names, modality_text, present), self.tokenizer.eos_token)
            ids = self.tokenizer.encode(conv.text)
            if ids[:prefix_len] != pre_a + [IMAGE_TOKEN_INDEX] + pre_b:
                raise RuntimeError("the prompt changed the tokenisation of the cached prefix")
            return ids[prefix_len:]

        positive = suffix_ids(targets[:1], True)
        negative = suffix_ids(targets[:1], False)
        diverge = next(i for i, (a, b) in enumerate(zip(positive, negative)) if a != b)

        def presence_at(name: str) -> int:  # each target's row has its own length before "contains"
            pos, neg = suffix_ids([name], True), suffix_ids([name], False)
            d = next(i for i, (a, b) in enumerate(zip(pos, neg)) if a != b)
            if (pos[d], neg[d]) != (positive[diverge], negative[diverge]):
                raise RuntimeError(f"the presence tokens differ for target {name!r}")
            return d - 1

        if len(targets) == 1 or self.config.prompt.per_target_rows:
            rows = [suffix_ids([t], True) for t in targets]
            presence_rows = list(range(len(targets)))
            seg_rows = list(range(len(targets)))
            seg_positions = [[i - 1 for i, tid in enumerate(row) if tid == self.seg_token_id] for row in rows]
            if any(len(s) != 1 for s in seg_positions):
                raise RuntimeError("expected one [SEG] token in each target's answer")
            seg_positions = [s[0] for s in seg_positions]
        else:
            rows = [suffix_ids(targets, True)]
            presence_rows = []
            for t in targets:
                rows.append(suffix_ids([t], True))
                presence_rows.append(len(rows) - 1)
            seg_rows = [0] * len(targets)
            seg_positions = [i - 1 for i, tid in enumerate(rows[0]) if tid == self.seg_token_id]
            if len(seg_positions) != len(targets):
                raise RuntimeError(f"expected {len(targets)} [SEG] tokens in the answer, found {len(seg_positions)}")
        conv = build_conversation(system, build_question(targets, modality_text, qi),
                                  build_answer(targets, modality_text))
        return PromptPlan(
            targets=list(targets),
            modality_text=modality_text,
            rows=rows,
            seg_positions=seg_positions,
            presence_rows=presence_rows,
            presence_positions=[diverge - 1] if len(targets) == 1 else [presence_at(t) for t in targets],
            answer=conv.suffix.split(" ASSISTANT: ", 1)[1].removesuffix("</s>"),
            positive_id=positive[diverge],
            negative_id=negative[diverge],
            lengths=[len(r) for r in rows],
            seg_rows=seg_rows,
        )

    # ----------------------------------------------------------------------------------------- passes
    def encode_image(self, pixels: torch.Tensor) -> ImageFeatures:
        """pixels (B, 3, S, S), normalised and padded → encoder features."""
        neck, pre_neck = self.image_encoder(pixels.to(self.device, self.dtype))
        return ImageFeatures(neck=neck, pre_neck=pre_neck)

    def _image_token_embeds(self, features: ImageFeatures) -> torch.Tensor:
        return self.vl_projection(features.pre_neck)

    def prefix(self, features: ImageFeatures) -> PrefixState:
        """Run the prompt-free prefix for B slices.

        The text before the image is the same for every slice: it runs once and its keys/values are
        shared by the batch; then the image tokens and the text after them run for all B slices.
        """
        pre_a, pre_b = self._prefix_ids
        b = features.neck.shape[0]
        dev = self.device
        image_tokens = self._image_token_embeds(features)
        head = self.language_model.model(inputs_embeds=self._embed(torch.tensor(pre_a, device=dev))[None],
                                         use_cache=True)
        cache = DynamicCache(ddp_cache_data=[(layer.keys.expand(b, -1, -1, -1), layer.values.expand(b, -1, -1, -1))
                                             for layer in head.cache.layers])
        embeds = torch.cat(
            [image_tokens, self._embed(torch.tensor(pre_b, device=dev)).unsqueeze(0).expand(b, -1, -1)], dim=1
        )
        out = self.language_model.model(inputs_embeds=embeds, cache=cache, use_cache=True)
        hidden = out.last_hidden_state  # after the final norm, as the released model reads it
        n_img = image_tokens.shape[1]
        lv = self.lv_projection(hidden[:, :n_img])
        image_embedding = features.neck + lv_to_grid(lv, self.config.vl_grid, self.embedding_size).to(features.neck)
        kv = [(layer.keys, layer.values) for layer in out.cache.layers]
        return PrefixState(kv=kv, image_embedding=image_embedding, length=len(pre_a) + embeds.shape[1])

    def suffix(self, prefix: PrefixState, plan: PromptPlan) -> SliceOutput:
        """Run a prompt's rows on B cached prefixes; returns mask logits and presence for each target.

        In the per-target form each target runs exactly as its own one-target prompt would (same shapes,
        so the same numbers, bit for bit); only the prefix is shared."""
        if plan.per_target:
            outs = [self._suffix(prefix, PromptPlan(
                targets=[t], modality_text=plan.modality_text, rows=[plan.rows[i]], seg_positions=[plan.seg_positions[i]],
                presence_rows=[0], presence_positions=[plan.presence_positions[i]], answer=plan.answer,
                positive_id=plan.positive_id, negative_id=plan.negative_id, lengths=[plan.lengths[i]], seg_rows=[0]))
                for i, t in enumerate(plan.targets)]
            return SliceOutput(low_res_logits=torch.cat([o.low_res_logits for o in outs], 1),
                               presence=torch.cat([o.presence for o in outs], 1),
                               prompts=torch.cat([o.prompts for o in outs], 1))
        return self._suffix(prefix, plan)

    def _suffix(self, prefix: PrefixState, plan: PromptPlan) -> SliceOutput:
        b, r = prefix.image_embedding.shape[0], len(plan.rows)
        dev = self.device
        width = max(plan.lengths)
        ids = torch.full((r, width), self.tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros((r, prefix.length + width), dtype=torch.long)
        mask[:, :prefix.length] = 1
        for i, row in enumerate(plan.rows):
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, prefix.length:prefix.length + len(row)] = 1
        ids = ids.to(dev).repeat(b, 1)  # slice-major: row index = slice * r + row
        mask = mask.to(dev).repeat(b, 1)
        cache = DynamicCache(ddp_cache_data=[(k.repeat_interleave(r, 0), v.repeat_interleave(r, 0))
                                             for k, v in prefix.kv])
        out = self.language_model.model(inputs_embeds=self._embed(ids), attention_mask=mask,
                                        cache=cache, use_cache=True)
        hidden = out.last_hidden_state.view(b, r, width, -1)

        seg_hidden = hidden[:, plan.seg_rows or [0] * len(plan.targets), plan.seg_positions]  # (B, T, D)
        prompts = self.text_hidden_fcs(seg_hidden)  # (B, T, 256)
        low_res = self.decode_masks(prefix.image_embedding, prompts)

        pres_hidden = hidden[:, plan.presence_rows, plan.presence_positions]  # (B, T, D)
        logits = self.language_model.get_output_embeddings()(pres_hidden)
        pair = torch.stack([logits[..., plan.positive_id], logits[..., plan.negative_id]], dim=-1).float()
        presence = pair.softmax(-1)[..., 0]
        return SliceOutput(low_res_logits=low_res, presence=presence, prompts=prompts)

    def decode_masks(self, image_embedding: torch.Tensor, prompts: torch.Tensor,
                     dense: torch.Tensor | None = None) -> torch.Tensor:
        """image_embedding (B, 256, E, E), prompts (B, T, 256) → low-res logits (B, T, 4E, 4E), mask token 0."""
        b, t, c = prompts.shape
        sparse_empty, dense_default = self.prompt_encoder(points=None, boxes=None, masks=None)
        sparse = torch.cat([sparse_empty.expand(b * t, -1, -1).to(prompts), prompts.reshape(b * t, 1, c)], dim=1)
        if dense is None:
            dense = dense_default.to(prompts)
        src = image_embedding.repeat_interleave(t, 0)
        masks, _ = self.mask_decoder(
            image_embeddings=src,
            image_pe=self.prompt_encoder.get_dense_pe().to(prompts),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        return masks.view(b, t, *masks.shape[-2:])

    # ----------------------------------------------------------------------------------------- training
    def forward_train(
        self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, with_logits: bool = True,
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Full teacher-forced pass for training, with the same modules as inference.

        pixels (B, 3, S, S); input_ids (B, L) with exactly one IMAGE_TOKEN_INDEX per row at the same
        index (the conversation prefix is shared); attention_mask (B, L) with 1 on real tokens.
        Returns LM logits (B, L', V) over the expanded sequence (L' = L - 1 + image tokens), the
        expanded positions map, and the image embedding with the L-V term (B, 256, E, E).
        Mask logits come from ``decode_masks`` on the hidden states the caller selects. ``with_logits=False``
        skips the vocabulary projection (None in its place) for callers that only need masks.
        """
        features = self.encode_image(pixels)
        image_tokens = self._image_token_embeds(features)
        at = int((input_ids[0] == IMAGE_TOKEN_INDEX).nonzero()[0])
        if not bool((input_ids[:, at] == IMAGE_TOKEN_INDEX).all()):
            raise ValueError("every row must have its image placeholder at the same index")
        safe = input_ids.clamp(min=0)
        n_img = image_tokens.shape[1]
        embeds = torch.cat([self._embed(safe[:, :at]), image_tokens, self._embed(safe[:, at + 1:])], dim=1)
        mask = torch.cat([attention_mask[:, :at], attention_mask.new_ones(input_ids.shape[0], n_img),
                          attention_mask[:, at + 1:]], dim=1)
        out = self.language_model.model(inputs_embeds=embeds, attention_mask=mask, use_cache=False)
        hidden = out.last_hidden_state
        lv = self.lv_projection(hidden[:, at:at + n_img])
        image_embedding = features.neck + lv_to_grid(lv, self.config.vl_grid, self.embedding_size)
        logits = self.language_model.get_output_embeddings()(hidden) if with_logits else None
        return logits, hidden, image_embedding


def added_token_rows(model: RCMed) -> slice:
    """Rows of the input embedding that belong to RCMed's added tokens."""
    return slice(model.base_vocab_size, model.base_vocab_size + len(ADDED_TOKENS))


__all__ = ["RCMed", "ImageFeatures", "PrefixState", "PromptPlan", "SliceOutput"]
