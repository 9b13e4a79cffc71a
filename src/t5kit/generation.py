"""Text generation: greedy decoding, sampling and beam search, outside the network.

The model exposes two things: the encoder, run once, and ``decode_step``, which feeds new decoder
tokens through a preallocated cache and returns next-token logits. Everything else lives here:

* ``GenerationConfig``: the options, with ``generation_config.json``'s field names;
* logits processors (repetition penalty, n-gram blocking, bad words, minimum length, temperature,
  top-k, top-p), with the reference's definitions;
* one decoding loop over a state object, shared by a greedy/sampling strategy and a beam-search
  strategy; the token buffer is preallocated and processors see views of it;
* streamers (``TextStreamer``, ``TextIteratorStreamer``) that receive tokens as they are chosen.

``cache_implementation="static"`` (as in the reference's examples) makes every step after the
first one the same computation on tensors of the same shapes (a static cache: see
``t5kit.cache``), and compiles that step once with ``torch.compile`` (unless
``disable_compile=True``): Python and per-op overhead go, which makes batch-1 greedy decoding of
a prepacked fp32 model 4-17% faster on the CPU than the eager loop (the four shapes of the
README's "CPU benchmark", two runs). The first call per shape compiles (20-55 s on a cold cache
for t5-small to t5-base, a few seconds from torch's on-disk cache); tokens equal the eager loop's.
On a GPU the compiled step is then replayed as one CUDA graph per generation (``CUDA_GRAPHS``):
t5-base bf16 greedy batch 1 on an H100 ran at 791 tokens/s against 194 for the compiled step
launched kernel by kernel and 91 for the eager loop.

Semantics follow transformers 5.23 so that tokens and ``sequences_scores`` are equal: lengths
count the decoder start token (``max_length``/``min_length``), ``max_new_tokens`` and
``min_new_tokens`` do not; without any length option 20 new tokens are generated; beam search is
the reference's vectorised algorithm (top ``2 * num_beams`` candidates per step, length penalty
``score / generated_length ** length_penalty``, the same early-stopping heuristics).

Deliberate differences: beam-search outputs are padded with ``pad_token_id`` (the reference
pads them with ``eos_token_id`` when ``pad_token_id`` is 0, as it is for every T5, through an
``or`` on a tensor); a decoder deeper than its encoder generates (the reference crashes).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import queue
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from ._files import atomic_write_text, resolve_file
from .cache import EncoderDecoderCache
from .config import _HUB_KWARGS, _read_json
from .outputs import BaseModelOutput, ModelOutput

__all__ = [
    "GenerationConfig",
    "GenerateEncoderDecoderOutput",
    "GenerateBeamEncoderDecoderOutput",
    "TextStreamer",
    "TextIteratorStreamer",
    "GenerationMixin",
]

GENERATION_CONFIG_NAME = "generation_config.json"
LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StoppingCriterion = Callable[[torch.Tensor, Any], Any]
_DEFAULT_MAX_NEW_TOKENS = 20
_CACHE_IMPLEMENTATIONS = (None, "static", "dynamic", "offloaded_static", "offloaded")


# ------------------------------------------------------------------------------------------------
# Configuration.


@dataclass
class GenerationConfig:
    """Generation options; field names are those of ``generation_config.json``.

    ``None`` means "not set": defaults apply (20 new tokens, greedy, temperature 1, top-k 50,
    top-p 1). Keys this class does not know are kept and written back unchanged.
    """

    max_length: int | None = None
    max_new_tokens: int | None = None
    min_length: int | None = None
    min_new_tokens: int | None = None
    early_stopping: bool | str | None = None
    do_sample: bool | None = None
    num_beams: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    length_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    bad_words_ids: list[list[int]] | None = None
    num_return_sequences: int | None = None
    output_scores: bool | None = None
    output_logits: bool | None = None
    return_dict_in_generate: bool | None = None
    output_attentions: bool | None = None
    output_hidden_states: bool | None = None
    use_cache: bool | None = None
    cache_implementation: str | None = None
    disable_compile: bool | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    decoder_start_token_id: int | None = None
    _extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")}

    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> GenerationConfig:
        data = {**data, **overrides}
        names = cls.field_names()
        config = cls(**{k: v for k, v in data.items() if k in names})
        config._extra = {k: v for k, v in data.items() if k not in names}
        return config

    @classmethod
    def from_model_config(cls, model_config: Any) -> GenerationConfig:
        """The special tokens of a model's ``config.json`` (what the reference derives when there
        is no ``generation_config.json``)."""
        config = cls(
            decoder_start_token_id=getattr(model_config, "decoder_start_token_id", None),
            eos_token_id=getattr(model_config, "eos_token_id", None),
            pad_token_id=getattr(model_config, "pad_token_id", None),
        )
        config._extra["_from_model_config"] = True
        return config

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> GenerationConfig:
        """Read ``generation_config.json`` from a directory, a file path or a Hub id."""
        hub_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in _HUB_KWARGS}
        path = os.fspath(pretrained_model_name_or_path)
        file = path if os.path.isfile(path) else resolve_file(path, GENERATION_CONFIG_NAME, required=True, **hub_kwargs)
        return cls.from_dict(_read_json(file), **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The fields that are set (not None), plus unknown keys read from disk."""
        out = dict(self._extra)
        out.update({k: getattr(self, k) for k in sorted(self.field_names()) if getattr(self, k) is not None})
        return out

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``generation_config.json`` into ``save_directory`` (atomically)."""
        os.makedirs(save_directory, exist_ok=True)
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        atomic_write_text(os.path.join(save_directory, GENERATION_CONFIG_NAME), text)

    def copy(self) -> GenerationConfig:
        return copy.deepcopy(self)

    def update(self, **kwargs: Any) -> dict[str, Any]:
        """Set the known fields among ``kwargs``; return the others."""
        names = self.field_names()
        for k in [k for k in kwargs if k in names]:
            setattr(self, k, kwargs.pop(k))
        return kwargs

    def validate(self) -> None:
        """Raise ``ValueError`` for options that contradict each other or are out of range."""

        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        for name in ("max_length", "max_new_tokens", "min_length", "min_new_tokens", "no_repeat_ngram_size"):
            value = getattr(self, name)
            check(value is None or (isinstance(value, int) and value >= 0), f"{name} must be a non-negative integer, got {value!r}")
        check(self.max_new_tokens is None or self.max_new_tokens > 0, "max_new_tokens must be at least 1")
        for name in ("num_beams", "num_return_sequences"):
            value = getattr(self, name)
            check(value is None or (isinstance(value, int) and value >= 1), f"{name} must be a positive integer, got {value!r}")
        beams, returns = self.num_beams or 1, self.num_return_sequences or 1
        if not self.do_sample:
            check(
                returns <= beams,
                f"num_return_sequences ({returns}) cannot exceed num_beams ({beams}) without sampling: "
                "set num_beams >= num_return_sequences, or do_sample=True",
            )
        if self.do_sample:
            t = self.temperature
            check(
                t is None or (isinstance(t, (int, float)) and t > 0 and math.isfinite(t)),
                f"temperature must be a positive number when sampling, got {t!r}; for deterministic output "
                "use do_sample=False (greedy) instead of temperature 0",
            )
        check(self.top_k is None or (isinstance(self.top_k, int) and self.top_k >= 0), f"top_k must be a non-negative integer, got {self.top_k!r}")
        check(self.top_p is None or 0.0 <= self.top_p <= 1.0, f"top_p must be in [0, 1], got {self.top_p!r}")
        rp = self.repetition_penalty
        check(rp is None or rp > 0, f"repetition_penalty must be a positive number, got {rp!r}")
        check(
            self.early_stopping in (None, True, False, "never"),
            f"early_stopping must be True, False or 'never', got {self.early_stopping!r}",
        )
        check(
            self.cache_implementation in _CACHE_IMPLEMENTATIONS,
            f"cache_implementation must be one of {_CACHE_IMPLEMENTATIONS[1:]}, got {self.cache_implementation!r} "
            "(t5kit always decodes on a preallocated cache; 'static' also captures the step with torch.compile)",
        )
        check(not self.output_attentions and not self.output_hidden_states,
              "generate() does not return attentions or hidden states; run the model's forward on the "
              "generated sequences to get them")
        if self.bad_words_ids is not None:
            ok = isinstance(self.bad_words_ids, list) and all(
                isinstance(seq, list) and seq and all(isinstance(i, int) and i >= 0 for i in seq) for seq in self.bad_words_ids
            )
            check(ok, f"bad_words_ids must be a list of non-empty lists of token ids, got {self.bad_words_ids!r}")

    def __getattr__(self, name: str) -> Any:
        # Unknown keys read from disk stay readable as attributes, as in the reference.
        extra = self.__dict__.get("_extra", {})
        if name in extra:
            return extra[name]
        raise AttributeError(f"GenerationConfig has no attribute {name!r}")


# ------------------------------------------------------------------------------------------------
# Outputs and streamers.


@dataclass
class GenerateEncoderDecoderOutput(ModelOutput):
    """Greedy or sampled generation. sequences: (N, L); scores/logits: one (N, V) tensor per step."""

    sequences: torch.Tensor | None = None
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    encoder_outputs: BaseModelOutput | None = None
    past_key_values: EncoderDecoderCache | None = None


@dataclass
class GenerateBeamEncoderDecoderOutput(ModelOutput):
    """Beam search. sequences: (N, L); sequences_scores: (N,) length-penalised log-probabilities;
    scores: the processed per-step log-probabilities, one (B * num_beams, V) tensor per step;
    beam_indices: (N, L - prompt) the beam each token came from."""

    sequences: torch.Tensor | None = None
    sequences_scores: torch.Tensor | None = None
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    beam_indices: torch.Tensor | None = None
    encoder_outputs: BaseModelOutput | None = None
    past_key_values: EncoderDecoderCache | None = None


class TextStreamer:
    """Prints text to stdout as it is generated (batch size 1), word by word.

    ``generate(..., streamer=TextStreamer(tokenizer))``. ``skip_prompt=True`` leaves out the
    decoder prompt; other keyword arguments go to ``tokenizer.decode``.
    """

    def __init__(self, tokenizer: Any, skip_prompt: bool = False, **decode_kwargs: Any) -> None:
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.decode_kwargs = decode_kwargs
        self.token_cache: list[int] = []
        self.print_len = 0
        self.next_tokens_are_prompt = True

    def put(self, value: torch.Tensor) -> None:
        """Receive the prompt (first call) or the newly chosen token(s) of the single sequence."""
        if value.dim() > 1 and value.shape[0] > 1:
            raise ValueError("Streamers handle one sequence at a time (batch size 1, one beam)")
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self.next_tokens_are_prompt = False
        self.token_cache.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
        # Emit only up to the last space: the tokenizer may still merge the end into a word.
        if text.endswith("\n"):
            printable, self.token_cache, self.print_len = text[self.print_len :], [], 0
        else:
            cut = text.rfind(" ") + 1
            printable = text[self.print_len : cut] if cut > self.print_len else ""
            self.print_len += len(printable)
        if printable:
            self.on_finalized_text(printable)

    def end(self) -> None:
        """Flush what is left and end the stream."""
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)[self.print_len :] if self.token_cache else ""
        self.token_cache, self.print_len, self.next_tokens_are_prompt = [], 0, True
        self.on_finalized_text(text, stream_end=True)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        print(text, flush=True, end="" if not stream_end else "\n")


class TextIteratorStreamer(TextStreamer):
    """A streamer to iterate over: run ``generate`` in a thread and read text pieces as they come.

    ``timeout`` (seconds) bounds each wait for the next piece (``queue.Empty`` is raised).
    """

    def __init__(self, tokenizer: Any, skip_prompt: bool = False, timeout: float | None = None, **decode_kwargs: Any) -> None:
        super().__init__(tokenizer, skip_prompt, **decode_kwargs)
        self.text_queue: queue.Queue[str | None] = queue.Queue()
        self.timeout = timeout

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.text_queue.put(text, timeout=self.timeout)
        if stream_end:
            self.text_queue.put(None, timeout=self.timeout)

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        value = self.text_queue.get(timeout=self.timeout)
        if value is None:
            raise StopIteration
        return value


# ------------------------------------------------------------------------------------------------
# Logits processors. Each maps (sequences (N, T), scores (N, V)) -> scores (N, V).


def repetition_penalty_processor(penalty: float) -> LogitsProcessor:
    """Divide positive (multiply negative) scores of tokens already in the sequence by ``penalty``."""

    def process(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        vocab = scores.shape[-1]
        padded = F.pad(scores, (0, 1))  # a spare column absorbs ids past the output vocabulary
        ids = ids.clamp(max=vocab)
        seen = padded.gather(1, ids)
        seen = torch.where(seen < 0, seen * penalty, seen / penalty)
        return padded.scatter(1, ids, seen)[:, :vocab]

    return process


def no_repeat_ngram_processor(n: int) -> LogitsProcessor:
    """Ban tokens that would complete an n-gram already present in the sequence."""

    def process(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        length = ids.shape[1]
        if length < n:
            return scores
        prefix = ids[:, length + 1 - n :]  # (N, n-1): the n-gram the next token would complete
        windows = ids.unfold(1, n, 1)  # (N, W, n)
        matches = (windows[..., :-1] == prefix[:, None]).all(-1)  # (N, W)
        vocab = scores.shape[-1]
        banned = scores.new_zeros(scores.shape[0], vocab + 1, dtype=torch.bool)
        banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=vocab), vocab), True)
        return scores.masked_fill(banned[:, :vocab], -math.inf)

    return process


def bad_words_processor(bad_words_ids: list[list[int]], eos: list[int], vocab: int) -> LogitsProcessor:
    """Ban single tokens always, and the last token of a longer sequence when its prefix just occurred.

    Single-token entries equal to an eos id are ignored (as the reference does), so that a
    sequence can still end.
    """
    too_big = sorted({i for seq in bad_words_ids for i in seq if i >= vocab})
    if too_big:
        raise ValueError(f"bad_words_ids holds ids {too_big} outside the vocabulary (size {vocab})")
    seqs = [seq for seq in bad_words_ids if not (len(seq) == 1 and seq[0] in eos)]
    always = sorted({seq[0] for seq in seqs if len(seq) == 1})
    longer = [seq for seq in seqs if len(seq) > 1]

    def process(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        banned = torch.zeros_like(scores, dtype=torch.bool)
        if always:
            banned[:, always] = True
        for seq in longer:
            prefix = seq[:-1]
            if len(prefix) > ids.shape[1]:
                continue
            hit = (ids[:, -len(prefix) :] == torch.tensor(prefix, device=ids.device)).all(-1)
            banned[:, seq[-1]] |= hit
        return scores.masked_fill(banned, -math.inf)

    return process


def min_length_processor(min_length: int, eos: torch.Tensor) -> LogitsProcessor:
    """Forbid eos while the sequence (decoder prompt included) is shorter than ``min_length``."""

    def process(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] < min_length:
            scores = scores.clone()
            scores[:, eos] = -math.inf
        return scores

    return process


def temperature_processor(temperature: float) -> LogitsProcessor:
    return lambda ids, scores: scores / temperature


def top_k_processor(top_k: int, min_keep: int = 1) -> LogitsProcessor:
    """Keep the ``top_k`` highest scores (ties at the k-th value included)."""
    k = max(top_k, min_keep)

    def process(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        kth = torch.topk(scores, min(k, scores.shape[-1]))[0][..., -1, None]
        return scores.masked_fill(scores < kth, -math.inf)

    return process


def top_p_processor(top_p: float, min_keep: int = 1) -> LogitsProcessor:
    """Keep the smallest set of most likely tokens whose probability reaches ``top_p`` (nucleus)."""

    def process(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        remove = cumulative <= (1 - top_p)
        remove[..., -min_keep:] = False
        return scores.masked_fill(remove.scatter(1, order, remove), -math.inf)

    return process


def build_processors(
    gc: GenerationConfig, eos: list[int], vocab: int, min_length: int, device: torch.device
) -> list[LogitsProcessor]:
    """The processors a config asks for, in the reference's order."""
    procs: list[LogitsProcessor] = []
    if gc.repetition_penalty is not None and gc.repetition_penalty != 1.0:
        procs.append(repetition_penalty_processor(gc.repetition_penalty))
    if gc.no_repeat_ngram_size:
        procs.append(no_repeat_ngram_processor(gc.no_repeat_ngram_size))
    if gc.bad_words_ids:
        procs.append(bad_words_processor(gc.bad_words_ids, eos, vocab))
    if eos and min_length > 0:
        procs.append(min_length_processor(min_length, torch.tensor(eos, device=device)))
    if gc.do_sample:
        # Beam sampling keeps enough candidates to continue past every eos.
        min_keep = len(eos) + 1 if (gc.num_beams or 1) > 1 else 1
        if gc.temperature is not None and gc.temperature != 1.0:
            procs.append(temperature_processor(gc.temperature))
        top_k = 50 if gc.top_k is None else gc.top_k
        if top_k:
            procs.append(top_k_processor(top_k, min_keep))
        if gc.top_p is not None and gc.top_p < 1.0:
            procs.append(top_p_processor(gc.top_p, min_keep))
    return procs


