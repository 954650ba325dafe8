"""A 4,096-token window: within a 2 GiB memory budget, statistics equal to float64 maths.

The model is a seeded random GPT-2 with 4,096 positions and 12 heads, so that one layer's
attention over the window (12 x 4096^2 float32 = 805 MB, three copies alive in an eager
forward) does not fit the budget's 1 GiB batch share: the job computes the attention in query
blocks (``hooks.blocked_attention``). The reference recomputes each head's attention from the
captured queries and keys in float64 and applies the definitions with plain NumPy.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import build_gpt2_folder
from float64_stats import float64_statistics
from tolerances import STAT_ATOL

from pipelines.analysis.batch import attention_block_rows
from pipelines.backends import create_backend
from pipelines.backends.batching import collate
from pipelines.compute.budget import GiB
from pipelines.config import RunConfig, WindowConfig
from pipelines.jobs.demo import paragraphs
from pipelines.text.tokenize import Document, Windower

LENGTH = 4096
BUDGET = 2 * GiB
LOCAL_WINDOW = 2
#: Heads checked against the float64 reference (all 24 would take a minute of NumPy).
CHECKED_HEADS = [(0, 0), (0, 7), (1, 3), (1, 11)]

#: Runs a job in a fresh process and prints its peak RSS before and after the long window.
CHILD = """
import json, resource, sys
from pipelines.backends import create_backend
from pipelines.config import AttentionMode, RunConfig, WindowConfig
from pipelines.jobs.local import run_job
model, corpus, warm, out, budget, length = sys.argv[1:7]
backend = create_backend("torch", model, "cpu")
windows = WindowConfig(max_length=int(length), truncate=True)
config = RunConfig(model=model, device="cpu", attention=AttentionMode.parse("topk:8"),
                   windows=windows, memory_budget=int(budget))
run_job([warm], out + "-warm", config, backend=backend, progress=False)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
run_job([corpus], out, config, backend=backend, progress=False)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"before_kib": before, "after_kib": after}))
"""


@pytest.fixture(scope="module")
def long_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_gpt2_folder(tmp_path_factory.mktemp("gpt2-4096"), n_layer=2, n_head=12,
                             n_embd=96, n_positions=LENGTH)


def long_text() -> str:
    """Help-topic prose, more than 4,096 GPT-2 tokens of it."""
    return " ".join(p["text"] for p in paragraphs()[:200])


def reference_heads(model: Path) -> dict[tuple[int, int], dict[str, float]]:
    """Float64 statistics of the checked heads, from the queries and keys the model
    projects for the window (captured from a forward pass)."""
    backend = create_backend("torch", str(model), "cpu")
    windower = Windower(backend.tokenizer, backend.info,
                        WindowConfig(max_length=LENGTH, truncate=True))
    (window,) = windower.windows(Document("long", long_text()))
    assert window.n_tokens == LENGTH
    batch = collate([window], backend.info.pad_token_id)
    config = RunConfig(model=str(model), memory_budget=BUDGET)
    assert attention_block_rows(backend.info, config, 1, LENGTH) is not None, \
        "the window must be too long for whole layers under the budget"
    with backend.capture_queries_keys() as captured:
        backend.layers(batch, lambda layer, start, probs: None, 512)
    causal = np.tril(np.ones((LENGTH, LENGTH), dtype=bool))
    out = {}
    for layer, head in CHECKED_HEADS:
        query, key, scale = captured[layer]
        q = query[0, head].double().numpy()
        k = key[0, head].double().numpy()
        scores = np.where(causal, q @ k.T * scale, -np.inf)
        a = np.exp(scores - scores.max(1, keepdims=True))
        a /= a.sum(1, keepdims=True)
        out[(layer, head)] = float64_statistics(a, np.asarray(window.is_special, bool),
                                                np.asarray(window.is_punct, bool), True,
                                                LOCAL_WINDOW)
    return out


def test_a_4096_token_window_runs_within_2_gib_and_matches_float64(long_model: Path,
                                                                   tmp_path: Path) -> None:
    corpus, warm = tmp_path / "long.jsonl", tmp_path / "warm.jsonl"
    corpus.write_text(json.dumps({"id": "long", "text": long_text()}) + "\n")
    warm.write_text(json.dumps({"id": "warm", "text": "A short warm-up text."}) + "\n")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", CHILD, str(long_model), str(corpus),
                           str(warm), str(out), str(BUDGET), str(LENGTH)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    rss = json.loads(done.stdout.strip().splitlines()[-1])
    working = (rss["after_kib"] - rss["before_kib"]) * 1024
    assert working <= BUDGET, f"{working / GiB:.2f} GiB beyond the model, budget 2 GiB"

    stats = pd.read_parquet(out / "head_stats")
    assert set(stats["n_tokens"]) == {LENGTH}
    want = reference_heads(long_model)
    for (layer, head), expected in want.items():
        row = stats[(stats["layer"] == layer) & (stats["head"] == head)].iloc[0]
        for name, value in expected.items():
            # statistics in tokens carry n times a weight's error: compared divided by n;
            # k90 counts keys: a row whose running sum sits within rounding of 0.9 may
            # count one more or one fewer key (each such row moves the mean by 1/n)
            scale = LENGTH if name in ("mean_distance", "k90") else 1
            tolerance = STAT_ATOL + (8 / LENGTH if name == "k90" else 0.0)
            assert math.isclose(row[name] / scale, value / scale, rel_tol=0,
                                abs_tol=tolerance), (layer, head, name, row[name], value)
