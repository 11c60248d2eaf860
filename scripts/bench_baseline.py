"""The baseline of `make bench`: the worker a user would write with stock Faust around our engine.

One event at a time (`stream.events()`), the device state in a Faust `Table` on its RocksDB store (a get and
a set per event, so a changelog record per event: `state = table[key]`, the engine, `table[key] = state`),
and an `await topic.send` per output. It calls the same engine as the worker (`Enricher.step`), through a
small store adapter that keeps `codec.encode_state` bytes in the table. Nothing here is tuned: this is what
the product is compared with.

Run by scripts/bench.py as a subprocess:  BENCH_* variables, then `python scripts/bench_baseline.py worker`.
"""

from __future__ import annotations

import os
from typing import Any

import faust

from streams import codec
from streams.enrich import Enricher
from streams.identity import DeviceState


def env(name: str, default: str | None = None) -> str:
    value = os.environ.get(f"BENCH_{name}", default)
    if value is None:
        raise SystemExit(f"bench_baseline: BENCH_{name} is not set")
    return value


PARTITIONS = int(env("PARTITIONS", "4"))

app = faust.App(
    env("GROUP"),
    broker=f"kafka://{env('BROKERS', '127.0.0.1:9092')}",
    store="rocksdb://",
    datadir=env("STATE_DIR"),
    # the table must be partitioned like its source topic; Faust's default would be 8
    topic_partitions=PARTITIONS,
    key_serializer="raw",
    value_serializer="raw",
    consumer_auto_offset_reset="earliest",
    web_port=int(env("WEB_PORT", "6066")),
    web_bind="127.0.0.1",
    web_host="127.0.0.1",
)

raw_topic = app.topic(env("RAW_TOPIC"), key_type=bytes, value_type=bytes)
enriched_topic = app.topic(env("ENRICHED_TOPIC"), key_type=bytes, value_type=bytes)
dead_letter_topic = app.topic(env("DEAD_LETTER_TOPIC"), key_type=bytes, value_type=bytes)
devices = app.Table("devices", partitions=PARTITIONS, key_type=bytes, value_type=bytes)


class TableStore:
    """The engine's StateStore over the Faust table: a table get per event, and a table set (a changelog
    send) per event through `write_back`, whether or not the state changed, as a stock agent written around
    `state = table[key]; ...; table[key] = state` does."""

    def __init__(self, table: Any) -> None:
        self.table = table
        self.latest: DeviceState | None = None

    def get(self, device_id: str) -> DeviceState | None:
        data = self.table.get(device_id.encode())
        self.latest = None if data is None else codec.decode_state(data)
        return self.latest

    def put(self, device_id: str, state: DeviceState) -> None:
        self.latest = state

    def write_back(self, device_id: str) -> None:
        state = self.latest if self.latest is not None else DeviceState.new(device_id)
        self.table[device_id.encode()] = codec.encode_state(state)


enricher = Enricher()
store = TableStore(devices)


@app.agent(raw_topic)
async def enrich(stream: faust.StreamT[Any]) -> None:
    async for event in stream.events():
        message = event.message
        source = {"topic": message.topic, "partition": message.partition, "offset": message.offset}
        outcome = enricher.step(event.value or b"", source, store)
        key = outcome.device_id.encode() if outcome.device_id is not None else None
        if outcome.dead_letter is not None:
            await dead_letter_topic.send(key=key, value=outcome.dead_letter)
        elif outcome.device_id is not None:
            store.write_back(outcome.device_id)
        for record in outcome.records:
            await enriched_topic.send(key=key, value=record)


if __name__ == "__main__":
    app.main()
