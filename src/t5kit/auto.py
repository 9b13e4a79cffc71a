"""Auto classes: pick the family's class from ``config.json``'s ``model_type`` (t5, mt5, umt5)."""

from __future__ import annotations

import os
from typing import Any

from . import modeling as m
from .config import CONFIG_CLASSES, T5Config, _HUB_KWARGS, _read_json
from .modeling_utils import PreTrainedModel, config_class_for

__all__ = [
    "AutoConfig",
    "AutoModel",
    "AutoModelForSeq2SeqLM",
    "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification",
    "AutoModelForQuestionAnswering",
    "AutoModelForTextEncoding",
]


class AutoConfig:
    """``AutoConfig.from_pretrained(path_or_id)`` returns a T5Config, MT5Config or UMT5Config."""

    @staticmethod
    def from_pretrained(pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> T5Config:
        from ._files import resolve_file

        hub_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in _HUB_KWARGS}
        path = os.fspath(pretrained_model_name_or_path)
        config_file = path if os.path.isfile(path) else resolve_file(path, "config.json", required=True, **hub_kwargs)
        data = _read_json(config_file)  # type: ignore[arg-type]
        if "model_type" not in data:
            raise ValueError(f"{config_file} has no model_type; load it with T5Config, MT5Config or UMT5Config")
        return config_class_for(data["model_type"]).from_dict(data, **kwargs)

    @staticmethod
    def for_model(model_type: str, **kwargs: Any) -> T5Config:
        return config_class_for(model_type)(**kwargs)


class _AutoModel:
    _mapping: dict[str, type[PreTrainedModel]]

    def __init__(self) -> None:
        raise OSError(f"{type(self).__name__} is not meant to be instantiated: use from_pretrained or from_config")

    @classmethod
    def _class_for(cls, config: T5Config) -> type[PreTrainedModel]:
        if not isinstance(config, T5Config):
            raise TypeError(f"Expected a T5-family config, got {type(config).__name__}")
        return cls._mapping[config.model_type]

    @classmethod
    def from_config(cls, config: T5Config) -> PreTrainedModel:
        """A randomly initialised model of the config's family."""
        return cls._class_for(config)(config)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
        """Load a checkpoint with the class of its ``model_type``; arguments as ``from_pretrained``."""
        config = kwargs.pop("config", None)
        if config is None:
            hub_kwargs = {k: kwargs[k] for k in kwargs if k in _HUB_KWARGS}
            config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        return cls._class_for(config).from_pretrained(pretrained_model_name_or_path, config=config, **kwargs)


def _mapping(suffix: str) -> dict[str, type[PreTrainedModel]]:
    prefixes = {"t5": "T5", "mt5": "MT5", "umt5": "UMT5"}
    return {k: getattr(m, prefixes[k] + suffix) for k in CONFIG_CLASSES}


class AutoModel(_AutoModel):
    """The bare ``Model`` of the family."""

    _mapping = _mapping("Model")


class AutoModelForSeq2SeqLM(_AutoModel):
    """``ForConditionalGeneration`` of the family."""

    _mapping = _mapping("ForConditionalGeneration")


class AutoModelForSequenceClassification(_AutoModel):
    _mapping = _mapping("ForSequenceClassification")


class AutoModelForTokenClassification(_AutoModel):
    _mapping = _mapping("ForTokenClassification")


class AutoModelForQuestionAnswering(_AutoModel):
    _mapping = _mapping("ForQuestionAnswering")


class AutoModelForTextEncoding(_AutoModel):
    """``EncoderModel`` of the family (T5/umT5 encoders as text encoders)."""

    _mapping = _mapping("EncoderModel")
