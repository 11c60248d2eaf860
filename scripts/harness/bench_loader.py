"""make bench's loader part: `python -m streams load` into a fresh DuckDB file, beside a bare consume of the same
topics (an aiokafka consumer with the loader's settings reading them to their end, doing nothing with the
records), one after the other, alternating; records/s of each and the ratio (target >= 0.5). The topics are the
worker's outputs of the main run, or (--loader-only) replay's outputs loaded into topics of their own.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path

import duckdb
import orjson
from aiokafka import TopicPartition

from harness import ROOT
from harness.bench_run import BENCH_DIR, PYTHON, Names, Run, step
from harness.broker import HarnessError, Kafka, batch_producer, keyed, partition_of, send_batches, worker_env
from harness.children import Child
from harness.inputs import generate, input_path
from harness.report import Result, fmt, ratio, table
from streams.config import Settings
from streams.kafka.admin import partition_count
from streams.warehouse import CHUNK_RECORDS
from streams.warehouse.load import FETCH_RECORDS, consumer

LOADER_PAIRS = 2  # a bare consume then a load, this many times: one pair's ratio moves with the machine's noise
LOADER_TARGET = 0.5
STALL_SECONDS = 60.0
LOAD_SUMMARY = re.compile(r"load: ([\d,]+) records into .* \((.*)\), [\d.]+s \(([\d,]+) records/s\)")
CONSUME_SUMMARY = re.compile(r"consume: ([\d,]+) records, ([\d.]+)s")


@dataclass(frozen=True)
class Sources:
    """The topics of one load, by the loader's settings."""

    enriched_topic: str
    dead_letter_topic: str
    persons_topic: str
    identity_changes_topic: str

    def topics(self) -> list[str]:
        return [getattr(self, f.name) for f in fields(self)]


def worker_sources(names: Names, label: str = "worker") -> Sources:
    """The outputs of the worker run `label` (the topics measure.worker_child gives it)."""
    return Sources(*(names.topic(f"{label}.{t}") for t in ("enriched", "dead-letter", "persons", "identity-changes")))


# -- the bare consume (a child process: scripts/bench.py --bare-consume BROKERS TOPIC,TOPIC...) ------------


async def bare_consume(brokers: str, topics: list[str]) -> tuple[int, float]:
    """Read the topics that exist from their beginning to the end offsets of the start, committed records only,
    as the loader's consumer does, and do nothing with the records. (records, seconds from the consumer's start:
    the loader's summary counts from there too.)"""
    settings = replace(Settings(), brokers=brokers)
    counts = {t: await partition_count(settings, t) for t in topics}
    partitions = [TopicPartition(t, p) for t, n in counts.items() for p in range(n or 0)]
    kafka = consumer(settings)
    started = time.monotonic()
    await kafka.start()
    try:
        kafka.assign(partitions)
        await kafka.seek_to_beginning(*partitions)
        ends = await kafka.end_offsets(partitions)
        left, records, moved = set(partitions), 0, time.monotonic()
        while left:
            batch = await kafka.getmany(timeout_ms=200, max_records=FETCH_RECORDS)
            if batch:
                records += sum(len(r) for r in batch.values())
                moved = time.monotonic()
            elif time.monotonic() - moved > STALL_SECONDS:
                raise HarnessError(f"the bare consume stalled at {records:,} records")
            left = {tp for tp in left if await kafka.position(tp) < ends[tp]}
        return records, time.monotonic() - started
    finally:
        await kafka.stop()


def bare_consume_main(brokers: str, topics: str) -> int:
    records, seconds = asyncio.run(bare_consume(brokers, topics.split(",")))
    print(f"consume: {records:,} records, {seconds:.3f}s ({records / seconds:,.0f} records/s)", flush=True)
    return 0


# -- the measurement --------------------------------------------------------------------------------------


@dataclass
class LoaderPair:
    consume: Result
    load: Result
    tables: str  # the loader's rows per table, as its summary says them
    rows: dict[str, int]  # the file's rows per table


