"""The GPU benchmark: t5kit against transformers eager, SDPA and static cache + torch.compile.

    pip install -e ".[bench]"
    python benchmarks/bench_gpu.py [--shape t5-base] [--dtype bf16] [--rounds 3] [--systems ...] [--device cuda]
                                   [--system-timeout SECONDS]

Every system runs in its own subprocess on the same random checkpoint (written once by
transformers, in --dtype), measuring tokens/s (higher is better). Systems (--systems, comma-separated):

  transformers-eager    the reference, attn_implementation="eager"
  transformers-sdpa     attn_implementation="sdpa"
  transformers-compile  SDPA, cache_implementation="static", model.forward compiled with
                        torch.compile(fullgraph=True) (default mode: "reduce-overhead", which the
                        reference's docs show, fails in its generate; see _load)
  t5kit                 t5kit's default generation
  t5kit-static          cache_implementation="static": t5kit's decoding step captured by torch.compile
                        and, on a GPU, replayed as a CUDA graph
  t5kit-static-nographs the compiled step without the CUDA graph (t5kit.generation.CUDA_GRAPHS = False);
                        only when named

Columns: the encoder over 128-token inputs at batch 1 and 16 (on a GPU, 20 calls a round); greedy
and 4-beam generation of 64 new tokens (eos disabled) from 64-token inputs, at batch 1 and 16 / 1
and 8; peak memory (the device's ``max_memory_allocated``; on a CPU the process's peak resident
memory). Medians of --rounds after a warm-up round (which compiles). Ratios are against transformers-eager measured in the same run. In
bf16 the systems' kernels differ, so greedy tokens can part where two logits nearly tie: the share
of greedy b16 tokens equal to transformers-eager's is printed, not asserted.

``--device cpu --dtype fp32 --shape t5-small --rounds 1`` runs the same code on a CPU (a smoke test of
the script; the CPU table is ``bench_suite.py``'s).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_generate import SHAPES, _median_time, save_reference_checkpoint  # noqa: E402
from bench_suite import _inputs, _peak_rss_mb, _share_equal  # noqa: E402

SYSTEMS = ["transformers-eager", "transformers-sdpa", "transformers-compile", "t5kit", "t5kit-static"]
EXTRA_SYSTEMS = ["t5kit-static-nographs"]  # only when named in --systems
COLUMNS = ["enc b1x128", "enc b16x128", "greedy b1", "greedy b16", "beam4 b1", "beam4 b8"]
GEN_CASES = (("greedy b1", 1, 1), ("greedy b16", 16, 1), ("beam4 b1", 1, 4), ("beam4 b8", 8, 4))
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
NEW_TOKENS = 64
# Encoder calls per timed round on a GPU. One t5-base call at batch 16 takes about 8 ms, and single
# calls timed on an H100 varied 2.5x between two runs of the same system (the GPU's clocks).
ENCODER_CALLS = 20


def _load(system: str, model_dir: str, dtype: torch.dtype, device: str) -> tuple[torch.nn.Module, dict]:
    """The model of ``system`` on ``device`` in ``dtype``, and the keyword arguments its generate takes."""
    if system.startswith("transformers"):
        import transformers

        transformers.logging.set_verbosity_error()
        attn = "eager" if system == "transformers-eager" else "sdpa"
        model = transformers.AutoModelForSeq2SeqLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn)
        model = model.to(device).eval()
        model.generation_config.eos_token_id = None
        kw: dict = {}
        if system == "transformers-compile":
            # The reference's docs show mode="reduce-overhead" (CUDA graphs), but with transformers 5.23
            # and torch 2.11 its T5 generate then fails ("accessing tensor output of CUDAGraphs that has
            # been overwritten by a subsequent run", in the static cache's index_copy_): default mode.
            model.forward = torch.compile(model.forward, fullgraph=True)
            kw["cache_implementation"] = "static"
        return model, kw
    import t5kit

    model = t5kit.AutoModelForSeq2SeqLM.from_pretrained(model_dir, dtype=dtype, device=device).eval()
    kw = {"eos_token_id": None}
    if system.startswith("t5kit-static"):
        kw["cache_implementation"] = "static"
        t5kit.generation.CUDA_GRAPHS = system == "t5kit-static"
    return model, kw


def worker(system: str, model_dir: str, dtype: torch.dtype, device: str, rounds: int, out_file: str) -> None:
    model, gen_kw = _load(system, model_dir, dtype, device)
    cuda = device.startswith("cuda")

    def timed(fn):  # waits for the device, so the time is the work's, not its launch
        def run():
            out = fn()
            if cuda:
                torch.cuda.synchronize()
            return out
        return run

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    out: dict[str, object] = {}
    with torch.inference_mode():
        encoder = model.get_encoder()
        for name, batch in (("enc b1x128", 1), ("enc b16x128", 16)):
            ids, mask = (t.to(device) for t in _inputs(batch, 128, batch))
            calls = ENCODER_CALLS if cuda else 1  # one call takes milliseconds on a GPU

            def encode():
                for _ in range(calls):
                    encoder(input_ids=ids, attention_mask=mask)

            t, _ = _median_time(timed(encode), rounds)
            out[name] = calls * batch * 128 / t
        tokens = {}
        for name, batch, beams in GEN_CASES:
            ids, mask = (t.to(device) for t in _inputs(batch, 64, batch))
            t, seqs = _median_time(timed(lambda: model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, num_beams=beams,
                **gen_kw)), rounds)
            out[name] = batch * NEW_TOKENS / t
            tokens[name] = seqs.tolist()
            if {len(row) for row in tokens[name]} != {NEW_TOKENS + 1} or len(tokens[name]) != batch:
                raise RuntimeError(f"{system} {name}: expected {batch} sequences of {NEW_TOKENS + 1} tokens")
    out["tokens"] = tokens
    out["peak MB"] = torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_rss_mb()
    Path(out_file).write_text(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="t5-base")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--system-timeout", type=float, default=None,
                        help="seconds one system may take (its compiles included); past it the system is "
                             "reported as timed out and the run goes on with the next")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    if args.worker:
        worker(args.worker, args.model_dir, dtype, args.device, args.rounds, args.out)
        return
    systems = [s.strip() for s in args.systems.split(",")]
    unknown = sorted(set(systems) - set(SYSTEMS) - set(EXTRA_SYSTEMS))
    if unknown:
        parser.error(f"unknown systems {unknown}; choose from {SYSTEMS + EXTRA_SYSTEMS}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device here; pass --device cpu for a smoke test on the CPU")
    import transformers

    transformers.logging.set_verbosity_error()
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    print(f"{args.shape} shape, random weights, {args.dtype}; {device_name}; torch {torch.__version__}, "
          f"transformers {transformers.__version__}; tokens/s, median of {args.rounds} after a warm-up round")
    with tempfile.TemporaryDirectory(prefix="t5kit-bench-gpu-") as work:
        save_reference_checkpoint(args.shape, work, dtype)
        results: dict[str, dict] = {}
        for system in systems:
            out = Path(work) / f"{system}.json"
            cmd = [sys.executable, __file__, "--worker", system, "--model-dir", work, "--dtype", args.dtype,
                   "--device", args.device, "--rounds", str(args.rounds), "--out", str(out)]
            try:
                run = subprocess.run(cmd, capture_output=True, text=True, timeout=args.system_timeout)
            except subprocess.TimeoutExpired:
                print(f"  {system}: timed out after {args.system_timeout:g} s", flush=True)
                continue
            if run.returncode != 0:
                print(f"  {system}: failed\n{run.stderr[-2000:]}")
                continue
            results[system] = json.loads(out.read_text())
            res = results[system]  # printed as it comes, so a run cut short keeps what it measured
            print(f"  {system}: " + ", ".join(f"{c} {res[c]:.1f}" for c in [*COLUMNS, "peak MB"]), flush=True)
    columns = [*COLUMNS, "peak MB"]
    print(f"\n{'system':22s}" + "".join(f"{c:>13s}" for c in columns))
    for system, res in results.items():
        print(f"{system:22s}" + "".join(f"{res[c]:13.1f}" for c in columns))
    base = results.get("transformers-eager")
    if base is None:
        return
    print("\nratio to transformers-eager (> 1 is faster; peak memory: < 1 is smaller)")
    for system, res in results.items():
        print(f"{system:22s}" + "".join(f"{res[c] / base[c]:12.2f}x" for c in columns))
    print("\ngreedy b16 tokens equal to transformers-eager's")
    for system, res in results.items():
        print(f"  {system:22s} {_share_equal(res['tokens']['greedy b16'], base['tokens']['greedy b16'])}")


if __name__ == "__main__":
    main()
