"""Checkpoints in the Hub layout (safetensors, shards, .bin, Hub cache), and clear errors for bad input."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

import t5kit
from conftest import (
    ROOT, VARIANTS, assert_rel_close, hf, load_hf, make_batch, needs_peak_memory, peak_growth_mb, save_hf_model, tiny_model,
)


def _logits(model, vocab: int) -> torch.Tensor:
    ids, mask, dec = make_batch(vocab)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits


@pytest.mark.parametrize("family", ["T5", "MT5", "UMT5"])
@pytest.mark.parametrize("variant", ["relu_tied", "gated_untied"])
def test_reference_loads_what_we_save(family: str, variant: str, tmp_path) -> None:
    ours = tiny_model(family, variant)
    ours.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "generation_config.json", "model.safetensors"]
    ref = load_hf(family, "ForConditionalGeneration", tmp_path)
    tied = VARIANTS[variant]["tie_word_embeddings"]
    if (family == "UMT5" and not tied) or (family == "MT5" and tied):
        # The reference's head rule differs here (see test_modeling); its network equals ours.
        headless = getattr(hf(), f"{family}Model").from_pretrained(tmp_path).eval()
        ids, mask, dec = make_batch(ours.config.vocab_size)
        with torch.no_grad():
            hidden = headless(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).last_hidden_state
            mine = ours.get_decoder()(input_ids=dec, encoder_hidden_states=ours.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state, encoder_attention_mask=mask).last_hidden_state
        assert_rel_close(mine, hidden)
        assert torch.equal(ref.lm_head.weight, ours.lm_head.weight)
    else:
        assert_rel_close(_logits(ours, ours.config.vocab_size), _logits(ref, ours.config.vocab_size))


def test_sharded_safetensors_from_reference_load(tmp_path) -> None:
    save_hf_model("T5", "ForConditionalGeneration", "gated_untied", tmp_path)
    ref = load_hf("T5", "ForConditionalGeneration", tmp_path)
    sharded = tmp_path / "sharded"
    ref.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert len([f for f in os.listdir(sharded) if f.endswith(".safetensors")]) > 2
    ours = t5kit.T5ForConditionalGeneration.from_pretrained(sharded)
    assert_rel_close(_logits(ours, 103), _logits(ref, 103))


@pytest.mark.parametrize("sharded", [False, True])
def test_pytorch_bin_checkpoints_load(sharded: bool, tmp_path) -> None:
    """Old-style pytorch_model.bin: every key written, embedding aliases and the unused bias included."""
    ref = save_hf_model("T5", "ForConditionalGeneration", "relu_tied", tmp_path / "src")
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    state["encoder.embed_tokens.weight"] = state["shared.weight"].clone()
    state["decoder.embed_tokens.weight"] = state["shared.weight"].clone()
    state["lm_head.weight"] = state["shared.weight"].clone()
    state["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"] = torch.zeros(8, 3)
    out = tmp_path / "bin"
    out.mkdir()
    ref.config.save_pretrained(out)
    if sharded:
        keys = sorted(state)
        halves = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
        names = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
        for name, part in zip(names, halves):
            torch.save({k: state[k] for k in part}, out / name)
        index = {"metadata": {}, "weight_map": {k: n for n, part in zip(names, halves) for k in part}}
        (out / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    else:
        torch.save(state, out / "pytorch_model.bin")
    ours, info = t5kit.T5ForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    assert ours.lm_head.weight is ours.shared.weight
    assert_rel_close(_logits(ours, 97), _logits(load_hf("T5", "ForConditionalGeneration", tmp_path / "src"), 97))


def test_our_sharded_save_round_trips_and_reference_loads_it(tmp_path) -> None:
    ours = tiny_model("T5", "gated_untied")
    ours.save_pretrained(tmp_path, max_shard_size="10KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((tmp_path / s).exists() for s in shards)
    assert "lm_head.weight" in index["weight_map"] and "encoder.embed_tokens.weight" not in index["weight_map"]
    again = t5kit.T5ForConditionalGeneration.from_pretrained(tmp_path)
    assert torch.equal(_logits(again, 103), _logits(ours, 103))
    assert_rel_close(_logits(load_hf("T5", "ForConditionalGeneration", tmp_path), 103), _logits(ours, 103))
    # Saving again unsharded removes the shards and index of the earlier save.
    ours.save_pretrained(tmp_path)
    assert sorted(f for f in os.listdir(tmp_path)) == ["config.json", "generation_config.json", "model.safetensors"]


def test_save_is_atomic(tmp_path, monkeypatch) -> None:
    import safetensors.torch

    ours = tiny_model()
    ours.save_pretrained(tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with torch.no_grad():
        ours.shared.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="disk full"):
        ours.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["config.json", "generation_config.json", "model.safetensors"]  # no temporary left


def test_loading_keeps_one_copy_of_the_weights(tmp_path, monkeypatch) -> None:
    """The model's parameters are the very tensors read from disk: no second copy, no random init."""
    import t5kit.modeling_utils as mu

    tiny_model().save_pretrained(tmp_path)
    read_ptrs: set[int] = set()
    original = mu.load_checkpoint_state

    def recording(*args, **kwargs):
        state, dtype = original(*args, **kwargs)
        read_ptrs.update(t.data_ptr() for t in state.values())
        return state, dtype

    monkeypatch.setattr(mu, "load_checkpoint_state", recording)
    init_calls = []
    monkeypatch.setattr(mu, "_init_parameter", lambda name, p, c: init_calls.append(name) if not p.is_meta else None)
    model = t5kit.T5ForConditionalGeneration.from_pretrained(tmp_path)
    assert {p.data_ptr() for p in model.parameters()} <= read_ptrs
    assert init_calls == []


