"""Tokenizers: id-for-id equal to transformers' on the real T5 vocabulary and the WMT22 test set."""

from __future__ import annotations

import shutil

import pytest
import torch

import t5kit
from conftest import SHARED, hf

VOCAB = SHARED / "data" / "t5-vocab"
FLAN = SHARED / "data" / "flan-t5-small-tokenizer"
WMT = SHARED / "data" / "eval" / "wmt22"


def _lines(name: str) -> list[str]:
    return (WMT / name).read_text(encoding="utf-8").split("\n")[:2037]


@pytest.fixture(scope="module", params=["tokenizer.json", "spiece.model", "flan"])
def source(request, tmp_path_factory):
    """A directory with only t5-base's tokenizer.json, only spiece.model, or Flan-T5-small's files."""
    if request.param == "flan":
        return FLAN
    directory = tmp_path_factory.mktemp(request.param.replace(".", "_"))
    shutil.copy(VOCAB / request.param, directory / request.param)
    return directory


@pytest.fixture(scope="module")
def reference(source):
    return hf().T5Tokenizer.from_pretrained(source)


@pytest.fixture(scope="module")
def ours(source):
    return t5kit.AutoTokenizer.from_pretrained(source)


def test_readme_example_ids(ours) -> None:
    ids = ours("translate English to German: The house is wonderful.")["input_ids"]
    assert ids == [13959, 1566, 12, 2968, 10, 37, 629, 19, 1627, 5, 1]
    assert len(ours) == 32100


@pytest.mark.parametrize("name", ["generaltest2022.en-de.src.en", "generaltest2022.en-de.ref.A.de"])
def test_wmt22_ids_and_decoding_equal_reference(ours, reference, name: str) -> None:
    lines = _lines(name)
    assert len(lines) == 2037
    mine, ref = ours(lines)["input_ids"], reference(lines).input_ids
    mismatches = [i for i, (a, b) in enumerate(zip(mine, ref)) if a != b]
    assert not mismatches, f"{len(mismatches)} lines differ, first: {lines[mismatches[0]]!r}"
    assert ours.batch_decode(mine) == reference.batch_decode(ref)
    assert ours.batch_decode(mine, skip_special_tokens=True) == reference.batch_decode(ref, skip_special_tokens=True)


EDGE_CASES = [
    "The <extra_id_0> walks in <extra_id_1> park",
    "The<extra_id_0>walks in<extra_id_1>park<extra_id_99>",
    "<extra_id_0> cute dog <extra_id_1> the <extra_id_2>",
    "a    b\t\tc\n\nd \u00a0 e   ",
    "   leading and trailing   ",
    "",
    " ",
    "ﬁne ² ½ Ⅻ ｆｕｌｌｗｉｄｔｈ Å é",  # NFKC-normalised by the precompiled charsmap
    "日本語のテキスト 🙂 emoji ✨ and Ωmega",  # outside the vocabulary
    "</s> <pad> <unk> literally",
    "don't isn't ... ?! , .",
]


@pytest.mark.parametrize("text", EDGE_CASES)
def test_edge_cases_equal_reference(ours, reference, text: str) -> None:
    ids = ours(text)["input_ids"]
    assert ids == reference(text).input_ids
    assert ours.tokenize(text) == reference.tokenize(text)
    assert ours.decode(ids) == reference.decode(ids)
    assert ours.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)


def test_long_input_truncation_and_padding_equal_reference(ours, reference) -> None:
    long = " ".join(_lines("generaltest2022.en-de.src.en")[:40])
    batch = [long, "short one", long[:300]]
    for kwargs in (
        dict(truncation=True, max_length=64, padding="max_length"),
        dict(truncation=True, padding=True),
        dict(truncation=True, max_length=17, padding="longest", padding_side="left"),
    ):
        mine = ours(batch, return_tensors="pt", **kwargs)
        ref = reference(batch, return_tensors="pt", **kwargs)
        assert torch.equal(mine["input_ids"], ref["input_ids"]), kwargs
        assert torch.equal(mine["attention_mask"], ref["attention_mask"]), kwargs
    assert len(ours(long, truncation=True)["input_ids"]) == len(reference(long, truncation=True).input_ids)
    target = ours(["a b", "c"], text_target=["x y z", "w"], padding=True, return_tensors="np")
    ref = reference(["a b", "c"], text_target=["x y z", "w"], padding=True, return_tensors="np")
    assert (target["labels"] == ref["labels"]).all() and (target["input_ids"] == ref["input_ids"]).all()
    alone, ref_alone = ours(text_target=["x y z", "w"], padding=True), reference(text_target=["x y z", "w"], padding=True)
    assert dict(alone) == dict(ref_alone.items())


