"""DynamicBatcher: batches form when the model is free, results go back in order, errors and
cancelled callers stay within their batch. Plain asyncio, no Serve."""

from __future__ import annotations

import asyncio

import pytest

from service.batcher import DynamicBatcher


class SlowModel:
    """Doubles numbers; each batch takes ``seconds`` and is recorded."""

    def __init__(self, seconds: float = 0.05, fail_on: int | None = None) -> None:
        self.seconds, self.fail_on = seconds, fail_on
        self.batches: list[list[int]] = []

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        await asyncio.sleep(self.seconds)
        if self.fail_on in items:
            raise ValueError(f"cannot take {self.fail_on}")
        return [2 * item for item in items]


def test_requests_that_arrive_during_a_batch_form_the_next_one() -> None:
    model = SlowModel(seconds=0.1)

    async def scenario() -> list[int]:
        batcher = DynamicBatcher(model, max_batch_size=32, wait_s=0.0)
        first = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0.02)  # the first batch, [0], is running now
        later = [asyncio.create_task(batcher.submit(i)) for i in range(1, 11)]
        return await asyncio.gather(first, *later)

    assert asyncio.run(scenario()) == [2 * i for i in range(11)]
    # Serve's @serve.batch would have cut the ten into batches as wait_s passed; here the
    # ten that waited during batch [0] are one batch.
    assert model.batches == [[0], list(range(1, 11))]


def test_an_idle_model_waits_up_to_wait_s_for_company_and_caps_batches() -> None:
    model = SlowModel(seconds=0.01)

    async def scenario() -> list[int]:
        batcher = DynamicBatcher(model, max_batch_size=4, wait_s=0.2)
        tasks = []
        for i in range(6):
            tasks.append(asyncio.create_task(batcher.submit(i)))
            await asyncio.sleep(0.01)  # well within wait_s of the first
        return await asyncio.gather(*tasks)

    assert asyncio.run(scenario()) == [2 * i for i in range(6)]
    assert model.batches == [[0, 1, 2, 3], [4, 5]]


def test_a_lone_request_is_not_held_beyond_wait_s() -> None:
    model = SlowModel(seconds=0.0)

    async def scenario() -> float:
        batcher = DynamicBatcher(model, max_batch_size=8, wait_s=0.05)
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await batcher.submit(7) == 14
        return loop.time() - start

    waited = asyncio.run(scenario())
    assert 0.04 <= waited < 1.0
    assert model.batches == [[7]]


def test_an_error_fails_its_batch_only() -> None:
    model = SlowModel(seconds=0.05, fail_on=3)

    async def scenario() -> list[object]:
        batcher = DynamicBatcher(model, max_batch_size=2, wait_s=0.0)
        tasks = [asyncio.create_task(batcher.submit(i)) for i in (3, 4)]
        await asyncio.sleep(0.01)
        tasks.append(asyncio.create_task(batcher.submit(5)))
        return await asyncio.gather(*tasks, return_exceptions=True)

    first, second, third = asyncio.run(scenario())
    assert isinstance(first, ValueError) and isinstance(second, ValueError)
    assert third == 10
    assert model.batches == [[3, 4], [5]]


def test_a_cancelled_caller_is_left_out_and_the_rest_are_served() -> None:
    model = SlowModel(seconds=0.05)

    async def scenario() -> tuple[list[int], bool]:
        batcher = DynamicBatcher(model, max_batch_size=8, wait_s=0.0)
        running = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0.01)
        gone = asyncio.create_task(batcher.submit(1))
        kept = asyncio.create_task(batcher.submit(2))
        await asyncio.sleep(0)
        gone.cancel()
        return list(await asyncio.gather(running, kept)), gone.cancelled()

    results, cancelled = asyncio.run(scenario())
    assert results == [0, 4] and cancelled
    assert model.batches == [[0], [2]]


def test_a_run_that_returns_the_wrong_number_of_results_fails_the_batch() -> None:
    async def short(items: list[int]) -> list[int]:
        return items[:-1]

    async def scenario() -> None:
        batcher = DynamicBatcher(short, max_batch_size=2, wait_s=0.05)
        await asyncio.gather(batcher.submit(1), batcher.submit(2))

    with pytest.raises(RuntimeError, match="a batch of 2 gave 1 results"):
        asyncio.run(scenario())


@pytest.mark.parametrize(("size", "wait"), [(0, 0.0), (4, -0.1)])
def test_settings_are_checked(size: int, wait: float) -> None:
    async def run(items: list[int]) -> list[int]:
        return items

    with pytest.raises(ValueError, match="max_batch_size"):
        DynamicBatcher(run, size, wait)
