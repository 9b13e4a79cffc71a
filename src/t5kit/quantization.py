"""int8 dynamic quantization for fast CPU inference.

``quantize_dynamic(model)`` replaces every linear layer by :class:`DynamicInt8Linear`: weights
stored as int8 with one scale per output channel, activations quantized to 8 bits per call (one
scale per call, from the current values), int8 x int8 products accumulated in int32 by PyTorch's
fbgemm kernels (products of many rows, on CPUs with AMX or AVX-512 VNNI, by oneDNN's: see
``ONEDNN_INT8_MIN_ROWS``), the result rescaled to float32. This is
what ONNX Runtime's and CTranslate2's "int8" modes do. On CPUs without 8-bit dot-product instructions (VNNI; AVX2-only processors such
as AMD Zen 3) fbgemm's kernel sums pairs of products in 16 bits, which 8-bit activations would
overflow, so activations are quantized to 7 bits there (``reduce_range``): about twice the error.
A decoding step reads a quarter of the fp32 weight bytes, so memory-bound batch-1
decoding is up to 4x faster; encoders and large batches gain from the int8 arithmetic.

Embeddings, norms, the position bias and the attention softmax stay in float32. The error this
adds is reported by ``benchmarks/bench_suite.py`` (largest logit error relative to the largest
logit, about 1e-2 on random weights, and the share of greedy tokens equal to fp32's).

A quantized model is for inference: it cannot be trained or saved (save the float model and
quantize after loading).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import warnings
import weakref
from functools import lru_cache
from typing import Any, Callable

import torch
from torch import nn

from .modeling import _cpuinfo
from .packing import refuse_training, replace_linears, stack_linears

__all__ = ["DynamicInt8Linear", "quantize_dynamic"]


@lru_cache(maxsize=1)
def _has_vnni() -> bool:
    """Whether the CPU has 8-bit dot-product instructions (then activations use all 8 bits)."""
    flags = _cpuinfo()
    return "avx512_vnni" in flags or "avx_vnni" in flags or "amx_int8" in flags


# from_linear reads a float32 weight this many bytes of rows at a time (its abs() and quantized
# copies are this size, not the layer's: an mT5 output projection is 512 MB), and hands each chunk's
# checkpoint pages back before reading the next: quantizing then briefly holds the int8 weight twice
# (values and fbgemm's packed copy) plus one chunk, not the float32 layer twice plus its int8 copies.
QUANTIZE_CHUNK_BYTES: int = 16 << 20

# fbgemm's packed weights by handle. The packed weight is a TorchScript object that torch.compile
# cannot pass into a graph, so a compiled graph calls t5kit::int8_linear with the layer's handle (an
# int, a constant of the graph) and the op looks the weight up here. Entries go with their layer.
_PACKED: dict[int, Any] = {}
_HANDLES = itertools.count()

# The op is defined with torch.library.Library, not torch.library.custom_op: the graph calls its
# Python body once per product, and custom_op's wrappers around that body cost about 10 us a call
# more: 37 calls a t5-small decoding step, which ran 1.09-1.12x faster at batch 1 this way (paired
# in one process on an AMD Zen 3).
_LIB = torch.library.Library("t5kit", "FRAGMENT")
_LIB.define("int8_linear(Tensor x, int handle, int out_features, bool reduce_range, bool relu=False) -> Tensor")


@lru_cache(maxsize=1)
def _has_amx_int8() -> bool:
    """Whether the CPU has AMX int8 tile instructions (Intel Xeon from Sapphire Rapids) and PyTorch
    its oneDNN quantized engine, which uses them."""
    return "amx_int8" in _cpuinfo() and "onednn" in torch.backends.quantized.supported_engines


@lru_cache(maxsize=1)
def _has_avx512_vnni_only() -> bool:
    """Whether the CPU has AVX-512 8-bit dot products but no AMX (AMD Zen 4, Intel Ice Lake and
    Cascade Lake) and PyTorch its oneDNN quantized engine."""
    flags = _cpuinfo()
    return "avx512_vnni" in flags and "amx_int8" not in flags and "onednn" in torch.backends.quantized.supported_engines


# Products of at least this many rows use oneDNN's int8 kernels instead of fbgemm's (None: none
# do). On a 2-core Xeon (Emerald Rapids) oneDNN's AMX kernels compute 128 rows at 1.4-2.8x
# fbgemm's rate (512 -> 32128: 3832 against 1392 GFLOP/s; 2048 rows of 2048 -> 512: 2299 against
# 1222), from 32 rows 1.5x (512 -> 2048: 1284 against 869), but at 1-16 rows fbgemm is faster
# (512 -> 2048, one row: 101 against 39). Without AMX (2 cores of an AMD Zen 4, AVX-512 VNNI)
# oneDNN's kernels pass fbgemm's later, and by less: interleaved with fbgemm, level at 64-256 rows
# and for 512 -> 512, 1.06-1.10x for the wider products at 512-2048 rows (a batch-16 encoder over
# 128 tokens runs 2048); whole int8 encoders, paired: t5-base b16 x 128 1.11x, t5-small b16 1.02x,
# b4 1.09x. Same int8 weights, same per-call activation scale: outputs agree to float32 rounding,
# but for a rare activation that rounds to the neighbouring step (one 2048-row product of 512 -> 2048
# read 0.12 apart of outputs up to 130). (Ice Lake and Cascade Lake Xeons take the Zen 4 setting
# unmeasured.)
ONEDNN_INT8_MIN_ROWS: int | None = 32 if _has_amx_int8() else 512 if _has_avx512_vnni_only() else None
# ... and layers of at least ONEDNN_INT8_LARGE_ENTRIES weights from this many rows: at 16 rows
# (greedy, batch 16) umT5's 512 -> 256384 output projection took 11.7 ms in fbgemm, 4.0 in oneDNN
# (8 rows: 7.7 against 3.3), where 512 -> 32128 (16.4M weights, below the bound) is level at 8-16 rows.
# On the Zen 4, from 16 rows: umT5's head 10.7 against 9.2 ms (8 rows: 5.8 against 6.3), mT5's
# 512 -> 250112 15.0 against 10.9 (32 rows: 16.3 against 14.7), t5-base's 768 -> 32128 1.08-1.21x at
# 16 rows, 1.21x at 32 (interleaved).
ONEDNN_INT8_LARGE_ROWS: int = 8 if _has_amx_int8() else 16
ONEDNN_INT8_LARGE_ENTRIES: int = 1 << 24

# oneDNN's packed copies of the weights by (handle, relu), made from fbgemm's at a layer's first
# product routed to oneDNN (see _packed_for): only layers that see many rows (an encoder's, the
# cross-attention keys/values, a head scoring long outputs or, from 8 rows, a 250k-word head) hold the
# second int8 copy. One copy per ReLU setting: torch 2.13's oneDNN linear_dynamic and
# linear_relu_dynamic keep one cached primitive per packed weight and input shape, whichever ran
# first, so after a plain product of 128 rows the ReLU op of the same weight returned negative values
# (and the other way round). fbgemm has no such cache.
_PACKED_MANY: dict[tuple[int, bool], Any] = {}


def _onednn_rows(entries: int) -> int | None:
    """From how many rows the products of a layer of ``entries`` weights use oneDNN's kernels (None: never)."""
    if ONEDNN_INT8_MIN_ROWS is None:
        return None
    return ONEDNN_INT8_LARGE_ROWS if entries >= ONEDNN_INT8_LARGE_ENTRIES else ONEDNN_INT8_MIN_ROWS


