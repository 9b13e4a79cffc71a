"""A CPU attention kernel for compiled decoding steps: a few queries per (row, head) over cached keys.

A decoding step attends with one query per row (a few per row when beams share their encoder
keys). Written as the plain maths (``softmax(q @ k^T + bias) @ v``), inductor's generated C++
reduces every score and every output element in a single register dependency chain and divides
inside the weighted sum: on 2 AVX2 cores (AMD Zen 3) it read t5-small's cross-attention keys and
values at 9-11 GB/s even from the L3 cache, and at b16 attention took 6.2 ms of a 24 ms step.

``t5kit::attend`` is a custom op whose eager body is that plain maths. Compiled, t5kit lowers it to
a C++ template of its own (:func:`register_attend_lowering`): per (row, head) it streams the keys
once with four independent accumulators, adds the bias, takes the softmax (statistics in float32),
and streams the values once into ``D / vector width`` independent accumulators, dividing once at
the end. Keys whose bias is a mask (``<= -1e37``: t5kit's masks are ``finfo.min``) are skipped: a
masked key's score is its bias and its weight exactly 0 either way, so whatever its slot holds
(a static cache's unwritten positions) never reaches the output. It is generated into the step's
own C++ module with inductor's vector types (AVX2 or AVX-512 as inductor picked), called from the
C++ wrapper like any other kernel, and pointwise consumers inductor fuses into it run after it.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

__all__ = ["ATTEND_KERNEL", "ATTEND_MAX_QUERIES", "attend", "attend_kernel_applies", "register_attend_lowering"]

# Compiled decoding steps on the CPU compute their attention with t5kit's kernel (see the module
# docstring). False: the plain maths, which inductor generates itself. Read when a step is traced.
ATTEND_KERNEL: bool = True
# Up to this many queries per (row, head): decoding steps, beams sharing one row's encoder keys. The
# kernel re-reads a head's keys for every query, which suits few queries, not a whole sequence.
ATTEND_MAX_QUERIES = 32

_LOWERED = False  # t5kit::attend has its lowering (set by register_attend_lowering)


def _attend_maths(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    scores = torch.matmul(q, k.transpose(-1, -2))  # (B, H, T, K)
    if bias is not None:
        scores = scores + bias
    return torch.matmul(torch.softmax(scores, dim=-1), v)


@torch.library.custom_op("t5kit::attend", mutates_args=())
def _attend_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:  # noqa: UP045
    return _attend_maths(q, k, v, bias)


@_attend_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:  # noqa: UP045
    return q.new_empty(*q.shape[:-1], v.shape[-1])


def attend_kernel_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether a graph being compiled should compute this attention with ``t5kit::attend``: float32
    on the CPU, no gradient, few queries, a 4-D bias broadcastable over (B, H, T, K), and the
    lowering registered (without it the op would run its eager body)."""
    tensors = [q, k, v] if bias is None else [q, k, v, bias]
    return (
        ATTEND_KERNEL
        and _LOWERED
        and not torch.is_grad_enabled()
        and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.dim() == 4 for t in tensors)
        and q.shape[-2] <= ATTEND_MAX_QUERIES
        and k.shape[-2] > 0
        and q.shape[:2] == k.shape[:2] == v.shape[:2]
        and k.shape[-2] == v.shape[-2]
        and q.shape[-1] == k.shape[-1]
        and (bias is None or all(n in (1, full) for n, full in zip(bias.shape, (*q.shape[:-1], k.shape[-2]))))
    )


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``softmax(q @ k^T + bias) @ v`` as ``t5kit::attend`` (for graphs being compiled: see
    :func:`attend_kernel_applies`). q: (B, H, T, D); k, v: (B, H, K, D); bias: broadcastable to
    (B, H, T, K) or None. Returns (B, H, T, D)."""
    return torch.ops.t5kit.attend(q, k, v, bias)


# The kernel of one query: y = softmax(q . k_s + m_s) @ v over S keys. D is a compile-time constant
# (its tail past the last full vector is scalar); keys and values have row strides ks and vs floats,
# the bias stride ms (m null: no bias). sc holds the S scores. Guarded: with inductor's C++ wrapper
# every kernel of a graph lands in one source file.
_ROW_KERNEL = r"""
#ifndef T5KIT_ATTEND_ROW
#define T5KIT_ATTEND_ROW
namespace t5kit_attend {
using Vec = at::vec::Vectorized<float>;
constexpr int64_t VL = Vec::size();
// A bias at or below this is a mask (t5kit's are finfo.min): q . k cannot move the score off it,
// so its weight is exactly 0 whatever the key holds (and all-masked rows stay uniform).
constexpr float MASKED = -1e37f;
inline float hsum(Vec x) { return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, x); }

