"""The training loop: exact resume, accumulation, bf16, torchrun (DDP, FSDP2), the train command, the demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import t5kit
from t5kit.training import Trainer, TrainingArguments, latest_checkpoint

HERE = Path(__file__).resolve().parent
GLOBAL_BATCH = 8
STEPS = 4


def make_model(dropout: float = 0.1, seed: int = 0) -> t5kit.T5ForConditionalGeneration:
    torch.manual_seed(seed)
    config = t5kit.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2,
                            feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=dropout,
                            relative_attention_num_buckets=8, relative_attention_max_distance=16)
    return t5kit.T5ForConditionalGeneration(config)


def dataset(n: int = 40) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(n):
        a, b = int(torch.randint(3, 12, (1,), generator=g)), int(torch.randint(2, 8, (1,), generator=g))
        out.append({"input_ids": torch.randint(2, 64, (a,), generator=g).tolist() + [1],
                    "labels": torch.randint(2, 64, (b,), generator=g).tolist() + [1]})
    return out


def _args(tmp_path, **kw) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path), max_steps=20, batch_size=4, learning_rate=1e-2, save_steps=5,
                lr_schedule="linear", warmup_steps=3, progress_bar=False)
    return TrainingArguments(**{**base, **kw})


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class _Killed(Exception):
    pass


def test_adamw_is_fused_and_steps_as_the_plain_one(tmp_path):
    """AdamW is torch's fused implementation (the reference's Trainer default with torch >= 2.8);
    its steps equal the per-parameter loop's to float32 rounding."""
    trainer = Trainer(make_model(), _args(tmp_path, optimizer="adamw", weight_decay=0.1), dataset())
    assert trainer.optimizer.defaults["fused"] is True
    fused = trainer.optimizer
    for group in fused.param_groups:
        group["lr"] = 1e-2  # (the warm-up schedule starts it at 0)
    plain_model = make_model()
    plain = torch.optim.AdamW(plain_model.parameters(), lr=1e-2, weight_decay=0.1)
    for model, opt in ((plain_model, plain), (trainer.model, fused)):
        for _ in range(3):
            loss = sum(p.square().sum() for p in model.parameters() if p.requires_grad)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for (name, a), b in zip(plain_model.state_dict().items(), trainer.model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("optimizer", ["adafactor", "adamw"])
def test_resume_continues_exactly(tmp_path, optimizer):
    """20 steps straight == 10 steps, a crash, a resume from the checkpoint, 10 more (dropout on)."""
    straight = make_model()
    Trainer(straight, _args(tmp_path / "a", optimizer=optimizer), dataset()).train()

    class Crashing(Trainer):
        def training_step(self):
            if self.global_step == 12:  # after checkpoint-10, partway to the next one
                raise _Killed
            return super().training_step()

    first = make_model()
    with pytest.raises(_Killed):
        Crashing(first, _args(tmp_path / "b", optimizer=optimizer), dataset()).train()
    assert latest_checkpoint(str(tmp_path / "b")).endswith("checkpoint-10")
    resumed = make_model(seed=123)  # different initial weights: all state must come from the checkpoint
    torch.manual_seed(999)  # and a different global RNG
    out = Trainer(resumed, _args(tmp_path / "b", optimizer=optimizer), dataset()).train(resume_from_checkpoint=True)
    assert out.global_step == 20
    for name, value in _state(straight).items():
        assert torch.equal(_state(resumed)[name], value), name


def test_checkpoints_are_complete_and_rotated(tmp_path):
    Trainer(make_model(), _args(tmp_path, max_steps=15, save_total_limit=2), dataset()).train()
    names = sorted(os.listdir(tmp_path))
    assert names == ["checkpoint-10", "checkpoint-15"]
    files = set(os.listdir(tmp_path / "checkpoint-15"))
    assert {"config.json", "model.safetensors", "trainer_state.pt", "generation_config.json"} <= files
    assert isinstance(t5kit.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "checkpoint-15"), t5kit.T5ForConditionalGeneration)


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    """Loss = token sum / tokens of the whole step, so 2 x 4 accumulated == 8 at once (unequal lengths)."""
    big, small = make_model(dropout=0.0), make_model(dropout=0.0)
    a = Trainer(big, _args(tmp_path / "a", batch_size=8, save_steps=None), dataset())
    b = Trainer(small, _args(tmp_path / "b", batch_size=4, gradient_accumulation_steps=2, save_steps=None), dataset())
    for _ in range(3):
        la, lb = a.training_step()[0], b.training_step()[0]
        assert la == pytest.approx(lb, rel=1e-5)
    for name, value in _state(big).items():
        torch.testing.assert_close(_state(small)[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_packed_batches_train_with_the_models_packed_loss(tmp_path):
    """A packing collator works with the Trainer: its token-sum loss is the model's packed mean loss x tokens."""
    from t5kit.data import pack_examples

    model = make_model(dropout=0.0)
    packed = pack_examples(dataset(10), max_input_length=40, max_target_length=20)
    assert packed["input_ids"].shape[0] < 10
    trainer = Trainer(model, _args(tmp_path, save_steps=None), dataset(10), collator=lambda examples: dict(packed))
    with torch.no_grad():
        total = trainer._loss_sum(dict(packed))
        mean = model(**{k: v for k, v in packed.items() if k != "attention_mask"}).loss
    tokens = int((packed["labels"] != -100).sum())
    torch.testing.assert_close(total / tokens, mean, rtol=1e-6, atol=1e-6)
    assert trainer.training_step()[1] == tokens


def test_bf16_and_gradient_checkpointing_train(tmp_path):
    model = make_model(dropout=0.0)
    trainer = Trainer(model, _args(tmp_path, bf16=True, gradient_checkpointing=True, max_steps=30, save_steps=None), dataset())
    first = trainer.training_step()[0]
    out = trainer.train()
    assert model.dtype == torch.float32 and out.training_loss < first
    metrics = trainer.evaluate(dataset(8))
    assert set(metrics) == {"eval_loss"} and metrics["eval_loss"] > 0


def test_torch_compile_trains_as_eager(tmp_path):
    """Compiled training steps (batches of changing lengths, so a recompile with dynamic shapes)
    give eager's losses and weights to float32 rounding; out-of-range ids still get a ValueError."""
    eager, compiled = make_model(dropout=0.0), make_model(dropout=0.0)
    a = Trainer(eager, _args(tmp_path / "a", optimizer="adamw", save_steps=None), dataset())
    b = Trainer(compiled, _args(tmp_path / "b", optimizer="adamw", save_steps=None, torch_compile=True), dataset())
    for _ in range(4):
        la, lb = a.training_step(), b.training_step()
        assert lb[0] == pytest.approx(la[0], rel=1e-5) and lb[1] == la[1]
    for name, value in _state(eager).items():
        torch.testing.assert_close(_state(compiled)[name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert b.evaluate(dataset(8))["eval_loss"] == pytest.approx(a.evaluate(dataset(8))["eval_loss"], rel=1e-5)
    bad = Trainer(compiled, _args(tmp_path / "c", save_steps=None, torch_compile=True), [{"input_ids": [5, 64], "labels": [3, 1]}])
    with pytest.raises(ValueError, match="input_ids holds token id 64"):
        bad.training_step()
    with pytest.raises(ValueError, match="fsdp"):
        TrainingArguments(output_dir=str(tmp_path), torch_compile=True, distributed="fsdp")


def test_torch_compile_with_bf16_autocast_trains_as_eager(tmp_path):
    """Compiled steps under bf16 autocast follow eager bf16 steps to bf16 rounding: the compiler
    fuses and orders bf16 operations its own way, so not to float32 rounding, but it adds no more
    error than bf16 itself does against float32 training (AdamW turns that rounding into weight
    differences of up to lr where gradients are tiny, so the weights are compared on average)."""
    initial = _state(make_model(dropout=0.0))
    models = [make_model(dropout=0.0) for _ in range(3)]
    modes = [("fp32", {}), ("bf16", {"bf16": True}), ("compiled", {"bf16": True, "torch_compile": True})]
    trainers = [Trainer(m, _args(tmp_path / name, optimizer="adamw", save_steps=None, **kw), dataset())
                for m, (name, kw) in zip(models, modes)]
    for _ in range(3):
        fp32, bf16, compiled = (t.training_step()[0] for t in trainers)
        assert compiled == pytest.approx(bf16, rel=1e-2) and bf16 == pytest.approx(fp32, rel=1e-2)
    fp32, bf16, compiled = (_state(m) for m in models)

    def mean_gap(x: dict, y: dict) -> float:
        return sum((x[k] - y[k]).abs().sum().item() for k in x) / sum(v.numel() for v in x.values())

    update = mean_gap(bf16, initial)  # about lr (1e-2) per weight after 3 AdamW steps
    assert mean_gap(compiled, fp32) > 1e-3 * update  # autocast was in force in the compiled step
    assert mean_gap(compiled, bf16) < 2 * mean_gap(bf16, fp32) and mean_gap(compiled, bf16) < 0.05 * update


def test_text_metrics(tmp_path):
    from t5kit.training import text_metric

    sacrebleu = pytest.importorskip("sacrebleu")
    hyps, refs = ["the cat sat on the mat", "hello there"], ["the cat sat on the mat", "hello world"]
    assert text_metric("bleu", hyps, refs)["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert text_metric("chrf", hyps, refs)["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)


def test_training_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="optimizer"):
        TrainingArguments(output_dir=str(tmp_path), optimizer="sgd")
    with pytest.raises(ValueError, match="max_steps"):
        TrainingArguments(output_dir=str(tmp_path), max_steps=0)
    with pytest.raises(ValueError, match="empty"):
        Trainer(make_model(), _args(tmp_path), [])
    with pytest.raises(FileNotFoundError):
        Trainer(make_model(), _args(tmp_path / "none"), dataset()).train(resume_from_checkpoint=True)


# ------------------------------------------------------------------------------------------------
# More than one process.


@pytest.mark.parametrize(
    "mode, optimizer, resume",
    [("ddp", "adafactor", ""), ("fsdp", "adamw", ""), ("fsdp", "adafactor", ""), ("ddp", "adamw", "resume"), ("fsdp", "adamw", "resume"),
     ("ddp", "adamw", "compile")],
)
def test_torchrun_two_processes_equal_one(tmp_path, mode, optimizer, resume):
    """2 processes on half batches == 1 process on the whole batch (and so does a checkpoint + resume
    midway, and DDP with compiled steps)."""
    out = tmp_path / "result.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "helpers" / "dist_train.py"), mode, optimizer, str(out), resume]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    result = torch.load(out, weights_only=True)
    model = make_model(dropout=0.0)
    args = TrainingArguments(output_dir=str(tmp_path / "one"), max_steps=STEPS, batch_size=GLOBAL_BATCH, optimizer=optimizer,
                             learning_rate=1e-2, save_steps=None, progress_bar=False)
    trainer = Trainer(model, args, dataset())
    losses = [trainer.training_step()[0] for _ in range(STEPS)]
    assert losses == pytest.approx(result["losses"], rel=1e-5)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(result["state"][name], value, rtol=1e-5, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------------------
# The command line.


def test_train_command_trains_resumes_and_saves(tmp_path):
    from conftest import SHARED

    vocab = SHARED / "data" / "t5-vocab"
    if not vocab.exists():
        pytest.skip("the shared T5 vocabulary is not available")
    torch.manual_seed(0)
    config = t5kit.T5Config(vocab_size=32128, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2, dropout_rate=0.0)
    t5kit.T5ForConditionalGeneration(config).save_pretrained(tmp_path / "start")
    t5kit.AutoTokenizer.from_pretrained(vocab).save_pretrained(tmp_path / "start")
    rows = [{"input": f"translate English to German: house number {i}", "target": f"Haus Nummer {i}"} for i in range(12)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = [sys.executable, "-m", "t5kit", "train", "--model", str(tmp_path / "start"), "--train", str(tmp_path / "train.jsonl"),
            "--eval", str(tmp_path / "train.jsonl"), "--output", str(tmp_path / "out"), "--batch-size", "4", "--save-steps", "3",
            "--lr", "0.01", "--metric", "chrf"]
    first = subprocess.run(base + ["--max-steps", "3"], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    again = subprocess.run(base + ["--max-steps", "6", "--resume"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "trained 6 steps" in again.stdout and "eval_loss" in again.stdout and "chrf" in again.stdout
    assert sorted(p for p in os.listdir(tmp_path / "out") if p.startswith("checkpoint")) == ["checkpoint-3", "checkpoint-6"]
    model = t5kit.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "out")
    assert isinstance(model, t5kit.T5ForConditionalGeneration)
    # The same 6 steps in one go give the same weights as 3 + resume + 3.
    straight_args = [a if a != str(tmp_path / "out") else str(tmp_path / "straight") for a in base] + ["--max-steps", "6"]
    straight = subprocess.run(straight_args, capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr
    other = t5kit.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "straight")
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name
    bad = subprocess.run([*base[:7], str(tmp_path / "missing.jsonl"), *base[8:-2]], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "missing.jsonl" in bad.stderr


def test_train_command_passes_torch_compile(tmp_path, monkeypatch):
    """--torch-compile reaches TrainingArguments (the compiled step itself: test_torch_compile_trains_as_eager)."""
    from conftest import SHARED

    import t5kit.training
    from t5kit.cli import main

    vocab = SHARED / "data" / "t5-vocab"
    if not vocab.exists():
        pytest.skip("the shared T5 vocabulary is not available")
    make_model().save_pretrained(tmp_path / "start")
    (tmp_path / "train.jsonl").write_text(json.dumps({"input": "a b", "target": "c"}) + "\n")
    seen = {}

    class Recorder:
        def __init__(self, model, args, *rest, **kw):
            seen["args"] = args
            raise _Killed

    monkeypatch.setattr(t5kit.training, "Trainer", Recorder)
    base = ["train", "--model", str(tmp_path / "start"), "--tokenizer", str(vocab), "--train", str(tmp_path / "train.jsonl"),
            "--output", str(tmp_path / "out")]
    for flag, expected in (([], False), (["--torch-compile"], True)):
        with pytest.raises(_Killed):
            main(base + flag)
        assert seen.pop("args").torch_compile is expected


def test_demo_meets_its_accuracy_and_time_bounds():
    """The README's main job: train a byte-level T5 offline, save, reload, >= 90% exact match in <= 3 minutes."""
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "t5kit", "demo"], capture_output=True, text=True, timeout=400)
    elapsed = time.perf_counter() - start
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    line = next(l for l in run.stdout.splitlines() if l.startswith("exact match"))
    accuracy = float(line.split("=")[1].split("%")[0]) / 100
    assert accuracy >= 0.9, line
    assert elapsed <= 180, f"the demo took {elapsed:.0f} s"
    assert "google-t5/t5-small" in run.stdout  # then shows how to run a Hub model
