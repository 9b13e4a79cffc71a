"""How close batch-1 decoding is to the weight-streaming floor.

    python benchmarks/bench_ceiling.py [--shape t5-small] [--new-tokens 64]

A batch-1 decoder step must read every weight it multiplies by once: the decoder's self-attention
q/k/v/o, cross-attention q/o (the cross keys/values are computed once per input, not per step),
the feed-forward matrices and the output projection. Weights do not fit in the caches, so the
floor is (those bytes) / (the memory bandwidth this machine achieves reading a large buffer with
the threads torch uses). Prints the floor, t5kit's measured step time per mode (fp32 with plain
and prepacked weights, bf16 prepacked, int8; each but the first also with the compiled static
step) and the ratio. The step time is greedy generation
time / new tokens, so it includes the sampling loop and the one-off encoder and cross
keys/values (a few percent at 64 tokens).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import SHAPES, _median_time  # noqa: E402


def bandwidth_gbs(mb: int = 1024, rounds: int = 5) -> float:
    """Read bandwidth: sum over a buffer far larger than the caches, best of ``rounds``."""
    buf = torch.ones(mb * 2**20 // 4)
    buf.sum()
    best = min(_timed(buf.sum) for _ in range(rounds))
    return buf.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def step_weight_bytes(model: torch.nn.Module, bytes_per_weight: float) -> float:
    """Bytes of the weights one decoder step multiplies by (cross keys/values excluded)."""
    count = 0
    for name, module in model.named_modules():
        if not name.startswith(("decoder.", "lm_head")) or ".EncDecAttention.k" in name or ".EncDecAttention.v" in name:
            continue
        if hasattr(module, "in_features"):
            count += module.in_features * module.out_features
    return count * bytes_per_weight


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="t5-small")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import t5kit

    shape = dict(SHAPES[args.shape])
    family = shape.pop("family")
    torch.manual_seed(0)
    config = getattr(t5kit, f"{family}Config")(**shape, dropout_rate=0.0, decoder_start_token_id=0)
    work = tempfile.mkdtemp(prefix="t5kit-ceiling-")
    getattr(t5kit, f"{family}ForConditionalGeneration")(config).save_pretrained(work)
    bw = bandwidth_gbs()
    print(f"{args.shape} shape; {torch.get_num_threads()} threads; read bandwidth {bw:.1f} GB/s; "
          f"batch 1, 64-token input, {args.new_tokens} new tokens, median of {args.rounds}")
    ids = torch.randint(2, 32000, (1, 64), generator=torch.Generator().manual_seed(1))
    modes = (("fp32 unpacked", 4), ("fp32", 4), ("fp32 static", 4), ("bf16", 2), ("bf16 static", 2), ("int8", 1),
             ("int8 static", 1))
    for mode, width in modes:
        if mode.startswith("bf16") and not t5kit.packing.can_prepack(torch.bfloat16):
            print(f"  {mode:13s}: skipped, this CPU has no bfloat16 instructions for oneDNN")
            continue
        model = t5kit.AutoModelForSeq2SeqLM.from_pretrained(work)
        if mode.startswith("bf16"):
            model = model.to(torch.bfloat16)
        if mode.startswith("int8"):
            model = t5kit.quantize_dynamic(model)
        elif mode != "fp32 unpacked":
            model = t5kit.prepack(model)
        nbytes = step_weight_bytes(model, width)
        floor_ms = nbytes / (bw * 1e9) * 1e3
        cache = "static" if mode.endswith("static") else None
        with torch.inference_mode():
            t, _ = _median_time(lambda: model.generate(input_ids=ids, max_new_tokens=args.new_tokens, eos_token_id=None,
                                                       cache_implementation=cache), args.rounds)
        step_ms = t / args.new_tokens * 1e3
        print(f"  {mode:13s}: {nbytes / 1e6:6.1f} MB of weights per step, floor {floor_ms:5.2f} ms, measured {step_ms:5.2f} ms "
              f"per token = {step_ms / floor_ms:.2f}x the floor")


if __name__ == "__main__":
    main()
