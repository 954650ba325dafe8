"""The ``headscope`` command line."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from pipelines.config import (
    BACKENDS,
    SIMILARITY_MEASURES,
    WORD_ROWS,
    AttentionMode,
    ConfigError,
    OnnxOptions,
    RunConfig,
    WindowConfig,
    parse_entropy_epsilon,
)
from pipelines.dataset.writer import MANIFEST, OutputError, no_space
from pipelines.models import DEFAULT_OPSET, REGISTRY, ExportError, ModelError
from pipelines.text.inputs import Columns, InputError
from pipelines.text.punctuation import DEFAULT_RULE, RULES
from pipelines.version import __version__

USER_ERRORS = (ConfigError, ExportError, InputError, ModelError, OutputError)
#: Exit status when the disk (or quota) ran out: sysexits.h's EX_IOERR. 2 is a user error,
#: 130 an interrupt.
NO_SPACE_EXIT = 74


def _add_input_options(parser: argparse.ArgumentParser) -> None:
    """INPUT files, how long documents are windowed, and which columns hold the text."""
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help=".txt (one document per line), .jsonl, .csv, .parquet, or a folder")
    parser.add_argument("--max-length", type=int, default=None,
                        help="tokens per window incl. special tokens (default: the model's limit)")
    parser.add_argument("--stride", type=int, default=64,
                        help="tokens shared by consecutive windows of a long document "
                             "(default 64)")
    parser.add_argument("--truncate", action="store_true",
                        help="cut long documents once instead of windowing them (recorded per "
                             "row)")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--id-column", default="id")
    parser.add_argument("--pair-column", default="text_pair")


def _window_config(args: argparse.Namespace) -> WindowConfig:
    return WindowConfig(args.max_length, args.stride, args.truncate)


def _columns(args: argparse.Namespace) -> Columns:
    return Columns(args.text_column, args.id_column, args.pair_column)


def _add_run(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="run a corpus job and write a Parquet dataset",
                         description="Run a corpus job: INPUT files or folders → Parquet dataset.")
    _add_input_options(run)
    run.add_argument("--out", required=True, help="output folder (must be new or empty)")
    run.add_argument("--model", default="minilm",
                     help=f"registry name ({', '.join(REGISTRY)}), local folder or hub id")
    run.add_argument("--backend", default="auto", choices=BACKENDS,
                     help="torch, onnx (a folder from export-onnx), or auto (default): onnx for "
                          "an export folder, torch otherwise")
    run.add_argument("--attention", default="topk:8",
                     help="weights to keep: none, topk:K, threshold:T, full (default topk:8)")
    run.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    run.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                     help="model dtype; float16/bfloat16 on CUDA only. Statistics are float32")
    run.add_argument("--onnx-threads", type=int, default=0, metavar="N",
                     help="ONNX Runtime intra-op threads (default 0: one per physical core)")
    run.add_argument("--onnx-inter-threads", type=int, default=0, metavar="N",
                     help="ONNX Runtime inter-op threads (default 0: runtime default)")
    run.add_argument("--batch-tokens", type=int, default=8192,
                     help="padded tokens per forward pass (default 8192)")
    run.add_argument("--local-window", type=int, default=2,
                     help="half-width w for mass_window and mass_sparse (default 2)")
    run.add_argument("--shard-tokens", type=int, default=32768,
                     help="tokens per output shard at most (default 32768); a shard also "
                          "closes when its rows reach a quarter of --memory-budget")
    run.add_argument("--memory-budget", default="2GiB", metavar="SIZE",
                     help="working memory beyond the model, e.g. 4GiB or 512MiB: half for the "
                          "batch in flight, half for rows waiting to be written (default 2GiB)")
    run.add_argument("--analyses", default="",
                     help="comma-separated extras: patterns (pattern class per head), words "
                          "(word-level attention), similarity (head-to-head JS distances), "
                          "or one a --plugin registers")
    run.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                     help="import MODULE first, so the analyses it registers can be named in "
                          "--analyses (repeatable; see docs/analysis.md)")
    run.add_argument("--similarity-docs", type=int, default=0, metavar="N",
                     help="head similarity over the first N documents only (default 0: all)")
    clark = run.add_argument_group(
        "conventions", "where headscope and Clark et al. (2019) differ; 'clark' gives theirs "
                       "(docs/statistics.md)")
    clark.add_argument("--punctuation", default=DEFAULT_RULE, choices=list(RULES),
                       help="keys mass_punct counts (tokens.is_punct): unicode (default: any "
                            "Unicode punctuation) or clark (only '.' and ',')")
    clark.add_argument("--entropy-epsilon", default="0", metavar="E",
                       help="entropy of A' = (1 - E) A + E/n: a number in [0, 1) or clark "
                            "(1e-4) (default 0: unsmoothed)")
    clark.add_argument("--similarity-measure", default="distance", choices=SIMILARITY_MEASURES,
                       help="head_similarity: distance (default: mean JS distance per row) or "
                            "clark (smoothed JS divergence in nats summed over rows)")
    clark.add_argument("--word-rows", default="mean", choices=WORD_ROWS,
                       help="words analysis: a word's row is the mean of its pieces' rows "
                            "(default, as the paper) or its first piece's (their script)")
    run.add_argument("--capture-qk", action="store_true",
                     help="store every head's query and key vectors per token (qk table, for "
                          "the neuron view; large: 2 × head size floats per token and head)")
    mode = run.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="finish an interrupted job in --out")
    mode.add_argument("--overwrite", action="store_true", help="replace the dataset in --out")
    run.add_argument("--allow-download", action="store_true",
                     help="allow fetching --model from a model hub (off: local only)")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    engine = run.add_argument_group("engine", "where the job runs")
    engine.add_argument("--engine", default="local", choices=["local", "ray"],
                        help="local: this process (default); ray: Ray Data on a Ray cluster")
    engine.add_argument("--address", default=None,
                        help="Ray cluster to join (default: RAY_ADDRESS, as set by `ray job "
                             "submit`, else a new local Ray)")
    engine.add_argument("--workers", type=int, default=0, metavar="N",
                        help="inference actors (default 0: one per GPU, or one per CPU)")
    engine.add_argument("--worker-cpus", type=float, default=0.0, metavar="C",
                        help="CPUs per actor, fractions allowed (default: share the CPUs)")
    engine.add_argument("--worker-gpus", type=float, default=None, metavar="G",
                        help="GPUs per actor (default: 1 when the cluster has GPUs)")


def _check_engine_options(args: argparse.Namespace) -> None:
    ray_only = {"--address": args.address is not None, "--workers": args.workers != 0,
                "--worker-cpus": args.worker_cpus != 0,
                "--worker-gpus": args.worker_gpus is not None}
    given = [name for name, set_ in ray_only.items() if set_]
    if args.engine == "local" and given:
        raise ConfigError(f"{', '.join(given)}: only with --engine ray")
    if args.workers < 0 or args.worker_cpus < 0 or (args.worker_gpus or 0) < 0:
        raise ConfigError("--workers, --worker-cpus and --worker-gpus cannot be negative")


def _memory_budget(text: str) -> int:
    """Bytes of ``--memory-budget``, checked (ConfigError naming the option)."""
    from pipelines.compute.budget import MemoryBudget, parse_size

    try:
        return MemoryBudget(parse_size(text)).total
    except ConfigError as exc:
        raise ConfigError(f"--memory-budget: {exc}") from None


def _run(args: argparse.Namespace) -> int:
    from pipelines.analysis.registry import load_plugins, parse_analyses
    from pipelines.jobs.local import run_job

    for name in ("batch_tokens", "shard_tokens"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer")
    if args.similarity_docs < 0:
        raise ConfigError("--similarity-docs must be 0 (all documents) or positive")
    _check_engine_options(args)
    memory_budget = _memory_budget(args.memory_budget)
    if args.plugin and args.engine == "ray":
        raise ConfigError("--plugin: only with --engine local (Ray workers do not load plugins)")
    load_plugins(args.plugin)
    config = RunConfig(
        model=args.model, backend=args.backend, device=args.device, dtype=args.dtype,
        attention=AttentionMode.parse(args.attention),
        windows=dataclasses.replace(_window_config(args), punctuation=args.punctuation),
        batch_tokens=args.batch_tokens, local_window=args.local_window,
        shard_tokens=args.shard_tokens, allow_download=args.allow_download,
        onnx=OnnxOptions(args.onnx_threads, args.onnx_inter_threads),
        analyses=parse_analyses(args.analyses), similarity_docs=args.similarity_docs,
        capture_qk=args.capture_qk, entropy_epsilon=parse_entropy_epsilon(args.entropy_epsilon),
        similarity_measure=args.similarity_measure, word_rows=args.word_rows,
        memory_budget=memory_budget,
    )
    options = {"resume": args.resume, "overwrite": args.overwrite,
               "progress": not args.no_progress}
    if args.engine == "ray":
        from pipelines.jobs.ray_engine import RayOptions, run_ray_job

        ray_options = RayOptions(args.address, args.workers, args.worker_cpus, args.worker_gpus)
        result = run_ray_job(args.inputs, args.out, config, _columns(args), options=ray_options,
                             **options)
    else:
        result = run_job(args.inputs, args.out, config, _columns(args), **options)
    print(f"wrote {result.out}: {result.documents} documents, {result.windows} windows, "
          f"{result.tokens} tokens in {result.seconds:.1f} s")
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser(
        "export-onnx", help="export a model to ONNX with its attention probabilities as outputs",
        description="Export a BERT- or GPT-2-family model to an ONNX folder usable as --model "
                    "with the onnx backend. The export is verified against PyTorch first.")
    export.add_argument("--model", required=True,
                        help=f"registry name ({', '.join(REGISTRY)}), local folder or hub id")
    export.add_argument("--out", required=True, help="export folder (must be new or empty)")
    export.add_argument("--hidden-states", action="store_true",
                        help="also output the hidden states (embeddings and every layer)")
    export.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help=f"ONNX opset (default {DEFAULT_OPSET})")
    export.add_argument("--overwrite", action="store_true", help="replace an earlier export")
    export.add_argument("--allow-download", action="store_true",
                        help="allow fetching --model from a model hub (off: local only)")
    export.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from pipelines.jobs.export_onnx import export_onnx

    metadata = export_onnx(args.model, args.out, args.hidden_states, args.opset, args.overwrite,
                           args.allow_download)
    check = metadata["verification"]
    print(f"wrote {args.out}: {len(metadata['graph']['attention_outputs'])} attention outputs, "
          f"opset {args.opset}; max |ONNX Runtime - PyTorch| = "
          f"{check['max_abs_diff_attention']:.1e} on {len(check['batches'])} padded batches")
    return 0


def _add_ablate(sub: argparse._SubParsersAction) -> None:
    ablate = sub.add_parser(
        "ablate", help="measure what each head contributes by disabling it",
        description="Re-run INPUT with each head (or each --heads set) disabled and write a "
                    "head_importance table: change in LM loss (GPT-2), in masked-LM loss "
                    "(BERT with an MLM head) and in the final representations (BERT).")
    _add_input_options(ablate)
    ablate.add_argument("--out", required=True, help="output folder (must be new or empty)")
    ablate.add_argument("--model", default="minilm",
                        help=f"registry name ({', '.join(REGISTRY)}) or a local folder")
    ablate.add_argument("--heads", action="append", metavar="SET",
                        help='a set of heads disabled together, e.g. "3.5,3.7" or "0.*"; '
                             "repeat for several sets (default: every single head)")
    ablate.add_argument("--seed", type=int, default=0, help="seed of the masked-LM positions")
    ablate.add_argument("--device", default="auto")
    ablate.add_argument("--overwrite", action="store_true")
    ablate.add_argument("--no-progress", action="store_true")
    ablate.set_defaults(func=_ablate)


def _ablate(args: argparse.Namespace) -> int:
    from pipelines.jobs.ablation import AblationConfig, run_ablation

    config = AblationConfig(model=args.model, heads=tuple(args.heads or ()),
                            windows=_window_config(args), seed=args.seed, device=args.device)
    out = run_ablation(args.inputs, args.out, config, _columns(args), args.overwrite,
                       progress=not args.no_progress)
    print(f"wrote {out}/head_importance")
    return 0


def _add_compare(sub: argparse._SubParsersAction) -> None:
    compare = sub.add_parser(
        "compare", help="how two models that share a tokenizer differ, head by head",
        description="Run models A and B (e.g. a pre-trained model and its fine-tune, "
                    "Kovaleva et al. 2019) on the same windows and write, per window × layer "
                    "× head, the cosine similarity and Jensen–Shannon distance of their "
                    "attention maps and every statistic's difference B − A (head_compare), "
                    "and their means per head (head_compare_summary).")
    _add_input_options(compare)
    compare.add_argument("--model", action="append", required=True, metavar="MODEL",
                         help=f"give it twice: A, then B; a registry name ({', '.join(REGISTRY)})"
                              " or a local folder. Both must share a tokenizer, layer and head "
                              "counts and attention layout")
    compare.add_argument("--out", required=True, help="output folder (must be new or empty)")
    compare.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    compare.add_argument("--batch-tokens", type=int, default=8192,
                         help="padded tokens per forward pass (default 8192)")
    compare.add_argument("--memory-budget", default="2GiB", metavar="SIZE",
                         help="working memory beyond the models, e.g. 4GiB; a batch holds "
                              "model A's every layer (default 2GiB)")
    compare.add_argument("--local-window", type=int, default=2,
                         help="half-width w for mass_window and mass_sparse (default 2)")
    compare.add_argument("--punctuation", default=DEFAULT_RULE, choices=list(RULES),
                         help="keys mass_punct counts, as for run (default unicode)")
    compare.add_argument("--entropy-epsilon", default="0", metavar="E",
                         help="entropy smoothing, as for run (default 0)")
    compare.add_argument("--overwrite", action="store_true", help="replace the folder in --out")
    compare.add_argument("--allow-download", action="store_true",
                         help="allow fetching a --model from a model hub (off: local only)")
    compare.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    compare.set_defaults(func=_compare)


def _compare(args: argparse.Namespace) -> int:
    from pipelines.jobs.compare import TABLE, CompareConfig, compare

    if len(args.model) != 2:
        raise ConfigError(f"--model: give exactly two models, A then B (got {len(args.model)})")
    if args.batch_tokens < 1:
        raise ConfigError("--batch-tokens must be a positive integer")
    windows = dataclasses.replace(_window_config(args), punctuation=args.punctuation)
    config = CompareConfig(models=(args.model[0], args.model[1]), windows=windows,
                           device=args.device, batch_tokens=args.batch_tokens,
                           local_window=args.local_window,
                           entropy_epsilon=parse_entropy_epsilon(args.entropy_epsilon),
                           memory_budget=_memory_budget(args.memory_budget),
                           allow_download=args.allow_download)
    out = compare(args.inputs, args.out, config, _columns(args), args.overwrite,
                  progress=not args.no_progress)
    print(f"wrote {out}/{TABLE} and its per-head means")
    return 0


def _add_view(sub: argparse._SubParsersAction) -> None:
    view = sub.add_parser(
        "view", help="write the attention views of one document as a self-contained HTML file",
        description="Head, model and neuron views of one document of a dataset, in one HTML "
                    "file that opens anywhere without a network. The neuron view needs a "
                    "dataset made with --capture-qk.")
    view.add_argument("dataset", metavar="DATASET", help="a dataset folder (headscope run)")
    view.add_argument("--doc", required=True, metavar="ID", help="the document's doc_id")
    view.add_argument("--window", type=int, default=None,
                      help="only this window of a long document (default: all, with a pager)")
    view.add_argument("--out", required=True, help="the HTML file to write")
    view.add_argument("--no-qk", action="store_true",
                      help="leave the query/key vectors out (a smaller file, no neuron view)")
    view.add_argument("--layers", metavar="L",
                      help="only these layers, e.g. 0,3-5 (default: all)")
    view.add_argument("--heads", metavar="H", help="only these heads, e.g. 0-3 (default: all)")
    view.add_argument("--top-k", type=int, metavar="K",
                      help="only the K largest stored weights per query row, per layer and head")
    view.add_argument("--force", action="store_true",
                      help="write a page over 500 MB (more than a browser can load)")
    view.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    view.set_defaults(func=_view)


def _new_file(path: str, overwrite: bool, suffixes: tuple[str, ...]) -> Path:
    """``path`` as a file to create: the right suffix, and no silent replacement."""
    out = Path(path)
    if out.suffix.lower() not in suffixes:
        raise ConfigError(f"--out {path}: use a file name ending in {' or '.join(suffixes)}")
    if out.exists() and not overwrite:
        raise ConfigError(f"--out {path} exists; pass --overwrite to replace it")
    return out


def _view(args: argparse.Namespace) -> int:
    from pipelines.dataset.writer import atomic_write_bytes
    from pipelines.views import DocumentView

    out = _new_file(args.out, args.overwrite, (".html", ".htm"))
    try:
        view = DocumentView(args.dataset, args.doc, args.window, qk=not args.no_qk,
                            layers=args.layers, heads=args.heads, top_k=args.top_k,
                            force=args.force)
    except (KeyError, IndexError, ValueError, FileNotFoundError) as exc:
        raise ConfigError(exc.args[0] if exc.args else str(exc)) from None
    atomic_write_bytes(out, view.html.encode("utf-8"))
    windows = view.payload["windows"]
    neuron = "with" if any(w["qk"] for w in windows) else "without"
    thinned = view.payload["thinned"]
    print(f"wrote {out}: {len(windows)} window(s), {out.stat().st_size / 1e6:.1f} MB, "
          f"{neuron} the neuron view" + (f"; thinned to {thinned}" if thinned else ""))
    return 0


def _add_plot(sub: argparse._SubParsersAction) -> None:
    plot = sub.add_parser(
        "plot", help="plot a per-head statistic of a dataset (PNG or SVG)",
        description="heatmap: the statistic's corpus mean per layer × head; patterns: each "
                    "head's most frequent pattern class (needs --analyses patterns); layers: "
                    "the statistic's distribution over windows, per layer.")
    plot.add_argument("dataset", metavar="DATASET", help="a dataset folder (headscope run)")
    plot.add_argument("--stat", default="entropy", help="a head_stats column (default entropy)")
    plot.add_argument("--kind", default="heatmap", choices=["heatmap", "patterns", "layers"])
    plot.add_argument("--out", required=True, help="the image to write (.png or .svg)")
    plot.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    plot.set_defaults(func=_plot)


def _plot(args: argparse.Namespace) -> int:
    from pipelines.views.plots import plot

    out = _new_file(args.out, args.overwrite, (".png", ".svg"))
    try:
        written = plot(args.dataset, args.stat, args.kind, out)
    except (KeyError, ValueError, FileNotFoundError) as exc:
        raise ConfigError(exc.args[0] if exc.args else str(exc)) from None
    print(f"wrote {written}")
    return 0


def _add_factors(sub: argparse._SubParsersAction) -> None:
    factors = sub.add_parser(
        "factors", help="transformer factors: dictionary learning over hidden states",
        description="Learn one dictionary of factors shared by the chosen layers (train), "
                    "encode a corpus with it (apply), and look at one factor (page).")
    steps = factors.add_subparsers(dest="step", required=True)
    train = steps.add_parser("train", help="learn a dictionary from INPUT's hidden states")
    _add_input_options(train)
    train.add_argument("--out", required=True, help="dictionary folder (new or empty)")
    train.add_argument("--model", default="minilm",
                       help=f"registry name ({', '.join(REGISTRY)}) or a local folder")
    train.add_argument("--layers", default="all",
                       help="hidden-state layers: all (default), '0,3,6' or '1-6'; 0 is the "
                            "embedding output")
    train.add_argument("--n-factors", type=int, default=1024, help="dictionary size (1024)")
    train.add_argument("--sparsity", type=float, default=0.1,
                       help="λ of the L1 penalty on unit-length rows (default 0.1)")
    train.add_argument("--epochs", type=int, default=1, help="passes over INPUT (default 1)")
    train.add_argument("--minibatch", type=int, default=4096,
                       help="rows per dictionary update (default 4096)")
    train.add_argument("--nonneg-dict", action="store_true",
                       help="keep the atoms non-negative too (the codes always are)")
    train.add_argument("--include-special", action="store_true",
                       help="train on [CLS]/[SEP]/... rows too (default: left out)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="auto")
    train.add_argument("--overwrite", action="store_true")
    train.add_argument("--no-progress", action="store_true")
    train.set_defaults(func=_factors_train)
    apply = steps.add_parser("apply", help="sparse codes of every token of INPUT")
    apply.add_argument("dictionary", metavar="DICT", help="a folder from `factors train`")
    _add_input_options(apply)
    apply.add_argument("--out", required=True, help="output dataset folder (new or empty)")
    apply.add_argument("--top", type=int, default=20,
                       help="top contexts kept per factor and layer (default 20)")
    apply.add_argument("--device", default="auto")
    apply.add_argument("--overwrite", action="store_true")
    apply.add_argument("--no-progress", action="store_true")
    apply.set_defaults(func=_factors_apply)
    page = steps.add_parser("page", help="a self-contained HTML page of one factor")
    page.add_argument("codes", metavar="CODES", help="a folder from `factors apply`")
    page.add_argument("--factor", type=int, required=True)
    page.add_argument("--out", required=True, help="the HTML file to write")
    page.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    page.set_defaults(func=_factors_page)


def _factors_train(args: argparse.Namespace) -> int:
    from pipelines.jobs.factors.train import FactorConfig, train_factors

    config = FactorConfig(model=args.model, device=args.device, layers=args.layers,
                          n_factors=args.n_factors, sparsity=args.sparsity, epochs=args.epochs,
                          minibatch=args.minibatch, nonneg_dict=args.nonneg_dict,
                          include_special=args.include_special, seed=args.seed,
                          windows=_window_config(args))
    manifest = train_factors(args.inputs, args.out, config, _columns(args), args.overwrite,
                             progress=not args.no_progress)
    evaluation = manifest["evaluation"]
    print(f"wrote {args.out}: {config.n_factors} factors over layers {manifest['layers']}; "
          f"relative reconstruction error {evaluation['relative_error']:.3f}, "
          f"{evaluation['mean_active']:.1f} active factors per token")
    return 0


def _factors_apply(args: argparse.Namespace) -> int:
    from pipelines.jobs.factors.apply import apply_factors

    if args.top < 1:
        raise ConfigError("--top must be a positive integer")
    manifest = apply_factors(args.dictionary, args.inputs, args.out, _columns(args),
                             _window_config(args), args.device, args.top,
                             overwrite=args.overwrite, progress=not args.no_progress)
    counts = manifest["counts"]
    print(f"wrote {args.out}: {counts['factor_activations']:,} non-zero codes for "
          f"{counts['tokens']:,} tokens")
    return 0


def _factors_page(args: argparse.Namespace) -> int:
    from pipelines.dataset.writer import atomic_write_bytes
    from pipelines.views.factor_page import render_factor_page

    out = _new_file(args.out, args.overwrite, (".html", ".htm"))
    atomic_write_bytes(out, render_factor_page(args.codes, args.factor).encode("utf-8"))
    print(f"wrote {out}")
    return 0


def _models(args: argparse.Namespace) -> int:
    for name, (description, _) in REGISTRY.items():
        print(f"{name:10s} {description}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from pipelines.jobs import demo

    demo.main(args.out, args.limit)
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="headscope", description="Attention artifacts at scale.")
    top.add_argument("--version", action="version", version=f"headscope {__version__}")
    top.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = top.add_subparsers(dest="command", required=True)
    _add_run(sub)
    _add_export(sub)
    _add_ablate(sub)
    _add_compare(sub)
    _add_view(sub)
    _add_plot(sub)
    _add_factors(sub)
    sub.add_parser("models", help="list the model registry").set_defaults(func=_models)
    demo = sub.add_parser("demo", help="run the demo job on the Python docs and summarise it")
    demo.add_argument("--out", default="demo_out")
    demo.add_argument("--limit", type=int, default=None, help="use only the first N documents")
    demo.set_defaults(func=_demo)
    _add_serve(sub)
    sub.choices["run"].set_defaults(func=_run)
    return top


DEFAULT_SERVE_CONFIG = "deploy/serve.yaml"


def _add_serve(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="run the HTTP service (Ray Serve)",
                           description="Run the HTTP service on a local Ray (or --address).")
    serve.add_argument("--config",
                       help=f"Serve config file (default {DEFAULT_SERVE_CONFIG} if present)")
    serve.add_argument("--host", help="override http_options.host")
    serve.add_argument("--port", type=int, help="override http_options.port")
    serve.add_argument("--address", default=None, help="an existing Ray cluster to join")
    serve.add_argument("--object-store-mb", type=int, default=1024,
                       help="object store size of the local Ray (default 1024 MB)")
    serve.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from service.cli import serve  # the service front end (Ray Serve), imported only here

    if args.config is None and Path(DEFAULT_SERVE_CONFIG).is_file():
        args.config = DEFAULT_SERVE_CONFIG
    return serve(args)


def main(argv: list[str] | None = None) -> int:
    """``headscope`` and ``python -m pipelines``: every subcommand, ``serve`` included."""
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"headscope: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("headscope: interrupted; finished shards are kept (use --resume)", file=sys.stderr)
        return 130
    except Exception as exc:
        full = no_space(exc)
        if full is None:
            raise
        print(f"headscope: error: {_no_space_message(full, args)}", file=sys.stderr)
        return NO_SPACE_EXIT


def _no_space_message(error: OSError, args: argparse.Namespace) -> str:
    """What ran out, where, and how to carry on: --resume where the job can, else a rerun
    (with --overwrite where the failed job left a folder)."""
    out = Path(args.out) if getattr(args, "out", None) else None
    where = error.filename or out or "the output"
    if hasattr(args, "resume") and out is not None and (out / MANIFEST).is_file():
        then = "free space and rerun with --resume (finished shards are kept)"
    elif out is not None and out.is_dir() and any(out.iterdir()):
        then = "free space and rerun with --overwrite"
    else:
        then = "free space and rerun"
    return f"{str(error.strerror).lower()} while writing {where}; {then}"


if __name__ == "__main__":
    sys.exit(main())
