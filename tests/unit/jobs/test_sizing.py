"""Sizes a job knows before it starts: the rows of a window, the shard rule, whether the
longest window fits the budget, and the working memory it expects."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from pipelines.compute.budget import GiB, MemoryBudget, MiB
from pipelines.config import AttentionMode, ConfigError, RunConfig
from pipelines.jobs.local import run_job_key
from pipelines.jobs.sizing import (
    ATTENTION_ROW_BYTES,
    HEAD_STATS_ROW_BYTES,
    TOKEN_ROW_BYTES,
    MemoryEstimate,
    check_fits,
    expected_memory,
    format_bytes,
    log_memory,
    qk_vector_bytes,
    row_bytes,
    shard_rule,
)
from pipelines.models import ModelInfo
from pipelines.text.plan import kept_pairs

#: MiniLM's shape: 6 layers × 12 heads of 32 dimensions.
BERT = ModelInfo("minilm", "/models/minilm", "bert", "bert", "0" * 16, num_layers=6,
                 num_heads=12, max_length=512, causal=False, sep_token_id=102, pad_token_id=0,
                 accepts_token_type_ids=True, head_dim=32)
GPT2 = dataclasses.replace(BERT, family="gpt2", model_type="gpt2", causal=True,
                           sep_token_id=None)
HEADS = 6 * 12


def config(attention: str = "topk:8", **changes: object) -> RunConfig:
    return RunConfig(attention=AttentionMode.parse(attention), **changes)


@pytest.mark.parametrize(("n", "causal", "top_k", "pairs"), [
    (10, False, None, 100), (10, True, None, 55), (10, False, 3, 30), (10, True, 3, 30),
    (2, True, 8, 3), (1, False, 8, 1),
])
def test_kept_pairs(n: int, causal: bool, top_k: int | None, pairs: int) -> None:
    assert kept_pairs(n, causal, top_k) == pairs


def test_a_window_adds_its_kept_pairs_statistics_and_tokens() -> None:
    n = 100
    per_window = HEADS * HEAD_STATS_ROW_BYTES + n * TOKEN_ROW_BYTES
    full = row_bytes(config("full"), BERT).of_window(n)
    assert full == HEADS * ATTENTION_ROW_BYTES * n * n + per_window
    assert row_bytes(config("topk:8"), BERT).of_window(n) == (
        HEADS * ATTENTION_ROW_BYTES * n * 8 + per_window)
    assert row_bytes(config("none"), BERT).of_window(n) == per_window
    # threshold rows depend on the weights: bounded by what full keeps
    assert row_bytes(config("threshold:0.1"), BERT).of_window(n) == full
    causal = row_bytes(config("full"), GPT2).of_window(n)
    assert causal == HEADS * ATTENTION_ROW_BYTES * n * (n + 1) // 2 + per_window


def test_words_and_query_key_capture_add_their_rows() -> None:
    n, plain = 50, row_bytes(config("full"), BERT)
    words = row_bytes(config("full", analyses=("words",)), BERT)
    # word pairs are no more than token pairs: bounded like the attention rows
    assert words.of_window(n) - plain.of_window(n) == HEADS * ATTENTION_ROW_BYTES * n * n
    qk = row_bytes(config("full", capture_qk=True), BERT)
    assert qk.of_window(n) - plain.of_window(n) == n * qk_vector_bytes(BERT)
    assert qk_vector_bytes(BERT) == HEADS * (2 * 32 + 1) * 4


def test_the_shard_rule_takes_a_quarter_of_the_budget() -> None:
    rule = shard_rule(config("full", memory_budget=GiB, shard_tokens=1000), BERT)
    assert (rule.tokens, rule.max_bytes) == (1000, GiB // 4)
    assert rule.sizes == row_bytes(config("full"), BERT)
    assert rule.closes(1000, 0) and rule.closes(1, GiB // 4) and not rule.closes(999, 1)
    assert rule.starts_new(5, GiB // 4 - 10, 11) and not rule.starts_new(5, GiB // 4 - 10, 10)
    assert rule.starts_new(5, 0, GiB)  # a document over the share goes to a shard of its own
    assert not rule.starts_new(0, 0, GiB)  # an empty shard takes any document


def cells_bytes(n: int, layers: int = 1) -> int:
    return 12 * n * n * 4 * 3 * layers  # heads × n² × float32 × live copies × layers held


#: Of a 64 MiB budget a batch gets 32 MiB, counted at twice its live tensors (the allocator's
#: slack): 16 MiB live, three quarters of it (12 MiB) for attention.
ATTENTION_SHARE = 12 * MiB


def test_a_window_too_long_for_whole_layers_runs_in_query_blocks() -> None:
    """Without an analysis that reads whole layers, any window fits: the torch backend then
    computes each layer's attention a block of query rows at a time."""
    check_fits(4096, config(memory_budget=64 * MiB), BERT)
    check_fits(4096, config(memory_budget=64 * MiB), GPT2)


