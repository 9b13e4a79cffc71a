"""Matrix-product rates of the libraries behind each system, at an encoder's shapes.

    python benchmarks/bench_gemm.py [--shape t5-small] [--rows 128,512,2048] [--repeats 30]

For each product of one encoder layer (fused q|k|v, o, wi, wo; rows = batch x tokens) prints
GFLOP/s, best / median of ``--repeats``, of: MKL (``F.linear``, what torch does), oneDNN from a
prepacked weight (``t5kit.prepack``'s product), ONNX Runtime's MatMul (MLAS, what the ONNX Runtime
system runs; needs onnxruntime and onnx) and numpy's BLAS, each with torch's thread count, one
after the other in this process. It explains the encoder columns of the suite: the products are
about 85% of an encoder call, so the encoder's speed follows the faster library at its row count.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from bench_generate import SHAPES


def _rate(fn: Callable[[], object], flop: float, repeats: int) -> str:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return f"{flop / times[0] / 1e9:4.0f}/{flop / times[len(times) // 2] / 1e9:<4.0f}"


def _ort_matmul(weight_kn: np.ndarray, rows: int) -> Callable[[np.ndarray], object] | None:
    """A one-node ONNX Runtime session computing x @ weight_kn, or None without onnxruntime."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    k, n = weight_kn.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, n])],
        [numpy_helper.from_array(weight_kn, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    # As the suite's ONNX Runtime system: no spinning threads left to slow whatever runs next.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"x": x})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="t5-small", choices=sorted(SHAPES))
    parser.add_argument("--rows", default="128,512,2048")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    d_model, inner, d_ff = shape["d_model"], shape["num_heads"] * shape["d_kv"], shape["d_ff"]
    gated = shape.get("feed_forward_proj", "relu").startswith("gated")
    products = {"q|k|v": (d_model, 3 * inner), "o": (inner, d_model), "wi": (d_model, (2 if gated else 1) * d_ff),
                "wo": (d_ff, d_model)}
    torch.manual_seed(0)
    print(f"{args.shape} encoder products; {torch.get_num_threads()} threads; GFLOP/s, best/median of {args.repeats}")
    print(f"{'product':<28} {'MKL':>9} {'oneDNN packed':>14} {'ONNX Runtime':>13} {'numpy':>9}")
    with torch.inference_mode():
        for rows in (int(r) for r in args.rows.split(",")):
            for name, (k, n) in products.items():
                weight = torch.randn(n, k) / k**0.5
                packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
                x = torch.randn(rows, k)
                weight_kn = weight.T.contiguous().numpy()
                x_np = x.numpy()
                flop = 2.0 * rows * k * n
                ort = _ort_matmul(weight_kn, rows)
                cells = [
                    _rate(lambda: F.linear(x, weight), flop, args.repeats),
                    _rate(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""), flop, args.repeats),
                    _rate(lambda: ort(x_np), flop, args.repeats) if ort else "-",
                    _rate(lambda: x_np @ weight_kn, flop, args.repeats),
                ]
                print(f"{f'{rows} x {k} -> {n} ({name})':<28} {cells[0]:>9} {cells[1]:>14} {cells[2]:>13} {cells[3]:>9}")


if __name__ == "__main__":
    main()