def _packed_for(handle: int, rows: int, entries: int, relu: bool = False) -> Any:
    """The packed weight of layer ``handle`` (``entries`` weights) for a product of ``rows`` rows,
    followed by a ReLU if ``relu`` (see ONEDNN_INT8_MIN_ROWS and _PACKED_MANY)."""
    onednn_rows = _onednn_rows(entries)
    if onednn_rows is None or rows < onednn_rows:
        return _PACKED[handle]
    packed = _PACKED_MANY.get((handle, relu))
    if packed is None:
        weight, bias = torch.ops.quantized.linear_unpack(_PACKED[handle])
        engine = torch.backends.quantized.engine
        torch.backends.quantized.engine = "onednn"  # the engine prepack packs for
        try:
            packed = _PACKED_MANY[handle, relu] = torch.ops.quantized.linear_prepack(weight, bias)
        finally:
            torch.backends.quantized.engine = engine
    return packed


_LINEAR = torch.ops.quantized.linear_dynamic.default
_LINEAR_RELU = torch.ops.quantized.linear_relu_dynamic.default


def _int8_linear_op(x: torch.Tensor, handle: int, out_features: int, reduce_range: bool, relu: bool = False) -> torch.Tensor:
    packed = _packed_for(handle, x.shape[0], x.shape[1] * out_features, relu)
    # Called from Python with the packed weight (a TorchScript object), an op first asks that object
    # for __torch_function__, which it lacks: two C++ exceptions thrown and caught, about 15 us of a
    # call's 28 (one row of 512 -> 64; the product itself takes about 1 us). With __torch_function__
    # off for subclasses during the call the check is skipped (an active TorchFunctionMode still
    # applies); a tensor subclass passed to an eager layer keeps its __torch_function__.
    plain = type(x) is torch.Tensor
    with torch._C.DisableTorchFunctionSubclass() if plain else contextlib.nullcontext():
        if relu:  # applied as the product writes its output: 128 x 768 -> 3072 0.30 -> 0.24 ms (oneDNN)
            return _LINEAR_RELU(x, packed, reduce_range)
        return _LINEAR(x, packed, reduce_range)


