"""What a C++ int8 product op would gain in the compiled decoding step (an experiment, not t5kit's path).

    python benchmarks/bench_int8_cpp_op.py [--shape t5-base | --model DIR] [--batch 1] [--rounds 8]

t5kit's compiled int8 step calls ``t5kit::int8_linear``, whose kernel is Python: inductor's C++
wrapper calls back into Python, which looks the layer's packed fbgemm weight up and calls
``quantized::linear_dynamic`` from Python again. This script builds (``torch.utils.cpp_extension``,
about 40 s the first time, cached after) a C++ op that holds the same packed weights in a table and
calls the same fbgemm op through the dispatcher, so a compiled graph makes the product without
Python. Products that t5kit sends to fbgemm use it; those it sends to oneDNN keep t5kit's op. Both
variants run in this process on the same model, compiled once each, and alternate; prints ms/token
of each, the ratio, and whether the tokens are equal (same kernel, so they should be). Needs a C++ compiler, as the compiled step does.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from bench_generate import SHAPES, save_reference_checkpoint
from bench_suite import _inputs
from torch.utils.cpp_extension import load_inline

import t5kit
import t5kit.quantization as Q

_SOURCE = r"""
#include <torch/library.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
static std::vector<c10::IValue> table;  // packed weight by t5kit layer handle
void reg(int64_t handle, c10::IValue obj) {
  if ((int64_t)table.size() <= handle) table.resize(handle + 1);
  table[handle] = obj;
}
at::Tensor lin(const at::Tensor& x, int64_t handle, int64_t out_features, bool rr, bool relu) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("quantized::linear_dynamic", "");
  static auto op_relu = c10::Dispatcher::singleton().findSchemaOrThrow("quantized::linear_relu_dynamic", "");
  torch::jit::Stack stack{x, table.at(handle), rr};
  (relu ? op_relu : op).callBoxed(stack);
  return stack[0].toTensor();
}
TORCH_LIBRARY(t5kit_cpp_probe, m) {
  m.def("reg(int handle, Any obj) -> ()", reg);
  m.def("lin(Tensor x, int handle, int out_features, bool reduce_range, bool relu=False) -> Tensor");
}
TORCH_LIBRARY_IMPL(t5kit_cpp_probe, CPU, m) { m.impl("lin", lin); }
"""

_USE_CPP = [False]


def _forward(self: Q.DynamicInt8Linear, x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, self.in_features).float().contiguous()  # (rows, in)
    args = (flat, self._handle, self.out_features, self.reduce_range, self.relu)
    if not torch.compiler.is_compiling():
        out = Q._int8_linear_op(*args)
    elif (
        _USE_CPP[0]
        and Q._packed_for(self._handle, flat.shape[0], flat.shape[1] * self.out_features, self.relu)
        is Q._PACKED[self._handle]
    ):  # a product t5kit sends to fbgemm (decided while tracing: the rows are fixed per graph)
        out = torch.ops.t5kit_cpp_probe.lin(*args)
    else:
        out = torch.ops.t5kit.int8_linear(*args)
    return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="t5-base", choices=sorted(SHAPES))
    parser.add_argument(
        "--model", help="a checkpoint directory (default: random weights of --shape, built with transformers)"
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    start = time.perf_counter()
    load_inline("t5kit_cpp_probe", cpp_sources=_SOURCE, is_python_module=False)
    print(f"C++ op built or loaded in {time.perf_counter() - start:.1f} s")
    torch.library.register_fake("t5kit_cpp_probe::lin")(lambda x, h, o, rr, relu=False: x.new_empty(x.shape[0], o))
    Q.DynamicInt8Linear.forward = _forward  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            save_reference_checkpoint(args.shape, tmp)
        model = t5kit.quantize_dynamic(t5kit.AutoModelForSeq2SeqLM.from_pretrained(args.model or tmp))
    for handle, packed in Q._PACKED.items():
        torch.ops.t5kit_cpp_probe.reg(handle, packed)
    ids, mask = _inputs(args.batch, 64, args.batch)
    kw = {
        "input_ids": ids,
        "attention_mask": mask,
        "max_new_tokens": 64,
        "eos_token_id": None,
        "cache_implementation": "static",
    }
    times: dict[bool, list[float]] = {False: [], True: []}
    tokens = {}
    with torch.inference_mode():
        for cpp in (False, True):  # compiles each variant's step once
            _USE_CPP[0] = cpp
            tokens[cpp] = model.generate(**kw)
        for r in range(args.rounds):
            _USE_CPP[0] = cpp = r % 2 == 1
            start = time.perf_counter()
            model.generate(**kw)
            times[cpp].append((time.perf_counter() - start) / 64 * 1e3)
    print(
        f"{args.model or args.shape} int8 static greedy b{args.batch}, 64 new tokens, {torch.get_num_threads()} threads; ms/token"
    )
    for cpp, name in ((False, "t5kit::int8_linear (Python kernel)"), (True, "C++ op")):
        print(
            f"  {name:36s} {statistics.median(times[cpp]):6.2f}  ({', '.join(f'{t:.2f}' for t in sorted(times[cpp]))})"
        )
    print(
        f"  ratio {statistics.median(times[False]) / statistics.median(times[True]):.3f}x; tokens equal: {torch.equal(tokens[False], tokens[True])}"
    )


if __name__ == "__main__":
    main()
