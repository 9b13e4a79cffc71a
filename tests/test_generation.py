"""generate(): token-for-token parity with transformers, sampling statistics, streaming, options.

Reference models are random transformers models saved to disk and loaded by both libraries.
umT5's reference applies the tied-head rescale to its untied head (a bug, see test_modeling);
for generation parity the reference's lm_head is pre-multiplied by sqrt(d_model) to cancel it,
and one test shows that without this the reference's beams differ.
"""

from __future__ import annotations

import copy
import json
import os
import threading

import pytest
import torch

import t5kit
from t5kit.generation import GenerationConfig, _argmax, _graphs_compiled, _top_k, build_processors

from conftest import FAMILIES, VARIANTS, hf, load_hf, make_batch, save_hf_model, tiny_model

GEN_VARIANTS = ("gated_untied", "gated_silu_untied")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(family, variant) -> (reference model, t5kit model), built once per module."""
    made: dict[tuple[str, str], tuple] = {}

    def get(family: str, variant: str):
        if (family, variant) not in made:
            path = tmp_path_factory.mktemp(f"{family}_{variant}")
            save_hf_model(family, "ForConditionalGeneration", variant, path)
            ref = load_hf(family, "ForConditionalGeneration", path)
            if family == "UMT5":  # cancel the reference's rescale of an untied head
                with torch.no_grad():
                    ref.lm_head.weight.mul_(ref.config.d_model**0.5)
            ours = getattr(t5kit, f"{family}ForConditionalGeneration").from_pretrained(path)
            made[family, variant] = (ref, ours)
        return made[family, variant]

    return get


def batch_for(variant: str):
    ids, mask, _ = make_batch(VARIANTS[variant]["vocab_size"], batch=3, length=9)
    return ids, mask


def frequent_eos(ours, ids, mask) -> int:
    """A token the model emits early, used as eos so that sequences finish at unequal lengths."""
    return int(ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6)[0, 3])


def pad_after_eos(seqs: torch.Tensor, eos: list[int], pad: int = 0, prompt: int = 1) -> torch.Tensor:
    """The reference's beam outputs continue a finished row with eos (its fill-value bug); t5kit
    pads them. Equal tokens means equal up to the first eos, pad after it."""
    out = seqs.clone()
    for row in out:
        hits = [i for i in range(prompt, len(row)) if int(row[i]) in eos]
        if hits:
            row[hits[0] + 1 :] = pad
    return out


GREEDY_CASES = [
    dict(),
    dict(max_new_tokens=15),
    dict(max_length=9),
    dict(max_new_tokens=12, no_repeat_ngram_size=2),
    dict(max_new_tokens=12, repetition_penalty=1.5),
    dict(max_new_tokens=12, repetition_penalty=0.7, no_repeat_ngram_size=3, min_new_tokens=6),
    dict(max_new_tokens=12, min_length=5),
]

BEAM_CASES = [
    dict(num_beams=2),
    dict(num_beams=3, num_return_sequences=3),
    dict(num_beams=4, num_return_sequences=2, length_penalty=0.5),
    dict(num_beams=5, length_penalty=2.0, early_stopping="never"),
    dict(num_beams=4, early_stopping=True, length_penalty=-1.0),
    dict(num_beams=3, no_repeat_ngram_size=2, repetition_penalty=1.3, min_new_tokens=4),
]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", GEN_VARIANTS)
@pytest.mark.parametrize("case", range(len(GREEDY_CASES)))
def test_greedy_matches_reference(pair, family, variant, case):
    ref, ours = pair(family, variant)
    ids, mask = batch_for(variant)
    eos = frequent_eos(ours, ids, mask)
    for eos_ids in (1, [1, eos]):  # the config's eos, then a list holding a frequent token
        kw = dict(GREEDY_CASES[case], eos_token_id=eos_ids, return_dict_in_generate=True, output_scores=True)
        expected = ref.generate(input_ids=ids, attention_mask=mask, **kw)
        got = ours.generate(input_ids=ids, attention_mask=mask, **kw)
        assert torch.equal(got.sequences, expected.sequences), (kw, got.sequences, expected.sequences)
        assert len(got.scores) == len(expected.scores)
        for a, b in zip(got.scores, expected.scores):
            finite = torch.isfinite(b)
            assert torch.equal(finite, torch.isfinite(a))
            torch.testing.assert_close(a[finite], b[finite], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", GEN_VARIANTS)
@pytest.mark.parametrize("case", range(len(BEAM_CASES)))
def test_beam_search_matches_reference(pair, family, variant, case):
    ref, ours = pair(family, variant)
    ids, mask = batch_for(variant)
    eos = frequent_eos(ours, ids, mask)
    for eos_ids in (1, [1, eos]):
        kw = dict(BEAM_CASES[case], max_new_tokens=10, eos_token_id=eos_ids, return_dict_in_generate=True, output_scores=True)
        expected = ref.generate(input_ids=ids, attention_mask=mask, **kw)
        got = ours.generate(input_ids=ids, attention_mask=mask, **kw)
        eos_list = eos_ids if isinstance(eos_ids, list) else [eos_ids]
        assert torch.equal(got.sequences, pad_after_eos(expected.sequences, eos_list)), (kw, got.sequences, expected.sequences)
        torch.testing.assert_close(got.sequences_scores, expected.sequences_scores, rtol=1e-5, atol=1e-5)
        assert torch.equal(got.beam_indices, expected.beam_indices.long())


def test_large_vocabulary_beams_and_greedy_match_reference(tmp_path):
    """A vocabulary large enough (4 beams x 2048 = 64 chunks) for the chunked candidate top-k and
    numpy's argmax to run on the real decoding loop, against the reference."""
    save_hf_model("T5", "ForConditionalGeneration", "gated_untied", tmp_path, vocab_size=2048)
    ref = load_hf("T5", "ForConditionalGeneration", tmp_path)
    ours = t5kit.T5ForConditionalGeneration.from_pretrained(tmp_path)
    ids, mask, _ = make_batch(2048, batch=3, length=9)
    for kw in (dict(num_beams=4, length_penalty=0.5), dict(num_beams=1)):
        kw.update(max_new_tokens=10, eos_token_id=None, return_dict_in_generate=True, output_scores=True)
        expected = ref.generate(input_ids=ids, attention_mask=mask, **kw)
        got = ours.generate(input_ids=ids, attention_mask=mask, **kw)
        assert torch.equal(got.sequences, expected.sequences), (kw, got.sequences, expected.sequences)
        if kw["num_beams"] > 1:
            torch.testing.assert_close(got.sequences_scores, expected.sequences_scores, rtol=1e-5, atol=1e-5)
            assert torch.equal(got.beam_indices, expected.beam_indices.long())


