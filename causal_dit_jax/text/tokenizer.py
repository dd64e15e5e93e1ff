"""Prompt -> (ids, mask) for the umT5 text encoder, as Wan2.1 tokenizes.

Wan's `HuggingfaceTokenizer(clean='whitespace')`: ftfy.fix_text (when ftfy is installed; optional here),
html.unescape twice, whitespace collapsed and stripped; then the tokenizer with EOS appended, padded
to max_length (512) with the pad id and truncated (the EOS is kept as the last token).

- `PromptTokenizer.from_folder(path)`: the HF `google/umt5-xxl` files (tokenizer.json via the
  `tokenizers` library; spiece.model via `sentencepiece` when there is no tokenizer.json).
- `ByteTokenizer`: UTF-8 bytes + 3 (pad 0, eos 1, unk 2), for the untrained demo encoder that has no
  tokenizer files. Same interface.
"""

from __future__ import annotations

import html
import json
import pathlib
import re
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

DEFAULT_MAX_LENGTH = 512  # Wan's text_len


class Tokens(NamedTuple):
    ids: np.ndarray  # [B, L] int32, pad id after the EOS
    mask: np.ndarray  # [B, L] int32, 1 for tokens (EOS included), 0 for padding


def clean_prompt(text: str) -> str:
    """Wan's 'whitespace' cleaning: ftfy (if installed), html.unescape twice, whitespace collapse/strip."""
    try:
        import ftfy
    except ImportError:  # optional: only changes mojibake / odd unicode
        ftfy = None
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class _Tokenizer:
    """Shared cleaning, EOS, truncation and padding; subclasses turn clean text into content ids."""

    pad_id: int
    eos_id: int
    vocab_size: int

    def __init__(self, max_length: int = DEFAULT_MAX_LENGTH):
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (a token and the EOS), got {max_length}")
        self.max_length = max_length

    def _content_ids(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_one(self, prompt: str) -> list[int]:
        """Content ids of one prompt with the EOS appended, truncated to max_length (EOS kept)."""
        if not isinstance(prompt, str):
            raise TypeError(f"a prompt must be a str, got {type(prompt).__name__}")
        text = clean_prompt(prompt)
        if not text:
            raise ValueError("empty prompt (nothing left after whitespace cleaning)")
        ids = self._content_ids(text)
        room = self.max_length - 1
        if len(ids) > room:
            warnings.warn(
                f"prompt truncated to {self.max_length} tokens: {len(ids) - room} tokens dropped ({prompt[:40]!r}...)",
                stacklevel=3,
            )
            ids = ids[:room]
        return list(ids) + [self.eos_id]

    def __call__(self, prompts: str | Sequence[str]) -> Tokens:
        """One prompt or a list -> Tokens(ids [B, max_length] int32, mask [B, max_length] int32)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if len(prompts) == 0:
            raise ValueError("no prompts given")
        ids = np.full((len(prompts), self.max_length), self.pad_id, np.int32)
        mask = np.zeros((len(prompts), self.max_length), np.int32)
        for row, prompt in enumerate(prompts):
            seq = self.encode_one(prompt)
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        return Tokens(ids, mask)


class ByteTokenizer(_Tokenizer):
    """UTF-8 bytes + 3; pad 0, eos 1, unk 2 (unused), vocab 259. Deterministic, needs no files."""

    pad_id, eos_id, unk_id = 0, 1, 2
    offset = 3
    vocab_size = 256 + offset

    def _content_ids(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]


def _special_token(config: dict, name: str, default: str) -> str:
    """tokenizer_config.json / special_tokens_map.json hold either 'tok' or {'content': 'tok', ...}."""
    value = config.get(name, default)
    if isinstance(value, dict):
        value = value.get("content", default)
    return value if isinstance(value, str) else default


class PromptTokenizer(_Tokenizer):
    """The HF `google/umt5-xxl` tokenizer (or any T5-style one) with Wan's cleaning and padding."""

    def __init__(
        self,
        backend,
        eos_token: str = "</s>",
        pad_token: str = "<pad>",
        max_length: int = DEFAULT_MAX_LENGTH,
        source: str = "tokenizer",
    ):
        super().__init__(max_length)
        self._backend = backend  # ('tokenizers', Tokenizer) or ('sentencepiece', SentencePieceProcessor)
        kind, tok = backend
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True) if kind == "tokenizers" else tok.get_piece_size()
        self.eos_id = self._token_id(eos_token, "eos", source)
        self.pad_id = self._token_id(pad_token, "pad", source)

    def _token_id(self, token: str, role: str, source: str) -> int:
        kind, tok = self._backend
        if kind == "tokenizers":
            found = tok.token_to_id(token)
        else:  # sentencepiece maps unknown pieces to the unk id
            found = tok.piece_to_id(token)
            if found == tok.unk_id() and token != tok.id_to_piece(found):
                found = None
        if found is None:
            raise ValueError(f"{source}: the {role} token {token!r} is not in the vocabulary")
        return int(found)

    @classmethod
    def from_folder(cls, folder: str | pathlib.Path, max_length: int = DEFAULT_MAX_LENGTH) -> PromptTokenizer:
        """Load `tokenizer.json` (or `spiece.model`) from `folder`, or from `folder/google/umt5-xxl`
        (the layout of a Wan2.1 model directory)."""
        folder = pathlib.Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder not found: {folder}")
        nested = folder / "google" / "umt5-xxl"
        if not any((folder / f).exists() for f in ("tokenizer.json", "spiece.model")) and nested.is_dir():
            folder = nested
        config: dict = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # later files win
            if (folder / name).exists():
                try:
                    config.update(json.loads((folder / name).read_text()))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{folder / name} is not valid JSON: {e}") from e
        eos = _special_token(config, "eos_token", "</s>")
        pad = _special_token(config, "pad_token", "<pad>")

        if (folder / "tokenizer.json").exists():
            try:
                from tokenizers import Tokenizer
            except ImportError as e:
                raise ImportError(
                    f"reading {folder / 'tokenizer.json'} needs the `tokenizers` package: pip install tokenizers"
                ) from e
            try:
                backend = ("tokenizers", Tokenizer.from_file(str(folder / "tokenizer.json")))
            except Exception as e:  # the library raises a bare Exception on bad files
                raise ValueError(f"cannot read {folder / 'tokenizer.json'}: {e}") from e
            return cls(backend, eos, pad, max_length, source=str(folder / "tokenizer.json"))
        if (folder / "spiece.model").exists():
            try:
                import sentencepiece
            except ImportError as e:
                raise ImportError(
                    f"{folder} has spiece.model but no tokenizer.json; reading it needs "
                    "`sentencepiece` (pip install sentencepiece), or add the HF tokenizer.json "
                    "of google/umt5-xxl"
                ) from e
            sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
            return cls(("sentencepiece", sp), eos, pad, max_length, source=str(folder / "spiece.model"))
        raise FileNotFoundError(
            f"no tokenizer.json or spiece.model in {folder} (expected the files of "
            "google/umt5-xxl, found in a Wan2.1 model directory under google/umt5-xxl)"
        )

    def _content_ids(self, text: str) -> list[int]:
        kind, tok = self._backend
        if kind == "tokenizers":
            return list(tok.encode(text, add_special_tokens=False).ids)
        return list(tok.encode(text, out_type=int))
