"""A table partition's device states during one batch of the worker: the state transaction the enrich step
reads and writes, and how far the stored states hold the partition's inputs.

Lives here: `PartitionState` (reads see the batch's own writes; each changed device is encoded once per batch,
with its persons part and the marks of how far it holds the inputs; clean entries stay in a bounded cache shared
by the partitions, devices with nothing stored too), `Applied` (the partition's marks, stored beside its
states) and `FORWARDED` (the key of a forwarded log's mark). Quix Streams' per-checkpoint state transaction
is the model: RocksDB and the changelog are written once per key per batch (`streams.worker.stages.commit`).

Knows the codec and a RocksDB database's `get`/`write`; knows nothing of Kafka or Faust.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from streams import codec
from streams.identity import DeviceState, Reason, Rejected
from streams.persons import DevicePersons
from streams.state.keys import APPLIED_KEY

log = logging.getLogger(__name__)


class PartitionDB(Protocol):
    """What a batch needs of one partition's RocksDB database (rocksdict.Rdict)."""

    def get(self, key: Any) -> Any: ...  # a key, or a list of keys (one multi-get: a list of values)

    def write(self, batch: Any) -> None: ...


class StateCounters(Protocol):
    """Where the partition's reads are counted (the worker's `Counters`)."""

    cache_hits: int
    cache_misses: int
    unreadable_states: int


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
                 cache_size: int, counters: StateCounters, applied: Applied | None = None) -> None:
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

