"""Fencing and exactly-once delivery: one transactional producer per partition this worker owns.

Lives here: `PartitionProducers`, which opens, hands out and closes them. Each partition number of the raw
topic (and of the repartition topic and the changelog, which Faust assigns together) has its own
transactional ID, `<group>-devices-<partition>`. Whoever owns partition p opens its producer, and opening
it fences any earlier owner (a worker that was killed, or one the group gave up on but that still runs, such
as one cut off from the network that does not know yet): the broker aborts that owner's open transaction and
refuses its later writes, even those still in flight. Both delivery modes write a partition's state through
its producer; exactly-once writes its outputs and input offsets there too. This is the model of
Kafka Streams' first exactly-once mode; the later one (one producer per worker, fenced through the
consumer group's generation, KIP-447) needs a client that sends the group's metadata with the offsets,
which aiokafka does not.

Knows aiokafka's producer; knows nothing of Faust or of what the records mean.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any

from aiokafka import AIOKafkaProducer

log = logging.getLogger(__name__)


class PartitionProducers:
    def __init__(self, group: str, make_producer: Callable[[str], AIOKafkaProducer]) -> None:
        self.group = group
        self.make_producer = make_producer
        self.producers: dict[int, AIOKafkaProducer] = {}

    def transactional_id(self, partition: int) -> str:
        return f"{self.group}-devices-{partition}"

    def producer(self, partition: int) -> AIOKafkaProducer:
        try:
            return self.producers[partition]
        except KeyError:
            raise RuntimeError(f"partition {partition} is not owned by this worker") from None

    def holds(self, partitions: Iterable[int]) -> bool:
        """Whether every one of these partitions has its producer open (none was lost since the assignment)."""
        return all(p in self.producers for p in partitions)

    async def own(self, partitions: Iterable[int]) -> None:
        """Make the producers match the partitions owned now: open the new ones (fencing their previous
        owner, whose unfinished transaction the broker aborts), close those given up."""
        wanted = set(partitions)
        await self.close(p for p in list(self.producers) if p not in wanted)
        new = sorted(p for p in wanted if p not in self.producers)
        opened = await asyncio.gather(*(self._open(p) for p in new))
        self.producers.update(zip(new, opened, strict=True))

    async def _open(self, partition: int) -> AIOKafkaProducer:
        producer = self.make_producer(self.transactional_id(partition))
        await producer.start()  # registers the transactional ID: fences the previous owner
        return producer

    async def close(self, partitions: Iterable[int]) -> None:
        for p in [p for p in list(partitions) if p in self.producers]:
            producer = self.producers.pop(p)
            _read_outcome(producer)
            # an open transaction is aborted by the broker when the next owner opens its producer
            try:
                await producer.stop()
            except Exception as e:  # a fenced or disconnected producer: nothing of it is needed any more
                log.info("closing the producer of partition %d: %s", p, type(e).__name__)

    async def close_all(self) -> None:
        await self.close(list(self.producers))

    async def lose(self, partition: int) -> None:
        """After a failed transaction. The producer is closed and not opened again here: this worker may have
        been fenced because the partition is no longer its own (it stalled past the session timeout and the
        group gave the partition away). Opening it again would fence the rightful owner, and commit offsets
        that owner has already moved past. The caller rejoins the group; the assignment it gets back
        reopens the producers of the partitions really owned (`own`)."""
        await self.close([partition])


def _read_outcome(producer: AIOKafkaProducer) -> None:
    """A failed transaction's outcome, which aiokafka hands only to an abort or a commit: a fenced producer is
    closed without either, and its failure would be logged as an exception never retrieved."""
    manager = getattr(producer, "_txn_manager", None)
    waiter = manager.wait_for_transaction_end() if manager is not None else None
    if waiter is not None and waiter.done() and not waiter.cancelled():
        waiter.exception()


def transactional_producer(brokers: str, options: dict[str, Any]) -> Callable[[str], AIOKafkaProducer]:
    def make(transactional_id: str) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            bootstrap_servers=brokers,
            transactional_id=transactional_id,
            # what a transactional producer must have, said out loud: a write counts once every in-sync
            # replica has it, and a retried send is never written twice
            acks="all",
            enable_idempotence=True,
            # a worker that dies mid-transaction leaves its partition's readers waiting until its successor
            # fences it or this runs out
            transaction_timeout_ms=60_000,
            linger_ms=5,
            max_batch_size=1 << 20,
            **options,
        )
    return make
