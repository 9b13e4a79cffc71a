"""int8 dynamic quantization: what is stored, its error against float32, and what it refuses."""

from __future__ import annotations

import pytest
import torch

import t5kit
from conftest import FAMILIES, VARIANTS, make_batch, needs_peak_memory, peak_growth_mb, tiny_model
from t5kit.modeling import Linear, T5DenseActDense
from t5kit import quantization
from t5kit.quantization import DynamicInt8Linear, _has_vnni

pytestmark = pytest.mark.skipif(
    "fbgemm" not in torch.backends.quantized.supported_engines, reason="needs PyTorch's fbgemm (x86)"
)


@pytest.mark.parametrize("bias", [False, True])
def test_layer_stores_int8_weights_and_stays_close(bias):
    torch.manual_seed(0)
    layer = Linear(96, 200, bias=bias)
    q = DynamicInt8Linear.from_linear(layer)
    weight, stored_bias = torch.ops.quantized.linear_unpack(q._packed)
    assert weight.dtype == torch.qint8
    scales = layer.weight.detach().abs().amax(1) / 127
    expected = torch.round(layer.weight.detach() / scales[:, None]).clamp(-127, 127) * scales[:, None]
    torch.testing.assert_close(weight.dequantize(), expected, rtol=0, atol=1e-6)
    if bias:
        torch.testing.assert_close(stored_bias, layer.bias.detach())
    x = torch.randn(4, 7, 96)
    with torch.no_grad():
        ref, out = layer(x), q(x)
    assert out.shape == ref.shape == (4, 7, 200) and out.dtype == torch.float32
    err = float((out - ref).abs().max() / ref.abs().max())
    assert 0 < err < 2e-2, err
    with pytest.raises(ValueError, match="last dimension 96"):
        q(torch.randn(2, 95))


