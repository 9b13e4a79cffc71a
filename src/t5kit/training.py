"""A training loop for T5: fine-tuning and pre-training on one process or many.

``Trainer(model, TrainingArguments(...), train_dataset, eval_dataset).train()``. Examples are dicts
with ``input_ids`` and ``labels`` (token id lists); a collator turns lists of them into batches
(``DataCollatorForSeq2Seq`` by default).

What it does:

* Loss: the sum of token cross-entropies divided by the number of label tokens in the whole
  optimizer step (all micro-batches, all processes). Gradient accumulation and data parallelism
  therefore give the gradient of one big batch, not a mean of per-batch means.
* bf16 autocast (``bf16=True``), gradient accumulation, gradient checkpointing, gradient clipping,
  Adafactor or AdamW, constant / linear / inverse-square-root schedules.
* ``torch_compile=True``: the training step's forward and loss (and so its backward) run as graphs
  compiled by ``torch.compile``, with the same values to float32 rounding. On 2 CPU cores t5-small's
  fp32 steps ran 1.16x faster than eager, paired in one process. The first step compiles (15-40 s
  for t5-small), and so does the first step whose lengths differ (then once more for any length);
  evaluation stays eager. Single process or DDP; not with FSDP.
* Checkpoints every ``save_steps``: ``output_dir/checkpoint-<step>/`` holds the model in the Hub
  layout plus ``trainer_state.pt`` (optimizer, scheduler, RNG states, data position). A checkpoint
  is written into a temporary directory and renamed, so a kill never leaves a half checkpoint.
  ``train(resume_from_checkpoint=True)`` continues exactly: the same weights as an uninterrupted run.
* Under ``torchrun``: DDP (``distributed="ddp"``) or FSDP2 ``fully_shard`` per block
  (``distributed="fsdp"``); gloo on the CPU, NCCL on GPUs. Each process takes its share of every
  global batch; the result equals one process on the same global batch.
* Evaluation: loss, and with ``eval_metric`` BLEU/chrF (sacrebleu) or ROUGE (rouge-score) on
  generated text (optional extras: ``pip install "t5kit[eval]"``).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from ._files import iter_jsonl
from .data import DataCollatorForSeq2Seq
from .modeling import lm_cross_entropy
from .optim import Adafactor, get_scheduler

__all__ = ["TrainingArguments", "Trainer", "TrainOutput"]

logger = logging.getLogger("t5kit")
STATE_NAME = "trainer_state.pt"


@dataclass
class TrainingArguments:
    """Options of ``Trainer``. Steps count optimizer updates."""

    output_dir: str
    max_steps: int = 1000
    batch_size: int = 8  # examples per process per micro-batch
    gradient_accumulation_steps: int = 1
    optimizer: str = "adafactor"  # or "adamw"
    learning_rate: float | None = 1e-3  # None with Adafactor: its relative step size
    weight_decay: float = 0.0
    lr_schedule: str = "constant"  # constant, constant_with_warmup, linear, inverse_sqrt
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    bf16: bool = False
    gradient_checkpointing: bool = False
    torch_compile: bool = False  # compile forward + loss of training steps (see the module docstring)
    save_steps: int | None = 500
    save_total_limit: int | None = 2
    eval_steps: int | None = None
    eval_metric: str | None = None  # None, "bleu", "chrf" or "rouge"
    eval_max_new_tokens: int = 64
    logging_steps: int = 10
    seed: int = 0
    shuffle: bool = True
    distributed: str = "auto"  # auto (ddp under torchrun), none, ddp, fsdp
    progress_bar: bool = True

    def __post_init__(self) -> None:
        if self.optimizer not in ("adafactor", "adamw"):
            raise ValueError(f"optimizer must be 'adafactor' or 'adamw', got {self.optimizer!r}")
        if self.distributed not in ("auto", "none", "ddp", "fsdp"):
            raise ValueError(f"distributed must be auto, none, ddp or fsdp, got {self.distributed!r}")
        if self.torch_compile and self.distributed == "fsdp":
            raise ValueError("torch_compile is not supported with distributed='fsdp'; use 'ddp' or turn torch_compile off")
        if self.eval_metric not in (None, "bleu", "chrf", "rouge"):
            raise ValueError(f"eval_metric must be bleu, chrf or rouge, got {self.eval_metric!r}")
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


@dataclass
class TrainOutput:
    global_step: int
    training_loss: float
    metrics: dict[str, float] = field(default_factory=dict)


class Trainer:
    """Train a t5kit model on lists of examples (see the module docstring).

    Args:
        model: A ``T5ForConditionalGeneration`` (or MT5/UMT5).
        args: ``TrainingArguments``.
        train_dataset: A sequence of examples (dicts with ``input_ids`` and ``labels``).
        eval_dataset: Optional examples to evaluate on.
        collator: Callable from a list of examples to a batch dict (default: dynamic padding).
        tokenizer: Needed for text metrics (decoding); saved with checkpoints when given.
    """

    def __init__(
        self,
        model: Any,
        args: TrainingArguments,
        train_dataset: Sequence[dict[str, Any]],
        eval_dataset: Sequence[dict[str, Any]] | None = None,
        collator: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]] | None = None,
        tokenizer: Any = None,
    ) -> None:
        if len(train_dataset) == 0:
            raise ValueError("train_dataset is empty")
        self.args = args
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.collator = collator or DataCollatorForSeq2Seq(pad_token_id=model.config.pad_token_id)
        self.tokenizer = tokenizer
        self.model = model  # the unwrapped model (parameters shared with the wrapped one)
        self._setup_distributed()
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if self.mode == "fsdp" and args.eval_metric:
            raise ValueError("Text metrics need generation, which a sharded (FSDP) model cannot run; use DDP, or evaluate the saved model")
        self.wrapped = self._wrap(model)
        # Training steps only: evaluation runs eagerly (another graph per mode would cost a second compile).
        self._compiled_loss = torch.compile(self._forward_loss) if args.torch_compile else None
        self.optimizer = self._make_optimizer()
        self.scheduler = get_scheduler(args.lr_schedule, self.optimizer, args.warmup_steps, args.max_steps)
        self.global_step = 0
        self.position = 0  # examples of the current epoch already consumed (global)
        self.epoch = 0

    # -- setup ------------------------------------------------------------------------------------

    def _setup_distributed(self) -> None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        mode = self.args.distributed
        if mode == "auto":
            mode = "ddp" if world > 1 else "none"
        if mode != "none" and world == 1 and not dist.is_initialized():
            mode = "none"  # a single process: nothing to distribute
        self.mode = mode
        if mode != "none" and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() and self.model.device.type == "cuda" else "gloo"
            dist.init_process_group(backend)
        self.rank = dist.get_rank() if mode != "none" else 0
        self.world = dist.get_world_size() if mode != "none" else 1

    def _wrap(self, model: Any) -> Any:
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            return DistributedDataParallel(model)
        if self.mode == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for stack in (model.encoder, model.decoder):
                for block in stack.block:
                    attn = block.layer[0].SelfAttention
                    if attn.has_relative_attention_bias:
                        # The stack computes the position bias before the block runs: its table is a unit of its own.
                        fully_shard(attn.relative_attention_bias)
                    fully_shard(block)
            fully_shard(model)
            return model
        return model

    def _make_optimizer(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        a = self.args
        if a.optimizer == "adamw":
            # Fused (one kernel over all parameters), as the reference's Trainer defaults to with
            # torch >= 2.8: t5-small's AdamW step on 2 CPU cores 242 -> 50 ms. Not for sharded
            # (DTensor) parameters, which have placements.
            fused = not any(hasattr(p, "placements") for p in params)
            return torch.optim.AdamW(params, lr=a.learning_rate or 1e-3, weight_decay=a.weight_decay, fused=fused)
        if a.learning_rate is None:
            return Adafactor(params, lr=None, relative_step=True, weight_decay=a.weight_decay)
        return Adafactor(params, lr=a.learning_rate, relative_step=False, scale_parameter=False, weight_decay=a.weight_decay)

    # -- data -------------------------------------------------------------------------------------

    def _epoch_order(self, epoch: int) -> list[int]:
        n = len(self.train_dataset)
        if not self.args.shuffle:
            return list(range(n))
        g = torch.Generator().manual_seed(self.args.seed * 1_000_003 + epoch)
        return torch.randperm(n, generator=g).tolist()

    def _next_global_batch(self) -> list[list[dict[str, Any]]]:
        """This process's micro-batches of the next optimizer step (the same on resume)."""
        per_step = self.args.batch_size * self.world * self.args.gradient_accumulation_steps
        picked: list[int] = []
        while len(picked) < per_step:
            order = self._epoch_order(self.epoch)
            take = order[self.position : self.position + per_step - len(picked)]
            picked += take
            self.position += len(take)
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
        micro = []
        b = self.args.batch_size * self.world
        for k in range(self.args.gradient_accumulation_steps):
            chunk = picked[k * b : (k + 1) * b]
            mine = chunk[self.rank * self.args.batch_size : (self.rank + 1) * self.args.batch_size]
            micro.append([self.train_dataset[i] for i in mine])
        return micro

    # -- training ---------------------------------------------------------------------------------

    def _autocast(self) -> Any:
        if not self.args.bf16:
            return nullcontext()
        return torch.autocast(device_type=self.model.device.type, dtype=torch.bfloat16)

    def _loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum of the label tokens' cross-entropies (float32)."""
        batch = {k: v.to(self.model.device) for k, v in batch.items()}
        labels = batch.pop("labels")
        # Decoder inputs rather than labels: the model would compute a second, unused (mean) loss.
        batch["decoder_input_ids"] = self.model._shift_right(labels, batch.get("decoder_segment_ids"))
        forward = self._forward_loss
        if self._compiled_loss is not None and self.wrapped.training:
            # Inside the compiled graph a bad id is a RuntimeError (see _check_ids): check here for
            # eager training's ValueError.
            self.model._check_ids(batch["input_ids"], "input_ids")
            self.model._check_ids(labels, "labels", allow_ignore=True)
            forward = self._compiled_loss
        return forward(batch, labels)

    def _forward_loss(self, batch: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            logits = self.wrapped(**batch, return_dict=True).logits
        return lm_cross_entropy(logits, labels, reduction="sum")

    def _all_sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            value = value.clone()
            dist.all_reduce(value)
        return value

    def training_step(self) -> tuple[float, int]:
        """One optimizer step over the next global batch; returns (mean token loss, tokens)."""
        self.wrapped.train()
        batches = [self.collator(m) for m in self._next_global_batch()]
        local_tokens = sum(int((b["labels"] != -100).sum()) for b in batches)
        tokens = int(self._all_sum(torch.tensor(local_tokens, dtype=torch.long)))
        if tokens == 0:
            raise ValueError("a training batch has no label tokens (all labels are -100)")
        total = torch.zeros((), dtype=torch.float32)
        for k, batch in enumerate(batches):
            # Data-parallel wrappers average gradients over processes: scale by world to get the sum.
            sync = k == len(batches) - 1 or self.mode != "ddp"
            context = nullcontext() if sync else self.wrapped.no_sync()
            with context:
                loss_sum = self._loss_sum(batch)
                (loss_sum * self.world / tokens).backward()
            total += loss_sum.detach().cpu()
        if self.args.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        return float(self._all_sum(total)) / tokens, tokens

    def train(self, resume_from_checkpoint: str | bool | None = None) -> TrainOutput:
        """Run until ``max_steps``; ``resume_from_checkpoint=True`` continues from the newest checkpoint."""
        from tqdm.auto import tqdm

        if resume_from_checkpoint:
            path = latest_checkpoint(self.args.output_dir) if resume_from_checkpoint is True else str(resume_from_checkpoint)
            if path is None:
                raise FileNotFoundError(f"No checkpoint to resume from in {self.args.output_dir}")
            self.load_checkpoint(path)
        else:
            torch.manual_seed(self.args.seed)
        a = self.args
        bar = tqdm(total=a.max_steps, initial=self.global_step, desc="train", disable=not a.progress_bar or self.rank != 0,
                   dynamic_ncols=True, mininterval=1.0)
        losses: list[float] = []
        tokens_seen, start = 0, time.perf_counter()
        metrics: dict[str, float] = {}
        while self.global_step < a.max_steps:
            loss, tokens = self.training_step()
            losses.append(loss)
            tokens_seen += tokens
            bar.update(1)
            if self.global_step % max(1, a.logging_steps) == 0 or self.global_step == a.max_steps:
                rate = tokens_seen / (time.perf_counter() - start)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}", tok_s=f"{rate:.0f}")
            if a.eval_steps and self.eval_dataset is not None and self.global_step % a.eval_steps == 0:
                metrics = self.evaluate()
                bar.write(f"step {self.global_step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            if a.save_steps and (self.global_step % a.save_steps == 0 or self.global_step == a.max_steps):
                self.save_checkpoint()
        bar.close()
        return TrainOutput(self.global_step, sum(losses) / max(1, len(losses)), metrics)

    # -- evaluation -------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, eval_dataset: Sequence[dict[str, Any]] | None = None) -> dict[str, float]:
        """Mean token loss on the evaluation set, plus the text metric when ``eval_metric`` is set."""
        data = eval_dataset if eval_dataset is not None else self.eval_dataset
        if not data:
            raise ValueError("No evaluation data")
        self.wrapped.eval()
        total, tokens = torch.zeros(()), 0
        mine = list(data)[self.rank :: self.world]
        for i in range(0, len(mine), self.args.batch_size):
            batch = self.collator(mine[i : i + self.args.batch_size])
            total += self._loss_sum(batch).cpu()
            tokens += int((batch["labels"] != -100).sum())
        total = self._all_sum(total)
        tokens = int(self._all_sum(torch.tensor(tokens)))
        out = {"eval_loss": float(total) / max(1, tokens)}
        if self.args.eval_metric:
            out.update(self._text_metric(list(data)))
        return out

    def _text_metric(self, data: list[dict[str, Any]]) -> dict[str, float]:
        if self.tokenizer is None:
            raise ValueError("eval_metric needs the Trainer's tokenizer to decode")
        hyps, refs = [], []
        for i in range(0, len(data), self.args.batch_size):
            chunk = data[i : i + self.args.batch_size]
            batch = self.collator(chunk)
            ids = self.model.generate(
                input_ids=batch["input_ids"].to(self.model.device), attention_mask=batch["attention_mask"].to(self.model.device),
                max_new_tokens=self.args.eval_max_new_tokens,
            )
            hyps += self.tokenizer.batch_decode(ids, skip_special_tokens=True)
            refs += [self.tokenizer.decode([t for t in e["labels"] if t >= 0], skip_special_tokens=True) for e in chunk]
        return text_metric(self.args.eval_metric, hyps, refs)  # type: ignore[arg-type]

    # -- checkpoints ------------------------------------------------------------------------------

    def _full_model_state(self) -> dict[str, torch.Tensor] | None:
        if self.mode != "fsdp":
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def save_checkpoint(self) -> str:
        """Write ``checkpoint-<step>`` atomically (temporary directory, then rename)."""
        final = os.path.join(self.args.output_dir, f"checkpoint-{self.global_step}")
        full = self._full_model_state()  # collective under FSDP: every rank takes part
        optim_state = self._optimizer_state()
        if self.rank == 0:
            tmp = final + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            self.model.save_pretrained(tmp, state_dict=full)
            if self.tokenizer is not None and hasattr(self.tokenizer, "save_pretrained"):
                self.tokenizer.save_pretrained(tmp)
            state = {
                "global_step": self.global_step,
                "epoch": self.epoch,
                "position": self.position,
                "optimizer": optim_state,
                "scheduler": self.scheduler.state_dict(),
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "args": asdict(self.args),
                "world_size": self.world,
            }
            torch.save(state, os.path.join(tmp, STATE_NAME))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            self._rotate_checkpoints()
        if self.world > 1:
            dist.barrier()
        return final

    def _optimizer_state(self) -> dict[str, Any]:
        if self.mode != "fsdp":
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _rotate_checkpoints(self) -> None:
        limit = self.args.save_total_limit
        if not limit:
            return
        found = sorted(_checkpoints(self.args.output_dir), key=lambda x: x[0])
        for _, path in found[:-limit]:
            shutil.rmtree(path, ignore_errors=True)

    def load_checkpoint(self, path: str) -> None:
        """Restore the model, optimizer, scheduler, RNG and data position saved by ``save_checkpoint``."""
        from .modeling_utils import load_checkpoint_state, _weight_files

        state_file = os.path.join(path, STATE_NAME)
        if not os.path.isfile(state_file):
            raise OSError(f"{path} is not a t5kit training checkpoint (no {STATE_NAME})")
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        if state.get("world_size", 1) != self.world:
            raise ValueError(f"The checkpoint was written by {state['world_size']} processes; resume with as many ({self.world} now)")
        weights, _ = load_checkpoint_state(_weight_files(path, {}), dtype=self.model.dtype, device=None)
        # Every stored name, and nothing else; tied aliases (embed_tokens, a tied lm_head) are the
        # same parameter as shared.weight, hence the non-strict loads below.
        mismatched = set(weights) ^ set(self.model.checkpoint_names())
        if mismatched:
            raise OSError(f"{path} does not hold this model's weights (mismatched keys: {', '.join(sorted(mismatched)[:5])})")
        if self.mode == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

            set_model_state_dict(self.model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        else:
            self.model.load_state_dict(weights, strict=False)
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.global_step, self.epoch, self.position = state["global_step"], state["epoch"], state["position"]


def _checkpoints(output_dir: str) -> list[tuple[int, str]]:
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        if name.startswith("checkpoint-") and name[11:].isdigit() and os.path.isfile(os.path.join(output_dir, name, STATE_NAME)):
            found.append((int(name[11:]), os.path.join(output_dir, name)))
    return found


def latest_checkpoint(output_dir: str) -> str | None:
    """The newest complete ``checkpoint-<step>`` directory, or None."""
    found = _checkpoints(output_dir)
    return max(found)[1] if found else None


def text_metric(name: str, hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU or chrF (sacrebleu), or ROUGE-1/2/L F1 (rouge-score)."""
    if name in ("bleu", "chrf"):
        try:
            import sacrebleu
        except ImportError as e:
            raise ImportError('BLEU and chrF need sacrebleu: pip install "t5kit[eval]"') from e
        if name == "bleu":
            return {"bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score}
        return {"chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score}
    try:
        from rouge_score import rouge_scorer
    except ImportError as e:
        raise ImportError('ROUGE needs rouge-score: pip install "t5kit[eval]"') from e
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(r, h) for h, r in zip(hypotheses, references)]
    return {k: 100 * sum(s[k].fmeasure for s in scores) / max(1, len(scores)) for k in ("rouge1", "rouge2", "rougeL")}


def read_jsonl_pairs(path: str, tokenizer: Any, input_field: str = "input", target_field: str = "target",
                     max_input_length: int | None = 512, max_target_length: int | None = 128) -> list[dict[str, list[int]]]:
    """Tokenised ``{"input_ids", "labels"}`` examples from a JSONL file of input/target texts."""
    texts, targets = [], []
    for n, record in iter_jsonl(path):
        if not isinstance(record.get(input_field), str) or not isinstance(record.get(target_field), str):
            raise ValueError(f"{path} line {n} needs string fields {input_field!r} and {target_field!r}")
        texts.append(record[input_field])
        targets.append(record[target_field])
    if not texts:
        raise ValueError(f"{path} holds no examples")
    enc = tokenizer(texts, truncation=max_input_length is not None, max_length=max_input_length)["input_ids"]
    lab = tokenizer(targets, truncation=max_target_length is not None, max_length=max_target_length)["input_ids"]
    return [{"input_ids": i, "labels": l} for i, l in zip(enc, lab)]
