"""Query/key capture (``--capture-qk``): the stored vectors reproduce the model's attention."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import SAMPLE_TEXTS
from tolerances import ATTENTION_ATOL

from pipelines.backends import create_backend
from pipelines.backends.batching import collate
from pipelines.backends.torch.backend import TorchBackend
from pipelines.config import AttentionMode, ConfigError, RunConfig
from pipelines.jobs.local import run_job
from pipelines.text.inputs import Columns, read_documents
from pipelines.text.tokenize import Windower


def write_corpus(folder: Path) -> Path:
    path = folder / "corpus.jsonl"
    rows = [{"id": f"d{i}", "text": text} for i, text in enumerate(SAMPLE_TEXTS)]
    rows.append({"id": "pair", "text": SAMPLE_TEXTS[0], "text_pair": SAMPLE_TEXTS[1]})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def qk_job(backend: TorchBackend, folder: Path, batch_tokens: int) -> pd.DataFrame:
    config = RunConfig(model=backend.info.path, device="cpu", capture_qk=True,
                       attention=AttentionMode.parse("none"), batch_tokens=batch_tokens)
    out = folder / f"out{batch_tokens}"
    run_job([write_corpus(folder)], out, config, backend=backend, progress=False)
    return pd.read_parquet(out / "qk")


def softmax_from_qk(rows: pd.DataFrame, n: int, causal: bool) -> np.ndarray:
    """Plain NumPy: softmax(q·k · scale) over the keys a query may see, [n, n]."""
    rows = rows.sort_values("position")
    query, key = np.stack(rows["query"]), np.stack(rows["key"])  # [n, d] each
    scores = query.astype(np.float64) @ key.T.astype(np.float64) * rows["scale"].iloc[0]
    if causal:
        scores = np.where(np.tril(np.ones((n, n), bool)), scores, -np.inf)
    scores -= scores.max(axis=1, keepdims=True)
    weights = np.exp(scores)
    return weights / weights.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("name", ["minilm", "gpt2"])
def test_stored_vectors_reproduce_the_attention(name: str, request: pytest.FixtureRequest,
                                                tmp_path: Path) -> None:
    backend: TorchBackend = request.getfixturevalue(name)
    qk = qk_job(backend, tmp_path, batch_tokens=8192)
    info = backend.info
    windower = Windower(backend.tokenizer, info, RunConfig().windows)
    docs = list(read_documents([write_corpus(tmp_path)], Columns()))
    assert set(qk["doc_id"]) == {doc.doc_id for doc in docs}
    for doc in docs:
        window = windower.windows(doc)[0]
        attn = backend.attentions(collate([window], info.pad_token_id))[:, 0]  # [L, H, S, S]
        rows = qk[qk["doc_id"] == doc.doc_id]
        assert len(rows) == info.num_layers * info.num_heads * window.n_tokens
        for (layer, head), head_rows in rows.groupby(["layer", "head"]):
            assert len(head_rows["query"].iloc[0]) == info.head_dim
            got = softmax_from_qk(head_rows, window.n_tokens, info.causal)
            # another kernel: float64 softmax of the stored float32 q·k vs the model's float32
            # attention, whose logits (d_head ≤ 32 terms, |logit| ≲ 10) round at
            # ≤ d·eps32·|logit| ≈ 4e-5 worst case, a weight w by w·that: ATTENTION_ATOL
            np.testing.assert_allclose(got, attn[layer, head].numpy(), rtol=0, atol=ATTENTION_ATOL,
                                       err_msg=f"{doc.doc_id} layer {layer} head {head}")


def test_batched_equals_one_window_per_batch(minilm: TorchBackend, tmp_path: Path) -> None:
    batched = qk_job(minilm, tmp_path, batch_tokens=8192)
    single = qk_job(minilm, tmp_path, batch_tokens=60)  # one window per forward pass
    keys = ["doc_id", "window", "layer", "head", "position"]
    pd.testing.assert_frame_equal(batched[keys], single[keys])  # keys: strings and integers
    # other batch shapes (8192 vs 60 tokens): float32 projections of hidden states that moved
    # by a few eps32 per layer; entries |q|, |k| ≲ 10, so ≲ 10·6 layers·few·eps32 < 1e-5
    for column in ("query", "key"):
        np.testing.assert_allclose(np.stack(batched[column]), np.stack(single[column]),
                                   rtol=0, atol=1e-5)


def test_capture_needs_the_torch_backend(minilm_onnx_dir: Path, tmp_path: Path) -> None:
    backend = create_backend("auto", str(minilm_onnx_dir), "cpu")
    config = RunConfig(model=str(minilm_onnx_dir), capture_qk=True, device="cpu")
    with pytest.raises(ConfigError, match="--capture-qk needs a backend with query_key_capture"):
        run_job([write_corpus(tmp_path)], tmp_path / "out", config, backend=backend,
                progress=False)
    assert not (tmp_path / "out").exists()
