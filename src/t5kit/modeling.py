"""The T5 family network: one implementation for T5 (v1.0, v1.1, Flan, ByT5), mT5 and umT5.

Family differences are switches read from the config, never copies of the code:

* ``feed_forward_proj``: ReLU ``wi -> act -> wo`` (v1.0) or gated ``act(wi_0) * wi_1 -> wo``.
* ``tie_word_embeddings`` / ``scale_decoder_outputs``: the output projection is the input
  embedding and the decoder output is scaled by ``d_model**-0.5`` (v1.0), or a separate
  ``lm_head`` with no rescale (v1.1, Flan, mT5, umT5).
* ``per_layer_position_bias``: umT5 gives every layer its own relative position bias; T5 and
  mT5 compute the first layer's once and share it across the stack.
* ``num_decoder_layers`` may differ from ``num_layers`` either way, and ``num_heads * d_kv``
  need not equal ``d_model``.

Module and parameter names are the reference's, so ``state_dict()`` keys and shapes are exactly
those of Hub checkpoints.

Shapes: B batch, S encoder length, T decoder (query) length, K key length, H heads, D ``d_kv``.

Precision policy: RMS-norm statistics and the softmax of explicit attention are computed in
float32 whatever the weight dtype; a bfloat16 norm rounds once, after the weight (the reference
rounds before it too). bfloat16 needs nothing else. In float16 the residual stream
of large T5 checkpoints can overflow; as in the original fp16 ports, each sub-layer's output is
clamped to the finite float16 range (one helper, ``_clamp_fp16``). Prefer bfloat16.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from typing import Any, Callable, Optional
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .cache import EncoderDecoderCache
from .config import MT5Config, T5Config, UMT5Config
from .generation import GenerationConfig, GenerationMixin
from .kernels import attend as _attend_kernel, attend_kernel_applies, register_attend_lowering
from .modeling_utils import PreTrainedModel, check_id_range, segment_starts
from .outputs import (
    BaseModelOutput,
    BaseModelOutputWithPastAndCrossAttentions,
    Seq2SeqLMOutput,
    Seq2SeqModelOutput,
    Seq2SeqQuestionAnsweringModelOutput,
    Seq2SeqSequenceClassifierOutput,
    TokenClassifierOutput,
)

__all__ = [
    "compile_encoder",
    "T5Model",
    "T5ForConditionalGeneration",
    "T5EncoderModel",
    "T5ForSequenceClassification",
    "T5ForTokenClassification",
    "T5ForQuestionAnswering",
    "MT5Model",
    "MT5ForConditionalGeneration",
    "MT5EncoderModel",
    "MT5ForSequenceClassification",
    "MT5ForTokenClassification",
    "MT5ForQuestionAnswering",
    "UMT5Model",
    "UMT5ForConditionalGeneration",
    "UMT5EncoderModel",
    "UMT5ForSequenceClassification",
    "UMT5ForTokenClassification",
    "UMT5ForQuestionAnswering",
    "relative_position_bucket",
]


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


# 2 * sqrt(2/pi) and the cubic coefficient of gelu's tanh approximation.
_GELU_C, _GELU_A = 2 * math.sqrt(2 / math.pi), 0.044715
# Smaller gates keep F.gelu: seven calls instead of two would cost more than they save (a decoding step).
_INPLACE_GELU_MIN_NUMEL = 1 << 16


def _inplace_gelu_ok(x: torch.Tensor) -> bool:
    """Whether :func:`_gelu_tanh_times` may run: eager float32 on the CPU, no gradient wanted, and a
    large enough gate."""
    return (
        x.numel() >= _INPLACE_GELU_MIN_NUMEL
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and not (torch.is_grad_enabled() and x.requires_grad)
        and not torch.compiler.is_compiling()
    )


def _gelu_tanh_times(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``gelu_tanh(gate) * up`` for inference on the CPU, in one buffer.

    PyTorch's CPU tanh-gelu evaluates an accurate tanh per element, about 0.55 G elements/s on 2
    AMD Zen 3 cores: 5.8% of an mT5-small encoder call at 16 x 128 tokens. The same function is
    ``x * sigmoid(2 * sqrt(2/pi) * (x + 0.044715 x^3))``; evaluated so, in place in one new buffer,
    2048 x 1024 gates take 1.6 ms against 3.8 ms (mT5-small encoders 1.03x faster at 16 x 128
    tokens, 1.02x at 1 x 128). On standard normal gates its largest error against a float64
    evaluation is 4.4e-7, F.gelu's own float32 result's 4.1e-7. In-place steps overwrite what
    autograd would save, hence :func:`_inplace_gelu_ok`; compiled graphs fuse F.gelu themselves.
    """
    y = gate * gate  # (..., d_ff), contiguous even when gate is a view of the fused wi_0|wi_1 product
    y.mul_(_GELU_A * _GELU_C).add_(_GELU_C).mul_(gate)  # 2 * sqrt(2/pi) * (x + 0.044715 x^3)
    return y.sigmoid_().mul_(gate).mul_(up)


ACT_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "relu2": lambda x: F.relu(x).square(),
    "mish": F.mish,
    "linear": lambda x: x,
}


def _clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    """Keep a float16 residual stream finite (the fp16 policy of the module docstring)."""
    if x.dtype != torch.float16:
        return x
    limit = torch.finfo(torch.float16).max
    clamp = torch.where(torch.isinf(x).any(), limit - 1000, limit)
    return torch.clamp(x, min=-clamp, max=clamp)


def relative_position_bucket(
    relative_position: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """Mesh TensorFlow's bucketing of ``memory_position - query_position``.

    Half the buckets are exact small distances, the rest grow logarithmically up to
    ``max_distance``; bidirectional (encoder) attention splits the buckets by sign.
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = -relative_position.clamp(max=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # float32 log as the reference, so bucket edges agree exactly.
    large = max_exact + (
        torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


def _onednn_dtypes() -> frozenset[torch.dtype]:
    """The dtypes oneDNN's product runs in on this CPU: float32 wherever PyTorch has oneDNN;
    bfloat16 only on CPUs with bfloat16 instructions (AVX-512 or AMX: oneDNN has no bfloat16
    product for AVX2-only processors such as AMD Zen 3, and refuses to create one)."""
    if not torch.backends.mkldnn.is_available():
        return frozenset()
    dtypes: set[torch.dtype] = set()
    for dtype in (torch.float32, torch.bfloat16):
        try:
            x = torch.ones(2, 3, dtype=dtype)
            y = torch.ops.mkldnn._linear_pointwise(x, torch.ones(4, 3, dtype=dtype), None, "none", [], "")
            if bool(y.eq(3).all()):
                dtypes.add(dtype)
        except (AttributeError, RuntimeError):
            pass
    return frozenset(dtypes)


# The dtypes whose CPU products go through oneDNN (see Linear); every other dtype uses F.linear.
ONEDNN_DTYPES: frozenset[torch.dtype] = _onednn_dtypes()
# Route CPU matrix products through oneDNN (see Linear). Set to False to use F.linear everywhere.
ONEDNN_LINEAR: bool = bool(ONEDNN_DTYPES)


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> str:
    """The text of /proc/cpuinfo, or "" where it cannot be read (another OS)."""
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def _cpu_vendor() -> str:
    """The CPU's vendor id ("GenuineIntel", "AuthenticAMD", ...), or "" where it cannot be read."""
    for line in _cpuinfo().splitlines():
        if line.startswith("vendor_id"):
            return line.split(":", 1)[1].strip()
    return ""


# Products of at least this many rows go to F.linear (None: none do). See Linear. MKL's slow
# generic path is AMD's: on AMD with AVX-512 oneDNN is faster at every row count; without AVX-512,
# and on Intel (where MKL takes its own fast path), MKL is as fast from 256 rows and faster in
# the backward products.
ONEDNN_MAX_ROWS: int | None = (
    None if torch.backends.cpu.get_cpu_capability().startswith("AVX512") and _cpu_vendor() != "GenuineIntel" else 256
)


def _dnn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, relu: bool = False) -> torch.Tensor:
    """``x @ weight.T + bias`` by oneDNN, then ``relu`` if asked (applied by the product as it writes
    its output, as a oneDNN post-op: no second pass over it); any leading shape, strided operands
    allowed. ``weight`` may be prepacked (``t5kit.prepack``)."""
    if torch.compiler.is_compiling():
        # Inductor's own lowering of the oneDNN op needs weights frozen into the graph; the custom op
        # is called with the weights the module holds (see _lower_dnn_linear).
        return torch.ops.t5kit.dnn_linear(x, weight, bias, relu)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "relu" if relu else "none", [], "")


@torch.library.custom_op("t5kit::dnn_linear", mutates_args=())
def _dnn_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], relu: bool = False) -> torch.Tensor:  # noqa: UP045
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "relu" if relu else "none", [], "")


@_dnn_linear_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], relu: bool = False) -> torch.Tensor:  # noqa: UP045
    return x.new_empty(*x.shape[:-1], weight.shape[0])


_DNN_LINEAR_LOWERING: dict[str, Any] | None = None
_BLOCKED_LOWERED = False  # t5kit::blocked_linear has its lowering (set by _lower_dnn_linear)


