"""Tokenizers of the T5 family, backed by the ``tokenizers`` library.

``T5TokenizerFast`` (also ``T5Tokenizer``, ``MT5Tokenizer``, ``MT5TokenizerFast``) is a Unigram model
with SentencePiece's precompiled normaliser, built from ``tokenizer.json`` or converted offline
from a SentencePiece ``spiece.model``. Its pipeline is the reference's (transformers 5.23):
Precompiled normaliser; WhitespaceSplit then Metaspace("▁", prepend always) pre-tokeniser;
``</s>`` appended to every sequence. ``<extra_id_N>`` sentinels sit at the top of the vocabulary,
``<extra_id_0>`` highest. ``ByT5Tokenizer`` maps UTF-8 bytes to ids 3..258.

See ``docs/tokenizers.md`` for where the reference and raw SentencePiece disagree, and which we follow.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Sequence

from ._files import atomic_path, atomic_write_text, resolve_file
from .config import _read_json

__all__ = [
    "T5TokenizerFast",
    "T5Tokenizer",
    "MT5Tokenizer",
    "MT5TokenizerFast",
    "ByT5Tokenizer",
    "AutoTokenizer",
    "BatchEncoding",
]

SPIECE = "spiece.model"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
_SENTINEL = re.compile(r"^<extra_id_(\d+)>$")
_HUB = ("revision", "token", "cache_dir", "local_files_only", "subfolder")


class BatchEncoding(dict):
    """The tokenizer's output: a dict (``input_ids``, ``attention_mask``, ``labels``) with attribute access."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: Any) -> BatchEncoding:
        """Move tensors to ``device`` (as ``tokenizer(...).to(model.device)`` on the reference pages)."""
        return BatchEncoding({k: v.to(device) if hasattr(v, "to") else v for k, v in self.items()})


