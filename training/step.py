"""One teacher-forced training step of RCMed: samples → token ids and labels → losses."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rcmed_engine.model.rcmed import RCMed
from rcmed_engine.model.tokenizer import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from rcmed_engine.prompts import build_answer, build_conversation, build_question

from .losses import LossWeights, rcmed_loss


@dataclass
class EncodedSample:
    ids: list[int]
    labels: list[int]  # IGNORE_INDEX over the system and user turns, as the released training does


def encode_sample(model: RCMed, targets: list[str], modality_text: str, present: bool) -> EncodedSample:
    cfg = model.config.prompt
    conv = build_conversation(cfg.system, build_question(targets, modality_text, cfg.question_index),
                              build_answer(targets, modality_text, present), model.tokenizer.eos_token)
    ids = model.tokenizer.encode(conv.text)
    head = conv.text[: conv.text.index(" ASSISTANT: ") + len(" ASSISTANT:")]
    n_head = len(model.tokenizer.encode(head))
    labels = [IGNORE_INDEX] * n_head + ids[n_head:]
    return EncodedSample(ids, labels)


def collate(samples: list[EncodedSample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and labels, each (B, L)."""
    width = max(len(s.ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, : len(s.ids)] = torch.tensor(s.ids)
        labels[i, : len(s.labels)] = torch.tensor(s.labels)
        mask[i, : len(s.ids)] = 1
    return ids, mask, labels


def expand_labels(labels: torch.Tensor, ids: torch.Tensor, n_image: int) -> torch.Tensor:
    """Labels aligned with the expanded sequence: the placeholder becomes n_image ignored positions."""
    at = int((ids[0] == IMAGE_TOKEN_INDEX).nonzero()[0])
    pad = labels.new_full((labels.shape[0], n_image), IGNORE_INDEX)
    return torch.cat([labels[:, :at], pad, labels[:, at + 1:]], dim=1)


def forward_losses(model: RCMed, pixels: torch.Tensor, samples: list[EncodedSample],
                   masks: list[torch.Tensor], weights: LossWeights = LossWeights()) -> dict[str, torch.Tensor]:
    """Losses for a batch. pixels (B, 3, S, S); masks[b] is (T_b, S, S) in the padded frame, one per [SEG]
    of sample b (T_b = 0 for a negative sample)."""
    ids, attn, labels = collate(samples, model.tokenizer.pad_id)
    ids, attn, labels = ids.to(model.device), attn.to(model.device), labels.to(model.device)
    _, hidden, image_embedding = model.forward_train(pixels, ids, attn, with_logits=False)
    n_img = model.config.num_image_tokens
    exp_labels = expand_labels(labels, ids, n_img)
    # The vocabulary projection only where a token is scored (the answer, ~20 of ~330 positions): the
    # full (B, L, V) logits and their backward cost more than the rest of the language model's head.
    scored = exp_labels[:, 1:] != IGNORE_INDEX
    logits = model.language_model.get_output_embeddings()(hidden[:, :-1][scored])
    targets = exp_labels[:, 1:][scored]
    mask_logits, mask_targets = [], []
    size = pixels.shape[-1]
    for b in range(ids.shape[0]):
        seg = (ids[b] == model.seg_token_id).nonzero().flatten()
        if seg.numel() == 0:
            continue
        states = hidden[b, seg - 1 + n_img - 1]  # the state that predicts each [SEG]
        low = model.decode_masks(image_embedding[b:b + 1], model.text_hidden_fcs(states)[None])[0]
        mask_logits.append(F.interpolate(low[None].float(), size=(size, size), mode="bilinear",
                                         align_corners=False)[0])
        mask_targets.append(masks[b].to(low.device).float())
    ml = torch.cat(mask_logits) if mask_logits else hidden.new_zeros((0, size, size))
    mt = torch.cat(mask_targets) if mask_targets else hidden.new_zeros((0, size, size))
    presence = None
    if weights.presence:
        presence = presence_pairs(model, logits, targets, scored)
    return rcmed_loss(logits, targets, ml, mt, weights, presence)


def presence_ids(model: RCMed) -> tuple[int, int]:
    """The token ids where a positive and a negative answer part ("contains" / "does"), as the engine reads."""
    ids = getattr(model, "_presence_ids", None)
    if ids is None:
        plan = model.plan_prompt(["x"], "x")
        ids = (plan.positive_id, plan.negative_id)
        object.__setattr__(model, "_presence_ids", ids)
    return ids


def presence_pairs(model: RCMed, logits: torch.Tensor, targets: torch.Tensor,
                   scored: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row, the first scored position whose target is "contains" or "does": its two logits
    (N, 2) and whether the answer says present (N,). logits/targets are gathered at ``scored`` (B, L-1)."""
    pos, neg = presence_ids(model)
    row = scored.nonzero()[:, 0]  # the row of each gathered position
    hit = (targets == pos) | (targets == neg)
    picks = []
    for b in range(scored.shape[0]):
        where = (hit & (row == b)).nonzero().flatten()
        if where.numel():
            picks.append(int(where[0]))
    index = torch.tensor(picks, dtype=torch.long, device=logits.device)
    return logits[index][:, [pos, neg]], targets[index] == pos