# ------------------------------------------------------------------------------------------------
# The decoding loop and its strategies.


@dataclass
class DecodingState:
    """What the loop carries between steps.

    sequences: (N, max_length) token buffer, the first ``length`` columns valid; N is batch x beams
    (or x returned samples). encoder_hidden_states: (B, S, d_model), one copy per input, shared by
    its rows. cache: preallocated for ``max_length`` positions.
    """

    sequences: torch.Tensor
    length: int
    prompt_length: int
    max_length: int
    encoder_hidden_states: torch.Tensor
    encoder_attention_mask: torch.Tensor | None
    cache: EncoderDecoderCache
    processors: list[LogitsProcessor]
    stopping_criteria: list[StoppingCriterion]
    eos: torch.Tensor | None  # (E,) eos ids
    pad_token_id: int
    generator: torch.Generator | None
    streamer: Any
    scores: list[torch.Tensor] | None
    raw_logits: list[torch.Tensor] | None

    @property
    def tokens(self) -> torch.Tensor:
        return self.sequences[:, : self.length]

    @property
    def last_tokens(self) -> torch.Tensor:
        """(N, 1): the tokens chosen at the last step, the decoder's next input."""
        return self.sequences[:, self.length - 1 : self.length]

    def process(self, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for proc in self.processors:
            scores = proc(ids, scores)
        return scores

    def user_stop(self, ids: torch.Tensor) -> torch.Tensor | None:
        """(N,) bool from the user's stopping criteria, or None when there are none."""
        if not self.stopping_criteria:
            return None
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        for criterion in self.stopping_criteria:
            result = criterion(ids, tuple(self.scores) if self.scores is not None else None)
            done |= torch.as_tensor(result, device=ids.device).bool().expand(ids.shape[0])
        return done


def _argmax(scores: torch.Tensor) -> torch.Tensor:
    """``scores.argmax(-1)`` (int64), by numpy on the CPU: torch's CPU argmax is 10x slower over a
    large vocabulary (mT5's 250112: 175 vs 14 us a row, 2.5 vs 0.36 ms for 16 rows, on the
    benchmark machine). Both return the first maximum, and both count NaN as the largest value."""
    if scores.device.type == "cpu" and scores.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(scores.detach().numpy().argmax(-1)).long()
    return scores.argmax(-1)


_TOP_K_CHUNK = 128


def _top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``scores.topk(k)`` of (N, V) scores, by way of chunk maxima on the CPU.

    torch's CPU topk over beam search's (B, num_beams * vocab) candidates is slow (mT5, 4 beams:
    1.4 ms a row of 1M). The k best values lie in the k chunks of 128 whose maxima are largest, so
    a pass of ``amax`` and a topk over 128k values give the same values (NaN first, as torch's);
    where values tie, which of the tied positions is returned is unspecified, as in torch.topk.
    """
    n_rows, n = scores.shape
    chunks = n // _TOP_K_CHUNK
    if scores.device.type != "cpu" or n % _TOP_K_CHUNK or chunks < 64 or k > chunks // 4:
        return scores.topk(k)
    maxima = scores.reshape(n_rows, chunks, _TOP_K_CHUNK).amax(-1)  # (N, chunks)
    best = maxima.topk(k).indices  # (N, k): the chunks holding the k best values
    index = (best[:, :, None] * _TOP_K_CHUNK + torch.arange(_TOP_K_CHUNK, device=scores.device)).view(n_rows, -1)
    values, pos = scores.gather(1, index).topk(k)  # (N, k)
    return values, index.gather(1, pos)


class GreedyOrSample:
    """Greedy decoding (argmax) or sampling (multinomial): one row per output sequence."""

    def __init__(self, state: DecodingState, do_sample: bool) -> None:
        self.do_sample = do_sample
        n = state.sequences.shape[0]
        self.unfinished = torch.ones(n, dtype=torch.bool, device=state.sequences.device)

    def step(self, state: DecodingState, logits: torch.Tensor) -> bool:
        """Choose the next token of every row from ``logits`` (N, V) float32; return True when done."""
        scores = state.process(state.tokens, logits)
        if state.scores is not None:
            state.scores.append(scores)
        if state.raw_logits is not None:
            state.raw_logits.append(logits)
        if self.do_sample:
            next_tokens = torch.multinomial(scores.softmax(-1), 1, generator=state.generator).squeeze(1)
        else:
            next_tokens = _argmax(scores)
        if state.eos is not None:  # finished rows are padded
            next_tokens = torch.where(self.unfinished, next_tokens, state.pad_token_id)
        state.sequences[:, state.length] = next_tokens
        state.length += 1
        if state.streamer is not None:
            state.streamer.put(next_tokens.cpu())
        if state.eos is not None:
            self.unfinished &= ~torch.isin(next_tokens, state.eos)
        stop = state.user_stop(state.tokens)
        if stop is not None:
            self.unfinished &= ~stop
        # The stop check is the one host synchronisation per step; without eos there is none.
        if state.length >= state.max_length:
            return True
        return (state.eos is not None or stop is not None) and not bool(self.unfinished.any())

    def finish(self, state: DecodingState) -> dict[str, Any]:
        return {"sequences": state.tokens.clone()}


class BeamSearch:
    """The reference's vectorised beam search (``num_beams`` live beams, ``2 * num_beams``
    candidates per step, finished hypotheses kept in a second set of ``num_beams`` slots).

    Shapes: B inputs, M = num_beams, K = candidates per step, L = max_length.
    """

    def __init__(self, state: DecodingState, gc: GenerationConfig, batch_size: int) -> None:
        self.b, self.m = batch_size, gc.num_beams or 1
        self.do_sample = bool(gc.do_sample)
        self.length_penalty = 1.0 if gc.length_penalty is None else float(gc.length_penalty)
        self.early_stopping = False if gc.early_stopping is None else gc.early_stopping
        self.num_return = gc.num_return_sequences or 1
        n_eos = 0 if state.eos is None else state.eos.numel()
        self.k = max(2, 1 + n_eos) * self.m
        device = state.sequences.device
        b, m, length = self.b, self.m, state.max_length
        self.top_m_mask = torch.arange(self.k, device=device) < m  # (K,)
        self.running = state.sequences.view(b, m, length)  # live beams: the loop's token buffer
        self.running_scores = torch.zeros(b, m, device=device)
        self.running_scores[:, 1:] = -1e9  # all beams start equal: only the first may expand
        self.finished = torch.full_like(self.running, state.pad_token_id)
        self.finished[:, :, : state.length] = self.running[:, :, : state.length]
        self.finished_scores = torch.full((b, m), -1e9, device=device)
        self.is_finished = torch.zeros(b, m, dtype=torch.bool, device=device)
        self.can_improve = torch.ones(b, 1, dtype=torch.bool, device=device)
        gen = length - state.prompt_length
        self.running_beams = torch.full((b, m, gen), -1, dtype=torch.long, device=device)
        self.finished_beams = self.running_beams.clone()

    @staticmethod
    def _gather(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Select along dim 1 (the beam/candidate axis) of a (B, M, ...) tensor."""
        while index.dim() < t.dim():
            index = index.unsqueeze(-1)
        return torch.take_along_dim(t, index, dim=1)

    def step(self, state: DecodingState, logits: torch.Tensor) -> bool:
        b, m, k = self.b, self.m, self.k
        cur, gen_pos = state.length, state.length - state.prompt_length
        log_probs = state.process(state.tokens, logits.log_softmax(-1))  # (B*M, V)
        if state.scores is not None:
            state.scores.append(log_probs.clone())
        if state.raw_logits is not None:
            state.raw_logits.append(logits)
        vocab = log_probs.shape[-1]
        total = (log_probs.view(b, m, vocab) + self.running_scores[:, :, None]).view(b, m * vocab)
        if self.do_sample:
            cand = torch.multinomial(total.softmax(-1), k, generator=state.generator)
            cand_scores = total.gather(1, cand)
        else:
            cand_scores, cand = _top_k(total, k)  # (B, K)
        src_beam = cand // vocab
        cand_seqs = self._gather(self.running, src_beam)  # (B, K, L)
        cand_seqs[:, :, cur] = cand % vocab
        cand_beams = self._gather(self.running_beams, src_beam)
        cand_beams[:, :, gen_pos] = src_beam + torch.arange(b, device=cand.device)[:, None] * m
        hits = self._hits_stop(state, cand_seqs[:, :, : cur + 1])  # (B, K)

        # Live beams for the next step: the best M candidates that did not just finish.
        live_scores = cand_scores + hits.float() * -1e9
        pick = live_scores.topk(m)[1]
        self.running.copy_(self._gather(cand_seqs, pick))
        self.running_scores = self._gather(live_scores, pick)
        self.running_beams = self._gather(cand_beams, pick)

        # Finished hypotheses: candidates among the top M that just finished, if they beat the kept ones.
        just_finished = hits & self.top_m_mask[None, :]
        final = cand_scores / ((cur + 1 - state.prompt_length) ** self.length_penalty)
        full = self.is_finished.all(-1, keepdim=True) & (self.early_stopping is True)
        final = final + full.float() * -1e9 + (~self.can_improve).float() * -1e9 + (~just_finished).float() * -1e9
        merged_scores = torch.cat([self.finished_scores, final], 1)
        keep = merged_scores.topk(m)[1]
        self.finished = self._gather(torch.cat([self.finished, cand_seqs], 1), keep)
        self.finished_scores = self._gather(merged_scores, keep)
        self.finished_beams = self._gather(torch.cat([self.finished_beams, cand_beams], 1), keep)
        self.is_finished = self._gather(torch.cat([self.is_finished, just_finished], 1), keep)

        state.cache.reorder_cache(self.running_beams[:, :, gen_pos].reshape(-1), length=state.length)
        state.length += 1

        # Can a live beam still beat the worst kept hypothesis?
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            best_len = state.max_length - state.prompt_length
        else:
            best_len = state.length - state.prompt_length
        best_running = self.running_scores[:, :1] / (best_len**self.length_penalty)
        worst_final = torch.where(self.is_finished, self.finished_scores.min(1, keepdim=True)[0], -1.0e9)
        self.can_improve &= (best_running > worst_final).any(-1, keepdim=True)
        all_done = self.is_finished.all() & (self.early_stopping is True)
        return not bool(self.can_improve.any() & ~all_done & ~hits.all())

    def _hits_stop(self, state: DecodingState, seqs: torch.Tensor) -> torch.Tensor:
        """(B, K) whether each candidate ends here: eos, the length limit, or a user criterion."""
        b, k, length = seqs.shape
        if length >= state.max_length:
            return torch.ones(b, k, dtype=torch.bool, device=seqs.device)
        hits = torch.zeros(b, k, dtype=torch.bool, device=seqs.device)
        if state.eos is not None:
            hits = torch.isin(seqs[:, :, -1], state.eos)
        user = state.user_stop(seqs.reshape(b * k, length))
        if user is not None:
            hits = hits | user.view(b, k)
        return hits

    def finish(self, state: DecodingState) -> dict[str, Any]:
        r = self.num_return
        seqs = self.finished[:, :r].reshape(self.b * r, -1)
        scores = self.finished_scores[:, :r].reshape(-1)
        beams = self.finished_beams[:, :r].reshape(self.b * r, -1)
        generated = int((beams >= 0).sum(1).max())
        return {
            "sequences": seqs[:, : state.prompt_length + generated].clone(),
            "sequences_scores": scores,
            "beam_indices": beams[:, :generated],
        }


# ------------------------------------------------------------------------------------------------
# generate().


class GenerationMixin:
    """``generate()`` for encoder-decoder models that provide ``_encode`` and ``decode_step``."""

    generation_config: GenerationConfig

    def _prepare_generation_config(self, generation_config: GenerationConfig | None, kwargs: dict[str, Any]) -> tuple[GenerationConfig, dict[str, Any], bool]:
        base = generation_config if generation_config is not None else self.generation_config
        if not isinstance(base, GenerationConfig):
            raise TypeError(f"generation_config must be a t5kit GenerationConfig, got {type(base).__name__}")
        gc = base.copy()
        length_set = gc.max_length is not None or kwargs.get("max_length") is not None
        rest = gc.update(**kwargs)
        # Special tokens fall back to the model config, as the reference's generation config does.
        for name in ("decoder_start_token_id", "eos_token_id", "pad_token_id"):
            if getattr(gc, name) is None:
                setattr(gc, name, getattr(self.config, name, None))  # type: ignore[attr-defined]
        gc.validate()
        return gc, rest, length_set

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        logits_processor: Sequence[LogitsProcessor] | None = None,
        stopping_criteria: Sequence[StoppingCriterion] | None = None,
        streamer: Any = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        **kwargs: Any,
    ) -> torch.Tensor | GenerateEncoderDecoderOutput | GenerateBeamEncoderDecoderOutput:
        """Generate token ids for a batch of inputs.

        Args:
            inputs: input_ids (B, S); or pass ``input_ids=``, ``inputs_embeds=`` (B, S, d_model) or
                ``encoder_outputs=`` (with ``attention_mask=`` (B, S) for padded batches).
            generation_config: Overrides the model's ``generation_config`` (from
                ``generation_config.json`` or the model config).
            logits_processor: Extra callables ``(sequences (N, T), scores (N, V)) -> scores``,
                applied after the built-in ones.
            stopping_criteria: Extra callables ``(sequences, scores) -> bool or (N,) bool``.
            streamer: An object with ``put(tokens)`` and ``end()`` (``TextStreamer``,
                ``TextIteratorStreamer``); batch size 1 and one beam.
            generator / seed: Random source for sampling (``seed`` makes a fresh generator).
            **kwargs: Any ``GenerationConfig`` field (``max_new_tokens``, ``num_beams``,
                ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``num_return_sequences``,
                ``length_penalty``, ``early_stopping``, ``no_repeat_ngram_size``,
                ``repetition_penalty``, ``bad_words_ids``, ``min_new_tokens``, ``eos_token_id``,
                ``return_dict_in_generate``, ``output_scores`` ...), and the model inputs
                ``attention_mask``, ``decoder_input_ids`` (a decoder prompt, (B, T)).

        Returns:
            sequences (N, L) starting with the decoder start token, N = B * num_return_sequences;
            with ``return_dict_in_generate=True`` an output object that also holds ``scores``,
            ``sequences_scores`` (beam search) and ``beam_indices``.
        """
        gc, model_kwargs, length_set = self._prepare_generation_config(generation_config, dict(kwargs))
        input_ids = model_kwargs.pop("input_ids", None)
        if inputs is not None:
            if input_ids is not None:
                raise ValueError("Pass the input ids once: either as `inputs` or as `input_ids`")
            input_ids = inputs
        attention_mask = model_kwargs.pop("attention_mask", None)
        inputs_embeds = model_kwargs.pop("inputs_embeds", None)
        encoder_outputs = model_kwargs.pop("encoder_outputs", None)
        decoder_input_ids = model_kwargs.pop("decoder_input_ids", None)
        model_kwargs.pop("token_type_ids", None)  # tokenizer output that T5 does not use
        if model_kwargs:
            raise ValueError(
                f"generate() got options it does not know: {sorted(model_kwargs)}. Generation options are the "
                "GenerationConfig fields; model inputs are input_ids, attention_mask, inputs_embeds, "
                "encoder_outputs and decoder_input_ids"
            )
        if gc.decoder_start_token_id is None:
            raise ValueError("decoder_start_token_id is not set in the generation config or the model config")
        eos_list = [] if gc.eos_token_id is None else ([gc.eos_token_id] if isinstance(gc.eos_token_id, int) else list(gc.eos_token_id))
        pad = gc.pad_token_id if gc.pad_token_id is not None else (eos_list[0] if eos_list else 0)
        if seed is not None:
            if generator is not None:
                raise ValueError("Pass either a generator or a seed, not both")
            generator = torch.Generator(device=self.device).manual_seed(seed)  # type: ignore[attr-defined]

        # 1. Encode once.
        if encoder_outputs is None:
            if input_ids is None and inputs_embeds is None:
                raise ValueError("generate() needs input_ids, inputs_embeds or encoder_outputs")
            if input_ids is not None and attention_mask is None and inputs_embeds is None:
                attention_mask = _infer_attention_mask(input_ids, pad, eos_list)
            encoder_outputs = self._encode(input_ids, attention_mask, inputs_embeds, False, False)  # type: ignore[attr-defined]
        else:
            from .modeling import _encoder_output

            encoder_outputs = _encoder_output(encoder_outputs)
            self._check_hidden(encoder_outputs.last_hidden_state, "encoder_outputs[0]")  # type: ignore[attr-defined]
            if attention_mask is not None:
                self._check_mask(attention_mask, encoder_outputs.last_hidden_state.shape[:2], "attention_mask")  # type: ignore[attr-defined]
        hidden = encoder_outputs.last_hidden_state  # (B, S, d_model)
        batch = hidden.shape[0]
        device = hidden.device

        # 2. The decoder prompt and lengths (counted with the prompt, as the reference does).
        if decoder_input_ids is None:
            decoder_input_ids = torch.full((batch, 1), gc.decoder_start_token_id, dtype=torch.long, device=device)
        else:
            self._check_ids(decoder_input_ids, "decoder_input_ids")  # type: ignore[attr-defined]
            if decoder_input_ids.shape[0] != batch:
                raise ValueError(f"decoder_input_ids has {decoder_input_ids.shape[0]} rows for {batch} inputs")
            decoder_input_ids = decoder_input_ids.to(device)
        prompt = decoder_input_ids.shape[1]
        if gc.max_new_tokens is not None:
            max_length = prompt + gc.max_new_tokens
        elif length_set:
            max_length = gc.max_length  # type: ignore[assignment]
        else:
            max_length = prompt + _DEFAULT_MAX_NEW_TOKENS
        if max_length <= prompt:
            raise ValueError(
                f"max_length ({max_length}) leaves no room to generate after the {prompt}-token decoder prompt; "
                "use max_new_tokens"
            )
        min_length = prompt + gc.min_new_tokens if gc.min_new_tokens is not None else (gc.min_length or 0)

        # 3. Rows: beams or returned samples share their input's encoder output.
        beams = gc.num_beams or 1
        group = beams if beams > 1 else (gc.num_return_sequences or 1)
        if streamer is not None and batch * group > 1:
            raise ValueError("Streaming supports one input and one beam/sequence at a time")
        rows = batch * group
        vocab = self.config.vocab_size  # type: ignore[attr-defined]
        static = gc.cache_implementation in ("static", "offloaded_static")
        step = self.decode_step  # type: ignore[attr-defined]
        later_step = step
        if static and not gc.disable_compile:
            later_step = _compiled_step(self)
        sequences = torch.full((rows, max_length), pad, dtype=torch.long, device=device)
        sequences[:, :prompt] = decoder_input_ids.repeat_interleave(group, 0)
        procs = build_processors(gc, eos_list, vocab, min_length, device) + list(logits_processor or [])
        want_dict = bool(gc.return_dict_in_generate)
        state = DecodingState(
            sequences=sequences,
            length=prompt,
            prompt_length=prompt,
            max_length=max_length,
            encoder_hidden_states=hidden,
            encoder_attention_mask=attention_mask,
            cache=EncoderDecoderCache(self.config.num_decoder_layers, max_length=max_length, static=static),  # type: ignore[attr-defined]
            processors=procs,
            stopping_criteria=list(stopping_criteria or []),
            eos=torch.tensor(eos_list, device=device) if eos_list else None,
            pad_token_id=pad,
            generator=generator,
            streamer=streamer,
            scores=[] if want_dict and gc.output_scores else None,
            raw_logits=[] if want_dict and gc.output_logits else None,
        )
        strategy: GreedyOrSample | BeamSearch
        strategy = BeamSearch(state, gc, batch) if beams > 1 else GreedyOrSample(state, bool(gc.do_sample))

        # 4. One loop: feed the new tokens, let the strategy choose, until it says done.
        if streamer is not None:
            streamer.put(state.tokens.cpu())
        feed = state.tokens  # the whole decoder prompt first, then one token per step
        while True:
            logits = step(feed, state.encoder_hidden_states, state.encoder_attention_mask, state.cache)
            if strategy.step(state, logits.float()):
                break
            # The first step also computes the cross-attention keys/values; later ones repeat one shape.
            feed, step = state.last_tokens, later_step
        if streamer is not None:
            streamer.end()

        result = strategy.finish(state)
        if not want_dict:
            return result["sequences"]
        extra = dict(
            scores=tuple(state.scores) if state.scores is not None else None,
            logits=tuple(state.raw_logits) if state.raw_logits is not None else None,
            encoder_outputs=encoder_outputs,
            past_key_values=state.cache,
        )
        if beams > 1:
            if not gc.output_scores:
                result["sequences_scores"] = None
            return GenerateBeamEncoderDecoderOutput(**result, **extra)
        return GenerateEncoderDecoderOutput(**result, **extra)