def _int8_linear_fake(x: torch.Tensor, handle: int, out_features: int, reduce_range: bool, relu: bool = False) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)


_LIB.impl("int8_linear", _int8_linear_op, "CPU")
torch.library.register_fake("t5kit::int8_linear", _int8_linear_fake, lib=_LIB)


# The same product as a C++ op, for compiled graphs. A compiled step's products dominate a batch-1
# int8 decoding step (t5-base: 73 a step), and a call of t5kit::int8_linear from the graph's C++
# wrapper goes through Python twice (the op's Python kernel, which calls fbgemm's op from Python):
# about 2 ms of a 9.4 ms t5-base step on an Intel Xeon (Emerald Rapids, 2 cores). This op keeps
# fbgemm's packed weights in a C++ table by the same handles and calls fbgemm's op through the
# dispatcher: t5-base greedy batch 1 ran 1.05-1.25x faster, t5-small 1.02-1.15x, same tokens (paired
# in one process, benchmarks/bench_int8_cpp_op.py). Products of ``onednn_rows`` rows or more (those
# _onednn_rows sends to oneDNN: many rows, where a call's overhead is small against the product) it
# hands to t5kit::int8_linear, so one graph serves any number of rows.
#
# It is built from this source by torch.utils.cpp_extension at the first compiled int8 graph (about
# 30-40 s once, with the C++ compiler and ninja that inductor's CPU graphs need too; cached in
# TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions, per torch version). If it cannot be
# built, a warning says why and the graphs call the Python op: same results, slower. Setting
# T5KIT_INT8_CPP=0 (or INT8_CPP_OP = False) skips it.
_CPP_SOURCE = r"""
#include <mutex>
#include <unordered_map>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

// fbgemm's packed weights by t5kit layer handle: put when a layer is made, dropped when it goes.
static std::mutex table_lock;
static std::unordered_map<int64_t, c10::IValue> table;

void put(int64_t handle, c10::IValue packed) {
  std::lock_guard<std::mutex> guard(table_lock);
  table[handle] = std::move(packed);
}

void drop(int64_t handle) {
  std::lock_guard<std::mutex> guard(table_lock);
  table.erase(handle);
}

int64_t size() {
  std::lock_guard<std::mutex> guard(table_lock);
  return static_cast<int64_t>(table.size());
}

at::Tensor int8_linear(const at::Tensor& x, int64_t handle, int64_t out_features, bool reduce_range, bool relu,
                       int64_t onednn_rows) {
  static const auto plain = c10::Dispatcher::singleton().findSchemaOrThrow("quantized::linear_dynamic", "");
  static const auto with_relu = c10::Dispatcher::singleton().findSchemaOrThrow("quantized::linear_relu_dynamic", "");
  static const auto python_op = c10::Dispatcher::singleton().findSchemaOrThrow("t5kit::int8_linear", "");
  if (x.size(0) >= onednn_rows) {  // oneDNN's products: t5kit's op holds their packed copies
    torch::jit::Stack stack{x, handle, out_features, reduce_range, relu};
    python_op.callBoxed(stack);
    return stack[0].toTensor();
  }
  c10::IValue packed;
  {
    std::lock_guard<std::mutex> guard(table_lock);
    auto found = table.find(handle);
    TORCH_CHECK(found != table.end(), "t5kit: no int8 weights for layer handle ", handle, " (the layer was deleted)");
    packed = found->second;
  }
  torch::jit::Stack stack{x, std::move(packed), reduce_range};
  (relu ? with_relu : plain).callBoxed(stack);
  return stack[0].toTensor();
}

TORCH_LIBRARY(t5kit_cpp, m) {
  m.def("put(int handle, Any packed) -> ()", put);
  m.def("drop(int handle) -> ()", drop);
  m.def("size() -> int", size);
  m.def("int8_linear(Tensor x, int handle, int out_features, bool reduce_range, bool relu, int onednn_rows) -> Tensor");
}

TORCH_LIBRARY_IMPL(t5kit_cpp, CPU, m) { m.impl("int8_linear", int8_linear); }
"""

