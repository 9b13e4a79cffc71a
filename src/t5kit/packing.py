"""Prepacked oneDNN weights for fast CPU inference in float32 or bfloat16.

oneDNN computes a matrix product fastest from a weight stored in its own blocked layout. Given an
ordinary (out, in) weight it reorders it on every call, which on the CPU of our benchmarks makes
products of a few rows 1.5-2.5x slower than from a prepacked weight (t5-small's 512 -> 32128
output projection at 16 rows: 3.8 -> 1.9 ms; 4 rows: 2.5 -> 1.0 ms), 1.3x at 128 rows and 5-10%
at thousands. Decoding (a few rows per step), beam search and short encoder inputs gain the most.

``prepack(model)`` replaces every linear layer by a :class:`PackedLinear` holding its weight in
that layout (projections that read the same input, such as self-attention's q, k and v, become
one wider product); the ordinary weight is released, so memory does not grow (except for a tied
output projection, whose packed copy sits beside the input embedding that still needs the plain
matrix). Values equal the unpacked model's to float32 rounding, so fp32 tokens are unchanged.
Where MKL is the faster for many rows (CPUs without AVX-512), a layer given many rows reads its
weight back out of the packed layout for that call (see :data:`UNPACK_MIN_ROWS`).

A prepacked model is for inference: it cannot be trained, saved or moved to another device or
dtype (prepack after ``model.to(torch.bfloat16)``, and save the model you loaded instead).
"""

from __future__ import annotations

import ctypes
import gc
from functools import lru_cache
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ._files import MADV_DONTNEED, MappedPages, advise_pages
from .modeling import _blocked_linear, _dnn_linear, blocked_gemm_width, blocked_linear_lowered

__all__ = [
    "BlockedLinear", "PackedLinear", "can_prepack", "keep_freed_memory", "prepack", "refuse_training", "release_freed_memory",
    "replace_linears", "stack_linears",
]


