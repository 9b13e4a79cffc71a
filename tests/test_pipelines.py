"""pipeline(): each task on a small random model with the real T5 vocabulary, against transformers.

transformers 5.23 has no text2text-generation, summarization or translation pipeline; for those
the reference is what its pipeline did: the task prefix and task_specific_params, then
generate and decode. feature-extraction is compared with transformers' own pipeline.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import t5kit

from conftest import SHARED, hf

VOCAB = SHARED / "data" / "t5-vocab"
TASK_PARAMS = json.loads((VOCAB / "t5-base-config.json").read_text())["task_specific_params"] if VOCAB.exists() else {}
TEXTS = [
    "The house is wonderful.",
    "Studies have shown that owning a dog is good for you, and the effect lasts for years after.",
    "",
    "Short one.",
]


def make_checkpoint(path, seed: int = 0):
    """A random transformers T5 with the real vocabulary size, its tokenizer files and t5-base's task params."""
    transformers = hf()
    torch.manual_seed(seed)
    config = transformers.T5Config(
        vocab_size=32128, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, dropout_rate=0.0,
        decoder_start_token_id=0, task_specific_params=TASK_PARAMS,
    )
    model = transformers.T5ForConditionalGeneration(config).eval()
    model.save_pretrained(path)
    for name in ("tokenizer.json", "spiece.model"):
        shutil.copy(VOCAB / name, path / name)
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    if not VOCAB.exists():
        pytest.skip("the shared T5 vocabulary is not available")
    path = tmp_path_factory.mktemp("tiny-t5")
    make_checkpoint(path)
    return path


