"""The route stage: each input record to where it is applied.

Per table partition, the raw topic's records, then the repartition topic's. A record whose effect the
partition's marks (`streams.state.transaction.Applied`) say is applied already is skipped (read again after a
crash); the marks move past the others as they go. A raw record keyed by its device ID, in the partition that
ID hashes to, goes on to the device stage; any other is forwarded unchanged to the repartition topic, keyed by
its device ID, with its origin in a header (its dead letter, its position and its record identity stay those
of the original). A record that cannot be decoded, or names no device, becomes a dead letter here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from streams import codec
from streams.identity import Reason, Rejected, device_id_of
from streams.state.transaction import FORWARDED
from streams.worker.send import put

if TYPE_CHECKING:
    from streams.worker.batch import Run
    from streams.worker.names import Topics

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


# one input partition's records in a batch: (tp, records); tp None when the batch has none
Part = tuple[Any, Sequence[KafkaRecord]]
_NONE: Part = (None, ())


@dataclass
class Routed:
    """A record that goes on to the device stage: decoded, its device ID, and the mark it is known by."""

    rec: KafkaRecord
    raw: bytes
    source: dict[str, Any]
    record: dict[str, Any]
    device_id: str
    key: bytes
    watermark: int  # the log's key in the device's stored marks
    offset: int  # the record's offset in that log


def by_partition(batch: Mapping[Any, Sequence[KafkaRecord]], topics: Topics) -> dict[int, tuple[Part, Part, Part]]:
    """Per table partition, its raw records, its repartitioned ones and its persons messages; (None, []) where
    there are none."""
    out: dict[int, tuple[Part, Part, Part]] = {}
    for tp, records in batch.items():
        direct, forwarded, persons = out.get(tp.partition, (_NONE, _NONE, _NONE))
        if tp.topic == topics.raw:
            direct = (tp, records)
        elif tp.topic == topics.persons_repartition:
            persons = (tp, records)
        else:
            forwarded = (tp, records)
        out[tp.partition] = (direct, forwarded, persons)
    return out


def records(run: Run, p: int) -> Iterator[Routed]:
    """Partition p's records that its device stage applies, in order (the raw topic's first)."""
    direct, forwarded, _ = run.parts[p]
    for part, from_raw in ((direct, True), (forwarded, False)):
        tp, recs = part
        yield from _route(run, p, recs, from_raw)
        run.read(tp, recs)
        if recs:
            timestamp = getattr(recs[0], "timestamp", None)
            if timestamp:
                run.counters.last_record_age = max(0.0, time.time() - timestamp / 1000)


def _route(run: Run, p: int, recs: Sequence[KafkaRecord], from_raw: bool) -> Iterator[Routed]:
    step, counters, t = run.step, run.counters, run.step.topics
    state = run.states[p]
    applied = state.applied
    max_bytes = step.enricher.settings.max_record_bytes
    outbox = run.outbox(p)
    for rec in recs:
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
                origin, source = original_source(rec)
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
            if run.quarantine:
                raise Rejected(Reason.INTERNAL_ERROR, "", "the worker failed on this record alone; "
                               "kept as it was, the device's state untouched")
            record = codec.decode(raw, max_bytes)
            device_id = device_id_of(record)
            key = device_id.encode()
            if from_raw and (rec.key != key or step.partition_for(device_id) != p):
                header = f"{t.raw}/{p}/{rec.offset}".encode()
                if len(raw) + len(key) + len(header) > codec.MAX_OUTPUT_BYTES:
                    # no broker with Kafka's default limits takes it, and retrying would stall the partition
                    raise Rejected(Reason.TOO_LARGE, "", f"{len(raw)} bytes: too large to forward to its "
                                   f"device's partition (keyed by another key than its device_id); the "
                                   f"largest record the worker sends is {codec.MAX_OUTPUT_BYTES} bytes")
                put(outbox, t.repartition, step.partition_for(device_id), (key, raw, [(SOURCE_HEADER, header)]))
                counters.forwarded += 1
                continue
        except Exception as e:
            dead_letter(run, p, e, raw, source, device_id, rec.partition)
            continue
        yield Routed(rec, raw, source, record, device_id, key, watermark, offset)


def dead_letter(run: Run, p: int, error: Exception, raw: bytes, source: dict[str, Any], device_id: str | None,
                partition: int) -> None:
    """Bad input found outside the enrich step (a bad device ID, a stored state that cannot be read, a forwarded
    record's header), or a defect of ours: the record is kept, the partition goes on."""
    if not isinstance(error, Rejected):
        log.error("internal error on a record in partition %d (%s); kept as a dead letter", p, type(error).__name__)
        error = Rejected(Reason.INTERNAL_ERROR, "", type(error).__name__)
    step, t = run.step, run.step.topics
    letter = codec.dead_letter(error, raw, source, device_id)
    target = step.key_hash(device_id) if device_id is not None else partition
    put(run.outbox(p), t.dead_letter, target % (t.dead_letter_partitions or t.partitions),
        (device_id.encode() if device_id is not None else None, letter, None))
    run.counters.dead_letter(error.reason.value)


def original_source(rec: KafkaRecord) -> tuple[tuple[int, int] | None, dict[str, Any]]:
    """A repartitioned record's origin (raw partition, offset), None when it was not forwarded by us, and its
    source: the raw record it was forwarded from, else its own place."""
    for name, value in rec.headers or ():
        if name == SOURCE_HEADER:
            topic, partition, offset = value.decode().rsplit("/", 2)
            return (int(partition), int(offset)), {"topic": topic, "partition": int(partition), "offset": int(offset)}
    return None, {"topic": rec.topic, "partition": rec.partition, "offset": rec.offset}
