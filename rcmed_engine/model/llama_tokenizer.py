"""The released model's tokenizer: transformers 4.28's slow ``LlamaTokenizer``, on SentencePiece directly.

The released SyRe weights were trained with transformers 4.28 and ``use_fast=False``. transformers 5 has
no slow tokenizer (``use_fast=False`` is ignored) and its fast one tokenises the prompt differently (145
ids against 156 or 150 on the same folder, 7.9% of mask pixels flipped; SYRE_SPEC §8). This module
reproduces 4.28's ``PreTrainedTokenizer.tokenize`` + ``LlamaTokenizer._tokenize`` exactly:

1. The text is cut at every no-split token, leftmost first and longest first (4.28's ``Trie.split``,
   never producing empty pieces). The no-split tokens are the added tokens (``<im_start>`` ...
   ``</p>``) and the special ones (``<s>``, ``</s>``, ``<unk>``).
2. The added tokens were added with ``add_tokens(..., special_tokens=True)`` as plain strings, so 4.28
   strips the whitespace on both sides of them (the piece to the left is ``rstrip``-ed, the piece to the
   right ``lstrip``-ed, all whitespace, newlines included). ``<s>``, ``</s>`` and ``<unk>`` are
   ``AddedToken(lstrip=False, rstrip=False)`` in ``LlamaTokenizer``: they are cut out but strip nothing.
3. Pieces left empty are dropped; every other text piece is encoded by ``sp.encode(piece, str)`` on its
   own, so each gets SentencePiece's dummy-prefix "▁" (``"[SEG]."`` → ``[SEG]``, ``▁``, ``.``).
4. ``encode`` follows ``tokenizer_image_token``: split on ``<image>``, BOS before each piece, only the
   first kept, ``IMAGE_TOKEN_INDEX`` (-200) between pieces.

It offers the ``PromptTokenizer`` interface (``encode``, ``token_id``, ``eos_token``, ``pad_id``,
``__len__``, ``hf``), so ``RCMed`` uses it unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Sequence

from ..prompts import ADDED_TOKENS, IMAGE_TOKEN

IMAGE_TOKEN_INDEX = -200
SP_MODEL_NAME = "tokenizer.model"
ADDED_TOKENS_NAME = "added_tokens.json"
SPECIAL_TOKENS_NAME = "special_tokens_map.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
TOKENIZER_FILES = (SP_MODEL_NAME, ADDED_TOKENS_NAME, SPECIAL_TOKENS_NAME, TOKENIZER_CONFIG_NAME)


class TokenizerError(ValueError):
    """A tokenizer folder that does not describe the released vocabulary."""


def _token_content(value: object) -> str | None:
    """A special-token entry as 4.28 saved it: a string or {"content": ..., "__type": "AddedToken"}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _token_strip(value: object) -> tuple[bool, bool] | None:
    """(lstrip, rstrip) of an AddedToken entry; None for a plain string (4.28 then strips both sides)."""
    if isinstance(value, dict):
        return bool(value.get("lstrip", False)), bool(value.get("rstrip", False))
    return None


