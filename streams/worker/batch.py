"""The worker's batch step: a fetched batch of Kafka records through the enrich step, with the device table
written once per device per batch and nothing acknowledged before what it depends on is durable.

Lives here: `Pipeline.process(batch)`, the routing of records that sit in the wrong partition, the
per-partition state transaction over the Faust table's RocksDB databases, and the order of side effects:

1. decode and route: a record keyed by its device ID in the partition that ID hashes to is applied here;
   any other record is forwarded, unchanged, to the repartition topic, keyed by device ID;
2. enrich each applied record (reads see the batch's own writes), skipping those whose effect the device's
   stored state already holds (they were applied, and their outputs delivered, before a crash);
   (at-least-once, once forwarded records reach a partition: first its plan, how far the batch goes in the raw
   and repartition logs, to the changelog and RocksDB; `Pipeline._order`)
3. produce outputs, dead letters and forwards as whole record batches, and wait for all acks;
4. per partition, in one transaction of its own producer: each changed device's state, the partition's
   applied marks (`Applied`) and the persons stage's messages. Its next owner opens that producer before
   reading anything of the partition, which fences this worker's writes, also those still in flight: a
   worker cut off from the network past the session timeout, told it lost its partitions only once back,
   writes no state over its successor's;
5. write the same states, and the changelog offset, to RocksDB in one write batch;
6. commit the input offsets.
A crash anywhere replays the batch from the last commit: outputs repeat byte for byte (the engine is
deterministic and reads the state as it was), and records the stored state already holds are skipped.

Exactly-once (`PartitionProducers` given): steps 3, 4 and 6 become one Kafka transaction per partition
number, through that partition's own transactional producer: its outputs, forwards and dead letters, its
changelog records and its input offsets are committed together or not at all, and readers that read
committed see nothing of a batch a crash cut short. Step 5 follows the commit; a crash before it leaves
RocksDB behind the changelog, which Faust's recovery reads back on restart.

Knows Kafka records and the producer; knows nothing of Faust's App (`streams.worker.app` wires it in).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from aiokafka.structs import TopicPartition

from streams import codec
from streams.enrich import Enricher
from streams.identity import DeviceState, Reason, Rejected, device_id_of
from streams.kafka.keyhash import KeyHashes
from streams.kafka.transactions import PartitionProducers
from streams.persons import DevicePersons, UserIds
from streams.state.keys import APPLIED_KEY, PLAN_KEY
from streams.state.pairs import StoredPairs
from streams.worker.persons_stage import (
    OWNER,
    STATS_KEY,
    PartitionPersons,
    PersonsCounters,
    Route,
    kind_of,
    stored_stats,
)

log = logging.getLogger(__name__)

# where a forwarded record came from: kept in a header, so that its dead letter, its position and its
# record identity are those of the original
SOURCE_HEADER = "streams-source"


class KafkaRecord(Protocol):
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]]


class PartitionDB(Protocol):
    """What the pipeline needs of one partition's RocksDB database (rocksdict.Rdict)."""

    def get(self, key: Any) -> Any: ...  # a key, or a list of keys (one multi-get: a list of values)

    def write(self, batch: Any) -> None: ...


# (key, value, headers) of a message to produce
Message = tuple[bytes | None, bytes | None, list[tuple[str, bytes]] | None]  # value None: a tombstone
# one input partition's records in a batch: (tp, records); tp None when the batch has none
Part = tuple[Any, Sequence[KafkaRecord]]
_NONE: Part = (None, ())


def _box(outbox: dict[tuple[str, int], list[Message]], topic: str, partition: int) -> list[Message]:
    box = outbox.get((topic, partition))
    if box is None:
        box = outbox[(topic, partition)] = []
    return box


def _put(outbox: dict[tuple[str, int], list[Message]], topic: str, partition: int, message: Message) -> None:
    _box(outbox, topic, partition).append(message)


@dataclass
class Counters:
    records_in: int = 0
    enriched_out: dict[str, int] = field(default_factory=dict)
    dead_letters: dict[str, int] = field(default_factory=dict)
    forwarded: int = 0
    skipped: int = 0
    batches: int = 0
    failed_batches: int = 0  # done again from their start (a send, a write or a transaction failed)
    transactions: int = 0  # committed (exactly-once)
    state_writes: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    unreadable_states: int = 0  # stored device states that could not be decoded (their records: dead letters)
    latency_sum: float = 0.0
    last_record_age: float = 0.0

    def add(self, batch: Counters) -> None:
        self.records_in += batch.records_in
        _merge(self.enriched_out, batch.enriched_out)
        _merge(self.dead_letters, batch.dead_letters)
        self.forwarded += batch.forwarded
        self.skipped += batch.skipped
        self.batches += batch.batches
        self.state_writes += batch.state_writes
        self.latency_sum += batch.latency_sum
        if batch.last_record_age:
            self.last_record_age = batch.last_record_age


def _merge(into: dict[str, int], more: dict[str, int]) -> None:
    for k, n in more.items():
        into[k] = into.get(k, 0) + n


