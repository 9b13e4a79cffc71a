"""Training data for T5: span corruption, supervised seq2seq batches, and packing.

* ``random_spans_noise_mask`` / ``compute_input_and_target_lengths``: T5's pre-training noise, as
  in the original ``t5.data.preprocessors`` (and transformers' ``run_t5_mlm_flax.py`` port).
* ``DataCollatorForSpanCorruption``: token sequences -> ``input_ids`` with one sentinel per noise
  span (``<extra_id_0>`` = vocabulary size - 1, then downward) and ``labels`` holding the spans.
* ``DataCollatorForSeq2Seq``: dynamic padding; labels padded with -100.
* ``pack_examples``: several short examples per row, with segment ids that keep attention (and
  relative positions) inside each example; the loss equals the unpacked loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

__all__ = [
    "random_spans_noise_mask",
    "compute_input_and_target_lengths",
    "DataCollatorForSpanCorruption",
    "DataCollatorForSeq2Seq",
    "pack_examples",
]


def compute_input_and_target_lengths(inputs_length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0) -> tuple[int, int]:
    """(raw tokens to take, target length) so that span-corrupted inputs are exactly ``inputs_length``.

    The corrupted input holds the non-noise tokens, one sentinel per noise span and ``</s>``; the
    target holds the noise tokens, one sentinel per span and ``</s>``.
    """

    def lengths(tokens_length: int) -> tuple[int, int]:
        num_noise = int(round(tokens_length * noise_density))
        num_nonnoise = tokens_length - num_noise
        num_spans = int(round(num_noise / mean_noise_span_length))
        return num_nonnoise + num_spans + 1, num_noise + num_spans + 1

    tokens_length = inputs_length
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    _, targets_length = lengths(tokens_length)
    # As T5: with density 0.5, keep targets no longer than inputs.
    if noise_density == 0.5 and targets_length > inputs_length:
        tokens_length -= 1
        targets_length -= 1
    return tokens_length, targets_length


def random_spans_noise_mask(
    length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Boolean (length,) mask of noise tokens: round(length * density) of them (at least 1, at most
    length - 1), in round(noise / mean_span_length) spans (at least 1); the sequence alternates
    non-noise and noise spans, starting with non-noise. Span lengths are a random segmentation."""
    num_noise = int(round(length * noise_density))
    num_noise = min(max(num_noise, 1), length - 1)
    num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
    num_nonnoise = length - num_noise

    def segmentation(num_items: int, num_segments: int) -> torch.Tensor:
        """Split num_items into num_segments non-empty runs at random."""
        first_in_segment = torch.arange(num_items - 1) < num_segments - 1
        first_in_segment = first_in_segment[torch.randperm(num_items - 1, generator=generator)]
        segment_id = torch.cat([torch.zeros(1, dtype=torch.long), first_in_segment.long().cumsum(0)])
        return torch.bincount(segment_id, minlength=num_segments)

    noise_lengths = segmentation(num_noise, num_spans)
    nonnoise_lengths = segmentation(num_nonnoise, num_spans)
    interleaved = torch.stack([nonnoise_lengths, noise_lengths], dim=1).reshape(num_spans * 2)
    span_starts = interleaved.cumsum(0)[:-1]
    span_start_indicator = torch.zeros(length, dtype=torch.long)
    span_start_indicator[span_starts] = 1
    return span_start_indicator.cumsum(0) % 2 == 1


@dataclass
class DataCollatorForSpanCorruption:
    """T5's span-corruption objective over lists of token ids (e.g. chunks of ``tokens_length``).

    Args:
        vocab_size: Sentinels are ``vocab_size - 1``, ``vocab_size - 2``, ... (``<extra_id_0>``,
            ``<extra_id_1>``, ... for the T5 vocabulary, ``len(tokenizer)``).
        noise_density, mean_noise_span_length: T5's defaults 0.15 and 3.0.
        eos_token_id, pad_token_id: ``</s>`` (appended) and padding.
        seed: Seed of the noise (a torch Generator; None: torch's global generator).

    Returns ``{"input_ids", "attention_mask", "labels"}`` tensors; labels padded with -100.
    """

    vocab_size: int
    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0
    eos_token_id: int = 1
    pad_token_id: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.noise_density < 1.0:
            raise ValueError(f"noise_density must be in (0, 1), got {self.noise_density}")
        if self.mean_noise_span_length < 1:
            raise ValueError(f"mean_noise_span_length must be >= 1, got {self.mean_noise_span_length}")
        self.generator = torch.Generator().manual_seed(self.seed) if self.seed is not None else None

    def corrupt(self, tokens: Sequence[int]) -> tuple[list[int], list[int]]:
        """(inputs, targets) of one sequence, both ending in ``</s>``."""
        tokens = torch.as_tensor(list(tokens), dtype=torch.long)
        if tokens.ndim != 1 or len(tokens) < 2:
            raise ValueError("span corruption needs a 1-D sequence of at least 2 tokens")
        noise = random_spans_noise_mask(len(tokens), self.noise_density, self.mean_noise_span_length, self.generator)
        return self._keep(tokens, noise), self._keep(tokens, ~noise)

    def _keep(self, tokens: torch.Tensor, drop: torch.Tensor) -> list[int]:
        """Replace each run of dropped tokens by the next sentinel; append </s>."""
        out: list[int] = []
        span = 0
        previous = False
        for token, dropped in zip(tokens.tolist(), drop.tolist()):
            if dropped:
                if not previous:
                    out.append(self.vocab_size - 1 - span)
                    span += 1
            else:
                out.append(token)
            previous = dropped
        return out + [self.eos_token_id]

    def __call__(self, examples: Sequence[Sequence[int] | dict[str, Any]]) -> dict[str, torch.Tensor]:
        pairs = [self.corrupt(e["input_ids"] if isinstance(e, dict) else e) for e in examples]
        return DataCollatorForSeq2Seq(pad_token_id=self.pad_token_id)(
            [{"input_ids": i, "labels": t} for i, t in pairs]
        )