def test_missing_and_unexpected_keys_are_reported(tmp_path, caplog) -> None:
    from safetensors.torch import load_file, save_file

    tiny_model().save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
    state["encoder.block.9.extra.weight"] = torch.zeros(2)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING, logger="t5kit"):
        model, info = t5kit.T5ForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == ["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
    assert info["unexpected_keys"] == ["encoder.block.9.extra.weight"]
    assert "newly initialised" in caplog.text and "not used" in caplog.text
    assert not any(p.is_meta for p in model.parameters())
    assert model.encoder.block[1].layer[1].DenseReluDense.wo.weight.std() > 0


def test_encoder_and_heads_load_from_a_full_checkpoint(tmp_path, caplog) -> None:
    tiny_model("UMT5", "gated_untied").save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="t5kit"):
        enc, info = t5kit.UMT5EncoderModel.from_pretrained(tmp_path, output_loading_info=True)
    assert info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
    tok, info = t5kit.UMT5ForTokenClassification.from_pretrained(tmp_path, output_loading_info=True, num_labels=3)
    assert info["missing_keys"] == ["classifier.weight", "classifier.bias"] and info["unexpected_keys"] == []
    assert torch.equal(tok.transformer.shared.weight, enc.shared.weight)
    seq, info = t5kit.UMT5ForSequenceClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert info["unexpected_keys"] == ["lm_head.weight"] and all(k.startswith("classification_head") for k in info["missing_keys"])
    # ... and a head checkpoint loads back into the bare model (prefix stripped).
    seq.save_pretrained(tmp_path / "seq")
    base, info = t5kit.UMT5Model.from_pretrained(tmp_path / "seq", output_loading_info=True)
    assert info["missing_keys"] == [] and all(k.startswith("classification_head") for k in info["unexpected_keys"])


def test_dtype_and_device_options(tmp_path) -> None:
    tiny_model().save_pretrained(tmp_path)
    assert t5kit.T5ForConditionalGeneration.from_pretrained(tmp_path).dtype == torch.float32
    bf16 = t5kit.T5ForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16, device="cpu")
    assert bf16.dtype == torch.bfloat16 and bf16.device == torch.device("cpu")
    assert t5kit.T5ForConditionalGeneration.from_pretrained(tmp_path, torch_dtype="float16").dtype == torch.float16
    bf16.save_pretrained(tmp_path / "bf16")
    assert t5kit.T5ForConditionalGeneration.from_pretrained(tmp_path / "bf16", dtype="auto").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="Unknown dtype"):
        t5kit.T5ForConditionalGeneration.from_pretrained(tmp_path, dtype="int3")


