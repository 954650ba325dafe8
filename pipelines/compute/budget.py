"""The memory budget of a job: how its working memory beyond the model is shared out.

A job's working memory has two parts: the forward pass and reduction of one batch (one layer's
attention probabilities at a time, plus the temporaries of their reduction), and the rows of
finished batches buffered until their shard is written (one shard being built while the
previous one is written, on the writer thread). ``MemoryBudget`` splits ``--memory-budget``
between them; the batch planner, the query blocks of the reduction and the shard plan all
read their share from here, so one number bounds the job.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipelines.config import ConfigError

GiB = 2**30
MiB = 2**20
#: ``--memory-budget`` when none is given: working memory beyond the model's weights.
DEFAULT_MEMORY_BUDGET = 2 * GiB
#: The smallest budget a job accepts (below it the model's own activations dominate).
MIN_MEMORY_BUDGET = 64 * MiB
#: float32 copies of one layer's [B, H, S, S] attention alive at once in an eager forward
#: pass and its reduction: the scores, the probabilities, and the reduction's block
#: temporaries (at most one more copy).
LIVE_ATTENTION_COPIES = 3
#: Bytes of a float32 attention cell.
CELL_BYTES = 4
#: Peak resident memory over the live tensors of a batch. Jobs keep freed tensors under 32 MiB
#: in the heap for reuse (``jobs.memory.keep_freed_memory``: no page faults per batch), where
#: blocks of varied sizes leave holes the next sizes do not fit: measured 1.9-2.3x on a
#: 4,096-token window in query blocks when every tensor came from the heap (1.0x with every
#: large tensor mmap'ed, at 1.5x the time). Larger tensors are now mapped; the slack stays.
ALLOCATOR_SLACK = 2

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 2**10, "m": 1000**2, "mb": 1000**2,
          "mib": MiB, "g": 1000**3, "gb": 1000**3, "gib": GiB}


def parse_size(text: str | int) -> int:
    """Bytes from ``2GiB``, ``512MiB``, ``1.5GB`` or a plain number of bytes (ConfigError)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ConfigError(f"memory size {text!r}: use a number of bytes or a number with "
                          "KiB, MiB, GiB (or KB, MB, GB), e.g. 2GiB")
    return int(float(match.group(1)) * _UNITS[unit])


@dataclass(frozen=True)
class MemoryBudget:
    """``total`` bytes of working memory: half for the batch in flight, half for rows
    buffered before they are written (a quarter for the shard being built, a quarter for
    the one being written)."""

    total: int = DEFAULT_MEMORY_BUDGET

    def __post_init__(self) -> None:
        if self.total < MIN_MEMORY_BUDGET:
            raise ConfigError(f"memory budget {self.total / MiB:.0f} MiB is below the "
                              f"minimum of {MIN_MEMORY_BUDGET // MiB} MiB")

    @property
    def batch_bytes(self) -> int:
        """For the forward pass and reduction of one batch."""
        return self.total // 2

    @property
    def shard_bytes(self) -> int:
        """Rows (uncompressed) one shard may buffer before it is written."""
        return self.total // 4

    @property
    def live_batch_bytes(self) -> int:
        """The live tensors the batch share allows (the allocator's slack on top)."""
        return self.batch_bytes // ALLOCATOR_SLACK

    @property
    def reduction_bytes(self) -> int:
        """For the temporaries of reducing one block of query rows: a quarter of the live
        batch share (the rest is for the attention itself)."""
        return self.live_batch_bytes // 4

    @property
    def attention_bytes(self) -> int:
        """For the attention itself: the live batch share less the reduction's."""
        return self.live_batch_bytes - self.reduction_bytes

    def attention_cells(self, layers_held: int = 1) -> int:
        """Attention cells (B × H × S² per layer) a batch may hold, when ``layers_held``
        layers' probabilities are alive at once (1 when streaming; L when an analysis needs
        every layer together): the inverse of :func:`attention_bytes`."""
        return self.attention_bytes // attention_bytes(1, layers_held)


def attention_bytes(cells: int, layers_held: int = 1) -> int:
    """Working bytes of ``cells`` attention cells of one layer (B × H × S²), float32,
    ``LIVE_ATTENTION_COPIES`` times, for each of the ``layers_held`` layers alive at once."""
    return cells * CELL_BYTES * LIVE_ATTENTION_COPIES * max(1, layers_held)


def format_bytes(size: float) -> str:
    """``1.3 GiB``, ``640 MiB`` or ``12 KiB``."""
    if size >= GiB:
        return f"{size / GiB:.1f} GiB"
    if size >= MiB:
        return f"{size / MiB:.0f} MiB"
    return f"{size / 1024:.0f} KiB"