class LlamaSlowTokenizer:
    """transformers 4.28 ``LlamaTokenizer(use_fast=False)`` semantics on a SentencePiece model."""

    def __init__(self, sp_model_file: str | Path, added_tokens: dict[str, int] | None = None,
                 bos_token: str = "<s>", eos_token: str = "</s>", unk_token: str = "<unk>",
                 strip: dict[str, tuple[bool, bool]] | None = None, add_bos: bool = True,
                 folder: str | Path | None = None) -> None:
        import sentencepiece as spm

        self.sp_model_file = Path(sp_model_file)
        self.sp = spm.SentencePieceProcessor()
        if not self.sp.Load(str(self.sp_model_file)):
            raise TokenizerError(f"cannot read the SentencePiece model {self.sp_model_file}")
        self.folder = Path(folder) if folder is not None else self.sp_model_file.parent
        self.bos_token, self.eos_token, self.unk_token = bos_token, eos_token, unk_token
        base = self.sp.GetPieceSize()
        added = dict(added_tokens or {})
        # The reference calls setup_tokenizer_and_special_tokens at load: tokens the folder lacks are
        # appended in ADDED_TOKENS order, exactly as its add_tokens calls would.
        for token in ADDED_TOKENS:
            if token not in added and self.sp.PieceToId(token) == self.sp.unk_id():
                added[token] = base + len(added)
        ids = sorted(added.values())
        if ids != list(range(base, base + len(ids))):
            raise TokenizerError(f"added token ids {ids} do not follow the SentencePiece vocabulary of {base}")
        self.added_tokens_encoder = added
        self.added_tokens_decoder = {v: k for k, v in added.items()}
        # (lstrip, rstrip) per no-split token. LlamaTokenizer wraps <s>, </s>, <unk> in AddedToken without
        # stripping; tokens added by add_tokens(str) strip both sides (4.28's tokenize "else" branch).
        self.strip: dict[str, tuple[bool, bool]] = {t: (True, True) for t in added}
        for t in (bos_token, eos_token, unk_token):
            self.strip[t] = (False, False)
        if strip:
            self.strip.update(strip)
        self.no_split = sorted(self.strip, key=len, reverse=True)
        self._first_chars = "".join(sorted({t[0] for t in self.no_split}))
        self.add_bos = add_bos
        self.bos_token_id = self._convert_token(bos_token)
        self.eos_token_id = self._convert_token(eos_token)
        self.unk_token_id = self._convert_token(unk_token)
        self.pad_id = self.unk_token_id  # the reference sets pad = unk
        self.pad_token_id = self.pad_id
        self.vocab_size = base

    # --------------------------------------------------------------------------------------- loading
    @classmethod
    def from_folder(cls, folder: str | Path) -> "LlamaSlowTokenizer":
        """Read a tokenizer folder as transformers 4.28 saved it (tokenizer.model, added_tokens.json,
        special_tokens_map.json, tokenizer_config.json; the last three optional)."""
        folder = Path(folder)
        sp_file = folder / SP_MODEL_NAME
        if not sp_file.is_file():
            raise TokenizerError(f"no {SP_MODEL_NAME} in {folder}: the released model needs the slow LLaMA "
                                 "tokenizer files")
        added: dict[str, int] = {}
        if (folder / ADDED_TOKENS_NAME).is_file():
            added = {str(k): int(v) for k, v in read_json_object(folder / ADDED_TOKENS_NAME).items()}
        config = read_json_object(folder / TOKENIZER_CONFIG_NAME) if (folder / TOKENIZER_CONFIG_NAME).is_file() else {}
        for tid, entry in (config.get("added_tokens_decoder") or {}).items():  # newer saves
            content = _token_content(entry)
            if content is not None and content not in added and int(tid) >= 0:
                added.setdefault(content, int(tid))
        special = read_json_object(folder / SPECIAL_TOKENS_NAME) if (folder / SPECIAL_TOKENS_NAME).is_file() else {}
        names = {}
        for key, default in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>")):
            names[key] = _token_content(special.get(key)) or _token_content(config.get(key)) or default
        strip: dict[str, tuple[bool, bool]] = {}
        # Tokens listed as additional special tokens with explicit AddedToken flags keep those flags
        # (4.28's "AddedToken" branch); plain strings strip both sides.
        for entry in list(special.get("additional_special_tokens") or []):
            content, flags = _token_content(entry), _token_strip(entry)
            if content is not None and flags is not None:
                strip[content] = flags
        # base vocabulary ids only below the added ones
        base_added = {k: v for k, v in added.items() if v >= 0}
        add_bos = bool(config.get("add_bos_token", True))
        return cls(sp_file, base_added, names["bos_token"], names["eos_token"], names["unk_token"], strip,
                   add_bos=add_bos, folder=folder)

    def save(self, folder: str | Path) -> None:
        """Write the files a 4.28 ``save_pretrained`` would (what ``from_folder`` reads back)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.sp_model_file.resolve() != (folder / SP_MODEL_NAME).resolve():
            shutil.copyfile(self.sp_model_file, folder / SP_MODEL_NAME)
        write_tokenizer_json(folder, self.added_tokens_encoder, self.bos_token, self.eos_token, self.unk_token)

    # --------------------------------------------------------------------------------------- tokenising
    def _split_no_split(self, text: str) -> list[str]:
        """4.28 ``Trie.split``: cut at the leftmost match, longest first; no empty pieces."""
        pieces: list[str] = []
        start = i = 0
        n = len(text)
        while i < n:
            match = None
            if text[i] in self._first_chars:  # a cheap filter before the longest-first scan
                for tok in self.no_split:
                    if text.startswith(tok, i):
                        match = tok
                        break
            if match is None:
                i += 1
                continue
            if i > start:
                pieces.append(text[start:i])
            pieces.append(match)
            i += len(match)
            start = i
        if start < n:
            pieces.append(text[start:])
        return pieces

    def tokenize(self, text: str) -> list[str]:
        """Pieces as 4.28 ``LlamaTokenizer.tokenize`` gives them (no BOS)."""
        tokens = self._split_no_split(text)
        no_split = set(self.no_split)
        for i, token in enumerate(tokens):
            if token not in no_split:
                continue
            lstrip, rstrip = self.strip[token]
            left = tokens[i - 1] if i > 0 else None
            right = tokens[i + 1] if i < len(tokens) - 1 else None
            if rstrip and right:
                tokens[i + 1] = right.lstrip()
            if lstrip and left:
                tokens[i - 1] = left.rstrip()
        out: list[str] = []
        for token in tokens:
            if not token:
                continue
            if token in no_split:
                out.append(token)
            else:
                out.extend(self.sp.encode(token, out_type=str))
        return out

    def _convert_token(self, token: str) -> int:
        if token in self.added_tokens_encoder:
            return self.added_tokens_encoder[token]
        return int(self.sp.PieceToId(token))

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        if isinstance(tokens, str):
            return self._convert_token(tokens)
        return [self._convert_token(t) for t in tokens]

    def encode_text(self, text: str) -> list[int]:
        """Ids of a text piece, without BOS."""
        return [self._convert_token(t) for t in self.tokenize(text)]

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        """``tokenizer_image_token``: ids with ``IMAGE_TOKEN_INDEX`` where ``<image>`` stands."""
        ids: list[int] = [self.bos_token_id] if (self.add_bos if bos is None else bos) else []
        for i, piece in enumerate(text.split(IMAGE_TOKEN)):
            if i:
                ids.append(IMAGE_TOKEN_INDEX)
            ids.extend(self.encode_text(piece))
        return ids

    def __call__(self, text: str, add_special_tokens: bool = True):  # a small part of the HF call API
        from types import SimpleNamespace

        ids = self.encode_text(text)
        return SimpleNamespace(input_ids=([self.bos_token_id] if add_special_tokens and self.add_bos else []) + ids)

    def token_id(self, token: str) -> int:
        tid = self._convert_token(token)
        if tid == self.unk_token_id and token != self.unk_token:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return tid

    def decode(self, ids: Iterable[int]) -> str:
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            if i < 0:
                continue
            if i in self.added_tokens_decoder:
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                out.append(self.added_tokens_decoder[i])
            else:
                run.append(int(i))
        if run:
            out.append(self.sp.decode(run))
        return " ".join(out)

    def get_vocab(self) -> dict[str, int]:
        vocab = {self.sp.IdToPiece(i): i for i in range(self.sp.GetPieceSize())}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def __len__(self) -> int:
        return self.sp.GetPieceSize() + len(self.added_tokens_encoder)

    @property
    def hf(self) -> "LlamaSlowTokenizer":
        """``PromptTokenizer.hf`` stands for the underlying tokenizer; this class is its own."""
        return self


def read_json_object(path: Path, error: type[Exception] = TokenizerError) -> dict:
    """The JSON object in ``path``; ``error`` (one line naming the file) when it is unreadable or not an object.
    Also the released checkpoint's reader (``syre``), with its own error class."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise error(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise error(f"{path} does not hold a JSON object")
    return data