def test_argmax_equals_torch_argmax():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 5000, generator=g)
    scores[1, [7, 4000]] = 9.0  # a tie: the first maximum wins
    scores[2] = float("-inf")
    scores[3, [11, 300]] = float("nan")  # NaN counts as the largest
    scores[4] = 0.5
    for x in (scores, scores.double(), scores[:, ::2]):
        got = _argmax(x)
        assert got.dtype == torch.int64 and torch.equal(got, x.argmax(-1))


@pytest.mark.parametrize("n", [64 * 128, 4 * 250112, 64 * 128 + 1, 100])
def test_top_k_equals_torch_topk(n):
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(5, n, generator=g)
    scores[1, : n - 3] = float("-inf")  # fewer finite values than k
    scores[2, [5, n // 2]] = float("nan")
    scores[3] = torch.randint(0, 4, (n,), generator=g).float()  # ties everywhere
    for k in (1, 8, 16):
        values, index = _top_k(scores, k)
        expected = scores.topk(k)
        torch.testing.assert_close(values, expected.values, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(scores.gather(1, index), values, rtol=0, atol=0, equal_nan=True)
        distinct = [0, 4]  # rows of distinct values: the same positions too
        assert torch.equal(index[distinct], expected.indices[distinct])
        assert all(len(set(row.tolist())) == k for row in index)


def test_reference_pads_finished_beams_with_eos(pair):
    """The reference fills finished beams with eos where greedy fills with pad; t5kit pads both."""
    ref, ours = pair("T5", "gated_untied")
    ids, mask = batch_for("gated_untied")
    eos = frequent_eos(ours, ids, mask)
    expected = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, num_beams=4, eos_token_id=eos)
    got = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, num_beams=4, eos_token_id=eos)
    finished = [r for r in range(len(got)) if eos in got[r, 1:-1].tolist()]
    assert finished, "the test needs a row that finishes early"
    r = finished[0]
    end = got[r, 1:].tolist().index(eos) + 2
    assert (expected[r, end:] == eos).all() and (got[r, end:] == 0).all()


def test_umt5_reference_rescale_bug_changes_beams(tmp_path):
    """Without cancelling it, the reference's untied-head rescale flattens umT5's distribution."""
    save_hf_model("UMT5", "ForConditionalGeneration", "gated_untied", tmp_path)
    ref = load_hf("UMT5", "ForConditionalGeneration", tmp_path)
    ours = t5kit.UMT5ForConditionalGeneration.from_pretrained(tmp_path)
    ids, mask = batch_for("gated_untied")
    kw = dict(max_new_tokens=10, num_beams=4, return_dict_in_generate=True, output_scores=True)
    expected, got = ref.generate(input_ids=ids, attention_mask=mask, **kw), ours.generate(input_ids=ids, attention_mask=mask, **kw)
    assert not torch.allclose(got.sequences_scores, expected.sequences_scores, atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_bad_words_and_decoder_prompt_match_reference(pair, family):
    ref, ours = pair(family, "gated_untied")
    ids, mask = batch_for("gated_untied")
    greedy = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8)
    cases = [
        dict(bad_words_ids=[[int(greedy[0, 2])], [int(greedy[1, 1]), int(greedy[1, 2])]]),
        dict(decoder_input_ids=greedy[:, :3]),
        dict(decoder_input_ids=greedy[:, :3], num_beams=3),
    ]
    for kw in cases:
        expected = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, **kw)
        assert torch.equal(ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, **kw), expected), kw
    banned = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, **cases[0])
    assert int(greedy[0, 2]) not in banned[:, 1:].tolist()[0]


