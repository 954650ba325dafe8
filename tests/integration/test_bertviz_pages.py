"""The real ``bertviz`` package drawing ``to_bertviz``'s output embeds exactly the stored weights.

BertViz writes its parameters into the page as JSON (``json.dumps`` of the float32 tensors'
``tolist()``); float16 → float32 → float64 → JSON text → float64 is exact, so the weights
parsed back from the page must equal the ``attention`` table's bitwise.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import pipelines
from pipelines.api import Analyzer, ModelKey, Result
from pipelines.backends.torch.backend import TorchBackend

bertviz = pytest.importorskip("bertviz", reason="bertviz is installed by `make setup`")

TEXTS = [("The cat sat on the mat.", None), ("Is it raining?", "It is pouring.")]


@pytest.fixture(scope="module")
def full(minilm: TorchBackend) -> Result:
    analyzer = Analyzer.from_backend(minilm, ModelKey("minilm", device="cpu"))
    return analyzer.analyze(TEXTS, attention="full", progress=False)


def page_params(page: str) -> dict:
    """The parameters BertViz put into its script (``PYTHON_PARAMS`` replaced by JSON)."""
    marker = "const params = "
    assert page.count(marker) == 1, "no params in the page"
    params, _ = json.JSONDecoder().raw_decode(page, page.index(marker) + len(marker))
    return params


def stored(result: Result | pipelines.Dataset, doc_id: str) -> np.ndarray:
    """[L, H, n, n] float64 from the attention table, built here with pandas."""
    table = result.attention if isinstance(result, Result) else result.table("attention")
    rows = table[table["doc_id"] == doc_id]
    n = int(rows["query"].max()) + 1
    layers, heads = int(rows["layer"].max()) + 1, int(rows["head"].max()) + 1
    dense = np.zeros((layers, heads, n, n))
    index = tuple(rows[c].to_numpy(np.int64) for c in ("layer", "head", "query", "key"))
    dense[index] = rows["weight"].to_numpy(np.float64)
    assert len(rows) == layers * heads * n * n  # full: every (query, key) of a BERT window
    return dense


def test_the_bertviz_source_still_has_its_params_line() -> None:
    """``page_params`` reads the script BertViz fills in; check it is still written so."""
    for view in ("head_view.js", "model_view.js"):
        script = (Path(bertviz.__file__).parent / view).read_text()
        assert "const params = PYTHON_PARAMS;" in script, view


@pytest.mark.parametrize("doc", ["0", "1"], ids=["single", "pair"])
def test_head_view_embeds_exactly_the_stored_weights(full: Result, doc: str) -> None:
    given = full.to_bertviz(doc)
    page = bertviz.head_view(**given, html_action="return").data
    params = page_params(page)
    want = stored(full, doc)
    everything = params["attention"][0]
    np.testing.assert_array_equal(np.array(everything["attn"]), want)  # exact, see above
    tokens = full.tokens.query("doc_id == @doc").sort_values("position")
    assert everything["left_text"] == given["tokens"] == tokens["surface"].tolist()
    assert all(t.dtype.is_floating_point and tuple(t.shape) == (1, 12, *want.shape[2:])
               for t in given["attention"]) and len(given["attention"]) == 6


def test_a_pair_starts_sentence_b_at_its_first_token(full: Result) -> None:
    given = full.to_bertviz("1")
    start = given["sentence_b_start"]
    assert given["tokens"][start - 1:start + 2] == ["[SEP]", "It", "is"]
    assert full.to_bertviz("0")["sentence_b_start"] is None
    params = page_params(bertviz.head_view(**given, html_action="return").data)
    names = [entry["name"] for entry in params["attention"]]
    assert names == ["All", "Sentence A -> Sentence A", "Sentence B -> Sentence B",
                     "Sentence A -> Sentence B", "Sentence B -> Sentence A"]
    b_to_a = params["attention"][4]
    assert b_to_a["left_text"] == given["tokens"][start:]
    np.testing.assert_array_equal(np.array(b_to_a["attn"]), stored(full, "1")[:, :, start:, :start])


def test_model_view_and_a_saved_dataset(full: Result, tmp_path: Path) -> None:
    saved = full.save(tmp_path / "ds")
    given = saved.to_bertviz("1")
    params = page_params(bertviz.model_view(**given, html_action="return").data)
    np.testing.assert_array_equal(np.array(params["attention"][0]["attn"]), stored(saved, "1"))


def test_tokens_fall_back_to_the_token_column(full: Result, tmp_path: Path) -> None:
    """A dataset written before the ``surface`` column: BertViz gets the tokenizer's strings."""
    root = full.save(tmp_path / "old").root
    for part in (root / "tokens").glob("part-*.parquet"):
        pq.write_table(pq.read_table(part).drop_columns("surface"), part)
    given = pipelines.open_dataset(root).to_bertviz("1")
    assert given["tokens"] == full.tokens.query("doc_id == '1'").sort_values("position")[
        "token"].tolist()


def test_byte_level_tokens_read_as_text(gpt2: TorchBackend) -> None:
    analyzer = Analyzer.from_backend(gpt2, ModelKey("gpt2-random", device="cpu"))
    result = analyzer.analyze("Le café est là.", attention="full", progress=False)
    given = result.to_bertviz(0)
    raw = result.tokens.sort_values("position")["token"].tolist()
    assert "Ġcaf" in "".join(raw) and given["tokens"][:3] == ["Le", "café", "est"]
    page = page_params(bertviz.head_view(**given, html_action="return").data)
    dense = np.array(page["attention"][0]["attn"])
    assert np.triu(dense, k=1).max() == 0  # causal: nothing above the diagonal
    np.testing.assert_allclose(dense.sum(axis=-1), 1.0, rtol=0, atol=2e-3)  # float16 rows


def test_sparse_weights_are_refused_unless_allowed(minilm: TorchBackend) -> None:
    analyzer = Analyzer.from_backend(minilm, ModelKey("minilm", device="cpu"))
    topk = analyzer.analyze(TEXTS, attention="topk:2", progress=False)
    with pytest.raises(ValueError, match=r"attention mode 'topk:2'.*--attention full.*"
                                         "allow_sparse=True"):
        topk.to_bertviz(0)
    sparse = topk.to_bertviz(0, allow_sparse=True)
    layer0 = sparse["attention"][0][0].numpy()
    assert ((layer0 > 0).sum(axis=-1) <= 2).all() and (layer0.sum(axis=-1) < 1).any()
    none = analyzer.analyze(TEXTS, attention="none", progress=False)
    for allow in (False, True):
        with pytest.raises(ValueError, match="stores no attention weights.*--attention full"):
            none.to_bertviz(0, allow_sparse=allow)


def test_unknown_documents_and_windows(full: Result) -> None:
    with pytest.raises(KeyError, match="no document 'nope'"):
        full.to_bertviz("nope")
    with pytest.raises(IndexError, match="has 1 window"):
        full.to_bertviz("0", window=1)
