"""``analyse_documents``: the worker's batching logic as a plain function, on real MiniLM.

Documents from different requests (so with clashing doc_ids and different options) share
forward passes; each must still get exactly the rows ``model_tables`` gives it alone.
"""

from __future__ import annotations

import numpy as np
import pytest
from compare_tables import STAT_ATOL, assert_same_tables
from conftest import SAMPLE_TEXTS

from pipelines.analysis.batch import model_tables
from pipelines.backends.torch.backend import TorchBackend
from pipelines.config import AttentionMode, RunConfig, WindowConfig
from pipelines.dataset import schema
from pipelines.text.tokenize import Document, Window, Windower
from service.worker import DocumentJob, analyse_documents

LONG_TEXT = " ".join(SAMPLE_TEXTS) * 3  # several windows at max_length 32


def windows_for(backend: TorchBackend, doc_id: str, text: str, pair: str | None = None,
                max_length: int | None = None, stride: int = 8) -> list[Window]:
    windower = Windower(backend.tokenizer, backend.info, WindowConfig(max_length, stride))
    return windower.windows(Document(doc_id, text, pair, source="test"))


def alone(backend: TorchBackend, job: DocumentJob, batch_tokens: int = 8192) -> dict:
    config = RunConfig(attention=AttentionMode.parse(job.attention),
                       local_window=job.local_window, batch_tokens=batch_tokens)
    return model_tables(backend, job.windows, config)


@pytest.fixture(scope="module")
def jobs(minilm: TorchBackend) -> list[DocumentJob]:
    """Ten documents as they would come from several requests.

    doc_ids clash across requests ("a" twice, "request-x:0" twice with different texts),
    attention modes and local windows are mixed, one document has several windows and one is
    a text pair.
    """
    specs = [
        ("a", SAMPLE_TEXTS[0], None, None, "topk:4", 2),
        ("a", SAMPLE_TEXTS[1], None, None, "topk:4", 2),
        ("request-x:0", SAMPLE_TEXTS[2], None, None, "none", 2),
        ("long", LONG_TEXT, None, 32, "topk:4", 2),
        ("request-x:0", SAMPLE_TEXTS[3], None, None, "threshold:0.1", 2),
        ("pair", SAMPLE_TEXTS[0], SAMPLE_TEXTS[1], None, "topk:4", 1),
        ("b", SAMPLE_TEXTS[3], None, None, "full", 2),
        ("c", SAMPLE_TEXTS[1], None, None, "topk:8", 2),
        ("a", SAMPLE_TEXTS[2], None, None, "topk:4", 0),
        ("d", SAMPLE_TEXTS[0], None, None, "topk:4", 2),
    ]
    return [DocumentJob(windows_for(minilm, doc_id, text, pair, max_length), mode, local)
            for doc_id, text, pair, max_length, mode, local in specs]


@pytest.fixture(scope="module")
def batched(minilm: TorchBackend, jobs: list[DocumentJob]) -> list[dict]:
    return analyse_documents(minilm, jobs, batch_tokens=8192)


def test_one_result_per_job_in_job_order(jobs: list[DocumentJob], batched: list[dict]) -> None:
    assert len(batched) == len(jobs)
    for job, result in zip(jobs, batched, strict=True):
        assert set(result) == {"head_stats", "attention"}
        doc_id = job.windows[0].doc.doc_id
        assert set(result["head_stats"]["doc_id"].to_pylist()) == {doc_id}
        windows = {w.window for w in job.windows}
        assert set(result["head_stats"]["window"].to_pylist()) == windows
        if result["attention"].num_rows:
            assert set(result["attention"]["doc_id"].to_pylist()) == {doc_id}


def test_each_job_equals_model_tables_alone(minilm: TorchBackend, jobs: list[DocumentJob],
                                            batched: list[dict]) -> None:
    for job, result in zip(jobs, batched, strict=True):
        assert_same_tables(result, alone(minilm, job), job.attention)


def test_multi_window_document_keeps_every_window(jobs: list[DocumentJob],
                                                  batched: list[dict]) -> None:
    long_job = next(i for i, j in enumerate(jobs) if j.windows[0].doc.doc_id == "long")
    assert len(jobs[long_job].windows) > 2
    stats = batched[long_job]["head_stats"]
    per_window = 6 * 12  # MiniLM: layers × heads
    assert stats.num_rows == len(jobs[long_job].windows) * per_window


