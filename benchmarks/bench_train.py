"""Training steps/s of t5kit against transformers: same random model, same batch, same run.

    python benchmarks/bench_train.py [--shape t5-small] [--batch 8] [--src 128] [--tgt 64] [--steps 5] [--compile]

One step = forward with labels, backward, torch.optim.AdamW step, fp32. Prints the median step time
of each and the ratio (t5kit steps/s / transformers steps/s; > 1 means t5kit is faster), and checks
that the first losses agree. --compile adds both models with their forward through torch.compile
(t5kit's TrainingArguments(torch_compile=True)), compiled in the warm-up step, with ratios against
transformers eager.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch

from bench_generate import SHAPES, save_reference_checkpoint


def train_batch(batch: int, src: int, tgt: int) -> dict[str, torch.Tensor]:
    """A fixed random batch: ``batch`` inputs of ``src`` tokens, labels of ``tgt`` tokens."""
    g = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(2, 32000, (batch, src), generator=g),
        "attention_mask": torch.ones(batch, src, dtype=torch.long),
        "labels": torch.randint(2, 32000, (batch, tgt), generator=g),
    }


def train_steps(model, batch, n: int, compiled: bool = False) -> tuple[float, float]:
    """Median seconds of ``n`` fp32 forward + backward + AdamW steps after one warm-up step, and the
    warm-up step's loss; ``compiled``: the forward (and so the backward) through torch.compile,
    compiled in the warm-up step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    forward = torch.compile(model) if compiled else model
    first = None
    times = []
    for i in range(n + 1):  # the first step warms up (and compiles)
        start = time.perf_counter()
        loss = forward(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - start)
        else:
            first = float(loss.detach())
    return statistics.median(times), first  # type: ignore[return-value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="t5-small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--src", type=int, default=128)
    parser.add_argument("--tgt", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also measure both with torch.compile")
    args = parser.parse_args()
    import transformers

    import t5kit

    transformers.logging.set_verbosity_error()
    family = SHAPES[args.shape]["family"]
    with tempfile.TemporaryDirectory() as d:
        save_reference_checkpoint(args.shape, d)
        ref = getattr(transformers, f"{family}ForConditionalGeneration").from_pretrained(d)
        ref_compiled = copy.deepcopy(ref) if args.compile else None  # the same start: training changes the weights
        ours = getattr(t5kit, f"{family}ForConditionalGeneration").from_pretrained(d)
        ours_compiled = getattr(t5kit, f"{family}ForConditionalGeneration").from_pretrained(d) if args.compile else None
    batch = train_batch(args.batch, args.src, args.tgt)
    rows = [("t5kit", *train_steps(ours, batch, args.steps)), ("transformers", *train_steps(ref, batch, args.steps))]
    if args.compile:
        rows += [("t5kit compiled", *train_steps(ours_compiled, batch, args.steps, compiled=True)),
                 ("transformers compiled", *train_steps(ref_compiled, batch, args.steps, compiled=True))]
    print(f"{args.shape} (random weights), fp32 forward+backward+AdamW, batch {args.batch}, {args.src}->{args.tgt} tokens, "
          f"{torch.get_num_threads()} threads, median of {args.steps} steps; torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    t_ref = rows[1][1]
    for name, t, loss in rows:
        print(f"{name:22s} {1 / t:6.3f} steps/s   {t_ref / t:5.2f}x transformers   first loss {loss:.6f}")


if __name__ == "__main__":
    main()
