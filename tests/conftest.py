"""Shared helpers: tiny awkward configs, and reference (transformers) models saved to disk.

transformers is the oracle here, never a dependency of the package: tests that need it skip when
it is absent.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

FAMILIES = ("T5", "MT5", "UMT5")
HEADS = (
    "Model",
    "ForConditionalGeneration",
    "EncoderModel",
    "ForSequenceClassification",
    "ForTokenClassification",
    "ForQuestionAnswering",
)

# Small awkward shapes: num_heads * d_kv != d_model, unequal depths both ways, odd widths.
VARIANTS = {
    # T5 v1.0 style: ReLU feed-forward, output head is the embedding (tied, rescaled).
    "relu_tied": dict(
        vocab_size=97, d_model=24, d_kv=5, d_ff=37, num_layers=2, num_decoder_layers=3, num_heads=3,
        relative_attention_num_buckets=8, relative_attention_max_distance=20, feed_forward_proj="relu",
        tie_word_embeddings=True,
    ),
    # T5 v1.1 / mT5 / umT5 style: gated GELU, a separate lm_head (untied, no rescale).
    "gated_untied": dict(
        vocab_size=103, d_model=20, d_kv=7, d_ff=33, num_layers=3, num_decoder_layers=1, num_heads=2,
        relative_attention_num_buckets=10, relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
    ),
    # Another activation that real checkpoints use.
    "gated_silu_untied": dict(
        vocab_size=89, d_model=16, d_kv=6, d_ff=29, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=6, relative_attention_max_distance=12, feed_forward_proj="gated-silu",
        tie_word_embeddings=False,
    ),
}

COMMON = dict(dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def hf():
    """The transformers module, or skip the test."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers


def hf_config(family: str, variant: str, **extra):
    kw = {**VARIANTS[variant], **COMMON, **extra}
    return getattr(hf(), f"{family}Config")(**kw)


def save_hf_model(family: str, head: str, variant: str, path: Path, seed: int = 0, **extra):
    """Build a random transformers model, untie its head if the variant says so, save it.

    transformers 5.23 ties the head of any new model; real v1.1/mT5/umT5 checkpoints carry their
    own lm_head, so for untied variants we give the reference model a separate one.
    """
    torch.manual_seed(seed)
    config = hf_config(family, variant, **extra)
    model = getattr(hf(), f"{family}{head}")(config).eval()
    if head == "ForConditionalGeneration" and not VARIANTS[variant]["tie_word_embeddings"]:
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    model.save_pretrained(path)
    return model


def load_hf(family: str, head: str, path: Path):
    return getattr(hf(), f"{family}{head}").from_pretrained(path, attn_implementation="eager").eval()


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5, what: str = "") -> None:
    """max |actual - expected| <= rel * max |expected|: equal to float32 rounding, scale-aware."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().item() or 1.0
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= rel * scale, f"{what}: max error {err:.3g} > {rel} x {scale:.3g}"


def tiny_model(family: str = "T5", variant: str = "gated_untied", seed: int = 0, **overrides):
    """A seeded, dropout-free t5kit ForConditionalGeneration of a variant (config fields in
    ``overrides`` replacing the variant's), in eval mode."""
    import t5kit

    torch.manual_seed(seed)
    config = getattr(t5kit, f"{family}Config")(**{**VARIANTS[variant], **overrides}, dropout_rate=0.0)
    return getattr(t5kit, f"{family}ForConditionalGeneration")(config).eval()


def make_batch(vocab: int, batch: int = 3, length: int = 9, seed: int = 1):
    """input_ids ending in </s> (id 1), right padding in one row, and a decoder batch."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    ids[:, -1] = 1
    if batch > 1:
        ids[1, length - 3:] = 0
        ids[1, length - 4] = 1
        mask[1, length - 3:] = 0
    dec = torch.randint(2, vocab, (batch, 6), generator=g)
    return ids, mask, dec


@pytest.fixture
def no_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


needs_peak_memory = pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="measures peak memory through Linux's /proc/self"
)


def peak_growth_mb(setup: str, operation: str) -> float:
    """MB by which the peak resident memory of a fresh Python process rose, while ``operation``
    ran, above its size just before (Linux: VmHWM, reset through /proc/self/clear_refs). ``setup``
    runs first: imports, loading."""
    script = f"""{setup}
def _mb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current size
_before = _mb("VmRSS")
{operation}
print(_mb("VmHWM") - _before)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return float(out.stdout.split()[-1])


@pytest.fixture(scope="session")
def big_head_checkpoint(tmp_path_factory) -> Path:
    """A saved float32 checkpoint that is almost all embedding and output projection, 64 MB each
    (32768 x 512), for measuring the memory that converting and loading it takes."""
    import t5kit

    torch.manual_seed(0)
    config = t5kit.T5Config(
        vocab_size=32768, d_model=512, d_kv=16, num_heads=2, d_ff=64, num_layers=1, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, dropout_rate=0.0,
    )
    path = tmp_path_factory.mktemp("big_head")
    t5kit.T5ForConditionalGeneration(config).save_pretrained(path)  # fsynced: no dirty pages to pin
    return path
