"""The reduction alone: streaming (layer by layer) against stacked, eager against compiled.

One run, one corpus (the demo paragraphs), one preloaded model. Every layer's probabilities
of every batch are formed once and kept, so each variant reduces exactly the same tensors,
and the variants run interleaved, best of ``--repeats``. It prints, and never asserts:

(a) the bare forward pass that forms the probabilities (``backend.layers`` with a sink that
    does nothing), for scale;
(b) stacked reduction (``head_statistics`` + ``kept_weights`` on [L, B, H, S, S]) over
    streaming (``LayerReduction``, one layer at a time): > 1 means streaming is faster;
(c) eager streaming over streaming with the per-row terms under ``torch.compile``
    (``dynamic=True``; compile time reported apart): > 1 means compiling pays. headscope keeps
    the eager code unless this shows a gain;
(d) each row's entropy from its probabilities (-sum_j p ln p: clamp, log, multiply, sum, as
    ``stats.row_entropy``) over the same from the scores s that formed them (softmax is
    p = exp(s - max s) / z, so ln p_max = -ln z and H = max s - ln p_max - sum_j p s: row
    maxima and a dot product, no log per cell; p_max is timed too, though ``row_order`` has
    it), and each way's worst error of a window's mean entropy against float64. Scores come
    from the captured queries and keys, masked as ``kept.visible_pairs`` says (padding,
    causality, each layer's sliding window); how far their softmax is from the model's own
    probabilities is printed beside.

``python benchmarks/reduction.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable

import torch
from random_model import SHAPES
from random_model import build as build_random_model
from smoke import parse_args_with_smoke

from pipelines.backends import create_backend
from pipelines.backends.batching import Batch, collate, plan_batches
from pipelines.compute import streaming
from pipelines.compute.kept import kept_weights, visible_pairs
from pipelines.compute.stats import KeyFlags, head_statistics, row_entropy, row_order
from pipelines.compute.streaming import LayerReduction, ReductionSpec
from pipelines.config import AttentionMode, WindowConfig
from pipelines.jobs.demo import paragraphs
from pipelines.text.tokenize import Document, Windower

SMOKE = {"docs": 6, "repeats": 1, "compile": False}


def batches_of(backend, docs: int, batch_tokens: int) -> list[Batch]:
    windower = Windower(backend.tokenizer, backend.info, WindowConfig())
    windows = [w for i, p in enumerate(paragraphs()[:docs])
               for w in windower.windows(Document(f"p{i}", p["text"]))]
    lengths = [w.n_tokens for w in windows]
    return [collate([windows[i] for i in group], backend.info.pad_token_id)
            for group in plan_batches(lengths, batch_tokens, backend.info.num_heads)]


def layers_of(backend, batch: Batch) -> torch.Tensor:
    return backend.attentions(batch)  # [L, B, H, S, S], every layer kept for the comparison


def flags_of(batch: Batch) -> KeyFlags:
    return KeyFlags(batch.valid, batch.is_sep, batch.is_special, batch.is_punct)


def spec_of(info, mode: AttentionMode) -> ReductionSpec:
    return ReductionSpec(info.num_layers, info.causal, 2, info.sep_token_id is not None, mode)


def streamed(info, mode: AttentionMode, batch: Batch, attn: torch.Tensor) -> None:
    reduction = LayerReduction(spec_of(info, mode), flags_of(batch))
    for layer in range(attn.shape[0]):
        reduction.add_layer(layer, attn[layer])
    reduction.statistics()
    reduction.kept()


def stacked(info, mode: AttentionMode, batch: Batch, attn: torch.Tensor) -> None:
    order = row_order(attn, mode.k if mode.kind == "topk" else None)
    head_statistics(attn, flags_of(batch), info.causal, 2, info.sep_token_id is not None,
                    order)
    kept_weights(attn, batch.valid, info.causal, mode, order.kth_largest)


def entropy_from_scores(scores: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """[..., Q] nats: -sum_j p ln p = max s - ln p_max - sum_j p s, for p = softmax(s) on the
    visible keys; ``scores`` [..., Q, S] hold the dtype's minimum (not -inf) where masked."""
    return scores.amax(-1) - probs.amax(-1).log() - torch.linalg.vecdot(probs, scores)


def window_mean_error(entropy: torch.Tensor, exact: torch.Tensor, valid: torch.Tensor) -> float:
    """Largest |error| of a window's mean entropy over its valid query rows; ``entropy``
    and ``exact`` [B, H, Q], ``valid`` [B, Q]."""
    rows = valid.bool()[:, None, :]  # [B, 1, Q]; padded rows see no key (NaN in float64)
    error = torch.where(rows, entropy.double() - exact, 0.0).sum(-1) \
        / rows.sum(-1).clamp(min=1)
    return float(error.abs().max())


