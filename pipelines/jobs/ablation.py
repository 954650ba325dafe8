"""``headscope ablate``: what each head contributes, measured by disabling it.

Writes a dataset folder (write-once, like a corpus job) with ``manifest.json`` and one
``head_importance`` table; see :func:`pipelines.analysis.importance.head_importance`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.analysis.importance import TABLE, head_importance
from pipelines.backends.head_mask import HeadMask
from pipelines.backends.torch.ablation import load_for_ablation
from pipelines.config import WindowConfig
from pipelines.dataset.manifest import ABLATION_FORMAT, header, job_key, model_entry
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
ABLATION_MODEL_FIELDS = ("name", "path", "model_type", "config_hash", "num_layers", "num_heads")


@dataclass(frozen=True)
class AblationConfig:
    """Everything that decides the rows ``headscope ablate`` writes (saved in the manifest).

    ``heads``: sets of heads disabled together, in HeadMask text ("3.5,3.7", "0.*"); empty
    ablates every single head in turn. ``seed`` picks the masked-LM positions.
    """

    model: str = "minilm"
    heads: tuple[str, ...] = ()
    windows: WindowConfig = field(default_factory=WindowConfig)
    seed: int = 0
    device: str = "auto"


def run_ablation(inputs: list[str | Path], out: str | Path, config: AblationConfig | None = None,
                 columns: Columns | None = None, overwrite: bool = False,
                 progress: bool = True) -> Path:
    """Measure every single head (or each set in ``config.heads``) on ``inputs``; write ``out``."""
    started = time.perf_counter()
    config, columns = config or AblationConfig(), columns or Columns()
    writer = DatasetWriter(out, resumable=False)
    writer.check(overwrite=overwrite)
    files = expand(inputs)
    summary = validate(files, columns)
    bundle = load_for_ablation(config.model, config.device)
    info = bundle.info
    masks = [HeadMask.parse(text, info.num_layers, info.num_heads) for text in config.heads]
    windower = Windower(bundle.tokenizer, info, config.windows)
    found = [w for doc in read_documents(files, columns) for w in document_windows(windower, doc)]
    tokens = sum(w.n_tokens for w in found)
    count = len(masks) or info.num_layers * info.num_heads
    log.info("ablation: %d documents, %d windows, %d tokens; %d ablations + 1 baseline = "
             "%d tokens through the model", summary.documents, len(found), tokens, count,
             tokens * (count + 1))
    manifest = {
        **header(ABLATION_FORMAT),
        "model": model_entry(info, ABLATION_MODEL_FIELDS, objective=bundle.objective),
        "settings": {"heads": list(config.heads) or "every single head", "seed": config.seed,
                     "windows": dataclasses.asdict(config.windows),
                     "device": str(bundle.device)},
        "metrics": {name: METRIC_DEFINITIONS[name] for name in bundle.metrics},
        "masking": "a disabled head's attention probabilities are multiplied by 0 (its "
                   "context vector is 0), as transformers' former head_mask did",
        "input": {"files": summary.files, "documents": summary.documents,
                  "fingerprint": summary.fingerprint},
    }
    manifest["job_key"] = job_key([manifest["model"], manifest["settings"], manifest["input"]])
    writer.open(manifest, overwrite=overwrite)
    table = head_importance(bundle, found, masks or None, config.seed, progress=progress)
    atomic_write_parquet(writer.root / TABLE / part_name(0), table, 65536)
    manifest.update(status="complete", counts={TABLE: table.num_rows, "windows": len(found),
                                               "tokens": tokens})
    writer.finish_manifest(manifest)
    log.info("wrote %s: %d rows in %.1f s", out, table.num_rows, time.perf_counter() - started)
    return writer.root
