"""What every t5kit model shares: input checks, initialisation, tying, and checkpoint I/O.

Checkpoints are read and written in the Hugging Face Hub layout: ``config.json`` plus
``model.safetensors`` (or shards with ``model.safetensors.index.json``), and ``pytorch_model.bin``
(or its shards) for reading. Loading builds the model on the meta device and assigns the tensors
read from disk as its parameters, so the weights are never held twice in memory.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Iterator

import torch
from torch import nn

from ._files import MappedPages, atomic_path, atomic_write_text, resolve_file
from .config import CONFIG_CLASSES, T5Config, _HUB_KWARGS

__all__ = ["PreTrainedModel", "load_checkpoint_state", "WEIGHTS_NAMES"]

logger = logging.getLogger("t5kit")

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "pytorch_model.bin"
WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"
# Preference order when a checkpoint holds several formats.
WEIGHTS_NAMES = (SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME)

# Keys that older checkpoints carry and no model uses: a cross-attention bias table that the
# original Mesh TensorFlow code created and never read.
_IGNORED_KEYS = re.compile(r"(^|\.)decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight$")
_DECODER_SIDE = re.compile(r"^(transformer\.)?(decoder\.|lm_head\.)")
_EMBED_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def check_id_range(ids: torch.Tensor, vocab: int, name: str, extra: str = "") -> None:
    """Raise a ValueError naming the first bad id if ``ids`` (non-empty) holds one outside [0, vocab).
    Reads the range back to the host: for eager code, not inside a graph being compiled."""
    lo, hi = torch.aminmax(ids)
    if int(lo) < 0 or int(hi) >= vocab:
        bad = int(lo) if int(lo) < 0 else int(hi)
        raise ValueError(f"{name} holds token id {bad}, outside the vocabulary [0, {vocab}){extra}")


class PreTrainedModel(nn.Module):
    """Base class of the t5kit models (an ``nn.Module`` with the reference's helper methods)."""

    config_class: type[T5Config] = T5Config
    base_model_prefix = "transformer"

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}; "
                "use the model class of the config's family (or the Auto classes)"
            )
        self.config = config

    # ------------------------------------------------------------------------------------------
    # Initialisation and tying.

    def post_init(self) -> None:
        """Initialise every parameter as the reference does, then tie the output head if tied."""
        self.init_weights()
        self.tie_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        for name, param in self.named_parameters():
            _init_parameter(name, param, self.config)

    def tie_weights(self) -> None:
        """Make ``lm_head.weight`` the embedding matrix when ``config.tie_word_embeddings``."""
        head = getattr(self, "lm_head", None)
        if head is not None and self.config.tie_word_embeddings:
            head.weight = self.get_input_embeddings().weight

    def get_input_embeddings(self) -> nn.Embedding:
        if hasattr(self, "shared"):
            return self.shared
        return self.transformer.get_input_embeddings()

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        if not hasattr(self, "shared"):
            self.transformer.set_input_embeddings(new_embeddings)
            return
        self.shared = new_embeddings
        for stack in ("encoder", "decoder"):
            if hasattr(self, stack):
                getattr(self, stack).embed_tokens = new_embeddings

    def get_output_embeddings(self) -> nn.Linear | None:
        return None

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None) -> nn.Embedding:
        """Grow or shrink the vocabulary; existing rows are kept, new rows initialised."""
        old = self.get_input_embeddings()
        if new_num_tokens is None:
            new_num_tokens = old.num_embeddings
        if pad_to_multiple_of is not None:
            new_num_tokens = -(-new_num_tokens // pad_to_multiple_of) * pad_to_multiple_of
        if new_num_tokens < 1:
            raise ValueError(f"new_num_tokens must be positive, got {new_num_tokens}")
        keep = min(old.num_embeddings, new_num_tokens)
        new = nn.Embedding(new_num_tokens, old.embedding_dim, device=old.weight.device, dtype=old.weight.dtype)
        with torch.no_grad():
            _init_parameter("shared.weight", new.weight, self.config)
            new.weight[:keep] = old.weight[:keep]
        self.set_input_embeddings(new)
        head = self.get_output_embeddings()
        if head is not None and not self.config.tie_word_embeddings:
            new_head = type(head)(head.in_features, new_num_tokens, bias=False, device=head.weight.device, dtype=head.weight.dtype)
            with torch.no_grad():
                _init_parameter("lm_head.weight", new_head.weight, self.config)
                new_head.weight[:keep] = head.weight[:keep]
            self.lm_head = new_head
        self.config.vocab_size = new_num_tokens
        self.tie_weights()
        return new

    # ------------------------------------------------------------------------------------------
    # Small conveniences of the reference API.

    def _apply(self, fn: Any, recurse: bool = True) -> PreTrainedModel:
        # .to()/.float()/.half()/.cuda() of a model with converted layers (t5kit.prepack): those
        # layers refuse a new dtype or device; ask them all first, so a refusal changes nothing.
        for module in self.modules():
            if hasattr(module, "check_move"):
                module.check_move(fn)
        # A tensor that fn copies (another dtype or device) leaves its pages in the checkpoint's
        # memory map behind: handed back as it goes, model.to(torch.bfloat16) of a freshly loaded
        # float32 model never holds the whole float32 file resident beside the bfloat16 copy.
        pages = MappedPages()

        def convert(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if out.data_ptr() != t.data_ptr():
                pages.release(t)
            return out

        return super()._apply(convert, recurse)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(p for p in self.parameters() if p.is_floating_point()).dtype

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Number of (unique) parameters; ``exclude_embeddings`` leaves out ``nn.Embedding`` tables."""
        skip = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)} if exclude_embeddings else set()
        return sum(
            p.numel() for p in self.parameters() if id(p) not in skip and (p.requires_grad or not only_trainable)
        )

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute each block's activations in the backward pass to save memory."""
        for m in self.modules():
            if hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        for m in self.modules():
            if hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules())

    def _shift_right(self, input_ids: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Prepend ``decoder_start_token_id`` and drop the last token; -100 becomes the pad id.

        With ``segment_ids`` (packed rows, see ``t5kit.data.pack_examples``) every example of a
        row starts with ``decoder_start_token_id``.
        """
        start, pad = self.config.decoder_start_token_id, self.config.pad_token_id
        if start is None:
            raise ValueError("config.decoder_start_token_id must be set (T5 uses the pad id, 0)")
        if pad is None:
            raise ValueError("config.pad_token_id must be set")
        shifted = input_ids.new_zeros(input_ids.shape)
        shifted[..., 1:] = input_ids[..., :-1]
        shifted[..., 0] = start
        if segment_ids is not None:
            shifted.masked_fill_(segment_starts(segment_ids), start)
        return shifted.masked_fill_(shifted == -100, pad)

    # ------------------------------------------------------------------------------------------
    # Input checks: clear errors instead of failures deep inside torch.

    _IGNORED_KWARGS = frozenset({"cache_position", "head_mask", "decoder_head_mask", "cross_attn_head_mask"})

    def _check_kwargs(self, kwargs: dict[str, Any]) -> None:
        unknown = [k for k, v in kwargs.items() if k not in self._IGNORED_KWARGS]
        if unknown:
            raise TypeError(f"{type(self).__name__}.forward() got unexpected arguments: {', '.join(sorted(unknown))}")
        masks = [k for k in ("head_mask", "decoder_head_mask", "cross_attn_head_mask") if kwargs.get(k) is not None]
        if masks:
            raise ValueError(f"{', '.join(masks)} are not supported (transformers 5 removed head masking too)")

    def _check_ids(self, ids: torch.Tensor, name: str, allow_ignore: bool = False) -> None:
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer token ids (torch.long), got {ids.dtype}")
        if ids.dim() != 2:
            raise ValueError(f"{name} must have shape (batch, length), got {tuple(ids.shape)}")
        if ids.numel() == 0:
            raise ValueError(f"{name} is empty (shape {tuple(ids.shape)})")
        vocab = self.config.vocab_size
        valid = ids if not allow_ignore else ids.masked_fill(ids == -100, 0)
        extra = " (or -100 to ignore a position)" if allow_ignore else ""
        if torch.compiler.is_compiling():
            # Reading the range back would break the graph in two (twice per forward): the graph
            # checks it itself and raises a RuntimeError with this message. The Trainer's compiled
            # step checks its ids eagerly first, for the ValueError below.
            in_range = ((valid >= 0) & (valid < vocab)).all()
            torch._assert_async(in_range, f"{name} holds a token id outside the vocabulary [0, {vocab}){extra}")
            return
        check_id_range(valid, vocab, name, extra)

    def _check_hidden(self, x: torch.Tensor, name: str) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if x.dim() != 3 or x.shape[-1] != self.config.d_model:
            raise ValueError(f"{name} must have shape (batch, length, {self.config.d_model}), got {tuple(x.shape)}")

    def _check_mask(self, mask: torch.Tensor, shape: torch.Size | tuple[int, ...], name: str) -> None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
        if tuple(mask.shape) != tuple(shape):
            raise ValueError(f"{name} must have shape {tuple(shape)} (batch, length), got {tuple(mask.shape)}")

    def _check_inputs(self, ids: torch.Tensor | None, embeds: torch.Tensor | None, ids_name: str, embeds_name: str) -> None:
        if (ids is None) == (embeds is None):
            raise ValueError(f"Pass exactly one of {ids_name} and {embeds_name}")
        if ids is not None:
            self._check_ids(ids, ids_name)
        else:
            self._check_hidden(embeds, embeds_name)

    def _encode(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        output_attentions: bool,
        output_hidden_states: bool,
    ) -> Any:
        from .outputs import BaseModelOutput

        self._check_inputs(input_ids, inputs_embeds, "input_ids", "inputs_embeds")
        x = input_ids if input_ids is not None else inputs_embeds
        if attention_mask is not None:
            self._check_mask(attention_mask, x.shape[:2], "attention_mask")
        out = self.encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        return BaseModelOutput(last_hidden_state=out.last_hidden_state, hidden_states=out.hidden_states, attentions=out.attentions)

    def _output_flags(self, output_attentions: bool | None, output_hidden_states: bool | None) -> tuple[bool, bool]:
        return (
            self.config.output_attentions if output_attentions is None else bool(output_attentions),
            self.config.output_hidden_states if output_hidden_states is None else bool(output_hidden_states),
        )

    def _use_cache(self, use_cache: bool | None) -> bool:
        use_cache = self.config.use_cache if use_cache is None else bool(use_cache)
        if use_cache and self.training and self.is_gradient_checkpointing:
            return False  # recomputation and a cache do not mix
        return use_cache

    def _return(self, out: Any, return_dict: bool | None) -> Any:
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return out if return_dict else out.to_tuple()

    # ------------------------------------------------------------------------------------------
    # Checkpoints.

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args: Any,
        config: T5Config | None = None,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | int | None = None,
        output_loading_info: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Load a model from a checkpoint directory or a Hub id.

        Args:
            pretrained_model_name_or_path: A local directory or a Hugging Face Hub id (resolved
                through huggingface_hub's cache; ``HF_HUB_OFFLINE=1`` works).
            config: Use this config instead of the checkpoint's ``config.json``.
            dtype: ``torch.float32`` (default), ``torch.bfloat16``, ``torch.float16``, a name such
                as ``"bfloat16"``, or ``"auto"`` for the checkpoint's own dtype. ``torch_dtype`` is
                accepted as an alias.
            device: Where the parameters are placed (``"cpu"``, ``"cuda"``, ``0`` ...).
                ``device_map="auto"``/a device string is accepted as an alias.
            output_loading_info: Also return ``{"missing_keys", "unexpected_keys", "mismatched_keys"}``.
            **kwargs: Hub arguments (``revision``, ``token``, ``cache_dir``, ``local_files_only``,
                ``subfolder``) and config overrides.
        """
        if model_args:
            raise TypeError("from_pretrained takes the path as its only positional argument")
        if "torch_dtype" in kwargs:
            dtype = kwargs.pop("torch_dtype") if dtype is None else dtype
        device = _resolve_device(device, kwargs.pop("device_map", None))
        kwargs.pop("low_cpu_mem_usage", None)
        kwargs.pop("trust_remote_code", None)
        if kwargs.pop("attn_implementation", None) not in (None, "sdpa", "eager"):
            raise ValueError("attn_implementation must be 'sdpa' or 'eager' (both are built in)")
        hub_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in _HUB_KWARGS}
        path = os.fspath(pretrained_model_name_or_path)
        if config is None:
            config = cls.config_class.from_pretrained(path, **hub_kwargs, **kwargs)
        elif kwargs:
            config = config.copy(**kwargs)
        if not isinstance(config, cls.config_class):
            raise TypeError(f"{cls.__name__} needs a {cls.config_class.__name__}, got {type(config).__name__}")
        files = _weight_files(path, hub_kwargs)
        state, loaded_dtype = load_checkpoint_state(files, dtype=_resolve_dtype(dtype, config), device=device)
        result = cls._from_state(config, state, device=device, dtype=loaded_dtype, output_loading_info=output_loading_info)
        model = result[0] if output_loading_info else result
        if hasattr(model, "generation_config"):
            from .generation import GENERATION_CONFIG_NAME, GenerationConfig

            gen_file = resolve_file(path, GENERATION_CONFIG_NAME, required=False, **hub_kwargs)
            if gen_file is not None:
                model.generation_config = GenerationConfig.from_pretrained(gen_file)
        return result

    @classmethod
    def _from_state(
        cls,
        config: T5Config,
        state: dict[str, torch.Tensor],
        *,
        device: torch.device | None,
        dtype: torch.dtype,
        output_loading_info: bool = False,
    ) -> Any:
        with torch.device("meta"):
            model = cls(config)
        # All names, tied ones included: whether lm_head is tied is for the checkpoint to decide.
        expected = {name: p for name, p in model.named_parameters(remove_duplicate=False)}
        state, unexpected = _adapt_keys(state, set(expected), model)
        _decide_tying(model, state)
        mismatched = [
            f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
            for k, v in state.items()
            if k in expected and tuple(v.shape) != tuple(expected[k].shape)
        ]
        if mismatched:
            raise ValueError(
                "The checkpoint does not match the config (is config.json from another model?):\n  "
                + "\n  ".join(mismatched[:10])
                + ("\n  ..." if len(mismatched) > 10 else "")
            )
        model.load_state_dict(state, strict=False, assign=True)
        del state
        model.tie_weights()
        missing = []
        target = device or torch.device("cpu")
        for name, param in list(model.named_parameters()):
            if param.is_meta:
                missing.append(name)
                new = nn.Parameter(torch.empty(param.shape, dtype=dtype, device=target), requires_grad=param.requires_grad)
                with torch.no_grad():
                    _init_parameter(name, new, config)
                _set_parameter(model, name, new)
        model.tie_weights()
        if missing:
            logger.warning(
                "Some weights of %s were not in the checkpoint and are newly initialised: %s. Train the model "
                "before using it for predictions.",
                cls.__name__,
                ", ".join(missing),
            )
        if unexpected:
            logger.warning("Some checkpoint weights were not used by %s: %s", cls.__name__, ", ".join(unexpected))
        model.eval()
        if output_loading_info:
            return model, {"missing_keys": missing, "unexpected_keys": unexpected, "mismatched_keys": []}
        return model

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        max_shard_size: int | str = "5GB",
        safe_serialization: bool = True,
        state_dict: dict[str, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        """Write ``config.json``, ``generation_config.json`` (models that generate) and the weights
        (safetensors, sharded past ``max_shard_size``).

        Every file is written atomically; tied weights are stored once (``shared.weight``), as the
        reference writes them, so transformers and t5kit both load the directory. ``state_dict``
        supplies the tensors instead of the parameters (e.g. the full state gathered from an
        FSDP-sharded model); its keys are this model's parameter names.
        """
        if getattr(self, "inference_only", None):
            raise ValueError(
                f"this model was converted for inference ({self.inference_only}: quantized or prepacked weights) "
                "and cannot be saved as a checkpoint; save the model you loaded and convert after loading"
            )
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise OSError(f"save_pretrained needs a directory, but {save_directory} is a file")
        os.makedirs(save_directory, exist_ok=True)
        state = self._checkpoint_state_dict(state_dict)
        limit = _parse_size(max_shard_size)
        shards = _split_shards(state, limit)
        prefix, ext = ("model", "safetensors") if safe_serialization else ("pytorch_model", "bin")
        single = f"{prefix}.{ext}"
        names = [single] if len(shards) == 1 else [f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.{ext}" for i in range(len(shards))]
        for name, shard in zip(names, shards):
            with atomic_path(os.path.join(save_directory, name)) as tmp:
                if safe_serialization:
                    from safetensors.torch import save_file

                    save_file(shard, tmp, metadata={"format": "pt"})
                else:
                    torch.save(shard, tmp)
        index_name = f"{single}.index.json"
        index_path = os.path.join(save_directory, index_name)
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                "weight_map": {k: n for n, shard in zip(names, shards) for k in sorted(shard)},
            }
            atomic_write_text(index_path, json.dumps(index, indent=2, sort_keys=True) + "\n")
        elif os.path.exists(index_path):
            os.remove(index_path)
        # Remove shards of an earlier save that the new one does not use.
        pattern = re.compile(rf"^{re.escape(prefix)}(-\d{{5}}-of-\d{{5}})?\.{ext}$")
        for stale in os.listdir(save_directory):
            if pattern.match(stale) and stale not in names:
                os.remove(os.path.join(save_directory, stale))
        config = self.config.copy()
        config.architectures = [type(self).__name__]  # type: ignore[attr-defined]
        if "architectures" not in config._extra_keys:
            config._extra_keys.append("architectures")
        config.save_pretrained(save_directory)
        generation_config = getattr(self, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(save_directory)

    def checkpoint_names(self) -> list[str]:
        """The parameter names a checkpoint stores: each tensor once, tied ones under ``shared.weight``."""
        names: list[str] = []
        seen: set[int] = set()
        for name, param in self.named_parameters(remove_duplicate=False):
            if name.endswith(_EMBED_ALIASES) or id(param) in seen:
                continue  # tied: stored once under shared.weight
            seen.add(id(param))
            names.append(name)
        return names

    def _checkpoint_state_dict(self, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The state dict in the reference's layout: each tensor once, contiguous, on the CPU."""
        source = state_dict if state_dict is not None else dict(self.named_parameters(remove_duplicate=False))
        return {name: source[name].detach().to("cpu").contiguous() for name in self.checkpoint_names()}


def segment_starts(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: True where a packed example begins (its segment id differs from the previous)."""
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return starts


# ----------------------------------------------------------------------------------------------
# Loading helpers.


def _resolve_device(device: Any, device_map: Any) -> torch.device | None:
    if device is None and device_map is not None:
        if isinstance(device_map, dict):
            raise ValueError("device_map as a dict is not supported: pass device='cuda' or device='cpu'")
        device = device_map
    if device is None:
        return None
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, int):
        return torch.device("cuda", device)
    return torch.device(device)


def _resolve_dtype(dtype: Any, config: T5Config) -> torch.dtype | None:
    """None means: keep the checkpoint's dtype ("auto"); else the requested dtype (default float32)."""
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        name = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        return _DTYPES.get(str(name).replace("torch.", ""), None) if name else None
    if isinstance(dtype, str):
        key = dtype.replace("torch.", "")
        if key not in _DTYPES:
            raise ValueError(f"Unknown dtype {dtype!r}: use one of {', '.join(_DTYPES)} or 'auto'")
        return _DTYPES[key]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, a dtype name or 'auto', got {dtype!r}")
    return dtype


def _weight_files(path: str, hub_kwargs: dict[str, Any]) -> list[str]:
    """Resolve the checkpoint's weight files, preferring safetensors."""
    for name in WEIGHTS_NAMES:
        found = resolve_file(path, name, **hub_kwargs)
        if found is None:
            continue
        if not name.endswith(".index.json"):
            return [found]
        try:
            with open(found, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise OSError(f"{found} is not a valid shard index ({e}); the file may be truncated or corrupt") from e
        shards = sorted(set(weight_map.values()))
        return [resolve_file(path, s, required=True, **hub_kwargs) for s in shards]  # type: ignore[misc]
    raise OSError(
        f"No weights found for {path}: expected one of {', '.join(WEIGHTS_NAMES)}. Is this a model directory "
        "(a tokenizer-only directory has no weights)?"
    )


def _iter_file(path: str, device: torch.device | None) -> Iterator[tuple[str, torch.Tensor]]:
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(path, framework="pt", device=str(device or "cpu")) as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        except SafetensorError as e:
            raise OSError(f"Cannot read {path}: {e}. The file is truncated or corrupt; download it again.") from e
        return
    try:
        state = torch.load(path, map_location=device or "cpu", weights_only=True, mmap=True)
    except Exception as e:  # pickle, zip and size errors all mean the same thing here
        raise OSError(f"Cannot read {path}: {e}. The file is truncated, corrupt or not a weights-only checkpoint.") from e
    if not isinstance(state, dict):
        raise OSError(f"{path} does not hold a state dict")
    yield from state.items()


def load_checkpoint_state(
    files: list[str], dtype: torch.dtype | None = torch.float32, device: torch.device | None = None
) -> tuple[dict[str, torch.Tensor], torch.dtype]:
    """Read all weight files into one state dict, converting floating tensors to ``dtype`` one at a time.

    ``dtype=None`` keeps the stored dtype. Returns the state and the dtype of its floating tensors.
    """
    from tqdm.auto import tqdm

    state: dict[str, torch.Tensor] = {}
    seen_dtype: torch.dtype | None = None
    for path in tqdm(files, desc="Loading checkpoint shards", disable=len(files) < 2):
        pages: MappedPages | None = None  # made once the file is mapped (its first tensor read)
        for key, tensor in _iter_file(path, device):
            if tensor.is_floating_point():
                if dtype is not None and tensor.dtype != dtype:
                    # The converted copy is kept; the stored tensor's pages in the file's memory
                    # map go back now, not when the whole file is unmapped (an mT5 float32 file
                    # loaded as bfloat16 would otherwise be resident whole beside its copy).
                    pages = pages or MappedPages()
                    tensor = _convert_releasing(tensor, dtype, pages)
                seen_dtype = seen_dtype or tensor.dtype
            state[key] = tensor
    if not state:
        raise OSError(f"The checkpoint {', '.join(files)} holds no tensors")
    return state, dtype or seen_dtype or torch.float32


def _convert_releasing(tensor: torch.Tensor, dtype: torch.dtype, pages: MappedPages, chunk_bytes: int = 16 << 20) -> torch.Tensor:
    """``tensor.to(dtype)`` (the same values), a CPU tensor converted ``chunk_bytes`` of the source at
    a time with each chunk's pages in a memory-mapped file handed back once converted: converting
    holds the copy plus one chunk of the source, not the whole source beside its copy."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        out = tensor.to(dtype)
        pages.release(tensor)
        return out
    out = torch.empty(tensor.shape, dtype=dtype)
    src, dst = tensor.view(-1), out.view(-1)
    step = max(1, chunk_bytes // tensor.element_size())
    for start in range(0, src.numel(), step):
        dst[start : start + step].copy_(src[start : start + step])
        pages.release(src[start : start + step])
    return out


def _adapt_keys(state: dict[str, torch.Tensor], expected: set[str], model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map checkpoint keys onto the model's: the ``transformer.`` prefix of the head models, the
    embedding aliases of old checkpoints, and keys that are known to be unused."""
    prefix = "transformer."
    wants_prefix = any(k.startswith(prefix) for k in expected)
    has_prefix = any(k.startswith(prefix) for k in state)
    if wants_prefix and not has_prefix:
        # A base checkpoint (shared/encoder/decoder) loaded into a model with a head.
        state = {(prefix + k if (prefix + k) in expected or k.startswith(("shared", "encoder", "decoder")) else k): v for k, v in state.items()}
    elif has_prefix and not wants_prefix:
        state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    shared_key = next((k for k in expected if k.endswith("shared.weight")), None)
    encoder_only = not any(k.startswith(("decoder.", "transformer.decoder.")) for k in expected)
    out: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, value in state.items():
        if _IGNORED_KEYS.search(key):
            continue
        if key.endswith(_EMBED_ALIASES):
            # Same matrix as shared.weight in every released checkpoint; use it if shared is absent.
            if shared_key is not None and shared_key not in state and shared_key not in out:
                out[shared_key] = value
            continue
        if key in expected:
            out[key] = value
        elif encoder_only and _DECODER_SIDE.match(key):
            continue  # an encoder-only model loaded from a full encoder-decoder checkpoint
        else:
            unexpected.append(key)
    return out, unexpected


def _decide_tying(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Settle whether the output head is the embedding, from what the checkpoint really holds.

    transformers 5.x forces ``tie_word_embeddings=True`` and writes it back, so a config may say
    "tied" for a checkpoint with its own ``lm_head``: the weights decide. A checkpoint without an
    ``lm_head`` uses the embedding as its head, as the reference does, keeping the config's rescale.
    """
    if getattr(model, "lm_head", None) is None:
        return
    config = model.config
    head, shared = state.get("lm_head.weight"), state.get("shared.weight")
    if head is not None and shared is not None and config.tie_word_embeddings and not torch.equal(head, shared):
        logger.info("config.json says tie_word_embeddings=true but lm_head differs from the embedding: untying")
        if config.scale_decoder_outputs is None:
            config.scale_decoder_outputs = False
        config.tie_word_embeddings = False
    elif head is None and not config.tie_word_embeddings:
        logger.warning("The checkpoint has no lm_head.weight: the output projection uses the input embedding")
        if config.scale_decoder_outputs is None:
            config.scale_decoder_outputs = False
        config.tie_word_embeddings = True
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)


def _set_parameter(model: nn.Module, name: str, param: nn.Parameter) -> None:
    module_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(module_name) if module_name else model, attr, param)


def _init_parameter(name: str, param: torch.Tensor, config: T5Config) -> None:
    """The reference's initialisation, by parameter name (so a single missing tensor can be filled)."""
    f = config.initializer_factor
    d_model, d_kv, h, d_ff = config.d_model, config.d_kv, config.num_heads, config.d_ff
    leaf = name.rsplit(".", 2)
    module, kind = (leaf[-2] if len(leaf) > 1 else ""), leaf[-1]
    if param.is_meta:
        return
    if kind == "bias":
        nn.init.zeros_(param)
        return
    std = {
        "layer_norm": None,
        "final_layer_norm": None,
        "shared": f,
        "embed_tokens": f,
        "lm_head": f,
        "q": f * (d_model * d_kv) ** -0.5,
        "k": f * d_model**-0.5,
        "v": f * d_model**-0.5,
        "o": f * (h * d_kv) ** -0.5,
        "wi": f * d_model**-0.5,
        "wi_0": f * d_model**-0.5,
        "wi_1": f * d_model**-0.5,
        "wo": f * d_ff**-0.5,
        "relative_attention_bias": f * d_model**-0.5,
        "dense": f * d_model**-0.5,
        "out_proj": f * d_model**-0.5,
        "qa_outputs": f * d_model**-0.5,
        "classifier": f,
    }
    if module in ("layer_norm", "final_layer_norm"):
        nn.init.constant_(param, f)
    elif module in std:
        nn.init.normal_(param, mean=0.0, std=std[module])
    else:
        raise AssertionError(f"no initialisation rule for {name}")


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        if size < 1:
            raise ValueError(f"max_shard_size must be positive, got {size}")
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size must be an int or a string like '5GB' or '200MB', got {size!r}")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(number * scale)


def _split_shards(state: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    """Greedy split in key order; a tensor larger than the limit gets a shard of its own."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        nbytes = state[key].numel() * state[key].element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = state[key]
        size += nbytes
    return shards


def config_class_for(model_type: str) -> type[T5Config]:
    if model_type not in CONFIG_CLASSES:
        raise ValueError(
            f"model_type {model_type!r} is not a T5-family model; t5kit supports {', '.join(CONFIG_CLASSES)}"
        )
    return CONFIG_CLASSES[model_type]