def test_layer_product_still_seen_by_an_active_torch_function_mode():
    """The product is called with __torch_function__ off for subclasses (it skips a slow check of
    the packed weight): a TorchFunctionMode the user has entered still sees it, and the result
    is the same."""
    from torch.overrides import TorchFunctionMode

    class Record(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[object] = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.seen.append(func)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    q = DynamicInt8Linear.from_linear(Linear(32, 48))
    x = torch.randn(3, 32)
    with torch.no_grad():
        plain = q(x)
        with Record() as mode:
            recorded = q(x)
    assert torch.ops.quantized.linear_dynamic.default in mode.seen
    assert torch.equal(recorded, plain)


def test_quantizing_in_chunks_gives_the_whole_layers_weights(monkeypatch):
    """The weight is quantized a few rows at a time, each chunk handed to ``release`` once done:
    the int8 values and scales are those of quantizing the whole weight at once."""
    torch.manual_seed(0)
    layer = Linear(96, 200, bias=True)
    w = layer.weight.detach()
    scales = (w.abs().amax(1) / 127).clamp(min=1e-12).double()
    whole = torch.quantize_per_channel(w, scales, torch.zeros(200, dtype=torch.long), 0, torch.qint8)
    monkeypatch.setattr(quantization, "QUANTIZE_CHUNK_BYTES", 7 * 96 * 4)
    released: list[tuple[int, int]] = []
    q = DynamicInt8Linear.from_linear(layer, release=lambda t: released.append((t.data_ptr(), t.shape[0])))
    weight, bias = torch.ops.quantized.linear_unpack(q._packed)
    assert torch.equal(weight.int_repr(), whole.int_repr())
    assert torch.equal(weight.q_per_channel_scales(), whole.q_per_channel_scales())
    assert torch.equal(bias, layer.bias.detach())
    # every row released once, in order, 7 at a time
    assert released == [(w[start].data_ptr(), min(7, 200 - start)) for start in range(0, 200, 7)]


@needs_peak_memory
def test_quantizing_never_holds_the_float_layer_twice(big_head_checkpoint):
    """A 64 MB float32 output projection in a memory-mapped checkpoint, quantized 16 MB at a time
    with each chunk's pages handed back: peak memory grows by 67 MB measured (the int8 values and
    fbgemm's packed copy, 16 MB each, plus a chunk's working copies), not by the float32 layer twice
    plus its int8 copies (128 MB before)."""
    setup = f"import t5kit\nmodel = t5kit.AutoModelForSeq2SeqLM.from_pretrained({str(big_head_checkpoint)!r})"
    grow = peak_growth_mb(setup, "t5kit.quantize_dynamic(model)")
    assert grow < 96, grow


def test_fused_layers_give_the_separate_layers_results():
    torch.manual_seed(0)
    a, b = Linear(48, 40, bias=True), Linear(48, 24, bias=False)
    x = torch.randn(3, 5, 48)
    with torch.no_grad():
        fused = DynamicInt8Linear.from_linear(a, b)(x)
        separate = torch.cat([DynamicInt8Linear.from_linear(a)(x), DynamicInt8Linear.from_linear(b)(x)], dim=-1)
    assert fused.shape == (3, 5, 64)
    torch.testing.assert_close(fused, separate, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_model_logits_and_tokens_close_to_float(family, variant):
    model = tiny_model(family, variant)
    ids, mask, dec = make_batch(model.config.vocab_size)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        greedy = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, eos_token_id=None)
    quantized = t5kit.quantize_dynamic(model)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in quantized.modules())
    assert n_linear == 0 and sum(isinstance(m, DynamicInt8Linear) for m in quantized.modules()) > 0
    with torch.no_grad():
        out = quantized(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        tokens = quantized.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, eos_token_id=None)
    err = float((out - ref).abs().max() / ref.abs().max())
    # Without 8-bit dot-product instructions fbgemm's AVX2 kernel would overflow its 16-bit sums, so
    # activations are quantized to 7 bits there (reduce_range): half the resolution, about twice the error.
    assert err < (5e-2 if _has_vnni() else 1e-1), err
    # Wherever fp32's best token leads by more than twice the largest error, int8 picks it too.
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * (out - ref).abs().max()
    assert clear.any()
    assert (out.argmax(-1) == ref.argmax(-1))[clear].all()
    assert tokens.shape == greedy.shape


@pytest.mark.parametrize("family", ["T5", "UMT5"])  # UMT5: a position bias per layer
def test_quantized_model_compiled_step_gives_the_eager_tokens(family):
    """cache_implementation="static" compiles an int8 model's step: fbgemm's products are called from
    the graph through t5kit::int8_linear (by handle), and greedy and beam tokens equal the eager loop's."""
    model = t5kit.quantize_dynamic(tiny_model(family, "gated_silu_untied"))
    ids, mask, _ = make_batch(model.config.vocab_size)
    gen = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, eos_token_id=None)
    for beams in (1, 3):
        eager = model.generate(**gen, num_beams=beams)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        compiled = model.generate(**gen, num_beams=beams, cache_implementation="static")
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # compiled, not eager
        with torch.profiler.profile() as prof:
            again = model.generate(**gen, num_beams=beams, cache_implementation="static")
        ops = {event.key for event in prof.key_averages()}
        product = "t5kit_cpp::int8_linear" if quantization._load_cpp_op() else "t5kit::int8_linear"
        assert product in ops and any("Compiled" in op for op in ops), sorted(ops)
        assert torch.equal(compiled, eager) and torch.equal(again, eager), beams


def _compiled_int8_run(model, gen):
    """Tokens, logits and the t5kit ops called of a compiled (static) greedy generation, after one to compile."""
    model.generate(**gen, cache_implementation="static")
    with torch.profiler.profile() as prof:
        out = model.generate(**gen, cache_implementation="static", return_dict_in_generate=True, output_logits=True)
    return out.sequences, torch.stack(out.logits), {e.key for e in prof.key_averages() if "t5kit" in e.key}