async def _child(name: str, argv: list[str], sources: Sources, brokers: str, log: Path) -> tuple[Child, str]:
    settings = {"brokers": brokers, "log_level": "warning",
                **{f.name: getattr(sources, f.name) for f in fields(sources)}}
    child = Child(name, argv, worker_env(settings), log)
    code = await asyncio.to_thread(child.wait)
    if code != 0:
        raise HarnessError(f"{name} exited with {code}:\n{child.tail()}")
    return child, child.log.read_text()


async def measure_pair(names: Names, brokers: str, sources: Sources, label: str, i: int) -> LoaderPair:
    consume, said = await _child(f"bare consume {i}", [PYTHON, str(ROOT / "scripts" / "bench.py"), "--bare-consume",
                                                       brokers, ",".join(sources.topics())],
                                 sources, brokers, names.run_dir / f"{label}-consume-{i}.log")
    m = CONSUME_SUMMARY.search(said)
    if m is None:
        raise HarnessError(f"the bare consume said no summary:\n{said[-2000:]}")
    records, seconds = int(m.group(1).replace(",", "")), float(m.group(2))
    consumed = Result(f"bare consume ({i})", "all", records, seconds, consume.cpu_total, consume.peak_rss_mib,
                      "aiokafka, the loader's consumer settings, nothing done with the records")
    path = names.run_dir / f"{label}-{i}.duckdb"
    load, said = await _child(f"load {i}", [PYTHON, "-m", "streams", "load", "--into", str(path)], sources, brokers,
                              names.run_dir / f"{label}-load-{i}.log")
    m = LOAD_SUMMARY.search(said)
    if m is None:
        raise HarnessError(f"the load said no summary:\n{said[-2000:]}")
    loaded, rate = int(m.group(1).replace(",", "")), float(m.group(3).replace(",", ""))
    with duckdb.connect(str(path), read_only=True) as con:
        rows = {t: int(con.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0])  # type: ignore[index]
                for t in ("enriched", "enriched_identities", "dead_letters", "persons", "identity_changes")}
    size = path.stat().st_size / 2**20
    path.unlink()
    result = Result(f"python -m streams load ({i})", "all", loaded, loaded / rate if rate else 0.0, load.cpu_total,
                    load.peak_rss_mib, f"chunks of {CHUNK_RECORDS:,} records, a transaction each; "
                    f"a DuckDB file of {size:,.0f} MiB")
    return LoaderPair(consumed, result, m.group(2), rows)


async def measure_loader(names: Names, brokers: str, sources: Sources, what: str, pairs: int = LOADER_PAIRS,
                         label: str = "loader") -> tuple[list[str], list[str]]:
    """A bare consume then a load of `sources`, `pairs` times. Returns the report's lines and the failures."""
    runs: list[LoaderPair] = []
    for i in range(1, pairs + 1):
        step(f"  bare consume then load, pair {i}")
        runs.append(await measure_pair(names, brokers, sources, label, i))
    failures = [f"load ({i + 1}) loaded {r.load.events:,} records, the bare consume read {r.consume.events:,}"
                for i, r in enumerate(runs) if r.load.events != r.consume.events]
    failures += [f"load ({i + 1}): {r.rows['enriched']:,} enriched rows in the file, its summary says {r.tables}"
                 for i, r in enumerate(runs) if f"enriched {r.rows['enriched']:,}" not in r.tables]
    consume_rate = sum(r.consume.rate for r in runs) / len(runs)
    load_rate = sum(r.load.rate for r in runs) / len(runs)
    per_pair = ", ".join(f"pair {i + 1} {ratio(r.load.rate, r.consume.rate)} ({fmt(r.load.rate)} / "
                         f"{fmt(r.consume.rate)})" for i, r in enumerate(runs))
    met = load_rate >= LOADER_TARGET * consume_rate
    last = runs[-1]
    lines = [
        f"### The loader: python -m streams load against a bare consume of the same topics ({what})",
        "",
        *table([x for r in runs for x in (r.consume, r.load)]),
        "",
        f"- **load / bare consume: {ratio(load_rate, consume_rate)} of the records/s** (mean records/s of "
        f"{len(runs)} run(s) each; target >= {LOADER_TARGET}: {'met' if met else 'NOT met'}); per pair, one after "
        f"the other: {per_pair}.",
        f"- what a load wrote: {last.load.events:,} records ({last.tables}) into "
        + ", ".join(f"{t} {n:,}" for t, n in last.rows.items()) + " rows.",
        "",
        "How: the bare consume is an aiokafka consumer with the loader's settings (no group, read_committed, "
        f"assigned every partition, fetches of up to {FETCH_RECORDS:,} records) reading the topics from their "
        "beginning to the end offsets it saw at its start; records/s from its start. The load is `python -m streams "
        "load --into` a fresh file in its own process; records/s from its summary line (from its consumer's start "
        "to the file closed, the last checkpoint included). CPU: each process's whole life (wait4), interpreter "
        "start included.",
    ]
    return lines, failures


