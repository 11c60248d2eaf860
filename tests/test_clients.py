"""`streams.kafka.clients.stopped`: aiokafka's own fetch task's cancellation, leaking out of `stop()` after a
failed fetch, is not the caller's; the caller's own cancellation still goes through."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from streams.kafka.clients import stopped


class LeakingConsumer:
    def __init__(self) -> None:
        self.stops = 0

    async def stop(self) -> None:
        self.stops += 1
        raise asyncio.CancelledError  # as aiokafka's fetcher.close() does after a fetch failed


def test_a_cancellation_out_of_stop_that_is_not_the_callers_is_swallowed() -> None:
    consumer = LeakingConsumer()
    asyncio.run(stopped(consumer))  # type: ignore[arg-type]
    assert consumer.stops == 1


def test_the_callers_own_cancellation_goes_through() -> None:
    class SlowConsumer:
        async def stop(self) -> None:
            await asyncio.sleep(10)  # the caller is cancelled while it waits here

    async def main() -> Any:
        task = asyncio.create_task(stopped(SlowConsumer()))  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        task.cancel()
        return await task

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(main())