def test_compiled_int8_step_through_the_cpp_op_equals_the_python_op(monkeypatch):
    """Compiled graphs make fbgemm's products with the C++ op (t5kit_cpp::int8_linear, built at the
    first compiled int8 graph): the same kernel as the Python op's, so tokens and logits are equal."""
    if not quantization._load_cpp_op():
        pytest.skip("the C++ op does not build here (no C++ compiler or ninja)")
    monkeypatch.setattr(quantization, "ONEDNN_INT8_MIN_ROWS", None)  # every product through fbgemm
    python_op, cpp_op = (t5kit.quantize_dynamic(tiny_model("T5", "relu_tied")) for _ in range(2))
    ids, mask, _ = make_batch(cpp_op.config.vocab_size)
    gen = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, eos_token_id=None)
    monkeypatch.setattr(quantization, "INT8_CPP_OP", False)  # read while a graph is traced
    tokens, logits, ops = _compiled_int8_run(python_op, gen)
    assert "t5kit::int8_linear" in ops and "t5kit_cpp::int8_linear" not in ops, ops
    monkeypatch.setattr(quantization, "INT8_CPP_OP", True)
    cpp_tokens, cpp_logits, ops = _compiled_int8_run(cpp_op, gen)
    assert ops == {"t5kit_cpp::int8_linear"}, ops
    assert torch.equal(cpp_tokens, tokens) and torch.equal(cpp_logits, logits)
    assert torch.equal(cpp_tokens, cpp_op.generate(**gen))


def test_compiled_int8_step_falls_back_to_the_python_op_when_the_cpp_op_cannot_build(monkeypatch):
    """No compiler (or a failed build): one warning that says why, and compiled graphs call the Python op."""
    import torch.utils.cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(torch.utils.cpp_extension, "load_inline", no_compiler)
    with pytest.warns(RuntimeWarning, match="could not build its C.. int8 product op.*Ninja is required"):
        assert quantization._load_cpp_op.__wrapped__() is False
    monkeypatch.setattr(quantization, "_load_cpp_op", lambda: False)  # as in a process where the build failed
    model = t5kit.quantize_dynamic(tiny_model("T5", "gated_silu_untied"))
    ids, mask, _ = make_batch(model.config.vocab_size)
    gen = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, eos_token_id=None)
    tokens, _, ops = _compiled_int8_run(model, gen)
    assert "t5kit::int8_linear" in ops and "t5kit_cpp::int8_linear" not in ops, ops
    assert torch.equal(tokens, model.generate(**gen))


def test_cpp_op_can_be_switched_off_by_environment():
    import os
    import subprocess
    import sys

    code = "import t5kit.quantization as q; print(q.INT8_CPP_OP)"
    for value, expected in (("0", "False"), ("1", "True")):
        env = {**os.environ, "T5KIT_INT8_CPP": value}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected


def test_quantized_layers_release_their_packed_weights():
    """The handle table a compiled graph reads through holds each layer's weight only while the layer lives."""
    import gc
    from copy import deepcopy

    from t5kit import quantization

    layer = DynamicInt8Linear.from_linear(Linear(8, 4)).eval()
    handle = layer._handle
    assert quantization._PACKED[handle] is layer._packed
    copy = deepcopy(layer)
    assert copy._handle != handle and quantization._PACKED[copy._handle] is copy._packed
    x = torch.randn(3, 8)
    torch.testing.assert_close(copy(x), layer(x))
    del layer
    gc.collect()
    assert handle not in quantization._PACKED and copy._handle in quantization._PACKED


