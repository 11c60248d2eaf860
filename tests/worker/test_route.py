"""The route stage: a record tried alone after its batch failed is kept, not skipped; quarantine keeps every record
as an internal error."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict

import orjson
import pytest

from tests.fakes import DB, TP, Broker, Crash, Record
from tests.worker.steps import T, pipeline


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