# -- --loader-only: replay's outputs in topics of their own -------------------------------------------------


def with_record_ids(path: Path) -> Iterator[bytes]:
    """Replay's enriched records with a record_id, as the worker writes them."""
    with open(path, "rb") as f:
        for n, line in enumerate(f):
            line = line.rstrip(b"\n")
            if line.endswith(b"}"):
                yield line[:-1] + b',"record_id":"raw:0:' + str(n).encode() + b':0"}'


def by_user(path: Path) -> Iterable[tuple[bytes | None, bytes, int]]:
    """Each line keyed by its user_id, in the partition of the key (the persons and change log topics' key)."""
    with open(path, "rb") as f:
        for line in f:
            key = orjson.loads(line)["user_id"].encode()
            yield key, line.rstrip(b"\n"), partition_of(key)


async def replay_sources(run: Run, kafka: Kafka, src: Path) -> tuple[Sources, int]:
    """`replay` of `src` with its persons mapping and change log, each output in a topic of this run's.
    Returns the topics and how many records they hold."""
    out = {name: run.run_dir / f"loader-{name}.jsonl" for name in ("enriched", "dead", "persons", "changes")}
    argv = [PYTHON, "-m", "streams", "replay", "--input", str(src), "--output", str(out["enriched"]),
            "--dead-letter", str(out["dead"]), "--persons", str(out["persons"]), "--identity-changes",
            str(out["changes"])]
    child = Child("replay", argv, worker_env({}), run.run_dir / "loader-replay.log")
    if await asyncio.to_thread(child.wait) != 0:
        raise HarnessError(f"replay exited with {child.returncode}:\n{child.tail()}")
    names = run.names
    sources = Sources(names.topic("loader.enriched"), names.topic("loader.dead-letter"),
                      names.topic("loader.persons"), names.topic("loader.identity-changes"))
    await kafka.create_topics(sources.topics())
    producer = batch_producer(kafka.brokers)
    await producer.start()
    try:
        sent = await send_batches(producer, sources.enriched_topic, keyed(with_record_ids(out["enriched"])))
        with open(out["dead"], "rb") as f:
            sent += await send_batches(producer, sources.dead_letter_topic, keyed(f))
        sent += await send_batches(producer, sources.persons_topic, by_user(out["persons"]))
        sent += await send_batches(producer, sources.identity_changes_topic, by_user(out["changes"]))
    finally:
        await producer.stop()
    for path in out.values():
        path.unlink()
    return sources, sent


async def loader_only(run: Run, records: int, devices: int, seed: int, pairs: int = LOADER_PAIRS) -> int:
    """make bench's loader part alone, on replay's outputs of the main input. Report in
    .cache/bench/last-loader.md."""
    with run.timed("inputs", "generating the input (cached under .cache/bench)"):
        src = await asyncio.to_thread(generate, input_path(BENCH_DIR, "main", records, devices, seed), records,
                                      devices, seed)
    kafka = await run.connect()
    with run.timed("sources", "replay with --persons and --identity-changes, its outputs into topics"):
        sources, sent = await replay_sources(run, kafka, src)
    with run.timed("loader", f"the loader against a bare consume ({pairs} pair(s), alternating)"):
        lines, failures = await measure_loader(run.names, kafka.brokers, sources, f"replay's outputs of "
                                               f"{records:,} raw records over {devices:,} devices, {sent:,} "
                                               f"records", pairs)
    report = [f"## bench.py --loader-only: {time.strftime('%Y-%m-%d %H:%M')}, seed {seed}", "", *lines]
    return run.finish(report, "last-loader.md", failures)