def test_modes_and_local_window_are_per_job(jobs: list[DocumentJob],
                                            batched: list[dict]) -> None:
    by_mode = {job.attention: result for job, result in zip(jobs, batched, strict=True)}
    assert by_mode["none"]["attention"].num_rows == 0
    assert by_mode["full"]["attention"].schema == schema.attention_schema(True)
    assert by_mode["topk:4"]["attention"].schema == schema.attention_schema(False)
    topk8 = batched[7]["attention"].to_pandas()
    assert topk8.groupby(["layer", "head", "query"]).size().max() == 8
    # Same text, different local_window: mass_window differs, entropy does not.
    same_text = [i for i, j in enumerate(jobs) if j.windows[0].doc.text == SAMPLE_TEXTS[2]]
    none_job, lw0_job = same_text
    left = batched[none_job]["head_stats"].to_pandas()
    right = batched[lw0_job]["head_stats"].to_pandas()
    # two rows of one padded batch: same inputs, other rows of the same GEMMs; STAT_ATOL
    np.testing.assert_allclose(left["entropy"], right["entropy"], rtol=0, atol=STAT_ATOL)
    assert not np.allclose(left["mass_window"], right["mass_window"])


def test_result_does_not_depend_on_the_batch_mates(minilm: TorchBackend,
                                                   jobs: list[DocumentJob],
                                                   batched: list[dict]) -> None:
    """The same jobs in reverse order, and with a small token budget, give the same rows."""
    reverse = analyse_documents(minilm, jobs[::-1], batch_tokens=8192)[::-1]
    small = analyse_documents(minilm, jobs, batch_tokens=64)
    for job, first, second, third in zip(jobs, batched, reverse, small, strict=True):
        assert_same_tables(second, first, job.attention)
        assert_same_tables(third, first, job.attention)


def test_single_job_and_no_jobs(minilm: TorchBackend, jobs: list[DocumentJob]) -> None:
    assert analyse_documents(minilm, [], batch_tokens=8192) == []
    [only] = analyse_documents(minilm, [jobs[3]], batch_tokens=8192)
    assert_same_tables(only, alone(minilm, jobs[3]), jobs[3].attention)


def test_duplicate_ids_get_their_own_rows(jobs: list[DocumentJob], batched: list[dict]) -> None:
    """Two jobs both called "a" with different texts: token counts follow each job's text."""
    first, second = batched[0]["head_stats"], batched[1]["head_stats"]
    assert first["doc_id"].to_pylist()[0] == second["doc_id"].to_pylist()[0] == "a"
    assert first["n_tokens"].to_pylist()[0] == jobs[0].windows[0].n_tokens
    assert second["n_tokens"].to_pylist()[0] == jobs[1].windows[0].n_tokens
    assert jobs[0].windows[0].n_tokens != jobs[1].windows[0].n_tokens


def test_statistics_conventions_are_per_job(minilm: TorchBackend) -> None:
    """Clark et al.'s entropy smoothing and word rows for one job, the defaults for another,
    in one call: each gets what model_tables gives its own options alone."""
    text = "Unbelievably, the antidisestablishmentarian cat sat."
    plain = DocumentJob(windows_for(minilm, "p", text), "topk:4", 2, ("words",))
    clark = DocumentJob(windows_for(minilm, "c", text), "topk:4", 2, ("words",),
                        entropy_epsilon=1e-4, word_rows="first")
    got = analyse_documents(minilm, [plain, clark], batch_tokens=8192)
    configs = [RunConfig(attention=AttentionMode.parse("topk:4"), analyses=("words",)),
               RunConfig(attention=AttentionMode.parse("topk:4"), analyses=("words",),
                         entropy_epsilon=1e-4, word_rows="first")]
    for job, result, config in zip((plain, clark), got, configs, strict=True):
        want = model_tables(minilm, job.windows, config)
        assert_same_tables(result, want, "topk:4")
        # word weights: the same batch shapes (one window each way), other padding at most
        np.testing.assert_allclose(result["word_attention"]["weight"].to_numpy(),
                                   want["word_attention"]["weight"].to_numpy(), rtol=0,
                                   atol=STAT_ATOL)
    entropy = [result["head_stats"]["entropy"].to_numpy() for result in got]
    # smoothing raises every head's entropy (float32 rounding aside: STAT_ATOL)
    assert (entropy[1] >= entropy[0] - STAT_ATOL).all() and (entropy[1] - entropy[0]).max() > 5e-4
    first_rows = got[1]["word_attention"]["weight"].to_numpy()
    assert len(first_rows) == len(got[0]["word_attention"]) and not np.allclose(
        first_rows, got[0]["word_attention"]["weight"].to_numpy())