def _lower_dnn_linear() -> dict[str, Any]:
    """Have inductor call oneDNN's product for ``t5kit::dnn_linear`` directly; returns the inductor
    options a compile needs to use it (empty if it could not be registered).

    Left opaque, each call of the custom op goes from the compiled graph through the dispatcher
    into its Python body. Lowered to inductor's own oneDNN node, the C++ wrapper calls the op's C
    shim; the weight is passed as it is, as the custom op passes it (inductor's node would first
    copy it into a contiguous buffer: a prepacked weight's strides are oneDNN's, not a view's).
    A t5-base batch-1 decoding step is about 0.7 ms (4%) faster.

    Registered once per process. Inductor's graph cache does not see lowerings, so the options
    carry a no-op graph pass whose uuid names this one: graphs cached without it are not reused.
    Uses inductor internals; where they differ (another torch) the op stays opaque: slower, equal.
    Also registers the lowering of ``t5kit::blocked_linear`` (:func:`_lower_blocked_linear`) where
    :func:`blocked_gemm_width` found the template it needs, and that of ``t5kit::attend``
    (:func:`t5kit.kernels.register_attend_lowering`).
    """
    global _DNN_LINEAR_LOWERING, _BLOCKED_LOWERED
    if _DNN_LINEAR_LOWERING is not None:
        return _DNN_LINEAR_LOWERING
    _DNN_LINEAR_LOWERING = {}
    try:
        from torch._inductor import ir
        from torch._inductor.custom_graph_pass import CustomGraphPass
        from torch._inductor.lowering import register_lowering
        from torch._inductor.mkldnn_ir import LinearUnary, _create_output_node
    except ImportError:
        return _DNN_LINEAR_LOWERING

    def lower(x: Any, weight: Any, bias: Any = None, relu: bool = False) -> Any:
        x = LinearUnary.require_contiguous(LinearUnary.realize_input(x))
        weight = LinearUnary.realize_input(weight)
        inputs, args = [x, weight], ["relu" if relu else "none", [-1], ""]  # attr (fused activation), scalars, algorithm
        if bias is None:
            args.insert(0, None)
        else:
            inputs.append(LinearUnary.require_contiguous(LinearUnary.realize_input(bias)))
        size = [*x.get_size()[:-1], weight.get_size()[0]]
        layout = ir.FixedLayout(device=x.get_device(), dtype=x.get_dtype(), size=size)
        return ir.TensorBox.create(_create_output_node(LinearUnary(layout=layout, inputs=inputs, constant_args=args)))

    class CacheKey(CustomGraphPass):
        def __call__(self, graph: torch.fx.Graph) -> None:
            pass

        def uuid(self) -> str:
            return "t5kit::dnn_linear lowered to mkldnn_ir.LinearUnary, t5kit::blocked_linear to CppGemmTemplate, no outer-loop fusion over a tiled loop, weight-tile prefetch, t5kit::attend to its C++ template, fused ReLU, v6"

    register_lowering(torch.ops.t5kit.dnn_linear.default, type_promotion_kind=None)(lower)
    register_attend_lowering()
    if blocked_gemm_width() is not None:
        register_lowering(torch.ops.t5kit.blocked_linear.default, type_promotion_kind=None)(_lower_blocked_linear)
        _BLOCKED_LOWERED = True
    _DNN_LINEAR_LOWERING = {"post_grad_custom_pre_pass": CacheKey()}
    return _DNN_LINEAR_LOWERING


def compile_options(cuda: bool) -> dict[str, Any]:
    """The inductor options of t5kit's compiled graphs (the decoding step, the encoder).

    CPU: ``cpp_wrapper``: the graph's calls (~75 kernels and products a t5-base step) run from C++,
    not from a generated Python function: about 1.3 ms a step less on t5-base (6%), 0.2 ms on
    t5-small. A cold first compile of t5-base took 54 s against 35 s without it (cached on disk
    afterwards, as every graph is); the tiny graphs of the test suite compile no slower. Plus the
    lowerings of t5kit's products (:func:`_lower_dnn_linear`). GPU: none. The step is replayed as a
    CUDA graph, so the wrapper's launch savings do not apply, and its C++ for CUDA compiles slowly: a
    first t5-base step on an H100's host had not compiled after 90 s with it, against 14-25 s without.
    """
    return {} if cuda else {"cpp_wrapper": True, **_lower_dnn_linear()}


def blocked_linear_lowered() -> bool:
    """Whether compiled graphs run ``t5kit::blocked_linear`` as inductor's template kernel (registering
    the lowerings if not yet done); without it the op would call its eager body from the graph."""
    _lower_dnn_linear()
    return _BLOCKED_LOWERED


@contextlib.contextmanager
def inductor_fixes() -> Iterator[None]:
    """Work around an inductor CPU miscompile while t5kit's decoding step compiles.

    torch 2.13's C++ codegen may fuse the passes of a softmax under one outer loop and keep the
    scores of one row in a local buffer. When that outer loop is itself vectorized (tiled over the
    heads, as it is for a decoding step with ``d_kv = 7`` and 2+ heads), all the heads of a tile write
    one row of the buffer, and every head but the last gets another head's scores: silently wrong
    logits. Inside this context inductor refuses outer-loop fusion over a tiled loop and emits the
    separate loops it emits whenever that fusion does not apply (correct, and no slower in the
    shapes of real checkpoints, whose fused loops are not tiled). Where inductor's internals differ
    (another torch) nothing is patched.
    """
    try:
        from torch._inductor.codegen.cpp import OuterLoopFusedSchedulerNode
        from torch._inductor.virtualized import V
    except ImportError:
        yield
        return
    check = OuterLoopFusedSchedulerNode.check_outer_fusion_loop_level_attr

    def no_local_buffer_in_tiled_loops(self: Any, proxies: list[Any], depth: int) -> bool:
        # Called while the fused kernel is generated, inside the context that holds its local buffers.
        tiled = any(loop.steps != 1 for proxy in proxies for loop in (proxy.loop_nest.loops or [])[:depth])
        if tiled and getattr(V.local_buffer_context, "local_buffers", None):
            return False  # inductor then generates the nodes without the fused loop and its local buffer
        return check(self, proxies, depth)

    with mock.patch.object(OuterLoopFusedSchedulerNode, "check_outer_fusion_loop_level_attr", no_local_buffer_in_tiled_loops):
        yield


def _blocked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """``x @ W.T + bias`` from a weight blocked for inductor's CPU matrix-product template
    (``t5kit.packing.BlockedLinear``): ``weight`` is (blocks, in, width) with
    ``W[j * width + c, k] = weight[j, k, c]``, W zero-padded to ``blocks * width >= out_features`` rows.
    Compiled, the product is inductor's template kernel (see :func:`_lower_blocked_linear`); eager, a
    batched product over the blocks."""
    if torch.compiler.is_compiling():
        return torch.ops.t5kit.blocked_linear(x, weight, bias, out_features)
    return _blocked_linear_eager(x, weight, bias, out_features)


def _blocked_linear_eager(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out_features: int
) -> torch.Tensor:
    blocks, k, width = weight.shape
    y = torch.matmul(x.reshape(1, -1, k), weight)  # (blocks, rows, width)
    y = y.transpose(0, 1).reshape(*x.shape[:-1], blocks * width)[..., :out_features]
    return (y if bias is None else y + bias).contiguous()


@torch.library.custom_op("t5kit::blocked_linear", mutates_args=())
def _blocked_linear_op(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], out_features: int  # noqa: UP045
) -> torch.Tensor:
    return _blocked_linear_eager(x, weight, bias, out_features)


@_blocked_linear_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], out_features: int) -> torch.Tensor:  # noqa: UP045
    return x.new_empty(*x.shape[:-1], out_features)


_BLOCKED_GEMM_WIDTH: list[int | None] = []  # [width] once probed


def blocked_gemm_width() -> int | None:
    """The block width (output features per block) of ``t5kit.packing.BlockedLinear`` weights on this
    CPU: the widest float32 register block of inductor's CPU matrix-product template here (24 with
    AVX2, 48 with AVX-512), or None where that template is missing or works otherwise (another torch).

    Inductor picks a block per product by its shape (a 512-wide product gets 16 on AVX2); the
    lowering makes it use this one, so one stored layout serves every batch size. On an AVX2 CPU
    (AMD Zen 3) the 24-wide block was as fast as oneDNN at 32 rows and faster below (12% at 16 rows,
    about 30% at one row), where the 16-wide one was 12% slower at 32 rows."""
    if not _BLOCKED_GEMM_WIDTH:
        try:
            width = _probe_blocked_gemm_width()
        except Exception:  # noqa: BLE001 - internals of another torch: the feature is just unavailable
            width = None
        _BLOCKED_GEMM_WIDTH.append(width)
    return _BLOCKED_GEMM_WIDTH[0]