INT8_CPP_OP: bool = os.environ.get("T5KIT_INT8_CPP", "1") != "0"
_CPP_READY = False  # the C++ op is loaded and its table holds every live layer's weight


def _cpp_int8_linear_fake(
    x: torch.Tensor, handle: int, out_features: int, reduce_range: bool, relu: bool, onednn_rows: int
) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)


@lru_cache(maxsize=1)
def _load_cpp_op() -> bool:
    """Build (first time) and load the C++ op, filling its table; False, with a warning, if it cannot."""
    global _CPP_READY
    try:
        from torch.utils.cpp_extension import load_inline

        # Per torch version: torch's extension cache keys on the source and flags, not on torch.
        name = "t5kit_int8_torch" + re.sub(r"\W", "_", torch.__version__)
        logging.getLogger("t5kit").info("loading t5kit's C++ int8 op %s (a first build takes 30-40 s)", name)
        load_inline(name, cpp_sources=_CPP_SOURCE, is_python_module=False)
    except Exception as err:  # no compiler or ninja, an unwritable cache, a failed build, ...
        warnings.warn(
            f"t5kit could not build its C++ int8 product op ({type(err).__name__}: {str(err)[:500]}); compiled "
            "int8 graphs call the Python op instead (same results; batch-1 decoding 5-25% slower). "
            "Set T5KIT_INT8_CPP=0 to skip the attempt.",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    torch.library.register_fake("t5kit_cpp::int8_linear", _cpp_int8_linear_fake)
    _CPP_READY = True  # first: a layer made from now on puts its own weight (the same value twice is harmless)
    for handle, packed in list(_PACKED.items()):
        torch.ops.t5kit_cpp.put(handle, packed)
    return True


def _cpp_onednn_rows(entries: int) -> int:
    """For a graph being traced: 0 if its products of a layer of ``entries`` weights call the Python
    op (the C++ op is off or does not build), else the number of rows from which the C++ op hands a
    product to it (oneDNN's, see _onednn_rows). Runs eagerly while tracing and is a constant of the
    graph: the settings (``INT8_CPP_OP``, ``ONEDNN_INT8_*``) apply to graphs traced after they change."""
    if not (INT8_CPP_OP and _load_cpp_op()):
        return 0
    onednn_rows = _onednn_rows(entries)
    return 1 << 62 if onednn_rows is None else onednn_rows


# What torch.compiler.assume_constant_result(_cpp_onednn_rows) does (torch 2.13: sets this attribute),
# without importing dynamo, and with it sympy (about 70 MB resident), when t5kit is imported.
_cpp_onednn_rows._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _forget(handle: int) -> None:
    """Drop layer ``handle``'s packed weights (fbgemm's and any oneDNN copies) when the layer goes."""
    _PACKED.pop(handle, None)
    for relu in (False, True):
        _PACKED_MANY.pop((handle, relu), None)
    if _CPP_READY:
        torch.ops.t5kit_cpp.drop(handle)


class DynamicInt8Linear(nn.Module):
    """A linear layer with int8 weights (per output channel) and per-call int8 activations.

    Build it with :meth:`from_linear`. Inputs of any leading shape, float32 (other float dtypes
    are computed in float32 and cast back).
    """

    def __init__(self, in_features: int, out_features: int, packed: torch.Tensor, reduce_range: bool) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self._packed = packed  # fbgemm's prepacked weight (and bias)
        self.reduce_range = reduce_range
        self.relu = False  # the product applies a ReLU to its output (set by replace_linears: a ReLU feed-forward's wi)
        self._register()

    def _register(self) -> None:
        self._handle = next(_HANDLES)  # the key of _PACKED a compiled graph uses
        _PACKED[self._handle] = self._packed
        if _CPP_READY:
            torch.ops.t5kit_cpp.put(self._handle, self._packed)
        weakref.finalize(self, _forget, self._handle)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._register()  # a copy (copy.deepcopy) gets a handle of its own, not the original's

    @classmethod
    def from_linear(
        cls, *layers: nn.Linear, release: Callable[[torch.Tensor], None] | None = None
    ) -> "DynamicInt8Linear":
        """Quantize ``layers``' weights symmetrically per output channel (scale = max |w| / 127),
        stacked along the outputs when several (one product for layers that read the same input:
        the per-channel scales, and the per-call activation scale of the shared input, are those
        of the separate layers, so the results are the same).

        The weight is read :data:`QUANTIZE_CHUNK_BYTES` of float32 rows at a time, and ``release``,
        if given, is called with each chunk of the source once quantized (see ``replace_linears``),
        so a large layer in a memory-mapped checkpoint never has to be resident whole."""
        if "fbgemm" not in torch.backends.quantized.supported_engines:
            raise RuntimeError("int8 quantization needs PyTorch's fbgemm engine (x86 CPUs); this build lacks it")
        weight, bias = stack_linears(layers)
        n, k = weight.shape
        values = torch.empty(n, k, dtype=torch.int8)
        scales = torch.empty(n, dtype=torch.float64)
        zero_points = torch.zeros(n, dtype=torch.long)
        rows = max(1, QUANTIZE_CHUNK_BYTES // (4 * k))
        with warnings.catch_warnings():
            # Quantized tensors are only the carrier fbgemm's prepack takes; nothing else sees them.
            warnings.simplefilter("ignore", UserWarning)
            try:
                for start in range(0, n, rows):
                    chunk = weight[start : start + rows].float().cpu()  # (rows, in)
                    scale = (chunk.abs().amax(dim=1) / 127).clamp(min=1e-12).double()
                    q = torch.quantize_per_channel(chunk, scale, zero_points[: len(chunk)], 0, torch.qint8)
                    values[start : start + rows] = q.int_repr()
                    scales[start : start + rows] = scale
                    if release is not None:
                        release(weight[start : start + rows])
                qweight = torch._make_per_channel_quantized_tensor(values, scales, zero_points, 0)
                packed = torch.ops.quantized.linear_prepack(qweight, None if bias is None else bias.float().cpu())
            except (AttributeError, RuntimeError) as err:
                raise RuntimeError(
                    f"this PyTorch ({torch.__version__}) cannot prepack int8 weights for fbgemm ({err}); "
                    "use bfloat16 instead, or the torch version t5kit is tested with (2.13)"
                ) from err
        return cls(layers[0].in_features, weight.shape[0], packed, reduce_range=not _has_vnni())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise ValueError("an int8-quantized model runs on the CPU only; quantize after moving back, or use bf16 on GPUs")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs with last dimension {self.in_features}, got shape {tuple(x.shape)}")
        refuse_training(self, "an int8-quantized model")
        flat = x.reshape(-1, self.in_features).float().contiguous()  # (rows, in)
        args = (flat, self._handle, self.out_features, self.reduce_range, self.relu)
        if torch.compiler.is_compiling():
            onednn_rows = _cpp_onednn_rows(self.in_features * self.out_features)
            out = torch.ops.t5kit_cpp.int8_linear(*args, onednn_rows) if onednn_rows else torch.ops.t5kit.int8_linear(*args)
        else:
            out = _int8_linear_op(*args)  # (rows, out)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 dynamic{', ReLU' if self.relu else ''}"


def quantize_dynamic(model: nn.Module, keep_memory: bool = True) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place) by a :class:`DynamicInt8Linear`.

    The model must be on the CPU in float32 (or bfloat16, computed in float32). Returns the model,
    in eval mode, for inference only: ``save_pretrained`` and training refuse it with a clear error.
    ``keep_memory``: see :func:`t5kit.packing.keep_freed_memory` (process-wide allocator tuning).

    Example::

        model = T5ForConditionalGeneration.from_pretrained("t5-small")
        model = quantize_dynamic(model)
        model.generate(**inputs)
    """
    return replace_linears(model, DynamicInt8Linear.from_linear, "int8-dynamic", keep_memory=keep_memory)