def test_cpp_op_table_holds_each_layers_weight_while_the_layer_lives(monkeypatch):
    """The C++ op's own table (filled when it loads, then as layers are made) drops a layer's weight with it."""
    import gc
    from copy import deepcopy

    if not quantization._load_cpp_op():
        pytest.skip("the C++ op does not build here (no C++ compiler or ninja)")
    gc.collect()
    size = torch.ops.t5kit_cpp.size
    before = size()
    assert before == len(quantization._PACKED)
    layer = DynamicInt8Linear.from_linear(Linear(8, 4, bias=True)).eval()
    copy = deepcopy(layer)
    assert size() == before + 2
    x = torch.randn(3, 8)
    fbgemm = 1 << 62  # rows from which a product goes to oneDNN: never
    out = torch.ops.t5kit_cpp.int8_linear(x, copy._handle, 4, copy.reduce_range, False, fbgemm)
    torch.testing.assert_close(out, layer(x), rtol=0, atol=0)
    # Products from onednn_rows rows go to t5kit::int8_linear, which makes them with oneDNN's copy.
    if "onednn" in torch.backends.quantized.supported_engines:
        monkeypatch.setattr(quantization, "ONEDNN_INT8_MIN_ROWS", 3)
        out = torch.ops.t5kit_cpp.int8_linear(x, layer._handle, 4, layer.reduce_range, False, 3)
        assert (layer._handle, False) in quantization._PACKED_MANY
        torch.testing.assert_close(out, layer(x), rtol=0, atol=0)
    handle = layer._handle
    del layer
    gc.collect()
    assert size() == before + 1
    with pytest.raises(RuntimeError, match=f"no int8 weights for layer handle {handle}"):
        torch.ops.t5kit_cpp.int8_linear(x, handle, 4, False, False, fbgemm)
    del copy
    gc.collect()
    assert size() == before


def test_quantized_model_refuses_saving_and_training(tmp_path):
    model = t5kit.quantize_dynamic(tiny_model())
    with pytest.raises(ValueError, match="converted for inference"):
        model.save_pretrained(tmp_path)
    ids, mask, dec = make_batch(model.config.vocab_size)
    model.train()
    with pytest.raises(RuntimeError, match="inference only"):
        model(input_ids=ids, attention_mask=mask, labels=dec).loss.backward()
    with pytest.raises(ValueError, match="no linear layers"):
        t5kit.quantize_dynamic(model)


@pytest.mark.skipif("onednn" not in torch.backends.quantized.supported_engines, reason="needs PyTorch's oneDNN engine")
def test_many_row_products_through_onednn_agree_with_fbgemm(monkeypatch):
    """From ONEDNN_INT8_MIN_ROWS rows (AMX and AVX-512 VNNI CPUs) a layer's products use oneDNN's int8 kernels, with a
    copy of the same int8 weights packed at the first such product; results equal fbgemm's to float32
    rounding, and the copy goes with its layer."""
    import gc

    torch.manual_seed(0)
    monkeypatch.setattr(quantization, "ONEDNN_INT8_MIN_ROWS", 5)
    layer = DynamicInt8Linear.from_linear(Linear(96, 200, bias=True)).eval()
    few, many = torch.randn(4, 96), torch.randn(2, 3, 96)
    layer(few)
    assert (layer._handle, False) not in quantization._PACKED_MANY
    out = layer(many)
    packed = quantization._PACKED_MANY[layer._handle, False]
    assert out.shape == (2, 3, 200)
    fbgemm = torch.ops.quantized.linear_dynamic(many.reshape(6, 96), layer._packed, layer.reduce_range)
    torch.testing.assert_close(out.reshape(6, 200), fbgemm, rtol=0, atol=1e-5 * float(fbgemm.abs().max()))
    (w_many, b_many), (w, b) = torch.ops.quantized.linear_unpack(packed), torch.ops.quantized.linear_unpack(layer._packed)
    assert torch.equal(w_many.int_repr(), w.int_repr()) and torch.equal(b_many, b)
    # A whole model, eager and compiled (t5kit::int8_linear), every product through oneDNN.
    model = t5kit.quantize_dynamic(tiny_model("T5", "gated_silu_untied"))
    ids, mask, dec = make_batch(model.config.vocab_size)
    with torch.no_grad():
        monkeypatch.setattr(quantization, "ONEDNN_INT8_MIN_ROWS", None)
        ref = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        monkeypatch.setattr(quantization, "ONEDNN_INT8_MIN_ROWS", 1)
        logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    torch.testing.assert_close(logits, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
    gen = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, eos_token_id=None)
    assert torch.equal(model.generate(**gen, cache_implementation="static"), model.generate(**gen))
    # A large layer (ONEDNN_INT8_LARGE_ENTRIES weights or more) goes to oneDNN from fewer rows.
    big = DynamicInt8Linear.from_linear(Linear(96, 200)).eval()
    monkeypatch.setattr(quantization, "ONEDNN_INT8_MIN_ROWS", 5)
    monkeypatch.setattr(quantization, "ONEDNN_INT8_LARGE_ROWS", 3)
    monkeypatch.setattr(quantization, "ONEDNN_INT8_LARGE_ENTRIES", 96 * 201)
    big(few)
    assert (big._handle, False) not in quantization._PACKED_MANY
    monkeypatch.setattr(quantization, "ONEDNN_INT8_LARGE_ENTRIES", 96 * 200)
    big(torch.randn(2, 96))
    assert (big._handle, False) not in quantization._PACKED_MANY
    big(few)
    assert (big._handle, False) in quantization._PACKED_MANY
    handle = layer._handle
    layer.relu = True
    layer(many)
    assert (handle, True) in quantization._PACKED_MANY
    del layer
    gc.collect()
    assert (handle, False) not in quantization._PACKED_MANY and (handle, True) not in quantization._PACKED_MANY


