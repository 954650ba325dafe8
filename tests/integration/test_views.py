"""Attention views: the payload built from real datasets, and the self-contained HTML page.

The helpers here (datasets, query/key vectors from forward hooks, expected line counts) are
shared with the browser tests in ``test_views_browser.py``.
"""

from __future__ import annotations

import html
import itertools
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tolerances import ATTENTION_ATOL, EPS32

from pipelines.api import Dataset
from pipelines.backends.torch.backend import TorchBackend
from pipelines.config import AttentionMode, RunConfig, WindowConfig
from pipelines.jobs.local import run_job
from pipelines.views import (
    WARN_PAGE_BYTES,
    DocumentView,
    PageTooLarge,
    render_html,
    render_view,
    view_data,
)
from pipelines.views.data import Thinning, build_payload, unb64
from pipelines.views.html import asset, payload_json

PAIR = {"id": "pair", "text": "The cat sat on the mat.", "text_pair": "It was happy, so it slept."}
PLAIN = {"id": "plain", "text": "Attention is all you need, they said; was it, though?"}
LONG = {"id": "long", "text": "Transformers read text in parallel: every token attends to every "
        "other token (or, in causal models, to those before it), and the weights say how much. "
        "Long documents are split into overlapping windows."}
#: Query and key segments each sentence filter of the head view keeps.
PAIR_FILTERS = {"all": ({0, 1}, {0, 1}), "aa": ({0}, {0}), "ab": ({0}, {1}), "ba": ({1}, {0}),
                "bb": ({1}, {1})}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def make_dataset(backend: TorchBackend, out: Path, rows: list[dict], attention: str,
                 windows: WindowConfig | None = None, capture_qk: bool = False) -> Path:
    """Run a real corpus job over ``rows`` (written as JSONL next to ``out``)."""
    corpus = write_jsonl(out.parent / f"{out.name}.jsonl", rows)
    config = RunConfig(model=backend.info.name, device="cpu",
                       attention=AttentionMode.parse(attention),
                       windows=windows or WindowConfig(), capture_qk=capture_qk)
    run_job([corpus], out, config, backend=backend, progress=False)
    return out


def build_view_datasets(minilm: TorchBackend, gpt2: TorchBackend,
                        folder: Path) -> dict[str, Path]:
    """``main``: a sentence pair, a single text and a long text cut into windows (topk:4);
    ``qk``: the same job with query/key capture; ``gpt2``: a causal model's dataset with
    query/key capture; ``none``: attention mode none."""
    windows = WindowConfig(max_length=24, stride=4)
    main = make_dataset(minilm, folder / "main", [PAIR, PLAIN, LONG], "topk:4", windows)
    qk = make_dataset(minilm, folder / "with-qk", [PAIR, PLAIN, LONG], "topk:4", windows,
                      capture_qk=True)
    causal = make_dataset(gpt2, folder / "gpt2", [PLAIN], "topk:4", capture_qk=True)
    none = make_dataset(minilm, folder / "none", [PLAIN], "none")
    return {"main": main, "qk": qk, "gpt2": causal, "none": none}


def projections(backend: TorchBackend) -> list[list[torch.nn.Module]]:
    """Per layer, the modules whose outputs hold the queries and keys: BERT's ``query`` and
    ``key`` Linear layers, or GPT-2's fused ``c_attn`` (query | key | value)."""
    model = backend.model
    if backend.info.family == "gpt2":
        return [[block.attn.c_attn] for block in model.h]
    return [[layer.attention.self.query, layer.attention.self.key]
            for layer in model.encoder.layer]