def _forced_micro_gemm(width: int) -> Callable[..., Any]:
    """Inductor's ``create_micro_gemm``, made to pick the ``width``-wide register block: it ranks
    blocks first by whether they divide the product's width, so it is asked about ``width * 101``
    outputs (divisible by ``width``, by none of the wider blocks, and with enough blocks per thread).
    The kernel it returns prefetches the weight stream (see :func:`_prefetching_micro_gemm`)."""
    from torch._inductor.codegen import cpp_micro_gemm

    def create(name: str, m: Any, n: Any, k: Any, **kwargs: Any) -> Any:
        micro = cpp_micro_gemm.create_micro_gemm(name, m, width * 101, k, **kwargs)
        if micro is None or micro.register_blocking.block_n != width:
            raise RuntimeError(f"inductor's CPU template did not take a {width}-wide block ({micro})")
        prefetching = _prefetching_micro_gemm(type(micro))
        if prefetching is not None:
            micro.__class__ = prefetching
        return micro

    return create


@functools.lru_cache(maxsize=None)
def _prefetching_micro_gemm(cls: type) -> type | None:
    """``cls`` (inductor's float32 micro-kernel class) with its kernels prefetching the next tile of
    the weight, or None where its template text is not the one this patches (another torch).

    The template's kernel for a product of a few rows makes one pass over a (k-slice, 24-column)
    tile of the weight per 4-row block: the first pass waits on memory, the others compute from
    the L1 cache, and nothing fetches the next tile meanwhile. A blocked weight (``BlockedLinear``)
    is one contiguous stream in the order the tiles are used, so the next tile starts where this
    one ends; each row block prefetches its share of it while it computes. The 512 x 32128 output
    projection of t5-small at 16 rows on 2 AVX2 cores (AMD Zen 3): 6.3-7.9 -> 4.7-4.9 ms. With one
    row block (up to 4 rows: batch-1 decoding) it prefetches nothing, as before. A prefetch is only a
    hint: past the end of the weight it does nothing, and the products are unchanged."""
    kernel, entry = getattr(cls, "TEMPLATE_KERNEL", ""), getattr(cls, "TEMPLATE_ENTRY", "")
    signature = "    int64_t ldc\n) {"
    k_loop = "    for (int k = 0; k < K; ++k) {\n        c10::ForcedUnroll<ROWS * COLS>{}(compute, k);\n"
    m_loop = "    for (int64_t m = 0; m < M; m += {{block_m}}) {\n"
    calls = ("                    ldc\n                );", "                        ldc\n                    );\n                    break;")
    if not (kernel.count(signature) == 1 and kernel.count(k_loop) == 1 and entry.count(m_loop) == 1 and all(c in entry for c in calls)):
        return None
    kernel = kernel.replace(signature, "    int64_t ldc,\n    const char* pf_next = nullptr,\n    int64_t pf_bytes = 0\n) {")
    kernel = kernel.replace(k_loop, (
        "    for (int k = 0; k < K; ++k) {\n"
        "#if defined(__GNUC__)\n"
        "        if (pf_bytes) {  // t5kit: this row block's share of the next weight tile, spread over its K steps\n"
        "            const char* p = pf_next + (k * pf_bytes) / K;\n"
        "            __builtin_prefetch(p, 0, 3);\n"
        "            __builtin_prefetch(p + 64, 0, 3);\n"
        "        }\n"
        "#endif\n"
        "        c10::ForcedUnroll<ROWS * COLS>{}(compute, k);\n"
    ))
    entry = entry.replace(m_loop, m_loop + (
        "        // t5kit: the next tile of a blocked weight starts where this (K x ldb) tile ends\n"
        "        const int64_t t5kit_blocks = (M + {{block_m}} - 1) / {{block_m}};\n"
        "        const int64_t t5kit_share = t5kit_blocks > 1 ? K * ldb * static_cast<int64_t>(sizeof(*B)) / t5kit_blocks : 0;\n"
        "        const char* t5kit_next = reinterpret_cast<const char*>(B + K * ldb) + (m / {{block_m}}) * t5kit_share;\n"
    ))
    entry = entry.replace(calls[0], "                    ldc,\n                    t5kit_next,\n                    t5kit_share\n                );", 1)
    entry = entry.replace(calls[1], "                        ldc,\n                        t5kit_next,\n                        t5kit_share\n                    );\n                    break;", 1)
    return type("Prefetching" + cls.__name__, (cls,), {"TEMPLATE_KERNEL": kernel, "TEMPLATE_ENTRY": entry})


def _probe_blocked_gemm_width() -> int | None:
    import torch._inductor.lowering  # noqa: F401 - imports the codegen modules in an order that works
    from torch._inductor.codegen import cpp_micro_gemm
    from torch._inductor.cpu_vec_isa import pick_vec_isa
    from torch._inductor.sizevars import SizeVarAllocator
    from torch._inductor.virtualized import V

    isa = pick_vec_isa()
    widths = [
        config.register_blocking.block_n
        for configs in cpp_micro_gemm.micro_gemm_configs.values()
        for config in configs
        if isinstance(isa, config.vec_isa_cls) and config.input_dtype == config.input2_dtype == torch.float32
        and config.output_dtype == torch.float32 and config.extra_check is None
    ]
    if not widths:
        return None
    width = max(widths)

    class Graph:  # create_micro_gemm reads sizes through the graph being lowered
        sizevars = SizeVarAllocator()

    with V.set_graph_handler(Graph()):  # type: ignore[arg-type]
        _forced_micro_gemm(width)(
            "probe", 1, width, 64, input_dtype=torch.float32, input2_dtype=torch.float32, num_threads=2, use_ref=False
        )
    return width


def _lower_blocked_linear(x: Any, weight: Any, bias: Any, out_features: int) -> Any:
    """Inductor lowering of ``t5kit::blocked_linear``: its CPU matrix-product template (a C++ kernel
    generated for the shape, the batch-1 decoding products streaming their weights about 1.6x faster
    than oneDNN on an AVX2 CPU), reading the stored blocked weight as it is. Built for weights that
    inductor itself blocks when it freezes them (a copy of every weight); here the weight is blocked
    already, so the template is handed a stand-in of the logical (in, out) shape and given the real
    one where it would block it."""
    from torch._inductor import ir
    from torch._inductor import lowering as L
    from torch._inductor.codegen import cpp_gemm_template
    from torch._inductor.select_algorithm import autotune_select_algorithm

    blocks, k, width = (int(s) for s in weight.get_size())  # parameters: static sizes
    lead = x.get_size()[:-1]
    x2 = ir.ExternKernel.require_contiguous(ir.ExternKernel.realize_input(L.view(x, [-1, k])))  # (rows, in)
    w = ir.ExternKernel.realize_input(weight)
    stand_in = ir.ReinterpretView(
        data=w.data if isinstance(w, ir.TensorBox) else w,
        layout=ir.FixedLayout(w.get_device(), w.get_dtype(), [k, out_features], [1, k]),
    )

    def forced() -> Any:  # a new patch each time: they nest (add_choices renders once)
        return mock.patch.object(cpp_gemm_template, "create_micro_gemm", _forced_micro_gemm(width))

    class Template(cpp_gemm_template.CppGemmTemplate):
        @staticmethod
        def check_if_block_weight(W: Any, micro_gemm: Any) -> bool:
            return True

        @classmethod
        def block_weight(cls, W: Any, new_size: Any, padding: Any) -> Any:
            if list(new_size) != [blocks, k, width]:
                raise RuntimeError(f"inductor wants a {list(new_size)} blocked weight, the layer holds {[blocks, k, width]}")
            return w

        def get_options(self, *args: Any, **kwargs: Any) -> Any:  # renders with the same forced block
            with forced():
                return super().get_options(*args, **kwargs)

    layout = ir.FixedLayout(x.get_device(), x.get_dtype(), [x2.get_size()[0], out_features])
    choices: list[Any] = []
    with forced():
        Template.add_choices(choices, layout, [x2, stand_in])
    node, _ = autotune_select_algorithm("t5kit_blocked_linear", choices, [x2, stand_in], layout)  # one choice: no tuning
    if bias is not None:
        node = L.add(node, bias)
    return L.view(node, [*lead, out_features])


# The largest subnormal float32: gradient entries no larger than this are flushed (_FlushSubnormalGrad).
_SUBNORMAL_MAX = float(torch.nextafter(torch.tensor(torch.finfo(torch.float32).tiny), torch.tensor(0.0)))


class _FlushSubnormalGrad(torch.autograd.Function):
    """Identity forward; the backward sets subnormal gradient entries (|g| < 2**-126) to zero.

    The cross-entropy gradient of a large vocabulary is softmax(logits) / rows: a model that is
    confident (a trained one, or random mT5 weights) puts most of its 250112 probabilities far
    below 2**-126, and the entries between 2**-149 and 2**-126 come out subnormal. Intel CPUs take
    a microcode assist on every subnormal operand of the head's two backward products, which on a
    2-core Xeon (Emerald Rapids) made them 22 s each in an mT5-small training step (0.5-0.7 s with the
    subnormals flushed) for the reference and for us alike. The flushed entries are below float32's
    normal range, so the parameter gradients differ from the unflushed ones by less than float32
    rounding. One extra pass over the logits' gradient (hardshrink; fused into the softmax backward
    under torch.compile)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return F.hardshrink(grad, _SUBNORMAL_MAX)


def lm_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of (..., V) logits in float32 over the labels that are not -100. On the CPU the
    logits' gradient has its subnormal entries flushed (_FlushSubnormalGrad), so that the head's
    backward products run at full speed."""
    logits = logits.float()
    if logits.requires_grad and logits.device.type == "cpu" and torch.is_grad_enabled():
        logits = _FlushSubnormalGrad.apply(logits)
    return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=-100, reduction=reduction)