def test_sampling_matches_reference_under_the_same_seed(pair):
    ref, ours = pair("T5", "gated_untied")
    ids, mask = batch_for("gated_untied")
    for kw in (dict(top_k=20, top_p=0.9, temperature=0.7), dict(num_return_sequences=3, top_k=0), dict(num_beams=3)):
        torch.manual_seed(5)
        expected = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=True, **kw)
        torch.manual_seed(5)
        got = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=True, **kw)
        if kw.get("num_beams"):
            expected = pad_after_eos(expected, [1])
        assert torch.equal(got, expected), kw


def test_decoder_deeper_than_encoder(tmp_path):
    """transformers 5.23 sizes its cache by the encoder depth and crashes; t5kit generates, and its
    tokens equal a cache-free greedy loop over the full forward."""
    ref_model = save_hf_model("T5", "ForConditionalGeneration", "relu_tied", tmp_path)  # 2 encoder, 3 decoder layers
    ours = t5kit.T5ForConditionalGeneration.from_pretrained(tmp_path)
    ids, mask = batch_for("relu_tied")
    with pytest.raises(IndexError):
        ref_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5)
    got = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None)
    dec = torch.zeros(len(ids), 1, dtype=torch.long)
    for _ in range(10):
        logits = ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, use_cache=False).logits
        dec = torch.cat([dec, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(got, dec)
    beams = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, num_beams=3)
    assert beams.shape[0] == len(ids)


def test_inputs_embeds_and_encoder_outputs(pair):
    ref, ours = pair("T5", "gated_untied")
    ids, mask = batch_for("gated_untied")
    expected = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8)
    embeds = ours.shared(ids)
    assert torch.equal(ours.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=8), expected)
    assert torch.equal(ref.generate(inputs_embeds=ref.shared(ids), attention_mask=mask, max_new_tokens=8), expected)
    enc = ours.get_encoder()(input_ids=ids, attention_mask=mask)
    assert torch.equal(ours.generate(encoder_outputs=enc, attention_mask=mask, max_new_tokens=8), expected)
    assert torch.equal(ours.generate(ids, attention_mask=mask, max_new_tokens=8), expected)  # positional
    out = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, cache_implementation="static")
    assert torch.equal(out, expected)