def capture_qk(backend: TorchBackend, ids: np.ndarray,
               segments: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-head query and key vectors [layers, heads, n, dim] of one window, read by forward
    hooks on the model's query/key projections."""
    info = backend.info
    found: dict[tuple[int, int], torch.Tensor] = {}
    hooks = []
    for index, modules in enumerate(projections(backend)):
        for which, module in enumerate(modules):
            def keep(_module, _inputs, output, key=(index, which)) -> None:
                found[key] = output.detach()[0]
            hooks.append(module.register_forward_hook(keep))
    inputs = {"input_ids": torch.tensor(ids, dtype=torch.long)[None]}
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    if info.accepts_token_type_ids:
        inputs["token_type_ids"] = torch.tensor(segments, dtype=torch.long)[None]
    try:
        with torch.inference_mode():
            backend.model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    n, heads, width = len(ids), info.num_heads, info.num_heads * info.head_dim

    def split(which: int) -> np.ndarray:
        """Queries (0) or keys (1) of every layer, one head after the other."""
        layers = [found[(layer, which)] if (layer, 1) in found
                  else found[(layer, 0)][:, which * width:(which + 1) * width]
                  for layer in range(info.num_layers)]
        return np.stack([x.reshape(n, heads, -1).transpose(0, 1).numpy() for x in layers])

    return split(0), split(1)


def window_tables(root: Path, doc_id: str, window: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Stored weights and tokens of one window, read with pandas."""
    where = [("doc_id", "==", doc_id), ("window", "==", window)]
    att = pd.read_parquet(root / "attention", filters=where)
    tok = pd.read_parquet(root / "tokens", filters=where).sort_values("position")
    return att, tok.set_index("position")


def expected_lines(root: Path, doc_id: str, window: int, layer: int,
                   heads: set[int] | None = None, pair_filter: str = "all",
                   hide_special: bool = False) -> int:
    """Weights the head view must draw for these settings, counted with pandas."""
    att, tok = window_tables(root, doc_id, window)
    att = att[att["layer"] == layer]
    if heads is not None:
        att = att[att["head"].isin(heads)]
    q_seg, k_seg = PAIR_FILTERS[pair_filter]
    query, key = tok.loc[att["query"]], tok.loc[att["key"]]
    keep = query["segment"].isin(q_seg).to_numpy() & key["segment"].isin(k_seg).to_numpy()
    if hide_special:
        keep &= ~query["is_special"].to_numpy() & ~key["is_special"].to_numpy()
    return int(keep.sum())


def decode_weights(attention: dict, layers: int, heads: int) -> pd.DataFrame:
    """The payload's weights of one window back as rows (layer, head, query, key, weight)."""
    offsets = unb64(attention["offsets"], "<u4")
    assert len(offsets) == layers * heads + 1 and offsets[-1] == attention["count"]
    slot = np.repeat(np.arange(layers * heads), np.diff(offsets))
    return pd.DataFrame({"layer": slot // heads, "head": slot % heads,
                         "query": unb64(attention["query"], "<u2").astype(int),
                         "key": unb64(attention["key"], "<u2").astype(int),
                         "weight": unb64(attention["weight"], "<f4")})


@pytest.fixture(scope="module")
def datasets(minilm: TorchBackend, gpt2: TorchBackend,
             tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_view_datasets(minilm, gpt2, tmp_path_factory.mktemp("views"))


@pytest.fixture(scope="module")
def main(datasets: dict[str, Path]) -> Path:
    return datasets["main"]


# --- payload ---------------------------------------------------------------------------------


def test_payload_describes_model_and_windows(main: Path) -> None:
    manifest = Dataset.open(main).manifest
    documents = pd.read_parquet(main / "documents", filters=[("doc_id", "==", "long")])
    payload = view_data(Dataset.open(main), "long")
    assert payload["format"] == "headscope-view/2" and payload["doc_id"] == "long"
    assert (payload["layers"], payload["heads"]) == (list(range(6)), list(range(12)))
    assert payload["top_k"] is None and payload["thinned"] is None
    assert payload["model"] == {"name": "minilm", "family": "bert", "num_layers": 6,
                                "num_heads": 12, "causal": False, "layer_windows": [None] * 6}
    assert payload["model"]["num_layers"] == manifest["model"]["num_layers"]
    assert payload["attention_mode"] == manifest["attention_mode"] == "topk:4"
    assert payload["n_windows"] == len(documents) == len(payload["windows"]) >= 3
    documents = documents.sort_values("window")
    for win, row in zip(payload["windows"], documents.itertuples(), strict=True):
        assert (win["window"], win["token_start"], win["token_end"], win["n_tokens"]) == (
            row.window, row.token_start, row.token_end, row.n_tokens)
        assert win["pair"] is False and win["qk"] is None
    json.dumps(payload, allow_nan=False)  # JSON-able as it is


@pytest.mark.parametrize("doc_id", ["pair", "long"])
def test_payload_tokens_and_weights_match_tables(main: Path, doc_id: str) -> None:
    payload = view_data(main, doc_id)
    for win in payload["windows"]:
        att, tok = window_tables(main, doc_id, win["window"])
        # views draw the source characters (MiniLM's "The", not its token "the")
        assert win["tokens"] == [surface.strip() for surface in tok["surface"]]
        assert win["segment"] == tok["segment"].tolist()
        assert win["is_special"] == tok["is_special"].astype(int).tolist()
        assert win["pair"] == (doc_id == "pair")
        got = decode_weights(win["attention"], 6, 12)
        want = att.sort_values(["layer", "head", "query", "key"])[got.columns].astype(
            {"layer": int, "head": int, "query": int, "key": int})
        assert win["attention"]["count"] == len(att) == 6 * 12 * win["n_tokens"] * 4
        # exact: the payload base64-encodes the stored float32 weights, bytes unchanged
        pd.testing.assert_frame_equal(got, want.reset_index(drop=True), check_exact=True)


def test_payload_is_compact(main: Path) -> None:
    """Eight bytes per weight before base64 (uint16 query and key, float32 weight)."""
    win = view_data(main, "long", window=0)["windows"][0]
    att = win["attention"]
    size = sum(len(att[name]) for name in ("query", "key", "weight"))
    assert size <= 4 * -(-8 * att["count"] // 3) + 12


def test_one_window(main: Path) -> None:
    payload = view_data(main, "long", window=1)
    assert payload["n_windows"] >= 3
    assert [w["window"] for w in payload["windows"]] == [1]
    att, _ = window_tables(main, "long", 1)
    assert payload["windows"][0]["attention"]["count"] == len(att)


def test_window_out_of_range(main: Path) -> None:
    n = len(view_data(main, "long")["windows"])
    with pytest.raises(IndexError, match=rf"'long' has {n} window\(s\), 0 to {n - 1}; no window"):
        view_data(main, "long", window=n)
    with pytest.raises(IndexError, match="no window -1"):
        view_data(main, "pair", window=-1)


def test_unknown_document_names_available_ids(main: Path) -> None:
    with pytest.raises(KeyError, match="no document 'nope'.*'long', 'pair', 'plain'"):
        view_data(main, "nope")


def test_attention_mode_none_is_refused(datasets: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match=r"attention mode 'none'.*--attention topk:K"):
        view_data(datasets["none"], "plain")


def test_full_mode_of_a_causal_model(gpt2: TorchBackend, tmp_path: Path) -> None:
    """GPT-2 in ``full`` mode: float16 weights come back exactly, causal rows only."""
    out = make_dataset(gpt2, tmp_path / "gpt2", [PLAIN], "full")
    payload = view_data(out, "plain")
    model = payload["model"]
    assert model["causal"] is True and payload["attention_mode"] == "full"
    (win,) = payload["windows"]
    n = win["n_tokens"]
    got = decode_weights(win["attention"], model["num_layers"], model["num_heads"])
    att, _ = window_tables(out, "plain", 0)
    assert att["weight"].dtype == np.float16
    assert len(got) == model["num_layers"] * model["num_heads"] * n * (n + 1) // 2
    assert (got["key"] <= got["query"]).all()
    want = att.sort_values(["layer", "head", "query", "key"])["weight"].astype(np.float32)
    np.testing.assert_array_equal(got["weight"].to_numpy(), want.to_numpy())  # f16→f32: exact


# --- query/key vectors -----------------------------------------------------------------------


def softmax_scores(query: np.ndarray, key: np.ndarray, scale: np.ndarray,
                   causal: bool = False) -> np.ndarray:
    """softmax(q·k × scale) over keys (only keys up to the query if ``causal``); query and key
    [L, H, n, d], scale [L]."""
    scores = query @ np.swapaxes(key, -1, -2) * scale[:, None, None, None]
    if causal:
        n = scores.shape[-1]
        scores = np.where(np.tril(np.ones((n, n), bool)), scores, -np.inf)
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    return scores / scores.sum(-1, keepdims=True)


@pytest.mark.parametrize(("name", "doc_id"), [("qk", "pair"), ("qk", "long"),
                                             ("gpt2", "plain")])
def test_qk_vectors_reproduce_stored_attention(datasets: dict[str, Path], name: str,
                                               doc_id: str) -> None:
    """The captured vectors, through the payload, give back every stored weight."""
    root = datasets[name]
    payload = view_data(root, doc_id)
    model = payload["model"]
    layers, heads = model["num_layers"], model["num_heads"]
    for win in payload["windows"]:
        n, dim = win["n_tokens"], win["qk"]["dim"]
        query = unb64(win["qk"]["query"], "<f4").reshape(layers, heads, n, dim)
        key = unb64(win["qk"]["key"], "<f4").reshape(layers, heads, n, dim)
        scale = np.array(win["qk"]["scale"])
        np.testing.assert_allclose(scale, dim ** -0.5, rtol=EPS32)  # stored as float32
        probs = softmax_scores(query.astype(np.float64), key.astype(np.float64), scale,
                               model["causal"])
        att, _ = window_tables(root, doc_id, win["window"])
        index = [att[c].to_numpy(int) for c in ("layer", "head", "query", "key")]
        # float64 softmax of the stored float32 q·k vs the model's float32 attention (another
        # kernel; see test_qk): ATTENTION_ATOL
        np.testing.assert_allclose(probs[tuple(index)], att["weight"], rtol=0, atol=ATTENTION_ATOL)
        table = pd.read_parquet(root / "qk", filters=[("doc_id", "==", doc_id),
                                                      ("window", "==", win["window"])])
        row = table[(table["layer"] == 1) & (table["head"] == 2) & (table["position"] == 1)]
        np.testing.assert_array_equal(query[1, 2, 1], row["query"].iloc[0])  # same float32 bytes
    assert (dim, model["causal"]) == ((384 // 12, False) if name == "qk" else (16, True))


@pytest.mark.parametrize("name", ["qk", "gpt2"])
def test_captured_vectors_equal_forward_hooks(datasets: dict[str, Path], name: str,
                                              minilm: TorchBackend, gpt2: TorchBackend) -> None:
    """The job's capture (inside attention) against hooks on the projection layers."""
    backend = minilm if name == "qk" else gpt2
    root = datasets[name]
    tokens = pd.read_parquet(root / "tokens").sort_values(["doc_id", "window", "position"])
    stored = pd.read_parquet(root / "qk").sort_values(["doc_id", "window", "layer", "head",
                                                       "position"])
    for (doc_id, window), rows in tokens.groupby(["doc_id", "window"], sort=True):
        query, key = capture_qk(backend, rows["token_id"].to_numpy(np.int64),
                                rows["segment"].to_numpy(np.int64))  # [L, H, n, d]
        mine = stored[(stored["doc_id"] == doc_id) & (stored["window"] == window)]
        # the job ran padded batches, this one window alone: float32 projections of hidden
        # states that moved by a few eps32 per layer, |q|, |k| ≲ 10: < 1e-5 (as in test_qk)
        np.testing.assert_allclose(np.stack(mine["query"]), query.reshape(-1, query.shape[-1]),
                                   rtol=0, atol=1e-5)
        np.testing.assert_allclose(np.stack(mine["key"]), key.reshape(-1, key.shape[-1]),
                                   rtol=0, atol=1e-5)


def test_qk_can_be_left_out(datasets: dict[str, Path]) -> None:
    assert view_data(datasets["qk"], "pair", qk=False)["windows"][0]["qk"] is None


def test_incomplete_qk_table_is_an_error(datasets: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "broken"
    shutil.copytree(datasets["qk"], root)
    part = root / "qk" / "part-00000.parquet"
    table = pq.read_table(part)
    pq.write_table(table.slice(1), part)  # the first row is gone
    with pytest.raises(ValueError, match=r"qk table, window 0: \d+ rows, expected"):
        view_data(root, table.column("doc_id")[0].as_py())


# --- HTML ------------------------------------------------------------------------------------


def embedded_payload(page: str) -> dict:
    match = re.search(r'<script type="application/json" id="hs-payload">(.*?)</script>', page,
                      re.S)
    assert match
    return json.loads(match.group(1))


def test_page_is_self_contained(main: Path) -> None:
    payload = view_data(main, "pair")
    page = render_html(payload, "pair <view> & co")
    assert page.startswith("<!DOCTYPE html>")
    assert "<title>pair &lt;view&gt; &amp; co</title>" in page
    assert '<link rel="icon" href="data:,">' in page
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    code = page.replace(payload_json(payload), "")  # base64 may hold "//" or "http"
    assert not re.search(r"https?:|//[a-z0-9]|@import|url\(", code, re.I)
    assert re.findall(r'\b(?:src|href)="([^"]*)"', page) == ["data:,"]
    assert page.count("<script") == 2 and page.count("</script>") == 2
    assert page.count("<style>") == 1 and asset("view.css") in page and asset("view.js") in page
    assert embedded_payload(page) == payload
    for element in ("hs-head-svg", "hs-layer", "hs-filter", "hs-hide-special", "hs-heads",
                    "hs-model-grid", "hs-model-detail", "hs-neuron-missing", "hs-window"):
        assert f'id="{element}"' in page


def test_payload_text_cannot_break_out_of_its_script(main: Path) -> None:
    payload = view_data(main, "plain")
    payload["windows"][0]["tokens"][1] = "</script><script>alert(1)</script><!--"
    page = render_html(payload, "t")
    assert page.count("</script>") == 2 and "<!--" not in page
    assert embedded_payload(page) == payload


def test_assets_ship_inside_the_package() -> None:
    from importlib import resources

    folder = resources.files("pipelines.views") / "assets"
    assert {"view.js", "view.css"} <= {entry.name for entry in folder.iterdir()}


def test_document_view_html_save_and_notebook(main: Path, tmp_path: Path) -> None:
    view = DocumentView(main, "long", window=1)
    assert embedded_payload(view.html) == view_data(main, "long", window=1)
    assert view.html == render_html(view.payload, "long · minilm attention")
    saved = view.save(tmp_path / "long.html")
    assert saved.read_text(encoding="utf-8") == view.html
    frame = view._repr_html_()
    match = re.fullmatch(r'<iframe srcdoc="([^"]*)" sandbox="allow-scripts" .*</iframe>', frame,
                         re.S)
    assert match and html.unescape(match.group(1)) == view.html
    assert render_view(main, "long", window=1) == view.html
    assert "window=1" in repr(view)


def test_document_view_reports_errors_early(main: Path) -> None:
    with pytest.raises(KeyError, match="nope"):
        DocumentView(main, "nope")
    with pytest.raises(FileNotFoundError, match="not a headscope dataset"):
        DocumentView(main / "tokens", "pair")


# --- headscope view and Dataset.view ---------------------------------------------------------


def test_cli_writes_the_view(datasets: dict[str, Path], tmp_path: Path,
                             capsys: pytest.CaptureFixture) -> None:
    from pipelines.cli import main

    out = tmp_path / "pair.html"
    assert main(["view", str(datasets["qk"]), "--doc", "pair", "--out", str(out)]) == 0
    assert "with the neuron view" in capsys.readouterr().out
    assert embedded_payload(out.read_text())["windows"][0]["qk"] is not None
    assert main(["view", str(datasets["qk"]), "--doc", "pair", "--out", str(out),
                 "--no-qk", "--overwrite"]) == 0
    assert embedded_payload(out.read_text())["windows"][0]["qk"] is None


@pytest.mark.parametrize(("args", "says"), [
    (["--doc", "nope"], "no document 'nope'"),
    (["--doc", "long", "--window", "9"], "no window 9"),
    (["--doc", "pair", "--out-suffix", ".txt"], "ending in .html"),
    (["--doc", "pair", "--existing"], "exists; pass --overwrite"),
])
def test_cli_errors_say_what_to_fix(datasets: dict[str, Path], tmp_path: Path,
                                    capsys: pytest.CaptureFixture, args: list[str],
                                    says: str) -> None:
    from pipelines.cli import main

    out = tmp_path / ("view.txt" if "--out-suffix" in args else "view.html")
    if "--existing" in args:
        out.write_text("keep me")
    args = [a for a in args if a not in ("--out-suffix", ".txt", "--existing")]
    assert main(["view", str(datasets["main"]), *args, "--out", str(out)]) == 2
    assert says in capsys.readouterr().err
    assert not out.exists() or out.read_text() == "keep me"  # nothing written or replaced


def test_dataset_view_displays_inline(datasets: dict[str, Path]) -> None:
    ds = Dataset.open(datasets["main"])
    view = ds.view("pair")
    assert isinstance(view, DocumentView) and view.payload["doc_id"] == "pair"
    assert view._repr_html_().startswith("<iframe srcdoc=")
    summary = ds._repr_html_()
    assert "attention topk:4" in summary and "<td>head_stats</td>" in summary


# --- thinning and page size ------------------------------------------------------------------

#: 192 tokens of ``full`` weights: a 28 MB page, over the 25 MB warning threshold.
BIG = {"id": "big", "text": " ".join([LONG["text"]] * 8)}


@pytest.fixture(scope="module")
def full(minilm: TorchBackend, gpt2: TorchBackend,
         tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``--attention full`` datasets: MiniLM over one 192-token window, the causal GPT-2."""
    folder = tmp_path_factory.mktemp("full")
    return {"minilm": make_dataset(minilm, folder / "minilm", [BIG], "full",
                                   WindowConfig(max_length=192, truncate=True)),
            "gpt2": make_dataset(gpt2, folder / "gpt2", [PLAIN], "full")}


def thinned_rows(root: Path, doc_id: str, layers: set[int], heads: set[int],
                 top_k: int | None) -> pd.DataFrame:
    """The stored weights a thinned view keeps, with pandas: the shown layers and heads and,
    per (window, layer, head, query), the ``top_k`` largest weights (ties: the smaller key)."""
    att = pd.read_parquet(root / "attention", filters=[("doc_id", "==", doc_id)])
    att = att[att["layer"].isin(layers) & att["head"].isin(heads)]
    if top_k is not None:
        att = att.sort_values(["weight", "key"], ascending=[False, True])
        att = att.groupby(["window", "layer", "head", "query"]).head(top_k)
    columns = {"window": int, "layer": int, "head": int, "query": int, "key": int,
               "weight": np.float32}
    att = att[list(columns)].astype(columns)
    return att.sort_values(list(columns)[:5]).reset_index(drop=True)


THIN_CASES = [  # dataset, document, layers, heads, top_k, layers and heads shown
    ("main", "long", "1,3-4", "0,11", 2, {1, 3, 4}, {0, 11}),
    ("minilm", "big", "0,3-5", "0-3", 8, {0, 3, 4, 5}, {0, 1, 2, 3}),
    ("minilm", "big", [2], None, None, {2}, set(range(12))),
    ("gpt2", "plain", None, "1-2", 3, {0, 1, 2}, {1, 2}),  # causal: early rows have < 3 keys
]


@pytest.mark.parametrize(("name", "doc_id", "layers", "heads", "top_k", "want_layers",
                          "want_heads"), THIN_CASES)
def test_thinning_keeps_exactly_the_chosen_weights(
        datasets: dict[str, Path], full: dict[str, Path], name: str, doc_id: str,
        layers: str | list[int] | None, heads: str | None, top_k: int | None,
        want_layers: set[int], want_heads: set[int]) -> None:
    root = {**datasets, **full}[name]
    payload = view_data(root, doc_id, layers=layers, heads=heads, top_k=top_k)
    model = payload["model"]
    assert (set(payload["layers"]), set(payload["heads"])) == (want_layers, want_heads)
    assert payload["top_k"] == top_k
    want = thinned_rows(root, doc_id, want_layers, want_heads, top_k)
    got = pd.concat([decode_weights(w["attention"], model["num_layers"], model["num_heads"])
                     .assign(window=w["window"]) for w in payload["windows"]])
    got = got[want.columns].reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want, check_exact=True)
    if name == "minilm" and top_k:
        assert len(got) == len(want_layers) * len(want_heads) * 192 * top_k


def test_top_k_breaks_ties_by_key_in_any_row_order(main: Path) -> None:
    """Rows not in key order, equal weights: the smaller key wins."""
    weights = pa.table({"window": pa.array([0] * 5, pa.uint16()),
                        "layer": pa.array([1] * 5, pa.uint8()),
                        "head": pa.array([2] * 5, pa.uint8()),
                        "query": pa.array([0] * 5, pa.uint16()),
                        "key": pa.array([3, 1, 4, 2, 0], pa.uint16()),
                        "weight": pa.array([0.5, 0.125, 0.25, 0.125, 0.125], pa.float32())})
    docs = [{"window": 0, "n_windows": 1, "token_start": 0, "token_end": 5, "n_tokens": 5}]
    tokens = pa.table({"window": [0] * 5, "position": range(5), "token": list("abcde"),
                       "segment": [0] * 5, "is_special": [False] * 5})
    model = {"num_layers": 2, "num_heads": 3, "causal": False}
    thin = Thinning.of(model, top_k=3)
    payload = build_payload(model, "topk:8", "d", docs, tokens, weights, None, thin)
    got = decode_weights(payload["windows"][0]["attention"], 2, 3)
    assert got["key"].tolist() == [0, 3, 4] and payload["thinned"] == "top 3 keys per query"


def test_thinned_query_key_vectors(datasets: dict[str, Path]) -> None:
    """The neuron view's vectors of the shown layers and heads only, in their order."""
    root = datasets["qk"]
    payload = view_data(root, "long", layers="1,4", heads="7,2,5")
    assert (payload["layers"], payload["heads"]) == ([1, 4], [2, 5, 7])
    table = pd.read_parquet(root / "qk", filters=[("doc_id", "==", "long")])
    for win in payload["windows"]:
        n, dim = win["n_tokens"], win["qk"]["dim"]
        query = unb64(win["qk"]["query"], "<f4").reshape(2, 3, n, dim)
        key = unb64(win["qk"]["key"], "<f4").reshape(2, 3, n, dim)
        rows = table[table["window"] == win["window"]]
        for (i, layer), (j, head) in itertools.product(enumerate([1, 4]), enumerate([2, 5, 7])):
            mine = rows[(rows["layer"] == layer) & (rows["head"] == head)].sort_values("position")
            np.testing.assert_array_equal(query[i, j], np.stack(mine["query"]))
            np.testing.assert_array_equal(key[i, j], np.stack(mine["key"]))


@pytest.mark.parametrize(("options", "says"), [
    ({"layers": "0,6"}, "layer 6 is out of range; the model has 6 layers, 0–5"),
    ({"layers": [7, 8]}, "layers 7, 8 are out of range; the model has 6 layers, 0–5"),
    ({"heads": "0-12"}, "head 12 is out of range; the model has 12 heads, 0–11"),
    ({"heads": "3-1"}, "the range 3-1 runs backwards"),
    ({"layers": "one"}, "use indices and ranges such as '0,3-5'"),
    ({"layers": []}, "no layer given; the model has 6 layers, 0–5"),
    ({"top_k": 0}, "top_k 0: use a positive number"),
])
def test_invalid_thinning_names_the_valid_range(main: Path, options: dict, says: str) -> None:
    with pytest.raises(ValueError, match=re.escape(says)):
        view_data(main, "pair", **options)


def test_page_states_what_was_thinned(main: Path) -> None:
    view = DocumentView(main, "pair", layers="0,3-5", heads="0-3", top_k=2)
    said = "layers 0,3–5 of 6; heads 0–3 of 12; top 2 keys per query"
    assert view.payload["thinned"] == said
    note = re.search(r'<p id="hs-thinned"[^>]*>(.*?)</p>', view.html, re.S)
    assert note and said in note.group(1) and "attention topk:4" in note.group(1)
    assert 'id="hs-thinned"' not in DocumentView(main, "pair").html
    every = DocumentView(main, "pair", layers="0-5", heads=range(12))  # all: nothing thinned
    assert every.payload["thinned"] is None and 'id="hs-thinned"' not in every.html


@pytest.mark.parametrize(("name", "doc_id", "options"), [
    ("minilm", "big", {}), ("minilm", "big", {"layers": "1", "top_k": 4}),
    ("qk", "long", {"heads": "0-5"}), ("main", "pair", {})])
def test_page_size_estimate(datasets: dict[str, Path], full: dict[str, Path], name: str,
                            doc_id: str, options: dict) -> None:
    """The estimate from the rows selected is within 1% of the page written."""
    view = DocumentView({**datasets, **full}[name], doc_id, **options)
    assert view.estimated_bytes == pytest.approx(len(view.html.encode("utf-8")), rel=0.01)


def test_large_page_warns_and_a_too_large_one_is_refused(
        main: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pipelines.views"):
        view = DocumentView(main, "long", warn_bytes=50_000)
    (record,) = caplog.records
    size = view.estimated_bytes / 1e6
    assert f"the page of document 'long' will be about {size:.1f} MB (over 0.05 MB" in (
        record.getMessage())
    assert "--layers, --heads and --top-k" in record.getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipelines.views"):
        DocumentView(main, "long", warn_bytes=50_000, layers="0", top_k=1)
    assert caplog.records == []  # thinned below the threshold
    with pytest.raises(PageTooLarge, match=rf"about {size:.1f} MB, over the 0.05 MB limit"):
        DocumentView(main, "long", max_bytes=50_000)
    assert DocumentView(main, "long", max_bytes=50_000, force=True).payload["doc_id"] == "long"


def test_cli_thins_and_warns_about_a_large_page(full: dict[str, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture,
                                                caplog: pytest.LogCaptureFixture) -> None:
    from pipelines.cli import main

    out = tmp_path / "big.html"
    with caplog.at_level(logging.INFO):
        assert main(["view", str(full["minilm"]), "--doc", "big", "--out", str(out)]) == 0
    size = out.stat().st_size
    assert size > WARN_PAGE_BYTES
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # the warning comes before the page is built, from an estimate of its size (the page
    # shell plus the rows' JSON): within 1% of the page written
    found = re.search(r"will be about ([0-9.]+) MB", warned[0]) if len(warned) == 1 else None
    assert found and abs(float(found.group(1)) - size / 1e6) <= 0.01 * size / 1e6, warned
    assert f"wrote {out}: 1 window(s), {size / 1e6:.1f} MB" in capsys.readouterr().out
    caplog.clear()
    assert main(["view", str(full["minilm"]), "--doc", "big", "--out", str(out), "--overwrite",
                 "--layers", "0,3-5", "--heads", "0-3", "--top-k", "8"]) == 0
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    said = "layers 0,3–5 of 6; heads 0–3 of 12; top 8 keys per query"
    assert capsys.readouterr().out.endswith(f"without the neuron view; thinned to {said}\n")
    payload = embedded_payload(out.read_text())
    assert payload["thinned"] == said and payload["windows"][0]["attention"]["count"] == (
        4 * 4 * 192 * 8)
    assert out.stat().st_size < size / 40


@pytest.mark.parametrize(("args", "says"), [
    (["--layers", "0,9"], "layers '0,9': layer 9 is out of range; the model has 6 layers, 0–5"),
    (["--heads", "0-12"], "heads '0-12': head 12 is out of range; the model has 12 heads, 0–11"),
    (["--layers", "2-x"], "use indices and ranges such as '0,3-5'"),
    (["--top-k", "0"], "top_k 0: use a positive number"),
])
def test_cli_invalid_thinning_exits_2(datasets: dict[str, Path], tmp_path: Path,
                                      capsys: pytest.CaptureFixture, args: list[str],
                                      says: str) -> None:
    from pipelines.cli import main

    out = tmp_path / "view.html"
    assert main(["view", str(datasets["main"]), "--doc", "pair", "--out", str(out), *args]) == 2
    assert says in capsys.readouterr().err and not out.exists()


def test_dataset_view_thins(datasets: dict[str, Path]) -> None:
    view = Dataset.open(datasets["main"]).view("pair", layers="2", heads=[0, 5], top_k=1)
    assert view.payload == view_data(datasets["main"], "pair", layers=[2], heads="0,5", top_k=1)
    assert view.payload["thinned"] == "layers 2 of 6; heads 0,5 of 12; top 1 key per query"