_COMPILED_STEPS: dict[tuple[type, bool], Callable[..., torch.Tensor]] = {}
# Graphs one compiled step may hold (torch's default limit is 8): one per model config and shapes.
# Only the first call of a generation can compile, so this bounds work per distinct setting, not per step.
_RECOMPILE_LIMIT = 64
# On a GPU, replay the compiled step as a CUDA graph (captured once per generation, see _StepGraph).
CUDA_GRAPHS: bool = True


def _compiled_step(model: Any) -> Callable[..., torch.Tensor]:
    """``model.decode_step`` captured by ``torch.compile``, for the steps of one generation.

    One compiled function per model class (and CPU or GPU): its graphs are cached per input shapes
    and guarded on the model, so models of a class share it. The first call checks the guards (and
    compiles if no graph fits); the later steps of the same generation feed the same model, cache
    and shapes, so they skip the checks (about 0.1 ms a step). Only this function's calls skip them.
    A call that compiled a graph then returns the compiler's freed memory to the kernel (see
    :func:`_compiling`).
    Past ``_RECOMPILE_LIMIT`` graphs (many configs or shapes in one process) the generation warns
    and runs its steps eagerly, as ``disable_compile=True`` would. A prepacked float32 model has its
    step's layers re-stored for inductor's own matrix-product kernels first (see
    :func:`t5kit.packing.block_decoding_step`).

    On a GPU (with :data:`CUDA_GRAPHS`) the second step onwards replays the compiled step as one
    CUDA graph (:class:`_StepGraph`): a decoding step is a few hundred small kernels, whose launches
    from the host take longer than the GPU takes to run them.
    """
    from . import packing  # lazy: packing imports the models
    from .modeling import compile_options  # lazy: modeling imports this module

    if packing.BLOCK_DECODING_STEP:
        packing.block_decoding_step(model)  # once per model: later calls find nothing left to block
    cls = type(model)
    cuda = model.device.type == "cuda"
    if (cls, cuda) not in _COMPILED_STEPS:
        _COMPILED_STEPS[cls, cuda] = torch.compile(cls.decode_step, fullgraph=True, options=compile_options(cuda))
    compiled = _COMPILED_STEPS[cls, cuda]
    fn: Callable[..., torch.Tensor] = compiled
    checked = False
    graphs = cuda and CUDA_GRAPHS
    feed_buffer: torch.Tensor | None = None  # GPU: the step's tokens, at one address for the graph
    graph: _StepGraph | None = None

    def step(feed: torch.Tensor, *args: Any) -> torch.Tensor:
        nonlocal checked, fn, graphs, feed_buffer, graph
        if graphs:
            if feed_buffer is None or feed_buffer.shape != feed.shape:
                feed_buffer = feed.clone(memory_format=torch.contiguous_format)
            else:
                feed_buffer.copy_(feed)
            feed = feed_buffer
        if checked:
            if graphs and fn is compiled:
                if graph is None or not graph.fits(feed, *args):
                    try:
                        graph = _StepGraph(compiled, model, feed, *args)
                    except RuntimeError as err:  # capture is refused (an op that cannot be captured)
                        warnings.warn(f"The decoding step could not be captured as a CUDA graph ({err}); "
                                      "running it without", stacklevel=3)
                        graphs, graph = False, None
                if graph is not None:
                    return graph.replay()
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                return fn(model, feed, *args)
        checked = True
        try:
            with _compiling() as limit:
                logits = compiled(model, feed, *args)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            warnings.warn(
                f"cache_implementation='static': {type(model).__name__}'s compiled decoding step already holds "
                f"{limit} graphs (one per model config and input shapes), so this generation runs its steps "
                "eagerly; pass disable_compile=True to silence this", stacklevel=3,
            )
            fn = cls.decode_step  # eager for the rest of this generation
            return fn(model, feed, *args)
        return logits

    return step