def test_api_documented_on_the_reference_pages(ours, reference) -> None:
    assert ours.get_sentinel_tokens()[:2] == ["<extra_id_0>", "<extra_id_1>"]
    assert ours.get_sentinel_token_ids() == list(range(32099, 31999, -1))
    with pytest.raises(AttributeError):  # transformers 5.23 lost these
        reference.get_sentinel_token_ids()
    assert ours.convert_tokens_to_ids("<extra_id_0>") == 32099 == reference.convert_tokens_to_ids("<extra_id_0>")
    assert (ours.pad_token_id, ours.eos_token_id, ours.unk_token_id) == (0, 1, 2)
    assert ours.additional_special_tokens == [f"<extra_id_{i}>" for i in range(100)]
    ids = ours.encode("Hello world")
    assert ids == reference.encode("Hello world") == [8774, 296, 1]
    assert ours.convert_ids_to_tokens(ids) == reference.convert_ids_to_tokens(ids)
    assert ours.convert_tokens_to_string(["▁Hello", "▁world"]) == reference.convert_tokens_to_string(["▁Hello", "▁world"])
    # The v4 page's helpers: </s> after each sequence, no token types.
    assert ours.build_inputs_with_special_tokens([5, 6], [7]) == [5, 6, 1, 7, 1]
    assert ours.get_special_tokens_mask([5, 6], [7]) == [0, 0, 1, 0, 1]
    assert ours.get_special_tokens_mask([5, 1, 0], already_has_special_tokens=True) == [0, 1, 1]
    assert ours.create_token_type_ids_from_sequences([5, 6], [7]) == [0, 0, 0, 0, 0]
    assert ours("a", "b")["input_ids"] == reference("a", "b").input_ids
    assert ours.decode(torch.tensor(ids)) == "Hello world</s>"
    assert ours.decode([8774, 31, 7, 5], clean_up_tokenization_spaces=True) == reference.decode([8774, 31, 7, 5], clean_up_tokenization_spaces=True)


def test_save_pretrained_loads_in_both(ours, reference, tmp_path) -> None:
    ours.save_pretrained(tmp_path)
    again = t5kit.AutoTokenizer.from_pretrained(tmp_path)
    ref = hf().AutoTokenizer.from_pretrained(tmp_path)
    text = _lines("generaltest2022.en-de.src.en")[:50] + EDGE_CASES
    assert again(text)["input_ids"] == ours(text)["input_ids"] == ref(text).input_ids


def test_bad_input_gets_clear_errors(ours, tmp_path) -> None:
    with pytest.raises(TypeError, match="string or a list of strings"):
        ours(123)
    with pytest.raises(TypeError, match="string or a list of strings"):
        ours(["ok", None])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ours.decode([5, 40000])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ours.decode([5, -1])
    with pytest.raises(ValueError, match="padding=True"):
        ours(["a", "a b c"], return_tensors="pt")
    with pytest.raises(OSError, match="no tokenizer.json or spiece.model"):
        t5kit.T5TokenizerFast.from_pretrained(tmp_path)
    (tmp_path / "spiece.model").write_bytes((VOCAB / "spiece.model").read_bytes()[:1000])
    with pytest.raises(OSError, match="truncated or corrupt"):
        t5kit.T5TokenizerFast.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(OSError, match="not valid JSON"):
        t5kit.T5TokenizerFast.from_pretrained(tmp_path)


@pytest.mark.parametrize("text", ["Hello wörld! 🙂", "<extra_id_0> bytes <extra_id_124>", "", "日本"])
def test_byt5_equals_reference(text: str, tmp_path) -> None:
    ref = hf().ByT5Tokenizer()
    ours = t5kit.ByT5Tokenizer()
    assert len(ours) == len(ref) == 384
    ids = ours(text)["input_ids"]
    assert ids == ref(text).input_ids
    assert ours.decode(ids) == ref.decode(ids)
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    assert ours.convert_tokens_to_ids("<extra_id_0>") == ref.convert_tokens_to_ids("<extra_id_0>") == 259
    ours.save_pretrained(tmp_path)
    assert type(t5kit.AutoTokenizer.from_pretrained(tmp_path)) is t5kit.ByT5Tokenizer


def test_embedding_padding_ids_decode_to_nothing(ours, reference) -> None:
    """The model's 28 padding rows (32100..32127) may be generated; like the reference, they decode to ''."""
    ids = [100, 32107, 200, 32127]
    assert ours.decode(ids) == reference.decode(ids) == ours.decode([100, 200])
    assert ours.batch_decode([ids], skip_special_tokens=True) == reference.batch_decode([ids], skip_special_tokens=True)
