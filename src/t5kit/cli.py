"""The ``t5kit`` command line (also ``python -m t5kit``).

    t5kit run   --task text2text-generation --model M [options]   # stdin lines -> one result per line
    t5kit batch --model M --input IN.txt|IN.jsonl --output OUT.jsonl [options]   # resumable
    t5kit info  M                                                 # family, sizes, parameters, files
    t5kit train --model M --train TRAIN.jsonl --output DIR [--resume]   # fine-tuning (torchrun too)
    t5kit demo                                                    # offline: train a byte-level T5, use it

Models are directories or Hub ids (huggingface_hub's cache, ``--revision``, ``--local-files-only``,
``HF_HUB_OFFLINE=1``). Errors are printed as one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Sequence

from ._files import iter_jsonl

__all__ = ["main"]

_GENERATION_OPTIONS: tuple[tuple[str, type, str], ...] = (
    ("max_new_tokens", int, "maximum number of tokens to generate"),
    ("min_new_tokens", int, "minimum number of tokens to generate"),
    ("max_length", int, "maximum output length, decoder start token included"),
    ("min_length", int, "minimum output length, decoder start token included"),
    ("num_beams", int, "beam search with this many beams"),
    ("num_return_sequences", int, "sequences per input (batch output only)"),
    ("length_penalty", float, "beam score = log-prob / length**length_penalty"),
    ("temperature", float, "sampling temperature"),
    ("top_k", int, "sample from the k most likely tokens"),
    ("top_p", float, "sample from the smallest set with this probability"),
    ("repetition_penalty", float, "penalise tokens already generated"),
    ("no_repeat_ngram_size", int, "never repeat an n-gram of this size"),
    ("seed", int, "random seed for sampling"),
    ("cache_implementation", str, "'static': decode with a static cache and a step compiled by torch.compile, "
     "and run the encoder compiled too (faster once compiled; each new batch/length shape compiles first)"),
)


class CLIError(Exception):
    """An error to report on one line, without a traceback."""


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory or Hub id")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory or Hub id (default: the model's)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, or an index (0 = cuda:0, -1 = cpu); default cpu")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16 or auto")
    p.add_argument("--int8", action="store_true", help="int8 dynamic quantization of the linear layers (CPU, float32)")
    p.add_argument("--no-prepack", action="store_true",
                   help="keep plain weights on the CPU (default: float32/bfloat16 weights are prepacked for oneDNN)")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    p.add_argument("--local-files-only", action="store_true", help="never contact the Hub (as HF_HUB_OFFLINE=1)")
    p.add_argument("--batch-size", type=int, default=None, help="inputs per forward pass")
    for name, kind, text in _GENERATION_OPTIONS:
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=text)
    p.add_argument("--do-sample", action="store_true", default=None, help="sample instead of greedy/beam search")
    p.add_argument("--early-stopping", choices=["true", "false", "never"], default=None, help="beam search stopping rule")


def _build_pipeline(args: argparse.Namespace, task: str, default_batch: int) -> Any:
    from .pipelines import pipeline

    gen: dict[str, Any] = {name: getattr(args, name) for name, _, _ in _GENERATION_OPTIONS if getattr(args, name) is not None}
    if args.do_sample:
        gen["do_sample"] = True
    if args.early_stopping is not None:
        gen["early_stopping"] = {"true": True, "false": False}.get(args.early_stopping, args.early_stopping)
    hub = {k: v for k, v in (("revision", args.revision), ("local_files_only", args.local_files_only or None)) if v}
    if task == "feature-extraction" and gen:
        raise CLIError(f"feature-extraction takes no generation options (got {', '.join(sorted(gen))})")
    device = args.device
    if device is not None and device.lstrip("-").isdigit():
        device = int(device)  # `--device 0` as in the reference's command line: cuda:0 (-1: cpu)
    pipe = pipeline(
        task, model=args.model, tokenizer=args.tokenizer, dtype=args.dtype, device=device,
        batch_size=args.batch_size or default_batch, **hub, **gen,
    )
    if args.int8:
        from .quantization import quantize_dynamic

        if args.dtype not in (None, "float32"):
            raise CLIError("--int8 quantizes a float32 model on the CPU; drop --dtype")
        quantize_dynamic(pipe.model)  # raises ValueError for a model on another device
    elif not args.no_prepack and _prepackable(pipe.model):
        from . import packing

        if gen.get("cache_implementation") == "static":
            # This model only ever decodes with the compiled step, so the step's layers may be blocked
            # for it on every CPU (the default leaves them alone where eager decoding would pay for it),
            # and prepack splits the largest layers so that blocking never holds one twice.
            packing.BLOCK_DECODING_STEP = True
        packing.prepack(pipe.model)  # the command line only runs inference: same tokens, faster products
    if gen.get("cache_implementation") == "static" and hasattr(pipe.model, "encoder"):
        from .modeling import compile_encoder

        compile_encoder(pipe.model)  # inference only, like the compiled step
    return pipe


def _prepackable(model: Any) -> bool:
    from .packing import can_prepack

    params = list(model.parameters())
    return all(p.device.type == "cpu" and can_prepack(p.dtype) for p in params)


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())


def _format(result: Any) -> str:
    """One output line: the text of a generation, or a JSON array for an embedding."""
    if isinstance(result, dict):
        return _one_line(next(v for k, v in result.items() if k.endswith("_text")))
    return json.dumps(result)


# ------------------------------------------------------------------------------------------------
# t5kit run


def cmd_run(args: argparse.Namespace) -> int:
    """Read stdin line by line, print one result per line (flushed), like `transformers run`."""
    pipe = _build_pipeline(args, args.task, default_batch=1)
    extra = {"pooling": "mean"} if args.task == "feature-extraction" else {}
    seen = 0
    pending: list[str] = []

    def flush() -> None:
        results = pipe(pending, **extra)
        for r in results:
            print(_format(r[0] if isinstance(r, list) and r and isinstance(r[0], dict) else r), flush=True)
        pending.clear()

    for line in sys.stdin:
        pending.append(line.rstrip("\n"))
        seen += 1
        if len(pending) >= pipe.batch_size:
            flush()
    if pending:
        flush()
    if seen == 0:
        raise CLIError("no input: t5kit run reads one text per line from stdin")
    return 0


# ------------------------------------------------------------------------------------------------
# t5kit batch


def _read_records(path: str, field: str, id_field: str) -> list[tuple[Any, str]]:
    """(id, text) per record of a .txt (one text per line) or .jsonl file."""
    if not os.path.isfile(path):
        raise CLIError(f"input file {path} does not exist")
    records: list[tuple[Any, str]] = []
    if path.endswith((".jsonl", ".json")):
        for n, record in iter_jsonl(path):
            if not isinstance(record.get(field), str):
                raise CLIError(f"{path} line {n} has no string field {field!r} (choose it with --field)")
            records.append((record.get(id_field, len(records)), record[field]))
    else:
        with open(path, encoding="utf-8") as f:
            records = [(n, line.rstrip("\n")) for n, line in enumerate(f)]
    if not records:
        raise CLIError(f"{path} holds no records")
    return records


def _resume_point(path: str, records: list[tuple[Any, str]]) -> int:
    """How many records the output already holds. Output lines are written in input order, so
    finished results are a prefix; a partial last line (a kill during a write) is cut off."""
    if not os.path.exists(path):
        return 0
    with open(path, "rb") as f:
        data = f.read()
    keep = data.rfind(b"\n") + 1  # only complete lines count
    lines = data[:keep].decode("utf-8").splitlines()
    for n, line in enumerate(lines):
        try:
            rid = json.loads(line)["id"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CLIError(f"{path} line {n + 1} is not a t5kit batch result; use another --output or --overwrite") from e
        if n >= len(records) or rid != records[n][0]:
            raise CLIError(f"{path} belongs to another input (line {n + 1} has id {rid!r}); use another --output or --overwrite")
    if keep < len(data):
        with open(path, "r+b") as f:
            f.truncate(keep)
    return len(lines)


def cmd_batch(args: argparse.Namespace) -> int:
    """Generate for every record of a file into a JSONL file, in order, resumably."""
    from tqdm.auto import tqdm

    records = _read_records(args.input, args.field, args.id_field)
    if args.overwrite and os.path.exists(args.output):
        os.remove(args.output)
    done = _resume_point(args.output, records)
    if done == len(records):
        print(f"{args.output} already holds all {done} results", file=sys.stderr)
        return 0
    if args.task == "feature-extraction":
        raise CLIError("t5kit batch runs generation tasks; use the Python pipeline for feature-extraction")
    pipe = _build_pipeline(args, args.task, default_batch=8)
    kwargs = dict(pipe.generate_kwargs)
    n_return = int(kwargs.get("num_return_sequences") or 1)
    key = f"{pipe.output_key}_text"
    window = pipe.batch_size * 16  # records sorted by length within a window, written in order
    pad = pipe.tokenizer.pad_token_id
    fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    generated, start = 0, time.perf_counter()
    bar = tqdm(total=len(records), initial=done, unit="rec", desc="t5kit batch", dynamic_ncols=True)
    try:
        for first in range(done, len(records), window):
            chunk = records[first : first + window]
            texts = [pipe.prefix + text for _, text in chunk]
            results: dict[int, list[str]] = {}
            written = 0
            for batch, outs in pipe.iter_generate(texts, pipe.batch_size, False, kwargs):
                for i, ids in zip(batch, outs):
                    generated += int((ids[:, 1:] != pad).sum())
                    results[i] = [pipe.tokenizer.decode(row, skip_special_tokens=True) for row in ids]
                # Write the finished prefix of the chunk in one system call, then make it durable.
                lines = []
                while written in results:
                    rid = chunk[written][0]
                    texts_out = results.pop(written)
                    value: Any = texts_out[0] if n_return == 1 else texts_out
                    lines.append(json.dumps({"id": rid, key: value}, ensure_ascii=False) + "\n")
                    written += 1
                if lines:
                    os.write(fd, "".join(lines).encode("utf-8"))
                    os.fsync(fd)
                    bar.update(len(lines))
                bar.set_postfix_str(f"{generated / (time.perf_counter() - start):.1f} tok/s")
    except KeyboardInterrupt:
        bar.close()
        print(f"\nstopped; {args.output} holds every finished result. Run the same command to continue.", file=sys.stderr)
        return 130
    finally:
        os.close(fd)
    bar.close()
    return 0


# ------------------------------------------------------------------------------------------------
# t5kit info


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64"}


def model_info(path: str, **hub_kwargs: Any) -> dict[str, Any]:
    """Family, sizes, parameter count, dtypes and files of a checkpoint, without building the model."""
    import torch

    from .auto import AutoConfig
    from .modeling_utils import _weight_files

    config = AutoConfig.from_pretrained(path, **hub_kwargs)
    files = _weight_files(path, hub_kwargs)
    params, dtypes = 0, set()
    for file in files:
        if file.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(file, framework="pt") as f:
                for k in f.keys():
                    s = f.get_slice(k)
                    params += int(torch.Size(s.get_shape()).numel())
                    dtypes.add(_SAFETENSORS_DTYPES.get(s.get_dtype(), s.get_dtype()))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            seen: set[int] = set()
            for k, t in state.items():
                if k.endswith(("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")) or t.data_ptr() in seen:
                    continue
                seen.add(t.data_ptr())
                params += t.numel()
                dtypes.add(str(t.dtype).replace("torch.", ""))
    folder = os.path.dirname(files[0])
    listing = {name: os.path.getsize(os.path.join(folder, name)) for name in sorted(os.listdir(folder))
               if os.path.isfile(os.path.join(folder, name))}
    return {
        "model": path,
        "family": config.model_type,
        "architectures": getattr(config, "architectures", None),
        "vocab_size": config.vocab_size,
        "d_model": config.d_model,
        "d_kv": config.d_kv,
        "d_ff": config.d_ff,
        "num_heads": config.num_heads,
        "encoder_layers": config.num_layers,
        "decoder_layers": config.num_decoder_layers,
        "feed_forward_proj": config.feed_forward_proj,
        "tie_word_embeddings": config.tie_word_embeddings,
        "parameters": params,
        "dtypes": sorted(dtypes),
        "files": listing,
    }


def cmd_info(args: argparse.Namespace) -> int:
    hub = {k: v for k, v in (("revision", args.revision), ("local_files_only", args.local_files_only or None)) if v}
    info = model_info(args.model_path, **hub)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    arch = ", ".join(info["architectures"] or []) or "-"
    print(f"{info['model']}: {info['family']} ({arch})")
    print(f"  d_model {info['d_model']}, d_ff {info['d_ff']}, d_kv {info['d_kv']}, heads {info['num_heads']}, "
          f"layers {info['encoder_layers']} encoder / {info['decoder_layers']} decoder, vocab {info['vocab_size']}")
    print(f"  feed-forward {info['feed_forward_proj']}, tied embeddings: {info['tie_word_embeddings']}")
    print(f"  parameters {info['parameters']:,}, dtype {', '.join(info['dtypes'])}")
    print("  files: " + ", ".join(f"{n} ({_human(s)})" for n, s in info["files"].items()))
    return 0


# ------------------------------------------------------------------------------------------------
# t5kit train / demo


def cmd_train(args: argparse.Namespace) -> int:
    """Fine-tune a model on a JSONL file of input/target texts; resumable."""
    from .auto import AutoModelForSeq2SeqLM
    from .tokenization import AutoTokenizer
    from .training import Trainer, TrainingArguments, latest_checkpoint, read_jsonl_pairs

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    model = AutoModelForSeq2SeqLM.from_pretrained(args.model, dtype=args.dtype, device=args.device)
    fields = dict(input_field=args.input_field, target_field=args.target_field,
                  max_input_length=args.max_input_length, max_target_length=args.max_target_length)
    train = read_jsonl_pairs(args.train, tokenizer, **fields)
    evaluation = read_jsonl_pairs(args.eval, tokenizer, **fields) if args.eval else None
    targs = TrainingArguments(
        output_dir=args.output, max_steps=args.max_steps, batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, optimizer=args.optimizer,
        learning_rate=args.lr or None, lr_schedule=args.schedule, warmup_steps=args.warmup_steps, bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing, torch_compile=args.torch_compile, save_steps=args.save_steps,
        eval_steps=args.eval_steps if evaluation else None, eval_metric=args.metric, seed=args.seed,
        distributed=args.distributed,
    )
    trainer = Trainer(model, targs, train, evaluation, tokenizer=tokenizer)
    resume = None
    if args.resume:
        resume = latest_checkpoint(args.output)
        if resume is None:
            print(f"t5kit train: no checkpoint in {args.output}; starting from the beginning", file=sys.stderr)
    out = trainer.train(resume_from_checkpoint=resume)
    full = trainer._full_model_state()  # collective under FSDP: every process takes part
    metrics = trainer.evaluate() if evaluation else None  # collective too
    if trainer.rank == 0:
        model.save_pretrained(args.output, state_dict=full)
        tokenizer.save_pretrained(args.output)
        print(f"trained {out.global_step} steps, mean loss {out.training_loss:.4f}; model saved to {args.output}")
        if metrics is not None:
            print(json.dumps(metrics))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(steps=args.steps, output_dir=args.output, seed=args.seed)
    return 0 if result.accuracy >= 0.9 else 1


# ------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t5kit", description="The T5 family from the command line.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="read texts from stdin, print one result per line")
    run.add_argument("--task", default="text2text-generation",
                     help="text2text-generation, summarization, translation[_xx_to_yy] or feature-extraction")
    _add_model_options(run)
    run.set_defaults(func=cmd_run)
    batch = sub.add_parser("batch", help="generate for a .txt/.jsonl file into a .jsonl file (resumable)")
    batch.add_argument("--input", required=True, help=".txt (one text per line) or .jsonl file")
    batch.add_argument("--output", required=True, help=".jsonl output; rerun the command to resume")
    batch.add_argument("--field", default="text", help="the text field of .jsonl records (default: text)")
    batch.add_argument("--id-field", default="id", help="the id field of .jsonl records (default: id, else the record index)")
    batch.add_argument("--task", default="text2text-generation", help="text2text-generation, summarization or translation[_xx_to_yy]")
    batch.add_argument("--overwrite", action="store_true", help="start over instead of resuming")
    _add_model_options(batch)
    batch.set_defaults(func=cmd_batch)
    info = sub.add_parser("info", help="family, sizes, parameter count, dtype and files of a model")
    info.add_argument("model_path", metavar="MODEL", help="checkpoint directory or Hub id")
    info.add_argument("--revision", default=None)
    info.add_argument("--local-files-only", action="store_true")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=cmd_info)
    train = sub.add_parser("train", help="fine-tune on a JSONL file of input/target texts (resumable)")
    train.add_argument("--model", required=True, help="checkpoint directory or Hub id to start from")
    train.add_argument("--tokenizer", default=None)
    train.add_argument("--train", required=True, help="JSONL with input and target fields")
    train.add_argument("--eval", default=None, help="JSONL for evaluation")
    train.add_argument("--output", required=True, help="directory for checkpoints and the final model")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    train.add_argument("--input-field", default="input")
    train.add_argument("--target-field", default="target")
    train.add_argument("--max-input-length", type=int, default=512)
    train.add_argument("--max-target-length", type=int, default=128)
    train.add_argument("--max-steps", type=int, default=1000)
    train.add_argument("--batch-size", type=int, default=8, help="examples per process per micro-batch")
    train.add_argument("--gradient-accumulation-steps", type=int, default=1)
    train.add_argument("--optimizer", choices=["adafactor", "adamw"], default="adafactor")
    train.add_argument("--lr", type=float, default=1e-3, help="learning rate (Adafactor: 0 for its relative step)")
    train.add_argument("--schedule", choices=["constant", "constant_with_warmup", "linear", "inverse_sqrt"], default="constant")
    train.add_argument("--warmup-steps", type=int, default=0)
    train.add_argument("--bf16", action="store_true", help="bf16 autocast")
    train.add_argument("--gradient-checkpointing", action="store_true")
    train.add_argument("--torch-compile", action="store_true",
                       help="compile the training step's forward and loss with torch.compile (faster steps after a compile)")
    train.add_argument("--save-steps", type=int, default=500)
    train.add_argument("--eval-steps", type=int, default=None)
    train.add_argument("--metric", choices=["bleu", "chrf", "rouge"], default=None)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--distributed", choices=["auto", "none", "ddp", "fsdp"], default="auto", help="under torchrun")
    train.add_argument("--device", default=None)
    train.add_argument("--dtype", default=None)
    train.set_defaults(func=cmd_train)
    demo = sub.add_parser("demo", help="train a byte-level T5 from scratch offline, then use it (about a minute)")
    demo.add_argument("--steps", type=int, default=600)
    demo.add_argument("--output", default=None, help="keep the trained model here (default: a temporary directory)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``t5kit`` console script."""
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except (CLIError, OSError, ValueError, TypeError) as e:
        print(f"t5kit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