class _DnnLinearFunction(torch.autograd.Function):
    """oneDNN forward and backward for training: the three products of a linear layer."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _dnn_linear(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad_2d = grad.reshape(-1, grad.shape[-1])  # (rows, out)
        grad_x = _dnn_linear(grad, weight.t(), None) if ctx.needs_input_grad[0] else None  # (..., in)
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = _dnn_linear(grad_2d.t(), x.reshape(-1, x.shape[-1]).t(), None)  # (out, in)
        grad_b = grad_2d.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


class Linear(nn.Linear):
    """``nn.Linear`` whose CPU products go through oneDNN instead of the BLAS.

    PyTorch's CPU build sends float32 ``F.linear`` to MKL, which runs a slow generic path on
    AMD processors: on the 2-core AMD EPYC of our benchmarks, oneDNN (which PyTorch also ships,
    and which picks its kernels by instruction set, not vendor) computes the same products about
    twice as fast, from 1 row (t5-small's 512 -> 32128 output projection: 4.8 -> 1.9 ms) to
    thousands (an encoder's 2048 x 512 x 2048: 25.5 -> 10.5 ms), and in the backward pass too. The
    weight stays an ordinary parameter in its checkpoint layout; values agree with ``F.linear`` to
    float32 rounding. float32 and bfloat16 (where the CPU has bfloat16 instructions: see
    ``ONEDNN_DTYPES``) on the CPU take this route (not under autocast, which must see ``F.linear``
    to cast); everything else, and every other device, uses ``F.linear``.

    On CPUs without AVX-512 the advantage is confined to few rows: on a 2-core AMD Zen 3 (AVX2),
    oneDNN is faster up to about 128 rows (the 512 -> 32128 projection of one row: 4.8 -> 2.2
    ms) but MKL is as fast or faster from 256 rows (2048 x 2048 x 512: 23.7 against 31.5 ms) and
    in the backward products, so there products of ``ONEDNN_MAX_ROWS`` (256) rows or more, and
    with them training, use ``F.linear`` (t5-small training: 0.84x transformers' steps/s through
    oneDNN, 1.01x so). The same holds on Intel processors, where MKL takes its fast path: on a
    2-core Xeon (Emerald Rapids, AVX-512 and AMX) oneDNN is faster from about 16 to 256 rows
    (16 x 2048 -> 512: 182 against 97 GFLOP/s), level at 128-512, and its backward pass copies
    more (t5-small training step 1.09 s through oneDNN, 0.99 s through MKL, transformers 1.00 s).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            not ONEDNN_LINEAR
            or x.device.type != "cpu"
            or x.dim() < 2
            or x.dtype not in ONEDNN_DTYPES
            or x.dtype != self.weight.dtype
            or x.numel() == 0
            or torch.is_autocast_enabled("cpu")
            or (ONEDNN_MAX_ROWS is not None and x.numel() >= ONEDNN_MAX_ROWS * x.shape[-1])
        ):
            return F.linear(x, self.weight, self.bias)
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _DnnLinearFunction.apply(x, self.weight, self.bias)
        return _dnn_linear(x, self.weight, self.bias)


def _embedding(num_embeddings: int, embedding_dim: int) -> nn.Embedding:
    """An ``nn.Embedding`` without torch's default initialisation: ``post_init`` gives every parameter
    the reference's. On the meta device (``from_pretrained`` builds the model there) torch's
    ``normal_`` imports sympy and mpmath, about 70 MB of resident modules that loading never
    needs."""
    return nn.Embedding(num_embeddings, embedding_dim, _weight=torch.empty(num_embeddings, embedding_dim))


class T5LayerNorm(nn.Module):
    """RMS norm without bias or mean subtraction; statistics in float32."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.dtype == self.weight.dtype == torch.float32
            and x.device.type == "cpu"
            and not torch.compiler.is_compiling()  # a compiled graph fuses F.rms_norm into one loop
            and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
        ):
            # Inference on the CPU: torch 2.13 runs F.rms_norm there as five passes over x (pow,
            # mean, add, rsqrt, two products); one reduction and two products over it here. A
            # 16 x 128 x 768 norm (t5-base's encoder) 0.72 -> 0.42 ms, 128 x 768 27 -> 23 us.
            mean_square = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square() / x.shape[-1]  # (..., 1)
            scale = torch.rsqrt(mean_square + self.variance_epsilon)
            return (x * scale).mul_(self.weight)  # (..., D); the reference's order: x * rsqrt, then the weight
        if x.dtype == self.weight.dtype and x.dtype in (torch.float32, torch.bfloat16):
            # One fused op instead of six (a decoding step runs 3 norms per layer). In bfloat16 it
            # still computes in float32 and rounds once, where the reference rounds the normalised
            # input and then its product with the weight: t5-small bf16 eager greedy b1 on the CPU
            # 1-6% faster; on a GPU, whose eager step is bound by launching its kernels, 5 fewer a norm.
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.variance_epsilon)
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.variance_epsilon)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class T5DenseActDense(nn.Module):
    """Feed-forward layer of T5 v1.0: ``wo(act(wi(x)))``."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.wi = Linear(config.d_model, config.d_ff, bias=False)
        self.wo = Linear(config.d_ff, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.act = ACT_FNS[config.dense_act_fn]
        # Set by t5kit.prepack / quantize_dynamic where act is ReLU: wi's product applies it as it
        # writes its output (one pass less over the (..., d_ff) activations: t5-base's encoder
        # 1.00-1.03x faster prepacked, 1.04-1.11x int8).
        self.act_in_wi = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.wi(x)  # (..., d_ff)
        return self.wo(self.dropout(h if self.act_in_wi else self.act(h)))


class T5DenseGatedActDense(nn.Module):
    """Gated feed-forward layer of T5 v1.1, mT5 and umT5: ``wo(act(wi_0(x)) * wi_1(x))``."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.wi_0 = Linear(config.d_model, config.d_ff, bias=False)
        self.wi_1 = Linear(config.d_model, config.d_ff, bias=False)
        self.wo = Linear(config.d_ff, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.act = ACT_FNS[config.dense_act_fn]
        self.wi_01: nn.Module | None = None  # wi_0 | wi_1 as one product, set by t5kit.prepack

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.wi_01 is not None:
            gate, up = self.wi_01(x).chunk(2, dim=-1)  # (..., d_ff) each
        else:
            gate, up = self.wi_0(x), self.wi_1(x)
        if self.act is _gelu_tanh and _inplace_gelu_ok(gate):
            return self.wo(self.dropout(_gelu_tanh_times(gate, up)))
        return self.wo(self.dropout(self.act(gate) * up))


class T5LayerFF(nn.Module):
    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(config) if config.is_gated_act else T5DenseActDense(config)
        self.layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dropout(self.DenseReluDense(self.layer_norm(x)))


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    dropout_p: float,
    need_weights: bool,
    cached: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Unscaled dot-product attention (T5 folds 1/sqrt(D) into its initialisation).

    q: (B, H, T, D); k, v: (B, H, K, D); bias: additive, broadcastable to (B, H, T, K), holding
    the relative position bias and the masks; ``cached``: k and v come from a decoding cache.
    Returns (B, H, T, D) and, if asked, the weights.
    """
    if not need_weights and (not torch.compiler.is_compiling() or (not cached and not torch.is_grad_enabled())):
        # Eager, and compiled inference without a cache (t5kit.compile_encoder): the fused kernel,
        # which inductor calls as it is (its own plain maths took 0.8 ms against 0.21 for t5-base's
        # 128 x 128 heads; t5kit's decoding kernel re-reads the keys per query).
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=1.0), None
    if not need_weights and dropout_p == 0.0 and attend_kernel_applies(q, k, v, bias):
        # A compiled decoding step on the CPU: t5kit's kernel for a few queries (t5kit.kernels).
        return _attend_kernel(q, k, v, bias), None
    # Compiled (or weights wanted): the plain maths, which inductor fuses with the bias and the cache
    # write into one loop, where the fused CPU kernel would be a call of its own (~10 us at one query).
    scores = torch.matmul(q, k.transpose(-1, -2))
    if bias is not None:
        scores = scores + bias
    weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    weights = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
    return torch.matmul(weights, v), weights


class T5Attention(nn.Module):
    """Multi-head attention with T5's optional relative position bias table."""

    def __init__(self, config: T5Config, has_relative_attention_bias: bool = False) -> None:
        super().__init__()
        self.n_heads = config.num_heads
        self.d_kv = config.d_kv
        self.dropout = config.dropout_rate
        inner = config.num_heads * config.d_kv
        self.q = Linear(config.d_model, inner, bias=False)
        self.k = Linear(config.d_model, inner, bias=False)
        self.v = Linear(config.d_model, inner, bias=False)
        self.o = Linear(inner, config.d_model, bias=False)
        self.has_relative_attention_bias = has_relative_attention_bias
        if has_relative_attention_bias:
            self.relative_attention_bias = _embedding(config.relative_attention_num_buckets, config.num_heads)
        # Set by t5kit.prepack: one product for the projections of one input (fewer, wider products).
        self.qkv: nn.Module | None = None  # q | k | v, self-attention
        self.kv: nn.Module | None = None  # k | v of the encoder output, cross-attention

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.d_kv).transpose(1, 2)  # (B, H, T, D)

    def position_bias(self, buckets: torch.Tensor) -> torch.Tensor:
        """(T, K) or (B, T, K) bucket ids -> (1 or B, H, T, K) bias."""
        # Contiguous: as a view of the (T, K, H) lookup, heads would be the innermost dimension, and
        # so would they be in every bias added to it; on a GPU, scaled_dot_product_attention then
        # refuses its fused kernels (they need a unit stride along the keys) and runs its float32
        # maths instead (t5-base's bf16 encoder on an H100: 0.62-0.64x the reference's speed).
        bias = self.relative_attention_bias(buckets).movedim(-1, -3).contiguous()
        return bias if bias.dim() == 4 else bias.unsqueeze(0)

    def forward(
        self,
        x: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        key_value_states: torch.Tensor | None = None,
        cache: EncoderDecoderCache | None = None,
        layer_idx: int = 0,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, t, _ = x.shape
        inner = self.n_heads * self.d_kv
        if key_value_states is None:  # self-attention
            if self.qkv is not None:
                q, k, v = (self._heads(p) for p in self.qkv(x).split(inner, dim=-1))
            else:
                q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
            if cache is not None:
                k, v = cache.update(layer_idx, k, v)
        else:
            q = self._heads(self.q(x))
            if cache is not None and cache.has_cross(layer_idx):  # cross-attention, reused
                k, v = cache.get_cross(layer_idx)
            else:  # cross-attention, first step: computed once from the encoder output
                if self.kv is not None:
                    k, v = (self._heads(p) for p in self.kv(key_value_states).split(inner, dim=-1))
                else:
                    k, v = self._heads(self.k(key_value_states)), self._heads(self.v(key_value_states))
                if cache is not None:
                    # Cached for the whole generation: contiguous (B, H, S, D), outside the heap
                    # (EncoderDecoderCache.hold). As heads of the projection (positions 2 * inner
                    # apart), a compiled step of more than one row copied K^T out of them in every
                    # layer at every step: int8 t5-small greedy b16 1.12-1.17x and beam4 b8
                    # 1.08-1.13x faster without that copy, fp32 greedy b16 1.08x.
                    k, v = cache.hold(k), cache.hold(v)
                    cache.set_cross(layer_idx, k, v)
        dropout_p = self.dropout if self.training else 0.0
        if k.shape[0] != b:
            # Beams (or returned samples) of one input share its encoder keys/values: the G rows of a
            # group attend as G*T queries of one row, so the encoder output is never copied per beam.
            rows, g = k.shape[0], b // k.shape[0]
            q = q.view(rows, g, self.n_heads, t, self.d_kv).transpose(1, 2).reshape(rows, self.n_heads, g * t, self.d_kv)
            out, weights = attend(q, k, v, bias, dropout_p, need_weights=False, cached=cache is not None)  # (rows, H, G*T, D)
            out = out.view(rows, self.n_heads, g, t, self.d_kv).transpose(1, 2).reshape(b, self.n_heads, t, self.d_kv)
        else:
            out, weights = attend(q, k, v, bias, dropout_p, need_weights, cached=cache is not None)
        return self.o(out.transpose(1, 2).reshape(b, t, self.n_heads * self.d_kv)), weights


class T5LayerSelfAttention(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool = False) -> None:
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        out, weights = self.SelfAttention(self.layer_norm(x), bias, **kwargs)
        return x + self.dropout(out), weights


class T5LayerCrossAttention(nn.Module):
    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.EncDecAttention = T5Attention(config, has_relative_attention_bias=False)
        self.layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(
        self, x: torch.Tensor, encoder_hidden_states: torch.Tensor, bias: torch.Tensor | None, **kwargs: Any
    ) -> tuple[torch.Tensor, Any]:
        out, weights = self.EncDecAttention(self.layer_norm(x), bias, key_value_states=encoder_hidden_states, **kwargs)
        return x + self.dropout(out), weights


class T5Block(nn.Module):
    """Self-attention, cross-attention (decoder only) and feed-forward, each pre-normed and residual."""

    def __init__(self, config: T5Config, has_relative_attention_bias: bool, is_decoder: bool) -> None:
        super().__init__()
        self.is_decoder = is_decoder
        self.layer = nn.ModuleList([T5LayerSelfAttention(config, has_relative_attention_bias)])
        if is_decoder:
            self.layer.append(T5LayerCrossAttention(config))
        self.layer.append(T5LayerFF(config))

    def forward(
        self,
        x: torch.Tensor,
        self_bias: torch.Tensor | None,
        encoder_hidden_states: torch.Tensor | None = None,
        cross_bias: torch.Tensor | None = None,
        cache: EncoderDecoderCache | None = None,
        layer_idx: int = 0,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        x, self_weights = self.layer[0](x, self_bias, cache=cache, layer_idx=layer_idx, need_weights=need_weights)
        x = _clamp_fp16(x)
        cross_weights = None
        if self.is_decoder and encoder_hidden_states is not None:
            x, cross_weights = self.layer[1](
                x, encoder_hidden_states, cross_bias, cache=cache, layer_idx=layer_idx, need_weights=need_weights
            )
            x = _clamp_fp16(x)
        x = _clamp_fp16(self.layer[-1](x))
        return x, self_weights, cross_weights


def _padding_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(B, K) 1/0 mask -> (B, 1, 1, K) additive bias: 0 where attended, dtype-min where masked."""
    if mask is None:
        return None
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class T5Stack(nn.Module):
    """An encoder or a decoder: embeddings, blocks, final norm.

    The relative-position buckets are computed once per call; the bias (plus the masks) once per
    stack for T5/mT5, or once per layer for umT5, never inside the attention layers.
    """

    def __init__(self, config: T5Config, embed_tokens: nn.Embedding, is_decoder: bool) -> None:
        super().__init__()
        self.config = config
        self.is_decoder = is_decoder
        self.embed_tokens = embed_tokens
        depth = config.num_decoder_layers if is_decoder else config.num_layers
        per_layer = config.per_layer_position_bias
        self.block = nn.ModuleList(
            [T5Block(config, has_relative_attention_bias=per_layer or i == 0, is_decoder=is_decoder) for i in range(depth)]
        )
        self.final_layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.gradient_checkpointing = False
        self.compiled = False  # set by t5kit.compile_encoder: inference calls run the compiled forward

    def _buckets(self, query_length: int, key_length: int, past: int, device: torch.device) -> torch.Tensor:
        """(T, K) relative-position bucket ids; queries sit at positions past..past+T-1."""
        context = torch.arange(past, past + query_length, device=device)[:, None]
        memory = torch.arange(key_length, device=device)[None, :]
        return relative_position_bucket(
            memory - context,
            bidirectional=not self.is_decoder,
            num_buckets=self.config.relative_attention_num_buckets,
            max_distance=self.config.relative_attention_max_distance,
        )

    def _position_bias(
        self, layer_idx: int, attn: T5Attention, buckets: torch.Tensor | None, t: int, k: int, past: int,
        dtype: torch.dtype, cache: EncoderDecoderCache | None,
    ) -> torch.Tensor:
        """(1, H, T, K) relative position bias for queries past..past+T-1 over keys 0..K-1.

        ``buckets`` (T, K) is None when decoding with a preallocated cache: then the whole
        (1, H, L, L) table is built once per layer and each step takes a slice of it (a static
        cache: the rows of its query positions, K = L).
        """
        if buckets is not None or cache is None or cache.max_length is None:
            assert buckets is not None
            return attn.position_bias(buckets).to(dtype)
        table = cache.position_bias_tables.get(layer_idx)
        if table is None or table.dtype != dtype:
            n = cache.max_length
            table = attn.position_bias(self._buckets(n, n, 0, attn.relative_attention_bias.weight.device)).to(dtype)
            cache.position_bias_tables[layer_idx] = table
        if cache.static:  # rows gathered by the position tensor, every key column
            return table.index_select(2, cache.query_positions(t, table.device))
        return table[:, :, past : past + t, :k]

    def _packed_biases(
        self, segment_ids: torch.Tensor, encoder_segment_ids: torch.Tensor | None, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Buckets (B, T, T) from positions that restart per segment, the additive (B, 1, T, T)
        same-segment (and causal) mask, and the (B, 1, T, S) cross-attention mask."""
        b, t = segment_ids.shape
        idx = torch.arange(t, device=segment_ids.device)
        first = torch.where(segment_starts(segment_ids), idx, 0).cummax(1).values  # (B, T) index where each segment starts
        pos = idx - first
        buckets = relative_position_bucket(
            pos[:, None, :] - pos[:, :, None],
            bidirectional=not self.is_decoder,
            num_buckets=self.config.relative_attention_num_buckets,
            max_distance=self.config.relative_attention_max_distance,
        )
        allowed = segment_ids[:, :, None] == segment_ids[:, None, :]
        if self.is_decoder:
            allowed = allowed & (idx[None, :] <= idx[:, None])
        low = torch.finfo(dtype).min
        zero = torch.zeros((), dtype=dtype, device=segment_ids.device)
        mask = torch.where(allowed, zero, low)[:, None]
        cross = None
        if self.is_decoder:
            if encoder_segment_ids is None:
                raise ValueError("decoder_segment_ids need encoder_segment_ids")
            cross = torch.where(segment_ids[:, :, None] == encoder_segment_ids[:, None, :], zero, low)[:, None]
        return buckets, mask, cross

    def _mask_bias(
        self, attention_mask: torch.Tensor | None, t: int, k: int, past: int, dtype: torch.dtype, device: torch.device,
        cache: EncoderDecoderCache | None = None,
    ) -> torch.Tensor | None:
        """Additive (B|1, 1, T|1, K) bias from the padding mask, and the causal mask in a decoder."""
        bias = _padding_bias(attention_mask, dtype)
        static = cache is not None and cache.static
        # One new query may see every key so far: nothing to mask. A static cache holds every key
        # column (K = L), so the columns after each query, written or not yet, are always masked.
        if static or (self.is_decoder and t > 1):
            queries = cache.query_positions(t, device) if static else torch.arange(past, past + t, device=device)  # type: ignore[union-attr]
            future = torch.arange(k, device=device)[None, :] > queries[:, None]  # (T, K)
            causal = torch.zeros(t, k, dtype=dtype, device=device).masked_fill_(future, torch.finfo(dtype).min)
            bias = causal[None, None] if bias is None else bias + causal
        return bias

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cache: EncoderDecoderCache | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        segment_ids: torch.Tensor | None = None,
        encoder_segment_ids: torch.Tensor | None = None,
    ) -> BaseModelOutputWithPastAndCrossAttentions:
        """Run the stack. ``segment_ids`` (B, T) describe packed rows (1, 2, ... per example, 0 on
        padding): attention stays inside an example and relative positions restart with it; a
        decoder also needs ``encoder_segment_ids`` (B, S) for cross-attention."""
        if self.compiled and cache is None and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            return self._compiled_forward(
                input_ids, attention_mask, inputs_embeds, encoder_hidden_states, encoder_attention_mask, None,
                output_attentions, output_hidden_states, segment_ids, encoder_segment_ids,
            )
        if inputs_embeds is None and torch.compiler.is_compiling() and isinstance(self.embed_tokens, nn.Embedding):
            # The ids were checked by the graph's own assert (_check_ids), but inductor may run the
            # lookup first, whose bounds check would then fail with a message naming no tensor; in
            # range here, the lookup cannot fail and the assert reports a bad id.
            input_ids = input_ids.clamp(0, self.embed_tokens.num_embeddings - 1)
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, d_model)
        b, t, _ = x.shape
        static = cache is not None and cache.static
        # A static cache's step reads no changing Python number (its position is a tensor): K = L.
        past = cache.get_seq_length() if cache is not None and not static else 0
        k = cache.max_length if static else past + t  # type: ignore[union-attr]
        if attention_mask is not None and attention_mask.shape[1] != k:
            raise ValueError(
                f"The {'decoder_' if self.is_decoder else ''}attention_mask covers {attention_mask.shape[1]} "
                f"positions but there are {k} ({'static cache length' if static else f'{past} cached + {t} new'}); "
                "pass a mask over all positions"
            )
        if static and segment_ids is not None:
            raise ValueError("Packed rows (segment ids) cannot be decoded with a static cache")
        dtype, device = x.dtype, x.device
        # Without grad, a preallocated cache serves the bias from its table; otherwise buckets once per call.
        use_table = cache is not None and cache.max_length is not None and (static or not torch.is_grad_enabled())
        buckets = None if use_table else self._buckets(t, k, past, device)
        mask_bias = self._mask_bias(attention_mask, t, k, past, dtype, device, cache)
        cross_bias = _padding_bias(encoder_attention_mask, dtype) if self.is_decoder else None
        if segment_ids is not None:
            if cache is not None and past:
                raise ValueError("Packed rows (segment ids) cannot be decoded incrementally with a cache")
            buckets, mask_bias, cross_bias = self._packed_biases(segment_ids, encoder_segment_ids, dtype)

        x = self.dropout(x)
        all_hidden: list[torch.Tensor] = []
        all_self: list[torch.Tensor] = []
        all_cross: list[torch.Tensor] = []
        self_bias: torch.Tensor | None = None
        for i, block in enumerate(self.block):
            attn = block.layer[0].SelfAttention
            if attn.has_relative_attention_bias:  # layer 0 only, or every layer in umT5
                pos = self._position_bias(i, attn, buckets, t, k, past, dtype, cache)  # (1, H, T, K)
                self_bias = pos if mask_bias is None else pos + mask_bias
            if output_hidden_states:
                all_hidden.append(x)
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x, w_self, w_cross = checkpoint(
                    block, x, self_bias, encoder_hidden_states, cross_bias, None, i, output_attentions,
                    use_reentrant=False,
                )
            else:
                x, w_self, w_cross = block(
                    x, self_bias, encoder_hidden_states, cross_bias, cache, i, output_attentions
                )
            if output_attentions:
                all_self.append(w_self)
                if w_cross is not None:
                    all_cross.append(w_cross)
        if cache is not None:
            cache.advance(t)
        x = self.dropout(self.final_layer_norm(x))
        if output_hidden_states:
            all_hidden.append(x)
        return BaseModelOutputWithPastAndCrossAttentions(
            last_hidden_state=x,
            past_key_values=cache,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_self) if output_attentions else None,
            cross_attentions=tuple(all_cross) if output_attentions and self.is_decoder else None,
        )

    def _compiled_forward(self, *args: Any) -> BaseModelOutputWithPastAndCrossAttentions:
        """:meth:`forward` (same arguments, in order) through ``torch.compile`` (see compile_encoder)."""
        from .generation import _compiling  # lazy: generation imports this module

        input_ids, inputs_embeds = args[0], args[2]
        if inputs_embeds is None and isinstance(input_ids, torch.Tensor) and input_ids.numel():
            # Checked here: the compiled graph clamps the ids it looks up (see forward).
            check_id_range(input_ids, self.embed_tokens.num_embeddings, "input_ids")
        cuda = self.final_layer_norm.weight.device.type == "cuda"
        if cuda not in _COMPILED_STACKS:
            _COMPILED_STACKS[cuda] = torch.compile(T5Stack.forward, options=compile_options(cuda))
        with _compiling():
            return _COMPILED_STACKS[cuda](self, *args)