def _added_token(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": False}


def write_tokenizer_json(folder: str | Path, added: dict[str, int], bos: str = "<s>", eos: str = "</s>",
                         unk: str = "<unk>", model_max_length: int = 1536) -> None:
    """The JSON files transformers 4.28 writes for the released tokenizer (the slow LlamaTokenizer)."""
    folder = Path(folder)
    files = {
        ADDED_TOKENS_NAME: dict(sorted(added.items(), key=lambda kv: kv[1])),
        SPECIAL_TOKENS_NAME: {"bos_token": _added_token(bos), "eos_token": _added_token(eos),
                              "pad_token": unk, "unk_token": _added_token(unk)},
        TOKENIZER_CONFIG_NAME: {"add_bos_token": True, "add_eos_token": False, "bos_token": _added_token(bos),
                                "clean_up_tokenization_spaces": False, "eos_token": _added_token(eos),
                                "model_max_length": model_max_length, "pad_token": None, "padding_side": "right",
                                "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
                                "unk_token": _added_token(unk)},
    }
    for name, data in files.items():
        tmp = folder / f".{name}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, folder / name)


def train_llama_sentencepiece(folder: str | Path, corpus: Sequence[str], vocab_size: int = 512) -> Path:
    """Train, offline, a SentencePiece model with LLaMA's settings and write a 4.28-style tokenizer folder.

    LLaMA's trainer spec: BPE, byte fallback, digits split, identity normalisation, dummy prefix, extra
    whitespace kept, <unk>/<s>/</s> = 0/1/2, no pad. The seven added tokens follow in the released
    order (SYRE_SPEC §2). For tests and benchmarks; the released folder ships its own ``tokenizer.model``.
    """
    import io

    import sentencepiece as spm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(corpus)), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", add_dummy_prefix=True,
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, split_by_whitespace=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, max_sentencepiece_length=16, character_coverage=1.0,
        num_threads=1, minloglevel=2, hard_vocab_limit=False,
    )
    (folder / SP_MODEL_NAME).write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    base = sp.GetPieceSize()
    write_tokenizer_json(folder, {t: base + i for i, t in enumerate(ADDED_TOKENS)})
    return folder
