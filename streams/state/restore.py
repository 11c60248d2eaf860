"""The device table rebuilt from its changelog a fetched batch at a time, straight into RocksDB.

Faust restores a table through its event path: each changelog record becomes a Message, then an Event put
on a queue, taken off it by the recovery service, buffered, and written a thousand at a time. That costs tens
of microseconds a record, minutes for millions of devices. Here the records the consumer fetched for a
changelog partition (of an active partition in recovery, or of a standby) are written as they come: one
RocksDB `WriteBatch` per partition and fetch, whose last entry is Faust's persisted changelog offset (the
store's `offset_key`), so that the states and the offset they reach are written together.

What stays Faust's: the partition assignment, which partitions are active and which standby, where reading
starts (the persisted offset), when recovery is complete, and the changelog's records themselves: with
exactly-once the consumer reads committed records only, so nothing of an aborted transaction is applied,
and commit markers are never records.

Lives here: `RestoreCounters` and `write_records`; `streams.worker.recovery.MarkerAwareRecovery` calls them.
Knows rocksdict and Kafka records; knows nothing of Faust's App.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from rocksdict import WriteBatch

# False: every changelog record takes Faust's own path (the benchmark measures that path against this one)
BATCHED = True


class ChangelogRecord(Protocol):
    offset: int
    key: bytes | None
    value: bytes | None


class PartitionStore(Protocol):
    """What is needed of Faust's RocksDB store (faust.stores.rocksdb.Store)."""

    offset_key: bytes

    def _db_for_partition(self, partition: int) -> Any: ...


@dataclass
class RestoreCounters:
    """Changelog records written to this worker's RocksDB, by role ("active": rebuilding a partition this
    worker now owns; "standby": keeping a copy of another worker's), and per partition rebuilt the offset of
    the last one."""

    records: dict[str, int] = field(default_factory=lambda: {"active": 0, "standby": 0})
    batches: int = 0
    seconds: float = 0.0
    offsets: dict[int, int] = field(default_factory=dict)
    # per partition, the changelog offset its last rebuild as an active partition started after (-1: the
    # beginning): a partition taken over from a standby copy starts where that copy had got to
    started_after: dict[int, int] = field(default_factory=dict)


def write_records(store: PartitionStore, partition: int, records: Sequence[ChangelogRecord]) -> int:
    """Write one partition's changelog records (in offset order) and the offset of the last one in one
    write batch; a record without a value is a deletion, as in Faust. Returns the offset written."""
    batch = WriteBatch(raw_mode=True)
    put, delete = batch.put, batch.delete
    for rec in records:
        key = rec.key
        if key is None:
            continue  # no table write makes one; Faust could not apply it either
        value = rec.value
        if value is None:
            delete(key)
        else:
            put(key, value)
    last = records[-1].offset
    put(store.offset_key, str(last).encode())
    store._db_for_partition(partition).write(batch)
    return last


def newer_than(records: Sequence[ChangelogRecord], seen: int | None) -> Sequence[ChangelogRecord]:
    """The records after offset `seen` (a seek back can fetch some again)."""
    if seen is None or not records or records[0].offset > seen:
        return records
    return [r for r in records if r.offset > seen]
