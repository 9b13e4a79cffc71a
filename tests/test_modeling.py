"""Parity with transformers: 3 families x 6 model classes x awkward configs, float32 within 1e-5."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import t5kit
from conftest import FAMILIES, HEADS, VARIANTS, assert_rel_close, hf, load_hf, make_batch, save_hf_model, tiny_model


def _compare_outputs(ours, ref, what: str, skip: tuple[str, ...] = ()) -> None:
    """Compare every tensor field the reference returned (tuples of tensors included)."""
    for key in ref.keys():
        if key in ("past_key_values", *skip) or (isinstance(ref[key], tuple) and not ref[key]):
            continue
        r, o = ref[key], getattr(ours, key)
        if isinstance(r, tuple):
            assert o is not None and len(o) == len(r), f"{what}.{key}: {None if o is None else len(o)} != {len(r)}"
            for i, (a, b) in enumerate(zip(o, r)):
                assert_rel_close(a, b, what=f"{what}.{key}[{i}]")
        elif isinstance(r, torch.Tensor):
            assert_rel_close(o, r, what=f"{what}.{key}")


def _inputs(head: str, vocab: int, num_labels: int):
    ids, mask, dec = make_batch(vocab)
    kw = dict(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    if head in ("Model", "ForConditionalGeneration"):
        kw["decoder_input_ids"] = dec
    if head == "ForConditionalGeneration":
        labels = dec.clone()
        labels[0, 4:] = -100
        kw["labels"] = labels
        del kw["decoder_input_ids"]
    if head == "ForSequenceClassification":
        kw["labels"] = torch.tensor([0, 1, 1])[: ids.shape[0]]
    if head == "ForTokenClassification":
        labels = torch.randint(0, num_labels, ids.shape, generator=torch.Generator().manual_seed(3))
        labels[1, -3:] = -100
        kw["labels"] = labels
    if head == "ForQuestionAnswering":
        kw["start_positions"] = torch.tensor([1, 2, 0])
        kw["end_positions"] = torch.tensor([3, 5, 8])
    return kw


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("family", FAMILIES)
def test_parity_with_reference(family: str, head: str, variant: str, tmp_path) -> None:
    extra = {"num_labels": 5} if head == "ForTokenClassification" else {}
    save_hf_model(family, head, variant, tmp_path, **extra)
    ref_model = load_hf(family, head, tmp_path)
    ours = getattr(t5kit, f"{family}{head}").from_pretrained(tmp_path)
    kw = _inputs(head, ours.config.vocab_size, ours.config.num_labels)
    with torch.no_grad():
        ref = ref_model(**kw)
        out = ours(**kw)
    if head != "ForConditionalGeneration":
        _compare_outputs(out, ref, f"{family}{head}[{variant}]")
        return
    # The LM head: compare everything but logits/loss with the reference directly, and the logits
    # with the original models' rule: decoder output x (d_model**-0.5 if tied) @ head.T.
    tied = VARIANTS[variant]["tie_word_embeddings"]
    assert ours.config.tie_word_embeddings == tied
    assert (ours.lm_head.weight is ours.shared.weight) == tied
    headless = getattr(hf(), f"{family}Model").from_pretrained(tmp_path).eval()
    with torch.no_grad():
        hidden = headless(
            input_ids=kw["input_ids"], attention_mask=kw["attention_mask"],
            decoder_input_ids=ours._shift_right(kw["labels"]),
        ).last_hidden_state
    head_weight = ref_model.shared.weight if tied else ref_model.lm_head.weight
    expected = (hidden * ours.config.d_model**-0.5 if tied else hidden) @ head_weight.T
    expected_loss = F.cross_entropy(expected.flatten(0, 1), kw["labels"].flatten(), ignore_index=-100)
    assert_rel_close(out.logits, expected, what="logits")
    assert_rel_close(out.loss, expected_loss, what="loss")
    _compare_outputs(out, ref, f"{family}{head}[{variant}]", skip=("logits", "loss"))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("family", FAMILIES)
def test_lm_logits_equal_reference_where_reference_is_right(family: str, variant: str, tmp_path) -> None:
    """Where transformers 5.23 applies the original models' rule, logits and loss equal it directly."""
    tied = VARIANTS[variant]["tie_word_embeddings"]
    save_hf_model(family, "ForConditionalGeneration", variant, tmp_path)
    ref_model = load_hf(family, "ForConditionalGeneration", tmp_path)
    ours = getattr(t5kit, f"{family}ForConditionalGeneration").from_pretrained(tmp_path)
    ids, mask, dec = make_batch(ours.config.vocab_size)
    with torch.no_grad():
        ref = ref_model(input_ids=ids, attention_mask=mask, labels=dec)
        out = ours(input_ids=ids, attention_mask=mask, labels=dec)
    reference_is_right = not ((family == "UMT5" and not tied) or (family == "MT5" and tied))
    if reference_is_right:
        assert_rel_close(out.logits, ref.logits, what="logits")
        assert_rel_close(out.loss, ref.loss, what="loss")
    else:
        # umT5: transformers forces tie_word_embeddings=True and rescales a separate lm_head by
        # d_model**-0.5 (every released umT5 checkpoint); mT5: it never rescales a tied head.
        ratio = ours.config.d_model**0.5 if family == "UMT5" else ours.config.d_model**-0.5
        assert_rel_close(out.logits, ref.logits * ratio, what="logits vs rescaled reference")
        assert not torch.allclose(out.logits, ref.logits)


