"""Auto classes dispatch on model_type."""

from __future__ import annotations

import pytest
import torch

import t5kit
from conftest import VARIANTS


@pytest.mark.parametrize("family", ["T5", "MT5", "UMT5"])
@pytest.mark.parametrize(
    "auto, suffix",
    [
        ("AutoModel", "Model"),
        ("AutoModelForSeq2SeqLM", "ForConditionalGeneration"),
        ("AutoModelForSequenceClassification", "ForSequenceClassification"),
        ("AutoModelForTokenClassification", "ForTokenClassification"),
        ("AutoModelForQuestionAnswering", "ForQuestionAnswering"),
        ("AutoModelForTextEncoding", "EncoderModel"),
    ],
)
def test_auto_classes_pick_the_family(family: str, auto: str, suffix: str, tmp_path) -> None:
    config = getattr(t5kit, f"{family}Config")(**VARIANTS["relu_tied"])
    model = getattr(t5kit, auto).from_config(config)
    assert type(model) is getattr(t5kit, f"{family}{suffix}")
    model.save_pretrained(tmp_path)
    assert type(t5kit.AutoConfig.from_pretrained(tmp_path)) is type(config)
    loaded = getattr(t5kit, auto).from_pretrained(tmp_path)
    assert type(loaded) is type(model)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_auto_errors() -> None:
    with pytest.raises(OSError, match="from_pretrained or from_config"):
        t5kit.AutoModel()
    with pytest.raises(ValueError, match="not a T5-family model"):
        t5kit.AutoConfig.for_model("bert")
    assert type(t5kit.AutoConfig.for_model("umt5", d_model=8)) is t5kit.UMT5Config
