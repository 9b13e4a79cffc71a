"""Prepacked oneDNN weights: the same numbers and tokens as the unpacked model, and what they refuse."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import t5kit
from conftest import FAMILIES, VARIANTS, assert_rel_close, make_batch, needs_peak_memory, peak_growth_mb, tiny_model
from t5kit.modeling import Linear, T5DenseActDense
from t5kit import packing
from t5kit.modeling import blocked_gemm_width, blocked_linear_lowered
from t5kit.packing import BlockedLinear, PackedLinear, can_prepack, keep_freed_memory, release_freed_memory

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs PyTorch's oneDNN backend")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [0, 1, 4, 37])
def test_layer_equals_f_linear(rows, bias):
    torch.manual_seed(0)
    layer = Linear(96, 200, bias=bias)
    packed = PackedLinear.from_linear(layer)
    x = torch.randn(rows, 3, 96)
    with torch.no_grad():
        expected = torch.nn.functional.linear(x, layer.weight, layer.bias)
        out = packed(x)
    assert out.shape == expected.shape == (rows, 3, 200)
    if rows:
        assert_rel_close(out, expected, what="packed linear")
    with pytest.raises(ValueError, match="last dimension 96"):
        packed(torch.randn(2, 95))
    with pytest.raises(ValueError, match="prepacked for torch.float32"):
        packed(x.double())


def _count_calls(monkeypatch, owner, name: str) -> list[int]:
    """Count the calls of ``owner.<name>`` from now on (e.g. the packed layers' oneDNN products,
    packing._dnn_linear)."""
    calls = [0]
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


@pytest.mark.parametrize("bias", [False, True])
def test_many_rows_multiply_the_weight_read_back_through_f_linear(bias, monkeypatch):
    torch.manual_seed(0)
    layer = Linear(96, 200, bias=bias)
    packed = PackedLinear.from_linear(layer)
    monkeypatch.setattr(packing, "UNPACK_MIN_ROWS", 8)
    calls = _count_calls(monkeypatch, packing, "_dnn_linear")
    many, few = torch.randn(2, 4, 96), torch.randn(7, 96)
    with torch.no_grad():
        # The weight read back is the weight, bit for bit, so the product is F.linear's exactly.
        assert torch.equal(packed(many), torch.nn.functional.linear(many, layer.weight, layer.bias))
        assert calls == [0]
        assert_rel_close(packed(few), torch.nn.functional.linear(few, layer.weight, layer.bias), what="few rows")
        assert calls == [1]  # fewer rows than UNPACK_MIN_ROWS: the packed product
        monkeypatch.setattr(packing, "UNPACK_MAX_BYTES", layer.weight.numel() * 4 - 1)
        assert_rel_close(packed(many), torch.nn.functional.linear(many, layer.weight, layer.bias), what="large layer")
        assert calls == [2]  # a weight over UNPACK_MAX_BYTES is never read back
        monkeypatch.setattr(packing, "UNPACK_MAX_BYTES", 32 << 20)
        monkeypatch.setattr(packing, "UNPACK_MIN_ROWS", None)
        packed(many)
        assert calls == [3]  # None: always the packed product


def test_prepacked_model_with_many_rows_through_f_linear(monkeypatch):
    model = tiny_model("T5", "gated_untied")
    ids, mask, dec = make_batch(model.config.vocab_size)
    gen = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, eos_token_id=None)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        beam = model.generate(**gen, num_beams=3)
    packed = t5kit.prepack(model)
    # The encoder's 3 x 9 rows (and cross-attention's keys of them) read back; the decoder's 3 x 6 not.
    monkeypatch.setattr(packing, "UNPACK_MIN_ROWS", 20)
    calls = _count_calls(monkeypatch, packing, "_dnn_linear")
    read_back = _count_calls(monkeypatch, torch.Tensor, "to_dense")
    assert_rel_close(packed(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits, ref, what="logits")
    assert read_back[0] > 0 and calls[0] > 0  # both routes taken in one forward
    assert torch.equal(packed.generate(**gen, num_beams=3), beam)


def test_layers_fused_into_one_product():
    torch.manual_seed(0)
    a, b, c = Linear(32, 24, bias=False), Linear(32, 16, bias=True), Linear(32, 8, bias=False)
    fused = PackedLinear.from_linear(a, b, c)
    assert (fused.in_features, fused.out_features) == (32, 48)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        expected = torch.cat([a(x), b(x), c(x)], dim=-1)
        out = fused(x)
    assert_rel_close(out, expected, what="fused products")


def test_relu_feed_forward_applies_its_relu_in_the_packed_product(monkeypatch):
    """prepack fuses a ReLU feed-forward's activation into its packed wi (a oneDNN post-op): the
    products with and without it differ by exactly the ReLU, also where the product goes through
    F.linear on the weight read back, and after blocking. Gated feed-forwards stay as they are."""
    relu = t5kit.prepack(tiny_model("T5", "relu_tied"))
    ffs = [m for m in relu.modules() if isinstance(m, T5DenseActDense)]
    assert len(ffs) == relu.config.num_layers + relu.config.num_decoder_layers
    assert all(ff.act_in_wi and ff.wi.relu and not ff.wo.relu for ff in ffs)
    assert "ReLU" in repr(ffs[0].wi)
    gated = t5kit.prepack(tiny_model("T5", "gated_untied"))
    assert not any(getattr(m, "relu", False) for m in gated.modules())
    torch.manual_seed(0)
    layer = PackedLinear.from_linear(Linear(32, 48, bias=True))
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        plain = layer(x)
        layer.relu = True
        assert torch.equal(layer(x), torch.relu(plain))
        monkeypatch.setattr(packing, "UNPACK_MIN_ROWS", 1)
        assert layer._unpack_for(x)
        through_f_linear = layer(x)
        assert_rel_close(through_f_linear, torch.relu(plain), what="ReLU product through F.linear")
        assert (through_f_linear >= 0).all() and (through_f_linear == 0).any()
        if blocked_linear_lowered():
            blocked = BlockedLinear.from_packed(layer, blocked_gemm_width())
            assert blocked.relu
            out = blocked(x)
            assert_rel_close(out, torch.relu(plain), what="blocked ReLU product")
            assert (out >= 0).all() and (out == 0).any()


needs_bf16 = pytest.mark.skipif(not can_prepack(torch.bfloat16), reason="this CPU has no bfloat16 instructions for oneDNN")


@needs_bf16
def test_layer_bfloat16():
    torch.manual_seed(0)
    layer = Linear(64, 48).to(torch.bfloat16)
    packed = PackedLinear.from_linear(layer)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = torch.nn.functional.linear(x.float(), layer.weight.float(), layer.bias.float())
        out = packed(x)
    assert out.dtype == torch.bfloat16
    assert_rel_close(out.float(), expected, rel=2e-2, what="bf16 packed linear")
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        PackedLinear.from_linear(Linear(4, 4).half())


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("family", FAMILIES)
def test_prepacked_model_gives_the_same_logits_and_tokens(family, variant):
    model = tiny_model(family, variant)
    ids, mask, dec = make_batch(model.config.vocab_size)
    gen = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, eos_token_id=None)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        greedy, beam = model.generate(**gen), model.generate(**gen, num_beams=3)
    n_dense = sum(p.numel() for p in model.parameters())
    dense_keys = list(model.state_dict())
    linear_names = tuple(n + "." for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    packed = t5kit.prepack(model)
    assert not any(isinstance(m, torch.nn.Linear) for m in packed.modules())
    n_linear = sum(isinstance(m, PackedLinear) for m in packed.modules())
    depth = model.config.num_layers + model.config.num_decoder_layers
    # Fused: q|k|v and o per self-attention, q, k|v and o per cross-attention, wi (or wi_0|wi_1) and wo, the head.
    assert n_linear == 2 * depth + 3 * model.config.num_decoder_layers + 2 * depth + 1
    # The dense linear weights are released: only embeddings, norms and position tables remain.
    plain = [p for m in packed.modules() if not isinstance(m, PackedLinear) for p in m.parameters(recurse=False)]
    assert sum(p.numel() for p in plain) < n_dense / 2
    # The packed weights are frozen parameters (see PackedLinear) but never in the state dict.
    assert all(not p.requires_grad for p in packed.parameters())
    assert set(packed.state_dict()) == {k for k in dense_keys if not k.startswith(linear_names)}
    # A plain forward (no torch.no_grad) is inference: nothing requires gradients.
    out = packed(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert not out.requires_grad
    assert_rel_close(out, ref, what="prepacked logits")
    assert torch.equal(packed.generate(**gen), greedy)
    assert torch.equal(packed.generate(**gen, num_beams=3), beam)


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_bf16)])
def test_prepacked_model_compiled_step_against_eager(dtype, monkeypatch):
    """cache_implementation="static" compiles the step; the oneDNN products go into the graph as the
    t5kit::dnn_linear custom op on the packed weights, lowered to oneDNN's C call (the custom op's
    own body never runs). float32: the eager tokens. bfloat16: inductor rounds fused bf16 maths
    differently, so the scores are compared up to (and at) the first step where the tokens part,
    from equal prefixes. (The step's layers stay in oneDNN's layout here: see the blocked test.)"""
    monkeypatch.setattr(packing, "BLOCK_DECODING_STEP", False)
    model = t5kit.prepack(tiny_model("T5", "relu_tied").to(dtype))
    ids, mask, _ = make_batch(model.config.vocab_size)
    gen = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, eos_token_id=None)
    for beams in (1, 3) if dtype == torch.float32 else (1,):  # greedy: scores row i follow sequence i
        eager = model.generate(**gen, num_beams=beams, return_dict_in_generate=True, output_scores=True)
        kw = dict(**gen, num_beams=beams, return_dict_in_generate=True, output_scores=True, cache_implementation="static")
        model.generate(**kw)  # compiles (tracing dispatches the custom op on fake tensors)
        with torch.profiler.profile() as prof:
            compiled = model.generate(**kw)
        ops = {event.key for event in prof.key_averages()}
        assert "t5kit::dnn_linear" not in ops and any("Compiled" in op for op in ops), sorted(ops)
        # The fused k|v projection's heads are cached contiguous: the compiled step reads them as they are.
        cache = compiled.past_key_values
        assert all(t.is_contiguous() for t in (*cache.cross_keys, *cache.cross_values))
        if dtype == torch.float32:
            assert torch.equal(compiled.sequences, eager.sequences), beams
            continue
        for step, (a, b) in enumerate(zip(compiled.scores, eager.scores)):
            assert_rel_close(a[b.isfinite()], b[b.isfinite()], rel=3e-2, what=f"bf16 compiled scores, step {step}")
            if not torch.equal(compiled.sequences[:, : step + 2], eager.sequences[:, : step + 2]):
                break


needs_blocked = pytest.mark.skipif(not blocked_linear_lowered(), reason="needs inductor's CPU matrix-product template")


@needs_blocked
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("out_features", [48, 37])  # whole blocks; padded to them
def test_blocked_layer_holds_the_weight_and_equals_f_linear(out_features, bias):
    torch.manual_seed(0)
    layer = Linear(40, out_features, bias=bias)
    width = blocked_gemm_width()
    blocked = BlockedLinear.from_packed(PackedLinear.from_linear(layer), width)
    weight = blocked._packed  # (blocks, in, width)
    assert weight.shape == (-(-out_features // width), 40, width)
    unblocked = weight.transpose(1, 2).reshape(-1, 40)  # (blocks * width, in)
    assert torch.equal(unblocked[:out_features], layer.weight.detach())  # read back out of oneDNN exactly
    assert not unblocked[out_features:].any()  # the padding is zeros
    for shape in [(0, 40), (1, 40), (5, 3, 40)]:
        x = torch.randn(shape)
        with torch.no_grad():
            expected = torch.nn.functional.linear(x, layer.weight, layer.bias)
            out = blocked(x)
        assert out.shape == expected.shape and out.is_contiguous()
        if x.numel():
            assert_rel_close(out, expected, what="blocked linear")
    with pytest.raises(ValueError, match="last dimension 40"):
        blocked(torch.randn(2, 39))
    with pytest.raises(ValueError, match="cannot be moved"):
        blocked.to(torch.bfloat16)


@needs_blocked
@pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled")
@pytest.mark.parametrize("rows", [1, 5, 16, 17])
def test_compiled_blocked_product_prefetches_the_next_weight_tile(rows):
    """Compiled, a blocked layer is inductor's template kernel with t5kit's prefetch of the next
    weight tile (see modeling._prefetching_micro_gemm): present in the generated C++ and taken by
    products of more than one 4-row block (5, 16 and 17 rows: whole blocks and a 1-row tail).
    The prefetch is a hint only: the product equals F.linear at every row count."""
    from torch._inductor.utils import run_and_get_cpp_code

    from t5kit.modeling import _lower_dnn_linear

    torch.manual_seed(0)
    width = blocked_gemm_width()
    layer = Linear(300, 4 * width + 5, bias=True)  # K: two k-slices of the template; a padded last block
    blocked = BlockedLinear.from_packed(PackedLinear.from_linear(layer), width)
    x = torch.randn(rows, 300)
    torch._dynamo.reset()
    fn = torch.compile(blocked, fullgraph=True, options=_lower_dnn_linear())
    with torch.no_grad(), torch._inductor.config.patch(force_disable_caches=True):  # generate, not reuse
        out, code = run_and_get_cpp_code(fn, x)
        expected = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert_rel_close(out, expected, what=f"compiled blocked linear, {rows} rows")
    assert "t5kit: this row block's share of the next weight tile" in code
    assert "t5kit_next" in code


@needs_blocked
@pytest.mark.parametrize("bias", [False, True])
def test_large_layer_is_blocked_a_piece_at_a_time(bias, monkeypatch):
    """A layer over twice ASSEMBLE_PIECE_BYTES is blocked 384 outputs at a time (here 384 + 384 + 16),
    carved out of its packed tensor: the same blocked weight as blocking it in one go, products equal
    to F.linear, and the packed layer consumed (it refuses to run or be blocked again). A small layer
    is blocked whole and stays usable."""
    piece = packing._PIECE_ALIGN
    monkeypatch.setattr(packing, "ASSEMBLE_PIECE_BYTES", piece * 40 * 4)
    torch.manual_seed(0)
    layer = Linear(40, 2 * piece + 16, bias=bias)
    if not packing._assembles(torch.float32, 40, 16):
        pytest.skip("oneDNN's layout on this CPU does not assemble from pieces")
    x = torch.randn(5, 3, 40)
    expected = torch.nn.functional.linear(x, layer.weight, layer.bias).detach()
    width = blocked_gemm_width()
    packed = PackedLinear.from_linear(layer)
    carved = BlockedLinear.from_packed(packed, width)
    with torch.no_grad():
        assert_rel_close(carved(x), expected, what="blocked from pieces")
    assert packed._packed.numel() == 0 and "consumed" in repr(packed)  # released
    with pytest.raises(RuntimeError, match="released"), torch.no_grad():
        packed(x)
    with pytest.raises(ValueError, match="consumed"):
        BlockedLinear.from_packed(packed, width)
    monkeypatch.setattr(packing, "ASSEMBLE_PIECE_BYTES", 1 << 40)
    whole = PackedLinear.from_linear(layer)
    assert torch.equal(carved._packed, BlockedLinear.from_packed(whole, width)._packed)
    with torch.no_grad():
        assert_rel_close(whole(x), expected, what="packed layer after blocking it whole")


@needs_blocked
@needs_peak_memory
def test_blocking_a_large_layer_holds_about_one_piece_twice(big_head_checkpoint):
    """Blocking a prepacked 64 MB output projection 4 MB at a time hands each piece's packed bytes
    back as it goes: peak memory grows by a few pieces (24-28 MB measured), not by the blocked copy
    of the whole layer (90 MB when it was blocked in one go)."""
    setup = (
        f"import t5kit\nmodel = t5kit.AutoModelForSeq2SeqLM.from_pretrained({str(big_head_checkpoint)!r})\n"
        "t5kit.packing.ASSEMBLE_PIECE_BYTES = 4 << 20\nt5kit.prepack(model)\n"
        "width = t5kit.modeling.blocked_gemm_width()  # imports inductor (about 190 MB), before the measurement"
    )
    operation = "head = t5kit.packing.BlockedLinear.from_packed(model.lm_head, width)\nassert model.lm_head._consumed"
    grow = peak_growth_mb(setup, operation)
    assert grow < 48, grow


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_layer_packed_whole_is_assembled_from_pieces(dtype, monkeypatch):
    """A layer over twice ASSEMBLE_PIECE_BYTES is packed 384 outputs at a time into one packed
    tensor (here 384 + 384 + 16): byte for byte what packing it whole gives, released part by part,
    and its products equal F.linear. Where this CPU's layout would not assemble, the layer is
    packed whole."""
    if not can_prepack(dtype):
        pytest.skip(f"this CPU cannot run oneDNN's {dtype} products")
    piece = packing._PIECE_ALIGN
    monkeypatch.setattr(packing, "ASSEMBLE_PIECE_BYTES", piece * 40 * dtype.itemsize)
    torch.manual_seed(0)
    layer = Linear(40, 2 * piece + 16, bias=True).to(dtype)
    if not packing._assembles(dtype, 40, 16):
        pytest.skip("oneDNN's layout on this CPU does not assemble from pieces")
    released: list[tuple[int, int]] = []
    base = layer.weight.data_ptr()
    record = lambda part: released.append(((part.data_ptr() - base) // (40 * dtype.itemsize), len(part)))  # noqa: E731
    assembled = PackedLinear.from_linear(layer, release=record)
    assert released == [(0, piece), (piece, piece), (2 * piece, 16)]
    whole = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), None)
    assert packing._packed_bytes(assembled._packed) == packing._packed_bytes(whole)
    x = torch.randn(5, 3, 40).to(dtype)
    with torch.no_grad():
        expected = torch.nn.functional.linear(x.float(), layer.weight.float(), layer.bias.float())
        assert_rel_close(assembled(x).float(), expected, rel=1e-5 if dtype == torch.float32 else 2e-2, what="assembled")
    released.clear()
    monkeypatch.setattr(packing, "_assembles", lambda *args: False)
    fallback = PackedLinear.from_linear(layer, release=record)
    assert released == [(0, 2 * piece + 16)]  # packed whole, released whole
    assert packing._packed_bytes(fallback._packed) == packing._packed_bytes(whole)


def test_a_single_output_piece_is_not_assembled():
    """oneDNN lays out a float32 layer of one output otherwise than a block of one: a last piece of
    one output does not assemble (so such a layer is packed whole), one of 16 does (behind whole
    pieces of _PIECE_ALIGN outputs, on every CPU seen: on AVX2 pieces of 192 never assembled)."""
    assert packing._assembles(torch.float32, 512, 16)
    assert not packing._assembles(torch.float32, 512, 1)


@needs_peak_memory
def test_packing_whole_reads_the_checkpoint_a_piece_at_a_time(big_head_checkpoint):
    """A 64 MB output projection packed whole from a memory-mapped checkpoint, assembled 8 MB at a
    time: peak memory grows by the packed copy plus about one piece (83 MB measured), not by the
    layer twice (130 MB when oneDNN packed it in one go)."""
    setup = (
        f"import t5kit\nmodel = t5kit.AutoModelForSeq2SeqLM.from_pretrained({str(big_head_checkpoint)!r})\n"
        "t5kit.packing.ASSEMBLE_PIECE_BYTES = 8 << 20"
    )
    grow = peak_growth_mb(setup, "t5kit.prepack(model)\nassert type(model.lm_head) is t5kit.packing.PackedLinear")
    assert grow < 96, grow


@needs_blocked
@pytest.mark.parametrize("family, variant", [("T5", "gated_untied"), ("T5", "relu_tied"), ("UMT5", "gated_untied")])
def test_compiled_step_reads_blocked_weights_through_the_template(family, variant, monkeypatch):
    """With BLOCK_DECODING_STEP, the first static generation re-stores the step's prepacked layers as
    BlockedLinear (not cross-attention's keys/values) and the graph runs inductor's template kernel
    for them (the custom op's body never runs): greedy and beam tokens equal the eager prepacked
    model's, at two batch sizes (3 rows, then 9 beams: the second compile makes the rows symbolic).
    umT5's layers are assembled and blocked 384 outputs at a time (see ASSEMBLE_PIECE_BYTES), its
    output projection (834 outputs) in three pieces. A ReLU model's blocked wi keeps the ReLU that
    prepack fused into it."""
    monkeypatch.setattr(packing, "BLOCK_DECODING_STEP", True)
    overrides = {}
    if family == "UMT5":
        monkeypatch.setattr(packing, "ASSEMBLE_PIECE_BYTES", 1)
        assert packing._assembles(torch.float32, 20, 834 % packing._PIECE_ALIGN)
        overrides = {"vocab_size": 834}
    model = t5kit.prepack(tiny_model(family, variant, **overrides))
    eager_model = t5kit.prepack(tiny_model(family, variant, **overrides))
    ids, mask, _ = make_batch(model.config.vocab_size)
    for beams in (1, 3):
        gen = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, eos_token_id=None, num_beams=beams)
        eager = eager_model.generate(**gen)
        model.generate(**gen, cache_implementation="static")  # compiles
        with torch.profiler.profile() as prof:
            compiled = model.generate(**gen, cache_implementation="static")
        ops = {event.key for event in prof.key_averages()}
        assert "t5kit::blocked_linear" not in ops and any("Compiled" in op for op in ops), sorted(ops)
        assert torch.equal(compiled, eager), beams
    assert isinstance(model.lm_head, BlockedLinear)
    for block in model.decoder.block:
        assert isinstance(block.layer[0].SelfAttention.qkv, BlockedLinear)
        assert isinstance(block.layer[1].EncDecAttention.q, BlockedLinear)
        assert type(block.layer[1].EncDecAttention.kv) is PackedLinear  # many rows, once: oneDNN
        wi = block.layer[2].DenseReluDense.wi_01 if variant == "gated_untied" else block.layer[2].DenseReluDense.wi
        assert isinstance(wi, BlockedLinear) and wi.relu == (variant == "relu_tied")  # its ReLU kept
    assert all(type(m) is not BlockedLinear for m in model.encoder.modules())
    assert not packing.block_decoding_step(tiny_model(family, "gated_untied"))  # only prepacked models
    if family == "UMT5":
        assert packing._piece_rows(eager_model.lm_head._packed) == packing._PIECE_ALIGN


@needs_bf16
def test_prepacked_bfloat16_model_stays_close():
    model = tiny_model("T5", "relu_tied").to(torch.bfloat16)
    ids, mask, dec = make_batch(model.config.vocab_size)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits.float()
        out = t5kit.prepack(model)(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert out.dtype == torch.bfloat16
    assert_rel_close(out.float(), ref, rel=3e-2, what="bf16 prepacked logits")


def test_prepacked_model_refuses_saving_training_and_other_dtypes(tmp_path):
    model = t5kit.prepack(tiny_model())
    assert model.inference_only == "prepacked"
    with pytest.raises(ValueError, match="converted for inference"):
        model.save_pretrained(tmp_path)
    assert not any(tmp_path.iterdir())
    ids, mask, dec = make_batch(model.config.vocab_size)
    model.train()
    with pytest.raises(RuntimeError, match="inference only"):
        model(input_ids=ids, attention_mask=mask, labels=dec)
    model.eval()
    with pytest.raises(ValueError, match="no linear layers"):
        t5kit.prepack(model)
    assert model.to(torch.float32).cpu() is model  # keeping dtype and device: a no-op
    with pytest.raises(ValueError, match="prepacked for torch.float32 on the CPU and cannot be moved to torch.bfloat16"):
        model.to(torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # refused before anything moved
    with pytest.raises(ValueError, match="cannot be moved"):
        next(m for m in model.modules() if isinstance(m, PackedLinear)).half()
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        t5kit.prepack(tiny_model().half())


def test_prepack_refuses_bfloat16_where_the_cpu_cannot_run_it(monkeypatch):
    """On a CPU without bfloat16 instructions (AVX2 only; pretended here) oneDNN has no bfloat16
    product: prepack says so before converting anything, and the unpacked model still runs."""
    from t5kit import modeling

    monkeypatch.setattr(modeling, "ONEDNN_DTYPES", frozenset({torch.float32}))
    assert can_prepack(torch.float32) and not can_prepack(torch.bfloat16)
    model = tiny_model().to(torch.bfloat16)
    with pytest.raises(ValueError, match="cannot run oneDNN's torch.bfloat16 products.*prepack it in float32"):
        t5kit.prepack(model)
    assert not getattr(model, "inference_only", None) and any(isinstance(m, torch.nn.Linear) for m in model.modules())
    with pytest.raises(ValueError, match="bfloat16 needs AVX-512 or AMX"):
        PackedLinear.from_linear(Linear(4, 4).to(torch.bfloat16))
    ids, mask, dec = make_batch(model.config.vocab_size)
    with torch.no_grad():
        assert model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits.isfinite().all()


def _smaps() -> list[tuple[str, dict[str, str]]]:
    """This process's mappings (Linux smaps): each header line ("lo-hi perms ... path") with its fields."""
    maps: list[tuple[str, dict[str, str]]] = []
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line[:1].isdigit() or line[:1] in "abcdef":  # a mapping's header line
            maps.append((line, {}))
        else:
            name, _, value = line.partition(":")
            maps[-1][1][name] = value.strip()
    return maps


def _resident_kb(path: Path) -> int:
    """Resident kB of this process's mappings of ``path``."""
    return sum(int(fields["Rss"].split()[0]) for header, fields in _smaps() if header.endswith(str(path)))


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux's /proc/self/smaps")
def test_prepack_hands_back_the_checkpoint_pages_of_converted_weights(tmp_path):
    config = t5kit.T5Config(vocab_size=256, d_model=256, d_kv=32, num_heads=8, d_ff=2048, num_layers=2, dropout_rate=0.0)
    t5kit.T5ForConditionalGeneration(config).save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    model = t5kit.AutoModelForSeq2SeqLM.from_pretrained(tmp_path)
    linear_kb = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear)) // 1024
    for p in model.parameters():  # read every weight: the whole file becomes resident
        p.sum()
    assert _resident_kb(file) >= linear_kb
    t5kit.prepack(model)
    # The converted weights' pages are reclaimed; the embeddings and norms (0.3 MB of the file's
    # 23 MB here) stay mapped, resident only where read.
    assert _resident_kb(file) < linear_kb // 10
    ids, mask, dec = make_batch(256)
    assert model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits.isfinite().all()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_keep_freed_memory_applies_on_glibc():
    assert keep_freed_memory()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or not Path("/proc/self/maps").exists(), reason="glibc on Linux")