def _step_inputs(hidden: torch.Tensor, mask: torch.Tensor | None, cache: EncoderDecoderCache) -> list[Any]:
    """Every tensor a decoding step reads or writes in place, besides its tokens: a captured step
    is valid only while these are the same tensors (same addresses)."""
    return [
        hidden, mask, cache.position, *cache.self_keys, *cache.self_values, *cache.cross_keys,
        *cache.cross_values, *cache.position_bias_tables.values(),
    ]


class _StepGraph:
    """A compiled decoding step captured as a CUDA graph, replayed for the later steps of one
    generation.

    The graph reads its tokens from one buffer (``feed``) and the encoder output, mask and static
    cache (:func:`_step_inputs`) at the addresses they had when it was captured; the cache's
    position tensor advances inside the graph. :meth:`fits` says whether those are still the
    tensors the step is given (beam search reorders the cache in place, so they stay). The graph
    was captured after the compiled step had already run once (a compile warms every kernel up).
    Each replay returns a copy of the logits: the graph overwrites its own output at the next one.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], model: Any, feed: torch.Tensor, hidden: torch.Tensor,
                 mask: torch.Tensor | None, cache: EncoderDecoderCache) -> None:
        self.feed = feed
        self.inputs = _step_inputs(hidden, mask, cache)
        self.graph = torch.cuda.CUDAGraph()
        # On the model's GPU (torch.cuda.graph's default capture stream is the first device's).
        with torch.cuda.device(feed.device), torch.cuda.graph(self.graph, stream=torch.cuda.Stream(feed.device)):
            self.logits = fn(model, feed, hidden, mask, cache)  # (N, vocab_size); nothing runs yet

    def fits(self, feed: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor | None,
             cache: EncoderDecoderCache) -> bool:
        now = _step_inputs(hidden, mask, cache)
        return feed is self.feed and len(now) == len(self.inputs) and all(a is b for a, b in zip(now, self.inputs))

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.logits.clone()


@contextlib.contextmanager
def _compiling() -> Iterator[int]:
    """What a call of one of t5kit's compiled graphs (the decoding step, the encoder) runs under:
    dynamo's recompile limit raised to ``_RECOMPILE_LIMIT`` (yielded), inductor's miscompile fixed
    (:func:`t5kit.modeling.inductor_fixes`), and free memory handed back to the kernel when a
    compile starts (:func:`_release_memory_on_compile`) and, if the call compiled a graph, when it
    returns (:func:`t5kit.packing.release_freed_memory`): prepack's allocator setting would keep
    the compiler's freed memory resident."""
    from . import packing  # lazy: packing imports the models
    from .modeling import inductor_fixes  # lazy: modeling imports this module

    limit = max(torch._dynamo.config.recompile_limit, _RECOMPILE_LIMIT)
    graphs_before = _graphs_compiled()
    with torch._dynamo.config.patch(recompile_limit=limit), inductor_fixes(), _release_memory_on_compile():
        yield limit
    if _graphs_compiled() != graphs_before:
        packing.release_freed_memory()


@contextlib.contextmanager
def _release_memory_on_compile() -> Iterator[None]:
    """While in force, a ``torch.compile`` that starts first returns the allocator's free pages to
    the kernel (:func:`t5kit.packing.release_freed_memory`). The compiler's transient memory (tens
    to a hundred MB for a t5-base step) then reuses those pages instead of adding to what earlier
    generations left resident, which prepack's allocator setting keeps. Nothing happens on calls
    that find a compiled graph, nor where dynamo's compile callbacks are missing."""
    from . import packing  # lazy: packing imports the models

    try:
        from torch._dynamo.callback import callback_handler
    except ImportError:
        yield
        return
    release = lambda _args: packing.release_freed_memory()  # noqa: E731
    callback_handler.register_start_callback(release)
    try:
        yield
    finally:
        callback_handler.remove_start_callback(release)


def _graphs_compiled() -> int:
    """How many graphs torch.compile has made in this process (dynamo's own counter)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _infer_attention_mask(input_ids: torch.Tensor, pad: int, eos: list[int]) -> torch.Tensor | None:
    """Mask out pad tokens when the pad id is not also an eos id (the reference's rule)."""
    if pad in eos or not bool((input_ids == pad).any()):
        return None
    return (input_ids != pad).long()
