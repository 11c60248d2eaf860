"""The Faust worker: the raw topic in, enriched records and dead letters out, device state in a RocksDB table.

Read top to bottom: the app, its topics, the device table, then the consumer that feeds whole fetched
batches to `streams.worker.batch` instead of handing Faust one event at a time. Faust keeps what it is good at:
the consumer group and its partition assignment, the table's RocksDB stores, its changelog and recovery,
the web server. What it is slow at (an Event, a task and an await per record; a RocksDB write and a
changelog record per table assignment) is what the batch step replaces.

`python -m streams worker` runs it; `faust -A streams.worker.app worker` works too (settings from STREAMS_*).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import faust
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import IllegalStateError, KafkaError, NodeNotReadyError
from aiokafka.protocol.metadata import MetadataRequest
from faust.tables import TableManager
from faust.tables.recovery import Recovery
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.transport.drivers.aiokafka import Consumer as AIOKafkaConsumer
from faust.types import TP
from mode.utils.objects import cached_property

from streams.config import Settings
from streams.enrich import Enricher
from streams.gcpolicy import tune_gc
from streams.kafka import topics as kafka_topics
from streams.kafka.transactions import PartitionProducers, transactional_producer
from streams.state import restore
from streams.state.devicestore import DeviceTable
from streams.state.keys import OFFSET_KEY
from streams.state.restore import RestoreCounters
from streams.state.store import write_batch
from streams.worker.batch import BatchFailed, Pipeline, Topics
from streams.worker.retries import Retries

log = logging.getLogger(__name__)

TABLE = "devices"
PERSONS_TABLE = "persons"  # pair claims and the persons index (`streams.state.pairs`)
EX_CONFIG = 78  # sysexits.h: a configuration error; restarting will not help


class ConfigurationError(Exception):
    pass


def topic_names(settings: Settings, partitions: int, outputs: Mapping[str, int] | None = None) -> Topics:
    outputs = outputs or {}
    persons = settings.persons == "on"
    return Topics(
        raw=settings.raw_topic,
        repartition=f"{settings.group}-{settings.raw_topic}-repartition",
        enriched=settings.enriched_topic,
        dead_letter=settings.dead_letter_topic,
        changelog=f"{settings.group}-{TABLE}-changelog",
        partitions=partitions,
        enriched_partitions=outputs.get(settings.enriched_topic, partitions),
        dead_letter_partitions=outputs.get(settings.dead_letter_topic, partitions),
        persons_repartition=f"{settings.group}-persons-repartition" if persons else None,
        persons_changelog=f"{settings.group}-{PERSONS_TABLE}-changelog" if persons else None,
        persons=settings.persons_topic if persons else None,
        persons_partitions=outputs.get(settings.persons_topic, partitions) if persons else 0,
    )


def input_topics(topics: Topics) -> set[str]:
    """The topics the batch step reads: raw, repartition, and the persons stage's repartition topic."""
    return {t for t in (topics.raw, topics.repartition, topics.persons_repartition) if t}


class ConsumerThread(AIOKafkaConsumerThread):
    """Faust's consumer thread, whose consumer reads committed records only: of the changelogs, the persons
    stage's messages and (exactly-once) the repartition topic, nothing that a crashed or fenced transaction
    left behind. The state is written in transactions in both modes (`Pipeline._commit_at_least_once`)."""

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
                            self.kafka_trouble = isinstance(cause, TimeoutError | KafkaError | OSError)
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
                       rewind: dict[Any, int]) -> None:  # pragma: no cover - exercised against the broker
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
                    if isinstance(cause, TimeoutError | KafkaError | OSError):
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


class StreamsApp(faust.App):
    streams_pipeline: Pipeline
    streams_settings: Settings
    streams_table: Any
    streams_persons_table: Any  # None: the persons stage is off

    async def _stop_consumer(self) -> None:
        # let the batch in flight finish (or not start) before Faust revokes the tables on shutdown
        consumer = self._consumer
        if isinstance(consumer, BatchConsumer):
            async with consumer.batch_lock:
                await super()._stop_consumer()
                if consumer.pipeline.transactions is not None:
                    await consumer.pipeline.transactions.close_all()
        else:
            await super()._stop_consumer()