def test_dtype_conversion_while_loading_is_to_dtype_chunk_by_chunk() -> None:
    """from_pretrained converts a tensor a chunk at a time: the values of tensor.to(dtype)."""
    from t5kit._files import MappedPages
    from t5kit.modeling_utils import _convert_releasing

    torch.manual_seed(0)
    x = torch.randn(37, 11) * 1e3
    for dtype in (torch.bfloat16, torch.float16):
        for chunk_bytes in (4, 44, 1 << 20):  # one float, 11 floats, all of it
            out = _convert_releasing(x, dtype, MappedPages(), chunk_bytes=chunk_bytes)
            assert out.dtype == dtype and torch.equal(out, x.to(dtype))
    assert torch.equal(_convert_releasing(x.t(), torch.bfloat16, MappedPages()), x.t().to(torch.bfloat16))


@needs_peak_memory
def test_loading_in_bfloat16_never_holds_the_float32_file(big_head_checkpoint) -> None:
    """A float32 checkpoint (128 MB: a 64 MB embedding and a 64 MB head) loaded as bfloat16 (64 MB):
    each tensor's pages in the file's memory map go back as it is converted, so peak memory grows
    by about the bfloat16 model plus a chunk (83 MB measured), not the whole float32 file beside
    it (196 MB before). The same for model.to(torch.bfloat16) of the float32 model, a tensor at a
    time (128 MB measured: the copies plus the largest source tensor; 193 MB before)."""
    path = repr(str(big_head_checkpoint))
    grow = peak_growth_mb("import torch, t5kit", f"t5kit.AutoModelForSeq2SeqLM.from_pretrained({path}, dtype=torch.bfloat16)")
    assert grow < 112, grow
    load = f"import torch, t5kit\nmodel = t5kit.AutoModelForSeq2SeqLM.from_pretrained({path})"
    grow = peak_growth_mb(load, "model.to(torch.bfloat16)")
    assert grow < 160, grow


def _hub_cache(tmp_path, model) -> tuple[str, str]:
    """Lay out a Hugging Face Hub cache on disk: models--org--name/{refs/main, snapshots/<sha>/...}."""
    cache = tmp_path / "hub"
    sha = "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "models--acme--tiny-t5" / "snapshots" / sha
    model.save_pretrained(snapshot)
    (cache / "models--acme--tiny-t5" / "refs").mkdir(parents=True)
    (cache / "models--acme--tiny-t5" / "refs" / "main").write_text(sha)
    return str(cache), "acme/tiny-t5"


def test_hub_id_loads_from_the_cache_offline(tmp_path) -> None:
    model = tiny_model()
    cache, repo = _hub_cache(tmp_path, model)
    loaded = t5kit.AutoModelForSeq2SeqLM.from_pretrained(repo, cache_dir=cache, local_files_only=True)
    assert torch.equal(_logits(loaded, 103), _logits(model, 103))
    with pytest.raises(OSError, match="not in the local Hugging Face cache"):
        t5kit.T5ForConditionalGeneration.from_pretrained("acme/absent", cache_dir=cache, local_files_only=True)


def test_hub_offline_env_in_a_fresh_process(tmp_path) -> None:
    cache, repo = _hub_cache(tmp_path, tiny_model())
    code = (
        "import t5kit, sys\n"
        f"m = t5kit.AutoModelForSeq2SeqLM.from_pretrained({repo!r}, cache_dir={cache!r})\n"
        "print(type(m).__name__)\n"
        "try:\n"
        f"    t5kit.AutoModel.from_pretrained('acme/absent', cache_dir={cache!r})\n"
        "except OSError as e:\n"
        "    print('OSError:', e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "T5ForConditionalGeneration" in out.stdout and "not in the local Hugging Face cache" in out.stdout


# ----------------------------------------------------------------------------------------------
# Bad checkpoints.


def test_config_that_does_not_match_the_weights(tmp_path) -> None:
    tiny_model().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["d_ff"] = 40
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="(?s)does not match the config.*wi_0"):
        t5kit.T5ForConditionalGeneration.from_pretrained(tmp_path)