def test_whole_layers_must_fit_when_an_analysis_reads_them() -> None:
    budget = config(memory_budget=64 * MiB, analyses=("words",))
    check_fits(295, budget, BERT)
    assert cells_bytes(295) <= ATTENTION_SHARE < cells_bytes(296)
    with pytest.raises(ConfigError) as refused:
        check_fits(296, budget, BERT)
    message = str(refused.value)
    for needle in ("a window of 296 tokens needs 12 MiB", "12 heads × 296² cells",
                   "× 1 layer at once", "the analysis words reads whole layers",
                   "memory budget of 64 MiB", "Raise --memory-budget or lower --max-length"):
        assert needle in message, message


def test_an_analysis_or_backend_that_holds_every_layer_needs_that_much_more() -> None:
    """``similarity`` accumulates over every layer at once, and ONNX Runtime forms them all
    in one run: six layers held, not one."""
    similarity = config(memory_budget=64 * MiB, analyses=("similarity",))
    check_fits(120, similarity, BERT)
    assert cells_bytes(120, 6) <= ATTENTION_SHARE < cells_bytes(121, 6)
    with pytest.raises(ConfigError, match="× 6 layers at once"):
        check_fits(121, similarity, BERT)
    plain = config(memory_budget=64 * MiB)
    check_fits(120, plain, BERT, streams=False, runtime="onnx")
    with pytest.raises(ConfigError, match="the onnx backend forms whole layers itself"):
        check_fits(121, plain, BERT, streams=False, runtime="onnx")


def test_the_expected_peak_is_a_batch_and_two_shards() -> None:
    job = config("full", memory_budget=2 * GiB, batch_tokens=1024)
    estimate = expected_memory(128, 1000, 5, 300 * MiB, job, BERT)
    assert estimate.batch == 8 * cells_bytes(128)  # 1024 tokens: 8 windows of 128
    assert estimate.total == estimate.batch + 2 * 300 * MiB
    one_shard = expected_memory(128, 3, 1, 300 * MiB, job, BERT)
    assert one_shard.batch == 3 * cells_bytes(128) and one_shard.shards_alive == 1
    capped = expected_memory(512, 10**6, 9, 0, config(memory_budget=GiB, batch_tokens=10**6),
                             BERT)
    assert capped.batch == MemoryBudget(GiB).batch_bytes  # never more than its share


def test_the_expected_memory_is_logged_and_a_warning_when_over_budget(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pipelines.jobs.sizing")
    log_memory(MemoryEstimate(2 * GiB, 1 * GiB, 154 * MiB))
    log_memory(MemoryEstimate(2 * GiB, 1 * GiB, 806 * MiB))
    fits, over = caplog.records
    assert fits.levelno == logging.INFO and fits.getMessage() == (
        "memory: ~1.3 GiB working memory expected (budget 2.0 GiB) beyond the model: batch "
        "~1.0 GiB, shard rows 2 × ~154 MiB")
    assert over.levelno == logging.WARNING
    assert "more than the budget" in over.getMessage() and "(512 MiB)" in over.getMessage()


@pytest.mark.parametrize(("size", "text"), [(3 * GiB // 2, "1.5 GiB"), (640 * MiB, "640 MiB"),
                                            (12 * 1024, "12 KiB")])
def test_format_bytes(size: int, text: str) -> None:
    assert format_bytes(size) == text


def test_the_memory_budget_is_part_of_the_resume_key() -> None:
    """It changes the shard plan, so a job resumed with another budget is refused."""
    def key(job: RunConfig) -> str:
        return run_job_key({"config": job.to_dict(), "stats_version": 1,
                            "model": {"config_hash": "h", "path": "p"},
                            "input": {"fingerprint": "f"}})

    assert key(config(memory_budget=GiB)) != key(config(memory_budget=2 * GiB))
    assert key(config(batch_tokens=1024)) == key(config(batch_tokens=2048))  # speed only
