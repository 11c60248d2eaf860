"""The worker's consumer: Faust's aiokafka consumer, draining the raw, repartition and persons topics a fetched
batch at a time into the batch step (`streams.worker.batch`) instead of handing Faust one event at a time.

Faust keeps what it is good at: the group and its assignment, the tables' recovery (changelog records go to
`streams.worker.recovery`). Here: the batch loop (a batch holds a lock from processing to commit, and a
rebalance takes the lock before Faust revokes anything, so no batch straddles a rebalance), its retries and the
one-record-at-a-time isolation of a batch that keeps failing, and on assignment the opening of the partitions'
transactional producers, which fences their previous owner before anything of theirs is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, cast

from aiokafka.errors import IllegalStateError
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.transport.drivers.aiokafka import Consumer as AIOKafkaConsumer
from faust.types import TP
from mode.utils.objects import cached_property

from streams.config import EX_CONFIG
from streams.kafka import admin as kafka_admin
from streams.worker.batch import BatchFailed, Pipeline
from streams.worker.names import input_topics
from streams.worker.recovery import MarkerAwareRecovery
from streams.worker.retries import Retries, transient

log = logging.getLogger(__name__)


class ConsumerThread(AIOKafkaConsumerThread):
    """Faust's consumer thread, whose consumer reads committed records only: of the changelogs, the persons
    stage's messages and the repartition topic, nothing that a crashed or fenced transaction left
    behind. The state is written in transactions in both modes (`streams.worker.stages.commit`)."""

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # Faust sets this only with its own exactly-once mode, whose producers this worker does not use
        consumer._isolation_level = "read_committed"
        return consumer


class BatchConsumer(AIOKafkaConsumer):
    """Faust's aiokafka consumer, draining the raw and repartition topics a fetched batch at a time.

    Records of the table's changelog (during recovery and for standbys) go straight to RocksDB
    (`MarkerAwareRecovery.restore_fetched`); any other record takes Faust's own path.
    A batch holds `batch_lock` from processing to commit, and a rebalance takes the lock before Faust
    revokes anything, so no batch straddles a rebalance."""

    pipeline: Pipeline
    retries: Retries
    kafka_trouble = False  # whether the batch step's last failure was Kafka's
    _url_checked = False  # whether the group's advertised URLs were compared with this worker's
    # per partition, the consumer's position at a moment when every record before it had been handed on
    settled_positions: dict[Any, int]

    @cached_property
    def batch_lock(self) -> asyncio.Lock:
        return asyncio.Lock()

    def _new_consumer_thread(self) -> AIOKafkaConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def _drain_messages(self, fetcher: Any) -> None:  # pragma: no cover - exercised against the broker
        try:
            await self._drain_batches(fetcher)
        except asyncio.CancelledError:
            if self.should_stop or fetcher.should_stop or self.app.should_stop:
                # a shutdown: end quietly. Faust's Fetcher takes a cancel that arrives while a rebalance is
                # under way for a crash to restart from, and has no supervisor to do it: the worker would
                # exit 1 on a plain SIGTERM
                return
            raise

    async def _drain_batches(self, fetcher: Any) -> None:  # pragma: no cover - exercised against the broker
        app = self.app
        callback = self.callback
        mine = input_topics(self.pipeline.topics)
        recovery = cast(MarkerAwareRecovery, cast(Any, app.tables).recovery)
        while not (self.should_stop or fetcher.should_stop):
            # every record fetched so far has been handed on: what the table recovery may count as read
            self.settled_positions = fetch_positions(self)
            recovery.settle()
            generation = app.consumer_generation_id
            records, active = await self._wait_next_records(timeout=1.0)
            if not records or self.should_stop:
                continue
            batch: dict[Any, Sequence[Any]] = {}
            rewind: dict[Any, int] = {}
            for tp, recs in records.items():
                if not recs:
                    continue
                if tp.topic in mine:
                    if active is None or tp in active:
                        batch[tp] = recs
                    else:
                        # fetched just before its partition was paused or revoked: fetch it again later
                        rewind[tp] = recs[0].offset
                elif (active is not None and tp not in active) or not recovery.restore_fetched(tp, recs):
                    # paused (a rebalance is under way) or not the table's: Faust decides what becomes of them
                    for rec in recs:
                        await callback(self._to_message(tp, rec))
            if batch:
                async with self.batch_lock:
                    current = self._get_active_partitions()
                    if (generation != app.consumer_generation_id or app.rebalancing
                            or any(tp not in current for tp in batch)):
                        # fetched before a rebalance that has begun or ended since: its offsets could not be
                        # committed (the commit of a partition in transit is discarded), so it would be
                        # applied twice. Fetch it again under the new assignment
                        rewind.update({tp: recs[0].offset for tp, recs in batch.items()})
                    else:
                        positions = {(tp.topic, tp.partition): o for tp, o in fetch_positions(self).items()}
                        ends = self._ends(batch)
                        try:
                            if self.retries.isolate(self.kafka_trouble):
                                # this batch failed whole too often on something other than Kafka
                                await self._isolate(batch, positions, ends, rewind)
                            else:
                                result = await self.pipeline.process(batch, positions, ends)
                                rewind.update(result.rewind)
                                await self._commit_batch(result.commit)
                        except asyncio.CancelledError:
                            raise
                        except Exception as e:
                            # a send, a transaction or a write failed: what of the batch was not committed
                            # is done again (exactly-once: the partitions whose transaction failed)
                            failed = e.tps if isinstance(e, BatchFailed) else set(batch)
                            cause = e.cause if isinstance(e, BatchFailed) else e
                            self.kafka_trouble = transient(cause)
                            self.pipeline.counters.failed_batches += 1
                            pause = self.retries.failed()
                            log.error("batch failed (%s: %s); it will be processed again in %.1fs",
                                      type(cause).__name__, cause, pause)
                            self.pipeline.forget_partitions(tp.partition for tp in failed)
                            rewind.update({tp: batch[tp][0].offset for tp in failed})
                            transactions = self.pipeline.transactions
                            if transactions is not None and not transactions.holds(tp.partition for tp in batch):
                                # a failed partition's producer is closed (perhaps fenced: is this worker still
                                # its owner?): the group's answer reopens those it owns
                                self._thread._ensure_consumer()._coordinator.request_rejoin()
                            await asyncio.sleep(pause)
                        else:
                            self.retries.succeeded()
            if rewind:
                await self._rewind(rewind)

    async def _commit_batch(self, offsets: Mapping[Any, int]) -> None:
        if offsets and not self.pipeline.exactly_once:
            # exactly-once committed them in the batch's transactions
            await self._commit_offsets(offsets)

    def _ends(self, batch: Mapping[Any, Sequence[Any]]) -> dict[tuple[str, int], int]:
        """The high watermark of the batch's partitions' raw and repartition logs, as last fetched."""
        t = self.pipeline.topics
        ends = {}
        for p in {tp.partition for tp in batch}:
            for topic in (t.raw, t.repartition):
                with contextlib.suppress(Exception):
                    high = self.highwater(TP(topic, p))
                    if high is not None:
                        ends[(topic, p)] = high
        return ends

    async def _isolate(self, batch: Mapping[Any, Sequence[Any]], positions: Mapping[tuple[str, int], int],
                       ends: Mapping[tuple[str, int], int],
                       rewind: dict[Any, int]) -> None:
        """Apply the batch one record at a time; a record that fails alone (not on Kafka) is kept as an
        `internal_error` dead letter, and the partition goes on."""
        log.error("a batch failed %d times in a row; its records are tried one at a time", self.retries.failures)
        for tp, records in sorted(batch.items(), key=lambda item: (item[0].partition,
                                                                    item[0].topic != self.pipeline.topics.raw)):
            for i, rec in enumerate(records):
                try:
                    result = await self.pipeline.process({tp: [rec]}, positions, ends)
                except Exception as e:
                    cause = e.cause if isinstance(e, BatchFailed) else e
                    if transient(cause):
                        raise
                    # what the failed try marked as applied in memory was never written: forget it, or the
                    # record would be skipped instead of kept
                    self.pipeline.forget_partitions([tp.partition])
                    result = await self.pipeline.process({tp: [rec]}, positions, ends, quarantine=True)
                await self._commit_batch(result.commit)
                if result.rewind:
                    rewind[tp] = records[i].offset
                    break

    async def _rewind(self, offsets: Mapping[Any, int]) -> None:
        assigned = self.assignment()
        for tp, offset in offsets.items():
            if tp in assigned:
                # revoked meanwhile: its next owner reads it
                with contextlib.suppress(IllegalStateError, AssertionError):
                    await self.seek_wait({tp: offset})

    async def on_partitions_revoked(self, revoked: set[Any]) -> None:
        async with self.batch_lock:
            self.pipeline.forget_partitions(tp.partition for tp in revoked)
            await super().on_partitions_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[Any], generation_id: int = 0) -> None:
        transactions = self.pipeline.transactions
        if transactions is not None:
            # before Faust reads the committed offsets (and the table recovery starts): opening the producers
            # of the partitions now owned fences their previous owner, so no transaction of its can commit
            # state (or, exactly-once, offsets) behind what is read here. Its owner may not know it lost them:
            # a worker cut off from the network past the session timeout is told only once it is back
            mine = input_topics(self.pipeline.topics)
            async with self.batch_lock:
                await transactions.own({tp.partition for tp in assigned if tp.topic in mine})
        await super().on_partitions_assigned(assigned, generation_id)
        if not self._url_checked:
            self._url_checked = True
            await self._refuse_a_shared_url()

    async def _refuse_a_shared_url(self) -> None:
        """At the first assignment: another member of the group advertising this worker's URL would be sent
        the lookups of both (the group's map of owners holds one worker per URL), and answer half of them
        wrongly. Several workers on one machine, each with the default loopback URL, is the usual way to get
        there. Refused here, before any batch, with what to set."""
        app = cast(Any, self.app)
        mine = str(app.conf.canonical_url)
        try:
            urls = await kafka_admin.member_urls(app.streams_settings)
        except Exception as e:
            log.warning("could not compare the group's advertised URLs (%s)", type(e).__name__)
            return
        if list(urls.values()).count(mine) > 1:
            message = (f"another worker of group {app.streams_settings.group!r} advertises the same URL {mine}: "
                       "lookups would reach the wrong one. Give each worker its own STREAMS_ADVERTISED_URL (or "
                       "its own STREAMS_WEB_PORT)")
            log.critical(message)
            print(f"streams: {message}", file=sys.stderr, flush=True)
            os._exit(EX_CONFIG)  # before any batch: nothing of this worker's is written yet


def fetch_positions(consumer: Any) -> dict[Any, int]:
    """The aiokafka consumer's next fetch offset per assigned partition, as it stands (no wait)."""
    try:
        assignment = consumer._thread._ensure_consumer()._subscription.subscription.assignment
    except Exception:
        return {}
    positions = {}
    for tp in assignment.tps:
        state = assignment.state_value(tp)
        if state is not None and state.has_valid_position:
            positions[tp] = state.position
    return positions