def stack_linears(layers: tuple[nn.Linear, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weights (sum of outs, in) and biases (or None) of layers that read the same input, as
    one layer's (a single layer's own tensors, detached)."""
    if len(layers) == 1:
        bias = layers[0].bias
        return layers[0].weight.detach(), None if bias is None else bias.detach().clone()
    weight = torch.cat([layer.weight.detach() for layer in layers])
    if all(layer.bias is None for layer in layers):
        return weight, None
    return weight, torch.cat([
        layer.bias.detach() if layer.bias is not None else weight.new_zeros(layer.out_features) for layer in layers
    ])


# A layer larger than twice this is packed (and later blocked, see BlockedLinear.from_packed) in
# pieces of about this size along the outputs, each copied into its place in the one packed tensor
# and its source pages handed back before the next (see replace_linears). oneDNN's reorder of a
# whole layer holds the source and the packed copy together, which for an mT5/umT5 output
# projection read from a memory-mapped checkpoint is 512 MB more peak memory; keeping the pieces as
# separate tensors instead costs eager products (paired on an AMD Zen 4, mT5's 512 -> 250112 in four
# pieces: 1.05x the time at 1 row, 1.20x at 64). oneDNN's layout stores whole blocks of outputs one
# after another, so packed pieces of whole blocks laid end to end are the whole layer's packed
# bytes; _assembles checks that on this CPU before it is relied on.
ASSEMBLE_PIECE_BYTES: int = 16 << 20
# Outputs per piece: a multiple of every block width (oneDNN's 64; inductor's 24 or 48), and not
# 192: on AVX2 (a 2-core AMD Zen 3) oneDNN packs a layer of 129-192 outputs in blocks of 16 where
# every other size tried (16 to 32128) gets blocks of 64, so pieces of 192 never assembled there.
_PIECE_ALIGN = 384


def _packed_bytes(packed: torch.Tensor) -> bytes:
    """The bytes of a oneDNN tensor (its layout's storage, padding included)."""
    return ctypes.string_at(torch.ops.mkldnn.data_ptr(packed), torch.ops.mkldnn._nbytes(packed))


@lru_cache(maxsize=None)
def _assembles(dtype: torch.dtype, in_features: int, last: int) -> bool:
    """Whether, on this CPU, float ``dtype`` layers of ``in_features`` inputs packed in pieces of whole
    _PIECE_ALIGN-output groups, the last of ``last`` outputs, give the whole layer's packed bytes laid
    end to end. Checked on a small random layer (pieces of _PIECE_ALIGN, _PIECE_ALIGN and ``last``
    outputs: oneDNN picks another layout for a single output, and on AVX2 for 129-192, so the last
    piece's size is part of the question); False where this torch cannot say (no
    ``torch.ops.mkldnn.data_ptr``)."""
    reorder = torch.ops.mkldnn._reorder_linear_weight
    try:
        weight = torch.randn(2 * _PIECE_ALIGN + last, in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
        ends = [0, _PIECE_ALIGN, 2 * _PIECE_ALIGN, len(weight)]
        parts = [_packed_bytes(reorder(weight[a:b], None)) for a, b in zip(ends, ends[1:])]
        return _packed_bytes(reorder(weight, None)) == b"".join(parts)
    except (AttributeError, RuntimeError):
        return False


def _tiles(
    whole: torch.Tensor, rows: int, make: Callable[[slice], torch.Tensor]
) -> Iterator[tuple[slice, torch.Tensor, int]]:
    """For each piece of ``rows`` outputs of the packed (n, k) ``whole`` in turn: the outputs (a
    slice), ``make(outputs)``, a packed tensor of them, and the address of its bytes inside
    ``whole``. Raises RuntimeError unless the pieces' bytes tile ``whole``'s exactly (see
    :func:`_assembles`). The one loop of assembling (:func:`_pack_assembled`) and carving
    (:func:`_carve`), which copy the bytes in opposite directions."""
    mkldnn = torch.ops.mkldnn
    base, size, offset = mkldnn.data_ptr(whole), mkldnn._nbytes(whole), 0
    for start in range(0, whole.shape[0], rows):
        outputs = slice(start, min(start + rows, whole.shape[0]))
        piece = make(outputs)
        nbytes = mkldnn._nbytes(piece)
        if offset + nbytes > size:
            raise RuntimeError(f"packed pieces overrun the packed layer ({offset} + {nbytes} > {size} bytes)")
        yield outputs, piece, base + offset
        del piece  # the caller has dropped its own: gone before the next piece is made
        offset += nbytes
    if offset != size:
        raise RuntimeError(f"packed pieces cover {offset} of the packed layer's {size} bytes")


def _pack_assembled(weight: torch.Tensor, rows: int, release: Callable[[torch.Tensor], None] | None) -> torch.Tensor:
    """``weight`` (n, k) in oneDNN's layout, packed ``rows`` outputs at a time (a multiple of
    _PIECE_ALIGN) into one tensor; ``release(part)`` after each part is packed. Only where
    :func:`_assembles` holds for these pieces."""
    mkldnn = torch.ops.mkldnn
    # The whole layout from a source that is never written: its pages stay unmapped (reading them
    # maps the kernel's zero page), so only the packed tensor's own pages become resident.
    whole = mkldnn._reorder_linear_weight(torch.empty_like(weight), None)
    pack = lambda outputs: mkldnn._reorder_linear_weight(weight[outputs], None)  # noqa: E731
    for outputs, piece, address in _tiles(whole, rows, pack):
        ctypes.memmove(address, mkldnn.data_ptr(piece), mkldnn._nbytes(piece))
        del piece
        if release is not None:
            release(weight[outputs])
    return whole


def _piece_rows(packed: torch.Tensor) -> int | None:
    """Outputs per piece when ``packed`` (n, k) is assembled from or carved into pieces (see
    :data:`ASSEMBLE_PIECE_BYTES`), or None where it goes whole: small, or its layout does not
    assemble on this CPU."""
    n, k = packed.shape
    size = packed.element_size()
    if n * k * size <= 2 * ASSEMBLE_PIECE_BYTES:
        return None
    rows = max(_PIECE_ALIGN, ASSEMBLE_PIECE_BYTES // (size * k) // _PIECE_ALIGN * _PIECE_ALIGN)
    return rows if _assembles(packed.dtype, k, n % rows or rows) else None


def _carve(packed: torch.Tensor, rows: int) -> Iterator[torch.Tensor]:
    """The pieces of ``rows`` outputs of the packed (n, k) ``packed``, each a packed tensor of its
    own, copied out one at a time; once the caller has taken a piece (the next is asked for), its
    bytes in ``packed`` are handed back to the kernel (MADV_DONTNEED: they read as zeros after), so
    carving a layer holds about one piece twice, not the layer. ``packed`` is spent by then: the
    caller must stop using it (see ``PackedLinear._consumed``). Only where :func:`_piece_rows` says."""
    mkldnn = torch.ops.mkldnn
    k = packed.shape[1]
    empty = lambda outputs: mkldnn._reorder_linear_weight(  # noqa: E731 - the layout of these outputs, bytes to come
        torch.empty(outputs.stop - outputs.start, k, dtype=packed.dtype), None
    )
    for _, piece, address in _tiles(packed, rows, empty):
        nbytes = mkldnn._nbytes(piece)
        ctypes.memmove(mkldnn.data_ptr(piece), address, nbytes)
        yield piece
        del piece
        advise_pages(address, nbytes, MADV_DONTNEED)  # whole pages inside: the piece's bytes


# Where MKL computes float32 products of many rows faster than oneDNN does from a packed weight (CPUs
# without AVX-512: see t5kit.modeling.ONEDNN_MAX_ROWS), a packed layer given at least this many rows
# reads its weight back out of oneDNN's layout (``to_dense``: about 0.2 ms for 4 MB, freed after the
# call) and multiplies through ``F.linear``. On a 2-core AMD Zen 3 MKL's products of 2,048 rows ran
# 1.1-1.25x faster than oneDNN's from the packed weight (2048 x 2048 -> 512: 188 against 158 GFLOP/s),
# 1.0-1.2x at 512 rows (whole encoders level there, with the read-back), and up to 15% slower at 128
# (512 -> 1024: 144 against 170), so short inputs keep the packed product. Whole encoders at 16 x 128
# tokens: t5-small 1.09x, t5-base 1.12x faster.
# None: always the packed product (on AVX-512 oneDNN is the faster at every row count).
UNPACK_MIN_ROWS: int | None = None if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 512
# Only layers up to this size are read back: a larger weight's transient dense copy costs more
# (page faults: t5-small's 65 MB output projection took 25 ms) and adds to peak memory.
UNPACK_MAX_BYTES: int = 32 << 20


class PackedLinear(nn.Module):
    """A CPU linear layer whose weight (float32 or bfloat16) is stored in oneDNN's blocked layout.

    Build it with :meth:`from_linear`. Inputs of any leading shape and the weight's dtype.
    """

    def __init__(self, in_features: int, out_features: int, packed: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        # Parameters (frozen) rather than plain tensor attributes: torch.compile checks plain tensor
        # attributes for aliasing on every call of a compiled step (~150 us a step for t5-small),
        # parameters not. They stay out of the state dict (_save_to_state_dict below).
        self._packed = nn.Parameter(packed, requires_grad=False)  # opaque oneDNN layout, (out, in)
        self._bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.dtype = packed.dtype
        self._consumed = False  # set when BlockedLinear.from_packed has carved it up (see _carve)
        self.relu = False  # the product applies a ReLU to its output (set by replace_linears: _fuse_relu)

    @classmethod
    def from_linear(cls, *layers: nn.Linear, release: Callable[[torch.Tensor], None] | None = None) -> "PackedLinear":
        """Pack ``layers``' weights (CPU, float32 or bfloat16), stacked along the outputs when several
        (layers reading the same input become one wider product; split its output to use them).
        ``release``, if given, is called with each part of the source weight once it is packed (a
        large layer is packed in parts, see :data:`ASSEMBLE_PIECE_BYTES`), so
        :func:`replace_linears` can hand its pages in a memory-mapped checkpoint back before the
        next part is read."""
        weight, bias = stack_linears(layers)
        if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(
                f"prepack needs float32 or bfloat16 weights on the CPU, got {weight.dtype} on {weight.device}"
            )
        _check_onednn_dtype(weight.dtype)
        rows = _piece_rows(weight)
        if rows is not None:
            return cls(layers[0].in_features, len(weight), _pack_assembled(weight, rows, release), bias)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        if release is not None:
            release(weight)
        return cls(layers[0].in_features, len(weight), packed, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dtype != self.dtype:
            raise ValueError(
                f"this layer was prepacked for {self.dtype} on the CPU but got {x.dtype} on {x.device}; "
                "call prepack after moving the model to its final dtype"
            )
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs with last dimension {self.in_features}, got shape {tuple(x.shape)}")
        refuse_training(self, "a prepacked model")
        if x.numel() == 0:
            return x.new_empty(*x.shape[:-1], self.out_features)
        return self._product(x)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + bias`` from the stored weight (inputs already checked)."""
        if self._consumed:
            raise RuntimeError("this layer's weight was released when it was re-stored as a BlockedLinear; use that layer")
        if self._unpack_for(x):
            y = F.linear(x, self._packed.to_dense(), self._bias)
            return F.relu_(y) if self.relu else y
        return _dnn_linear(x, self._packed, self._bias, self.relu)

    def _unpack_for(self, x: torch.Tensor) -> bool:
        """Whether the product of ``x`` goes through ``F.linear`` on the weight read back out of the
        packed layout (see :data:`UNPACK_MIN_ROWS`); never in a compiled graph, which has its own."""
        return (
            UNPACK_MIN_ROWS is not None
            and self.dtype == torch.float32
            and x.numel() >= UNPACK_MIN_ROWS * self.in_features
            and self._packed.numel() * 4 <= UNPACK_MAX_BYTES
            and not torch.compiler.is_compiling()
        )

    def check_move(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Raise ValueError unless ``fn`` (what ``.to()``/``.float()``/``.cpu()`` apply to every tensor)
        keeps this layer's dtype and device: the packed layout cannot be converted, and torch's own
        error from the opaque tensor would not say why. The models call this on every packed layer
        before moving anything, so a refused move leaves the model as it was."""
        probe = fn(torch.empty(0, dtype=self.dtype))
        if probe.dtype != self.dtype or probe.device.type != "cpu":
            raise ValueError(
                f"this layer was prepacked for {self.dtype} on the CPU and cannot be moved to {probe.dtype} on "
                f"{probe.device}; call prepack after moving the model to its final dtype and device"
            )

    def _apply(self, fn: Any, recurse: bool = True) -> "PackedLinear":
        self.check_move(fn)  # then a no-op: the dtype and device stay
        return self

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        pass  # the packed layout is not a checkpoint format (save the model you loaded)

    def extra_repr(self) -> str:
        consumed = " (consumed)" if self._consumed else ""
        relu = ", ReLU" if self.relu else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.dtype}, prepacked{relu}{consumed}"


class BlockedLinear(PackedLinear):
    """A float32 CPU linear layer whose weight is blocked for inductor's CPU matrix-product template.

    The weight W (out, in) is stored as (blocks, in, width): ``weight[j, k, c] = W[j * width + c, k]``,
    zero-padded to a whole number of blocks (``width`` from :func:`t5kit.modeling.blocked_gemm_width`).
    In a compiled graph each block of outputs is then one contiguous stream of the weight, and
    inductor's generated kernel reads it as stored. Eager, the product is a batched product over the
    blocks: as fast as oneDNN for a few rows, slower for many (25-50% at 16-64 rows).

    Made by :func:`block_decoding_step` from the prepacked layers of a decoding step; see there.
    """

    @classmethod
    def from_packed(cls, layer: PackedLinear, width: int) -> "BlockedLinear":
        """``layer``'s weight, read back out of oneDNN's layout and blocked ``width`` wide.

        A large layer (see :data:`ASSEMBLE_PIECE_BYTES`) is read a piece at a time, each piece's
        bytes handed back once it is blocked, so memory grows by about one piece, not one layer; the
        layer is consumed (it refuses to run after). A small one stays as it is."""
        if layer.dtype != torch.float32:
            raise ValueError(f"only float32 layers are blocked, got {layer.dtype}")
        if layer._consumed:
            raise ValueError(f"cannot block this layer {width} wide: it was consumed by an earlier blocking")
        n, k = layer.out_features, layer.in_features
        rows = _piece_rows(layer._packed)
        if rows is not None and rows % width:
            raise ValueError(f"cannot block this layer {width} wide: pieces of {rows} outputs")
        blocked = torch.empty(-(-n // width), k, width)  # (blocks, in, width); pages fill as it is written
        eye = torch.eye(k)
        if rows is None:
            pieces: Iterator[torch.Tensor] = iter([layer._packed])
        else:
            layer._consumed = True  # before its bytes go: from here on it refuses to run
            pieces = _carve(layer._packed, rows)
        first = 0  # the first block of the current piece
        for piece in pieces:
            blocks = -(-piece.shape[0] // width)
            # W.T's rows are the products of identity rows with the packed weight (exact in float32:
            # every sum is one weight plus zeros), taken a few MB at a time, so the conversion never
            # holds a whole piece twice (as reading it back with to_dense() would).
            step = max(1, (8 << 20) // (4 * blocks * width))
            for start in range(0, k, step):
                chunk = _dnn_linear(eye[start : start + step], piece, None)  # (step, outs) = W.T[start : start + step]
                chunk = _pad_columns(chunk, blocks * width)
                blocked[first : first + blocks, start : start + step] = chunk.view(-1, blocks, width).transpose(0, 1)
            first += blocks
            del piece
        if layer._consumed:  # its storage, all but a page or two handed back, goes too
            layer._packed = nn.Parameter(torch.empty(0), requires_grad=False)
        bias = None if layer._bias is None else layer._bias.detach().clone()
        blocked_layer = cls(k, n, blocked, bias)
        blocked_layer.relu = layer.relu
        return blocked_layer

    def _product(self, x: torch.Tensor) -> torch.Tensor:  # PackedLinear.forward checks the inputs
        y = _blocked_linear(x, self._packed, self._bias, self.out_features)
        return F.relu(y) if self.relu else y  # compiled: fused into the product's output loop

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, {self.dtype}, "
            f"blocked {self._packed.shape[-1]} wide{', ReLU' if self.relu else ''}"
        )


def _pad_columns(x: torch.Tensor, columns: int) -> torch.Tensor:
    """``x`` (rows, n) with zero columns appended up to ``columns``."""
    return x if x.shape[1] == columns else torch.nn.functional.pad(x, (0, columns - x.shape[1]))


# Whether a compiled decoding step (cache_implementation="static") reads the step's prepacked float32
# weights blocked for inductor's template (block_decoding_step) instead of from oneDNN's layout.
# The blocked layers' eager products are slower, so it is a trade between the static step and any
# eager decoding the same model does later. On by default on CPUs without AVX-512 (AMD Zen 3: the
# step's products about 1.3x faster at one row, 1.1x at 16; eager products as fast at a few rows,
# 25-50% slower at 16+). Off by default on AVX-512 CPUs (AMD Zen 4, paired static generations 1.02-1.19x
# faster, but eager generations afterwards 0.62-0.69x as fast). `t5kit run/batch
# --cache-implementation static`, whose model only ever decodes static, sets it everywhere.
BLOCK_DECODING_STEP: bool = not torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def block_decoding_step(model: nn.Module) -> bool:
    """Re-store the prepacked float32 layers that one decoding step reads as :class:`BlockedLinear`,
    in place; returns whether it did (or had done). ``generate(cache_implementation="static")``
    calls this before it compiles the step of a prepacked model, where :data:`BLOCK_DECODING_STEP`
    is set and the lowering is available (:func:`t5kit.modeling.blocked_gemm_width`).

    The step's layers are the decoder's projections and the output projection, but not
    cross-attention's keys/values, which are computed once per generation from the encoder output
    (many rows: oneDNN's product is faster there). Values equal the prepacked model's to float32
    rounding. Eager products of 16 or more rows on these layers become 25-50% slower (see
    :class:`BlockedLinear`), so a model that decodes eagerly is best left prepacked only."""
    decoder = getattr(model, "decoder", None)
    if decoder is None or getattr(model, "inference_only", None) != "prepacked" or not blocked_linear_lowered():
        return False
    width = blocked_gemm_width()
    assert width is not None  # the lowering is registered only with a width
    targets: list[tuple[nn.Module, str]] = []
    for owner in [*decoder.modules(), model]:
        for name, child in owner.named_children():
            if type(child) is PackedLinear and child.dtype == torch.float32 and name != "kv":
                if owner is not model or child is model.get_output_embeddings():
                    targets.append((owner, name))
    # Largest first (the output projection while little else has been re-stored), and the freed
    # oneDNN copy handed back after each layer: otherwise glibc keeps the freed copies resident and
    # the blocked ones grow the heap (t5-base: peak 1417 -> 1359 MB while blocking; 110 MB less after).
    targets.sort(key=lambda t: -getattr(*t).out_features * getattr(*t).in_features)
    for owner, name in targets:
        setattr(owner, name, BlockedLinear.from_packed(getattr(owner, name), width))
        _trim_heap()
    return any(isinstance(m, BlockedLinear) for m in decoder.modules())


def keep_freed_memory(all_sizes: bool = False) -> bool:
    """Ask glibc to keep freed memory for reuse (process-wide): returns whether it applied.

    PyTorch has no caching allocator on the CPU: every activation is malloc'ed and freed per call.
    glibc serves large blocks with fresh memory maps (or trims its heap) and gives them back on
    free, so each call page-faults its activations in anew, which costs a quarter of an mT5
    encoder's time at 16 x 128 tokens on our benchmark machine. Blocks up to 32 MB from the heap
    and no trimming make freed memory reusable, as ONNX Runtime's arena does; the process keeps its
    peak working set instead of returning it. No-op where glibc's ``mallopt`` is absent.

    ``all_sizes`` also serves blocks over 32 MB (glibc's largest mmap threshold) from the heap, for
    training loops: a t5-small step (batch 8, 128 -> 64 tokens) allocates and zero-fills several
    65 MB blocks (the vocabulary-wide logits, their gradient, the embedding's gradient), and
    page-faulting them in took 0.36-0.8 s of a 2.8-3.4 s step on a 2-core AMD Zen 3: steps were
    13-24% faster with it in three paired runs, the process's peak 130-200 MB higher.
    """
    mallopt = _libc("mallopt")
    if mallopt is None:
        return False
    m_trim_threshold, m_mmap_threshold, m_mmap_max = -1, -3, -4
    applied = bool(mallopt(m_mmap_threshold, 32 * 2**20)) and bool(mallopt(m_trim_threshold, 2**31 - 1))
    return applied and (not all_sizes or bool(mallopt(m_mmap_max, 0)))


def release_freed_memory() -> bool:
    """Collect Python's garbage and hand glibc's free pages back to the kernel: returns whether it
    trimmed.

    For after a one-off burst of allocations, such as a ``torch.compile`` of the decoding step
    (tens of MB of graphs, sympy expressions and generated code, freed when it ends): with
    :func:`keep_freed_memory` in force glibc would keep all of it resident for good, and even
    without it, free pages inside the heap stay resident. ``malloc_trim`` releases every whole free
    page; memory in use is untouched. A few milliseconds; no-op where glibc is absent.
    """
    gc.collect()
    return _trim_heap()


def _trim_heap() -> bool:
    """glibc's ``malloc_trim(0)``: hand every whole free page of the heap back to the kernel."""
    malloc_trim = _libc("malloc_trim")
    return malloc_trim is not None and bool(malloc_trim(0))


@lru_cache(maxsize=None)
def _libc(name: str) -> Callable[..., int] | None:
    """The C library's function ``name``, looked up once; None where it has none (not glibc)."""
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


def refuse_training(layer: nn.Module, what: str) -> None:
    """Raise if ``layer`` is asked to train: converted layers have no gradients."""
    if layer.training and torch.is_grad_enabled():
        raise RuntimeError(f"{what} is for inference only (it has no gradients); train the model you loaded")


def replace_linears(
    model: nn.Module, make: Callable[..., nn.Module], what: str, keep_memory: bool = True
) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` in place by ``make(layer)``; mark it inference-only.

    Shared by :func:`prepack` and ``quantize_dynamic``. Projections that read the same input become
    one layer, ``make(*layers, release=...)`` (see :func:`_conversion_groups`). Each layer is
    converted and released before the next, and its pages in a memory-mapped checkpoint are handed
    back: ``make`` calls ``release(part)`` on each part of the source weight once converted, so a
    layer converted in parts (an int8 layer, a large packed layer: see :data:`ASSEMBLE_PIECE_BYTES`)
    gives its pages back part by part. Peak memory grows by about one converted layer plus one part
    of its source. The model's remaining parameters stop requiring gradients (so a plain
    ``model(**inputs)`` runs without ``torch.no_grad()``) and ``model.inference_only`` names the
    conversion, which ``save_pretrained`` refuses. With ``keep_memory``, :func:`keep_freed_memory`
    tunes the process's allocator for inference.
    """
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError(f"only CPU models can be converted ({what}); call model.to('cpu') first")
    groups = _conversion_groups(model)
    if not groups:
        raise ValueError(f"the model has no linear layers left to convert (already {getattr(model, 'inference_only', 'converted')}?)")
    pages = MappedPages()
    # Largest first: converting briefly holds a weight twice (the source and the converted copy),
    # so the output projection (an mT5 head is 512 MB) goes while little else has been converted.
    for owner, attr, names in sorted(groups, key=lambda g: -_group_size(g)):
        layers = [getattr(owner, name) for name in names]
        converted = make(*layers, release=pages.release)  # a large layer's pages go back part by part
        for name in names:
            if name != attr:
                delattr(owner, name)
        setattr(owner, attr, converted)
        pages.release(*(layer.weight for layer in layers))
    # The remaining tensors (embeddings, norms, position tables) stay where they are: in a
    # memory-mapped checkpoint only their pages that are read become resident (an mT5 input
    # embedding is 512 MB, of which a batch reads a few rows), and without readahead for the embeddings.
    pages.read_randomly(*(m.weight for m in model.modules() if isinstance(m, nn.Embedding)))
    _fuse_relu(model)
    model.eval()
    model.requires_grad_(False)
    model.inference_only = what
    if keep_memory:
        keep_freed_memory()
    return model


def can_prepack(dtype: torch.dtype) -> bool:
    """Whether :func:`prepack` can pack ``dtype`` weights on this CPU: float32 wherever PyTorch has
    oneDNN, bfloat16 only on CPUs with bfloat16 instructions (AVX-512 or AMX)."""
    from .modeling import ONEDNN_DTYPES

    return dtype in ONEDNN_DTYPES


def _check_onednn_dtype(dtype: torch.dtype) -> None:
    """Raise unless oneDNN can run ``dtype`` products here (see :func:`can_prepack`), saying why."""
    if not torch.backends.mkldnn.is_available():
        raise RuntimeError("prepack needs PyTorch's oneDNN (mkldnn) backend, which this build lacks")
    if not can_prepack(dtype):
        raise ValueError(
            f"this CPU cannot run oneDNN's {dtype} products (it has {torch.backends.cpu.get_cpu_capability()}; "
            "bfloat16 needs AVX-512 or AMX), so there is nothing to prepack for: leave the model unpacked "
            "(its products then run through F.linear) or prepack it in float32"
        )


def prepack(model: nn.Module, keep_memory: bool = True) -> nn.Module:
    """Store every linear layer's weight of ``model`` (in place) in oneDNN's blocked layout.

    The model must be on the CPU in float32 or bfloat16 (convert first: ``model.to(torch.bfloat16)``
    then ``prepack``; bfloat16 needs a CPU with bfloat16 instructions, see :func:`can_prepack`).
    Returns the model in eval mode, for inference only: ``save_pretrained`` and training refuse it
    with a clear error. Logits equal the unpacked model's to float32 rounding.
    ``keep_memory`` (default) also calls :func:`keep_freed_memory`, which changes how this whole
    process returns memory to the kernel; pass False to leave the allocator alone.

    Example::

        model = T5ForConditionalGeneration.from_pretrained("t5-small")
        model = prepack(model)
        model.generate(**inputs)
    """
    # Checked for every layer before any is converted, so a bad dtype never leaves a half-packed model.
    for name, layer in model.named_modules():
        if not isinstance(layer, nn.Linear):
            continue
        if layer.weight.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"prepack needs float32 or bfloat16 weights, but {name} is {layer.weight.dtype}")
        _check_onednn_dtype(layer.weight.dtype)
    return replace_linears(model, PackedLinear.from_linear, "prepacked", keep_memory=keep_memory)


def _fuse_relu(model: nn.Module) -> None:
    """Have each ReLU feed-forward's converted ``wi`` (a layer with a ``relu`` switch) apply the ReLU
    itself, as its product writes the output: exact, and no second pass over the (..., d_ff)
    activations (t5-base's encoder: 3% faster prepacked at 16 x 128 tokens, int8 products of 128
    rows 1.2x faster with the ReLU)."""
    from .modeling import T5DenseActDense

    for module in model.modules():
        if isinstance(module, T5DenseActDense) and module.act is F.relu and hasattr(module.wi, "relu"):
            module.wi.relu = True
            module.act_in_wi = True


def _conversion_groups(model: nn.Module) -> list[tuple[nn.Module, str, list[str]]]:
    """Every linear layer of ``model`` as (owner, new attribute, [layer attributes]): the layers are
    converted together into ``owner.<new attribute>``.

    Projections that read the same input become one product: self-attention's q | k | v (into
    ``qkv``), cross-attention's k | v (``kv``) and the gated feed-forward's wi_0 | wi_1 (``wi_01``).
    One wider product instead of two or three saves a call (about 12 us each in oneDNN) per
    projection in every decoding step, and reads the input once. Every other layer is its own group.
    """
    from .modeling import T5DenseGatedActDense, T5LayerCrossAttention, T5LayerSelfAttention

    groups: list[tuple[nn.Module, str, list[str]]] = []
    taken: set[int] = set()  # ids of layers already in a group (a layer shared by two owners converts once)
    for module in model.modules():
        if isinstance(module, T5LayerSelfAttention):
            owner, attr, names = module.SelfAttention, "qkv", ["q", "k", "v"]
        elif isinstance(module, T5LayerCrossAttention):
            owner, attr, names = module.EncDecAttention, "kv", ["k", "v"]
        elif isinstance(module, T5DenseGatedActDense):
            owner, attr, names = module, "wi_01", ["wi_0", "wi_1"]
        else:
            continue
        if all(isinstance(getattr(owner, name, None), nn.Linear) for name in names):
            groups.append((owner, attr, names))
            taken.update(id(getattr(owner, name)) for name in names)
    for owner in model.modules():
        for name, child in owner.named_children():
            if isinstance(child, nn.Linear) and id(child) not in taken:
                groups.append((owner, name, [name]))
                taken.add(id(child))
    return groups


def _group_size(group: tuple[nn.Module, str, list[str]]) -> int:
    owner, _, names = group
    return sum(getattr(owner, name).weight.numel() for name in names)
