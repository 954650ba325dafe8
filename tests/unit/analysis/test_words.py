"""Word-level attention against plain loops over the tokenizer's own word ids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SAMPLE_TEXTS
from tolerances import ATTENTION_ATOL, EPS32, FLOAT16_ATOL

from pipelines.analysis import registry, words
from pipelines.analysis.batch import model_tables, sort_tables
from pipelines.backends.batching import collate
from pipelines.backends.torch.backend import TorchBackend
from pipelines.compute.words import word_attention
from pipelines.config import AttentionMode, RunConfig, WindowConfig
from pipelines.dataset.tables import concat
from pipelines.text.tokenize import Document, Windower

TEXTS = ["Unbelievably, the antidisestablishmentarian cat-sat.", *SAMPLE_TEXTS]
PAIR = Document("pair", "Where did the tokenizer split?", text_pair="Everywhere, surprisingly.")


def docs(backend: TorchBackend) -> list[Document]:
    found = [Document(f"d{i}", t) for i, t in enumerate(TEXTS)]
    return found if backend.info.causal else [*found, PAIR]


def reference_groups(backend: TorchBackend, doc: Document) -> list[list[int]]:
    """Token positions of each word, from the tokenizer's high-level call and plain loops."""
    enc = backend.tokenizer(doc.text, doc.text_pair)
    word_ids, sequence_ids = enc.word_ids(), enc.sequence_ids()
    special = set(backend.tokenizer.all_special_ids)
    groups: list[list[int]] = []
    previous = None
    for position, (word, sequence) in enumerate(zip(word_ids, sequence_ids, strict=True)):
        key = (sequence, word)
        is_special = word is None or enc["input_ids"][position] in special
        if is_special or key != previous or not groups:
            groups.append([position])
        else:
            groups[-1].append(position)
        previous = None if is_special else key
    return groups


def reference_word_attention(attn: np.ndarray, groups: list[list[int]]) -> np.ndarray:
    """[W, W]: mean over a query word's tokens of the summed weights to a key word's tokens."""
    out = np.zeros((len(groups), len(groups)))
    for q, query_tokens in enumerate(groups):
        for k, key_tokens in enumerate(groups):
            out[q, k] = np.mean([sum(attn[i, j] for j in key_tokens) for i in query_tokens])
    return out


def test_word_attention_matches_loops_over_the_tokenizer_word_ids(
        backend: TorchBackend) -> None:
    windower = Windower(backend.tokenizer, backend.info, WindowConfig())
    windows = [windower.windows(doc)[0] for doc in docs(backend)]
    batch = collate(windows, backend.info.pad_token_id)
    attn = backend.attentions(batch)  # [L, B, H, S, S]
    index = words.word_index(windows, attn.shape[-1], attn.device)
    word_attn, word_valid = word_attention(attn, index)
    for row, (window, doc) in enumerate(zip(windows, docs(backend), strict=True)):
        groups = reference_groups(backend, doc)
        assert len(groups) == int(word_valid[row].sum()) <= window.n_tokens
        for layer, head in ((0, 0), (backend.info.num_layers - 1, backend.info.num_heads - 1)):
            want = reference_word_attention(attn[layer, row, head].numpy(), groups)
            got = word_attn[layer, row, head, : len(groups), : len(groups)].numpy()
            # the same float32 weights summed in another order: a word weight adds ≤ 7 key
            # tokens' weights (≤ 1 in all) and averages ≤ 7 query tokens: ≤ 14·eps32 ≈ 1.7e-6
            np.testing.assert_allclose(got, want, rtol=0, atol=16 * EPS32)
    assert int(word_valid[0].sum()) < windows[0].n_tokens  # TEXTS[0] has split words
    rows = word_attn.sum(-1).permute(1, 3, 0, 2)[word_valid]  # [valid words, L, H]: sum to 1
    # float32: softmax rows sum to 1 within n·eps32, regrouped into ≤ n words: ≤ 2·40·eps32
    torch.testing.assert_close(rows, torch.ones_like(rows), rtol=0, atol=1e-5)


def test_words_table_names_each_word_once(minilm: TorchBackend) -> None:
    windower = Windower(minilm.tokenizer, minilm.info, WindowConfig())
    table = words.words_table(windower.windows(Document("d0", TEXTS[0]))).to_pandas()
    assert table["text"].tolist() == ["[CLS]", "Unbelievably", ",", "the",
                                      "antidisestablishmentarian", "cat", "-", "sat", ".", "[SEP]"]
    assert (table["token_end"] > table["token_start"]).all()
    assert table["word"].tolist() == list(range(len(table)))


def test_pair_words_keep_their_segment(minilm: TorchBackend) -> None:
    windower = Windower(minilm.tokenizer, minilm.info, WindowConfig())
    table = words.words_table(windower.windows(PAIR)).to_pandas()
    second = table[table["segment"] == 1]
    assert second["text"].tolist() == ["Everywhere", ",", "surprisingly", ".", "[SEP]"]


@pytest.mark.parametrize("mode", ["topk:3", "threshold:0.2", "full"])
def test_batched_word_attention_equals_one_window_at_a_time(backend: TorchBackend,
                                                            mode: str) -> None:
    """Padding must not change a word weight; windows of a long text included."""
    windower = Windower(backend.tokenizer, backend.info, WindowConfig(max_length=24, stride=4))
    windows = [w for doc in [*docs(backend), Document("long", " ".join(TEXTS))]
               for w in windower.windows(doc)]
    config = RunConfig(attention=AttentionMode.parse(mode), analyses=("words",))
    batched = model_tables(backend, windows, config)["word_attention"]
    single = concat(model_tables(backend, [w], config) for w in windows)
    single = sort_tables({"word_attention": single["word_attention"]})["word_attention"]
    assert batched.schema == words.word_attention_schema(mode == "full")
    keys = registry.sort_keys()["word_attention"]
    assert batched.select(keys).equals(single.select(keys))  # keys: strings and integers
    # other padding: ATTENTION_ATOL; full mode stores float16: FLOAT16_ATOL
    np.testing.assert_allclose(batched["weight"].to_numpy().astype(float),
                               single["weight"].to_numpy().astype(float), rtol=0,
                               atol=FLOAT16_ATOL if mode == "full" else ATTENTION_ATOL)
