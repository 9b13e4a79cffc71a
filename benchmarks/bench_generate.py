"""Generation throughput of t5kit against transformers, on the same random model in the same run.

    python benchmarks/bench_generate.py [--rounds 3] [--new-tokens 64] [--input-length 64]
                                       [--shape t5-small|mt5-small|umt5-small|t5-base|t5-large]

Cases: greedy at batch 1 and 16, beam search (4 beams) at batch 1 and 8. Every system decodes
exactly --new-tokens tokens per sequence (eos disabled). Prints tokens/s (new tokens of the
returned sequences per second, median of the rounds) and the ratio t5kit / transformers
(> 1 means t5kit is faster), and checks that both produced the same tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {
    "t5-small": dict(family="T5", vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
                     feed_forward_proj="relu", tie_word_embeddings=True),
    "t5-base": dict(family="T5", vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12,
                    feed_forward_proj="relu", tie_word_embeddings=True),
    "t5-large": dict(family="T5", vocab_size=32128, d_model=1024, d_kv=64, d_ff=4096, num_layers=24, num_heads=16,
                     feed_forward_proj="relu", tie_word_embeddings=True),
    "mt5-small": dict(family="MT5", vocab_size=250112, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "umt5-small": dict(family="UMT5", vocab_size=256384, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6,
                       feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}
CASES = (("greedy", 1, 1), ("greedy", 16, 1), ("beam4", 1, 4), ("beam4", 8, 4))


def reference_model(shape_name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    """A random transformers model of ``SHAPES[shape_name]`` (seeded), untied where the shape is.

    transformers 5.23 forces ``tie_word_embeddings=True`` in all three T5 configs, so a model it
    builds has one matrix for the embedding and the output head. Released mT5 and umT5 checkpoints
    have an ``lm_head`` of their own (for mT5-small 128 M more parameters, 489 MiB in float32), so
    for the untied shapes the head gets its own random weights here, initialized as transformers
    initializes an untied head (normal, std ``initializer_factor``)."""
    import transformers

    shape = dict(SHAPES[shape_name])
    family = shape.pop("family")
    torch.manual_seed(seed)
    config = getattr(transformers, f"{family}Config")(**shape, dropout_rate=0.0, decoder_start_token_id=0)
    model = getattr(transformers, f"{family}ForConditionalGeneration")(config)
    if not shape["tie_word_embeddings"]:
        head = torch.empty_like(model.lm_head.weight).normal_(0.0, config.initializer_factor)
        model.lm_head.weight = torch.nn.Parameter(head)
    return model.to(dtype)


def save_reference_checkpoint(shape_name: str, directory: str | Path, dtype: torch.dtype = torch.float32) -> None:
    """Save :func:`reference_model` to ``directory`` as the Hub's checkpoints are laid out: for the
    untied shapes, ``shared.weight`` and ``lm_head.weight`` both, and ``tie_word_embeddings: false``
    in config.json (transformers writes true; it loads the two apart either way, since they differ)."""
    reference_model(shape_name, dtype).save_pretrained(directory)
    if not SHAPES[shape_name]["tie_word_embeddings"]:
        path = Path(directory) / "config.json"
        config = json.loads(path.read_text())
        config["tie_word_embeddings"] = False
        path.write_text(json.dumps(config, indent=2) + "\n")


def _median_time(fn, rounds: int) -> tuple[float, object]:
    out = fn()  # warm up
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--input-length", type=int, default=64)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="t5-small")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    import t5kit

    transformers.logging.set_verbosity_error()
    family = SHAPES[args.shape]["family"]
    with tempfile.TemporaryDirectory() as d:
        save_reference_checkpoint(args.shape, d)
        ref = getattr(transformers, f"{family}ForConditionalGeneration").from_pretrained(d).eval()
        ours = getattr(t5kit, f"{family}ForConditionalGeneration").from_pretrained(d)
    ref.generation_config.eos_token_id = None  # decode a fixed number of tokens
    n_new = args.new_tokens
    print(f"{args.shape} (random weights), fp32, {torch.get_num_threads()} threads, input length {args.input_length}, "
          f"{n_new} new tokens, median of {args.rounds}; torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"{'case':10s} {'batch':>5s} {'t5kit tok/s':>12s} {'transformers tok/s':>19s} {'ratio':>7s}  same tokens")
    for name, batch, beams in CASES:
        g = torch.Generator().manual_seed(batch)
        ids = torch.randint(2, 32000, (batch, args.input_length), generator=g)
        ids[:, -1] = 1
        mask = torch.ones_like(ids)
        kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=n_new, num_beams=beams)
        with torch.inference_mode():
            t_ours, out_ours = _median_time(lambda: ours.generate(**kw, eos_token_id=None), args.rounds)
            t_ref, out_ref = _median_time(lambda: ref.generate(**kw), args.rounds)
        assert out_ours.shape == out_ref.shape == (batch, n_new + 1), (out_ours.shape, out_ref.shape)
        same = torch.equal(out_ours, out_ref)
        tokens = batch * n_new
        print(f"{name:10s} {batch:5d} {tokens / t_ours:12.1f} {tokens / t_ref:19.1f} {t_ref / t_ours:6.2f}x  {same}")


if __name__ == "__main__":
    main()