template <int64_t D>
inline void row(const float* __restrict__ q, const float* __restrict__ k, int64_t ks,
                const float* __restrict__ v, int64_t vs, const float* __restrict__ m, int64_t ms,
                int64_t S, float* __restrict__ sc, float* __restrict__ y) {
    constexpr int64_t ND = D / VL;  // full vectors per row; the rest (D % VL) is scalar
    constexpr int64_t NT = D - ND * VL;
    Vec qv[ND > 0 ? ND : 1];
    for (int64_t c = 0; c < ND; ++c) qv[c] = Vec::loadu(q + c * VL);
    auto dot_tail = [&](const float* kr) {
        float t = 0.f;
        for (int64_t d = ND * VL; d < D; ++d) t += q[d] * kr[d];
        return t;
    };
    auto masked = [&](int64_t s) { return m != nullptr && m[s * ms] <= MASKED; };
    int64_t s = 0;
    for (; s + 4 <= S; s += 4) {  // four keys at a time: four independent accumulator chains
        if (masked(s) && masked(s + 1) && masked(s + 2) && masked(s + 3)) {
            continue;  // their scores are their biases (below)
        }
        const float* k0 = k + s * ks;
        Vec a0(0.f), a1(0.f), a2(0.f), a3(0.f);
        for (int64_t c = 0; c < ND; ++c) {
            a0 = at::vec::fmadd(qv[c], Vec::loadu(k0 + c * VL), a0);
            a1 = at::vec::fmadd(qv[c], Vec::loadu(k0 + ks + c * VL), a1);
            a2 = at::vec::fmadd(qv[c], Vec::loadu(k0 + 2 * ks + c * VL), a2);
            a3 = at::vec::fmadd(qv[c], Vec::loadu(k0 + 3 * ks + c * VL), a3);
        }
        sc[s] = hsum(a0) + dot_tail(k0);
        sc[s + 1] = hsum(a1) + dot_tail(k0 + ks);
        sc[s + 2] = hsum(a2) + dot_tail(k0 + 2 * ks);
        sc[s + 3] = hsum(a3) + dot_tail(k0 + 3 * ks);
    }
    for (; s < S; ++s) {
        if (masked(s)) continue;
        Vec a0(0.f);
        for (int64_t c = 0; c < ND; ++c) a0 = at::vec::fmadd(qv[c], Vec::loadu(k + s * ks + c * VL), a0);
        sc[s] = hsum(a0) + dot_tail(k + s * ks);
    }
    if (m != nullptr) {
        for (s = 0; s < S; ++s) {
            const float b = m[s * ms];
            sc[s] = b <= MASKED ? b : sc[s] + b;  // a masked key's score is its bias, whatever the key holds
        }
    }
    // Softmax statistics in float32: the max, then exp(score - max) and its sum.
    float mx = -std::numeric_limits<float>::infinity();
    for (s = 0; s < S; ++s) mx = std::max(mx, sc[s]);
    const Vec mxv(mx);
    Vec sumv(0.f);
    for (s = 0; s + VL <= S; s += VL) {
        const Vec e = (Vec::loadu(sc + s) - mxv).exp();
        e.store(sc + s);
        sumv = sumv + e;
    }
    float sum = hsum(sumv);
    for (; s < S; ++s) { sc[s] = std::exp(sc[s] - mx); sum += sc[s]; }
    // y = sum_s w_s v_s, one independent accumulator per vector of the row; one division, at the end.
    Vec acc[ND > 0 ? ND : 1];
    float acc_tail[NT > 0 ? NT : 1];
    for (int64_t c = 0; c < ND; ++c) acc[c] = Vec(0.f);
    for (int64_t d = 0; d < NT; ++d) acc_tail[d] = 0.f;
    for (s = 0; s < S; ++s) {
        if (sc[s] == 0.f) continue;  // a masked (or underflowed) key adds exactly nothing
        const Vec w(sc[s]);
        const float* vr = v + s * vs;
        for (int64_t c = 0; c < ND; ++c) acc[c] = at::vec::fmadd(w, Vec::loadu(vr + c * VL), acc[c]);
        for (int64_t d = 0; d < NT; ++d) acc_tail[d] += sc[s] * vr[ND * VL + d];
    }
    const float inv = 1.f / sum;
    for (int64_t c = 0; c < ND; ++c) (acc[c] * Vec(inv)).store(y + c * VL);
    for (int64_t d = 0; d < NT; ++d) y[ND * VL + d] = acc_tail[d] * inv;
}
}  // namespace t5kit_attend
#endif
"""


def register_attend_lowering() -> bool:
    """Register inductor's lowering of ``t5kit::attend`` to t5kit's C++ template; returns whether it
    is registered. Once per process. Uses inductor internals (its C++ template classes); where they
    differ (another torch) nothing is registered and compiled steps keep the plain maths."""
    global _LOWERED
    if _LOWERED:
        return True
    try:
        import sympy
        import torch._inductor.lowering  # noqa: F401 - imports the codegen modules in an order that works
        from torch._inductor import ir
        from torch._inductor.codegen.cpp import get_export_declaration
        from torch._inductor.codegen.cpp_template import CppTemplate
        from torch._inductor.lowering import fallback_handler, register_lowering
        from torch._inductor.select_algorithm import autotune_select_algorithm
        from torch._inductor.utils import parallel_num_threads
        from torch._inductor.virtualized import V
    except ImportError:
        return False

    def strides(kernel: Any, node: Any) -> list[str]:
        # C expressions of the element strides, 0 along dimensions of size 1 (broadcast in the bias).
        return [
            "0" if V.graph.sizevars.statically_known_equals(n, 1) else kernel.stride(node, i)
            for i, n in enumerate(node.get_size())
        ]

    class AttendTemplate(CppTemplate):  # type: ignore[misc]
        def render(  # type: ignore[override]
            self,
            kernel: Any,
            template_buffer_node: Any = None,
            flag_template_buffer_has_other_users: Any = None,
            epilogue_nodes: list[Any] | None = None,
            **kwargs: Any,
        ) -> str:
            q, k, v, *rest = self.input_nodes
            m = rest[0] if rest else None
            y = template_buffer_node if template_buffer_node is not None else self.output_node
            inputs = {"Q": q, "K": k, "V": v, **({"M": m} if m is not None else {})}
            signature = kernel.def_kernel(inputs=inputs, outputs={"Y": y})  # sizes may be symbols (dynamic shapes)
            rows, heads, queries = (kernel.size(q, i) for i in range(3))
            keys, d = kernel.size(k, 2), int(q.get_size()[3])
            qs, ks, vs = strides(kernel, q), strides(kernel, k), strides(kernel, v)
            if m is not None:
                ms = strides(kernel, m)
                bias = f"M + r * {ms[0]} + h * {ms[1]} + t * {ms[2]}, {ms[3]}"
            else:
                bias = "nullptr, 0"
            # Pointwise consumers fused into this kernel by inductor: run over the output afterwards.
            epilogue = kernel.store_output(epilogue_nodes[-1], y, orig_src=y, epilogue_nodes=epilogue_nodes) if epilogue_nodes else ""
            return f"""{self.header().getvalue()}
{_ROW_KERNEL}
extern "C" {get_export_declaration()}
{signature}
{{
    {kernel.maybe_codegen_profile()}
    const int64_t rows = {rows}, heads = {heads}, queries = {queries}, keys = {keys};
    #pragma omp parallel num_threads({self.num_threads})
    {{
        std::unique_ptr<float[]> sc(new float[keys]);
        #pragma omp for
        for (int64_t i = 0; i < rows * heads; ++i) {{
            const int64_t r = i / heads, h = i % heads;
            for (int64_t t = 0; t < queries; ++t) {{
                t5kit_attend::row<{d}>(
                    Q + r * {qs[0]} + h * {qs[1]} + t * {qs[2]},
                    K + r * {ks[0]} + h * {ks[1]}, {ks[2]},
                    V + r * {vs[0]} + h * {vs[1]}, {vs[2]},
                    {bias}, keys, sc.get(),
                    Y + ((r * heads + h) * queries + t) * {d});
            }}
        }}
    }}
{epilogue}
}}
"""

    def realized(x: Any) -> Any:  # a buffer whose last dimension is contiguous
        x = ir.ExternKernel.realize_input(x)
        return x if V.graph.sizevars.statically_known_equals(x.get_stride()[-1], 1) else ir.ExternKernel.require_contiguous(x)

    def lower(q: Any, k: Any, v: Any, bias: Any = None) -> Any:
        if not isinstance(q.get_size()[-1], (int, sympy.Integer)):  # the kernel is generated per head width
            return fallback_handler(torch.ops.t5kit.attend.default, add_to_fallback_set=False)(q, k, v, bias)
        inputs = [realized(q), realized(k), realized(v)] + ([realized(bias)] if bias is not None else [])
        layout = ir.FixedLayout(q.get_device(), torch.float32, [*q.get_size()[:-1], v.get_size()[-1]])  # (B, H, T, D)
        choices: list[Any] = []
        AttendTemplate("t5kit_attend", inputs, layout, parallel_num_threads()).maybe_append_choice(choices)
        node, _ = autotune_select_algorithm("t5kit_attend", choices, inputs, layout)  # one choice: no tuning
        return node

    register_lowering(torch.ops.t5kit.attend.default, type_promotion_kind=None)(lower)
    _LOWERED = True
    return True
