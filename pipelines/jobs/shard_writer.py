"""Writing finished shards on a background thread while the next shard computes.

Building Parquet files (compression, statistics, fsync) takes a fair share of a job's time;
Arrow and zstd release the GIL, so it can run beside the next shard's forward passes. At most
two shards' rows are alive: the one being written and the one being built. Handing over the
next waits until the one before is written, so the rows buffered stay within the shard shares
of the memory budget (``pipelines.compute.budget``).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from types import TracebackType

import pyarrow as pa

from pipelines.jobs.memory import release_freed_memory
from pipelines.text.plan import Shard

log = logging.getLogger(__name__)
#: What the thread does with one shard: write its tables (and its marker).
WriteShard = Callable[[Shard, dict[str, pa.Table]], object]


class ShardWriterThread:
    """One thread that calls ``write(shard, tables)`` for each shard handed over, in order.

        with ShardWriterThread(write) as writes:
            for shard in shards:
                writes.put(shard, compute(shard))   # written while the next one computes
        # here every shard is written, or the writer's error was raised

    An error of ``write`` (e.g. a full disk: ``NoSpaceError``) is raised in the caller at
    the next :meth:`put` or when the block ends; no shard is written after it (those have
    no marker, so ``--resume`` computes them again). If the block ends with an error of its
    own (Ctrl-C), the shard being written is finished, no other is started, and that error
    propagates.
    """

    def __init__(self, write: WriteShard, name: str = "shard-writer") -> None:
        self._write = write
        # At most one shard handed over and not yet written (see put).
        self._queue: queue.Queue[tuple[Shard, dict[str, pa.Table]] | None] = queue.Queue(1)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._error: BaseException | None = None
        self._cancelled = False

    def __enter__(self) -> ShardWriterThread:
        self._thread.start()
        return self

    def put(self, shard: Shard, tables: dict[str, pa.Table]) -> None:
        """Hand over a computed shard. Waits until the shard before it is written, so that
        no more than two shards' rows are alive; raises the writer's error, if any."""
        self._queue.join()
        self._raise_error()
        self._queue.put((shard, tables))

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if exc is not None:
            self._cancelled = True  # finish the shard being written, start no other
        self._queue.put(None)
        self._thread.join()
        if exc is None:
            self._raise_error()
        elif self._error is not None and self._error is not exc:
            log.error("writing a shard failed too: %s", self._error)

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None and not self._cancelled:
                    self._write(*item)
            except BaseException as exc:  # handed to the caller's thread
                self._error = exc
            finally:
                if item is not None:
                    item = None  # the tables' last reference: free them, then the heap
                    release_freed_memory()
                self._queue.task_done()
