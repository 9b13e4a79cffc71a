"""t5kit's compiled int8 decoding step with its C++ product op against the same step with the Python op.

    python benchmarks/bench_int8_cpp_op.py [--shape t5-base | --model DIR] [--batch 1] [--rounds 8]

A compiled int8 step makes fbgemm's products through ``t5kit_cpp::int8_linear`` (C++: the packed
weights in a C++ table, fbgemm's op called through the dispatcher) unless ``INT8_CPP_OP`` is off,
when it calls ``t5kit::int8_linear``, whose kernel is Python (see ``t5kit/quantization.py``). This
script quantizes the same checkpoint twice, has one copy's step traced with the C++ op and the other's
with the Python op, and alternates their generations in this process: prints ms/token of each, the
ratio, and whether the tokens are equal (same int8 weights, same kernel, so they must be).
The first run builds the C++ op (about 30-40 s, cached after).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from bench_generate import SHAPES, save_reference_checkpoint
from bench_suite import _inputs

import t5kit
import t5kit.quantization as Q


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
    if not Q._load_cpp_op():
        raise SystemExit("the C++ op did not build (see the warning above)")
    print(f"C++ op built or loaded in {time.perf_counter() - start:.1f} s")
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            save_reference_checkpoint(args.shape, tmp)
        models = {
            cpp: t5kit.quantize_dynamic(t5kit.AutoModelForSeq2SeqLM.from_pretrained(args.model or tmp))
            for cpp in (False, True)
        }
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
        for cpp in (False, True):  # traces each copy's step once, with the op it is to use
            Q.INT8_CPP_OP = cpp
            tokens[cpp] = models[cpp].generate(**kw)
        for r in range(args.rounds):
            cpp = r % 2 == 1
            start = time.perf_counter()
            models[cpp].generate(**kw)
            times[cpp].append((time.perf_counter() - start) / 64 * 1e3)
    print(
        f"{args.model or args.shape} int8 static greedy b{args.batch}, 64 new tokens, {torch.get_num_threads()} threads; ms/token"
    )
    for cpp, name in ((False, "t5kit::int8_linear (Python kernel)"), (True, "t5kit_cpp::int8_linear (C++)")):
        print(
            f"  {name:36s} {statistics.median(times[cpp]):6.2f}  ({', '.join(f'{t:.2f}' for t in sorted(times[cpp]))})"
        )
    print(
        f"  ratio {statistics.median(times[False]) / statistics.median(times[True]):.3f}x; tokens equal: {torch.equal(tokens[False], tokens[True])}"
    )


if __name__ == "__main__":
    main()