def test_padding_inferred_without_attention_mask(pair):
    """Pad tokens in input_ids are masked when no attention_mask is passed (as transformers 4 did
    for encoder-decoders). transformers 5.23 infers the mask for decoder-only models only, so its
    encoder attends to the padding and the padded row's output changes."""
    ref, ours = pair("T5", "gated_untied")
    ids, mask = batch_for("gated_untied")
    with_mask = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8)
    assert torch.equal(ours.generate(input_ids=ids, max_new_tokens=8), with_mask)
    assert torch.equal(ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8), with_mask)
    ref_unmasked = ref.generate(input_ids=ids, max_new_tokens=8)
    assert not torch.equal(ref_unmasked[1], with_mask[1]) and torch.equal(ref_unmasked[0], with_mask[0])


def test_beams_share_encoder_keys(pair):
    """Beam rows attend to one copy of their input's encoder keys/values."""
    _, ours = pair("T5", "gated_untied")
    ids, mask = batch_for("gated_untied")
    out = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, num_beams=4, return_dict_in_generate=True)
    cache = out.past_key_values
    assert cache.cross_keys[0].shape[0] == len(ids)
    assert cache.self_keys[0].shape[0] == len(ids) * 4


# ------------------------------------------------------------------------------------------------
# cache_implementation="static": the step on a static cache, compiled.


@pytest.mark.parametrize("family", ["T5", "UMT5"])
def test_static_cache_and_compiled_step_give_the_eager_tokens(pair, family):
    """Greedy with eos (rows finish at different steps), beams, and a decoder prompt: the static
    cache run eagerly and its compiled step both give the growing cache's tokens and scores."""
    _, ours = pair(family, "gated_untied")
    ids, mask = batch_for("gated_untied")
    eos = frequent_eos(ours, ids, mask)
    prompt = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2)
    cases = [dict(eos_token_id=eos), dict(num_beams=3, eos_token_id=eos), dict(decoder_input_ids=prompt)]
    captured = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for kw in cases:
        kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=7, return_dict_in_generate=True, output_scores=True, **kw)
        eager = ours.generate(**kw)
        for static in (ours.generate(**kw, cache_implementation="static", disable_compile=True),
                       ours.generate(**kw, cache_implementation="static")):
            assert torch.equal(static.sequences, eager.sequences), kw
            for a, b in zip(static.scores, eager.scores):
                finite = b.isfinite()
                assert torch.equal(finite, a.isfinite()) and torch.allclose(a[finite], b[finite], atol=1e-5, rtol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > captured  # the step was compiled, not run eagerly


def test_compiled_step_with_one_row_and_seven_wide_heads(pair, monkeypatch):
    """torch 2.13's inductor miscompiles this step (d_kv = 7, 2 heads, one row, a cache of 9+
    positions): it fuses the softmax's passes under a loop vectorized over the heads and keeps the
    scores in a local buffer of one head, so one head gets the other's scores, off by up to 10.
    ``modeling.inductor_fixes`` (in place while the step compiles) refuses that fusion: the tokens
    and scores must equal eager decoding's. The softmax is inductor's only without t5kit's
    attention kernel (``kernels.ATTEND_KERNEL``; bfloat16 steps never use it), so it is off here."""
    monkeypatch.setattr(t5kit.kernels, "ATTEND_KERNEL", False)
    _, ours = pair("UMT5", "gated_untied")
    ids, mask = batch_for("gated_untied")
    kw = dict(input_ids=ids[:1], attention_mask=mask[:1], max_new_tokens=8, eos_token_id=None)
    kw.update(output_scores=True, return_dict_in_generate=True)
    assert ours.config.d_kv == 7 and ours.config.num_heads == 2
    static, eager = ours.generate(**kw, cache_implementation="static"), ours.generate(**kw)
    assert torch.equal(static.sequences, eager.sequences)
    torch.testing.assert_close(torch.stack(static.scores), torch.stack(eager.scores))


def _copy_of_new_class(model):
    """A copy of ``model`` whose class is a fresh subclass: compiled steps are per class, so its
    first static generation starts from a step that has compiled nothing yet."""
    fresh = copy.deepcopy(model)
    fresh.__class__ = type(f"Fresh{type(model).__name__}", (type(model),), {})
    return fresh


def test_compiling_the_step_hands_the_compilers_freed_memory_back(pair, monkeypatch):
    """A call that compiles a graph releases free memory twice (see release_freed_memory): when the
    compiler starts (from dynamo's start callback, while it has compiled nothing) and once it is
    done (its garbage). A later generation on the same shapes reuses the graph and releases nothing."""
    _, ours = pair("T5", "gated_untied")
    fresh = _copy_of_new_class(ours)
    calls = []
    monkeypatch.setattr(t5kit.packing, "release_freed_memory", lambda: calls.append(_graphs_compiled()))
    ids, mask = batch_for("gated_untied")
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, cache_implementation="static")
    expected = ours.generate(**kw, disable_compile=True)
    before = _graphs_compiled()
    assert torch.equal(fresh.generate(**kw), expected) and calls == [before, before + 1]
    assert torch.equal(fresh.generate(**kw), expected) and calls == [before, before + 1]