# T5Stack.forward through torch.compile, one per device kind (CPU, CUDA): dynamo guards on the
# stack passed in, so every compiled encoder gets graphs of its own (and input shapes after the
# first become symbolic: one more graph, not one per length).
_COMPILED_STACKS: dict[bool, Callable[..., Any]] = {}


def compile_encoder(model: nn.Module) -> nn.Module:
    """Have ``model``'s encoder run through ``torch.compile`` for inference; in place, returns ``model``.

    ``model`` is any t5kit model with an encoder (``ForConditionalGeneration``, ``EncoderModel``,
    the classification models...) or an encoder stack (``model.get_encoder()``). Calls without
    gradients and without a cache (inference, ``generate``'s encoder pass) then run the compiled
    forward: norms, residuals and the ReLU fused into C++ loops, no Python between the layers;
    prepacked and int8 products called from the graph as eager calls them (attention through the
    same fused kernel). Training calls stay eager. The first call per input shape compiles (5-10 s
    for t5-base); from the second shape on, the graph takes symbolic shapes. Outputs equal the
    eager encoder's to float32 rounding (int8: to its quantization; tested). On the Emerald Rapids
    Xeon of the README, t5-base int8 encoder b1x128 19.0 -> 16.1 ms, b16x128 180 -> 167 ms;
    float32 prepacked 68.4 -> 64.4 ms and level at b16.

    Example::

        model = t5kit.quantize_dynamic(T5EncoderModel.from_pretrained("t5-base"))
        t5kit.compile_encoder(model)
        with torch.inference_mode():
            hidden = model(**batch).last_hidden_state
    """
    encoder = model if isinstance(model, T5Stack) else getattr(model, "encoder", None)
    if not isinstance(encoder, T5Stack) or encoder.is_decoder:
        raise TypeError(f"compile_encoder needs a t5kit model with an encoder, or its encoder stack; got {type(model).__name__}")
    encoder.compiled = True
    return model


