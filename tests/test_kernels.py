"""t5kit's CPU attention kernel for compiled decoding steps (``t5kit::attend``): the numbers of the
plain maths, masks included, and where compiled steps use it."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_rel_close, make_batch, tiny_model
from t5kit import kernels
from t5kit.kernels import _attend_maths, attend, attend_kernel_applies, register_attend_lowering

MIN = torch.finfo(torch.float32).min
ROW = "t5kit_attend::row<"  # the kernel's call in the generated C++

needs_lowering = pytest.mark.skipif(not register_attend_lowering(), reason="inductor's C++ templates differ in this torch")


def test_lowering_registers_on_the_torch_we_build_for():
    """On torch 2.13 the kernel must be there: a torch whose templates moved would otherwise only
    make compiled steps slower, and every test below would skip."""
    if not torch.__version__.startswith("2.13."):
        pytest.skip(f"torch {torch.__version__}: the lowering may be missing, the steps keep the plain maths")
    assert register_attend_lowering()


def _compile_and_code(fn, *args):
    from torch._inductor.utils import run_and_get_cpp_code

    torch._dynamo.reset()
    with torch.inference_mode(), torch._inductor.config.patch(force_disable_caches=True):  # generate, not reuse
        return run_and_get_cpp_code(torch.compile(fn, fullgraph=True), *args)


# rows, heads, queries, keys, head width, bias shape (None: no bias)
CASES = {
    "step, position bias, causal mask": (2, 3, 1, 37, 64, (1, 3, 1, 37)),
    "beams as queries, padding bias, width 7": (3, 2, 4, 13, 7, (3, 1, 1, 13)),
    "no bias, width 16 plus a tail": (2, 2, 1, 6, 20, None),
    "full bias, a row with every key masked": (1, 2, 3, 9, 12, (1, 2, 3, 9)),
}


@needs_lowering
@pytest.mark.parametrize("case", list(CASES))
def test_compiled_kernel_equals_the_plain_maths(case):
    """Compiled, ``t5kit::attend`` is t5kit's kernel (its call is in the generated C++) and equals
    softmax(q k^T + bias) v to float32 rounding: a strided query, biases broadcast along any of
    rows / heads / queries, masked keys (finfo.min, as t5kit's masks), widths with a scalar tail,
    and a row whose keys are all masked (uniform weights, as the plain maths gives). A pointwise
    consumer that inductor fuses into the kernel (here * 2 + 1) runs after it."""
    rows, heads, queries, keys, d, bias_shape = CASES[case]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(rows, queries, heads, d, generator=g).transpose(1, 2) / d**0.5  # (B, H, T, D), strided
    k, v = torch.randn(2, rows, heads, keys, d, generator=g)
    bias = None
    if bias_shape is not None:
        bias = torch.randn(bias_shape, generator=g)
        bias[..., keys // 2 :: 3] = MIN  # masked keys between attended ones, and the last few
        bias[..., -3:] = MIN
        if "every key masked" in case:
            bias[0, 1, 2] = MIN
    with torch.inference_mode():
        assert attend_kernel_applies(q, k, v, bias)
    out, code = _compile_and_code(lambda q, k, v, b: attend(q, k, v, b) * 2 + 1, q, k, v, bias)
    assert ROW in code
    assert_rel_close(out, _attend_maths(q, k, v, bias) * 2 + 1, what=case)


@needs_lowering
def test_masked_keys_never_reach_the_output():
    """A masked key is skipped (its weight is exactly 0 either way), so whatever a masked slot of a
    static cache holds, inf or NaN included, the output is that of the attended keys alone; the
    plain maths would turn 0 * inf into NaN."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 1, 16, generator=g)
    k, v = torch.randn(2, 2, 4, 10, 16, generator=g)
    bias = torch.zeros(1, 1, 1, 10)
    bias[..., 6:] = MIN  # the cache's future positions
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[:, :, 6:] = float("inf")
    v_bad[:, :, 6:] = float("nan")
    out, code = _compile_and_code(attend, q, k_bad, v_bad, bias)
    assert ROW in code and out.isfinite().all()
    assert_rel_close(out, _attend_maths(q, k[:, :, :6], v[:, :, :6], None), what="attended keys only")


@needs_lowering
@pytest.mark.parametrize("symbolic_width", [False, True])
def test_dynamic_shapes(symbolic_width):
    """Compiled with a dynamic batch, the kernel takes its sizes as arguments (one kernel for every
    batch). A head width that is itself a symbol (everything dynamic) runs the op's eager body
    instead. Both equal the plain maths."""
    from torch._inductor.utils import run_and_get_cpp_code

    g = torch.Generator().manual_seed(0)

    def inputs(rows):
        q, k, v = torch.randn(rows, 2, 1, 8, generator=g), *torch.randn(2, rows, 2, 5, 8, generator=g)
        for t in (q, k, v):
            torch._dynamo.mark_dynamic(t, 0)
        return q, k, v, torch.zeros(rows, 1, 1, 5)

    torch._dynamo.reset()
    fn = torch.compile(attend, fullgraph=True, dynamic=True if symbolic_width else None)
    with torch.inference_mode(), torch._inductor.config.patch(force_disable_caches=True):
        args = inputs(2)
        out, code = run_and_get_cpp_code(fn, *args)
        assert (ROW in code) != symbolic_width
        assert_rel_close(out, _attend_maths(*args), what="dynamic, 2 rows")
        args = inputs(5)  # the same graph, another batch
        assert_rel_close(fn(*args), _attend_maths(*args), what="dynamic, 5 rows")


def test_kernel_applies_only_where_it_is_exact_and_fast():
    """float32 on the CPU without gradients, a few queries, a bias of (B|1, H|1, T|1, K); anything
    else keeps the plain maths (bfloat16 steps, training, whole sequences, other biases)."""
    q, k = torch.randn(2, 3, 1, 8), torch.randn(2, 3, 5, 8)
    bias = torch.zeros(1, 3, 1, 5)
    with torch.inference_mode():
        assert attend_kernel_applies(q, k, k, bias) == kernels._LOWERED
        if kernels._LOWERED:
            assert attend_kernel_applies(q, k, k, None)
            assert not attend_kernel_applies(q.bfloat16(), k.bfloat16(), k.bfloat16(), bias.bfloat16())
            many = torch.randn(2, 3, kernels.ATTEND_MAX_QUERIES + 1, 8)
            assert not attend_kernel_applies(many, k, k, None)
            assert not attend_kernel_applies(q, k, k, torch.zeros(2, 3, 2, 5))  # not broadcastable
            assert not attend_kernel_applies(q, k, k, torch.zeros(3, 5))  # not 4-D
    assert not attend_kernel_applies(q, k, k, bias)  # gradients enabled


@needs_lowering
@pytest.mark.parametrize("beams", [1, 3])
def test_compiled_step_uses_the_kernel_and_gives_the_eager_tokens(beams):
    """A static-cache generation compiles its step with the kernel in self- and cross-attention
    (beams attend as queries of their input's row) and gives eager decoding's tokens and scores."""
    model = tiny_model("T5", "gated_untied")
    model.__class__ = type(f"Kernel{beams}{type(model).__name__}", (type(model),), {})  # a step of its own
    ids, mask, _ = make_batch(model.config.vocab_size, batch=3, length=9)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, num_beams=beams, eos_token_id=None,
              return_dict_in_generate=True, output_scores=True)
    from torch._inductor.utils import run_and_get_cpp_code

    with torch.inference_mode(), torch._inductor.config.patch(force_disable_caches=True):
        eager = model.generate(**kw)
        static, code = run_and_get_cpp_code(lambda: model.generate(**kw, cache_implementation="static"))
    assert code.count(ROW) >= 2  # self-attention and cross-attention
    assert torch.equal(static.sequences, eager.sequences)
    torch.testing.assert_close(torch.stack(static.scores), torch.stack(eager.scores), atol=1e-5, rtol=1e-5)
