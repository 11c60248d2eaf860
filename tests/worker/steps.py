"""The worker's batch step over the fakes of `tests/fakes.py`: its topics, a worker that owns every partition,
its consumer loop with crashes, and the mixed-keying input the crash suites feed it."""

from __future__ import annotations

import random
from collections import defaultdict

import orjson

from streams.enrich import Enricher
from streams.state.keys import OFFSET_KEY
from streams.worker.batch import Pipeline
from streams.worker.names import Topics
from tests.fakes import DB, Broker, Record
from tests.fakes import recover as recover_partition
from tests.fakes import run_worker as fake_worker

T = Topics(raw="raw", repartition="raw-repartition", enriched="enriched", dead_letter="dead", changelog="changelog",
           partitions=3)


def new_broker(rng: random.Random, failure_rate: float = 0.0) -> Broker:
    """A send to the changelog or the enriched topic fails with probability `failure_rate`."""
    return Broker(rng, failure_rate, fail_on={T.changelog, T.enriched})


def pipeline(broker: Broker, dbs: dict[int, DB]) -> Pipeline:
    """A new worker that owns every partition: nothing in memory, its partitions' producers opened."""
    async def producer() -> Broker:
        return broker

    return Pipeline(Enricher(), T, producer, db_for_partition=lambda p: dbs[p], write_batch=list,
                    changelog_offset_key=OFFSET_KEY, cache_size=50, transactions=broker.producers(T.partitions))


def fresh(seed: int = 0) -> tuple[Broker, dict[int, DB], Pipeline]:
    """A broker, the partitions' databases and a new worker over them."""
    broker = Broker(random.Random(seed))
    dbs: dict[int, DB] = defaultdict(DB)
    return broker, dbs, pipeline(broker, dbs)


def run_worker(broker: Broker, rng: random.Random, *, steps: int = 5_000) -> int:
    """The raw and repartition topics consumed in batches of random sizes, crashes and all (`fakes.run_worker`)."""
    dbs: dict[int, DB] = defaultdict(DB)
    return fake_worker(broker, rng, lambda: pipeline(broker, dbs), lambda: recover(broker, dbs),
                       (T.raw, T.repartition), T.partitions, take=4, steps=steps)


def recover(broker: Broker, dbs: dict[int, DB]) -> None:
    for p in range(T.partitions):
        recover_partition(broker, dbs[p], T.changelog, p, OFFSET_KEY)


def mixed_input(rng: random.Random, devices: int, per_device: int) -> list[tuple[bytes | None, bytes]]:
    """Each device: a login and tracks, about half sent without key (so in a random partition)."""
    lines = []
    for d in range(devices):
        for i in range(per_device):
            action = {"action": "login", "id": f"u{d}-{i}"} if i % 3 == 1 else {"event": f"e{i}"}
            record = {"device_id": f"dev-{d}", "platform": "web", **action}
            keyed = rng.random() < 0.5
            lines.append((f"dev-{d}".encode() if keyed else None, orjson.dumps(record)))
    rng.shuffle(lines)
    return lines


def produce(broker: Broker, lines: list[tuple[bytes | None, bytes]], rng: random.Random) -> None:
    probe = pipeline(broker, {})
    for key, value in lines:
        p = probe.partition_for(key.decode()) if key is not None else rng.randrange(T.partitions)
        log = broker.logs[(T.raw, p)]
        log.append(Record(T.raw, p, len(log), key, value))


def outputs(broker: Broker) -> dict[str, list[bytes]]:
    copies: dict[str, list[bytes]] = defaultdict(list)
    for p in range(T.partitions):
        for rec in broker.logs[(T.enriched, p)]:
            assert rec.value is not None
            copies[orjson.loads(rec.value)["record_id"]].append(rec.value)
    return copies