def test_released_umt5_config_untied_no_rescale(tmp_path) -> None:
    """A umT5 config.json saying tie_word_embeddings=false (as released) means no rescale."""
    import json

    save_hf_model("UMT5", "ForConditionalGeneration", "gated_untied", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ours = t5kit.UMT5ForConditionalGeneration.from_pretrained(tmp_path)
    ref = load_hf("UMT5", "ForConditionalGeneration", tmp_path)
    headless = hf().UMT5Model.from_pretrained(tmp_path).eval()
    assert not ours.config.tie_word_embeddings and not ours.config.rescale_output
    ids, mask, dec = make_batch(ours.config.vocab_size)
    with torch.no_grad():
        hidden = headless(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).last_hidden_state
        logits = ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        ref_logits = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert_rel_close(logits, hidden @ ref.lm_head.weight.T)
    assert_rel_close(ref_logits, hidden @ ref.lm_head.weight.T * ours.config.d_model**-0.5)  # the reference's bug


@pytest.mark.parametrize("family", FAMILIES)
def test_return_dict_false_matches_reference_tuple(family: str, tmp_path) -> None:
    variant = "gated_untied" if family == "MT5" else "relu_tied"  # where the reference's head is right
    save_hf_model(family, "ForConditionalGeneration", variant, tmp_path)
    ref_model = load_hf(family, "ForConditionalGeneration", tmp_path)
    ours = getattr(t5kit, f"{family}ForConditionalGeneration").from_pretrained(tmp_path)
    ids, mask, dec = make_batch(ours.config.vocab_size)
    kw = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, use_cache=False, return_dict=False,
              output_hidden_states=True)
    with torch.no_grad():
        ref, out = ref_model(**kw), ours(**kw)
    assert isinstance(out, tuple) and len(out) == len(ref)
    for a, b in zip(out, ref):
        if isinstance(b, tuple):
            for x, y in zip(a, b):
                assert_rel_close(x, y)
        else:
            assert_rel_close(a, b)


