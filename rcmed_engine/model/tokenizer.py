"""Tokenizers: a wrapper that splits prompts on <image>, and the tiny preset's tokenizer built offline."""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ..prompts import ADDED_TOKENS, IMAGE_TOKEN, MED_SEG_QUESTIONS, PREFIX_TEMPLATE

IMAGE_TOKEN_INDEX = -200  # stands for the image tokens in id lists (SYRE_SPEC §2)
IGNORE_INDEX = -100


class PromptTokenizer:
    """Turns conversation text into ids, with ``IMAGE_TOKEN_INDEX`` where ``<image>`` stands.

    Each piece between placeholders is tokenised on its own (SYRE_SPEC §3.4, tokenizer_image_token);
    a BOS goes first when the language model expects one.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, add_bos: bool) -> None:
        self.hf = tokenizer
        self.add_bos = add_bos and tokenizer.bos_token_id is not None
        missing = [t for t in ADDED_TOKENS if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_tokens(marker_tokens(missing), special_tokens=True)
        self.eos_token: str = tokenizer.eos_token or "</s>"
        self.pad_id: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def __len__(self) -> int:
        return len(self.hf)

    def token_id(self, token: str) -> int:
        tid = self.hf.convert_tokens_to_ids(token)
        if tid is None or tid == self.hf.unk_token_id:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return int(tid)

    def encode_text(self, text: str) -> list[int]:
        return list(self.hf(text, add_special_tokens=False).input_ids)

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        ids: list[int] = [self.hf.bos_token_id] if (self.add_bos if bos is None else bos) else []
        for i, piece in enumerate(text.split(IMAGE_TOKEN)):
            if i:
                ids.append(IMAGE_TOKEN_INDEX)
            if piece:
                ids.extend(self.encode_text(piece))
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode([i for i in ids if i >= 0], skip_special_tokens=False)

    def save(self, folder: str | Path) -> None:
        self.hf.save_pretrained(str(folder))


def build_tiny_tokenizer(vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained offline on the templates and a few medical words.

    Deterministic, needs no download, and encodes any text (byte fallback), so tests can send anything.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    words = (
        "liver spleen kidney left right lung heart brain white grey gray matter cell nuclei tumor lesion "
        "disc square ring background vessel bone prostate pancreas stomach bladder aorta computed tomography "
        "magnetic resonance ultrasound microscopy X-Ray image contains does not contain segment mask"
    )
    corpus = [PREFIX_TEMPLATE.format(system="A chat between a curious human and an artificial intelligence "
                                     "assistant. The assistant gives helpful, detailed, and polite answers to "
                                     "the human's questions."), words] + list(MED_SEG_QUESTIONS)
    corpus += ["ASSISTANT: This is a image. The image contains and, The image does not contain."] * 4
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus * 8, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                 pad_token="<unk>")
    hf.add_tokens(marker_tokens(ADDED_TOKENS), special_tokens=True)
    return hf


def marker_tokens(names) -> list[AddedToken]:
    """RCMed's added tokens, stripping the whitespace on both sides as the released tokenizer does,
    so that "</p> [SEG]" has no space token between: </p> itself predicts [SEG] (SYRE_SPEC §3.4, §3.6)."""
    return [AddedToken(t, lstrip=True, rstrip=True, special=True, normalized=False) for t in names]
