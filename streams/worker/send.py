"""Sending: what a batch produces, per (topic, partition) in order, sent as whole record batches.

Lives here: `Outbox` (the messages of a batch, per topic and partition) and `send_all`, which appends each
message into aiokafka's batch builder instead of one `send` (a coroutine, a future, a partitioner) per record;
`acked` waits for them all, `last_offsets` reads where they landed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

# (key, value, headers) of a message to produce; value None: a tombstone
Message = tuple[bytes | None, bytes | None, list[tuple[str, bytes]] | None]
Outbox = dict[tuple[str, int], list[Message]]


def box(outbox: Outbox, topic: str, partition: int) -> list[Message]:
    found = outbox.get((topic, partition))
    if found is None:
        found = outbox[(topic, partition)] = []
    return found


def put(outbox: Outbox, topic: str, partition: int, message: Message) -> None:
    box(outbox, topic, partition).append(message)


async def send_all(outbox: Mapping[tuple[str, int], list[Message]], producer: Any) -> list[tuple[Any, int]]:
    """Produce each (topic, partition)'s messages as whole record batches. Returns each batch's future with its
    record count."""
    sent: list[tuple[Any, int]] = []

    async def send(batch: Any, topic: str, partition: int, count: int) -> None:
        # closed: sent at once. An open batch waits out the producer's linger (5 ms) in case more is
        # appended, twice a batch (outputs, then changelog), and a second batch for the same partition
        # waits for the first to leave
        batch.close()
        sent.append((await producer.send_batch(batch, topic, partition=partition), count))

    try:
        for (topic, partition), messages in outbox.items():
            batch, count = producer.create_batch(), 0
            for key, value, headers in messages:
                if batch.append(key=key, value=value, timestamp=None, headers=headers or []) is None:
                    await send(batch, topic, partition, count)
                    batch, count = producer.create_batch(), 0
                    if batch.append(key=key, value=value, timestamp=None, headers=headers or []) is None:
                        raise ValueError(f"a message of {len(value or b'')} bytes does not fit in a batch")
                count += 1
            if count:
                await send(batch, topic, partition, count)
    except BaseException:
        # the batches sent before the failure are nobody's to wait for now: their outcome is read here, so
        # that a failed one (a fenced producer's) is not reported as an exception never retrieved
        for future, _ in sent:
            future.add_done_callback(_retrieved)
        raise
    return sent


def _retrieved(future: Any) -> None:
    if not future.cancelled():
        future.exception()


async def acked(sent: list[tuple[Any, int]]) -> None:
    """Wait for every batch's ack; raise the first failure (having waited for, and so retrieved, them all)."""
    results = await asyncio.gather(*(f for f, _ in sent), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


def last_offsets(sent: list[tuple[Any, int]], topic: str) -> dict[int, int]:
    """The offset of the last record produced to `topic`, per partition, from (batch future, record count)."""
    last: dict[int, int] = {}
    for future, count in sent:
        meta = future.result()  # of a whole batch: the offset of its first record
        if meta.topic == topic:
            last[meta.partition] = max(last.get(meta.partition, -1), meta.offset + count - 1)
    return last
