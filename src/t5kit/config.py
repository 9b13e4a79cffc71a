"""Configurations for the T5 family.

One dataclass describes every variant. Its field names are the ``config.json`` names, so a
Hub ``config.json`` loads with ``from_dict`` and is written back by ``to_dict`` without a mapping.
Keys this library does not use (``task_specific_params``, ``architectures``, ``n_positions`` ...)
are kept as attributes and survive a round trip.

``MT5Config`` and ``UMT5Config`` differ only in their defaults (mt5-small, umt5-small) and in
the data switches that the single model implementation reads (``per_layer_position_bias``).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

from ._files import atomic_write_text, resolve_file

__all__ = ["T5Config", "MT5Config", "UMT5Config", "CONFIG_NAME"]

CONFIG_NAME = "config.json"

# Activation names accepted after the optional "gated-" prefix of ``feed_forward_proj``;
# these are the names transformers' ACT2FN knows and real checkpoints use.
ACTIVATIONS = (
    "relu",
    "gelu",
    "gelu_new",
    "gelu_fast",
    "gelu_pytorch_tanh",
    "quick_gelu",
    "silu",
    "swish",
    "tanh",
    "sigmoid",
    "relu2",
    "mish",
    "linear",
)

# Derived values that transformers writes into config.json; recomputed from feed_forward_proj.
_DERIVED_KEYS = ("dense_act_fn", "is_gated_act")


@dataclass(init=False, repr=False)
class T5Config:
    """Configuration of a T5 (v1.0, v1.1, Flan-T5, ByT5) model.

    Defaults equal google-t5/t5-small. Every argument is a ``config.json`` key; unknown keyword
    arguments are stored as attributes and written back by :meth:`to_dict`.

    Args:
        vocab_size: Number of token embeddings (32128 for T5).
        d_model: Width of the residual stream.
        d_kv: Width of one attention head; ``num_heads * d_kv`` need not equal ``d_model``.
        d_ff: Width of the feed-forward layer.
        num_layers: Encoder depth.
        num_decoder_layers: Decoder depth; ``None`` means ``num_layers``.
        num_heads: Attention heads per layer.
        relative_attention_num_buckets: Buckets of the relative position bias.
        relative_attention_max_distance: Distance beyond which positions share the last bucket.
        dropout_rate: Dropout on every residual branch.
        classifier_dropout: Dropout inside the classification heads.
        layer_norm_epsilon: Epsilon of the RMS layer norm.
        initializer_factor: Scale of the random initialisation.
        feed_forward_proj: ``"relu"``, ``"gated-gelu"`` or any ``"<act>"`` / ``"gated-<act>"``.
        is_encoder_decoder: Always True for T5-family models.
        use_cache: Whether decoding returns ``past_key_values`` by default.
        pad_token_id, eos_token_id, decoder_start_token_id, bos_token_id: Special token ids.
        tie_word_embeddings: True when the output projection *is* the input embedding
            (T5 v1.0); False when the checkpoint carries its own ``lm_head`` (v1.1, Flan, mT5,
            umT5). Unlike transformers 5.x, this is never forced to True.
        scale_decoder_outputs: Whether the decoder output is multiplied by ``d_model**-0.5``
            before the output projection. ``None`` means "rescale exactly when tied", the
            meaning of the original Mesh TensorFlow models.
        id2label, label2id, num_labels: Label names of the classification heads.
        problem_type: ``"regression"``, ``"single_label_classification"`` or
            ``"multi_label_classification"`` for sequence classification.
    """

    model_type: ClassVar[str] = "t5"
    # Family switches read by the one model implementation.
    per_layer_position_bias: ClassVar[bool] = False

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    classifier_dropout: float = 0.0
    layer_norm_epsilon: float = 1e-6
    initializer_factor: float = 1.0
    feed_forward_proj: str = "relu"
    is_encoder_decoder: bool = True
    use_cache: bool = True
    pad_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    decoder_start_token_id: int | None = 0
    bos_token_id: int | None = None
    tie_word_embeddings: bool = True
    scale_decoder_outputs: bool | None = None
    id2label: dict[int, str] = field(default_factory=lambda: {0: "LABEL_0", 1: "LABEL_1"})
    label2id: dict[str, int] = field(default_factory=lambda: {"LABEL_0": 0, "LABEL_1": 1})
    problem_type: str | None = None
    output_attentions: bool = False
    output_hidden_states: bool = False
    return_dict: bool = True

    def __init__(self, **kwargs: Any) -> None:
        kwargs.pop("model_type", None)
        for key in _DERIVED_KEYS:
            kwargs.pop(key, None)
        # transformers' PreTrainedConfig synonyms.
        if "layer_norm_eps" in kwargs:
            kwargs.setdefault("layer_norm_epsilon", kwargs.pop("layer_norm_eps"))
        num_labels = kwargs.pop("num_labels", None)
        for f in fields(self):
            if f.name in kwargs:
                value = kwargs.pop(f.name)
            elif f.default is not MISSING:
                value = f.default
            else:
                value = f.default_factory()  # type: ignore[misc]
            setattr(self, f.name, value)
        # Everything else is carried along untouched.
        self._extra_keys: list[str] = []
        for key, value in kwargs.items():
            setattr(self, key, value)
            self._extra_keys.append(key)
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        self.id2label = {int(k): v for k, v in self.id2label.items()}
        self.label2id = {str(k): int(v) for k, v in self.label2id.items()}
        if num_labels is not None and num_labels != len(self.id2label):
            self.num_labels = num_labels
        self._validate()

    def _validate(self) -> None:
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{type(self).__name__}.{name} must be a positive integer, got {value!r}")
        if self.relative_attention_num_buckets < 2 or self.relative_attention_max_distance < 1:
            raise ValueError(
                "relative_attention_num_buckets must be >= 2 and relative_attention_max_distance >= 1, got "
                f"{self.relative_attention_num_buckets} and {self.relative_attention_max_distance}"
            )
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated") or parts[-1] not in ACTIVATIONS:
            raise ValueError(
                f"feed_forward_proj={self.feed_forward_proj!r} is not valid: use '<act>' or 'gated-<act>' with "
                f"<act> one of {', '.join(ACTIVATIONS)} (e.g. 'relu' for T5 v1.0, 'gated-gelu' for T5 v1.1)"
            )

    # ----------------------------------------------------------------------------------------
    # Derived properties (not stored in config.json, or stored under transformers' names).

    @property
    def is_gated_act(self) -> bool:
        """True for the gated feed-forward layer of T5 v1.1, mT5 and umT5."""
        return self.feed_forward_proj.startswith("gated-")

    @property
    def dense_act_fn(self) -> str:
        """The activation name; ``gated-gelu`` means the tanh approximation, as in the originals."""
        act = self.feed_forward_proj.split("-")[-1]
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else act

    @property
    def rescale_output(self) -> bool:
        """Whether decoder outputs are scaled by ``d_model**-0.5`` before the output projection."""
        if self.scale_decoder_outputs is not None:
            return bool(self.scale_decoder_outputs)
        return bool(self.tie_word_embeddings)

    @property
    def num_labels(self) -> int:
        """Number of labels of the classification heads."""
        return len(self.id2label)

    @num_labels.setter
    def num_labels(self, n: int) -> None:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"num_labels must be a positive integer, got {n!r}")
        self.id2label = {i: f"LABEL_{i}" for i in range(n)}
        self.label2id = {v: k for k, v in self.id2label.items()}

    # transformers' attribute_map names.
    hidden_size = property(lambda self: self.d_model)
    num_attention_heads = property(lambda self: self.num_heads)
    num_hidden_layers = property(lambda self: self.num_layers)
    head_dim = property(lambda self: self.d_kv)

    # ----------------------------------------------------------------------------------------
    # Serialisation.

    def to_dict(self) -> dict[str, Any]:
        """All fields plus the carried unknown keys, as ``config.json`` holds them."""
        out: dict[str, Any] = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}
        out["id2label"] = {str(k): v for k, v in self.id2label.items()}
        if out["scale_decoder_outputs"] is None:
            del out["scale_decoder_outputs"]
        for key in self._extra_keys:
            out[key] = copy.deepcopy(getattr(self, key))
        out["model_type"] = self.model_type
        # Written for readers that expect them (transformers reads and ignores them).
        out["dense_act_fn"] = self.dense_act_fn
        out["is_gated_act"] = self.is_gated_act
        return dict(sorted(out.items()))

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **overrides: Any) -> T5Config:
        """Build a config from a ``config.json`` dictionary; ``overrides`` win over it."""
        if not isinstance(config_dict, dict):
            raise TypeError(f"from_dict expects a dict, got {type(config_dict).__name__}")
        data = {**config_dict, **overrides}
        model_type = data.get("model_type")
        if model_type is not None and model_type != cls.model_type:
            raise ValueError(
                f"This config.json has model_type={model_type!r} but {cls.__name__} expects "
                f"{cls.model_type!r}; use AutoConfig or {_CLASS_NAMES.get(model_type, 'the matching class')}"
            )
        return cls(**data)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> T5Config:
        return cls.from_dict(_read_json(path))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> T5Config:
        """Load ``config.json`` from a directory, a file path or a Hub id.

        Hub keyword arguments (``revision``, ``token``, ``cache_dir``, ``local_files_only``,
        ``subfolder``) are passed to huggingface_hub; other keyword arguments override fields.
        """
        hub_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in _HUB_KWARGS}
        path = os.fspath(pretrained_model_name_or_path)
        if os.path.isfile(path):
            config_file = path
        else:
            config_file = resolve_file(path, CONFIG_NAME, required=True, **hub_kwargs)
        return cls.from_dict(_read_json(config_file), **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``config.json`` into ``save_directory`` (atomically)."""
        if os.path.isfile(save_directory):
            raise OSError(f"save_pretrained needs a directory, but {save_directory} is a file")
        os.makedirs(save_directory, exist_ok=True)
        atomic_write_text(os.path.join(save_directory, CONFIG_NAME), self.to_json_string())

    def copy(self, **changes: Any) -> T5Config:
        """A deep copy with some fields changed."""
        return type(self).from_dict(self.to_dict(), **changes)

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.to_dict() == other.to_dict()  # type: ignore[union-attr]

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"


