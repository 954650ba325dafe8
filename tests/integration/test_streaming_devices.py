"""The streaming reduction and whole jobs on CUDA, each test with a CPU twin that runs anywhere.

The CUDA cases are marked ``gpu`` and skip without CUDA. Their twins run the same code on the
CPU; where the arithmetic there differs, the twin says how. Cases with MiniLM skip where its
package is missing (``needs_minilm``), so the whole module runs on a bare GPU machine.

How close each comparison must be, and why:

- **Streaming vs stacked on one device** (same probabilities, one forward pass): on the CPU
  within ``STREAM_RTOL`` (tests/unit/compute/test_streaming.py). On CUDA the reductions over
  keys and over query rows are split across threads in a way that depends on how many rows a
  call has ([L, B, H, S] stacked, [1, B, H, Q] per block), so no summation order is shared and
  only the order-free bound holds: a float32 sum of m non-negative terms (every statistic's
  row terms are: weights times flags or distances, -w ln w) is within (m - 1) eps32 of its
  sum, relatively, whatever the order. Two levels (keys, then rows; m <= S each) on either
  side: ``cuda_stream_rtol(S)`` = 4 S eps32 of max(1, |value|). k90 counts the sorted row's
  cumulative sums up to 0.9: a row's count may change only where a cumulative sum lies within
  the scans' error of the boundary (``k90_near_ties``), each such sum moving the mean by 1/n.
  Kept weights are the same values picked by the same rules: identical.
- **A CUDA job vs the CPU job**: other kernels (cuBLAS vs CPU BLAS, other exp/tanh/erf
  rounding by an ulp or two; no TF32, torch's default) change the order and last-ulp rounding
  of every operation, as another batch shape does on the CPU (the reasoning of
  ``ATTENTION_ATOL`` and ``STAT_ATOL``: a few eps32 relative per layer, compounding), but in
  every operation at once, so the size is measured against the exact result instead: each
  float32 run lies within its own rounding error of it, and two runs within twice that
  (``CROSS_DEVICE_WEIGHT_ATOL``; statistics within ``STAT_ATOL``), compared by
  ``compare_tables`` (mean_distance per token, a k90 flip allowed). The twin: the CPU job
  against a CPU job with other batch shapes, within ``ATTENTION_ATOL`` and ``STAT_ATOL``.
- **float16 / bfloat16 against float32** on the same device: ``half_bounds``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from compare_tables import assert_attention_equal, assert_head_stats_equal
from conftest import SAMPLE_TEXTS, mixed_batch, needs_minilm
from tolerances import ATTENTION_ATOL, EPS32, STAT_ATOL, STREAM_RTOL

from pipelines.backends.base import DTYPES, QueryKey
from pipelines.backends.batching import Batch
from pipelines.backends.torch.backend import TorchBackend
from pipelines.compute.kept import kept_weights, visible_pairs
from pipelines.compute.stats import (
    K90_MASS,
    STAT_NAMES,
    KeyFlags,
    head_statistics,
    keys_visible,
    row_order,
)
from pipelines.compute.streaming import LayerReduction, ReductionSpec
from pipelines.config import AttentionMode, RunConfig, WindowConfig
from pipelines.jobs.local import run_job

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])
MODELS = ["gpt2", pytest.param("minilm", marks=needs_minilm)]
MODES = [AttentionMode("none"), AttentionMode("topk", k=3),
         AttentionMode("threshold", threshold=0.1), AttentionMode("full")]
#: Kept weights of a CUDA job against the CPU job's. A float32 run's weights lie within its
#: rounding error of the exact ones: seen <= 9.9e-6 against a float64 run of the same model on
#: the CPU (MiniLM; 6.3e-6 for the GPT-2 test model; the batch of ``mixed_batch``), and CUDA's
#: float32 kernels round as finely, so two runs lie within 2e-5 of each other: 4e-5 leaves a
#: 2x margin. Their statistics were within 1.1e-6 of float64's (same runs), so 2.2e-6 apart:
#: STAT_ATOL (1e-5) leaves 4.5x.
CROSS_DEVICE_WEIGHT_ATOL = 4e-5
#: Statistics measured in tokens, compared per token of the window (``compare_tables``).
IN_TOKENS = ("mean_distance",)

Loader = Callable[..., TorchBackend]


@pytest.fixture(scope="module")
def backends(gpt2_dir: Path) -> Iterator[Loader]:
    """``load(model, device, dtype)``: each model once per device and dtype in this module.

    Jobs refuse half precision on the CPU (slow, and a GPU's dtype); the CPU twins of the
    half-precision tests cast a loaded CPU model themselves to run the same arithmetic.
    """
    loaded: dict[tuple[str, str, str], TorchBackend] = {}

    def load(model: str, device: str = "cpu", dtype: str = "float32") -> TorchBackend:
        key = (model, device, dtype)
        if key not in loaded:
            source = str(gpt2_dir) if model == "gpt2" else model
            on_cpu_in_half = device == "cpu" and dtype != "float32"
            backend = TorchBackend(source, device=device,
                                   dtype="float32" if on_cpu_in_half else dtype)
            if on_cpu_in_half:
                backend.model.to(DTYPES[dtype])
                backend.dtype = DTYPES[dtype]
            loaded[key] = backend
        return loaded[key]

    yield load
    loaded.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def flags_of(batch: Batch) -> KeyFlags:
    return KeyFlags(batch.valid, batch.is_sep, batch.is_special, batch.is_punct)


def spec_of(backend: TorchBackend, mode: AttentionMode, block: int | None) -> ReductionSpec:
    info = backend.info
    return ReductionSpec(info.num_layers, info.causal, 2, info.sep_token_id is not None, mode,
                         0.0, block)


def reference_statistics(backend: TorchBackend, batch: Batch,
                         attn: torch.Tensor) -> dict[str, torch.Tensor]:
    """The stacked path's statistics of ``attn`` [L, B, H, S, S] (every layer at once)."""
    info = backend.info
    return head_statistics(attn, flags_of(batch), info.causal, 2, info.sep_token_id is not None)


def streamed_statistics(backend: TorchBackend, batch: Batch) -> dict[str, torch.Tensor]:
    """The job's path: statistics taken layer by layer inside the forward pass."""
    reduction = LayerReduction(spec_of(backend, AttentionMode("none"), None), flags_of(batch))
    backend.layers(batch, reduction.add_rows)
    return reduction.statistics()


def per_token(name: str, values: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
    """``values`` [L, B, H], divided by each window's tokens for statistics in tokens."""
    return values / n_tokens[None, :, None] if name in IN_TOKENS else values


def k90_mean(attn: torch.Tensor, valid: torch.Tensor, causal: bool,
             mass: float) -> torch.Tensor:
    """[L, B, H]: mean over valid query rows of the fewest keys holding ``mass``, capped at
    the keys each row may see (``row_terms``'s k90 for another mass)."""
    rows = row_order(attn.contiguous(), mass=mass).k90
    cap = keys_visible(valid, causal).clamp(min=1)[None, :, None, :]
    weights = valid.float()[None, :, None, :]
    return (torch.minimum(rows, cap) * weights).sum(-1) / weights.sum(-1)


# ------------------------------------------------------- streaming vs stacked, per device


def cuda_stream_rtol(length: int) -> float:
    """4 S eps32: two float32 sums of <= S non-negative terms each, on either side, in
    unrelated orders (module docstring)."""
    return 4 * length * EPS32


def k90_near_ties(attn: torch.Tensor, valid: torch.Tensor, rtol: float) -> torch.Tensor:
    """[L, B, H]: per head, the cumulative sums of valid rows' ascending weights that lie
    within ``rtol`` of the row's total of k90's boundary (total - 0.9), where another float32
    scan of the same row may count them on the other side; each moves the row's k90 by 1."""
    ascending = attn.sort(dim=-1).values.double()
    cumulative = ascending.cumsum(-1)
    total = cumulative[..., -1:]
    near = ((cumulative - (total - K90_MASS)).abs() <= rtol * total).sum(-1)  # [L, B, H, S]
    return (near * valid[None, :, None, :]).sum(-1).double()


@pytest.mark.parametrize("block", [1, 7, None])
@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("model", MODELS)
def test_streaming_equals_the_stacked_path_on_the_device(backends: Loader, model: str,
                                                         device: str,
                                                         block: int | None) -> None:
    """One forward pass feeds both paths the same probabilities; query blocks of 1 and 7
    rows and whole windows. The CPU twin is the bound of test_streaming.py."""
    backend = backends(model, device)
    batch = mixed_batch(backend)
    reductions = {str(mode): LayerReduction(spec_of(backend, mode, block), flags_of(batch))
                  for mode in MODES}
    held: list[torch.Tensor] = []

    def take(layer: int, start: int, probs: torch.Tensor) -> None:  # whole layers here
        held.append(probs.clone())
        for reduction in reductions.values():
            reduction.add_rows(layer, start, probs)

    backend.layers(batch, take)
    attn = torch.stack(held)  # [L, B, H, S, S] on the device
    assert attn.device.type == device
    want = reference_statistics(backend, batch, attn)
    got = reductions["none"].statistics()
    length = batch.input_ids.shape[1]
    rtol = STREAM_RTOL if device == "cpu" else cuda_stream_rtol(length)
    # On the CPU both paths sort with NumPy and scan each row alike: k90 bit for bit.
    flips = torch.zeros_like(want["k90"], dtype=torch.float64) if device == "cpu" else \
        k90_near_ties(attn, batch.valid, 2 * length * EPS32)
    n_tokens = want["n_tokens"].double()
    assert torch.equal(got["n_tokens"], want["n_tokens"])
    for name in STAT_NAMES:
        assert got[name].device == attn.device, name
        assert got[name].dtype == torch.float32, name
        if name == "k90":
            difference = (got[name].double() - want[name].double()).abs()
            allowed = flips / n_tokens[None, :, None] + rtol * want[name].double().clamp(min=1)
            assert bool((difference <= allowed).all()), \
                f"k90: {int((difference > allowed).sum())} heads beyond near-ties"
            continue
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=rtol, equal_nan=True,
                                   msg=name)
    for mode in MODES[1:]:
        kth = row_order(attn.contiguous(), mode.k or None).kth_largest
        expected = kept_weights(attn, batch.valid, backend.info.causal, mode, kth)
        kept = reductions[str(mode)].kept()
        assert expected is not None and kept is not None and set(kept) == set(expected)
        assert len(expected["weight"]) > 0
        for column in expected:
            assert kept[column].dtype == expected[column].dtype, (mode, column)
            np.testing.assert_array_equal(kept[column], expected[column],
                                          err_msg=f"{mode} {column}")


# ---------------------------------------------------------------- a CUDA job vs the CPU's


def write_corpus(folder: Path) -> Path:
    path = folder / "corpus.jsonl"
    docs = [{"id": f"d{i}", "text": text} for i, text in enumerate(SAMPLE_TEXTS)]
    docs.append({"id": "long", "text": " ".join(SAMPLE_TEXTS * 4)})
    path.write_text("".join(json.dumps(doc) + "\n" for doc in docs), encoding="utf-8")
    return path


@dataclass
class JobOutput:
    head_stats: pa.Table
    attention: pa.Table
    manifest: dict


def run(backend: TorchBackend, corpus: Path, out: Path, config: RunConfig) -> JobOutput:
    run_job([corpus], out, config, backend=backend, progress=False)
    return JobOutput(pq.read_table(out / "head_stats"), pq.read_table(out / "attention"),
                     json.loads((out / "manifest.json").read_text()))


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("model", MODELS)
def test_a_cuda_job_gives_the_cpu_jobs_statistics(backends: Loader, model: str, device: str,
                                                  tmp_path: Path) -> None:
    """head_stats and kept weights of a job on CUDA against the same job on the CPU (module
    docstring). The CPU twin: a CPU job with other batch shapes (one window per batch), the
    case ATTENTION_ATOL and STAT_ATOL were derived for."""
    assert torch.get_float32_matmul_precision() == "highest"  # no TF32: the bound needs it
    corpus = write_corpus(tmp_path)
    config = RunConfig(attention=AttentionMode("topk", k=8),
                       windows=WindowConfig(max_length=64, stride=16))
    want = run(backends(model, "cpu"), corpus, tmp_path / "cpu", config)
    other = config if device == "cuda" else replace(config, batch_tokens=64)
    got = run(backends(model, device), corpus, tmp_path / f"on-{device}", other)
    assert got.manifest["runtime"]["device"].startswith(device)
    assert_head_stats_equal(got.head_stats, want.head_stats, atol=STAT_ATOL)
    assert_attention_equal(got.attention, want.attention,
                           atol=ATTENTION_ATOL if device == "cpu" else CROSS_DEVICE_WEIGHT_ATOL)


# ------------------------------------------------------------- float16 / bfloat16 vs float32


def largest_logit(captured: list[QueryKey], batch: Batch, causal: bool) -> float:
    """Z: the largest |q . k| * scaling over the pairs a query may see, in any layer."""
    visible = visible_pairs(batch.valid, causal)[:, None]  # [B, 1, S, S]
    largest = 0.0
    for query, key, scaling in captured:
        logits = (query.float() @ key.float().transpose(-1, -2)) * scaling  # [B, H, S, S]
        largest = max(largest, float(logits.abs().masked_fill(~visible, 0).max()))
    return largest


def half_bounds(eps: float, largest: float, length: int) -> dict[str, float]:
    """How far statistics of ``eps``-precision attention may lie from float32's.

    The attention scores are stored in the dtype, so a logit of size up to Z is rounded by
    about eps/2 |z| at each of its last two steps (the product, the scaling): eps Z across
    the row. Softmax moves each weight by at most that spread, relatively (w'/w lies within
    e^(+-spread)), so b = expm1(eps Z) + eps (the weights' own rounding) bounds how far a
    sum of weights that add to one moves: masses, max_weight, mean_distance per token. A
    row's entropy moves by at most b (H + 1) + b^2 <= b (ln S + 2) nats; entropy_norm
    divides by ln k >= ln 2. This counts only the last roundings: earlier layers' rounding
    (q and k are stored in the dtype too) adds more, but independent errors cancel in a
    row's sum. Seen on CPU half arithmetic (GPT-2 test model, Z = 32, and MiniLM, Z = 38;
    S = 48): at most 5 eps, against b >= 32 eps.
    """
    b = math.expm1(eps * largest) + eps
    assert b < 0.5, f"eps Z = {eps * largest:.2f}: too coarse a dtype for these logits"
    entropy = b * (math.log(length) + 2)
    return {name: entropy if name == "entropy" else entropy / math.log(2)
            if name == "entropy_norm" else b for name in STAT_NAMES}


HALF = [pytest.param("cpu", "float16", id="cpu-float16"),
        pytest.param("cpu", "bfloat16", id="cpu-bfloat16"),
        pytest.param("cuda", "float16", id="cuda-float16", marks=[pytest.mark.gpu, needs_cuda]),
        pytest.param("cuda", "bfloat16", id="cuda-bfloat16",
                     marks=[pytest.mark.gpu, needs_cuda])]


@pytest.mark.parametrize(("device", "dtype"), HALF)
@pytest.mark.parametrize("model", MODELS)
def test_half_precision_statistics_stay_within_the_dtype_bound(backends: Loader, model: str,
                                                               device: str,
                                                               dtype: str) -> None:
    """float16 / bfloat16 weights and activations, float32 statistics, against float32 on
    the same device (``half_bounds``). k90: the top-m masses move by at most b, so the half
    k90 lies between float32's k90 at 0.9 - b and at 0.9 + b. The CPU twins run the same
    half arithmetic on the CPU."""
    reference, half = backends(model, device), backends(model, device, dtype)
    batch = mixed_batch(reference)
    with reference.capture_queries_keys() as captured:
        attn = reference.attentions(batch)
    causal, length = reference.info.causal, batch.input_ids.shape[1]
    bounds = half_bounds(float(torch.finfo(DTYPES[dtype]).eps),
                         largest_logit(captured, batch, causal), length)
    want = reference_statistics(reference, batch, attn)
    got = streamed_statistics(half, batch)
    n_tokens = want["n_tokens"]
    for name in STAT_NAMES:
        assert got[name].dtype == torch.float32, name
        if name == "mass_sep" and reference.info.sep_token_id is None:
            assert bool(got[name].isnan().all())
            continue
        assert bool(got[name].isfinite().all()), name
        if name == "k90":
            continue
        # + STAT_ATOL: float32's own rounding of the reference (module docstring)
        torch.testing.assert_close(per_token(name, got[name], n_tokens),
                                   per_token(name, want[name], n_tokens), rtol=0,
                                   atol=bounds[name] + STAT_ATOL, msg=name)
    b = bounds["mass_first"]
    low = k90_mean(attn, batch.valid, causal, K90_MASS - b)
    high = k90_mean(attn, batch.valid, causal, K90_MASS + b)
    assert bool(((got["k90"] >= low - STAT_ATOL) & (got["k90"] <= high + STAT_ATOL)).all())


@pytest.mark.parametrize(("device", "dtype"), HALF)
def test_a_half_precision_job_runs(backends: Loader, device: str, dtype: str,
                                   tmp_path: Path) -> None:
    """A whole job in the dtype: finite statistics, the dtype in the manifest."""
    job = run(backends("gpt2", device, dtype), write_corpus(tmp_path), tmp_path / "job",
              RunConfig())
    assert job.manifest["runtime"]["dtype"] == dtype
    assert job.head_stats.num_rows > 0
    for name in STAT_NAMES:
        if name != "mass_sep":  # null for GPT-2, which has no separator
            values = job.head_stats.column(name).to_numpy()
            assert np.isfinite(values).all(), name


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("model", MODELS)
def test_blocked_attention_on_the_device_equals_the_eager_attention(
        backends: Loader, model: str, device: str) -> None:
    """Attention computed 5 query rows at a time (``hooks.blocked_attention``, the path of
    windows too long for the memory budget) against the model's eager attention on the same
    device: the matmuls run on other shapes, so within ATTENTION_ATOL (no TF32), with exact
    zeros on padded keys. The CPU twin is tests/unit/compute/test_streaming.py's, here on the
    module's mixed batch."""
    backend = backends(model, device)
    batch = mixed_batch(backend)
    want = backend.attentions(batch)
    parts: dict[int, list[torch.Tensor]] = {}
    backend.layers(batch, lambda layer, start, probs: parts.setdefault(layer, []).append(
        probs.clone()), 5)
    for layer, blocks in parts.items():
        got = torch.cat(blocks, dim=-2)
        assert got.device.type == device
        torch.testing.assert_close(got, want[layer], rtol=0, atol=ATTENTION_ATOL)
        assert (got * ~batch.valid[:, None, None, :] == 0).all()