def test_compiled_step_past_its_graph_limit_runs_eagerly(pair, monkeypatch):
    """A step that would need more graphs than the limit allows warns and decodes eagerly: the
    same tokens, not torch's hard failure under fullgraph=True."""
    _, ours = pair("T5", "gated_untied")
    fresh = _copy_of_new_class(ours)
    monkeypatch.setattr(t5kit.generation, "_RECOMPILE_LIMIT", 0)
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 0)
    ids, mask = batch_for("gated_untied")
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, cache_implementation="static")
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with pytest.warns(UserWarning, match="runs its steps eagerly"):
        got = fresh.generate(**kw)
    assert torch.equal(got, ours.generate(**kw, disable_compile=True))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


# ------------------------------------------------------------------------------------------------
# Sampling.


def _draws(processors, logits: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    scores = logits[None].clone()
    for proc in processors:
        scores = proc(None, scores)
    g = torch.Generator().manual_seed(seed)
    samples = torch.multinomial(scores.softmax(-1).expand(n, -1), 1, generator=g).squeeze(1)
    return torch.bincount(samples, minlength=logits.numel()).double() / n


FIXED = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])


def _assert_frequencies(freq: torch.Tensor, probs: torch.Tensor, n: int) -> None:
    sigma = (probs * (1 - probs) / n).sqrt()
    assert ((freq - probs).abs() <= 5 * sigma + 1e-12).all(), (freq, probs)
    assert (freq[probs == 0] == 0).all()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_samples_softmax_of_scaled_logits(temperature):
    n = 40_000
    procs = build_processors(GenerationConfig(do_sample=True, temperature=temperature, top_k=0), [], 8, 0, torch.device("cpu"))
    _assert_frequencies(_draws(procs, FIXED, n), (FIXED / temperature).softmax(-1).double(), n)


def test_top_k_keeps_k_best_renormalised():
    n = 40_000
    procs = build_processors(GenerationConfig(do_sample=True, top_k=3), [], 8, 0, torch.device("cpu"))
    probs = torch.zeros(8, dtype=torch.double)
    probs[:3] = FIXED[:3].double().softmax(-1)
    _assert_frequencies(_draws(procs, FIXED, n), probs, n)


def test_top_p_keeps_smallest_nucleus():
    n = 40_000
    full = FIXED.double().softmax(-1)  # 0.40, 0.24, 0.15, 0.09, ...: 0.40 + 0.24 + 0.15 >= 0.75
    procs = build_processors(GenerationConfig(do_sample=True, top_k=0, top_p=0.75), [], 8, 0, torch.device("cpu"))
    probs = torch.zeros(8, dtype=torch.double)
    probs[:3] = full[:3] / full[:3].sum()
    assert full[:2].sum() < 0.75 <= full[:3].sum()
    _assert_frequencies(_draws(procs, FIXED, n), probs, n)