@dataclass(init=False, repr=False, eq=False)
class MT5Config(T5Config):
    """Configuration of an mT5 model; defaults equal google/mt5-small."""

    model_type: ClassVar[str] = "mt5"
    vocab_size: int = 250112
    d_ff: int = 1024
    num_layers: int = 8
    num_heads: int = 6
    feed_forward_proj: str = "gated-gelu"
    tie_word_embeddings: bool = False


@dataclass(init=False, repr=False, eq=False)
class UMT5Config(T5Config):
    """Configuration of a umT5 model; defaults equal google/umt5-small.

    umT5 gives every layer its own relative position bias, where T5 and mT5 share the first
    layer's across the stack.
    """

    model_type: ClassVar[str] = "umt5"
    per_layer_position_bias: ClassVar[bool] = True
    vocab_size: int = 250112
    d_ff: int = 1024
    num_layers: int = 8
    num_heads: int = 6
    feed_forward_proj: str = "gated-gelu"
    tie_word_embeddings: bool = False


CONFIG_CLASSES: dict[str, type[T5Config]] = {"t5": T5Config, "mt5": MT5Config, "umt5": UMT5Config}
_CLASS_NAMES = {k: v.__name__ for k, v in CONFIG_CLASSES.items()}
_HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "subfolder", "force_download")


def _read_json(path: str | os.PathLike) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise OSError(f"{path} is not valid JSON ({e}); the file may be truncated or corrupt") from e
    if not isinstance(data, dict):
        raise OSError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data
