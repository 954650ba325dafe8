"""``headscope ablate``: what each head contributes, measured by disabling it.

Writes a dataset folder (write-once, like a corpus job) with ``manifest.json`` and one
``head_importance`` table; see :func:`pipelines.analysis.ablation.head_importance`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import time
from pathlib import Path

from pipelines import __version__
from pipelines.analysis.ablation import (
    TABLE,
    HeadMask,
    head_importance,
    load_for_ablation,
)
from pipelines.config import WindowConfig
from pipelines.dataset.writer import DatasetWriter, atomic_write_parquet, part_name
from pipelines.text.inputs import Columns, expand, read_documents, validate
from pipelines.text.plan import document_windows
from pipelines.text.tokenize import Windower

log = logging.getLogger(__name__)

METRIC_DEFINITIONS = {
    "lm_loss": "mean next-token cross-entropy over valid tokens (GPT-2 family)",
    "mlm_loss": "mean cross-entropy at a seeded 15% of non-special tokens replaced by the mask "
                "token, the same positions for the baseline and every ablation",
    "representation_cosine": "mean over valid tokens of 1 - cosine(final hidden state, "
                             "unablated final hidden state)",
    "representation_l2": "mean over valid tokens of the L2 distance to the unablated state",
}


def run_ablation(inputs: list[str | Path], out: str | Path, model: str = "minilm",
                 heads: list[str] | None = None, windows: WindowConfig | None = None,
                 seed: int = 0, device: str = "auto", columns: Columns | None = None,
                 overwrite: bool = False, progress: bool = True) -> Path:
    """Measure every single head (or each set in ``heads``) on ``inputs``; write ``out``."""
    started = time.perf_counter()
    columns, windows = columns or Columns(), windows or WindowConfig()
    writer = DatasetWriter(out)
    writer.check(overwrite=overwrite)
    files = expand(inputs)
    summary = validate(files, columns)
    bundle = load_for_ablation(model, device)
    info = bundle.info
    masks = [HeadMask.parse(text, info.num_layers, info.num_heads) for text in heads or []]
    windower = Windower(bundle.tokenizer, info, windows)
    found = [w for doc in read_documents(files, columns) for w in document_windows(windower, doc)]
    tokens = sum(w.n_tokens for w in found)
    count = len(masks) or info.num_layers * info.num_heads
    log.info("ablation: %d documents, %d windows, %d tokens; %d ablations + 1 baseline = "
             "%d tokens through the model", summary.documents, len(found), tokens, count,
             tokens * (count + 1))
    manifest = {
        "format": "headscope-ablation/1", "tool_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "status": "running",
        "model": {"name": info.name, "path": info.path, "model_type": info.model_type,
                  "config_hash": info.config_hash, "num_layers": info.num_layers,
                  "num_heads": info.num_heads, "objective": bundle.objective},
        "settings": {"heads": heads or "every single head", "seed": seed,
                     "windows": vars(windows), "device": str(bundle.device)},
        "metrics": {name: METRIC_DEFINITIONS[name] for name in bundle.metrics},
        "masking": "a disabled head's attention probabilities are multiplied by 0 (its "
                   "context vector is 0), as transformers' former head_mask did",
        "input": {"files": summary.files, "documents": summary.documents,
                  "fingerprint": summary.fingerprint},
    }
    manifest["job_key"] = hashlib.sha256(json.dumps(
        [manifest["model"], manifest["settings"], manifest["input"]], sort_keys=True,
        default=str).encode()).hexdigest()[:16]
    writer.open(manifest, overwrite=overwrite)
    table = head_importance(bundle, found, masks or None, seed, progress=progress)
    atomic_write_parquet(writer.root / TABLE / part_name(0), table, 65536)
    manifest.update(status="complete", counts={TABLE: table.num_rows, "windows": len(found),
                                               "tokens": tokens})
    writer.finish_manifest(manifest)
    log.info("wrote %s: %d rows in %.1f s", out, table.num_rows, time.perf_counter() - started)
    return writer.root