def reference_generate(path, texts, prefix="", **kwargs):
    transformers = hf()
    model = transformers.T5ForConditionalGeneration.from_pretrained(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    out = []
    for text in texts:  # one at a time: the reference's pipelines ran unbatched by default
        enc = tokenizer([prefix + text], return_tensors="pt")
        ids = model.generate(**enc, **kwargs)
        out.append(tokenizer.decode(ids[0], skip_special_tokens=True))
    return out


def test_text2text_generation(checkpoint):
    pipe = t5kit.pipeline("text2text-generation", model=str(checkpoint), batch_size=3)
    got = pipe(TEXTS, max_new_tokens=8)
    assert [r["generated_text"] for r in got] == reference_generate(checkpoint, TEXTS, max_new_tokens=8)
    single = pipe(TEXTS[0], max_new_tokens=8)
    assert single == [got[0]]
    many = pipe(TEXTS[:2], max_new_tokens=8, num_beams=3, num_return_sequences=2)
    assert [len(x) for x in many] == [2, 2] and all("generated_text" in d for x in many for d in x)
    ids = pipe(TEXTS[0], max_new_tokens=8, return_tensors=True, return_text=False)[0]["generated_token_ids"]
    assert pipe.tokenizer.decode(ids, skip_special_tokens=True) == got[0]["generated_text"]


def test_summarization_uses_task_specific_params(checkpoint):
    pipe = t5kit.pipeline("summarization", model=str(checkpoint))
    assert pipe.prefix == "summarize: "
    assert pipe.generate_kwargs["num_beams"] == 4 and pipe.generate_kwargs["no_repeat_ngram_size"] == 3
    params = {k: v for k, v in TASK_PARAMS["summarization"].items() if k != "prefix"}
    params.update(max_length=24, min_length=5)  # keep the test short; the rest is t5-base's
    got = pipe(TEXTS[:2], max_length=24, min_length=5)
    assert [r["summary_text"] for r in got] == reference_generate(checkpoint, TEXTS[:2], "summarize: ", **params)


@pytest.mark.parametrize("task", ["translation", "translation_en_to_fr", "translation_de_to_en"])
def test_translation(checkpoint, task):
    pipe = t5kit.pipeline(task, model=str(checkpoint), max_new_tokens=6)
    expected_prefix = {
        "translation": "translate English to German: ",  # the config's first translation entry
        "translation_en_to_fr": "translate English to French: ",
        "translation_de_to_en": "translate German to English: ",  # not in the config: built from the codes
    }[task]
    assert pipe.prefix == expected_prefix
    params = {k: v for k, v in TASK_PARAMS.get(pipe.task, {}).items() if k != "prefix"}
    got = pipe(TEXTS[:2])
    assert [r["translation_text"] for r in got] == reference_generate(checkpoint, TEXTS[:2], expected_prefix, **params, max_new_tokens=6)


def test_feature_extraction_equals_reference_pipeline(checkpoint):
    transformers = hf()
    ref = transformers.pipeline(
        "feature-extraction",
        model=transformers.T5EncoderModel.from_pretrained(checkpoint),
        tokenizer=transformers.AutoTokenizer.from_pretrained(checkpoint),
    )
    pipe = t5kit.pipeline("feature-extraction", model=str(checkpoint), batch_size=4)
    got = pipe(TEXTS)
    for text, ours in zip(TEXTS, got):
        expected = torch.tensor(ref(text))
        torch.testing.assert_close(torch.tensor(ours), expected, rtol=1e-5, atol=1e-5)
    pooled = pipe(TEXTS[:2], pooling="mean", return_tensors=True)
    for text, vec in zip(TEXTS[:2], pooled):
        torch.testing.assert_close(vec, torch.tensor(ref(text))[0].mean(0), rtol=1e-5, atol=1e-5)
    unit = pipe(TEXTS[1], pooling="mean", normalize=True, return_tensors=True)
    assert abs(float(unit.norm()) - 1.0) < 1e-5


def test_batching_keeps_order(checkpoint):
    one = t5kit.pipeline("text2text-generation", model=str(checkpoint), batch_size=1)
    many = t5kit.pipeline("text2text-generation", model=one.model, tokenizer=one.tokenizer, batch_size=3)
    texts = TEXTS * 2
    assert one(texts, max_new_tokens=6) == many(texts, max_new_tokens=6)


def test_pipeline_errors(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="Unknown task"):
        t5kit.pipeline("fill-mask", model=str(checkpoint))
    with pytest.raises(ValueError, match="needs model="):
        t5kit.pipeline("summarization")
    with pytest.raises(OSError):
        t5kit.pipeline("summarization", model=str(tmp_path / "absent"))
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(ValueError, match="bert"):
        t5kit.pipeline("summarization", model=str(bert))
    pipe = t5kit.pipeline("text2text-generation", model=str(checkpoint))
    with pytest.raises(ValueError, match="empty list"):
        pipe([])
    with pytest.raises(TypeError, match="strings"):
        pipe([1, 2])
    with pytest.raises(ValueError, match="batch_size"):
        t5kit.pipeline("text2text-generation", model=pipe.model, tokenizer=pipe.tokenizer, batch_size=0)


def _hub_cache(tmp_path, checkpoint) -> tuple[str, str]:
    cache = tmp_path / "hub"
    sha = "89abcdef0123456789abcdef0123456789abcdef"
    repo = cache / "models--acme--tiny-t5-vocab"
    shutil.copytree(checkpoint, repo / "snapshots" / sha)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    return str(cache), "acme/tiny-t5-vocab"


def test_hub_id_offline_in_a_fresh_process(checkpoint, tmp_path):
    cache, repo = _hub_cache(tmp_path, checkpoint)
    code = (
        "import t5kit\n"
        f"p = t5kit.pipeline('text2text-generation', model={repo!r}, max_new_tokens=5)\n"
        f"print(p({TEXTS[0]!r})[0]['generated_text'])\n"
        "try:\n"
        "    t5kit.pipeline('summarization', model='acme/absent')\n"
        "except OSError as e:\n"
        "    print('OSError:', e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": cache}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    expected = reference_generate(checkpoint, TEXTS[:1], max_new_tokens=5)[0]
    lines = out.stdout.splitlines()
    assert lines[0] == expected
    assert "not in the local Hugging Face cache" in lines[1]
