"""The worker's batch step: a fetched batch of Kafka records through the enrich step, with the device table
written once per device per batch and nothing acknowledged before what it depends on is durable.

Lives here: `Pipeline.process(batch)`, the routing of records that sit in the wrong partition, the
per-partition state transaction over the Faust table's RocksDB databases, and the order of side effects:

1. decode and route: a record keyed by its device ID in the partition that ID hashes to is applied here;
   any other record is forwarded, unchanged, to the repartition topic, keyed by device ID;
2. enrich each applied record (reads see the batch's own writes), skipping those whose effect the device's
   stored state already holds (they were applied, and their outputs delivered, before a crash);
3. produce outputs, dead letters and forwards as whole record batches, and wait for all acks;
4. produce each changed device's state to the changelog once, and wait for the acks;
5. write the same states, and the changelog offset, to RocksDB in one write batch;
6. commit the input offsets.
A crash anywhere replays the batch from the last commit: outputs repeat byte for byte (the engine is
deterministic and reads the state as it was), and records the stored state already holds are skipped.

Exactly-once (`PartitionProducers` given): steps 3, 4 and 6 become one Kafka transaction per partition
number, through that partition's own transactional producer: its outputs, forwards and dead letters, its
changelog records and its input offsets are committed together or not at all, and readers that read
committed see nothing of a batch a crash cut short. Step 5 follows the commit; a crash before it leaves
RocksDB behind the changelog, which Faust's recovery reads back on restart.

Knows Kafka records and the producer; knows nothing of Faust's App (`streams.app` wires it in).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiokafka.structs import TopicPartition

from . import codec
from .enrich import Enricher
from .identity import DeviceState, Rejected, device_id_of
from .keyhash import KeyHashes
from .transactions import PartitionProducers

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
Message = tuple[bytes | None, bytes, list[tuple[str, bytes]] | None]


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


# a cache lookup's answer when the device is not in the cache (None there means: nothing stored)
_MISSING: Any = object()


class PartitionState:
    """One table partition's device states during a batch: a `StateStore` for the enrich step that also
    remembers, per device, up to which raw offset (per source partition) its state holds.

    The shared cache also remembers devices with nothing stored (value None): at a million devices most
    records are of such devices (a track stores nothing), and each would otherwise cost a RocksDB read."""

    def __init__(self, partition: int, db: PartitionDB, cache: OrderedDict[tuple[int, str], Any],
                 cache_size: int, counters: Counters) -> None:
        self.partition = partition
        self.db = db
        self.cache = cache
        self.cache_size = cache_size
        self.counters = counters
        self.dirty: dict[str, tuple[DeviceState, dict[int, int]]] = {}
        self.position: tuple[int, int] = (0, -1)  # (source partition, offset) of the record being applied
        self.written = 0  # device states made durable in this batch
        # the last device loaded and its entry: a record asks for its device up to three times (holds, the
        # step's get, put), and a device with nothing stored would cost a RocksDB read each time
        self._last_id: str | None = None
        self._last: tuple[DeviceState, dict[int, int]] | None = None

    def load(self, device_id: str) -> tuple[DeviceState, dict[int, int]] | None:
        if device_id == self._last_id:
            return self._last
        entry = self._load(device_id)
        self._last_id, self._last = device_id, entry
        return entry

    def _load(self, device_id: str) -> tuple[DeviceState, dict[int, int]] | None:
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
        entry = codec.decode_stored(data) if isinstance(data, bytes) else None
        self._remember(device_id, entry)
        return entry

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
        decode = codec.decode_stored
        for device_id, data in zip(wanted, self.db.get(keys), strict=True):
            self._remember(device_id, decode(data) if isinstance(data, bytes) else None)

    def holds(self, device_id: str, source_partition: int, offset: int) -> bool:
        entry = self.load(device_id)
        return entry is not None and entry[1].get(source_partition, -1) >= offset

    def get(self, device_id: str) -> DeviceState | None:
        entry = self.load(device_id)
        return None if entry is None else entry[0]

    def put(self, device_id: str, state: DeviceState) -> None:
        entry = self.load(device_id)
        applied = dict(entry[1]) if entry is not None else {}
        source_partition, offset = self.position
        applied[source_partition] = offset
        self.dirty[device_id] = self._last = (state, applied)
        self._last_id = device_id

    def encoded(self) -> list[tuple[bytes, bytes]]:
        return [(d.encode(), codec.encode_state(s, a)) for d, (s, a) in self.dirty.items()]

    def committed(self) -> None:
        self.written += len(self.dirty)
        for device_id, entry in self.dirty.items():
            self._remember(device_id, entry)
        self.dirty.clear()

    def _remember(self, device_id: str, entry: tuple[DeviceState, dict[int, int]] | None) -> None:
        key = (self.partition, device_id)
        self.cache[key] = entry
        self.cache.move_to_end(key)
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)


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


class Pipeline:
    def __init__(
        self,
        enricher: Enricher,
        topics: Topics,
        producer: Callable[[], Awaitable[Any]],
        db_for_partition: Callable[[int], PartitionDB],
        write_batch: Callable[[Iterable[tuple[bytes, bytes]]], Any],
        changelog_offset_key: bytes,
        cache_size: int = 100_000,
        transactions: PartitionProducers | None = None,
        group: str = "",
    ) -> None:
        self.enricher = enricher
        self.topics = topics
        self.producer = producer  # the started aiokafka producer
        self.db_for_partition = db_for_partition
        self.write_batch = write_batch
        self.offset_key = changelog_offset_key
        self.transactions = transactions  # exactly-once: one transactional producer per owned partition
        self.group = group
        # (partition, device ID) -> (state, applied offsets), or None: nothing stored (see PartitionState)
        self.cache: OrderedDict[tuple[int, str], Any] = OrderedDict()
        self.cache_size = cache_size
        self.counters = Counters()
        # (topic, partition) -> the next offset to process: what the lag metric measures against
        self.positions: dict[tuple[str, int], int] = {}
        self.key_hashes = KeyHashes(200_000)

    def key_hash(self, device_id: str) -> int:
        """Kafka's default partitioner's hash of the key (murmur2, as the Java client), cached: it is Python
        and would otherwise run for every record sent."""
        return self.key_hashes.get(device_id)

    def prepare(self, batch: Mapping[Any, Sequence[KafkaRecord]], states: dict[int, PartitionState]) -> None:
        """Before a batch runs: hash its devices together and read their states with one multi-get per
        partition, from the records' keys (a raw record is keyed by its device ID). Only caches are filled:
        a record keyed otherwise finds its device hashed and read when it comes."""
        keys: dict[int, list[str]] = {}
        for tp, records in batch.items():
            # a key that is no UTF-8 is no device ID: what it decodes to (with U+FFFD) is read in vain, and
            # the record is refused or forwarded
            keys.setdefault(tp.partition, []).extend(
                [rec.key.decode(errors="replace") for rec in records if rec.key is not None])
        self.key_hashes.prepare(d for found in keys.values() for d in found)
        n = self.topics.partitions
        for p, found in keys.items():
            state = states.get(p)
            if state is None:
                state = states[p] = PartitionState(p, self.db_for_partition(p), self.cache, self.cache_size,
                                                   self.counters)
            hash_of = self.key_hashes.get
            # only the devices that belong here: a record in the wrong partition is forwarded, not applied
            state.prefetch(d for d in found if hash_of(d) % n == p)

    def partition_for(self, device_id: str) -> int:
        """The partition of the table (and of the raw topic) this device belongs to."""
        return self.key_hash(device_id) % self.topics.partitions

    def forget_partitions(self, partitions: Iterable[int]) -> None:
        """A partition left this worker: its cached states may go stale under its next owner."""
        gone = set(partitions)
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
        return sent

    async def process(self, batch: Mapping[Any, Sequence[KafkaRecord]]) -> dict[Any, int]:
        """Apply one fetched batch; returns the offsets to commit (tp -> next offset). Raises when a send
        fails: nothing of the batch is then written or committed, and the caller seeks back."""
        started = time.monotonic()
        t = self.topics
        enricher_step = self.enricher.step
        # what to produce, per owner and (topic, partition), in order: sent as whole batches once the records
        # are applied. The owner is the input partition number whose transaction carries it (exactly-once);
        # at-least-once has one producer and one owner
        outboxes: dict[int, dict[tuple[str, int], list[Message]]] = {}
        transactional = self.transactions is not None
        states: dict[int, PartitionState] = {}
        commit: dict[Any, int] = {}
        # this batch's counts, added to the worker's only when the batch completed: a batch done again after
        # a failure or a rebalance is counted once
        counters = Counters()
        max_bytes = self.enricher.settings.max_record_bytes
        enriched_partitions = t.enriched_partitions or t.partitions
        dead_partitions = t.dead_letter_partitions or t.partitions
        self.prepare(batch, states)

        # Steps 1 and 2: route, skip what the state holds, enrich
        for tp, records in batch.items():
            p = tp.partition
            state = states.get(p)
            if state is None:
                state = states[p] = PartitionState(p, self.db_for_partition(p), self.cache, self.cache_size,
                                                   self.counters)
            from_raw = tp.topic == t.raw
            owner = p if transactional else 0
            outbox = outboxes.get(owner)
            if outbox is None:
                outbox = outboxes[owner] = {}
            for rec in records:
                counters.records_in += 1
                raw = rec.value if rec.value is not None else b""
                if from_raw:
                    source_partition, offset = p, rec.offset
                    source = {"topic": t.raw, "partition": p, "offset": rec.offset}
                else:
                    source_partition, offset, source = _original_source(rec, t.raw)
                try:
                    record = codec.decode(raw, max_bytes)
                    device_id = device_id_of(record)
                except Rejected as e:
                    letter = codec.dead_letter(e, raw, source)
                    _put(outbox, t.dead_letter, rec.partition % dead_partitions, (None, letter, None))
                    counters.dead_letters[e.reason.value] = counters.dead_letters.get(e.reason.value, 0) + 1
                    continue
                key = device_id.encode()
                if from_raw and (rec.key != key or self.partition_for(device_id) != p):
                    header = f"{t.raw}/{p}/{rec.offset}".encode()
                    _put(outbox, t.repartition, self.partition_for(device_id), (key, raw, [(SOURCE_HEADER, header)]))
                    counters.forwarded += 1
                    continue
                if state.holds(device_id, source_partition, offset):
                    counters.skipped += 1
                    continue
                state.position = (source_partition, offset)
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
                for kind in outcome.types:
                    counters.enriched_out[kind] = counters.enriched_out.get(kind, 0) + 1
            if records:
                commit[tp] = records[-1].offset + 1
                self.positions[(tp.topic, p)] = records[-1].offset + 1
                timestamp = getattr(records[0], "timestamp", None)
                if timestamp:
                    counters.last_record_age = max(0.0, time.time() - timestamp / 1000)

        if self.transactions is not None:
            await self._commit_transactions(outboxes, states, commit)
        else:
            await self._commit_at_least_once(outboxes.get(0, {}), states)
        counters.batches = 1
        counters.state_writes = sum(s.written for s in states.values())
        counters.latency_sum = time.monotonic() - started
        self.counters.add(counters)
        return commit

    async def _commit_at_least_once(self, outbox: dict[tuple[str, int], list[Message]],
                                    states: dict[int, PartitionState]) -> None:
        # Step 3: every output acknowledged before any state that depends on it is made durable
        if outbox:
            await _acked(await self.send_all(outbox))
        # Steps 4 and 5: the changelog, then RocksDB with the changelog offset, per partition
        changed = {p: s for p, s in states.items() if s.dirty}
        if changed:
            encoded = {p: s.encoded() for p, s in changed.items()}
            sent = await self.send_all({(self.topics.changelog, p): [(k, v, None) for k, v in items]
                                        for p, items in encoded.items()})
            await _acked(sent)
            last = _last_offsets(sent, self.topics.changelog)
            for p, items in encoded.items():
                self._write_state(states[p], items, last[p])

    async def _commit_transactions(self, outboxes: dict[int, dict[tuple[str, int], list[Message]]],
                                   states: dict[int, PartitionState], commit: dict[Any, int]) -> None:
        """One transaction per input partition number; they run side by side and fail alone."""
        owners = sorted(set(outboxes) | {tp.partition for tp in commit})
        results = await asyncio.gather(
            *(self._commit_partition(p, outboxes.get(p, {}), states.get(p),
                                     {tp: o for tp, o in commit.items() if tp.partition == p})
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
                                state: PartitionState | None, offsets: dict[Any, int]) -> None:
        assert self.transactions is not None
        producer = self.transactions.producer(p)
        encoded = state.encoded() if state is not None and state.dirty else []
        if encoded:
            outbox = {**outbox, (self.topics.changelog, p): [(k, v, None) for k, v in encoded]}
        await producer.begin_transaction()
        try:
            sent = await self.send_all(outbox, producer)
            await _acked(sent)
            await producer.send_offsets_to_transaction(
                {TopicPartition(tp.topic, tp.partition): o for tp, o in offsets.items()}, self.group)
            await producer.commit_transaction()
            self.counters.transactions += 1
        except BaseException:
            # no abort: a fenced or broken producer cannot; the next producer opened for p (this worker's once
            # the group confirms it owns p, or the next owner's) makes the broker abort what was left open
            await self.transactions.lose(p)
            raise
        if state is not None and encoded:
            # the changelog partition is written only by this partition's transactions, each closed by one
            # commit marker right after its last record: recording the marker's offset as the one RocksDB
            # holds lets recovery start after it (and a changelog that ends in a marker be seen as read)
            self._write_state(state, encoded, _last_offsets(sent, self.topics.changelog)[p] + 1)

    def _write_state(self, state: PartitionState, items: list[tuple[bytes, bytes]], changelog_offset: int) -> None:
        state.db.write(self.write_batch([*items, (self.offset_key, str(changelog_offset).encode())]))
        state.committed()


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


def _original_source(rec: KafkaRecord, raw_topic: str) -> tuple[int, int, dict[str, Any]]:
    for name, value in rec.headers or ():
        if name == SOURCE_HEADER:
            topic, partition, offset = value.decode().rsplit("/", 2)
            return int(partition), int(offset), {"topic": topic, "partition": int(partition), "offset": int(offset)}
    # not forwarded by us: take it as its own source (its position is then the repartition topic's)
    source = {"topic": rec.topic, "partition": rec.partition, "offset": rec.offset}
    return -1 - rec.partition, rec.offset, source