def test_processors_equal_reference_processors():
    gen = hf().generation
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (4, 12))
    scores = torch.randn(4, 50)
    eos = torch.tensor([1, 7])
    pairs = [
        (GenerationConfig(repetition_penalty=1.7), gen.RepetitionPenaltyLogitsProcessor(1.7)),
        (GenerationConfig(no_repeat_ngram_size=2), gen.NoRepeatNGramLogitsProcessor(2)),
        (GenerationConfig(bad_words_ids=[[3], [7], [ids[0, -1].item(), 9]]), gen.NoBadWordsLogitsProcessor([[3], [7], [ids[0, -1].item(), 9]], eos)),
        (GenerationConfig(do_sample=True, temperature=0.3, top_k=0), gen.TemperatureLogitsWarper(0.3)),
        (GenerationConfig(do_sample=True, top_k=5), gen.TopKLogitsWarper(5)),
        (GenerationConfig(do_sample=True, top_k=0, top_p=0.6), gen.TopPLogitsWarper(0.6)),
    ]
    for config, reference in pairs:
        (proc,) = build_processors(config, [1, 7], 50, 0, torch.device("cpu"))
        torch.testing.assert_close(proc(ids, scores.clone()), reference(ids, scores.clone()), rtol=0, atol=0)
    (proc,) = build_processors(GenerationConfig(), [1, 7], 50, 13, torch.device("cpu"))
    torch.testing.assert_close(proc(ids, scores.clone()), gen.MinLengthLogitsProcessor(13, eos)(ids, scores.clone()))


def test_seed_reproduces_and_limits_reduce_to_greedy():
    model = tiny_model("T5", "gated_untied")
    ids, mask = batch_for("gated_untied")
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=True, top_k=0)
    a, b = model.generate(**kw, seed=3), model.generate(**kw, seed=3)
    assert torch.equal(a, b)
    assert any(not torch.equal(a, model.generate(**kw, seed=s)) for s in (4, 5, 6))
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(model.generate(**kw, generator=g1), model.generate(**kw, generator=g2))
    greedy = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10)
    assert torch.equal(model.generate(**{**kw, "top_k": 1}, seed=1), greedy)
    assert torch.equal(model.generate(**kw, temperature=1e-4, seed=1), greedy)
    beam_kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=True, num_beams=3)
    assert torch.equal(model.generate(**beam_kw, seed=2), model.generate(**beam_kw, seed=2))
    assert model.generate(**kw, num_return_sequences=4, seed=1).shape[0] == 4 * len(ids)


# ------------------------------------------------------------------------------------------------
# Streaming, configs and errors.


@pytest.fixture(scope="module")
def vocab_model_and_tokenizer():
    from conftest import SHARED

    vocab = SHARED / "data" / "t5-vocab"
    if not vocab.exists():
        pytest.skip("the shared T5 vocabulary is not available")
    tokenizer = t5kit.AutoTokenizer.from_pretrained(str(next(p for p in vocab.iterdir() if p.is_dir()) if not (vocab / "spiece.model").exists() else vocab))
    torch.manual_seed(0)
    config = t5kit.T5Config(vocab_size=32128, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2, dropout_rate=0.0)
    return t5kit.T5ForConditionalGeneration(config).eval(), tokenizer


def test_text_iterator_streamer_yields_the_generated_text(vocab_model_and_tokenizer):
    model, tokenizer = vocab_model_and_tokenizer
    enc = tokenizer(["translate English to German: The house is wonderful."], return_tensors="pt")
    kw = dict(max_new_tokens=15, eos_token_id=None, do_sample=True, top_k=0, seed=0)  # varied words
    expected = model.generate(**enc, **kw)
    streamer = t5kit.TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=60)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(out=model.generate(**enc, **kw, streamer=streamer)))
    thread.start()
    pieces = list(streamer)
    thread.join()
    assert torch.equal(result["out"], expected)
    assert len(pieces) >= 2
    assert "".join(pieces) == tokenizer.decode(expected[0], skip_special_tokens=True)


def test_text_streamer_prints(vocab_model_and_tokenizer, capsys):
    model, tokenizer = vocab_model_and_tokenizer
    enc = tokenizer(["summarize: A short text."], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=8, streamer=t5kit.TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True))
    assert capsys.readouterr().out == tokenizer.decode(out[0], skip_special_tokens=True) + "\n"
    with pytest.raises(ValueError, match="one input"):
        model.generate(**tokenizer(["a", "b"], return_tensors="pt", padding=True), streamer=t5kit.TextStreamer(tokenizer))


