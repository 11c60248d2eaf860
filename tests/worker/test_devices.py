"""The device stage: a stored state that cannot be read makes its records dead letters, never a stall; a device
named like Faust's offset key is an ordinary device."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from streams.state.keys import OFFSET_KEY
from tests.fakes import TP, Record
from tests.worker.steps import T, fresh


@pytest.mark.parametrize("stored", [b"1234", b"[9, null]", b"\xff\xfe", b"[1,2,3,4,5,6,7,8,9]"])
def test_a_stored_state_that_cannot_be_read_is_a_dead_letter_not_a_stall(stored: bytes) -> None:
    broker, dbs, worker = fresh(0)
    records = {}
    for device in ("__faust\x00offset__", "dev-b"):
        p = worker.partition_for(device)
        dbs[p][device.encode()] = stored
        value = orjson.dumps({"device_id": device, "platform": "web", "event": "e"})
        records.setdefault(TP(T.raw, p), []).append(Record(T.raw, p, len(records.get(TP(T.raw, p), [])),
                                                           device.encode(), value))
    asyncio.run(worker.process(records, {}))
    letters = [orjson.loads(r.value or b"") for p in range(T.partitions) for r in broker.logs[(T.dead_letter, p)]]
    assert sorted(d["device_id"] for d in letters) == ["__faust\x00offset__", "dev-b"]
    assert {(d["reason"], d["field"]) for d in letters} == {("unreadable_state", "device_id")}
    assert worker.counters.unreadable_states == 2
    assert not any(broker.logs[(T.enriched, p)] for p in range(T.partitions))


def test_a_device_named_like_fausts_offset_key_is_an_ordinary_device() -> None:
    broker, dbs, worker = fresh(0)
    device = "__faust\x00offset__"
    p = worker.partition_for(device)
    value = orjson.dumps({"device_id": device, "platform": "web", "action": "login", "id": "u1"})
    asyncio.run(worker.process({TP(T.raw, p): [Record(T.raw, p, 0, device.encode(), value)]}, {}))
    (out,) = broker.logs[(T.enriched, p)]
    assert orjson.loads(out.value or b"")["login_id"] == "u1"
    assert OFFSET_KEY in dbs[p] and device.encode() in dbs[p]
