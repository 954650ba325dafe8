"""The writer thread of the local engine: shards written in order, beside the next shard's
computation, never more than two alive, and the writer's errors raised in the caller."""

from __future__ import annotations

import threading
import time

import pyarrow as pa
import pytest

from pipelines.dataset.writer import NoSpaceError
from pipelines.jobs.shard_writer import ShardWriterThread
from pipelines.text.plan import Shard


def tables(index: int) -> dict[str, pa.Table]:
    return {"rows": pa.table({"shard": [index] * 3})}


class Recorder:
    """A write function that records the shards it wrote, optionally slowly or failing."""

    def __init__(self, fail_at: int | None = None, error: BaseException | None = None,
                 seconds: float = 0.0) -> None:
        self.written: list[int] = []
        self.threads: set[str] = set()
        self.fail_at, self.error, self.seconds = fail_at, error, seconds

    def __call__(self, shard: Shard, tables: dict[str, pa.Table]) -> None:
        time.sleep(self.seconds)
        self.threads.add(threading.current_thread().name)
        if shard.index == self.fail_at:
            raise self.error or OSError("write failed")
        assert tables["rows"]["shard"].to_pylist() == [shard.index] * 3
        self.written.append(shard.index)


def test_shards_are_written_in_order_on_the_writer_thread() -> None:
    record = Recorder(seconds=0.01)
    with ShardWriterThread(record) as writes:
        for index in range(6):
            writes.put(Shard(index, index), tables(index))
    assert record.written == list(range(6))  # all of them, once the block has ended
    assert record.threads == {"shard-writer"}


def test_a_shard_computes_while_the_one_before_is_written() -> None:
    """The hand-over returns while the writer works; the next one waits for it."""
    started, release = threading.Event(), threading.Event()

    def write(shard: Shard, tables: dict[str, pa.Table]) -> None:
        started.set()
        assert release.wait(10)

    with ShardWriterThread(write) as writes:
        writes.put(Shard(0, 0), tables(0))
        assert started.wait(10)  # shard 0 is being written, and this thread is free
        handed = threading.Thread(target=writes.put, args=(Shard(1, 1), tables(1)))
        handed.start()
        handed.join(0.2)
        assert handed.is_alive(), "shard 1 must wait until shard 0 is written"
        release.set()
        handed.join(10)
        assert not handed.is_alive()


def test_no_more_than_two_shards_are_alive() -> None:
    """One being written and one being built: a third is computed only after the first is
    written (and freed)."""
    alive: set[int] = set()
    most = 0
    lock = threading.Lock()

    def write(shard: Shard, tables: dict[str, pa.Table]) -> None:
        time.sleep(0.02)
        with lock:
            alive.discard(shard.index)

    with ShardWriterThread(write) as writes:
        for index in range(8):
            with lock:
                alive.add(index)  # computing this shard
                most = max(most, len(alive))
            writes.put(Shard(index, index), tables(index))
    assert most == 2 and not alive


def test_an_error_while_writing_reaches_the_caller_at_the_next_hand_over(
        caplog: pytest.LogCaptureFixture) -> None:
    full = NoSpaceError(28, "No space left on device", "/out/attention/part-00001.parquet")
    record = Recorder(fail_at=1, error=full)
    handed: list[int] = []
    with pytest.raises(NoSpaceError) as raised, ShardWriterThread(record) as writes:
        for index in range(5):
            writes.put(Shard(index, index), tables(index))
            handed.append(index)
    assert raised.value is full  # the writer's own error, for the CLI's exit code 74
    assert record.written == [0]  # nothing after the failed shard
    assert handed == [0, 1]  # shard 1 failed while shard 2 computed: shard 2's hand-over raised
    assert not caplog.records  # said once, by whoever catches it (the CLI: one line)


def test_an_error_writing_the_last_shard_is_raised_when_the_block_ends() -> None:
    record = Recorder(fail_at=2)
    with pytest.raises(OSError, match="write failed"), ShardWriterThread(record) as writes:
        for index in range(3):
            writes.put(Shard(index, index), tables(index))
    assert record.written == [0, 1]


def test_an_error_of_the_caller_finishes_the_shard_being_written() -> None:
    """Ctrl-C or a failing computation: the shard being written is finished (it is complete)
    and the caller's error propagates."""
    started, release = threading.Event(), threading.Event()
    written: list[int] = []

    def write(shard: Shard, tables: dict[str, pa.Table]) -> None:
        started.set()
        release.wait(10)
        written.append(shard.index)

    with pytest.raises(KeyboardInterrupt), ShardWriterThread(write) as writes:
        writes.put(Shard(0, 0), tables(0))
        assert started.wait(10)
        threading.Timer(0.2, release.set).start()
        raise KeyboardInterrupt
    assert written == [0]
