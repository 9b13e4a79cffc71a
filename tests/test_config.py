"""Configs: defaults, real config.json files, round trips, validation."""

from __future__ import annotations

import json

import pytest

import t5kit
from conftest import SHARED, hf


@pytest.mark.parametrize(
    "cls, expected",
    [
        (t5kit.T5Config, dict(vocab_size=32128, d_model=512, d_ff=2048, num_layers=6, num_heads=8, feed_forward_proj="relu")),
        (t5kit.MT5Config, dict(vocab_size=250112, d_model=512, d_ff=1024, num_layers=8, num_heads=6, feed_forward_proj="gated-gelu")),
        (t5kit.UMT5Config, dict(vocab_size=250112, d_model=512, d_ff=1024, num_layers=8, num_heads=6, feed_forward_proj="gated-gelu")),
    ],
)
def test_defaults_are_the_small_checkpoints(cls, expected) -> None:
    config = cls()
    for key, value in expected.items():
        assert getattr(config, key) == value
    assert config.d_kv == 64 and config.num_decoder_layers == config.num_layers
    assert config.relative_attention_num_buckets == 32 and config.relative_attention_max_distance == 128
    assert config.dropout_rate == 0.1 and config.layer_norm_epsilon == 1e-6 and config.initializer_factor == 1.0
    assert config.pad_token_id == 0 and config.eos_token_id == 1 and config.decoder_start_token_id == 0
    assert config.use_cache and config.is_encoder_decoder and config.classifier_dropout == 0.0


@pytest.mark.parametrize("name", ["T5Config", "MT5Config", "UMT5Config"])
def test_defaults_equal_reference(name: str) -> None:
    ours, ref = getattr(t5kit, name)(), getattr(hf(), name)()
    for key in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
                "relative_attention_num_buckets", "relative_attention_max_distance", "dropout_rate",
                "layer_norm_epsilon", "initializer_factor", "feed_forward_proj", "use_cache", "pad_token_id",
                "eos_token_id", "classifier_dropout", "is_encoder_decoder", "num_labels", "dense_act_fn",
                "is_gated_act"):
        assert getattr(ours, key) == getattr(ref, key), key


def test_real_t5_base_config_loads_and_round_trips(tmp_path) -> None:
    path = SHARED / "data" / "t5-vocab" / "t5-base-config.json"
    raw = json.loads(path.read_text())
    config = t5kit.T5Config.from_json_file(path)
    assert config.d_model == 768 and config.num_heads == 12 and config.num_layers == 12
    assert config.tie_word_embeddings and config.rescale_output  # v1.0: tied and rescaled
    assert config.task_specific_params["translation_en_to_de"]["prefix"] == "translate English to German: "
    config.save_pretrained(tmp_path)
    again = json.loads((tmp_path / "config.json").read_text())
    for key, value in raw.items():  # every key survives, unused ones included
        assert again[key] == value, key
    assert t5kit.T5Config.from_pretrained(tmp_path) == config


def test_real_flan_t5_config_is_untied_and_gated() -> None:
    config = t5kit.AutoConfig.from_pretrained(SHARED / "data" / "flan-t5-small-tokenizer")
    assert type(config) is t5kit.T5Config
    assert config.feed_forward_proj == "gated-gelu" and config.is_gated_act and config.dense_act_fn == "gelu_new"
    assert not config.tie_word_embeddings and not config.rescale_output
    assert config.num_decoder_layers == 8 and config.num_layers == 8


def test_scale_decoder_outputs_is_read_when_present() -> None:
    # transformers 5.x writes tie_word_embeddings=true plus scale_decoder_outputs=false for v1.1.
    config = t5kit.T5Config.from_dict({"tie_word_embeddings": True, "scale_decoder_outputs": False})
    assert config.tie_word_embeddings and not config.rescale_output
    assert t5kit.T5Config(tie_word_embeddings=True).rescale_output
    assert not t5kit.T5Config(tie_word_embeddings=False).rescale_output


def test_to_dict_from_dict_and_labels() -> None:
    config = t5kit.MT5Config(num_layers=3, num_labels=4, some_future_key={"a": 1})
    assert config.num_labels == 4 and config.id2label[3] == "LABEL_3" and config.label2id["LABEL_2"] == 2
    data = config.to_dict()
    assert data["model_type"] == "mt5" and data["some_future_key"] == {"a": 1}
    assert data["id2label"] == {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2", "3": "LABEL_3"}
    again = t5kit.MT5Config.from_dict(json.loads(json.dumps(data)))
    assert again == config and again.id2label[0] == "LABEL_0"
    assert config.hidden_size == 512 and config.num_attention_heads == 6 and config.num_hidden_layers == 3


def test_reference_reads_our_config(tmp_path) -> None:
    t5kit.UMT5Config(d_model=32, num_layers=2, num_decoder_layers=3, feed_forward_proj="gated-silu").save_pretrained(tmp_path)
    ref = hf().AutoConfig.from_pretrained(tmp_path)
    assert type(ref).__name__ == "UMT5Config"
    assert (ref.d_model, ref.num_layers, ref.num_decoder_layers, ref.dense_act_fn) == (32, 2, 3, "silu")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(feed_forward_proj="gated-nope"), "feed_forward_proj"),
        (dict(feed_forward_proj="fancy-gelu"), "feed_forward_proj"),
        (dict(d_model=0), "d_model"),
        (dict(num_heads=2.5), "num_heads"),
        (dict(relative_attention_num_buckets=1), "relative_attention_num_buckets"),
    ],
)
def test_invalid_configs_raise(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        t5kit.T5Config(**kwargs)


def test_wrong_model_type_and_bad_files(tmp_path) -> None:
    with pytest.raises(ValueError, match="model_type='umt5'.*AutoConfig"):
        t5kit.T5Config.from_dict({"model_type": "umt5"})
    (tmp_path / "config.json").write_text('{"d_model": 8,')
    with pytest.raises(OSError, match="not valid JSON"):
        t5kit.T5Config.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="not a T5-family model"):
        t5kit.AutoConfig.from_pretrained(tmp_path)
    with pytest.raises(OSError, match="has no config.json"):
        t5kit.T5Config.from_pretrained(tmp_path / "..")