@dataclass
class Applied:
    """How far a table partition's stored device states hold its inputs, stored and changelogged with them
    (under `APPLIED_KEY`): what a batch read again after a crash skips. Per partition rather than per device:
    a device's records reach it by two logs, and a record that changed nothing must be skipped too once a
    later record of the other log has changed the device.

    raw: the next offset of the raw partition not yet applied.
    forwarded: per raw partition q, the offset (in q) of the last record forwarded from q that was applied;
      forwards from q arrive in q's order, so anything at or below it is a copy (forwarded again after a crash).
    foreign: the next offset of the repartition partition not yet applied, for records without our header."""

    raw: int = 0
    foreign: int = 0
    forwarded: dict[int, int] = field(default_factory=dict)

    @classmethod
    def stored(cls, data: Any) -> Applied:
        if not isinstance(data, bytes):
            return cls()
        try:
            raw, foreign, forwarded = codec.decode_applied(data)
        except Exception as e:
            # never a reason to stop the partition: the device states keep their own marks
            log.error("the partition's applied offsets cannot be read (%s); starting from none", type(e).__name__)
            return cls()
        return cls(raw, foreign, forwarded)

    def encoded(self) -> bytes:
        return codec.encode_applied(self.raw, self.foreign, self.forwarded)

    def snapshot(self, partition: int) -> dict[int, int]:
        """The marks as a device state stores them (`watermark_key`): the last offset applied per log."""
        marks = {FORWARDED + q: o for q, o in self.forwarded.items()}
        if self.raw:
            marks[partition] = self.raw - 1
        if self.foreign:
            marks[-1 - partition] = self.foreign - 1
        return marks


# A device state stores, with itself, how far its partition's inputs had been applied when it was written: the
# last offset per log, under p for the raw partition p, FORWARDED + q for records forwarded from raw partition q,
# and -1 - p for records found in repartition partition p without our header. A record at or below its log's
# mark is in the state already (or changed nothing before it). It is written atomically with the state, where
# `Applied` is written beside the states of a batch and a crash can leave it behind some of them
FORWARDED = 1 << 32


# a cache lookup's answer when the device is not in the cache (None there means: nothing stored)
_MISSING: Any = object()
# a device's stored state, how far it holds its partition's inputs, and its persons part
Entry = tuple[DeviceState, dict[int, int], "DevicePersons | None"]


class PartitionState:
    """One table partition's device states during a batch: a `StateStore` for the enrich step, and how far
    the stored states hold the partition's inputs.

    The shared cache also remembers devices with nothing stored (value None): at a million devices most
    records are of such devices (a track stores nothing), and each would otherwise cost a RocksDB read."""

    def __init__(self, partition: int, db: PartitionDB, cache: OrderedDict[tuple[int, str], Any],
                 cache_size: int, counters: Counters, applied: Applied | None = None) -> None:
        self.partition = partition
        self.db = db
        self.cache = cache
        self.cache_size = cache_size
        self.counters = counters
        self.dirty: dict[str, Entry] = {}
        self.applied = applied if applied is not None else Applied.stored(db.get(APPLIED_KEY))
        self.forwarded_applied = False
        self.written = 0  # device states made durable in this batch
        # the last device loaded and its entry: a record asks for its device twice (the step's get and put),
        # and a device with nothing stored would cost a RocksDB read each time
        self._last_id: str | None = None
        self._last: Entry | None = None

    def load(self, device_id: str) -> Entry | None:
        if device_id == self._last_id:
            return self._last
        entry = self._load(device_id)
        self._last_id, self._last = device_id, entry
        return entry

    def _load(self, device_id: str) -> Entry | None:
        entry = self.dirty.get(device_id)
        if entry is not None:
            return entry
        key = (self.partition, device_id)
        cached = self.cache.get(key, _MISSING)
        if cached is not _MISSING:
            self.counters.cache_hits += 1
            self.cache.move_to_end(key)
            return cached  # type: ignore[no-any-return]
        self.counters.cache_misses += 1
        data = self.db.get(device_id.encode())
        entry = self._decode(device_id, data) if isinstance(data, bytes) else None
        self._remember(device_id, entry)
        return entry

    def _decode(self, device_id: str, data: bytes) -> Entry:
        try:
            return codec.decode_full(data)
        except Exception as e:
            # reported, and the record kept as a dead letter; the stored bytes stay for an operator to look at.
            # Never retried: the same bytes would fail again and stop the partition
            self.counters.unreadable_states += 1
            log.error("partition %d: a stored device state cannot be read (%s); the device's records become "
                      "dead letters", self.partition, type(e).__name__)
            raise Rejected(Reason.UNREADABLE_STATE, "device_id",
                           f"the device's stored state cannot be read ({type(e).__name__}); the record is kept "
                           "and the stored state left as it is") from e

    def prefetch(self, device_ids: Iterable[str]) -> None:
        """Read, in one RocksDB multi-get, the states of those devices that are neither in the batch's writes
        nor in the cache (the devices of a batch, before it runs), and cache them."""
        partition, cache, dirty = self.partition, self.cache, self.dirty
        wanted = [d for d in dict.fromkeys(device_ids) if d not in dirty and (partition, d) not in cache]
        if not wanted:
            return
        # more than the cache holds would evict what was just read: read them when they come instead
        wanted = wanted[:self.cache_size]
        try:
            keys = [d.encode() for d in wanted]
        except UnicodeEncodeError:
            return  # a lone surrogate: such a record is refused before any state is read
        self.counters.cache_misses += len(wanted)
        decode = codec.decode_full
        for device_id, data in zip(wanted, self.db.get(keys), strict=True):
            if not isinstance(data, bytes):
                self._remember(device_id, None)
                continue
            try:
                entry = decode(data)
            except Exception:
                continue  # not cached: the record's own read reports it (an unreadable_state dead letter)
            self._remember(device_id, entry)

    def get(self, device_id: str) -> DeviceState | None:
        entry = self.load(device_id)
        return None if entry is None else entry[0]

    def holds(self, device_id: str, key: int, offset: int) -> bool:
        """Whether the device's stored state says it holds the record at `offset` of the log `key`."""
        entry = self.load(device_id)
        return entry is not None and entry[1].get(key, -1) >= offset

    def put(self, device_id: str, state: DeviceState) -> None:
        entry = self.load(device_id)
        self.dirty[device_id] = self._last = (state, self.applied.snapshot(self.partition),
                                              entry[2] if entry is not None else None)
        self._last_id = device_id

    def persons(self, device_id: str) -> DevicePersons | None:
        entry = self.load(device_id)
        return None if entry is None else entry[2]

    def put_persons(self, device_id: str, persons: DevicePersons) -> None:
        """The device's persons part, stored with its state (a device with nothing stored gets its first)."""
        entry = self.load(device_id)
        state = entry[0] if entry is not None else DeviceState.new(device_id)
        self.dirty[device_id] = self._last = (state, self.applied.snapshot(self.partition), persons or None)
        self._last_id = device_id

    @property
    def changed(self) -> bool:
        """Whether the batch has something to make durable: changed states, or forwarded records applied. A
        record forwarded twice (its raw partition read again after a crash) is two records in the repartition
        log; the second must be known as a copy even when nothing has been written since the first."""
        return bool(self.dirty) or self.forwarded_applied

    def encoded(self) -> list[tuple[bytes, bytes]]:
        """The changed states, and how far they hold the inputs."""
        items = [(d.encode(), codec.encode_state(s, a, p)) for d, (s, a, p) in self.dirty.items()]
        items.append((APPLIED_KEY, self.applied.encoded()))
        return items

    def committed(self) -> None:
        self.written += len(self.dirty)
        self.forwarded_applied = False
        for device_id, entry in self.dirty.items():
            self._remember(device_id, entry)
        self.dirty.clear()

    def _remember(self, device_id: str, entry: Entry | None) -> None:
        key = (self.partition, device_id)
        self.cache[key] = entry
        self.cache.move_to_end(key)
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)


