"""The demo job: the Python documentation's topic pages through MiniLM, then a pandas summary.

The corpus is the prose of ``pydoc_data.topics`` (the help texts that ship with CPython),
one document per paragraph, so it is real English that nobody on this project wrote.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pandas as pd

from pipelines.config import RunConfig
from pipelines.jobs.local import run_job

log = logging.getLogger(__name__)
MIN_CHARS = 80


def paragraphs() -> list[dict]:
    """Prose paragraphs of the Python help topics (code blocks and short lines left out)."""
    from pydoc_data.topics import topics

    out = []
    for name in sorted(topics):
        for index, block in enumerate(re.split(r"\n\s*\n", topics[name])):
            lines = [line.strip() for line in block.splitlines()]
            if any(line.startswith((">>>", "...")) for line in lines):
                continue
            text = " ".join(line for line in lines if line)
            if len(text) >= MIN_CHARS and not block.startswith("   "):
                out.append({"id": f"{name}#{index}", "text": text})
    return out


def write_corpus(path: Path, limit: int | None = None) -> int:
    docs = paragraphs()[:limit]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    return len(docs)


def summarise(out: Path) -> str:
    """A short pandas report of a dataset."""
    summary = pd.read_parquet(out / "head_summary")
    stats = pd.read_parquet(out / "head_stats", columns=["layer", "entropy", "mass_sep",
                                                         "mass_prev", "k90"])
    docs = pd.read_parquet(out / "documents", columns=["doc_id", "windowed", "n_tokens"])
    top_sep = summary.nlargest(5, "mass_sep_mean")[["layer", "head", "mass_sep_mean"]]
    top_prev = summary.nlargest(5, "mass_prev_mean")[["layer", "head", "mass_prev_mean"]]
    per_layer = stats.groupby("layer")[["entropy", "mass_sep", "mass_prev", "k90"]].mean()
    return "\n".join([
        f"dataset: {out}  ({docs.doc_id.nunique()} documents, {len(docs)} windows, "
        f"{int(docs.n_tokens.sum())} tokens, {int(docs.windowed.sum())} windowed rows)",
        "", "Heads that attend most to [SEP] (mean mass_sep):", top_sep.to_string(index=False),
        "", "Heads that attend most to the previous token (mean mass_prev):",
        top_prev.to_string(index=False),
        "", "Per layer (means over windows and heads):", per_layer.round(3).to_string(),
    ])


def main(out: str = "demo_out", limit: int | None = None) -> None:
    out_path = Path(out)
    corpus = out_path.with_name(out_path.name + "_corpus") / "pydoc_topics.jsonl"
    count = write_corpus(corpus, limit)
    log.info("demo corpus: %d paragraphs of the Python help topics → %s", count, corpus)
    run_job([corpus], out_path, RunConfig(), overwrite=True)
    print(summarise(out_path))
