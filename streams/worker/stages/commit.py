"""The commit stage: what the batch produced, sent, and its state made durable, in an order that a crash
anywhere leaves safe.

At-least-once: the plans first (in their partitions' transactions, then RocksDB); the outputs, dead letters
and forwards through the shared producer, every ack awaited; then per partition, in one transaction of its own
producer, the changed device states, the marks, the persons table's changes and the persons stage's messages;
then RocksDB with the changelog offset. The caller commits the input offsets after.

A worker cut off from the network loses its partitions without being told, and its writes in flight (in its
client, or in its kernel's socket buffers) land once the network is back, after the next owner has started. A
late enriched record, dead letter or forward is a byte-identical copy of one the next owner writes too; a late
state record would be read back over the next owner's (by a restore, a standby, or the compaction that keeps
the last record of a key). Opening a partition's transactional producer fences its previous owner's
(`streams.worker.consumer.BatchConsumer.on_partitions_assigned`), so the state of a worker that lost the
partition never lands; its transaction fails, and it rejoins the group. Readers of state read committed.

Exactly-once: per partition number, one transaction carries its outputs, forwards, dead letters, changelog
records and input offsets; they run side by side and fail alone. RocksDB follows each commit.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from aiokafka.structs import TopicPartition

from streams.state.keys import PLAN_KEY
from streams.state.transaction import PartitionState
from streams.worker.retries import transient
from streams.worker.send import Message, Outbox, acked, last_offsets, send_all

if TYPE_CHECKING:
    from streams.worker.batch import Pipeline, Run
    from streams.worker.stages.persons import PartitionPersons

log = logging.getLogger(__name__)

ABORT_TIMEOUT = 30.0  # seconds: an abort that takes longer is given up, and the producer closed

Written = tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes | None]]]  # device states, persons table


class BatchFailed(Exception):
    """Part of a batch was not committed: `tps` are the input partitions to fetch again (with exactly-once,
    the transactions of the batch's other partitions may have committed)."""

    def __init__(self, tps: set[Any], cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.tps = tps
        self.cause = cause


async def commit(run: Run) -> None:
    if run.step.exactly_once:
        await _exactly_once(run)
    else:
        await _at_least_once(run)


async def _at_least_once(run: Run) -> None:
    step, states = run.step, run.states
    if run.plans:
        # durable before any output of the batch: what a batch done again after a crash must apply
        await _transactions(step, {p: {(step.topics.changelog, p): [(PLAN_KEY, plan, None)]}
                                   for p, plan in run.plans.items()})
        for p, plan in run.plans.items():
            states[p].db.write(step.write_batch([(PLAN_KEY, plan)]))
    # every output acknowledged before any state that depends on it is made durable
    outbox = run.outboxes.get(0, {})
    if outbox:
        await acked(await send_all(outbox, await step.producer()))
    boxes: dict[int, Outbox] = {}
    writes: dict[int, Written] = {}
    for p in states:
        encoded, pairs = _changes(states[p], run.persons.get(p))
        box = run.fenced.get(p) or {}
        if encoded or pairs or box:
            boxes[p] = {**box, **_changelogs(step, p, encoded, pairs)}
            writes[p] = (encoded, pairs)

    def written(p: int, sent: list[tuple[Any, int]]) -> None:
        _write(step, states[p], p, writes[p], sent)

    await _transactions(step, boxes, written)


async def _transactions(step: Pipeline, boxes: Mapping[int, Outbox],
                        then: Callable[[int, list[tuple[Any, int]]], None] | None = None) -> None:
    """At-least-once: each partition's messages in one transaction of its producer, side by side; `then(p,
    sent)` once p's has committed. Raises the first failure (the caller does the whole batch again: what
    committed is skipped as applied)."""
    if not boxes:
        return

    async def one(p: int) -> None:
        sent = await _in_transaction(step, p, boxes[p])
        if then is not None:
            then(p, sent)

    results = await asyncio.gather(*(one(p) for p in sorted(boxes)), return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    for failure in failures:
        if isinstance(failure, asyncio.CancelledError):
            raise failure
    if failures:
        raise failures[0]


async def _exactly_once(run: Run) -> None:
    """One transaction per input partition number; they run side by side and fail alone."""
    step, commit_offsets = run.step, run.commit
    owners = sorted(set(run.outboxes) | {tp.partition for tp in commit_offsets})
    results = await asyncio.gather(
        *(_commit_partition(step, p, run.outboxes.get(p, {}), run.states.get(p),
                            {tp: o for tp, o in commit_offsets.items() if tp.partition == p}, run.persons.get(p))
          for p in owners),
        return_exceptions=True)
    failed: set[Any] = set()
    cause: BaseException | None = None
    for p, result in zip(owners, results, strict=True):
        if isinstance(result, BaseException):
            cause = cause or result
            failed.update(tp for tp in commit_offsets if tp.partition == p)
    if cause is not None:
        if isinstance(cause, asyncio.CancelledError):
            raise cause
        raise BatchFailed(failed, cause)


async def _commit_partition(step: Pipeline, p: int, outbox: Outbox, state: PartitionState | None,
                            offsets: dict[Any, int], stage: PartitionPersons | None) -> None:
    encoded, pairs = _changes(state, stage)
    sent = await _in_transaction(step, p, {**outbox, **_changelogs(step, p, encoded, pairs)}, offsets)
    if state is not None:
        _write(step, state, p, (encoded, pairs), sent)


async def _in_transaction(step: Pipeline, p: int, outbox: Outbox,
                          offsets: dict[Any, int] | None = None) -> list[tuple[Any, int]]:
    """The messages (and, exactly-once, the input offsets) in one transaction of partition p's producer."""
    if step.transactions is None:
        raise RuntimeError("no transactional producers: the worker's state cannot be fenced")
    producer = step.transactions.producer(p)
    try:
        await producer.begin_transaction()
        sent = await send_all(outbox, producer)
        await acked(sent)
        if offsets:
            await producer.send_offsets_to_transaction(
                {TopicPartition(tp.topic, tp.partition): o for tp, o in offsets.items()}, step.group)
        await producer.commit_transaction()
        step.counters.transactions += 1
    except BaseException as e:
        if not transient(e) and isinstance(e, Exception) and await _aborted(producer):
            # the batch's own content failed (a defect of ours, or a record the broker refuses), not Kafka: the
            # producer still holds p, and its records can be tried one at a time (`BatchConsumer._isolate`)
            raise
        # no abort: a fenced or broken producer cannot; the next producer opened for p (this worker's once
        # the group confirms it owns p, or the next owner's) makes the broker abort what was left open
        await step.transactions.lose(p)
        raise
    return sent


async def _aborted(producer: Any) -> bool:
    try:
        await asyncio.wait_for(producer.abort_transaction(), ABORT_TIMEOUT)
    except Exception as e:
        log.warning("a failed transaction could not be aborted (%s); its producer is closed", type(e).__name__)
        return False
    return True


def _changes(state: PartitionState | None, stage: PartitionPersons | None) -> Written:
    """What the batch changed of the partition: its device states and marks, and its persons table."""
    encoded = state.encoded() if state is not None and state.changed else []
    pairs = stage.encoded() if stage is not None else []
    return encoded, pairs


def _changelogs(step: Pipeline, p: int, encoded: list[tuple[bytes, bytes]],
                pairs: list[tuple[bytes, bytes | None]]) -> dict[tuple[str, int], list[Message]]:
    out: dict[tuple[str, int], list[Message]] = {}
    if encoded:
        out[(step.topics.changelog, p)] = [(k, v, None) for k, v in encoded]
    if pairs:
        assert step.topics.persons_changelog is not None
        out[(step.topics.persons_changelog, p)] = [(k, v, None) for k, v in pairs]
    return out


def _write(step: Pipeline, state: PartitionState, p: int, written: Written, sent: list[tuple[Any, int]]) -> None:
    """RocksDB after the partition's transaction committed. Its changelog partitions are written only by its
    transactions, each closed by one commit marker right after its last record: recording the marker's offset
    as the one RocksDB holds lets recovery start after it (and a changelog that ends in a marker be seen as
    read)."""
    encoded, pairs = written
    if encoded:
        offset = last_offsets(sent, step.topics.changelog)[p] + 1
        state.db.write(step.write_batch([*encoded, (step.offset_key, str(offset).encode())]))
        state.committed()
    if pairs:
        assert step.persons_db_for_partition is not None
        offset = last_offsets(sent, step.topics.persons_changelog or "")[p] + 1
        step.persons_db_for_partition(p).write(
            step.write_batch([*pairs, (step.offset_key, str(offset).encode())]))  # None: a deletion