def test_generation_config_round_trip(tmp_path):
    transformers = hf()
    model = tiny_model("T5", "gated_untied")
    model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "generation_config.json").read_text())
    assert written == {"_from_model_config": True, "decoder_start_token_id": 0, "eos_token_id": 1, "pad_token_id": 0}
    ref_config = transformers.GenerationConfig.from_pretrained(tmp_path)
    assert (ref_config.decoder_start_token_id, ref_config.eos_token_id, ref_config.pad_token_id) == (0, 1, 0)
    # A checkpoint's generation defaults apply; arguments override them.
    written.update(max_new_tokens=4, num_beams=2, some_future_option="kept")
    (tmp_path / "generation_config.json").write_text(json.dumps(written))
    loaded = t5kit.T5ForConditionalGeneration.from_pretrained(tmp_path)
    assert loaded.generation_config.num_beams == 2 and loaded.generation_config.some_future_option == "kept"
    ids, mask = batch_for("gated_untied")
    assert loaded.generate(input_ids=ids, attention_mask=mask, eos_token_id=None).shape == (3, 5)
    assert loaded.generate(input_ids=ids, attention_mask=mask, eos_token_id=None, max_new_tokens=7).shape == (3, 8)
    loaded.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "generation_config.json").read_text())["some_future_option"] == "kept"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_return_sequences=3, num_beams=2), "num_return_sequences"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(do_sample=True, temperature=0.0), "temperature"),
        (dict(top_p=1.5), "top_p"),
        (dict(early_stopping="sometimes"), "early_stopping"),
        (dict(cache_implementation="paged"), "cache_implementation"),
        (dict(bad_words_ids=[5]), "bad_words_ids"),
        (dict(bad_words_ids=[[500]]), "outside the vocabulary"),
        (dict(max_lenght=5), "does not know"),
        (dict(max_length=1), "no room"),
        (dict(output_attentions=True), "attentions"),
    ],
)
def test_bad_options_raise_clear_errors(kwargs, message):
    model = tiny_model("T5", "gated_untied")
    ids, mask = batch_for("gated_untied")
    with pytest.raises(ValueError, match=message):
        model.generate(input_ids=ids, attention_mask=mask, **kwargs)


def test_bad_inputs_raise_clear_errors():
    model = tiny_model("T5", "gated_untied")
    with pytest.raises(ValueError, match="needs input_ids"):
        model.generate(max_new_tokens=3)
    with pytest.raises(ValueError):
        model.generate(input_ids=torch.tensor([[5, 1000]]))
    with pytest.raises(ValueError, match="rows"):
        model.generate(input_ids=torch.tensor([[5, 1]]), decoder_input_ids=torch.zeros(2, 1, dtype=torch.long))


@pytest.mark.parametrize("static", [False, True])
def test_cache_buffers_mapped_outside_the_heap_give_the_same_tokens(pair, monkeypatch, static):
    """With every cache buffer and cross-attention projection mapped (OFF_HEAP_BYTES = 1), greedy and
    beam search give the tokens and scores of ordinary buffers, eager and with the compiled step."""
    from t5kit import cache as cache_module

    _, ours = pair("T5", "gated_untied")
    ids, mask = batch_for("gated_untied")
    runs = []
    for threshold in (1 << 40, 1):
        monkeypatch.setattr(cache_module, "OFF_HEAP_BYTES", threshold)
        runs.append([
            ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, num_beams=beams, output_scores=True,
                          return_dict_in_generate=True, cache_implementation="static" if static else None)
            for beams in (1, 3)
        ])
    if os.path.exists("/proc/self/maps"):  # the buffers were mapped: each starts a mapping of its own
        starts = {int(line.split("-", 1)[0], 16) for line in open("/proc/self/maps")}
        cache = runs[1][0].past_key_values
        assert {cache.self_keys[0].data_ptr(), cache.cross_keys[0].data_ptr()} <= starts
        assert runs[0][0].past_key_values.self_keys[0].data_ptr() not in starts
    for run in runs:  # cached keys/values are contiguous (B, H, S, D), mapped or not
        cache = run[0].past_key_values
        assert all(t.is_contiguous() for t in (*cache.cross_keys, *cache.cross_values))
    for plain, held in zip(*runs):
        assert torch.equal(plain.sequences, held.sequences)
        torch.testing.assert_close(torch.stack(plain.scores), torch.stack(held.scores), rtol=0, atol=0)
