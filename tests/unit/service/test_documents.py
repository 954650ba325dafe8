"""The service's documents follow the same input rule as a corpus job's files (no Ray here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from pipelines.backends.torch.backend import TorchBackend
from pipelines.config import WindowConfig
from pipelines.text.inputs import read_documents
from pipelines.text.tokenize import Windower
from service.schemas import AttentionRequest, ViewRequest

ITEMS = [{"id": "a", "text": "Hi there", "text_pair": ""},
         {"id": "b", "text": "Hi there", "text_pair": "  "},
         {"id": "c", "text": "\ufeffHi there", "text_pair": "\ufeff"},
         {"id": "d", "text": "Hi there", "text_pair": "And you?"}]


@pytest.mark.parametrize("item", ITEMS, ids=[item["id"] for item in ITEMS])
def test_both_front_doors_give_the_same_windows(backend: TorchBackend, tmp_path: Path,
                                                item: dict) -> None:
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(item) + "\n", encoding="utf-8")
    (from_file,) = read_documents([path])
    (from_http,) = AttentionRequest.model_validate({"inputs": [item]}).documents("r")
    (from_view,) = ViewRequest.model_validate(item).attention_request().documents("r")
    windower = Windower(backend.tokenizer, backend.info, WindowConfig())
    (want,) = windower.windows(from_file)
    for doc in (from_http, from_view):
        assert (doc.doc_id, doc.text, doc.text_pair) == \
               (from_file.doc_id, from_file.text, from_file.text_pair)
        (got,) = windower.windows(doc)
        assert got.tokens == want.tokens
        assert got.input_ids.tolist() == want.input_ids.tolist()
        assert got.segment.tolist() == want.segment.tolist()
    if item["id"] != "d" and not backend.info.causal:
        assert want.tokens == ["[CLS]", "hi", "there", "[SEP]"]


@pytest.mark.parametrize("payload", [{"texts": ["fine", "\ufeff"]},
                                     {"inputs": [{"text": "fine"}, {"text": "\ufeff "}]}])
def test_text_of_only_a_bom_is_blank(payload: dict) -> None:
    with pytest.raises(ValidationError, match="(empty|blank)"):
        AttentionRequest.model_validate(payload)


def test_location_names_the_request_field() -> None:
    assert AttentionRequest.model_validate({"texts": ["a", "b"]}).location(1) == "texts.1"
    assert AttentionRequest.model_validate({"inputs": [{"text": "a"}]}).location(0) == "inputs.0"


def test_statistics_conventions_parse_like_the_command_line() -> None:
    request = AttentionRequest.model_validate(
        {"texts": ["a"], "punctuation": "clark", "entropy_epsilon": "clark", "word_rows": "first"})
    assert (request.punctuation, request.entropy_epsilon, request.word_rows) == \
           ("clark", 1e-4, "first")
    defaults = AttentionRequest.model_validate({"texts": ["a"]})
    assert (defaults.punctuation, defaults.entropy_epsilon, defaults.word_rows) == \
           ("unicode", 0.0, "mean")
    assert AttentionRequest.model_validate({"texts": ["a"], "entropy_epsilon": 0.01}
                                           ).entropy_epsilon == 0.01


@pytest.mark.parametrize(("field", "value", "message"), [
    ("punctuation", "ascii", "unknown punctuation rule 'ascii': use unicode or clark"),
    ("entropy_epsilon", 1.5, "entropy epsilon 1.5"),
    ("entropy_epsilon", "lots", "entropy epsilon 'lots'"),
    ("word_rows", "max", "unknown word rows 'max': use mean or first"),
])
def test_unknown_conventions_are_refused_with_the_choices(field: str, value: object,
                                                          message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        AttentionRequest.model_validate({"texts": ["a"], field: value})


def test_store_keeps_the_default_conventions() -> None:
    AttentionRequest.model_validate({"texts": ["a"], "store": True})
    with pytest.raises(ValidationError, match="store: the service dataset keeps the default"):
        AttentionRequest.model_validate({"texts": ["a"], "store": True, "punctuation": "clark"})
