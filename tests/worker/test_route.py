"""The route stage: a record tried alone after its batch failed is kept, not skipped; quarantine keeps every record
as an internal error."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict

import orjson
import pytest

from streams import codec
from streams.codec import DEFAULT_MAX_RECORD_BYTES
from tests.fakes import DB, TP, Broker, Crash, Record
from tests.worker.steps import T, fresh, pipeline


def test_quarantine_keeps_every_record_as_an_internal_error() -> None:
    broker = Broker(random.Random(0))
    worker = pipeline(broker, defaultdict(DB))
    value = orjson.dumps({"device_id": "dev-c", "platform": "web", "event": "e"})
    p = worker.partition_for("dev-c")
    result = asyncio.run(worker.process({TP(T.raw, p): [Record(T.raw, p, 0, b"dev-c", value)]}, {},
                                        quarantine=True))
    assert result.commit == {TP(T.raw, p): 1}
    (letter,) = [orjson.loads(r.value or b"") for q in range(T.partitions) for r in broker.logs[(T.dead_letter, q)]]
    assert letter["reason"] == "internal_error" and letter["raw"] == value.decode()
    assert not any(broker.logs[(T.changelog, q)] for q in range(T.partitions))


def test_a_record_tried_alone_after_a_failure_is_kept_not_skipped() -> None:
    """What the worker does with a record that fails on its own (`BatchConsumer._isolate`): the failed try
    advanced the partition's applied marks in memory only; once they are forgotten, quarantine keeps it."""
    broker = Broker(random.Random(0), failure_rate=1.0, fail_on={T.enriched})
    worker = pipeline(broker, defaultdict(DB))
    value = orjson.dumps({"device_id": "dev-e", "platform": "web", "event": "e"})
    p = worker.partition_for("dev-e")
    batch = {TP(T.raw, p): [Record(T.raw, p, 0, b"dev-e", value)]}
    with pytest.raises(Crash):
        asyncio.run(worker.process(batch, {}))
    broker.failure_rate = 0.0
    worker.forget_partitions([p])
    result = asyncio.run(worker.process(batch, {}, quarantine=True))
    assert result.commit == {TP(T.raw, p): 1}
    (letter,) = [orjson.loads(r.value or b"") for q in range(T.partitions) for r in broker.logs[(T.dead_letter, q)]]
    assert letter["reason"] == "internal_error"


def test_a_record_too_large_to_forward_is_a_dead_letter_not_a_stall() -> None:
    """Under the raw-record limit (1 MiB) but over what the worker sends: forwarding it would fail on every
    try, whole batch after whole batch. It is kept as a `too_large` dead letter, and the partition goes on."""
    broker, _, worker = fresh()
    p = worker.partition_for("dev-big")
    wrong = next(k for k in (f"key-{i}".encode() for i in range(100)) if worker.partition_for(k.decode()) == p)
    big = orjson.dumps({"device_id": "dev-big", "platform": "web", "event": "e",
                        "properties": {"blob": "x" * (codec.MAX_OUTPUT_BYTES + 10)}})
    assert codec.MAX_OUTPUT_BYTES < len(big) < DEFAULT_MAX_RECORD_BYTES
    small = orjson.dumps({"device_id": "dev-big", "platform": "web", "event": "e2"})
    batch = {TP(T.raw, p): [Record(T.raw, p, 0, wrong, big), Record(T.raw, p, 1, b"dev-big", small)]}
    result = asyncio.run(worker.process(batch, {}))
    assert result.commit == {TP(T.raw, p): 2}
    assert not any(broker.logs[(T.repartition, q)] for q in range(T.partitions))
    (letter,) = [orjson.loads(r.value or b"") for q in range(T.partitions) for r in broker.logs[(T.dead_letter, q)]]
    assert (letter["reason"], letter["raw_truncated"], letter["raw_bytes"]) == ("too_large", True, len(big))
    assert [orjson.loads(r.value or b"")["event"] for r in broker.logs[(T.enriched, p)]] == ["e2"]
