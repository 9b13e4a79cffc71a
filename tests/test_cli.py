"""The command line, through subprocesses: run (stdin -> stdout), batch (resumable), info."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest

import t5kit

from test_pipelines import TEXTS, VOCAB, make_checkpoint

CLI = [sys.executable, "-m", "t5kit"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    if not VOCAB.exists():
        pytest.skip("the shared T5 vocabulary is not available")
    path = tmp_path_factory.mktemp("cli-t5")
    make_checkpoint(path, seed=1)
    return path


def cli(*args, stdin: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], input=stdin, capture_output=True, text=True, timeout=timeout)


def test_run_reads_stdin_and_prints_one_line_each(checkpoint):
    texts = [t for t in TEXTS if t]
    out = cli("run", "--task", "text2text-generation", "--model", checkpoint, "--max-new-tokens", 6, stdin="\n".join(texts) + "\n")
    assert out.returncode == 0, out.stderr
    pipe = t5kit.pipeline("text2text-generation", model=str(checkpoint))
    assert out.stdout.splitlines() == [r["generated_text"] for r in pipe(texts, max_new_tokens=6)]


def test_console_script_and_options(checkpoint):
    exe = shutil.which("t5kit")
    if exe is None:
        pytest.skip("the t5kit console script is not on PATH (package not installed with pip)")
    args = ["run", "--task", "summarization", "--model", str(checkpoint), "--max-length", "12", "--min-length", "0",
            "--num-beams", "2", "--batch-size", "2", "--device", "-1", "--dtype", "float32"]
    out = subprocess.run([exe, *args], input="One.\nTwo three.\nFour.\n", capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    pipe = t5kit.pipeline("summarization", model=str(checkpoint))
    expected = pipe(["One.", "Two three.", "Four."], max_length=12, min_length=0, num_beams=2)
    assert out.stdout.splitlines() == [r["summary_text"] for r in expected]


def test_run_int8_equals_the_quantized_pipeline(checkpoint):
    texts = [t for t in TEXTS if t][:3]
    out = cli("run", "--model", checkpoint, "--int8", "--max-new-tokens", 6, stdin="\n".join(texts) + "\n")
    assert out.returncode == 0, out.stderr
    pipe = t5kit.pipeline("text2text-generation", model=str(checkpoint))
    t5kit.quantize_dynamic(pipe.model)
    assert out.stdout.splitlines() == [r["generated_text"] for r in pipe(texts, max_new_tokens=6)]
    bad = cli("run", "--model", checkpoint, "--int8", "--dtype", "bfloat16", stdin="x\n")
    assert bad.returncode != 0 and "--int8 quantizes a float32 model" in bad.stderr


def test_inference_commands_prepack_cpu_weights(checkpoint):
    from t5kit.cli import _build_pipeline, _parser

    pipe = _build_pipeline(_parser().parse_args(["run", "--model", str(checkpoint)]), "text2text-generation", 1)
    assert pipe.model.inference_only == "prepacked"
    plain = _build_pipeline(_parser().parse_args(["run", "--model", str(checkpoint), "--no-prepack"]), "text2text-generation", 1)
    assert getattr(plain.model, "inference_only", None) is None
    texts = [t for t in TEXTS if t][:3]
    assert pipe(texts, max_new_tokens=6) == plain(texts, max_new_tokens=6)


def test_run_static_cache_equals_the_default(checkpoint):
    texts = [t for t in TEXTS if t][:2]
    default = cli("run", "--model", checkpoint, "--max-new-tokens", 6, stdin="\n".join(texts) + "\n")
    static = cli("run", "--model", checkpoint, "--max-new-tokens", 6, "--cache-implementation", "static",
                 stdin="\n".join(texts) + "\n")
    assert default.returncode == 0 and static.returncode == 0, static.stderr
    assert static.stdout == default.stdout and len(static.stdout.splitlines()) == 2


def test_static_cache_blocks_the_step_on_every_cpu(checkpoint, monkeypatch):
    """With --cache-implementation static the model only ever decodes with the compiled step, so the
    command line blocks that step's layers even where the library's default (AVX-512) does not."""
    from t5kit import packing
    from t5kit.cli import _build_pipeline, _parser
    from t5kit.modeling import blocked_linear_lowered

    monkeypatch.setattr(packing, "BLOCK_DECODING_STEP", False)  # the AVX-512 default, on any CPU
    plain = _build_pipeline(_parser().parse_args(["run", "--model", str(checkpoint)]), "text2text-generation", 1)
    assert packing.BLOCK_DECODING_STEP is False
    static = _build_pipeline(_parser().parse_args(["run", "--model", str(checkpoint), "--cache-implementation", "static"]),
                             "text2text-generation", 1)
    assert packing.BLOCK_DECODING_STEP is True
    texts = [t for t in TEXTS if t][:2]
    assert static(texts, max_new_tokens=6) == plain(texts, max_new_tokens=6)
    blocked = any(isinstance(m, packing.BlockedLinear) for m in static.model.modules())
    assert blocked == blocked_linear_lowered()
    assert not any(isinstance(m, packing.BlockedLinear) for m in plain.model.modules())


def test_run_feature_extraction_prints_json(checkpoint):
    out = cli("run", "--task", "feature-extraction", "--model", checkpoint, stdin="hello\n")
    assert out.returncode == 0, out.stderr
    vec = json.loads(out.stdout)
    assert len(vec) == 32


@pytest.mark.parametrize(
    "args, stdin, message",
    [
        (["run", "--task", "colouring", "--model", "{ckpt}"], "x\n", "Unknown task"),
        (["run", "--model", "{ckpt}"], "", "no input"),
        (["run", "--model", "{tmp}/absent"], "x\n", "absent"),
        (["run", "--model", "{ckpt}", "--num-beams", "2", "--num-return-sequences", "3"], "x\n", "num_return_sequences"),
        (["batch", "--model", "{ckpt}", "--input", "{tmp}/empty.txt", "--output", "{tmp}/o.jsonl"], None, "no records"),
        (["info", "{tmp}/notes"], None, "no config.json"),
    ],
)
def test_clear_errors(checkpoint, tmp_path, monkeypatch, capsys, args, stdin, message):
    """In-process (the subprocess tests above cover the entry point): exit status 2, one line, no traceback."""
    import io

    from t5kit.cli import main

    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "notes").mkdir()
    args = [a.format(ckpt=checkpoint, tmp=tmp_path) for a in args]
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin or ""))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_info(checkpoint):
    out = cli("info", checkpoint, "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    model = t5kit.T5ForConditionalGeneration.from_pretrained(checkpoint)
    assert info["family"] == "t5" and info["parameters"] == model.num_parameters()
    assert info["dtypes"] == ["float32"] and "model.safetensors" in info["files"]
    text = cli("info", checkpoint).stdout
    assert f"parameters {model.num_parameters():,}" in text and "d_model 32" in text


# ------------------------------------------------------------------------------------------------
# batch


def _records(n: int) -> list[dict]:
    words = "the house is wonderful and the dog sleeps near a warm fire all day long".split()
    return [{"id": f"r{i}", "text": " ".join(words[: 2 + (i * 7) % 12])} for i in range(n)]


def test_batch_jsonl_keeps_ids_and_order(checkpoint, tmp_path):
    records = _records(23)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = cli("batch", "--model", checkpoint, "--input", src, "--output", tmp_path / "out.jsonl", "--batch-size", 4,
              "--max-new-tokens", 5)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(l) for l in (tmp_path / "out.jsonl").read_text().splitlines()]
    pipe = t5kit.pipeline("text2text-generation", model=str(checkpoint))
    expected = pipe([r["text"] for r in records], max_new_tokens=5)
    assert [l["id"] for l in lines] == [r["id"] for r in records]
    assert [l["generated_text"] for l in lines] == [e["generated_text"] for e in expected]
    assert "tok/s" in out.stderr  # the progress bar



def test_batch_txt_input_and_finished_outputs(checkpoint, tmp_path, capsys):
    from t5kit.cli import main

    records = _records(5)
    txt = tmp_path / "in.txt"
    txt.write_text("".join(r["text"] + "\n" for r in records))
    dst = tmp_path / "txt.jsonl"
    assert main(["batch", "--model", str(checkpoint), "--input", str(txt), "--output", str(dst), "--max-new-tokens", "5"]) == 0
    lines = [json.loads(l) for l in dst.read_text().splitlines()]
    pipe = t5kit.pipeline("text2text-generation", model=str(checkpoint))
    expected = pipe([r["text"] for r in records], max_new_tokens=5)
    assert [l["id"] for l in lines] == list(range(5)) and [l["generated_text"] for l in lines] == [e["generated_text"] for e in expected]
    capsys.readouterr()
    assert main(["batch", "--model", str(checkpoint), "--input", str(txt), "--output", str(dst)]) == 0
    assert "already holds all 5" in capsys.readouterr().err
    src = tmp_path / "other.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["batch", "--model", str(checkpoint), "--input", str(src), "--output", str(dst)]) == 2
    assert "another input" in capsys.readouterr().err


def _count_lines(path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_batch_resumes_after_a_kill(checkpoint, tmp_path, sig):
    records = _records(120)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    dst = tmp_path / "out.jsonl"
    args = [*CLI, "batch", "--model", str(checkpoint), "--input", str(src), "--output", str(dst), "--batch-size", "2",
            "--max-new-tokens", "12"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while _count_lines(dst) < 10 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    done_at_kill = _count_lines(dst)
    assert 0 < done_at_kill < len(records), "the run must be stopped midway"
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "Run the same command to continue" in err
    # A kill during a write leaves a partial line: resuming must drop it, not keep or duplicate it.
    with open(dst, "ab") as f:
        f.write(b'{"id": "r999", "generated_te')
    out = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(l) for l in dst.read_text().splitlines()]
    assert [l["id"] for l in lines] == [r["id"] for r in records]  # all, once, in order
    fresh = tmp_path / "fresh.jsonl"
    full = subprocess.run([*args[:-6], "--output", str(fresh), *args[-4:]], capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr
    assert dst.read_text() == fresh.read_text()