@pytest.mark.parametrize("onednn_rows", [None, 1])
def test_relu_feed_forward_applies_its_relu_in_the_int8_product(onednn_rows, monkeypatch):
    """quantize_dynamic fuses a ReLU feed-forward's activation into its wi (linear_relu_dynamic):
    eager and compiled logits equal those of the same int8 model with the ReLU applied separately,
    through fbgemm and (AMX and AVX-512 VNNI CPUs) oneDNN. One layer run both ways, in either order, gives each
    its own result: torch's oneDNN op keeps one cached primitive per packed weight and shape
    whichever ran first, so each ReLU setting has a packed copy of its own (_PACKED_MANY)."""
    if onednn_rows is not None and "onednn" not in torch.backends.quantized.supported_engines:
        pytest.skip("needs PyTorch's oneDNN engine")
    monkeypatch.setattr(quantization, "ONEDNN_INT8_MIN_ROWS", onednn_rows)
    fused, separate = (t5kit.quantize_dynamic(tiny_model("T5", "relu_tied")) for _ in range(2))
    ffs = [m for m in fused.modules() if isinstance(m, T5DenseActDense)]
    assert ffs and all(ff.act_in_wi and ff.wi.relu and not ff.wo.relu for ff in ffs)
    assert "ReLU" in repr(ffs[0].wi)
    for ff in separate.modules():
        if isinstance(ff, T5DenseActDense):
            ff.act_in_wi = ff.wi.relu = False
    ids, mask, dec = make_batch(fused.config.vocab_size)
    with torch.no_grad():
        ref = separate(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        torch.testing.assert_close(fused(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits, ref, rtol=0, atol=1e-6 * float(ref.abs().max()))
    gen = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, eos_token_id=None)
    assert torch.equal(fused.generate(**gen, cache_implementation="static"), separate.generate(**gen))
    torch.manual_seed(0)
    layer = DynamicInt8Linear.from_linear(Linear(96, 200)).eval()
    x = torch.randn(40, 96)
    with torch.no_grad():
        for order in ((False, True), (True, False)):
            outs = {}
            for relu in order:
                layer.relu = relu
                outs[relu] = layer(x)
            assert (outs[False] < 0).any()
            torch.testing.assert_close(outs[True], torch.relu(outs[False]), rtol=0, atol=0)