class _Base:
    """What every T5-family tokenizer shares: batching, padding, tensors, decoding helpers."""

    model_input_names = ["input_ids", "attention_mask"]
    pad_token = "<pad>"
    eos_token = "</s>"
    unk_token = "<unk>"

    def __init__(
        self,
        model_max_length: int,
        padding_side: str = "right",
        truncation_side: str = "right",
        clean_up_tokenization_spaces: bool = False,
    ) -> None:
        if padding_side not in ("left", "right") or truncation_side not in ("left", "right"):
            raise ValueError("padding_side and truncation_side must be 'left' or 'right'")
        self.model_max_length = model_max_length
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        # Whether decode() removes spaces before punctuation by default (tokenizer_config.json's value).
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces

    # Subclasses provide these, plus convert_tokens_to_ids, __len__ and from_pretrained.
    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def convert_ids_to_tokens(self, ids: int | Sequence[int], skip_special_tokens: bool = False) -> Any:
        raise NotImplementedError

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        raise NotImplementedError

    @property
    def pad_token_id(self) -> int:
        return self.convert_tokens_to_ids(self.pad_token)

    @property
    def eos_token_id(self) -> int:
        return self.convert_tokens_to_ids(self.eos_token)

    @property
    def unk_token_id(self) -> int:
        return self.convert_tokens_to_ids(self.unk_token)

    @property
    def all_special_tokens(self) -> list[str]:
        return [self.pad_token, self.eos_token, self.unk_token, *self.additional_special_tokens]

    @property
    def all_special_ids(self) -> list[int]:
        return [self.convert_tokens_to_ids(t) for t in self.all_special_tokens]

    def get_sentinel_tokens(self) -> list[str]:
        """The ``<extra_id_N>`` tokens, ``<extra_id_0>`` first."""
        found = [(int(m.group(1)), t) for t in self.additional_special_tokens if (m := _SENTINEL.match(t))]
        return [t for _, t in sorted(found)]

    def get_sentinel_token_ids(self) -> list[int]:
        """Ids of the sentinels, ``<extra_id_0>`` (the highest id) first."""
        return [self.convert_tokens_to_ids(t) for t in self.get_sentinel_tokens()]

    # ------------------------------------------------------------------------------------------

    def __call__(
        self,
        text: str | list[str] | None = None,
        text_pair: str | list[str] | None = None,
        text_target: str | list[str] | None = None,
        *,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        return_tensors: str | None = None,
        return_attention_mask: bool = True,
        padding_side: str | None = None,
        pad_to_multiple_of: int | None = None,
    ) -> BatchEncoding:
        """Tokenise a string or a list of strings (and ``text_target`` into ``labels``).

        padding: ``False``, ``True``/``"longest"`` or ``"max_length"``; truncation to ``max_length``
        (default ``model_max_length``); return_tensors: ``"pt"``, ``"np"`` or ``None`` (lists).
        """
        if text is None and text_target is None:
            raise ValueError("Pass text, text_target, or both")
        options = dict(
            add_special_tokens=add_special_tokens, padding=padding, truncation=truncation, max_length=max_length,
            return_tensors=return_tensors, padding_side=padding_side, pad_to_multiple_of=pad_to_multiple_of,
        )
        if text is None:  # targets alone are encoded like inputs
            return self._batch(text_target, None, return_attention_mask=return_attention_mask, **options)
        out = self._batch(text, text_pair, return_attention_mask=return_attention_mask, **options)
        if text_target is not None:
            out["labels"] = self._batch(text_target, None, return_attention_mask=False, **options)["input_ids"]
        return out

    def _batch(
        self,
        text: str | list[str],
        text_pair: str | list[str] | None,
        *,
        add_special_tokens: bool,
        padding: bool | str,
        truncation: bool | str | None,
        max_length: int | None,
        return_tensors: str | None,
        return_attention_mask: bool,
        padding_side: str | None,
        pad_to_multiple_of: int | None,
    ) -> BatchEncoding:
        single = isinstance(text, str)
        texts = [text] if single else text
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"text must be a string or a list of strings, got {type(text).__name__}")
        pairs = None
        if text_pair is not None:
            pairs = [text_pair] if isinstance(text_pair, str) else list(text_pair)
            if len(pairs) != len(texts) or not all(isinstance(t, str) for t in pairs):
                raise ValueError("text_pair must be a string or a list of strings as long as text")
        ids = self._encode_batch(list(texts))
        pair_ids = self._encode_batch(pairs) if pairs is not None else None
        rows = []
        for i, a in enumerate(ids):
            b = pair_ids[i] if pair_ids is not None else None
            if truncation not in (None, False, "do_not_truncate"):
                limit = self.model_max_length if max_length is None else max_length
                a, b = self._truncate(a, b, limit - (add_special_tokens * (1 + (b is not None))))
            row = self.build_inputs_with_special_tokens(a, b) if add_special_tokens else a + (b or [])
            rows.append(row)
        side = padding_side or self.padding_side
        lengths = [len(r) for r in rows]
        if padding in (True, "longest", "max_length"):
            target = max(lengths) if padding != "max_length" else (max_length or self.model_max_length)
            if pad_to_multiple_of:
                target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
            pad_id = self.pad_token_id
            fill = [[pad_id] * max(target - n, 0) for n in lengths]
            zeros = [[0] * len(f) for f in fill]
            if side == "right":
                rows, masks = [r + f for r, f in zip(rows, fill)], [[1] * n + z for n, z in zip(lengths, zeros)]
            else:
                rows, masks = [f + r for r, f in zip(rows, fill)], [z + [1] * n for n, z in zip(lengths, zeros)]
        elif padding in (False, None, "do_not_pad"):
            masks = [[1] * n for n in lengths]
        else:
            raise ValueError(f"padding must be False, True, 'longest' or 'max_length', got {padding!r}")
        out = BatchEncoding(input_ids=rows)
        if return_attention_mask:
            out["attention_mask"] = masks
        if return_tensors is None:
            return BatchEncoding({k: v[0] for k, v in out.items()}) if single else out
        if len({len(r) for r in rows}) > 1:
            raise ValueError(
                "Sequences of different lengths cannot form a tensor: pass padding=True (or 'max_length')"
            )
        if return_tensors == "pt":
            import torch

            return BatchEncoding({k: torch.tensor(v, dtype=torch.long) for k, v in out.items()})
        if return_tensors == "np":
            import numpy as np

            return BatchEncoding({k: np.asarray(v, dtype=np.int64) for k, v in out.items()})
        raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")

    def _truncate(self, a: list[int], b: list[int] | None, limit: int) -> tuple[list[int], list[int] | None]:
        limit = max(limit, 0)
        cut = (lambda x, n: x[:n]) if self.truncation_side == "right" else (lambda x, n: x[len(x) - n:])
        if b is None:
            return cut(a, limit), None
        while len(a) + len(b) > limit:  # longest first, as the reference
            if len(a) >= len(b):
                a = cut(a, len(a) - 1)
            else:
                b = cut(b, len(b) - 1)
        return a, b

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None) -> list[int]:
        """T5 appends ``</s>`` to each sequence: ``A </s>`` or ``A </s> B </s>``."""
        out = list(token_ids_0) + [self.eos_token_id]
        return out if token_ids_1 is None else out + list(token_ids_1) + [self.eos_token_id]

    def get_special_tokens_mask(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None, already_has_special_tokens: bool = False
    ) -> list[int]:
        """1 for a special token, 0 for a sequence token."""
        if already_has_special_tokens:
            if token_ids_1 is not None:
                raise ValueError("token_ids_1 must be None when already_has_special_tokens=True")
            special = set(self.all_special_ids)
            return [int(i in special) for i in token_ids_0]
        mask = [0] * len(token_ids_0) + [1]
        return mask if token_ids_1 is None else mask + [0] * len(token_ids_1) + [1]

    def create_token_type_ids_from_sequences(self, token_ids_0: list[int], token_ids_1: list[int] | None = None) -> list[int]:
        """T5 uses no token types: all zeros over the built sequence."""
        return [0] * len(self.build_inputs_with_special_tokens(token_ids_0, token_ids_1))

    def encode(self, text: str, text_pair: str | None = None, add_special_tokens: bool = True, **kwargs: Any) -> Any:
        """Ids of one text (with ``</s>`` unless ``add_special_tokens=False``)."""
        return self(text, text_pair, add_special_tokens=add_special_tokens, return_attention_mask=False, **kwargs)["input_ids"]

    def decode(self, token_ids: Any, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None) -> str:
        """Text of one sequence of ids (a list, or a 1-D tensor/array)."""
        ids = _as_ids(token_ids)
        if ids and isinstance(ids[0], list):
            raise ValueError("decode takes one sequence; use batch_decode for a batch")
        ids = self._drop_embedding_padding(ids)
        self._check_ids(ids)
        text = self._decode(ids, skip_special_tokens)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        return _clean_up(text) if clean_up_tokenization_spaces else text

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None) -> list[str]:
        return [self.decode(s, skip_special_tokens, clean_up_tokenization_spaces) for s in _as_ids(sequences)]

    def _check_ids(self, ids: list[int]) -> None:
        n = len(self)
        for i in ids:
            if not isinstance(i, int) or isinstance(i, bool):
                raise TypeError(f"token ids must be integers, got {type(i).__name__}")
            if not 0 <= i < n:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {n})")

    def _drop_embedding_padding(self, ids: list[int]) -> list[int]:
        """Drop ids of the rows the models pad their embedding with (t5: 32100..32127, mT5:
        250100..250111; the vocabulary rounded up to a multiple of 128). Models can emit them and
        they have no text, so they decode to nothing, as in the reference; other ids are checked."""
        n = len(self)
        padded = -(-n // 128) * 128
        return [i for i in ids if not (isinstance(i, int) and n <= i < padded)]

    def __len__(self) -> int:
        raise NotImplementedError

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
        raise NotImplementedError


def _as_ids(x: Any) -> Any:
    if hasattr(x, "tolist"):
        x = x.tolist()
    if isinstance(x, int):
        return [x]
    return x if isinstance(x, list) else list(x)


def _clean_up(text: str) -> str:
    """The reference's clean_up_tokenization: drop spaces before punctuation and in contractions."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


class T5TokenizerFast(_Base):
    """The T5 / mT5 SentencePiece tokenizer (Unigram), exact to the reference.

    Args:
        vocab_file: A SentencePiece ``spiece.model`` to convert (offline).
        tokenizer_file: A ``tokenizer.json``.
        extra_ids: Number of ``<extra_id_N>`` sentinels appended to a ``spiece.model`` vocabulary.
        additional_special_tokens: Special tokens (defaults to the sentinels).
        model_max_length: Default truncation length (T5 has no position limit: unbounded unless
            tokenizer_config.json sets one, as the reference).
    """

    def __init__(
        self,
        vocab_file: str | None = None,
        tokenizer_file: str | None = None,
        eos_token: str = "</s>",
        unk_token: str = "<unk>",
        pad_token: str = "<pad>",
        extra_ids: int = 100,
        additional_special_tokens: list[str] | None = None,
        model_max_length: int = int(1e30),
        padding_side: str = "right",
        truncation_side: str = "right",
        clean_up_tokenization_spaces: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(model_max_length, padding_side, truncation_side, clean_up_tokenization_spaces)
        self.eos_token, self.unk_token, self.pad_token = eos_token, unk_token, pad_token
        if tokenizer_file is not None:
            vocab, charsmap = _read_tokenizer_json(tokenizer_file)
        elif vocab_file is not None:
            vocab, charsmap = _read_spiece(vocab_file)
            present = {p for p, _ in vocab}
            vocab += [(f"<extra_id_{i}>", 0.0) for i in range(extra_ids - 1, -1, -1) if f"<extra_id_{i}>" not in present]
        else:
            raise ValueError("Pass vocab_file (spiece.model) or tokenizer_file (tokenizer.json)")
        self.vocab_file = vocab_file
        self._vocab_scores = vocab
        self._charsmap = charsmap
        present = {p for p, _ in vocab}
        sentinels = sorted((int(m.group(1)), p) for p in present if (m := _SENTINEL.match(p)))
        self.additional_special_tokens = list(additional_special_tokens or [p for _, p in sentinels])
        self._tokenizer = self._build()

    def _build(self) -> Any:
        from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
        from tokenizers.models import Unigram

        tok = Tokenizer(Unigram(self._vocab_scores, unk_id=self._index(self.unk_token), byte_fallback=False))
        if self._charsmap:
            tok.normalizer = normalizers.Precompiled(self._charsmap)
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)]
        )
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
        specials = [self.pad_token, self.eos_token, self.unk_token, *self.additional_special_tokens]
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        tok.post_processor = processors.TemplateProcessing(
            single=["$A", self.eos_token], pair=["$A", self.eos_token, "$B", self.eos_token],
            special_tokens=[(self.eos_token, tok.token_to_id(self.eos_token))],
        )
        return tok

    def _index(self, piece: str) -> int:
        for i, (p, _) in enumerate(self._vocab_scores):
            if p == piece:
                return i
        raise ValueError(f"The vocabulary has no {piece!r} token")

    @property
    def backend_tokenizer(self) -> Any:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tokenizer

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return len(self)

    def get_vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tokenizer.encode_batch(texts, add_special_tokens=False)]

    def tokenize(self, text: str, **kwargs: Any) -> list[str]:
        if not isinstance(text, str):
            raise TypeError(f"tokenize takes a string, got {type(text).__name__}")
        return self._tokenizer.encode(text, add_special_tokens=False).tokens

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> Any:
        if isinstance(tokens, str):
            found = self._tokenizer.token_to_id(tokens)
            return self._tokenizer.token_to_id(self.unk_token) if found is None else found
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Sequence[int], skip_special_tokens: bool = False) -> Any:
        if isinstance(ids, int):
            self._check_ids([ids])
            return self._tokenizer.id_to_token(ids)
        ids = _as_ids(ids)
        self._check_ids(ids)
        special = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._tokenizer.id_to_token(i) for i in ids if i not in special]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self._tokenizer.decoder.decode(tokens)

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> T5TokenizerFast:
        """Load from a directory or Hub id holding ``tokenizer.json`` and/or ``spiece.model``."""
        hub = {k: kwargs.pop(k) for k in list(kwargs) if k in _HUB}
        path = os.fspath(pretrained_model_name_or_path)
        config = _read_optional_json(resolve_file(path, TOKENIZER_CONFIG, **hub))
        options = {k: v for k, v in config.items() if k in ("eos_token", "unk_token", "pad_token", "extra_ids", "model_max_length", "padding_side", "truncation_side", "additional_special_tokens", "clean_up_tokenization_spaces")}
        options = {k: (v["content"] if isinstance(v, dict) else v) for k, v in options.items()}
        if isinstance(options.get("additional_special_tokens"), list):
            options["additional_special_tokens"] = [t["content"] if isinstance(t, dict) else t for t in options["additional_special_tokens"]]
        options.update(kwargs)
        tokenizer_file = resolve_file(path, TOKENIZER_JSON, **hub)
        if tokenizer_file is not None:
            return cls(tokenizer_file=tokenizer_file, **options)
        vocab_file = resolve_file(path, SPIECE, **hub)
        if vocab_file is None:
            raise OSError(f"{path} has no tokenizer.json or spiece.model: it holds no T5 tokenizer")
        return cls(vocab_file=vocab_file, **options)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> tuple[str, ...]:
        """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json (and spiece.model if known)."""
        save_directory = os.fspath(save_directory)
        os.makedirs(save_directory, exist_ok=True)
        tokenizer_json = os.path.join(save_directory, TOKENIZER_JSON)
        atomic_write_text(tokenizer_json, self._tokenizer.to_str(pretty=True))
        config = {
            "tokenizer_class": "T5Tokenizer",
            "eos_token": self.eos_token,
            "unk_token": self.unk_token,
            "pad_token": self.pad_token,
            "extra_ids": 0,
            "additional_special_tokens": self.additional_special_tokens,
            "model_max_length": self.model_max_length,
            "padding_side": self.padding_side,
            "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
        }
        atomic_write_text(os.path.join(save_directory, TOKENIZER_CONFIG), json.dumps(config, indent=2) + "\n")
        special = {k: config[k] for k in ("eos_token", "unk_token", "pad_token", "additional_special_tokens")}
        atomic_write_text(os.path.join(save_directory, SPECIAL_TOKENS_MAP), json.dumps(special, indent=2) + "\n")
        return (tokenizer_json, *self.save_vocabulary(save_directory))

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        """Copy the SentencePiece model, when this tokenizer was built from one."""
        if self.vocab_file is None or not os.path.isfile(self.vocab_file):
            return ()
        target = os.path.join(save_directory, f"{filename_prefix}-{SPIECE}" if filename_prefix else SPIECE)
        if os.path.abspath(target) != os.path.abspath(self.vocab_file):
            with open(self.vocab_file, "rb") as src, atomic_path(target) as tmp, open(tmp, "wb") as dst:
                dst.write(src.read())
        return (target,)


T5Tokenizer = T5TokenizerFast


class MT5TokenizerFast(T5TokenizerFast):
    """mT5 / umT5 use the same tokenizer with their own SentencePiece vocabulary."""


MT5Tokenizer = MT5TokenizerFast


class ByT5Tokenizer(_Base):
    """ByT5: UTF-8 bytes. Ids: 0 ``<pad>``, 1 ``</s>``, 2 ``<unk>``, 3..258 the bytes, then 125 sentinels
    ``<extra_id_0>`` = 259 ... ``<extra_id_124>`` = 383 (ascending, as the reference numbers them)."""

    _offset = 3

    def __init__(self, extra_ids: int = 125, model_max_length: int = 1024, padding_side: str = "right", **kwargs: Any) -> None:
        super().__init__(model_max_length, padding_side, kwargs.get("truncation_side", "right"))
        self._extra_ids = extra_ids
        self.additional_special_tokens = [f"<extra_id_{i}>" for i in range(extra_ids)]
        self._special_pattern = re.compile("(" + "|".join(re.escape(t) for t in [self.pad_token, self.eos_token, self.unk_token, *self.additional_special_tokens]) + ")")

    def __len__(self) -> int:
        return self._offset + 256 + self._extra_ids

    vocab_size = property(__len__)

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> Any:
        if not isinstance(tokens, str):
            return [self.convert_tokens_to_ids(t) for t in tokens]
        specials = {self.pad_token: 0, self.eos_token: 1, self.unk_token: 2}
        if tokens in specials:
            return specials[tokens]
        if (m := _SENTINEL.match(tokens)) and int(m.group(1)) < self._extra_ids:
            return self._offset + 256 + int(m.group(1))  # ascending, as the reference
        data = tokens.encode("utf-8")
        return data[0] + self._offset if len(data) == 1 else 2

    def convert_ids_to_tokens(self, ids: int | Sequence[int], skip_special_tokens: bool = False) -> Any:
        if isinstance(ids, int):
            return self._token(ids)
        ids = _as_ids(ids)
        self._check_ids(ids)
        return [self._token(i) for i in ids if not (skip_special_tokens and self._is_special(i))]

    def _is_special(self, i: int) -> bool:
        return i < self._offset or i >= self._offset + 256

    def _token(self, i: int) -> str:
        if i < self._offset:
            return (self.pad_token, self.eos_token, self.unk_token)[i]
        if i >= self._offset + 256:
            return f"<extra_id_{i - self._offset - 256}>"
        return chr(i - self._offset)

    def tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return [self._token(i) for i in self._encode_batch([text])[0]]

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        out = []
        for text in texts:
            ids: list[int] = []
            for part in self._special_pattern.split(text):
                if not part:
                    continue
                if self._special_pattern.fullmatch(part):
                    ids.append(self.convert_tokens_to_ids(part))
                else:
                    ids.extend(b + self._offset for b in part.encode("utf-8"))
            out.append(ids)
        return out

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        pieces: list[str] = []
        buffer = bytearray()
        for i in ids:
            if not self._is_special(i):
                buffer.append(i - self._offset)
                continue
            pieces.append(buffer.decode("utf-8", errors="ignore"))
            buffer = bytearray()
            if not skip_special_tokens:
                pieces.append(self._token(i))
        pieces.append(buffer.decode("utf-8", errors="ignore"))
        return "".join(pieces)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self._decode(self.convert_tokens_to_ids(tokens), False)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> ByT5Tokenizer:
        hub = {k: kwargs.pop(k) for k in list(kwargs) if k in _HUB}
        config = _read_optional_json(resolve_file(os.fspath(pretrained_model_name_or_path), TOKENIZER_CONFIG, **hub))
        options = {k: config[k] for k in ("extra_ids", "model_max_length", "padding_side") if k in config}
        return cls(**{**options, **kwargs})

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> tuple[str, ...]:
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(os.fspath(save_directory), TOKENIZER_CONFIG)
        config = {"tokenizer_class": "ByT5Tokenizer", "extra_ids": self._extra_ids, "model_max_length": self.model_max_length,
                  "eos_token": self.eos_token, "unk_token": self.unk_token, "pad_token": self.pad_token}
        atomic_write_text(path, json.dumps(config, indent=2) + "\n")
        return (path,)


class AutoTokenizer:
    """Picks the tokenizer from ``tokenizer_config.json`` (``tokenizer_class``) or ``config.json``."""

    @staticmethod
    def from_pretrained(pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
        hub = {k: kwargs[k] for k in kwargs if k in _HUB}
        path = os.fspath(pretrained_model_name_or_path)
        config = _read_optional_json(resolve_file(path, TOKENIZER_CONFIG, **hub))
        name = str(config.get("tokenizer_class") or "")
        if not name:
            model_config = _read_optional_json(resolve_file(path, "config.json", **hub))
            name = {"t5": "T5Tokenizer", "mt5": "MT5Tokenizer", "umt5": "T5Tokenizer"}.get(model_config.get("model_type", ""), "")
            if "byt5" in str(model_config.get("_name_or_path", "")).lower():
                name = "ByT5Tokenizer"
        name = name.replace("Fast", "")
        classes = {"T5Tokenizer": T5TokenizerFast, "MT5Tokenizer": MT5TokenizerFast, "ByT5Tokenizer": ByT5Tokenizer, "": T5TokenizerFast}
        if name not in classes:
            raise ValueError(f"{path} uses tokenizer_class={name!r}, which is not a T5-family tokenizer")
        return classes[name].from_pretrained(path, **kwargs)


# ----------------------------------------------------------------------------------------------
# Reading vocabularies.


def _read_optional_json(path: str | None) -> dict[str, Any]:
    return {} if path is None else _read_json(path)


def _read_tokenizer_json(path: str) -> tuple[list[tuple[str, float]], bytes | None]:
    data = _read_optional_json(path)
    model = data.get("model") or {}
    if model.get("type", "Unigram") != "Unigram" or not isinstance(model.get("vocab"), list):
        raise OSError(f"{path} is not a Unigram (SentencePiece) tokenizer.json; it cannot be a T5 tokenizer")
    vocab = [(str(p), float(s)) for p, s in model["vocab"]]
    return vocab, _find_charsmap(data.get("normalizer"))


def _find_charsmap(normalizer: Any) -> bytes | None:
    import base64

    if not isinstance(normalizer, dict):
        return None
    if normalizer.get("type") == "Precompiled" and normalizer.get("precompiled_charsmap"):
        return base64.b64decode(normalizer["precompiled_charsmap"])
    for inner in normalizer.get("normalizers") or []:
        found = _find_charsmap(inner)
        if found:
            return found
    return None


def _read_spiece(path: str) -> tuple[list[tuple[str, float]], bytes | None]:
    """Pieces, scores and the precompiled normaliser of a SentencePiece model (no network)."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError as e:  # protobuf missing
        raise ImportError("Converting spiece.model needs the sentencepiece and protobuf packages: pip install sentencepiece protobuf") from e
    model = pb.ModelProto()
    try:
        with open(path, "rb") as f:
            model.ParseFromString(f.read())
    except Exception as e:
        raise OSError(f"{path} is not a SentencePiece model ({e}); the file may be truncated or corrupt") from e
    # The pieces come first in the file and the specs last: a cut file parses without them.
    if not model.pieces or not model.HasField("trainer_spec") or not model.HasField("normalizer_spec"):
        raise OSError(f"{path} is incomplete (no vocabulary or specs); the file may be truncated or corrupt")
    vocab = [(p.piece, float(p.score)) for p in model.pieces]
    return vocab, bytes(model.normalizer_spec.precompiled_charsmap) or None
