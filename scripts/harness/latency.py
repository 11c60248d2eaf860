"""make bench's latency: the worker's added latency at a fixed lower input rate, output append time minus input
append time, record by record (the latency input carries each record's number as `bench_seq`).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer, ConsumerRecord

from harness.bench_run import Names, Plan
from harness.broker import HarnessError, Kafka, scan_topic
from harness.measure import wait_consumed, worker_child
from streams.kafka.clients import device_key


@dataclass
class Latency:
    rate: float  # achieved input rate, records/s (broker append times)
    seconds: float
    samples: int
    p50: float
    p99: float
    max: float
    worker_cpu: float  # the worker's CPU use over the paced window, in cores


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


async def measure_latency(kafka: Kafka, names: Names, plan: Plan, src: Path, warmup: int) -> Latency:
    """The worker's added latency at a fixed input rate: broker append time of the output record minus that
    of the raw record it came from, matched by the `bench_seq` property the latency input carries."""
    raw, enriched, dead = (names.topic(f"latency.{t}") for t in ("raw", "enriched", "dead-letter"))
    await kafka.create_topics([raw, enriched, dead])
    with open(src, "rb") as f:
        lines = [line.rstrip(b"\n") for line in f]
    child = worker_child(kafka, names, "latency", raw, enriched, dead)
    group = names.group("latency")
    producer = AIOKafkaProducer(bootstrap_servers=kafka.brokers, acks="all", linger_ms=5)
    await producer.start()
    try:
        # warm up: the worker has joined its group and processed something before the clock starts
        await asyncio.gather(*[await producer.send(raw, v, key=device_key(v)) for v in lines[:warmup]])
        await wait_consumed(kafka, child, group, raw, warmup, [enriched, dead], None)
        paced = lines[warmup:]
        started = time.monotonic()
        cpu_before, wall_before = child.cpu_at(time.time()), time.time()
        pending: list[asyncio.Future[Any]] = []
        for i, value in enumerate(paced):
            delay = started + i / plan.latency_rate - time.monotonic()
            if delay > 0.001:
                await asyncio.sleep(delay)
            pending.append(await producer.send(raw, value, key=device_key(value)))
            if len(pending) >= 1000:  # drop delivered ones without waiting for the rest (no pacing stall)
                for delivery in pending:
                    if delivery.done():
                        delivery.result()
                pending = [d for d in pending if not d.done()]
        await asyncio.gather(*pending)
        wall_after = time.time()
        worker_cpu = (child.cpu_at(wall_after) - cpu_before) / (wall_after - wall_before)
        await wait_consumed(kafka, child, group, raw, len(lines), [enriched, dead], None)
    finally:
        await producer.stop()
    child.stop()

    def seq_of(value: bytes | None) -> int | None:
        try:
            props = orjson.loads(value or b"").get("properties")
        except (orjson.JSONDecodeError, AttributeError):
            return None
        seq = props.get("bench_seq") if isinstance(props, dict) else None
        return seq if isinstance(seq, int) and seq >= warmup else None

    sent: dict[int, int] = {}
    received: dict[int, int] = {}

    def stamp_into(into: dict[int, int]) -> Any:
        def on_record(r: ConsumerRecord) -> None:
            seq = seq_of(r.value)
            if seq is not None:
                into[seq] = r.timestamp
        return on_record

    await scan_topic(kafka.brokers, raw, stamp_into(sent))
    await scan_topic(kafka.brokers, enriched, stamp_into(received))
    latencies = sorted(float(t - sent[s]) for s, t in received.items() if s in sent)
    if not latencies:
        raise HarnessError("latency: no output record could be matched to its input")
    span = (max(sent.values()) - min(sent.values())) / 1000
    return Latency(len(sent) / span if span else 0.0, span, len(latencies), percentile(latencies, 0.5),
                   percentile(latencies, 0.99), latencies[-1], worker_cpu)
