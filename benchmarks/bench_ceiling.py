"""How close batch-1 decoding is to the weight-streaming floor.

    python benchmarks/bench_ceiling.py [--shape t5-small] [--new-tokens 64]

A batch-1 decoder step must read every weight it multiplies by once: the decoder's self-attention
q/k/v/o, cross-attention q/o (the cross keys/values are computed once per input, not per step),
the feed-forward matrices and the output projection. Weights do not fit in the caches, so the
floor is (those bytes) / (the memory bandwidth this machine achieves reading a large buffer with
the threads torch uses; read before every mode, the highest reading taken). Prints the floor and
t5kit's measured times per mode (fp32 with plain and prepacked weights, bf16 prepacked, int8; each
but the first also with the compiled static step, its layers blocked as ``t5kit run
--cache-implementation static`` does), each against it:

  per token  greedy generation time / new tokens: what a user waits per token, so it includes the
             one-off encoder, cross keys/values and first step (4-10% of it at 64 tokens)
  per step   the steps after the first alone: (time for N tokens - time for 1) / (N - 1), both
             generations with the same cache length (the short one stopped by a stopping
             criterion), so the compiled step's graph is the same
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

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
    parser.add_argument("--new-tokens", type=int, default=64, help="at least 2")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (the per-step time is the difference of 1 and N tokens)")
    import t5kit

    shape = dict(SHAPES[args.shape])
    family = shape.pop("family")
    torch.manual_seed(0)
    config = getattr(t5kit, f"{family}Config")(**shape, dropout_rate=0.0, decoder_start_token_id=0)
    work = tempfile.mkdtemp(prefix="t5kit-ceiling-")
    getattr(t5kit, f"{family}ForConditionalGeneration")(config).save_pretrained(work)
    # Other tenants share this machine's memory bandwidth, and a reading taken at one moment can be
    # 40% under the rest (51 against 80-86 GB/s a second later). The bandwidth is read before every
    # mode and the floor uses the highest reading: the floor is what the machine can do.
    readings = [bandwidth_gbs()]
    ids = torch.randint(2, 32000, (1, 64), generator=torch.Generator().manual_seed(1))
    default_blocking = t5kit.packing.BLOCK_DECODING_STEP
    modes = (("fp32 unpacked", 4), ("fp32", 4), ("fp32 static", 4), ("bf16", 2), ("bf16 static", 2), ("int8", 1),
             ("int8 static", 1))
    rows: list[tuple[str, float, float, float] | tuple[str, str]] = []
    for mode, width in tqdm(modes, desc=args.shape, leave=False):
        if mode.startswith("bf16") and not t5kit.packing.can_prepack(torch.bfloat16):
            rows.append((mode, "skipped, this CPU has no bfloat16 instructions for oneDNN"))
            continue
        # The static modes store their layers for the blocked step, as `t5kit run --cache-implementation
        # static` and the suite's -static workers do; the eager modes keep this CPU's default.
        t5kit.packing.BLOCK_DECODING_STEP = True if mode.endswith("static") else default_blocking
        model = t5kit.AutoModelForSeq2SeqLM.from_pretrained(work)
        if mode.startswith("bf16"):
            model = model.to(torch.bfloat16)
        if mode.startswith("int8"):
            model = t5kit.quantize_dynamic(model)
        elif mode != "fp32 unpacked":
            model = t5kit.prepack(model)
        kw = dict(input_ids=ids, max_new_tokens=args.new_tokens, eos_token_id=None,
                  cache_implementation="static" if mode.endswith("static") else None)
        readings.append(bandwidth_gbs())
        with torch.inference_mode():
            t, _ = _median_time(lambda: model.generate(**kw), args.rounds)
            t1, _ = _median_time(lambda: model.generate(**kw, stopping_criteria=[_after_one]), args.rounds)
        rows.append((mode, step_weight_bytes(model, width), t / args.new_tokens, (t - t1) / (args.new_tokens - 1)))
    bw = max(readings)
    print(f"{args.shape} shape; {torch.get_num_threads()} threads; read bandwidth {bw:.1f} GB/s (highest of "
          f"{len(readings)} readings, lowest {min(readings):.1f}); batch 1, 64-token input, {args.new_tokens} new tokens, "
          f"median of {args.rounds}")
    for row in rows:
        if len(row) == 2:
            print(f"  {row[0]:13s}: {row[1]}")
            continue
        mode, nbytes, token_s, step_s = row
        floor = nbytes / (bw * 1e9)
        print(f"  {mode:13s}: {nbytes / 1e6:6.1f} MB of weights per step, floor {floor * 1e3:5.2f} ms; per token "
              f"{token_s * 1e3:5.2f} ms = {token_s / floor:.2f}x, per step {step_s * 1e3:5.2f} ms = {step_s / floor:.2f}x the floor")


def _after_one(sequences: torch.Tensor, scores: torch.Tensor) -> bool:
    """Stop after the first new token (the decoder prompt is one start token)."""
    return sequences.shape[1] >= 2


if __name__ == "__main__":
    main()