class T5ClassificationHead(nn.Module):
    """Dense + tanh + projection over the sentence representation."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.dense = Linear(config.d_model, config.d_model)
        self.dropout = nn.Dropout(p=config.classifier_dropout)
        self.out_proj = Linear(config.d_model, config.num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.dropout(torch.tanh(self.dense(self.dropout(x)))))


# ------------------------------------------------------------------------------------------------
# Models with heads. Each exposes the reference's forward arguments and outputs.


def _encoder_output(encoder_outputs: Any) -> BaseModelOutput:
    if isinstance(encoder_outputs, BaseModelOutput):
        return encoder_outputs
    if isinstance(encoder_outputs, torch.Tensor):
        return BaseModelOutput(last_hidden_state=encoder_outputs)
    if isinstance(encoder_outputs, (tuple, list)) and encoder_outputs and isinstance(encoder_outputs[0], torch.Tensor):
        return BaseModelOutput(
            last_hidden_state=encoder_outputs[0],
            hidden_states=encoder_outputs[1] if len(encoder_outputs) > 1 else None,
            attentions=encoder_outputs[2] if len(encoder_outputs) > 2 else None,
        )
    if hasattr(encoder_outputs, "last_hidden_state"):
        return BaseModelOutput(
            last_hidden_state=encoder_outputs.last_hidden_state,
            hidden_states=getattr(encoder_outputs, "hidden_states", None),
            attentions=getattr(encoder_outputs, "attentions", None),
        )
    raise TypeError(
        "encoder_outputs must be the encoder's output object, a tensor, or a tuple whose first item is the "
        f"(batch, length, d_model) hidden states; got {type(encoder_outputs).__name__}"
    )


class _EncoderDecoderBase(PreTrainedModel):
    """Shared body of the models that own ``shared``, ``encoder`` and ``decoder``."""

    def __init__(self, config: T5Config) -> None:
        super().__init__(config)
        self.shared = _embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, self.shared, is_decoder=False)
        self.decoder = T5Stack(config, self.shared, is_decoder=True)

    def get_encoder(self) -> T5Stack:
        return self.encoder

    def get_decoder(self) -> T5Stack:
        return self.decoder

    def _run(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        decoder_input_ids: torch.Tensor | None,
        decoder_attention_mask: torch.Tensor | None,
        encoder_outputs: Any,
        past_key_values: EncoderDecoderCache | None,
        inputs_embeds: torch.Tensor | None,
        decoder_inputs_embeds: torch.Tensor | None,
        use_cache: bool | None,
        output_attentions: bool | None,
        output_hidden_states: bool | None,
    ) -> tuple[BaseModelOutput, BaseModelOutputWithPastAndCrossAttentions]:
        """Validate, encode (unless given), decode. Returns the two stack outputs."""
        output_attentions, output_hidden_states = self._output_flags(output_attentions, output_hidden_states)
        if encoder_outputs is None:
            encoder_outputs = self._encode(
                input_ids, attention_mask, inputs_embeds, output_attentions, output_hidden_states
            )
        else:
            encoder_outputs = _encoder_output(encoder_outputs)
            self._check_hidden(encoder_outputs.last_hidden_state, "encoder_outputs[0]")
            if attention_mask is not None:
                self._check_mask(attention_mask, encoder_outputs.last_hidden_state.shape[:2], "attention_mask")
        if decoder_input_ids is None and decoder_inputs_embeds is None:
            raise ValueError(
                "The decoder needs decoder_input_ids or decoder_inputs_embeds (or labels, from which "
                "ForConditionalGeneration derives them with _shift_right)"
            )
        self._check_inputs(decoder_input_ids, decoder_inputs_embeds, "decoder_input_ids", "decoder_inputs_embeds")
        use_cache = self._use_cache(use_cache)
        if past_key_values is not None and not isinstance(past_key_values, EncoderDecoderCache):
            raise TypeError(
                f"past_key_values must be the EncoderDecoderCache returned by an earlier call, got "
                f"{type(past_key_values).__name__}"
            )
        cache = past_key_values
        if use_cache and cache is None:
            cache = EncoderDecoderCache(self.config.num_decoder_layers)
        decoder_outputs = self.decoder(
            input_ids=decoder_input_ids,
            attention_mask=decoder_attention_mask,
            inputs_embeds=decoder_inputs_embeds,
            encoder_hidden_states=encoder_outputs.last_hidden_state,
            encoder_attention_mask=attention_mask,
            cache=cache if use_cache or past_key_values is not None else None,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        if not use_cache:
            decoder_outputs.past_key_values = None
        return encoder_outputs, decoder_outputs

    @staticmethod
    def _seq2seq_fields(
        encoder_outputs: BaseModelOutput, decoder_outputs: BaseModelOutputWithPastAndCrossAttentions
    ) -> dict[str, Any]:
        return dict(
            past_key_values=decoder_outputs.past_key_values,
            decoder_hidden_states=decoder_outputs.hidden_states,
            decoder_attentions=decoder_outputs.attentions,
            cross_attentions=decoder_outputs.cross_attentions,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attentions=encoder_outputs.attentions,
        )


class T5Model(_EncoderDecoderBase):
    """The bare encoder-decoder, returning the decoder's last hidden states."""

    config_class = T5Config

    def __init__(self, config: T5Config) -> None:
        super().__init__(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: Any = None,
        past_key_values: EncoderDecoderCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> Seq2SeqModelOutput | tuple:
        """Encode ``input_ids`` (unless ``encoder_outputs`` is given) and decode ``decoder_input_ids``.

        Shapes: input_ids (B, S), decoder_input_ids (B, T); returns last_hidden_state (B, T, d_model).
        """
        self._check_kwargs(kwargs)
        enc, dec = self._run(
            input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, encoder_outputs,
            past_key_values, inputs_embeds, decoder_inputs_embeds, use_cache, output_attentions,
            output_hidden_states,
        )
        out = Seq2SeqModelOutput(last_hidden_state=dec.last_hidden_state, **self._seq2seq_fields(enc, dec))
        return self._return(out, return_dict)


class T5ForConditionalGeneration(GenerationMixin, _EncoderDecoderBase):
    """Encoder-decoder with the language-modelling head: the model for generation and fine-tuning."""

    config_class = T5Config

    def __init__(self, config: T5Config) -> None:
        super().__init__(config)
        self.model_dim = config.d_model
        self.lm_head = Linear(config.d_model, config.vocab_size, bias=False)
        self.generation_config = GenerationConfig.from_model_config(config)
        self.post_init()

    def decode_step(
        self,
        decoder_input_ids: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None,
        cache: EncoderDecoderCache,
    ) -> torch.Tensor:
        """One decoding step: feed new tokens (N, T), return next-token logits (N, vocab_size).

        The cache holds earlier positions and receives these; ``encoder_hidden_states`` (B, S, d)
        may have fewer rows than the decoder (N = B * G): each input's G beams share it. No input
        checks run here: this is the inner loop of ``generate``.
        """
        out = self.decoder(
            input_ids=decoder_input_ids,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            cache=cache,
        )
        return self.lm_logits(out.last_hidden_state[:, -1])

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: Any = None,
        past_key_values: EncoderDecoderCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> Seq2SeqLMOutput | tuple:
        """Logits (B, T, vocab_size) for ``decoder_input_ids``, and the loss when ``labels`` are given.

        ``labels`` (B, T) are shifted right into ``decoder_input_ids`` when those are absent;
        positions labelled -100 are ignored by the loss.

        Packed rows (``t5kit.data.pack_examples``): pass ``encoder_segment_ids`` (B, S) and
        ``decoder_segment_ids`` (B, T); attention stays within each example, positions restart,
        and labels are shifted within each example.
        """
        enc_seg, dec_seg = kwargs.pop("encoder_segment_ids", None), kwargs.pop("decoder_segment_ids", None)
        self._check_kwargs(kwargs)
        if enc_seg is not None or dec_seg is not None:
            return self._packed_forward(input_ids, labels, decoder_input_ids, enc_seg, dec_seg, return_dict)
        if labels is not None:
            self._check_ids(labels, "labels", allow_ignore=True)
            if decoder_input_ids is None and decoder_inputs_embeds is None:
                decoder_input_ids = self._shift_right(labels)
        enc, dec = self._run(
            input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, encoder_outputs,
            past_key_values, inputs_embeds, decoder_inputs_embeds, use_cache, output_attentions,
            output_hidden_states,
        )
        logits = self.lm_logits(dec.last_hidden_state)
        loss = self._lm_loss(logits, labels)
        out = Seq2SeqLMOutput(loss=loss, logits=logits, **self._seq2seq_fields(enc, dec))
        return self._return(out, return_dict)

    def _packed_forward(
        self,
        input_ids: torch.Tensor | None,
        labels: torch.Tensor | None,
        decoder_input_ids: torch.Tensor | None,
        enc_seg: torch.Tensor | None,
        dec_seg: torch.Tensor | None,
        return_dict: bool | None,
    ) -> Seq2SeqLMOutput | tuple:
        """Forward over packed rows: several examples per row, kept apart by segment ids."""
        if input_ids is None or enc_seg is None or dec_seg is None:
            raise ValueError("Packed batches need input_ids, encoder_segment_ids and decoder_segment_ids")
        self._check_ids(input_ids, "input_ids")
        if enc_seg.shape != input_ids.shape:
            raise ValueError(f"encoder_segment_ids {tuple(enc_seg.shape)} must match input_ids {tuple(input_ids.shape)}")
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("Packed batches need labels or decoder_input_ids")
            self._check_ids(labels, "labels", allow_ignore=True)
            decoder_input_ids = self._shift_right(labels, dec_seg)
        if dec_seg.shape != decoder_input_ids.shape:
            raise ValueError(f"decoder_segment_ids {tuple(dec_seg.shape)} must match the decoder inputs {tuple(decoder_input_ids.shape)}")
        hidden = self.encoder(input_ids=input_ids, segment_ids=enc_seg).last_hidden_state
        out = self.decoder(input_ids=decoder_input_ids, encoder_hidden_states=hidden, segment_ids=dec_seg, encoder_segment_ids=enc_seg)
        logits = self.lm_logits(out.last_hidden_state)
        loss = self._lm_loss(logits, labels)
        return self._return(Seq2SeqLMOutput(loss=loss, logits=logits, encoder_last_hidden_state=hidden), return_dict)

    @staticmethod
    def _lm_loss(logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor | None:
        """Mean cross-entropy (float32) over the labels that are not -100; None without labels."""
        if labels is None:
            return None
        if labels.shape != logits.shape[:2]:
            raise ValueError(f"labels have shape {tuple(labels.shape)} but the logits cover {tuple(logits.shape[:2])}")
        labels = labels.to(logits.device)
        if torch.compiler.is_compiling():
            # As for the embedding lookup (T5Stack.forward): the graph's assert reports a bad label.
            labels = torch.where(labels == -100, labels, labels.clamp(0, logits.shape[-1] - 1))
        return lm_cross_entropy(logits, labels)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Decoder output (..., d_model) -> logits (..., vocab_size), rescaled when the head is tied."""
        if self.config.rescale_output:
            hidden = hidden * (self.model_dim**-0.5)
        return self.lm_head(hidden)

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        return self._shift_right(labels)


class T5EncoderModel(PreTrainedModel):
    """The encoder alone: text embeddings for retrieval, conditioning and classification."""

    config_class = T5Config

    def __init__(self, config: T5Config) -> None:
        super().__init__(config)
        self.shared = _embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, self.shared, is_decoder=False)
        self.post_init()

    def get_encoder(self) -> T5Stack:
        return self.encoder

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutput | tuple:
        """Encoder hidden states (B, S, d_model) for ``input_ids`` (B, S)."""
        self._check_kwargs(kwargs)
        output_attentions, output_hidden_states = self._output_flags(output_attentions, output_hidden_states)
        out = self._encode(input_ids, attention_mask, inputs_embeds, output_attentions, output_hidden_states)
        return self._return(out, return_dict)


class T5ForSequenceClassification(PreTrainedModel):
    """Classification from the decoder state at the last ``</s>`` of each input (as the reference)."""

    config_class = T5Config

    def __init__(self, config: T5Config) -> None:
        super().__init__(config)
        self.transformer = T5Model(config)
        self.classification_head = T5ClassificationHead(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> Seq2SeqSequenceClassifierOutput | tuple:
        """Logits (B, num_labels); the loss follows ``config.problem_type``."""
        self._check_kwargs(kwargs)
        if input_ids is None:
            raise ValueError(
                f"{type(self).__name__} needs input_ids: the sentence representation is read at the last </s> "
                "token of each input, so inputs_embeds alone are not enough"
            )
        self._check_ids(input_ids, "input_ids")
        if labels is not None:
            use_cache = False
        if decoder_input_ids is None and decoder_inputs_embeds is None:
            decoder_input_ids = self._shift_right(input_ids)
        out = self.transformer(
            input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask, encoder_outputs=encoder_outputs,
            inputs_embeds=inputs_embeds, decoder_inputs_embeds=decoder_inputs_embeds, use_cache=use_cache,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=True,
        )
        hidden = out.last_hidden_state  # (B, T, d_model)
        eos = self.config.eos_token_id
        eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        eos_mask = input_ids.eq(eos)
        counts = eos_mask.sum(1)
        if hidden.shape[1] != input_ids.shape[1]:
            raise ValueError("decoder inputs must have the same length as input_ids to read the </s> positions")
        if bool((counts == 0).any()):
            raise ValueError(f"Each example must contain at least one </s> (id {eos}) token")
        if bool((counts != counts[0]).any()):
            raise ValueError("All examples must have the same number of </s> tokens")
        b, _, d = hidden.shape
        sentence = hidden[eos_mask, :].view(b, -1, d)[:, -1, :]  # (B, d_model)
        logits = self.classification_head(sentence)
        loss = self._classification_loss(logits, labels) if labels is not None else None
        result = Seq2SeqSequenceClassifierOutput(
            loss=loss,
            logits=logits,
            past_key_values=out.past_key_values,
            decoder_hidden_states=out.decoder_hidden_states,
            decoder_attentions=out.decoder_attentions,
            cross_attentions=out.cross_attentions,
            encoder_last_hidden_state=out.encoder_last_hidden_state,
            encoder_hidden_states=out.encoder_hidden_states,
            encoder_attentions=out.encoder_attentions,
        )
        return self._return(result, return_dict)

    def _classification_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.to(logits.device)
        n = self.config.num_labels
        if self.config.problem_type is None:
            if n == 1:
                self.config.problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                self.config.problem_type = "single_label_classification"
            else:
                self.config.problem_type = "multi_label_classification"
        if self.config.problem_type == "regression":
            return F.mse_loss(logits.squeeze(), labels.squeeze()) if n == 1 else F.mse_loss(logits, labels)
        if self.config.problem_type == "single_label_classification":
            return F.cross_entropy(logits.view(-1, n), labels.view(-1))
        if self.config.problem_type == "multi_label_classification":
            return F.binary_cross_entropy_with_logits(logits, labels)
        raise ValueError(f"Unknown problem_type {self.config.problem_type!r}")


class T5ForTokenClassification(PreTrainedModel):
    """A linear classifier over every encoder position."""

    config_class = T5Config

    def __init__(self, config: T5Config) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = T5EncoderModel(config)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = Linear(config.d_model, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> TokenClassifierOutput | tuple:
        """Logits (B, S, num_labels); labels (B, S) with -100 ignored."""
        self._check_kwargs(kwargs)
        out = self.transformer(
            input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=True,
        )
        logits = self.classifier(self.dropout(out.last_hidden_state))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, self.num_labels), labels.to(logits.device).view(-1))
        result = TokenClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions)
        return self._return(result, return_dict)


class T5ForQuestionAnswering(_EncoderDecoderBase):
    """Extractive question answering: start and end logits over the decoder positions."""

    config_class = T5Config

    def __init__(self, config: T5Config) -> None:
        super().__init__(config)
        if config.num_labels != 2:
            raise ValueError(f"{type(self).__name__} needs num_labels=2 (start and end), got {config.num_labels}")
        self.model_dim = config.d_model
        self.num_labels = config.num_labels
        self.qa_outputs = Linear(config.d_model, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: Any = None,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> Seq2SeqQuestionAnsweringModelOutput | tuple:
        """start_logits, end_logits (B, T); the loss averages both when positions (B,) are given."""
        self._check_kwargs(kwargs)
        if start_positions is not None and end_positions is not None:
            use_cache = False
        if decoder_input_ids is None and decoder_inputs_embeds is None:
            if input_ids is None:
                raise ValueError("Pass decoder_input_ids or decoder_inputs_embeds, or input_ids to derive them from")
            self._check_ids(input_ids, "input_ids")
            decoder_input_ids = self._shift_right(input_ids)
        enc, dec = self._run(
            input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, encoder_outputs, None,
            inputs_embeds, decoder_inputs_embeds, use_cache, output_attentions, output_hidden_states,
        )
        logits = self.qa_outputs(dec.last_hidden_state)  # (B, T, 2)
        start_logits, end_logits = (x.squeeze(-1).contiguous() for x in logits.split(1, dim=-1))
        loss = None
        if start_positions is not None and end_positions is not None:
            ignored = start_logits.size(1)  # positions outside the input are ignored, as the reference
            start = start_positions.reshape(-1).to(start_logits.device).clamp(0, ignored)
            end = end_positions.reshape(-1).to(end_logits.device).clamp(0, ignored)
            loss = (
                F.cross_entropy(start_logits, start, ignore_index=ignored)
                + F.cross_entropy(end_logits, end, ignore_index=ignored)
            ) / 2
        out = Seq2SeqQuestionAnsweringModelOutput(
            loss=loss, start_logits=start_logits, end_logits=end_logits, **self._seq2seq_fields(enc, dec)
        )
        return self._return(out, return_dict)


# ------------------------------------------------------------------------------------------------
# mT5 and umT5: the same models, read with their own config classes (defaults and switches).


class MT5Model(T5Model):
    config_class = MT5Config


class MT5ForConditionalGeneration(T5ForConditionalGeneration):
    config_class = MT5Config


class MT5EncoderModel(T5EncoderModel):
    config_class = MT5Config


class MT5ForSequenceClassification(T5ForSequenceClassification):
    config_class = MT5Config


class MT5ForTokenClassification(T5ForTokenClassification):
    config_class = MT5Config


class MT5ForQuestionAnswering(T5ForQuestionAnswering):
    config_class = MT5Config


class UMT5Model(T5Model):
    config_class = UMT5Config


class UMT5ForConditionalGeneration(T5ForConditionalGeneration):
    config_class = UMT5Config


class UMT5EncoderModel(T5EncoderModel):
    config_class = UMT5Config


class UMT5ForSequenceClassification(T5ForSequenceClassification):
    config_class = UMT5Config


class UMT5ForTokenClassification(T5ForTokenClassification):
    config_class = UMT5Config


class UMT5ForQuestionAnswering(T5ForQuestionAnswering):
    config_class = UMT5Config