class MarkerAwareRecovery(Recovery):
    """Faust's table recovery, which also knows a changelog that ends in a transaction marker, and which
    writes fetched changelog records straight to RocksDB (`streams.state.restore`) instead of through Faust's
    event path.

    Recovery is done when the last record read is the one before the partition's end offset; with
    transactions, the last offsets are commit markers (and records of aborted transactions) that a consumer
    never sees as records, so Faust's own check waits for ever unless its own exactly-once mode is on. Here
    a partition also counts as read when the consumer's position has passed its end and every record
    fetched has been handed on (`BatchConsumer.settled_positions`) and applied."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.restore_counters = RestoreCounters()
        # the active partitions' highwaters and start offsets are built and the reading has begun: only then
        # may `settle` end a recovery (before, they are the previous rebalance's)
        self._reading = False

    def need_recovery(self) -> bool:
        remaining = self.active_remaining()
        if not any(n > 0 for n in remaining.values()):
            return False
        if not self.tables.changelog_queue.empty():
            return True
        positions = getattr(self.app.consumer, "settled_positions", {})
        return any(n > 0 and positions.get(tp, -1) <= self.active_highwaters[tp] for tp, n in remaining.items())

    def restore_fetched(self, tp: Any, records: Sequence[Any]) -> bool:
        """Apply the fetched changelog records of an active partition in recovery or of a standby, in one
        RocksDB write batch; False when `tp` is neither (then they take Faust's own path)."""
        if not restore.BATCHED:
            return False
        if tp in self.active_tps:
            role, offsets = "active", self.active_offsets
            self._active_events_received_at[tp] = time.monotonic()  # else Faust warns of a stalled partition
        elif tp in self.standby_tps:
            role, offsets = "standby", self.standby_offsets
        else:
            return False
        table = self.tp_to_table.get(tp)
        if table is None:
            return False
        fresh = restore.newer_than(records, offsets.get(tp))
        if fresh:
            buffered = self.buffers.get(table)
            if buffered:
                # records that took Faust's path before this one: theirs are older, so they are written first
                table.apply_changelog_batch(buffered)
                buffered.clear()
            started = time.monotonic()
            offsets[tp] = restore.write_records(cast(Any, table).data, tp.partition, fresh)
            counters = self.restore_counters
            counters.records[role] += len(fresh)
            counters.batches += 1
            counters.seconds += time.monotonic() - started
            if role == "active" and self._devices(tp):
                counters.offsets[tp.partition] = offsets[tp]
        return True

    def _devices(self, tp: Any) -> bool:
        """Whether `tp` is of the device table's changelog: the per-partition figures are the device table's
        (the persons table has its own changelog, with other offsets, under the same partition numbers)."""
        pipeline = getattr(self.app, "streams_pipeline", None)
        return pipeline is None or tp.topic == pipeline.topics.changelog

    def standby_positions(self) -> dict[int, int]:
        """Per standby partition, the changelog offset its copy of the device table holds (one with nothing new
        to read too)."""
        return {tp.partition: offset for tp in list(self.standby_tps)
                if self._devices(tp) and (offset := self.standby_offsets.get(tp)) is not None}

    def settle(self) -> None:
        """Called by the consumer each time every record it fetched has been handed on: the recovery ends
        as soon as it is complete, not at the next 5-second tick of Faust's changelog reader."""
        if self._reading and self.in_recovery and not self.need_recovery():
            self.flush_buffers()
            self._set_recovery_ended()
            self.signal_recovery_end.set()

    async def _seek_offsets(self, consumer: Any, tps: Any, offsets: Any, title: str) -> None:
        await super()._seek_offsets(consumer, tps, offsets, title)
        if title == "active":
            self._reading = True
            for tp in tps:
                if self._devices(tp):
                    self.restore_counters.started_after[tp.partition] = offsets[tp]

    def _set_recovery_ended(self) -> None:
        self._reading = False
        super()._set_recovery_ended()

    async def on_rebalance(self, assigned: Any, revoked: Any, newly_assigned: Any, generation_id: int = 0) -> None:
        self._reading = False
        persons = getattr(getattr(self.app, "streams_pipeline", None), "topics", None)
        for tp in revoked:
            if persons is not None and tp.topic == persons.persons_changelog:
                continue  # the partition's device figures go with its other topics
            self.restore_counters.offsets.pop(tp.partition, None)
            self.restore_counters.started_after.pop(tp.partition, None)
        await super().on_rebalance(assigned, revoked, newly_assigned, generation_id)


class StreamsTableManager(TableManager):
    @property
    def recovery(self) -> Recovery:
        if self._recovery is None:
            self._recovery = MarkerAwareRecovery(self.app, self, beacon=self.beacon, loop=self.loop)
        return self._recovery


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


def create_app(settings: Settings, layout: Layout) -> StreamsApp:
    partitions = layout.partitions
    topics = topic_names(settings, partitions, layout.outputs)
    app = StreamsApp(
        settings.group,
        broker=[f"kafka://{b.strip()}" for b in settings.brokers.split(",")],
        broker_credentials=credentials(settings),
        store="rocksdb://",
        datadir=settings.state_dir,
        topic_partitions=partitions,
        # the changelog, repartition and Faust's leader topic get the same replication as the others
        topic_replication_factor=layout.replication,
        key_serializer="raw",
        value_serializer="raw",
        web_port=settings.web_port,
        web_bind=settings.web_bind,
        web_host=settings.web_bind,
        web_enabled=True,
        web_tables_enabled=False,
        consumer_auto_offset_reset="earliest",
        broker_max_poll_records=settings.batch_records,
        consumer_max_fetch_size=8 << 20,
        producer_linger_ms=5,
        producer_max_batch_size=1 << 20,
        # an output, dead letter or state counts as written once every in-sync replica has it
        producer_acks=-1,
        stream_wait_empty=False,
        # a worker that died gives its partitions up after this long (Faust's default is 60 s)
        broker_session_timeout=settings.session_timeout,
        broker_heartbeat_interval=max(1.0, settings.session_timeout / 4),
        # each partition's states kept by as many other workers (it needs as many more in the group to show)
        table_standby_replicas=settings.standby_replicas,
        # Faust's own exactly-once (a producer buffer per partition, a transaction open at all times) stays
        # off: with --processing-guarantee exactly_once the batch step commits its own transactions
        processing_guarantee="at_least_once",
        TableManager=StreamsTableManager,
        Table=DeviceTable,
        # the URL the group's other workers route device lookups to (Faust's assignor shares it)
        canonical_url=settings.web_url,
        logging_config=None,
        # only STREAMS_* variables configure the worker: Faust would otherwise read BROKER_URL, WEB_PORT,
        # PROCESSING_GUARANTEE... from the environment and let them override what is passed here
        env={},
    )
    cast(Any, app.transport).Consumer = BatchConsumer
    cast(Any, app.transport)._get_controller_node = _controller_node

    raw = app.topic(topics.raw, key_type=bytes, value_type=bytes)
    repartition = app.topic(topics.repartition, partitions=partitions, internal=True, key_type=bytes,
                            value_type=bytes)
    table = app.Table(
        TABLE,
        partitions=partitions,
        key_type=bytes,
        value_type=bytes,
        options={
            "block_cache_size": settings.rocksdb_cache_mb << 20,
            "block_cache_compressed_size": 0,
            # 10 bits a key: ~1% false positives (Faust's 3 bits: ~14%). Most devices of a large population
            # have nothing stored, and a false positive costs a read of a data block for nothing
            "bloom_filter_size": 10,
            "write_buffer_size": 16 << 20,
            "max_write_buffer_number": 2,
        },
    )
    # subscribe to the inputs without an agent: BatchConsumer reads them
    app.topics.add(raw)
    app.topics.add(repartition)
    persons_table = None
    if topics.persons_repartition is not None:
        # the persons stage: its repartition topic, and a second table (pairs' claims, the persons index),
        # partitioned like the first, so that Faust gives partition p of every input and table to one worker
        app.topics.add(app.topic(topics.persons_repartition, partitions=partitions, internal=True,
                                 key_type=bytes, value_type=bytes))
        persons_table = app.Table(PERSONS_TABLE, partitions=partitions, key_type=bytes, value_type=bytes,
                                  options={"block_cache_size": 8 << 20, "block_cache_compressed_size": 0,
                                           "bloom_filter_size": 10, "write_buffer_size": 8 << 20,
                                           "max_write_buffer_number": 2})

    faust_producer = cast(Any, app.producer)

    async def producer() -> Any:
        # the aiokafka producer under Faust's; a batch can arrive before Faust has started it
        for _ in range(600):
            started = faust_producer._producer
            if started is not None:
                return started
            await asyncio.sleep(0.05)
        raise RuntimeError("Faust's producer did not start within 30 s")

    pipeline = Pipeline(
        Enricher(settings.enrich_settings()),
        topics,
        producer,
        db_for_partition=lambda p: cast(Any, table.data)._db_for_partition(p),
        write_batch=write_batch,
        changelog_offset_key=OFFSET_KEY,
        cache_size=settings.cache_devices,
        partitioner=settings.partitioner,
        # in both modes: the state is written in each partition's transactions, which its next owner fences
        transactions=PartitionProducers(settings.group, transactional_producer(settings.brokers,
                                                                                settings.kafka_options())),
        exactly_once=settings.exactly_once,
        group=settings.group,
        persons_db_for_partition=(None if persons_table is None
                                  else lambda p: cast(Any, persons_table.data)._db_for_partition(p)),
    )
    BatchConsumer.pipeline = pipeline
    BatchConsumer.retries = Retries(isolate_after=settings.batch_retries)
    app.streams_pipeline = pipeline
    app.streams_settings = settings
    app.streams_table = table
    app.streams_persons_table = persons_table
    return app


# -- start-up checks ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """The raw topic's partition count, the output topics' (which existing topics may have their own), and
    the replication factor of the topics the worker creates (Faust's changelog and repartition topics too)."""

    partitions: int
    outputs: Mapping[str, int]
    replication: int = 1


# how long start-up goes on trying while brokers do not answer (a broker restarting, one of three down and
# still in the metadata, a controller moving): a few broker restarts' worth
START_PATIENCE = 30.0


async def prepare_topics(settings: Settings) -> Layout:
    """The raw topic's real partition count; the other topics made to match it, or a clear refusal."""
    return await kafka_topics.retrying(lambda: _prepare_topics(settings), patience=START_PATIENCE)


async def _prepare_topics(settings: Settings) -> Layout:
    admin = kafka_topics.Admin(bootstrap_servers=settings.brokers, request_timeout_ms=15_000,
                               **settings.kafka_options())
    await admin.start()
    try:
        counts = await _partition_counts(admin)
        replication = await kafka_topics.replication_factor(admin, settings)
        partitions = counts.get(settings.raw_topic)
        if partitions is None:
            if settings.missing_raw_topic != "create":
                raise ConfigurationError(
                    f"the raw topic {settings.raw_topic} does not exist on {settings.brokers}. Check its name "
                    f"(STREAMS_RAW_TOPIC / --raw-topic) and the brokers (STREAMS_BROKERS / --brokers); create it, "
                    f"or let the worker create it with STREAMS_MISSING_RAW_TOPIC=create (--missing-raw-topic "
                    f"create; {settings.partitions} partitions, STREAMS_PARTITIONS)."
                )
            partitions = settings.partitions
            log.warning("raw topic %s does not exist: creating it with %d partitions, replication factor %d",
                        settings.raw_topic, partitions, replication)
            await _create(admin, settings, settings.raw_topic, partitions, replication)
        topics = topic_names(settings, partitions)
        for name in (topics.changelog, topics.repartition, topics.persons_changelog, topics.persons_repartition):
            if name is None:
                continue
            existing = counts.get(name)
            if existing is not None and existing != partitions:
                raise ConfigurationError(
                    f"{name} has {existing} partitions but {settings.raw_topic} has {partitions}: the device "
                    f"table must be partitioned like its input. Either give {settings.raw_topic} {existing} "
                    f"partitions again, or rebuild the state under a new consumer group (STREAMS_GROUP / "
                    f"--group), or delete {name} and the state directory {settings.state_dir} to start the "
                    f"table afresh (device states are then rebuilt only from the records still in the topic)."
                )
        outputs = {}
        for name in (topics.enriched, topics.dead_letter, topics.persons):
            if name is None:
                continue
            if name not in counts:
                # the persons topic holds the latest mapping per user ID: compacted, as a table is
                configs = {"cleanup.policy": "compact"} if name == topics.persons else None
                await _create(admin, settings, name, partitions, replication, configs)
            outputs[name] = counts.get(name, partitions)
        # the tables' changelogs and the repartition topics, made here rather than by Faust as it starts (with
        # the same settings: a changelog is compacted): a topic made just before the group's first assignment can
        # be missing from the metadata the assignment is computed from, and is then left out of it until the
        # next rebalance (seen: the persons stage's input not read, its table assigned to no one)
        made = []
        changelogs = (topics.changelog, topics.persons_changelog)
        for name in (*changelogs, topics.repartition, topics.persons_repartition):
            if name is not None and name not in counts:
                configs = {"cleanup.policy": "compact"} if name in changelogs else None
                await _create(admin, settings, name, partitions, replication, configs)
                made.append(name)
        await _until_listed(admin, made)
        return Layout(partitions, outputs, replication)
    finally:
        await admin.close()


async def _partition_counts(admin: AIOKafkaAdminClient) -> dict[str, int]:
    metadata = await admin.describe_topics()
    return {t["topic"]: len(t["partitions"]) for t in metadata if not t.get("error_code")}


async def _until_listed(admin: AIOKafkaAdminClient, names: Sequence[str], wait: float = 15.0) -> None:
    """Until the brokers' metadata shows the topics just created (the controller made them a moment before)."""
    deadline = time.monotonic() + wait
    while missing := set(names) - (await _partition_counts(admin)).keys():
        if time.monotonic() >= deadline:
            raise KafkaError(f"topics {sorted(missing)} were created but do not show in the metadata after "
                             f"{wait:.0f}s")
        await asyncio.sleep(0.1)


async def _create(admin: AIOKafkaAdminClient, settings: Settings, name: str, partitions: int,
                  replication: int, configs: dict[str, str] | None = None) -> None:
    try:
        await kafka_topics.create_topic(admin, name, partitions, replication, configs)
    except kafka_topics.TopicCreationFailed as e:
        if e.retriable:
            raise
        # e.g. a replication factor above the number of brokers, a policy, an invalid name: not worth a retry
        raise ConfigurationError(f"{e} on {settings.brokers} ({partitions} partitions, replication factor "
                                 f"{replication}; STREAMS_REPLICATION_FACTOR / --replication-factor)") from e


async def _controller_node(owner: Any, client: Any, timeout: int = 30000) -> int | None:
    """Faust's lookup of the broker to create its topics through, for a cluster with a broker down.

    Faust asks the first broker of its metadata and gives up when that one does not answer: with one broker
    of three down the worker could not start (NodeNotReadyError). This asks any broker that answers, and
    uses it when the controller it names does not (with KRaft every broker forwards CreateTopics to the
    controller quorum)."""
    deadline = time.monotonic() + timeout / 1000
    while True:
        nodes = [b.nodeId for b in client.cluster.brokers()]
        random.shuffle(nodes)
        for node_id in nodes:
            if not await client.ready(node_id):
                continue
            result = await owner.wait(client.send(node_id, MetadataRequest([])), timeout=timeout)
            if result.stopped:
                return None
            controller = result.result.controller_id
            return int(controller) if controller >= 0 and await client.ready(controller) else int(node_id)
        if time.monotonic() > deadline:
            raise NodeNotReadyError(f"none of the brokers {sorted(nodes)} answers")
        await asyncio.sleep(1.0)
        with contextlib.suppress(KafkaError):
            await client.force_metadata_update()


def credentials(settings: Settings) -> Any:
    """The same connection settings in Faust's terms (it passes them on to its aiokafka clients)."""
    context = settings.ssl_context()
    if settings.security_protocol.startswith("SASL"):
        return faust.SASLCredentials(username=settings.sasl_username, password=settings.sasl_password,
                                     mechanism=settings.sasl_mechanism, ssl_context=context)
    if context is not None:
        return faust.SSLCredentials(context)
    return None


# -- running it --------------------------------------------------------------------------------------------


def quiet_loggers(level: str) -> None:
    """Faust leaves its loggers at DEBUG and filters in the handler: building the records costs CPU."""
    numeric = getattr(logging, level.upper(), logging.WARNING)
    for name in ("", "faust", "mode", "aiokafka", "kafka", "rocksdict", "streams"):
        logging.getLogger(name).setLevel(numeric)


def run_worker(settings: Settings, extend: Callable[[StreamsApp], None] | None = None) -> int:
    """Run the worker until it is stopped; `extend` adds to the app first (the CLI adds the web views)."""
    quiet_loggers(settings.log_level)
    try:
        layout = asyncio.run(prepare_topics(settings))
    except ConfigurationError as e:
        print(f"streams worker: {e}", file=sys.stderr)
        return EX_CONFIG
    except Exception as e:
        print(f"streams worker: cannot reach Kafka at {settings.brokers}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    app = create_app(settings, layout)
    if extend is not None:
        extend(app)
    worker = faust.Worker(app, loglevel=settings.log_level.upper(), quiet=True, redirect_stdouts=False)
    quiet_loggers(settings.log_level)
    tune_gc()
    worker.execute_from_commandline()
    return 0


_app: faust.App | None = None


def __getattr__(name: str) -> Any:
    """`faust -A streams.worker.app worker`: the app, built on first use from the environment's settings."""
    global _app
    if name != "app":
        raise AttributeError(name)
    if _app is None:
        _app = from_environment()
    return _app


def from_environment() -> StreamsApp:
    """The app as `faust -A` finds it: settings from STREAMS_* variables, topics prepared at import."""
    settings = Settings.from_env()
    return create_app(settings, asyncio.run(prepare_topics(settings)))