def test_keep_freed_memory_of_all_sizes_serves_large_blocks_from_the_heap():
    """A 64 MB block gets a memory map of its own by default, and comes from the heap (no mapping
    starts at it) after keep_freed_memory(all_sizes=True). Process-wide, so in a child process."""
    script = """
import torch
from t5kit.packing import keep_freed_memory

def own_mapping(t):  # a mapping starts in the page below the block (glibc's mmapped chunk header)
    starts = [int(line.split("-", 1)[0], 16) for line in open("/proc/self/maps")]
    return any(start <= t.data_ptr() < start + 4096 for start in starts)

before = own_mapping(torch.empty(2**24))
applied = keep_freed_memory(all_sizes=True)
print(before, applied, own_mapping(torch.empty(2**24)))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "True", "False"]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc_trim")
def test_release_freed_memory_trims_on_glibc():
    keep_freed_memory()
    block = torch.ones(64, 2**16)  # 16 MB from the heap (under keep_freed_memory's mmap threshold)
    del block
    assert release_freed_memory()  # glibc says it returned memory


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of this process's mapping that holds ``address``."""
    for header, fields in _smaps():
        lo, hi = (int(a, 16) for a in header.split()[0].split("-"))
        if lo <= address < hi:
            return fields["VmFlags"].split()
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux's /proc/self/smaps")
def test_prepack_reads_the_mapped_embedding_without_readahead(tmp_path):
    """Embedding rows are read one at a time: prepack advises MADV_RANDOM ("rr" in smaps) on the
    mapped embedding, so a lookup makes its own page resident, not the readahead window around it."""
    config = t5kit.T5Config(vocab_size=4096, d_model=256, d_kv=32, num_heads=8, d_ff=512, num_layers=1, dropout_rate=0.0)
    t5kit.T5ForConditionalGeneration(config).save_pretrained(tmp_path)
    model = t5kit.AutoModelForSeq2SeqLM.from_pretrained(tmp_path)
    middle = model.shared.weight.data_ptr() + model.shared.weight.nbytes // 2
    assert "rr" not in _vm_flags(middle)
    t5kit.prepack(model)
    assert "rr" in _vm_flags(middle)