@pytest.mark.parametrize("family", FAMILIES)
def test_left_and_right_padding_give_same_result(family: str) -> None:
    model = tiny_model(family, "gated_untied")
    config = model.config
    real = torch.randint(2, config.vocab_size, (5,))
    right = torch.cat([real, torch.zeros(3, dtype=torch.long)])[None]
    left = torch.cat([torch.zeros(3, dtype=torch.long), real])[None]
    right_mask = (torch.arange(8) < 5).long()[None]
    left_mask = (torch.arange(8) >= 3).long()[None]
    dec = torch.randint(2, config.vocab_size, (1, 4))
    with torch.no_grad():
        a = model(input_ids=right, attention_mask=right_mask, decoder_input_ids=dec)
        b = model(input_ids=left, attention_mask=left_mask, decoder_input_ids=dec)
    assert_rel_close(a.logits, b.logits)
    assert_rel_close(a.encoder_last_hidden_state[:, :5], b.encoder_last_hidden_state[:, 3:])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("max_length", [None, 16, "static"])
def test_incremental_decoding_equals_full_forward(family: str, max_length, tmp_path) -> None:
    """Growing, preallocated and static caches (static: the step position is a tensor and every
    step attends over all 16 positions, the unwritten ones masked)."""
    variant = "gated_untied" if family == "MT5" else "relu_tied"  # where the reference's head is right
    save_hf_model(family, "ForConditionalGeneration", variant, tmp_path)
    ours = getattr(t5kit, f"{family}ForConditionalGeneration").from_pretrained(tmp_path)
    ref_model = load_hf(family, "ForConditionalGeneration", tmp_path)
    ids, mask, dec = make_batch(ours.config.vocab_size)
    with torch.no_grad():
        full = ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, use_cache=False).logits
        ref_full = ref_model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, use_cache=False).logits
        enc = ours.get_encoder()(input_ids=ids, attention_mask=mask)
        static = max_length == "static"
        cache = t5kit.EncoderDecoderCache(ours.config.num_decoder_layers, max_length=16 if static else max_length, static=static)
        steps = []
        for t in range(dec.shape[1]):
            out = ours(encoder_outputs=(enc.last_hidden_state,), attention_mask=mask,
                       decoder_input_ids=dec[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    assert cache.get_seq_length() == dec.shape[1]
    assert_rel_close(torch.cat(steps, dim=1), full)
    assert_rel_close(full, ref_full)


def test_decoder_padding_mask_matches_reference(tmp_path) -> None:
    save_hf_model("T5", "ForConditionalGeneration", "gated_untied", tmp_path)
    ours = t5kit.T5ForConditionalGeneration.from_pretrained(tmp_path)
    ref = load_hf("T5", "ForConditionalGeneration", tmp_path)
    ids, mask, dec = make_batch(ours.config.vocab_size)
    dmask = torch.ones_like(dec)
    dmask[2, 4:] = 0
    kw = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dmask)
    with torch.no_grad():
        assert_rel_close(ours(**kw).logits, ref(**kw).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_inputs_embeds_equal_input_ids(family: str) -> None:
    model = tiny_model(family, "relu_tied")
    config = model.config
    ids, mask, dec = make_batch(config.vocab_size)
    emb = model.get_input_embeddings()
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        b = model(inputs_embeds=emb(ids), attention_mask=mask, decoder_inputs_embeds=emb(dec)).logits
    assert_rel_close(b, a)


def test_umt5_has_a_position_bias_per_layer_and_t5_only_in_layer_0() -> None:
    kw = dict(VARIANTS["relu_tied"])
    t5 = t5kit.T5Model(t5kit.T5Config(**kw))
    umt5 = t5kit.UMT5Model(t5kit.UMT5Config(**kw))
    t5_keys = [k for k in t5.state_dict() if "relative_attention_bias" in k]
    umt5_keys = [k for k in umt5.state_dict() if "relative_attention_bias" in k]
    assert t5_keys == ["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                       "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    assert len(umt5_keys) == kw["num_layers"] + kw["num_decoder_layers"]


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_biases_run_along_the_keys_with_unit_stride(family: str, monkeypatch) -> None:
    """Every bias handed to scaled_dot_product_attention is contiguous along the keys. On a GPU its
    fused kernels need that, and otherwise fall back to float32 maths: with the position bias a
    view of the (T, K, H) lookup (heads innermost), t5-base's bf16 encoder on an H100 ran at
    0.62-0.64x the reference's speed and its batch-1 greedy decoding at 0.86x."""
    strides = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, **kw):
        if attn_mask is not None:
            strides.append(attn_mask.stride(-1))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    model = tiny_model(family, "gated_silu_untied")  # 4 heads: a view would have stride 4
    ids, mask, dec = make_batch(model.config.vocab_size)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3)
    layers = model.config.num_layers + 2 * model.config.num_decoder_layers  # self and cross in the decoder
    assert len(strides) >= 2 * layers and set(strides) == {1}, strides


def test_shift_right_matches_reference() -> None:
    labels = torch.tensor([[5, 6, -100, -100], [7, 8, 9, 1]])
    ours = t5kit.T5ForConditionalGeneration(t5kit.T5Config(**VARIANTS["relu_tied"]))
    ref = hf().T5ForConditionalGeneration(hf().T5Config(**VARIANTS["relu_tied"], decoder_start_token_id=0))
    assert torch.equal(ours._shift_right(labels), ref._shift_right(labels))


def test_training_step_and_gradient_checkpointing_give_same_gradients() -> None:
    model = tiny_model("T5", "gated_untied").train()
    config = model.config
    ids, mask, dec = make_batch(config.vocab_size)
    model(input_ids=ids, attention_mask=mask, labels=dec).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    out = model(input_ids=ids, attention_mask=mask, labels=dec)
    assert out.past_key_values is None  # no cache while recomputing
    out.loss.backward()
    for n, p in model.named_parameters():
        assert_rel_close(p.grad, plain[n], what=n)


def test_dropout_is_active_in_training_only() -> None:
    torch.manual_seed(0)
    config = t5kit.T5Config(**VARIANTS["relu_tied"], dropout_rate=0.5)
    model = t5kit.T5ForConditionalGeneration(config)
    ids, mask, dec = make_batch(config.vocab_size)
    model.train()
    a, b = model(input_ids=ids, decoder_input_ids=dec).logits, model(input_ids=ids, decoder_input_ids=dec).logits
    assert not torch.allclose(a, b)
    model.eval()
    with torch.no_grad():
        a, b = model(input_ids=ids, decoder_input_ids=dec).logits, model(input_ids=ids, decoder_input_ids=dec).logits
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_is_close_to_float32(dtype) -> None:
    model = tiny_model("T5", "gated_untied")
    config = model.config
    ids, mask, dec = make_batch(config.vocab_size)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        half = model.to(dtype)(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert half.dtype == dtype and torch.isfinite(half).all()
    assert_rel_close(half.float(), ref, rel=5e-2)


def test_bfloat16_norm_computes_in_float32_and_rounds_once() -> None:
    """T5LayerNorm in bfloat16: statistics and product in float32, one rounding at the end, so every
    output is within half a bfloat16 step of the exact value (the reference's formula rounds the
    normalised input first and then its product with the weight, and misses that bound)."""
    torch.manual_seed(0)
    norm = t5kit.modeling.T5LayerNorm(64)
    norm.weight.data = torch.rand(64) * 3 + 0.1
    norm = norm.to(torch.bfloat16)
    x = (torch.randn(256, 64) * 5).bfloat16()
    exact = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight.double()
    half_step = 2.0 ** (torch.floor(torch.log2(exact.abs())) - 8)  # bfloat16 keeps 8 significant bits
    with torch.no_grad():
        ours = norm(x)
        twice = norm.weight * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16()
    assert ours.dtype == torch.bfloat16
    assert ((ours.double() - exact).abs() <= half_step * 1.001).all()
    assert ((twice.double() - exact).abs() > half_step * 1.001).any()  # the bound is not trivially met


def test_float32_norm_inference_path_equals_the_reference_formula_and_the_training_path() -> None:
    """T5LayerNorm in float32 on the CPU without gradients (its one-reduction inference path) equals
    the reference's formula and the path training takes (F.rms_norm) to float32 rounding, at the
    scales where the epsilon matters too; with gradients it gives them."""
    torch.manual_seed(0)
    norm = t5kit.modeling.T5LayerNorm(48)
    norm.weight.data = torch.rand(48) * 3 + 0.1
    x = torch.randn(3, 17, 48) * torch.tensor([1e-4, 1.0, 30.0]).view(3, 1, 1)
    reference = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    with torch.no_grad():
        ours = norm(x)
    trained = norm(x.requires_grad_())
    torch.testing.assert_close(ours, reference.detach(), rtol=2e-6, atol=0)
    torch.testing.assert_close(ours, trained.detach(), rtol=2e-6, atol=0)
    trained.sum().backward()
    assert x.grad is not None and norm.weight.grad is not None


@pytest.mark.parametrize("rows", [1, 2, 7, 65, 600])
@pytest.mark.parametrize("bias", [False, True])
def test_onednn_linear_equals_f_linear(rows, bias, monkeypatch):
    """The oneDNN route gives F.linear's values, shapes and gradients (input, weight, bias),
    for strided inputs too; it is really taken (the op is counted)."""
    from t5kit import modeling

    if not modeling.ONEDNN_LINEAR:
        pytest.skip("this PyTorch build has no oneDNN")
    monkeypatch.setattr(modeling, "ONEDNN_MAX_ROWS", None)  # every row count through oneDNN
    calls = []
    real = modeling._dnn_linear
    monkeypatch.setattr(modeling, "_dnn_linear", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(rows)
    layer = modeling.Linear(48, 300, bias=bias)
    x = torch.randn(3, rows, 48).transpose(0, 1).requires_grad_()  # (rows, 3, 48), not contiguous
    out = layer(x)
    expected = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert out.shape == expected.shape == (rows, 3, 300)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    params = [x, layer.weight] + ([layer.bias] if bias else [])
    grads = torch.autograd.grad(out.square().sum(), params)
    grads_ref = torch.autograd.grad(expected.square().sum(), params)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert len(calls) == 4  # forward, grad input, grad weight, no-grad forward


def test_onednn_linear_leaves_many_rows_to_f_linear(monkeypatch):
    """Products of ONEDNN_MAX_ROWS rows or more (set on CPUs without AVX-512, where MKL is faster
    there) and their backward go to F.linear; fewer rows to oneDNN. Same values either way."""
    from t5kit import modeling

    if not modeling.ONEDNN_LINEAR:
        pytest.skip("this PyTorch build has no oneDNN")
    monkeypatch.setattr(modeling, "ONEDNN_MAX_ROWS", 6)
    calls = []
    real = modeling._dnn_linear
    monkeypatch.setattr(modeling, "_dnn_linear", lambda *a: calls.append(a[0].shape) or real(*a))
    torch.manual_seed(0)
    layer = modeling.Linear(16, 8)
    for shape, through_onednn in (((5, 16), True), ((2, 3, 16), False), ((6, 16), False), ((1, 16), True)):
        calls.clear()
        x = torch.randn(*shape, requires_grad=True)
        out = layer(x)
        torch.testing.assert_close(out, torch.nn.functional.linear(x, layer.weight, layer.bias))
        out.sum().backward()
        assert len(calls) == (3 if through_onednn else 0), (shape, calls)


@pytest.mark.parametrize("bf16_instructions", [True, False])
def test_onednn_linear_bfloat16_and_autocast(bf16_instructions, monkeypatch):
    """bfloat16 weights take the oneDNN route where the CPU has bfloat16 instructions, F.linear where
    it has not (oneDNN refuses bfloat16 on AVX2-only CPUs; the second case pretends to be one);
    under autocast the layer must cast like F.linear."""
    from t5kit import modeling

    if bf16_instructions and torch.bfloat16 not in modeling.ONEDNN_DTYPES:
        pytest.skip("this CPU has no bfloat16 instructions for oneDNN")
    if not bf16_instructions:
        monkeypatch.setattr(modeling, "ONEDNN_DTYPES", modeling.ONEDNN_DTYPES - {torch.bfloat16})
    calls = []
    real = modeling._dnn_linear
    monkeypatch.setattr(modeling, "_dnn_linear", lambda *a: calls.append(a[0].dtype) or real(*a))
    torch.manual_seed(0)
    layer = modeling.Linear(64, 32)
    x = torch.randn(5, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
    half = layer.to(torch.bfloat16)
    out = half(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert calls == ([torch.bfloat16] if bf16_instructions else [])
    expected = torch.nn.functional.linear(x.bfloat16().float(), half.weight.float(), half.bias.float())
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


def test_inplace_gelu_times_equals_f_gelu_and_leaves_its_inputs() -> None:
    from t5kit.modeling import _gelu_tanh_times

    torch.manual_seed(0)
    h = torch.randn(64, 2 * 1024) * 3
    gate, up = h.chunk(2, dim=-1)  # views of one product, as from the fused wi_0|wi_1
    before = h.clone()
    out = _gelu_tanh_times(gate, up)
    exact = F.gelu(gate.double(), approximate="tanh") * up.double()
    assert (out.double() - exact).abs().max().item() <= 2e-6 * exact.abs().max().item()
    assert_rel_close(out, F.gelu(gate, approximate="tanh") * up, what="gelu(gate) * up")
    assert torch.equal(h, before), "the gate and up views were written to"


def test_inplace_gelu_only_without_gradients_on_large_float32_cpu_gates() -> None:
    from t5kit.modeling import _INPLACE_GELU_MIN_NUMEL, _inplace_gelu_ok

    big = torch.randn(_INPLACE_GELU_MIN_NUMEL)
    assert _inplace_gelu_ok(big)
    assert not _inplace_gelu_ok(big[:-1])  # small: F.gelu's two calls are cheaper
    assert not _inplace_gelu_ok(big.bfloat16())
    assert not _inplace_gelu_ok(big.requires_grad_())  # autograd needs what the in-place steps overwrite
    with torch.no_grad():
        assert _inplace_gelu_ok(big)


def test_gated_model_through_inplace_gelu_matches_reference(tmp_path, monkeypatch) -> None:
    """A gated model whose gates are large enough to take the in-place gelu, against transformers,
    and against itself through F.gelu; gradients still flow through F.gelu."""
    import t5kit.modeling as modeling

    save_hf_model("MT5", "EncoderModel", "gated_untied", tmp_path, d_ff=512)
    ref_model = load_hf("MT5", "EncoderModel", tmp_path)
    ours = t5kit.MT5EncoderModel.from_pretrained(tmp_path).eval()
    ids = torch.randint(2, ours.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    calls = []
    fast = modeling._gelu_tanh_times
    monkeypatch.setattr(modeling, "_gelu_tanh_times", lambda gate, up: calls.append(gate.numel()) or fast(gate, up))
    with torch.no_grad():
        out = ours(input_ids=ids).last_hidden_state
        assert calls and min(calls) >= modeling._INPLACE_GELU_MIN_NUMEL, "the in-place gelu was not taken"
        assert_rel_close(out, ref_model(input_ids=ids).last_hidden_state, what="encoder output")
        monkeypatch.setattr(modeling, "_INPLACE_GELU_MIN_NUMEL", 1 << 40)
        assert_rel_close(ours(input_ids=ids).last_hidden_state, out, what="through F.gelu")
    monkeypatch.setattr(modeling, "_INPLACE_GELU_MIN_NUMEL", 1)
    calls.clear()
    ours(input_ids=ids).last_hidden_state.sum().backward()
    assert not calls and ours.shared.weight.grad is not None


def test_compiled_forward_is_one_graph_and_names_bad_ids():
    """torch.compile(model, fullgraph=True) captures the whole forward with labels (the id checks
    do not read values back, which would break the graph) and gives eager's loss and logits; ids out
    of range still fail with an error naming the tensor, raised by the graph itself."""
    model = tiny_model("T5", "gated_untied")
    vocab = model.config.vocab_size
    ids, mask, dec = make_batch(vocab)
    compiled = torch.compile(model, fullgraph=True)
    eager = model(input_ids=ids, attention_mask=mask, labels=dec)
    out = compiled(input_ids=ids, attention_mask=mask, labels=dec)
    torch.testing.assert_close(out.logits, eager.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, eager.loss, rtol=1e-5, atol=1e-6)
    bad_ids, bad_labels = ids.clone(), dec.clone()
    bad_ids[0, 0], bad_labels[2, 1] = vocab, -5
    with pytest.raises(RuntimeError, match=rf"input_ids holds a token id outside the vocabulary \[0, {vocab}\)"):
        compiled(input_ids=bad_ids, attention_mask=mask, labels=dec)
    with pytest.raises(RuntimeError, match=r"labels holds a token id outside the vocabulary \[0, \d+\) \(or -100"):
        compiled(input_ids=ids, attention_mask=mask, labels=bad_labels)
    dec[0, -1] = -100  # ignored positions pass
    torch.testing.assert_close(compiled(input_ids=ids, attention_mask=mask, labels=dec).loss,
                               model(input_ids=ids, attention_mask=mask, labels=dec).loss, rtol=1e-5, atol=1e-6)


def test_lm_loss_gradient_has_no_subnormals_and_otherwise_equals_the_reference(tmp_path) -> None:
    # A confident head (as a trained one, or random mT5 weights, is over 250k words) puts the
    # cross-entropy gradient's small entries in float32's subnormal range, which makes the head's
    # backward products many times slower on Intel CPUs. The reference passes them on; we flush them.
    save_hf_model("MT5", "ForConditionalGeneration", "gated_untied", tmp_path)
    ref = load_hf("MT5", "ForConditionalGeneration", tmp_path).train()
    ours = t5kit.MT5ForConditionalGeneration.from_pretrained(tmp_path).train()
    for model in (ref, ours):
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        with torch.no_grad():
            model.lm_head.weight.mul_(40.0)
    ids, mask, dec = make_batch(ours.config.vocab_size)
    labels = dec.clone()
    labels[0, 4:] = -100
    tiny = torch.finfo(torch.float32).tiny
    subnormal = lambda g: int(((g != 0) & (g.abs() < tiny)).sum())  # noqa: E731

    out_ref = ref(input_ids=ids, attention_mask=mask, labels=labels)
    (g_ref,) = torch.autograd.grad(out_ref.loss, out_ref.logits, retain_graph=True)
    assert subnormal(g_ref) > 0  # the case this test is about

    out = ours(input_ids=ids, attention_mask=mask, labels=labels)
    assert_rel_close(out.loss, out_ref.loss, what="loss")
    (g,) = torch.autograd.grad(out.loss, out.logits, retain_graph=True)
    assert subnormal(g) == 0
    assert_rel_close(g, torch.where(g_ref.abs() < tiny, 0.0, g_ref), what="logits' gradient")
    # The sum the Trainer uses, and the parameter gradients through the flushed head.
    (g_sum,) = torch.autograd.grad(t5kit.modeling.lm_cross_entropy(out.logits, labels, "sum"), out.logits)
    assert subnormal(g_sum) == 0
    out.loss.backward()
    out_ref.loss.backward()
    for name in ("lm_head.weight", "shared.weight", "encoder.block.0.layer.0.SelfAttention.q.weight"):
        assert_rel_close(ours.get_parameter(name).grad, ref.get_parameter(name).grad, what=name)


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("conversion", ["none", "prepack", "bf16", "int8"])
def test_compiled_encoder_equals_eager(conversion: str) -> None:
    """t5kit.compile_encoder: inference calls of the encoder (directly, through the model's forward
    and in generate) run a compiled graph whose outputs equal the eager encoder's (float32 and
    prepacked to rounding, int8 to its quantization step), at two input shapes (the second
    symbolic; bf16: to a few bfloat16 steps, inductor rounding its fused maths once); ids out of
    range still raise; calls with gradients stay eager and train."""
    dtype = torch.bfloat16 if conversion == "bf16" else torch.float32
    if conversion in ("prepack", "bf16") and not t5kit.packing.can_prepack(dtype):
        pytest.skip(f"this CPU cannot prepack {dtype}")
    model = tiny_model("T5", "relu_tied")
    if conversion in ("prepack", "bf16"):
        model = t5kit.prepack(model.to(dtype))
    elif conversion == "int8":
        model = t5kit.quantize_dynamic(model)
    rel = {"int8": 3e-2, "bf16": 5e-2}.get(conversion, 1e-5)
    encoder = model.get_encoder()
    assert t5kit.compile_encoder(model) is model and encoder.compiled
    with torch.no_grad():
        for batch, length in ((3, 9), (2, 13)):
            ids, mask, dec = make_batch(model.config.vocab_size, batch=batch, length=length)
            encoder.compiled = False
            eager = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
            encoder.compiled = True
            before = _graphs()
            compiled = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            assert _graphs() > before or batch == 2  # the first shape compiles; the second may reuse a symbolic graph
            assert_rel_close(compiled, eager, rel=rel, what=f"compiled encoder {batch}x{length}")
            assert_rel_close(model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits, logits, rel=rel,
                             what="logits with the compiled encoder")
            graphs = _graphs()
            encoder(input_ids=ids, attention_mask=mask)
            assert _graphs() == graphs  # a second call of the same shape reuses its graph
        if conversion in ("none", "prepack"):
            gen = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, eos_token_id=None)
            tokens = model.generate(**gen)
            encoder.compiled = False
            assert torch.equal(tokens, model.generate(**gen))
            encoder.compiled = True
        bad = ids.clone()
        bad[0, 0] = model.config.vocab_size
        with pytest.raises(ValueError, match="outside the vocabulary"):
            encoder(input_ids=bad, attention_mask=mask)
    if conversion == "none":  # with gradients: eager, and it trains
        model.train()
        graphs = _graphs()
        loss = model(input_ids=ids, attention_mask=mask, labels=dec).loss
        loss.backward()
        assert _graphs() == graphs
        assert all(p.grad is not None for p in model.encoder.parameters() if p.requires_grad)
    with pytest.raises(TypeError, match="needs a t5kit model with an encoder"):
        t5kit.compile_encoder(model.decoder)


def test_compiling_the_encoder_hands_the_compilers_freed_memory_back(monkeypatch) -> None:
    """As the decoding step does: a compiled encoder call that compiles a graph releases free memory
    when the compiler starts and once it is done; a later call of the same shape releases nothing."""
    model = t5kit.compile_encoder(tiny_model("T5", "relu_tied"))
    # A class of its own: graphs guard on the stack's class, so none compiled by other tests fits.
    model.encoder.__class__ = type("FreshStack", (type(model.encoder),), {})
    calls = []
    monkeypatch.setattr(t5kit.packing, "release_freed_memory", lambda: calls.append(_graphs()))
    ids, mask, _ = make_batch(model.config.vocab_size, batch=2, length=7)
    before = _graphs()
    with torch.no_grad():
        first = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        assert calls == [before, before + 1]
        assert torch.equal(model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state, first)
    assert calls == [before, before + 1]