@dataclass
class BatchResult:
    commit: dict[Any, int]  # tp -> the next offset, for what the batch applied
    rewind: dict[Any, int]  # tp -> the offset to fetch again: records held back for a later batch


class BatchFailed(Exception):
    """Part of a batch was not committed: `tps` are the input partitions to fetch again (with exactly-once,
    the transactions of the batch's other partitions may have committed)."""

    def __init__(self, tps: set[Any], cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.tps = tps
        self.cause = cause


@dataclass(frozen=True)
class Topics:
    raw: str
    repartition: str
    enriched: str
    dead_letter: str
    changelog: str
    partitions: int
    # the output topics' partition counts (the worker creates them like the raw topic; existing ones may differ)
    enriched_partitions: int = 0
    dead_letter_partitions: int = 0
    # the persons stage (None: off): its repartition topic (claims keyed by pair, mappings keyed by user ID,
    # owners' answers keyed by device ID), its table's changelog, the persons topic and its partition count
    persons_repartition: str | None = None
    persons_changelog: str | None = None
    persons: str | None = None
    persons_partitions: int = 0


class Pipeline:
    def __init__(
        self,
        enricher: Enricher,
        topics: Topics,
        producer: Callable[[], Awaitable[Any]],
        db_for_partition: Callable[[int], PartitionDB],
        write_batch: Callable[[Iterable[tuple[bytes, bytes | None]]], Any],
        changelog_offset_key: bytes,
        cache_size: int = 100_000,
        transactions: PartitionProducers | None = None,
        exactly_once: bool = False,
        group: str = "",
        partitioner: str = "murmur2",
        persons_db_for_partition: Callable[[int], PartitionDB] | None = None,
    ) -> None:
        self.enricher = enricher
        self.topics = topics
        self.producer = producer  # the started aiokafka producer
        self.db_for_partition = db_for_partition
        self.write_batch = write_batch
        self.offset_key = changelog_offset_key
        # one transactional producer per owned partition, in both modes: a partition's state is written in its
        # producer's transactions, so that whoever owns it next fences every write of this worker's still in
        # flight (`streams.kafka.transactions`). Exactly-once puts the partition's outputs and input offsets in them too
        self.transactions = transactions
        self.exactly_once = exactly_once
        self.group = group
        # (partition, device ID) -> (state, applied offsets), or None: nothing stored (see PartitionState)
        self.cache: OrderedDict[tuple[int, str], Any] = OrderedDict()
        self.cache_size = cache_size
        self.counters = Counters()
        # (topic, partition) -> the next offset to process: what the lag metric measures against
        self.positions: dict[tuple[str, int], int] = {}
        self.key_hashes = KeyHashes(200_000, partitioner)
        self.applied: dict[int, Applied] = {}  # per owned table partition, as of the last batch
        # the persons stage (`streams.worker.persons_stage`): on when its topics are named and its table given
        self.persons_db_for_partition = persons_db_for_partition if topics.persons_repartition else None
        self.user_ids = UserIds(enricher.settings.person_salt)
        self.person_stats: dict[int, dict[str, int]] = {}  # per owned partition, as of the last batch
        self.persons_counters = PersonsCounters()

    def key_hash(self, device_id: str) -> int:
        """The producers' partitioner's hash of the key (`streams.kafka.partitioners`), cached: murmur2 is Python
        and would otherwise run for every record sent."""
        return self.key_hashes.get(device_id)

    def prepare(self, batch: Mapping[Any, Sequence[KafkaRecord]], states: dict[int, PartitionState]) -> None:
        """Before a batch runs: hash its devices together and read their states with one multi-get per
        partition, from the records' keys (a raw record is keyed by its device ID). Only caches are filled:
        a record keyed otherwise finds its device hashed and read when it comes."""
        keys: dict[int, list[str]] = {}
        for tp, records in batch.items():
            if tp.topic == self.topics.persons_repartition:
                # of the persons stage's messages, only the owners' answers are keyed by a device ID
                records = [rec for rec in records if kind_of(rec.headers) == OWNER]
            # a key that is no UTF-8 is no device ID: what it decodes to (with U+FFFD) is read in vain, and
            # the record is refused or forwarded
            keys.setdefault(tp.partition, []).extend(
                [rec.key.decode(errors="replace") for rec in records if rec.key is not None])
        self.key_hashes.prepare(d for found in keys.values() for d in found)
        n = self.topics.partitions
        for p, found in keys.items():
            hash_of = self.key_hashes.get
            # only the devices that belong here: a record in the wrong partition is forwarded, not applied
            states[p].prefetch(d for d in found if hash_of(d) % n == p)

    def partition_for(self, device_id: str) -> int:
        """The partition of the table (and of the raw topic) this device belongs to."""
        return self.key_hash(device_id) % self.topics.partitions

    def forget_partitions(self, partitions: Iterable[int]) -> None:
        """A partition left this worker: its cached states may go stale under its next owner."""
        gone = set(partitions)
        for p in gone:
            self.applied.pop(p, None)
            self.person_stats.pop(p, None)
        for key in [k for k in self.cache if k[0] in gone]:
            del self.cache[key]

    async def send_all(self, outbox: Mapping[tuple[str, int], list[Message]],
                       producer: Any = None) -> list[tuple[Any, int]]:
        """Produce each (topic, partition)'s messages as whole record batches: one append per record into
        aiokafka's batch builder, instead of one `send` (a coroutine, a future, a partitioner) per record.
        Returns each batch's future with its record count."""
        if producer is None:
            producer = await self.producer()
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

    async def process(self, batch: Mapping[Any, Sequence[KafkaRecord]],
                      positions: Mapping[tuple[str, int], int] | None = None,
                      ends: Mapping[tuple[str, int], int] | None = None,
                      quarantine: bool = False) -> BatchResult:
        """Apply one fetched batch; returns the offsets to commit (tp -> next offset) and the records held back
        for a later batch (tp -> offset to fetch again). Raises when a send fails: nothing of the batch is then
        written or committed, and the caller seeks back. `positions`: the consumer's position in each input
        partition, (topic, partition) -> next offset; `ends`: each one's end offset (high watermark) as the
        consumer last saw it. `quarantine`: every record becomes an `internal_error`
        dead letter, the state untouched (a record that made its batch fail on its own)."""
        started = time.monotonic()
        t = self.topics
        enricher_step = self.enricher.step
        # what to produce, per owner and (topic, partition), in order: sent as whole batches once the records
        # are applied. The owner is the input partition number whose transaction carries it (exactly-once);
        # at-least-once has one producer and one owner
        outboxes: dict[int, dict[tuple[str, int], list[Message]]] = {}
        transactional = self.exactly_once
        # at-least-once: per partition, what its state transaction carries besides the changelogs (the persons
        # stage's messages); exactly-once's transaction carries the partition's whole outbox
        fenced: dict[int, dict[tuple[str, int], list[Message]]] = {}
        states: dict[int, PartitionState] = {}
        commit: dict[Any, int] = {}
        rewind: dict[Any, int] = {}
        plans: dict[int, bytes] = {}
        # this batch's counts, added to the worker's only when the batch completed: a batch done again after
        # a failure or a rebalance is counted once
        counters = Counters()
        max_bytes = self.enricher.settings.max_record_bytes
        enriched_partitions = t.enriched_partitions or t.partitions
        dead_partitions = t.dead_letter_partitions or t.partitions
        parts = _by_partition(batch, t.raw, t.persons_repartition)
        persons: dict[int, PartitionPersons] = {}
        persons_counters = PersonsCounters()
        for p in parts:
            state = states[p] = PartitionState(p, self.db_for_partition(p), self.cache, self.cache_size,
                                               self.counters, self.applied.get(p))
            # kept from batch to batch (dropped with the partition's cache when a batch fails): a batch that
            # changes no state writes none, and the next state written must hold what it applied too
            self.applied[p] = state.applied
            if self.persons_db_for_partition is not None:
                persons[p] = self._persons_for(p, persons_counters)
        self.prepare(batch, states)

        # Steps 1 and 2: route, skip what the state holds, enrich; per table partition, the raw topic's
        # records before the repartition topic's
        for p, (direct, forwarded, messages) in parts.items():
            state = states[p]
            stage = persons.get(p)
            if not transactional:
                direct, forwarded, plan = self._order(p, state.db, direct, forwarded, positions or {}, ends or {},
                                                      rewind)
                if plan is not None:
                    plans[p] = plan
            owner = p if transactional else 0
            outbox = outboxes.get(owner)
            if outbox is None:
                outbox = outboxes[owner] = {}
            applied = state.applied
            # the persons stage's messages say what holds now: a late copy from a worker that lost the partition
            # would undo what its next owner said since, so they travel with the state, fenced
            state_box = outbox if transactional else fenced.setdefault(p, {})

            def send(topic: str, partition: int, message: Message, outbox: dict[tuple[str, int], list[Message]]
                     = state_box) -> None:
                _put(outbox, topic, partition, message)

            for (tp, records), from_raw in ((direct, True), (forwarded, False)):
                for rec in records:
                    counters.records_in += 1
                    raw = rec.value if rec.value is not None else b""
                    source: dict[str, Any] = {"topic": rec.topic, "partition": rec.partition, "offset": rec.offset}
                    device_id = None
                    try:
                        if from_raw:
                            if rec.offset < applied.raw:
                                counters.skipped += 1
                                continue
                            applied.raw = rec.offset + 1
                            watermark, offset = p, rec.offset
                        else:
                            origin, source = _original_source(rec)
                            if origin is None:
                                if rec.offset < applied.foreign:
                                    counters.skipped += 1
                                    continue
                                applied.foreign = rec.offset + 1
                                watermark, offset = -1 - p, rec.offset
                            else:
                                if origin[1] <= applied.forwarded.get(origin[0], -1):
                                    counters.skipped += 1
                                    continue
                                applied.forwarded[origin[0]] = origin[1]
                                state.forwarded_applied = True
                                watermark, offset = FORWARDED + origin[0], origin[1]
                        if quarantine:
                            raise Rejected(Reason.INTERNAL_ERROR, "", "the worker failed on this record alone; "
                                           "kept as it was, the device's state untouched")
                        record = codec.decode(raw, max_bytes)
                        device_id = device_id_of(record)
                        key = device_id.encode()
                        if from_raw and (rec.key != key or self.partition_for(device_id) != p):
                            header = f"{t.raw}/{p}/{rec.offset}".encode()
                            _put(outbox, t.repartition, self.partition_for(device_id),
                                 (key, raw, [(SOURCE_HEADER, header)]))
                            counters.forwarded += 1
                            continue
                        if state.holds(device_id, watermark, offset):
                            counters.skipped += 1
                            continue
                        outcome = enricher_step(raw, source, state, record)
                        h = self.key_hash(device_id)
                        if outcome.dead_letter is not None:
                            _put(outbox, t.dead_letter, h % dead_partitions, (key, outcome.dead_letter, None))
                            reason = outcome.reason or "internal_error"
                            counters.dead_letters[reason] = counters.dead_letters.get(reason, 0) + 1
                        if outcome.records:
                            box = _box(outbox, t.enriched, h % enriched_partitions)
                            for out in outcome.records:
                                box.append((key, out, None))
                            if stage is not None:
                                stage.observe(state, outcome, send)
                        for kind in outcome.types:
                            counters.enriched_out[kind] = counters.enriched_out.get(kind, 0) + 1
                    except Exception as e:
                        # bad input found outside the enrich step (a bad device ID, a stored state that cannot be
                        # read, a forwarded record's header), or a defect of ours: the record is kept, the
                        # partition goes on
                        if not isinstance(e, Rejected):
                            log.error("internal error on a record in partition %d (%s); kept as a dead letter", p,
                                      type(e).__name__)
                            e = Rejected(Reason.INTERNAL_ERROR, "", type(e).__name__)
                        letter = codec.dead_letter(e, raw, source, device_id)
                        target = (self.key_hash(device_id) if device_id is not None else rec.partition)
                        _put(outbox, t.dead_letter, target % dead_partitions,
                             (device_id.encode() if device_id is not None else None, letter, None))
                        counters.dead_letters[e.reason.value] = counters.dead_letters.get(e.reason.value, 0) + 1
                if records:
                    commit[tp] = records[-1].offset + 1
                    self.positions[(tp.topic, p)] = records[-1].offset + 1
                    timestamp = getattr(records[0], "timestamp", None)
                    if timestamp:
                        counters.last_record_age = max(0.0, time.time() - timestamp / 1000)
            tp, records = messages
            if records:
                if stage is not None:
                    for rec in records:
                        self._persons_message(stage, state, rec, send, quarantine)
                commit[tp] = records[-1].offset + 1
                self.positions[(tp.topic, p)] = records[-1].offset + 1
            if stage is not None:
                stage.finish(state, send)

        if self.exactly_once:
            await self._commit_transactions(outboxes, states, commit, persons)
        else:
            await self._commit_at_least_once(outboxes.get(0, {}), states, plans, persons, fenced)
        for p, stage in persons.items():
            self.person_stats[p] = stage.stats
        self.persons_counters.add(persons_counters)
        counters.batches = 1
        counters.state_writes = sum(s.written for s in states.values())
        counters.latency_sum = time.monotonic() - started
        self.counters.add(counters)
        return BatchResult(commit, rewind)

    def _persons_for(self, p: int, counters: PersonsCounters) -> PartitionPersons:
        assert self.persons_db_for_partition is not None
        t = self.topics
        assert t.persons_repartition is not None and t.persons is not None
        db = self.persons_db_for_partition(p)
        stats = self.person_stats.get(p)
        if stats is None:
            stats = stored_stats(db.get(STATS_KEY))
        route = Route(t.persons_repartition, t.persons, t.partitions, t.persons_partitions or t.partitions,
                      self.key_hash)
        return PartitionPersons(p, self.enricher.settings, self.user_ids, route, StoredPairs(cast(Any, db)),
                                dict(stats), counters)

    def _persons_message(self, stage: PartitionPersons, state: PartitionState, rec: KafkaRecord,
                         send: Callable[[str, int, Message], None], quarantine: bool) -> None:
        """A record of the persons repartition topic. Ours alone write it: one that cannot be read is logged and
        counted, never a reason to stop the partition."""
        try:
            if quarantine:
                raise RuntimeError("the worker failed on this message alone")
            kind = kind_of(rec.headers)
            if kind is None or rec.key is None or rec.value is None:
                raise ValueError("not a persons message")
            stage.apply(state, kind, rec.key, rec.value, send)
        except Exception as e:
            stage.counters.unreadable += 1
            log.error("partition %d: persons message at offset %d skipped (%s: %s)", rec.partition, rec.offset,
                      type(e).__name__, str(e)[:200])

    def _order(self, p: int, db: PartitionDB, direct: Part, forwarded: Part, positions: Mapping[tuple[str, int], int],
               ends: Mapping[tuple[str, int], int], rewind: dict[Any, int]) -> tuple[Part, Part, bytes | None]:
        """At-least-once: which of partition p's records this batch may apply, and the plan to make durable
        before its outputs.

        A device's records reach it by two logs, the raw partition and the repartition partition, and the
        order in which the two interleave decides its state. Outputs are sent before the state is made
        durable, so after a crash in between the same records are applied again, and must meet the same
        states: the same `record_id` must carry the same bytes. So once forwarded records reach p, each batch
        first records how far it goes in both logs (the plan, in the changelog, before any output). Until both
        logs are past the plan's ends, a later batch applies exactly the plan's records, in the same order
        (raw ones first), and holds back the rest. A partition that never receives a forwarded record never
        writes a plan."""
        t = self.topics
        raw_next = direct[1][0].offset if direct[1] else positions.get((t.raw, p))
        forwarded_next = forwarded[1][0].offset if forwarded[1] else positions.get((t.repartition, p))
        stored = _decode_plan(db.get(PLAN_KEY))
        if stored is None:
            if not forwarded[1]:
                return direct, forwarded, None
            # the first forwarded records: batches before wrote no plan, and any raw record they may have sent
            # outputs for (before a crash) must come before them. Every such record is below the raw log's end
            raw_high = ends.get((t.raw, p))
            if raw_high is None or forwarded_next is None:
                return direct, _upto(forwarded, -1, rewind), None
            return direct, _upto(forwarded, -1, rewind), _encode_plan(raw_high, forwarded_next)
        raw_end, forwarded_end = stored
        if raw_next is None or raw_next < raw_end or forwarded_next is None or forwarded_next < forwarded_end:
            direct = _upto(direct, raw_end, rewind)
            raw_after = direct[1][-1].offset + 1 if direct[1] else raw_next
            if raw_after is None or raw_after < raw_end:
                # the plan's raw records are not all applied yet: its forwarded ones wait for them
                forwarded = _upto(forwarded, -1, rewind)
            else:
                forwarded = _upto(forwarded, forwarded_end, rewind)
            return direct, forwarded, None
        raw_after = direct[1][-1].offset + 1 if direct[1] else raw_next
        forwarded_after = forwarded[1][-1].offset + 1 if forwarded[1] else forwarded_next
        return direct, forwarded, _encode_plan(raw_after, forwarded_after)

    async def _commit_at_least_once(self, outbox: dict[tuple[str, int], list[Message]],
                                    states: dict[int, PartitionState], plans: dict[int, bytes],
                                    persons: dict[int, PartitionPersons],
                                    fenced: dict[int, dict[tuple[str, int], list[Message]]]) -> None:
        """Outputs through the shared producer, each partition's state in a transaction of its own producer.

        A worker cut off from the network loses its partitions without being told, and its writes in flight
        (in its client, or in its kernel's socket buffers) land once the network is back, after the next owner
        has started. A late enriched record, dead letter or forward is a byte-identical copy of one the next
        owner writes too; a late state record would be read back over the next owner's (by a restore, a
        standby, or the compaction that keeps the last record of a key). Opening a partition's transactional
        producer fences its previous owner's (`on_partitions_assigned`), so the state of a worker that lost the
        partition never lands; its transaction fails, and it rejoins the group. Readers of the changelogs read
        committed records only."""
        if plans:
            # durable before any output of the batch: what a batch done again after a crash must apply
            await self._transactions({p: {(self.topics.changelog, p): [(PLAN_KEY, plan, None)]}
                                      for p, plan in plans.items()})
            for p, plan in plans.items():
                states[p].db.write(self.write_batch([(PLAN_KEY, plan)]))
        # Step 3: every output acknowledged before any state that depends on it is made durable
        if outbox:
            await _acked(await self.send_all(outbox))
        # Steps 4 and 5: per partition, the changelogs and the persons messages in one transaction, then RocksDB
        # with the changelog offset
        boxes: dict[int, dict[tuple[str, int], list[Message]]] = {}
        writes: dict[int, tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes | None]]]] = {}
        for p in states:
            state, stage = states[p], persons.get(p)
            encoded = state.encoded() if state.changed else []
            pairs = stage.encoded() if stage is not None else []
            box = fenced.get(p) or {}
            if not (encoded or pairs or box):
                continue
            box = dict(box)
            if encoded:
                box[(self.topics.changelog, p)] = [(k, v, None) for k, v in encoded]
            if pairs:
                box.update(self._pairs_changelog({p: pairs}))
            boxes[p] = box
            writes[p] = (encoded, pairs)

        def written(p: int, sent: list[tuple[Any, int]]) -> None:
            encoded, pairs = writes[p]
            if encoded:
                self._write_state(states[p], encoded, _last_offsets(sent, self.topics.changelog)[p] + 1)
            if pairs:
                self._write_pairs(p, pairs, _last_offsets(sent, self.topics.persons_changelog or "")[p] + 1)

        await self._transactions(boxes, written)

    async def _transactions(self, boxes: Mapping[int, dict[tuple[str, int], list[Message]]],
                            then: Callable[[int, list[tuple[Any, int]]], None] | None = None) -> None:
        """At-least-once: each partition's messages in one transaction of its producer, side by side; `then(p,
        sent)` once p's has committed. Raises the first failure (the caller does the whole batch again: what
        committed is skipped as applied)."""
        if not boxes:
            return

        async def one(p: int) -> None:
            sent = await self._in_transaction(p, boxes[p])
            if then is not None:
                then(p, sent)

        results = await asyncio.gather(*(one(p) for p in sorted(boxes)), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        for failure in failures:
            if isinstance(failure, asyncio.CancelledError):
                raise failure
        if failures:
            raise failures[0]

    async def _in_transaction(self, p: int, outbox: dict[tuple[str, int], list[Message]],
                              offsets: dict[Any, int] | None = None) -> list[tuple[Any, int]]:
        """The messages (and, exactly-once, the input offsets) in one transaction of partition p's producer."""
        if self.transactions is None:
            raise RuntimeError("no transactional producers: the worker's state cannot be fenced")
        producer = self.transactions.producer(p)
        try:
            await producer.begin_transaction()
            sent = await self.send_all(outbox, producer)
            await _acked(sent)
            if offsets:
                await producer.send_offsets_to_transaction(
                    {TopicPartition(tp.topic, tp.partition): o for tp, o in offsets.items()}, self.group)
            await producer.commit_transaction()
            self.counters.transactions += 1
        except BaseException:
            # no abort: a fenced or broken producer cannot; the next producer opened for p (this worker's once
            # the group confirms it owns p, or the next owner's) makes the broker abort what was left open
            await self.transactions.lose(p)
            raise
        return sent

    def _pairs_changelog(self, pairs: Mapping[int, list[tuple[bytes, bytes | None]]]
                         ) -> dict[tuple[str, int], list[Message]]:
        topic = self.topics.persons_changelog
        assert topic is not None or not pairs
        return {(cast(str, topic), p): [(k, v, None) for k, v in items] for p, items in pairs.items()}

    def _write_pairs(self, p: int, items: list[tuple[bytes, bytes | None]], changelog_offset: int) -> None:
        assert self.persons_db_for_partition is not None
        self.persons_db_for_partition(p).write(
            self.write_batch([*items, (self.offset_key, str(changelog_offset).encode())]))  # None: a deletion

    async def _commit_transactions(self, outboxes: dict[int, dict[tuple[str, int], list[Message]]],
                                   states: dict[int, PartitionState], commit: dict[Any, int],
                                   persons: dict[int, PartitionPersons]) -> None:
        """One transaction per input partition number; they run side by side and fail alone."""
        owners = sorted(set(outboxes) | {tp.partition for tp in commit})
        results = await asyncio.gather(
            *(self._commit_partition(p, outboxes.get(p, {}), states.get(p),
                                     {tp: o for tp, o in commit.items() if tp.partition == p}, persons.get(p))
              for p in owners),
            return_exceptions=True)
        failed: set[Any] = set()
        cause: BaseException | None = None
        for p, result in zip(owners, results, strict=True):
            if isinstance(result, BaseException):
                cause = cause or result
                failed.update(tp for tp in commit if tp.partition == p)
        if cause is not None:
            if isinstance(cause, asyncio.CancelledError):
                raise cause
            raise BatchFailed(failed, cause)

    async def _commit_partition(self, p: int, outbox: dict[tuple[str, int], list[Message]],
                                state: PartitionState | None, offsets: dict[Any, int],
                                stage: PartitionPersons | None) -> None:
        encoded = state.encoded() if state is not None and state.changed else []
        if encoded:
            outbox = {**outbox, (self.topics.changelog, p): [(k, v, None) for k, v in encoded]}
        pairs = stage.encoded() if stage is not None else []
        if pairs:
            outbox = {**outbox, **self._pairs_changelog({p: pairs})}
        sent = await self._in_transaction(p, outbox, offsets)
        if state is not None and encoded:
            # the changelog partition is written only by this partition's transactions, each closed by one
            # commit marker right after its last record: recording the marker's offset as the one RocksDB
            # holds lets recovery start after it (and a changelog that ends in a marker be seen as read)
            self._write_state(state, encoded, _last_offsets(sent, self.topics.changelog)[p] + 1)
        if pairs:
            self._write_pairs(p, pairs, _last_offsets(sent, self.topics.persons_changelog or "")[p] + 1)

    def _write_state(self, state: PartitionState, items: list[tuple[bytes, bytes]], changelog_offset: int) -> None:
        state.db.write(self.write_batch([*items, (self.offset_key, str(changelog_offset).encode())]))
        state.committed()


def _retrieved(future: Any) -> None:
    if not future.cancelled():
        future.exception()


async def _acked(sent: list[tuple[Any, int]]) -> None:
    """Wait for every batch's ack; raise the first failure (having waited for, and so retrieved, them all)."""
    results = await asyncio.gather(*(f for f, _ in sent), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


def _last_offsets(sent: list[tuple[Any, int]], topic: str) -> dict[int, int]:
    """The offset of the last record produced to `topic`, per partition, from (batch future, record count)."""
    last: dict[int, int] = {}
    for future, count in sent:
        meta = future.result()  # of a whole batch: the offset of its first record
        if meta.topic == topic:
            last[meta.partition] = max(last.get(meta.partition, -1), meta.offset + count - 1)
    return last


def _original_source(rec: KafkaRecord) -> tuple[tuple[int, int] | None, dict[str, Any]]:
    """A repartitioned record's origin (raw partition, offset), None when it was not forwarded by us, and its
    source: the raw record it was forwarded from, else its own place."""
    for name, value in rec.headers or ():
        if name == SOURCE_HEADER:
            topic, partition, offset = value.decode().rsplit("/", 2)
            return (int(partition), int(offset)), {"topic": topic, "partition": int(partition), "offset": int(offset)}
    return None, {"topic": rec.topic, "partition": rec.partition, "offset": rec.offset}


def _by_partition(batch: Mapping[Any, Sequence[KafkaRecord]], raw_topic: str,
                  persons_topic: str | None = None) -> dict[int, tuple[Part, Part, Part]]:
    """Per table partition, its raw records, its repartitioned ones and its persons messages; (None, []) where
    there are none."""
    out: dict[int, tuple[Part, Part, Part]] = {}
    for tp, records in batch.items():
        direct, forwarded, persons = out.get(tp.partition, (_NONE, _NONE, _NONE))
        if tp.topic == raw_topic:
            direct = (tp, records)
        elif tp.topic == persons_topic:
            persons = (tp, records)
        else:
            forwarded = (tp, records)
        out[tp.partition] = (direct, forwarded, persons)
    return out


def _upto(part: Part, end: int, rewind: dict[Any, int]) -> Part:
    """The part's records before offset `end`; the rest is held back (fetched again later)."""
    tp, records = part
    if not records or records[-1].offset < end:
        return part
    kept = [r for r in records if r.offset < end]
    rewind[tp] = records[len(kept)].offset
    return tp, kept


def _encode_plan(raw_end: int, forwarded_end: int) -> bytes:
    return f"{raw_end},{forwarded_end}".encode()


def _decode_plan(data: Any) -> tuple[int, int] | None:
    if not isinstance(data, bytes):
        return None
    try:
        raw_end, forwarded_end = data.split(b",")
        return int(raw_end), int(forwarded_end)
    except ValueError:
        # damaged: taken as no plan (the first forwarded records then wait for the raw log's end, as the first
        # time), never as a reason to stop the partition
        log.error("the partition's batch plan cannot be read; starting a new one")
        return None
