"""Span corruption, seq2seq collation and packing."""

from __future__ import annotations

import pytest
import torch

import t5kit
from t5kit.data import (
    DataCollatorForSeq2Seq,
    DataCollatorForSpanCorruption,
    compute_input_and_target_lengths,
    pack_examples,
    random_spans_noise_mask,
)

from conftest import tiny_model


def test_length_arithmetic_matches_t5():
    # T5's pre-training numbers: 512-token inputs come from 568 raw tokens, with 114-token targets.
    assert compute_input_and_target_lengths(512, 0.15, 3.0) == (568, 114)
    # By hand: 141 tokens -> 21 noise in 7 spans -> 120 + 7 + 1 = 128 inputs, 21 + 7 + 1 = 29 targets;
    # 142 tokens would give 129 inputs.
    assert compute_input_and_target_lengths(128, 0.15, 3.0) == (141, 29)
    for inputs_length in (16, 64, 100, 256):
        tokens, targets = compute_input_and_target_lengths(inputs_length)
        collator = DataCollatorForSpanCorruption(vocab_size=32100, seed=inputs_length)
        for _ in range(5):
            inp, tgt = collator.corrupt(list(range(2, 2 + tokens)))
            assert len(inp) == inputs_length and len(tgt) == targets


@pytest.mark.parametrize("length", [10, 57, 568])
def test_noise_mask_density_and_spans(length):
    g = torch.Generator().manual_seed(length)
    expected_noise = min(max(round(length * 0.15), 1), length - 1)
    expected_spans = max(round(expected_noise / 3.0), 1)
    for _ in range(50):
        mask = random_spans_noise_mask(length, 0.15, 3.0, g)
        assert mask.shape == (length,) and mask.dtype == torch.bool
        assert int(mask.sum()) == expected_noise
        assert not bool(mask[0])  # non-noise first, as T5
        starts = mask & ~torch.cat([torch.zeros(1, dtype=torch.bool), mask[:-1]])
        assert int(starts.sum()) == expected_spans


def test_span_lengths_are_random_and_average_to_the_mean():
    g = torch.Generator().manual_seed(0)
    lengths = []
    for _ in range(200):
        mask = random_spans_noise_mask(568, 0.15, 3.0, g).int()
        edges = torch.diff(torch.cat([torch.zeros(1, dtype=torch.int), mask, torch.zeros(1, dtype=torch.int)]))
        starts, ends = (edges == 1).nonzero().flatten(), (edges == -1).nonzero().flatten()
        lengths += (ends - starts).tolist()
    assert abs(sum(lengths) / len(lengths) - 85 / 28) < 1e-9  # 85 noise tokens in 28 spans every time
    assert len(set(lengths)) > 3  # but the spans vary


def test_sentinels_count_down_from_extra_id_0_and_reconstruct():
    tokenizer = t5kit.T5TokenizerFast.from_pretrained(str(pytest.importorskip("conftest").SHARED / "data" / "t5-vocab"))
    collator = DataCollatorForSpanCorruption(vocab_size=len(tokenizer), seed=3)
    tokens = list(range(100, 160))
    inputs, targets = collator.corrupt(tokens)
    sentinels = [t for t in inputs if t >= 32000]
    assert sentinels == [32099 - k for k in range(len(sentinels))]
    assert tokenizer.convert_ids_to_tokens(sentinels[:2]) == ["<extra_id_0>", "<extra_id_1>"]
    assert [t for t in targets if t >= 32000] == sentinels
    assert inputs[-1] == targets[-1] == 1
    # Filling each sentinel of the input with its span from the target gives the original back.
    spans: dict[int, list[int]] = {}
    current = None
    for t in targets[:-1]:
        if t in sentinels:
            current = t
            spans[t] = []
        else:
            spans[current].append(t)
    rebuilt = [x for t in inputs[:-1] for x in (spans[t] if t in spans else [t])]
    assert rebuilt == tokens
    batch = collator([tokens, tokens[:30]])
    assert batch["input_ids"].shape[0] == 2 and (batch["labels"][1] == -100).any()


def test_seq2seq_collator_pads_labels_with_minus_100():
    batch = DataCollatorForSeq2Seq(pad_token_id=0, pad_to_multiple_of=4)(
        [{"input_ids": [5, 6, 1], "labels": [7, 1]}, {"input_ids": [5, 1], "labels": [8, 9, 10, 1]}]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 1, 0], [5, 1, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[7, 1, -100, -100], [8, 9, 10, 1]]
    with pytest.raises(ValueError):
        DataCollatorForSeq2Seq()([])


@pytest.mark.parametrize("family", ["T5", "UMT5"])
def test_packed_loss_and_gradients_equal_unpacked(family):
    model = tiny_model(family, "gated_untied")
    g = torch.Generator().manual_seed(1)
    examples = []
    for _ in range(9):
        n, k = int(torch.randint(2, 9, (1,), generator=g)), int(torch.randint(1, 6, (1,), generator=g))
        examples.append({"input_ids": torch.randint(2, 100, (n,), generator=g).tolist() + [1],
                         "labels": torch.randint(2, 100, (k,), generator=g).tolist() + [1]})
    plain = model(**DataCollatorForSeq2Seq()(examples)).loss
    plain.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    packed = pack_examples(examples, max_input_length=20, max_target_length=12)
    assert packed["input_ids"].shape[0] < len(examples)  # it did pack
    loss = model(**{k: v for k, v in packed.items() if k != "attention_mask"}).loss
    loss.backward()
    torch.testing.assert_close(loss, plain, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="longer than a packed row"):
        pack_examples(examples, max_input_length=3, max_target_length=12)