def test_truncated_and_corrupt_weight_files(tmp_path) -> None:
    tiny_model().save_pretrained(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match="truncated or corrupt"):
        t5kit.T5ForConditionalGeneration.from_pretrained(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not a checkpoint")
    with pytest.raises(OSError, match="truncated, corrupt"):
        t5kit.T5ForConditionalGeneration.from_pretrained(tmp_path)
    os.remove(tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors.index.json").write_text("{\"weight_map\": ")
    with pytest.raises(OSError, match="not a valid shard index"):
        t5kit.T5ForConditionalGeneration.from_pretrained(tmp_path)


def test_pickled_code_is_refused(tmp_path) -> None:
    tiny_model().config.save_pretrained(tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"shared.weight": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(OSError, match="weights-only"):
        t5kit.T5ForConditionalGeneration.from_pretrained(tmp_path)


def test_directory_without_weights_or_config(tmp_path) -> None:
    tiny_model().config.save_pretrained(tmp_path)
    with pytest.raises(OSError, match="No weights found"):
        t5kit.T5ForConditionalGeneration.from_pretrained(tmp_path)
    with pytest.raises(OSError, match="has no config.json"):
        t5kit.T5ForConditionalGeneration.from_pretrained(tmp_path / "..")


def test_family_mismatch_is_refused(tmp_path) -> None:
    tiny_model("UMT5").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type='umt5'"):
        t5kit.T5ForConditionalGeneration.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match="needs a UMT5Config"):
        t5kit.UMT5Model(t5kit.T5Config())


# ----------------------------------------------------------------------------------------------
# Bad forward inputs.


@pytest.fixture(scope="module")
def model():
    return tiny_model("T5", "relu_tied")


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(input_ids=torch.ones(2, 5), decoder_input_ids=torch.ones(2, 3, dtype=torch.long)), TypeError, "integer token ids"),
        (dict(input_ids=torch.ones(5, dtype=torch.long), decoder_input_ids=torch.ones(2, 3, dtype=torch.long)), ValueError, "shape \\(batch, length\\)"),
        (dict(input_ids=torch.full((2, 5), 97), decoder_input_ids=torch.ones(2, 3, dtype=torch.long)), ValueError, "token id 97, outside the vocabulary \\[0, 97\\)"),
        (dict(input_ids=torch.full((2, 5), -1), decoder_input_ids=torch.ones(2, 3, dtype=torch.long)), ValueError, "token id -1"),
        (dict(input_ids=torch.ones(2, 5, dtype=torch.long), decoder_input_ids=torch.full((2, 3), 200)), ValueError, "decoder_input_ids holds token id 200"),
        (dict(input_ids=torch.ones(2, 5, dtype=torch.long), labels=torch.full((2, 3), 500)), ValueError, "labels holds token id 500.*-100"),
        (dict(input_ids=torch.ones(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4), decoder_input_ids=torch.ones(2, 3, dtype=torch.long)), ValueError, "attention_mask must have shape \\(2, 5\\)"),
        (dict(inputs_embeds=torch.ones(2, 5, 7), decoder_input_ids=torch.ones(2, 3, dtype=torch.long)), ValueError, "inputs_embeds must have shape \\(batch, length, 24\\)"),
        (dict(input_ids=torch.ones(2, 5, dtype=torch.long), inputs_embeds=torch.ones(2, 5, 24), decoder_input_ids=torch.ones(2, 3, dtype=torch.long)), ValueError, "exactly one of input_ids and inputs_embeds"),
        (dict(input_ids=torch.ones(2, 5, dtype=torch.long)), ValueError, "decoder_input_ids or decoder_inputs_embeds"),
        (dict(input_ids=torch.ones(2, 5, dtype=torch.long), decoder_input_ids=torch.ones(2, 3, dtype=torch.long), past_key_values=((1, 2),)), TypeError, "EncoderDecoderCache"),
        (dict(input_ids=torch.ones(2, 5, dtype=torch.long), decoder_input_ids=torch.ones(2, 3, dtype=torch.long), bogus=1), TypeError, "unexpected arguments: bogus"),
        (dict(encoder_outputs="hello", decoder_input_ids=torch.ones(2, 3, dtype=torch.long)), TypeError, "encoder_outputs must be"),
    ],
)
def test_bad_inputs_raise_clear_errors(model, kwargs, error, message) -> None:
    with pytest.raises(error, match=message):
        model(**kwargs)


