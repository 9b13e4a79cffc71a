"""The CPU benchmark table: t5kit against transformers, CTranslate2 and ONNX Runtime, one command.

    pip install -e ".[bench]"
    python benchmarks/bench_suite.py [--shape t5-small] [--rounds 3] [--repeats 1] [--systems ...] [--columns ...]

Every system runs in its own subprocess on the same random checkpoint (written once by
transformers), measuring tokens/s (higher is better). Systems (--systems, comma-separated):

  transformers[-bf16|-compile]  the reference eager in fp32 / bf16; -compile: static cache + torch.compile
                                (train: the compiled forward)
  t5kit[-bf16|-int8|-unpacked]  fp32 and bf16 with prepacked weights (t5kit.prepack, as `t5kit run` does;
                                bf16 stays unpacked on CPUs without bf16 instructions, e.g. AVX2 only),
                                int8 dynamic quantization (t5kit.quantize_dynamic); -unpacked: plain fp32
  t5kit[-bf16|-int8]-static     the same, generating with cache_implementation="static" (the decoding
                                step captured by torch.compile; compiled in the warm-up round), with the
                                step's fp32 layers blocked for it and the encoder compiled
                                (t5kit.compile_encoder), as `t5kit run --cache-implementation static`
                                does (t5kit.packing.BLOCK_DECODING_STEP); train: the forward
                                through torch.compile, as TrainingArguments(torch_compile=True) does
  ctranslate2[-int8]            CTranslate2's converter and Translator (T5 vocabulary shapes only)
  onnxruntime[-int8]            encoder + cross K/V + decoder-step graphs, numpy loop (ort_t5.py)

Columns:

  enc b1x128 / enc b16x128   encoder forward over 128-token inputs
  greedy b1 / greedy b16     64 new tokens per sequence, eos disabled, 64-token inputs
  beam4 b1 / beam4 b8        the same with 4 beams
  train                      steps/s, fp32 forward + backward + AdamW, batch 8, 128 -> 64 tokens
                             (t5kit: the checkpoint as loaded, in a process of its own)
  peak RSS                   the process's peak resident memory after the generation cases

--columns (comma-separated, e.g. "greedy b1,beam4 b1") measures only those columns, for a closer look
at a few cells with more --repeats; peak RSS is then the peak after those cases.

Medians of --rounds. Ratios are against transformers fp32 measured in the same run. This machine's
speed drifts by 20-30% within minutes (other tenants share its memory bandwidth), so single cells
of one run are rough: --repeats N runs every system N times, alternating their order, and reports
each cell's median and each ratio's median over the repeats (training: the first repeat). For the fast
modes, quality against fp32 is printed too (against the first of t5kit, t5kit-static, t5kit-unpacked
and transformers measured; not transformers for umT5): the largest logit error relative to the
largest logit, teacher-forced on the same fixed decoder tokens in every system (so that it measures
each system's arithmetic, not where its own greedy tokens went), and the share of greedy b16 tokens
(greedy b1 if b16 is not measured) equal to fp32's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_generate import SHAPES, _median_time as _median, save_reference_checkpoint  # noqa: E402
from bench_train import train_batch, train_steps  # noqa: E402

VOCAB = HERE.parents[1] / "shared" / "data" / "t5-vocab"
COLUMNS = ["enc b1x128", "enc b16x128", "greedy b1", "greedy b16", "beam4 b1", "beam4 b8", "train", "peak RSS MB"]
SYSTEMS = ["transformers", "transformers-bf16", "transformers-compile", "t5kit", "t5kit-static", "t5kit-unpacked", "t5kit-bf16",
           "t5kit-bf16-static", "t5kit-int8", "t5kit-int8-static",
           "ctranslate2", "ctranslate2-int8", "onnxruntime", "onnxruntime-int8"]
GEN_CASES = (("greedy b1", 1, 1), ("greedy b16", 16, 1), ("beam4 b1", 1, 4), ("beam4 b8", 8, 4))
NEW_TOKENS = 64


def _inputs(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 32000, (batch, length), generator=g)
    ids[:, -1] = 1
    return ids, torch.ones_like(ids)


# ------------------------------------------------------------------------------------------------
# Workers: one system per process.


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM). Not getrusage's ru_maxrss: after fork + exec
    that also counts the parent's peak, so every worker would report at least the driver's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _measure(
    rounds: int, generate: Callable, tokens_of: Callable, encode: Callable | None = None, prepare: Callable | None = None
) -> dict[str, object]:
    """tokens/s of every case in COLUMNS: ``encode(ids, mask)`` on the encoder cases (if given), and
    ``generate(ids, mask, num_beams)`` on GEN_CASES. Outside the timed calls, ``prepare(ids, mask)``
    converts the inputs to the system's own (ids, mask), and ``tokens_of`` turns a generation's
    output into token lists (B, 1 + NEW_TOKENS) for the quality report."""
    prepare = prepare or (lambda ids, mask: (ids, mask))
    out: dict[str, object] = {}
    if encode is not None:
        for name, batch in (("enc b1x128", 1), ("enc b16x128", 16)):
            if name not in COLUMNS:
                continue
            ids, mask = prepare(*_inputs(batch, 128, batch))
            t, _ = _median(lambda: encode(ids, mask), rounds)
            out[name] = batch * 128 / t
    tokens = {}
    for name, batch, beams in GEN_CASES:
        if name not in COLUMNS:
            continue
        ids, mask = prepare(*_inputs(batch, 64, batch))
        t, seqs = _median(lambda: generate(ids, mask, beams), rounds)
        out[name] = batch * NEW_TOKENS / t
        tokens[name] = tokens_of(seqs)
        shape = (len(tokens[name]), {len(row) for row in tokens[name]})
        assert shape == (batch, {NEW_TOKENS + 1}), f"{name}: {shape[0]} sequences of lengths {shape[1]}"
    out["tokens"] = tokens
    return out


def worker(system: str, model_dir: str, rounds: int, out_file: str) -> None:
    if system.startswith("ctranslate2"):
        result = _ctranslate2(system, model_dir, rounds)
    elif system.startswith("onnxruntime"):
        result = _onnxruntime(system, model_dir, rounds)
    elif system in ("t5kit-train", "t5kit-train-compile"):
        # Its own process: a prepacked model is inference-only, and prepack tunes the process's
        # allocator for inference (keep_freed_memory), which the training measurement should not see.
        import t5kit

        model = t5kit.AutoModelForSeq2SeqLM.from_pretrained(model_dir)
        result = {"train": _train_steps_per_s(model, rounds, compiled=system.endswith("-compile"))}
    else:
        result = _torch_system(system, model_dir, rounds, out_file + ".logits.pt")
    result.setdefault("peak RSS MB", _peak_rss_mb())
    Path(out_file).write_text(json.dumps(result))


def _torch_system(system: str, model_dir: str, rounds: int, logits_file: str) -> dict[str, object]:
    static = system.endswith("-static")
    system = system.removesuffix("-static")
    bf16 = system.endswith("-bf16")
    if system.startswith("transformers"):
        import transformers

        transformers.logging.set_verbosity_error()
        cls = getattr(transformers, json.loads((Path(model_dir) / "config.json").read_text())["architectures"][0])
        model = cls.from_pretrained(model_dir).eval()
        model.generation_config.eos_token_id = None
        gen_kw: dict[str, object] = {}
        if system.endswith("-compile"):
            model.forward = torch.compile(model.forward)
            model.get_encoder().forward = torch.compile(model.get_encoder().forward)
            gen_kw["cache_implementation"] = "static"
    else:
        import t5kit

        model = t5kit.AutoModelForSeq2SeqLM.from_pretrained(model_dir)
        gen_kw = {"eos_token_id": None}
        if static:
            gen_kw["cache_implementation"] = "static"
        if system.endswith("-int8"):
            model = t5kit.quantize_dynamic(model)
    if bf16:
        model = model.to(torch.bfloat16)
    if static:
        t5kit.packing.BLOCK_DECODING_STEP = True  # as `t5kit run --cache-implementation static` sets it
    if system in ("t5kit", "t5kit-bf16") and t5kit.packing.can_prepack(model.dtype):
        model = t5kit.prepack(model)  # bf16 not on CPUs without bf16 instructions: unpacked, as `t5kit run`
    if static:
        t5kit.compile_encoder(model)  # as `t5kit run --cache-implementation static`; compiled in the warm-up calls

    with torch.inference_mode():
        encoder = model.get_encoder()
        out = _measure(
            rounds,
            encode=lambda ids, mask: encoder(input_ids=ids, attention_mask=mask),
            generate=lambda ids, mask, beams: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                                                             num_beams=beams, **gen_kw),
            tokens_of=lambda seqs: seqs.tolist(),
        )
        out["peak RSS MB"] = _peak_rss_mb()  # after the generation cases, before the quality logits and training
        # Logits on a fixed teacher-forced batch, for the quality report (whatever the columns): a
        # file, not JSON (an mT5 batch holds 65M logits, gigabytes as Python floats in every process
        # that reads them).
        # Fixed decoder tokens, the same in every system: teacher-forced on each system's own
        # greedy tokens, the logits of two systems part where their tokens part (a random untied
        # mT5 head parts after a few tokens) and the error measures that, not the arithmetic.
        ids, mask = _inputs(4, 64, 99)
        dec, _ = _inputs(4, 1 + NEW_TOKENS, 98)
        dec[:, 0] = model.config.decoder_start_token_id
        torch.save(model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits.float(), logits_file)
        out["logits"] = logits_file
    if system in ("transformers", "transformers-compile") and "train" in COLUMNS:
        out["train"] = _train_steps_per_s(model, rounds)  # -compile: its forward is compiled (above)
    return out


def _train_steps_per_s(model: torch.nn.Module, rounds: int, compiled: bool = False) -> float:
    """fp32 forward + backward + AdamW steps/s: batch 8, 128 -> 64 tokens; ``compiled``: the forward
    (and so the backward) through torch.compile, compiled in the warm-up step."""
    t, _ = train_steps(model, train_batch(8, 128, 64), rounds, compiled)
    return 1 / t


def _ctranslate2(system: str, model_dir: str, rounds: int) -> dict[str, object]:
    import ctranslate2
    import transformers

    quant = "int8" if system.endswith("int8") else "float32"
    ct2_dir = tempfile.mkdtemp(prefix="ct2-")
    ctranslate2.converters.TransformersConverter(model_dir).convert(ct2_dir, quantization=quant, force=True)
    translator = ctranslate2.Translator(ct2_dir, device="cpu", intra_threads=torch.get_num_threads())
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    out = _measure(
        rounds,
        prepare=lambda ids, mask: ([tokenizer.convert_ids_to_tokens(row) for row in ids.tolist()], mask),
        generate=lambda source, mask, beams: translator.translate_batch(
            source, beam_size=beams, max_decoding_length=NEW_TOKENS, min_decoding_length=NEW_TOKENS, return_scores=False
        ),
        tokens_of=lambda res: [[0] + tokenizer.convert_tokens_to_ids(r.hypotheses[0]) for r in res],
    )
    shutil.rmtree(ct2_dir, ignore_errors=True)
    return out


def _onnxruntime(system: str, model_dir: str, rounds: int) -> dict[str, object]:
    from ort_t5 import OrtT5

    model = OrtT5(model_dir, threads=torch.get_num_threads(), int8=system.endswith("int8"))
    out = _measure(
        rounds,
        prepare=lambda ids, mask: (ids.numpy(), mask.numpy()),
        encode=model.encode,
        generate=lambda ids, mask, beams: model.generate(ids, mask, NEW_TOKENS, beams),
        tokens_of=lambda seqs: seqs.tolist(),
    )
    shutil.rmtree(model.work, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="t5-small")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--repeats", type=int, default=1,
                        help="run every system this many times, alternating their order; cells are medians over "
                             "the repeats, ratios medians of each repeat's own ratio (this machine's speed drifts)")
    parser.add_argument("--columns", default=",".join(COLUMNS),
                        help="comma-separated columns to measure (default: all); peak RSS is always reported")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    columns = [c.strip() for c in args.columns.split(",")]
    unknown = sorted(set(columns) - set(COLUMNS))
    if unknown:
        parser.error(f"unknown columns {unknown}; choose from {COLUMNS}")
    COLUMNS[:] = [c for c in COLUMNS if c in columns or c == "peak RSS MB"]  # the workers read it too
    if args.worker:
        worker(args.worker, args.model_dir, args.rounds, args.out)
        return
    import transformers

    transformers.logging.set_verbosity_error()
    family = SHAPES[args.shape]["family"]
    work = tempfile.mkdtemp(prefix="t5kit-bench-")
    save_reference_checkpoint(args.shape, work)
    for name in ("spiece.model", "tokenizer.json"):
        if VOCAB.joinpath(name).exists():
            shutil.copy(VOCAB / name, Path(work) / name)
    # Measure on a settled checkpoint, as a user's downloaded one is: the pages of a file just written
    # stay dirty for up to 30 s, and the kernel cannot hand back dirty pages of a memory map, so a
    # prepacked t5-base read 1602 MB of peak memory on a fresh checkpoint against 1543 MB on the same
    # file synced.
    if hasattr(os, "sync"):
        os.sync()
    print(f"{args.shape} shape, random weights; {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"transformers {transformers.__version__}; tokens/s (train: steps/s), median of {args.rounds}")
    systems = []
    for system in args.systems.split(","):
        if system.startswith("ctranslate2"):
            try:
                import ctranslate2  # noqa: F401
            except ImportError:
                print(f"  {system}: skipped (pip install ctranslate2)")
                continue
            if family != "T5":
                print(f"  {system}: skipped (the comparison uses the T5 vocabulary)")
                continue
        if system.startswith("onnxruntime"):
            try:
                import onnxruntime  # noqa: F401
            except ImportError:
                print(f"  {system}: skipped (pip install onnxruntime onnx)")
                continue
        systems.append(system)
    runs: list[dict[str, dict]] = []
    for repeat in range(args.repeats):
        run: dict[str, dict] = {}
        for system in systems if repeat % 2 == 0 else systems[::-1]:  # drift hits the systems alike
            result = _run_worker(system, work, args.rounds, tag=str(repeat))
            if result is None:
                continue
            if system in ("t5kit", "t5kit-static") and repeat == 0 and "train" in COLUMNS:  # a worker of its own, once
                trainer = "t5kit-train" if system == "t5kit" else "t5kit-train-compile"
                train = _run_worker(trainer, work, args.rounds, tag=str(repeat))
                if train is not None:
                    result["train"] = train["train"]
            run[system] = result
        runs.append(run)
    results, ratios = _combine(runs, [s for s in systems if any(s in run for run in runs)])

    print(f"\n{'system':18s}" + "".join(f"{c:>13s}" for c in COLUMNS))
    for system, res in results.items():
        cells = [f"{res[c]:13.{3 if c == 'train' else 1}f}" if isinstance(res.get(c), (int, float)) else f"{'-':>13s}" for c in COLUMNS]
        print(f"{system:18s}" + "".join(cells))
    print("\nratio to transformers fp32 (> 1 is faster; peak RSS: < 1 is smaller)"
          + (f"; median of {args.repeats} repeats' ratios" if args.repeats > 1 else ""))
    for system in results:
        cells = [f"{ratios[system][c]:12.2f}x" if c in ratios[system] else f"{'-':>13s}" for c in COLUMNS]
        print(f"{system:18s}" + "".join(cells))
    # The fp32 reference of the quality report: t5kit's fp32 systems give the same logits to float32
    # rounding and the same tokens; transformers' too, but for umT5 (its head rescale, see below).
    fp32 = [s for s in ("t5kit", "t5kit-static", "t5kit-unpacked", "transformers") if s in results and "logits" in results[s]]
    fp32 = [s for s in fp32 if not (family == "UMT5" and s == "transformers")]
    if fp32:
        ref_name = fp32[0]
        ref = results[ref_name]
        greedy = next((c for c in ("greedy b16", "greedy b1") if c in ref.get("tokens", {})), None)
        print(f"\nquality against {ref_name} (fp32): tokens equal ({greedy or 'no greedy column measured'}), "
              "max |logit error| / max |logit|")
        for system, res in results.items():
            same = _share_equal(res.get("tokens", {}).get(greedy), ref["tokens"][greedy]) if greedy else "-"
            err = "-"
            if "logits" in res:
                a, b = torch.load(res["logits"]), torch.load(ref["logits"])
                err = f"{float((a - b).abs().max() / b.abs().max()):.2e}"
            print(f"  {system:18s} tokens equal {same}   logit error {err}")
        if family == "UMT5" and any(system.startswith("transformers") for system in results):
            print("  (transformers' umT5 logits carry its rescale of an untied head by d_model**-0.5, the reference"
                  " bug in README 'Where t5kit differs'; its greedy tokens survive it)")
    shutil.rmtree(work, ignore_errors=True)


def _combine(runs: list[dict[str, dict]], systems: list[str]) -> tuple[dict[str, dict], dict[str, dict[str, float]]]:
    """Per system: each column's median over the repeats (with the last repeat's tokens and logits for
    the quality report), and each column's median of the repeats' ratios to transformers fp32."""
    results: dict[str, dict] = {}
    ratios: dict[str, dict[str, float]] = {}
    for system in systems:
        present = [run[system] for run in runs if system in run]
        merged = dict(present[-1])
        ratios[system] = {}
        for c in COLUMNS:
            values = [r[c] for r in present if isinstance(r.get(c), (int, float))]
            if values:
                merged[c] = statistics.median(values)
            pairs = [run[system][c] / run["transformers"][c] for run in runs
                     if system in run and "transformers" in run and isinstance(run[system].get(c), (int, float))
                     and isinstance(run["transformers"].get(c), (int, float)) and run["transformers"][c]]
            if pairs:
                ratios[system][c] = statistics.median(pairs)
        results[system] = merged
    return results, ratios


def _run_worker(system: str, work: str, rounds: int, tag: str = "") -> dict | None:
    """Measure ``system`` in its own process; None (and the error printed) if it failed."""
    out = Path(work) / f"{system}{tag}.json"
    cmd = [sys.executable, __file__, "--worker", system, "--model-dir", work, "--rounds", str(rounds), "--out", str(out),
           "--columns", ",".join(COLUMNS)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        print(f"  {system}: failed\n{run.stderr[-2000:]}")
        return None
    return json.loads(out.read_text())


def _share_equal(a, b) -> str:
    if a is None:
        return "-"
    total = sum(len(x) for x in b)
    same = sum(int(p == q) for x, y in zip(a, b) for p, q in zip(x, y))
    return f"{same / total:.1%}"


if __name__ == "__main__":
    main()