@dataclass
class DataCollatorForSeq2Seq:
    """Pad ``input_ids`` (with ``pad_token_id``) and ``labels`` (with -100) to the longest in the batch.

    Examples are dicts with ``input_ids`` and optionally ``labels`` (lists or 1-D tensors).
    ``pad_to_multiple_of`` rounds the padded length up (tensor-core friendly shapes).
    """

    pad_token_id: int = 0
    label_pad_token_id: int = -100
    pad_to_multiple_of: int | None = None
    max_length: int | None = None

    def _pad(self, seqs: list[list[int]], value: int) -> torch.Tensor:
        n = max(len(s) for s in seqs)
        if self.pad_to_multiple_of:
            n = -(-n // self.pad_to_multiple_of) * self.pad_to_multiple_of
        out = torch.full((len(seqs), n), value, dtype=torch.long)
        for i, s in enumerate(seqs):
            out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        return out

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        inputs = [list(map(int, e["input_ids"]))[: self.max_length] for e in examples]
        if any(len(s) == 0 for s in inputs):
            raise ValueError("an example has no input_ids")
        batch = {"input_ids": self._pad(inputs, self.pad_token_id)}
        lengths = torch.tensor([len(s) for s in inputs])
        batch["attention_mask"] = (torch.arange(batch["input_ids"].shape[1])[None] < lengths[:, None]).long()
        if "labels" in examples[0]:
            labels = [list(map(int, e["labels"]))[: self.max_length] for e in examples]
            batch["labels"] = self._pad(labels, self.label_pad_token_id)
        return batch


def pack_examples(
    examples: Sequence[dict[str, Sequence[int]]], max_input_length: int, max_target_length: int, pad_token_id: int = 0
) -> dict[str, torch.Tensor]:
    """Pack examples (``input_ids`` and ``labels``) greedily into rows of fixed lengths.

    Returns ``input_ids``, ``labels`` (-100 on padding), and ``encoder_segment_ids`` /
    ``decoder_segment_ids`` (1, 2, ... per example in a row; 0 on padding). Give the segment ids to
    the model: attention stays inside each example, relative positions restart with it, and
    decoder inputs are shifted within each example.
    """
    rows: list[list[dict[str, Sequence[int]]]] = []
    used: list[tuple[int, int]] = []
    for e in examples:
        n_in, n_out = len(e["input_ids"]), len(e["labels"])
        if n_in > max_input_length or n_out > max_target_length:
            raise ValueError(f"an example ({n_in} input, {n_out} target tokens) is longer than a packed row")
        for r, (a, b) in enumerate(used):  # first row with room (first-fit)
            if a + n_in <= max_input_length and b + n_out <= max_target_length:
                rows[r].append(e)
                used[r] = (a + n_in, b + n_out)
                break
        else:
            rows.append([e])
            used.append((n_in, n_out))
    out = {
        "input_ids": torch.full((len(rows), max_input_length), pad_token_id, dtype=torch.long),
        "labels": torch.full((len(rows), max_target_length), -100, dtype=torch.long),
        "encoder_segment_ids": torch.zeros(len(rows), max_input_length, dtype=torch.long),
        "decoder_segment_ids": torch.zeros(len(rows), max_target_length, dtype=torch.long),
    }
    for r, row in enumerate(rows):
        a = b = 0
        for s, e in enumerate(row, start=1):
            n_in, n_out = len(e["input_ids"]), len(e["labels"])
            out["input_ids"][r, a : a + n_in] = torch.as_tensor(list(e["input_ids"]))
            out["labels"][r, b : b + n_out] = torch.as_tensor(list(e["labels"]))
            out["encoder_segment_ids"][r, a : a + n_in] = s
            out["decoder_segment_ids"][r, b : b + n_out] = s
            a, b = a + n_in, b + n_out
    out["attention_mask"] = (out["encoder_segment_ids"] > 0).long()
    return out
