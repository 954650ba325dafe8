"""The layerwise analyses (patterns, words) fed one layer at a time by the engine equal the
same functions run on every layer stacked.

Both sides read the very same probabilities (``backend.attentions`` stacks exactly what the
layer sink hands over). The analyses' sums and scatter-adds over [1, B, H, ...] instead of
[L, B, H, ...] may round differently by a few float32 ulps of each sum (the reasoning of
``STREAM_RTOL``, tests/tolerances.py); pattern classes and kept word pairs follow the same
values, so they agree wherever a score or a weight is not within that rounding of a threshold
or a tie.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from conftest import SAMPLE_TEXTS
from tolerances import STREAM_RTOL

from pipelines.analysis import patterns, words
from pipelines.analysis.batch import batch_tables
from pipelines.analysis.registry import BatchContext
from pipelines.backends.batching import Batch, collate
from pipelines.backends.torch.backend import TorchBackend
from pipelines.config import AttentionMode, RunConfig, WindowConfig
from pipelines.text.tokenize import Document, Windower

KEYS = ["doc_id", "window", "layer", "head"]


def batch_of(backend: TorchBackend) -> Batch:
    docs = [Document(f"d{i}", text) for i, text in enumerate(SAMPLE_TEXTS)]
    docs.append(Document("pair", "Is it raining?", "No, the sun is out today."))
    windower = Windower(backend.tokenizer, backend.info, WindowConfig())
    return collate([w for doc in docs for w in windower.windows(doc)],
                   backend.info.pad_token_id)


def frame(table: pa.Table, keys: list[str]):
    return table.to_pandas().sort_values(keys).reset_index(drop=True)


@pytest.mark.parametrize("mode", ["none", "topk:3", "full"])
def test_layerwise_tables_equal_the_stacked_functions(backend: TorchBackend,
                                                      mode: str) -> None:
    config = RunConfig(attention=AttentionMode.parse(mode), analyses=("patterns", "words"))
    batch = batch_of(backend)
    streamed = {name: table for name, (table, _) in
                batch_tables(backend, batch, config).items()}
    context = BatchContext(batch, backend.attentions(batch), backend.info, config)
    want_patterns = patterns.patterns_table(context)
    want_words, _ = words.word_attention_table(context)

    got, want = frame(streamed["head_patterns"], KEYS), frame(want_patterns, KEYS)
    assert len(got) == len(want) == len(batch.windows) * backend.info.num_layers * \
        backend.info.num_heads
    for score in ("vertical", "diagonal", "block"):
        np.testing.assert_allclose(got[score], want[score], rtol=STREAM_RTOL,
                                   atol=STREAM_RTOL, equal_nan=True, err_msg=score)
    assert (got["pattern"] == want["pattern"]).all()

    word_keys = [*KEYS, "query_word", "key_word"]
    got, want = frame(streamed["word_attention"], word_keys), frame(want_words, word_keys)
    if mode == "none":
        assert len(got) == len(want) == 0
        return
    assert len(want) > 0
    assert got[word_keys].equals(want[word_keys])
    np.testing.assert_allclose(got["weight"], want["weight"], rtol=STREAM_RTOL,
                               atol=STREAM_RTOL)
