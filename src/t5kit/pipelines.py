"""``pipeline()``: text in, text (or embeddings) out, as in the Hugging Face model pages.

Tasks:

* ``"text2text-generation"`` -> ``[{"generated_text": ...}]``
* ``"summarization"`` -> ``[{"summary_text": ...}]``
* ``"translation"`` / ``"translation_xx_to_yy"`` -> ``[{"translation_text": ...}]``
* ``"feature-extraction"`` -> encoder hidden states, or mean-pooled embeddings with ``pooling="mean"``

Summarization and translation take T5's prefix and generation defaults from the config's
``task_specific_params`` when present, as the reference does; plain ``"translation"`` picks the
config's first ``translation_*`` entry. Inputs are batched ``batch_size`` at a time, sorted by
length so that a batch pads little; results come back in input order.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterator, Sequence

import torch

from .config import _HUB_KWARGS

__all__ = ["pipeline", "Text2TextGenerationPipeline", "FeatureExtractionPipeline", "SUPPORTED_TASKS", "by_length_batches"]

logger = logging.getLogger("t5kit")

SUPPORTED_TASKS = ("text2text-generation", "summarization", "translation", "translation_xx_to_yy", "feature-extraction")
_OUTPUT_KEYS = {"text2text-generation": "generated", "summarization": "summary", "translation": "translation"}
_LANGUAGES = {"en": "English", "de": "German", "fr": "French", "ro": "Romanian", "es": "Spanish", "it": "Italian"}


def by_length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), so padding stays small."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _check_texts(inputs: Any) -> tuple[list[str], bool]:
    """(texts, was_single) for a string or a list of strings; clear errors otherwise."""
    if isinstance(inputs, str):
        return [inputs], True
    if isinstance(inputs, (list, tuple)):
        if not inputs:
            raise ValueError("The pipeline got an empty list; pass a string or a non-empty list of strings")
        bad = [type(x).__name__ for x in inputs if not isinstance(x, str)]
        if bad:
            raise TypeError(f"Pipeline inputs must be strings; got {bad[0]} in the list")
        return list(inputs), False
    raise TypeError(f"Pipeline input must be a string or a list of strings, got {type(inputs).__name__}")


class _Pipeline:
    def __init__(self, model: Any, tokenizer: Any, task: str, batch_size: int = 1, device: torch.device | None = None) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.model, self.tokenizer, self.task, self.batch_size = model, tokenizer, task, batch_size
        self.device = device if device is not None else model.device

    def _encode(self, texts: list[str], truncation: bool) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(texts, padding=True, truncation=truncation, return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    def _batches(self, texts: list[str], batch_size: int, truncation: bool) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
        """(indices into ``texts``, their padded encoding) per batch, batches of similar length."""
        lengths = [len(ids) for ids in self.tokenizer(texts, truncation=truncation)["input_ids"]]
        for batch in by_length_batches(lengths, batch_size):
            yield batch, self._encode([texts[i] for i in batch], truncation)


class Text2TextGenerationPipeline(_Pipeline):
    """Generation pipelines (text2text, summarization, translation); outputs as the reference's.

    ``prefix`` is prepended to every input; ``generate_kwargs`` are default generation options
    (from ``task_specific_params``), overridden by options given at call time.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        task: str = "text2text-generation",
        batch_size: int = 1,
        prefix: str = "",
        generate_kwargs: dict[str, Any] | None = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__(model, tokenizer, task, batch_size, device)
        self.prefix = prefix
        self.generate_kwargs = dict(generate_kwargs or {})
        self.output_key = _OUTPUT_KEYS["translation" if task.startswith("translation") else task]

    def __call__(
        self,
        inputs: str | list[str],
        *,
        batch_size: int | None = None,
        return_text: bool = True,
        return_tensors: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        truncation: bool = False,
        **generate_kwargs: Any,
    ) -> list[Any]:
        """Generate for one string (-> a list of dicts) or a list of strings (-> a list with one
        dict per input, or a list of lists with ``num_return_sequences`` > 1)."""
        texts, single = _check_texts(inputs)
        kwargs = {**self.generate_kwargs, **generate_kwargs}
        n_return = int(kwargs.get("num_return_sequences") or 1)
        results = self.run([self.prefix + t for t in texts], batch_size or self.batch_size, truncation, kwargs)
        outputs = []
        for ids in results:  # (n_return, L) per input
            items = []
            for row in ids:
                item: dict[str, Any] = {}
                if return_tensors:
                    item[f"{self.output_key}_token_ids"] = row
                if return_text:
                    item[f"{self.output_key}_text"] = self.tokenizer.decode(
                        row, skip_special_tokens=True, clean_up_tokenization_spaces=clean_up_tokenization_spaces
                    )
                items.append(item)
            outputs.append(items)
        if single:
            return outputs[0]
        return [o[0] for o in outputs] if n_return == 1 else outputs

    def iter_generate(
        self, texts: list[str], batch_size: int, truncation: bool, kwargs: dict[str, Any]
    ) -> Iterator[tuple[list[int], list[torch.Tensor]]]:
        """Per batch (batched by length): the indices of its texts and, for each, the token ids
        (num_return_sequences, L) generated for it."""
        n_return = int(kwargs.get("num_return_sequences") or 1)
        for batch, enc in self._batches(texts, batch_size, truncation):
            out = self.model.generate(**enc, **kwargs).cpu()
            yield batch, [out[j * n_return : (j + 1) * n_return] for j in range(len(batch))]

    def run(self, texts: list[str], batch_size: int, truncation: bool, kwargs: dict[str, Any]) -> list[torch.Tensor]:
        """Token ids (num_return_sequences, L) for each text, in input order."""
        results: list[torch.Tensor | None] = [None] * len(texts)
        for batch, outs in self.iter_generate(texts, batch_size, truncation, kwargs):
            for i, ids in zip(batch, outs):
                results[i] = ids
        return results  # type: ignore[return-value]