def test_sequence_classification_needs_eos(tmp_path) -> None:
    config = t5kit.T5Config(**VARIANTS["relu_tied"])
    model = t5kit.T5ForSequenceClassification(config).eval()
    with pytest.raises(ValueError, match="at least one </s>"):
        model(input_ids=torch.full((2, 4), 5))
    ids = torch.tensor([[5, 1, 5, 1], [5, 5, 5, 1]])
    with pytest.raises(ValueError, match="same number of </s>"):
        model(input_ids=ids)


# ----------------------------------------------------------------------------------------------
# Reference helpers.


def test_helpers_match_reference(tmp_path) -> None:
    save_hf_model("T5", "ForConditionalGeneration", "gated_untied", tmp_path)
    ref = load_hf("T5", "ForConditionalGeneration", tmp_path)
    ours = t5kit.T5ForConditionalGeneration.from_pretrained(tmp_path)
    assert ours.num_parameters() == ref.num_parameters()
    assert ours.num_parameters(exclude_embeddings=True) == ref.num_parameters(exclude_embeddings=True)
    assert ours.get_encoder() is ours.encoder and ours.get_decoder() is ours.decoder
    assert ours.get_input_embeddings() is ours.shared and ours.get_output_embeddings() is ours.lm_head
    new = ours.resize_token_embeddings(110)
    assert new.num_embeddings == 110 and ours.lm_head.out_features == 110 and ours.config.vocab_size == 110
    assert ours.encoder.embed_tokens is new and ours.decoder.embed_tokens is new
    assert torch.equal(new.weight[:103], ref.shared.weight)
    out = ours(input_ids=torch.tensor([[105, 1]]), decoder_input_ids=torch.tensor([[0]]))
    assert out.logits.shape == (1, 1, 110)
    emb = torch.nn.Embedding(110, 20)
    ours.set_input_embeddings(emb)
    assert ours.encoder.embed_tokens is emb and ours.decoder.embed_tokens is emb


def test_outputs_index_like_tuples_and_dicts(model) -> None:
    ids, mask, dec = make_batch(97)
    out = model(input_ids=ids, labels=dec)
    assert out[0] is out.loss and out["logits"] is out.logits and out[1] is out.logits
    assert list(out.keys())[:2] == ["loss", "logits"] and "loss" in out
    assert out.to_tuple()[1] is out.logits
    loss, logits = out[:2]
    assert logits is out.logits


def test_package_works_without_transformers() -> None:
    code = (
        "import sys\n"
        "sys.modules['transformers'] = None  # any import of it now raises ImportError\n"
        "import torch, t5kit\n"
        "m = t5kit.T5ForConditionalGeneration(t5kit.T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2))\n"
        "print(tuple(m(input_ids=torch.tensor([[3, 4, 1]]), decoder_input_ids=torch.tensor([[0]])).logits.shape))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(1, 1, 50)"
    assert "import transformers" not in "".join(p.read_text() for p in (ROOT / "src" / "t5kit").rglob("*.py"))


def test_loading_imports_no_symbolic_maths(tmp_path) -> None:
    """Building the model on the meta device skips torch's default embedding init, whose meta
    ``normal_`` imports sympy (about 70 MB resident with what comes along) for nothing."""
    tiny_model().save_pretrained(tmp_path)
    code = (
        "import sys, t5kit\n"
        f"t5kit.AutoModelForSeq2SeqLM.from_pretrained({str(tmp_path)!r})\n"
        "print(sorted(m for m in ('sympy', 'mpmath') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