def entropy_ways(backend, batches: list[Batch], tensors: list[torch.Tensor],
                 repeats: int) -> dict[str, float]:
    """Seconds for all layers of all batches, each way, best of ``repeats``; worst errors,
    and how far the recomputed probabilities are from the model's (``tensors``, each
    [L, B, H, S, S]) on valid query rows."""
    result = {"from probabilities": 0.0, "from scores": 0.0, "error probabilities": 0.0,
              "error scores": 0.0, "largest score": 0.0, "probabilities off": 0.0}
    info = backend.info
    for batch, model_probs in zip(batches, tensors, strict=True):
        batch = batch.to(backend.device)
        with backend.capture_queries_keys() as captured:
            backend.layers(batch, lambda layer, start, probs: None)
        for layer, (query, key, scaling) in enumerate(captured):
            window = info.layer_windows[layer] if info.layer_windows else None
            hidden = ~visible_pairs(batch.valid.bool(), info.causal, window=window)[:, None]
            if key.shape[1] != query.shape[1]:  # grouped-query attention: one key per head
                key = key.repeat_interleave(query.shape[1] // key.shape[1], 1)
            exact_probs = (torch.matmul(query.double(), key.double().transpose(2, 3))
                           * scaling).masked_fill(hidden, float("-inf")).softmax(-1)
            exact = -torch.special.xlogy(exact_probs, exact_probs).sum(-1)  # [B, H, Q]
            scores = torch.matmul(query, key.transpose(2, 3)) * scaling
            scores = scores.masked_fill(hidden, torch.finfo(scores.dtype).min)
            probs = scores.softmax(-1)
            off = torch.where(batch.valid.bool()[:, None, :, None],
                              (probs - model_probs[layer]).abs(), 0.0)
            result["probabilities off"] = max(result["probabilities off"], float(off.max()))
            ways = {"probabilities": lambda p=probs: row_entropy(p),
                    "scores": lambda s=scores, p=probs: entropy_from_scores(s, p)}
            for way, compute in ways.items():
                result[f"from {way}"] += best(repeats, compute)
                result[f"error {way}"] = max(result[f"error {way}"],
                                             window_mean_error(compute(), exact, batch.valid))
            visible = scores[~hidden.expand_as(scores)]
            result["largest score"] = max(result["largest score"], float(visible.abs().max()))
    return result


def synchronize() -> None:
    """Wait for queued GPU work, so that a timer reads finished work (no-op on the CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def best(runs: int, work: Callable[[], None]) -> float:
    times = []
    for _ in range(runs):
        synchronize()
        start = time.perf_counter()
        work()
        synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--random-model", choices=sorted(SHAPES),
                        help="time a random model of this shape instead (no weights needed)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--docs", type=int, default=120, help="demo paragraphs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure torch.compile of the per-row terms")
    args = parse_args_with_smoke(parser, argv, SMOKE)
    if args.random_model:
        args.model = str(build_random_model(tempfile.mkdtemp(), args.random_model))
    backend = create_backend("torch", args.model, args.device)
    info = backend.info
    batches = batches_of(backend, args.docs, args.batch_tokens)
    tensors = [layers_of(backend, b.to(backend.device)) for b in batches]
    tokens = sum(int(b.valid.sum()) for b in batches)
    cells = sum(t.numel() for t in tensors)
    print(f"model {info.name} on {args.device}: {len(batches)} batches, {tokens:,} tokens, "
          f"{cells / 1e6:,.0f} M attention cells, best of {args.repeats}")

    def forward() -> None:
        for batch in batches:
            backend.layers(batch, lambda layer, start, probs: None)
        synchronize()

    seconds = {"forward": best(args.repeats, forward)}
    for mode in (AttentionMode("none"), AttentionMode("topk", k=8)):
        def run(reduce: Callable, mode: AttentionMode = mode) -> Callable[[], None]:
            return lambda: [reduce(info, mode, b.to(backend.device), t)
                            for b, t in zip(batches, tensors, strict=True)]
        seconds[f"stacked {mode}"] = best(args.repeats, run(stacked))
        seconds[f"streaming {mode}"] = best(args.repeats, run(streamed))
        if args.compile:
            eager_terms = streaming.row_terms
            streaming.row_terms = torch.compile(eager_terms, dynamic=True)
            try:
                start = time.perf_counter()
                run(streamed)()  # compiles
                seconds[f"compile {mode} (first run)"] = time.perf_counter() - start
                seconds[f"compiled {mode}"] = best(args.repeats, run(streamed))
            finally:
                streaming.row_terms = eager_terms
    entropy = entropy_ways(backend, batches, tensors, args.repeats)
    seconds.update({f"entropy {name}": value for name, value in entropy.items()
                    if name.startswith("from")})
    for name, value in seconds.items():
        print(f"  {name:<34} {value:7.3f} s")
    for mode in ("none", "topk:8"):
        print(f"(b) {mode:>6}: stacked / streaming reduction = "
              f"{seconds[f'stacked {mode}'] / seconds[f'streaming {mode}']:.2f}x; "
              f"streaming reduction / forward = "
              f"{seconds[f'streaming {mode}'] / seconds['forward']:.2f}")
        if args.compile:
            print(f"(c) {mode:>6}: eager / compiled streaming reduction = "
                  f"{seconds[f'streaming {mode}'] / seconds[f'compiled {mode}']:.2f}x "
                  f"(compiling took {seconds[f'compile {mode} (first run)']:.1f} s)")
    print(f"(d) entropy from probabilities / from scores = "
          f"{entropy['from probabilities'] / entropy['from scores']:.2f}x; worst error of a "
          f"window's mean against float64: {entropy['error probabilities']:.1e} from "
          f"probabilities, {entropy['error scores']:.1e} from scores (largest |score| "
          f"{entropy['largest score']:.0f}; softmax of the recomputed scores against the "
          f"model's probabilities: max |difference| {entropy['probabilities off']:.1e})")


if __name__ == "__main__":
    main()