class FeatureExtractionPipeline(_Pipeline):
    """Encoder hidden states for each input: (1, T, d_model) nested lists as the reference, or,
    with ``pooling="mean"``, the mean over the attention mask (d_model,) per input."""

    def __call__(
        self,
        inputs: str | list[str],
        *,
        batch_size: int | None = None,
        pooling: str | None = None,
        normalize: bool = False,
        return_tensors: bool = False,
        truncation: bool = False,
    ) -> Any:
        texts, single = _check_texts(inputs)
        if pooling not in (None, "mean"):
            raise ValueError(f"pooling must be None or 'mean', got {pooling!r}")
        results: list[Any] = [None] * len(texts)
        with torch.no_grad():
            for batch, enc in self._batches(texts, batch_size or self.batch_size, truncation):
                hidden = self.model._encode(enc["input_ids"], enc["attention_mask"], None, False, False).last_hidden_state
                mask = enc["attention_mask"]
                for j, i in enumerate(batch):
                    if pooling == "mean":
                        m = mask[j, :, None].to(hidden.dtype)  # padding can sit on either side
                        vec = (hidden[j] * m).sum(0) / m.sum()
                    else:
                        vec = hidden[j][mask[j].bool()][None]  # (1, T, d_model), padding removed
                    if normalize:
                        vec = torch.nn.functional.normalize(vec.float(), dim=-1).to(vec.dtype)
                    vec = vec.float().cpu()
                    results[i] = vec if return_tensors else vec.tolist()
        return results[0] if single else results


def _task_settings(task: str, config: Any) -> tuple[str, str, dict[str, Any]]:
    """(resolved task, prefix, generation defaults) from the config's ``task_specific_params``."""
    params = dict(getattr(config, "task_specific_params", None) or {})
    if task == "translation":
        found = [k for k in params if k.startswith("translation_")]
        if found:
            logger.warning('"translation" was asked; using the config\'s "%s" (name it to choose another)', found[0])
            task = found[0]
    settings = dict(params.get(task) or {})
    prefix = settings.pop("prefix", "")
    if task.startswith("translation_") and task not in params:
        parts = task.split("_")
        if len(parts) != 4 or parts[2] != "to":
            raise ValueError(f"Translation tasks are named translation_xx_to_yy, got {task!r}")
        src, tgt = _LANGUAGES.get(parts[1]), _LANGUAGES.get(parts[3])
        if src and tgt:
            prefix = f"translate {src} to {tgt}: "
    return task, prefix, settings


def pipeline(
    task: str,
    model: Any = None,
    tokenizer: Any = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | int | None = None,
    batch_size: int = 1,
    **kwargs: Any,
) -> Text2TextGenerationPipeline | FeatureExtractionPipeline:
    """Build a pipeline for ``task`` around a t5kit model.

    Args:
        task: ``"text2text-generation"``, ``"summarization"``, ``"translation"``,
            ``"translation_xx_to_yy"`` or ``"feature-extraction"``.
        model: A checkpoint directory, a Hub id (through huggingface_hub's cache; ``revision``,
            ``token``, ``cache_dir``, ``local_files_only`` and ``HF_HUB_OFFLINE`` work), or a
            loaded t5kit model.
        tokenizer: A tokenizer, a path or Hub id; by default the model's own directory/id.
        dtype, device: As for ``from_pretrained``; ``device=-1`` means the CPU.
        batch_size: Inputs per forward pass.
        **kwargs: Hub arguments, and default generation options (``max_new_tokens``, ``num_beams``...).
    """
    from .auto import AutoModelForSeq2SeqLM, AutoModelForTextEncoding
    from .tokenization import AutoTokenizer

    if not isinstance(task, str) or not (task in SUPPORTED_TASKS or task.startswith("translation_")):
        raise ValueError(f"Unknown task {task!r}; t5kit pipelines: {', '.join(SUPPORTED_TASKS)}")
    if model is None:
        raise ValueError(
            "pipeline() needs model= (a checkpoint directory, a Hub id or a loaded model); t5kit has no "
            "default model because it never downloads behind your back"
        )
    if device == -1:
        device = "cpu"
    elif isinstance(device, int):
        device = f"cuda:{device}"
    hub_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in _HUB_KWARGS}
    if isinstance(model, (str, os.PathLike)):
        auto = AutoModelForTextEncoding if task == "feature-extraction" else AutoModelForSeq2SeqLM
        if tokenizer is None:
            tokenizer = model
        model = auto.from_pretrained(model, dtype=dtype, device=device, **hub_kwargs)
    else:
        if tokenizer is None:
            raise ValueError("Pass tokenizer= when model is a loaded model object")
        if dtype is not None or device is not None:
            model = model.to(device=device, dtype=dtype if isinstance(dtype, torch.dtype) else None)
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer, **hub_kwargs)
    model.eval()
    if task == "feature-extraction":
        if kwargs:
            raise ValueError(f"feature-extraction takes no generation options, got {sorted(kwargs)}")
        if not hasattr(model, "_encode"):
            raise TypeError(f"{type(model).__name__} has no encoder")
        return FeatureExtractionPipeline(model, tokenizer, task, batch_size)
    if not hasattr(model, "generate"):
        raise TypeError(f"{task} needs a ForConditionalGeneration model, got {type(model).__name__}")
    task, prefix, defaults = _task_settings(task, model.config)
    return Text2TextGenerationPipeline(model, tokenizer, task, batch_size, prefix, {**defaults, **kwargs})
