"""What make bench measures the worker against: the ceilings (bare aiokafka passthroughs, each named by its
delivery contract) and the peers (the same shape of work in Kafka Streams and in Quix Streams, bench/peers/).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from harness import ROOT
from harness.bench_run import PYTHON, Names, timed
from harness.broker import HarnessError, Kafka
from harness.measure import measure_child
from harness.report import Result, fmt, ratio

BENCH_SCRIPT = ROOT / "scripts" / "bench.py"  # a ceiling runs as `bench.py --passthrough ...`
# the worker's own fetch size (STREAMS_BATCH_RECORDS' default): the ceiling fetches as much per batch
BATCH_RECORDS = 10_000


@dataclass(frozen=True)
class Contract:
    """What a passthrough promises about its outputs, and so what it waits for."""

    name: str
    acks: int | str
    wait_for_acks: bool  # commit the input offsets only after the outputs are acknowledged
    how: str


CONTRACTS = {c.name: c for c in (
    Contract("fire-and-forget", 1, False, "acks=1, input offsets committed without waiting for any ack"),
    Contract("at-least-once", "all", True, "acks=all, input offsets committed only after the outputs are "
             "acknowledged"),
)}
CEILINGS = list(CONTRACTS)  # make bench measures both, side by side
WORKER_CONTRACT = "at-least-once"  # the worker's at its default guarantee: --scale's one ceiling per case


async def passthrough(brokers: str, group: str, source: str, target: str, contract: str = WORKER_CONTRACT) -> None:
    """A ceiling, run as a child (`bench.py --passthrough ... [--passthrough-contract C]`): what aiokafka alone
    costs for this traffic. Consumer group, big fetches, a send per record keyed as it came, then the commit;
    at-least-once waits for the acks (acks=all) before it, as the worker does (same fetch and producer
    settings), fire-and-forget (acks=1) does not."""
    terms = CONTRACTS[contract]
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    consumer = AIOKafkaConsumer(source, bootstrap_servers=brokers, group_id=group, enable_auto_commit=False,
                                auto_offset_reset="earliest", max_partition_fetch_bytes=8 << 20)
    producer = AIOKafkaProducer(bootstrap_servers=brokers, acks=terms.acks, linger_ms=5, max_batch_size=1 << 20)
    await consumer.start()
    await producer.start()
    try:
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=500, max_records=BATCH_RECORDS)
            if not batch:
                continue
            futures = [await producer.send(target, r.value, key=r.key) for rs in batch.values() for r in rs]
            if terms.wait_for_acks:
                await asyncio.gather(*futures)
            await consumer.commit({tp: rs[-1].offset + 1 for tp, rs in batch.items() if rs})
    finally:
        await producer.stop()
        await consumer.stop()


async def measure_ceiling(kafka: Kafka, names: Names, raw: str, records: int, label: str = "ceiling",
                          contract: str = WORKER_CONTRACT) -> Result:
    return await measure_child(
        kafka, names, label, raw, records,
        [PYTHON, str(BENCH_SCRIPT), "--passthrough-contract", contract, "--passthrough"],
        f"ceiling, {contract}: bare aiokafka passthrough",
        f"no logic: fetch {BATCH_RECORDS:,}, send each; {CONTRACTS[contract].how}")


async def measure_ceilings(kafka: Kafka, names: Names, raw: str, records: int, label: str = "ceiling") -> dict[
        str, Result]:
    """Both ceilings, one after the other, each on its own output topic and group."""
    return {c: await measure_ceiling(kafka, names, raw, records, f"{label}-{c}", c) for c in CEILINGS}


# -- the peers -----------------------------------------------------------------------------------------------

PEERS_DIR = ROOT / "bench" / "peers"
KSTREAMS_POM = PEERS_DIR / "kstreams" / "pom.xml"
KSTREAMS_JAR = ROOT / ".cache" / "bench-peers" / "kstreams" / "kstreams-peer.jar"  # the pom's build directory
QUIX_PEER = PEERS_DIR / "quix_peer.py"
PEER_NOTE = ("per record: parse the JSON, read the device's state, update a running identity, write it back, "
             "one output carrying it")


def build_kstreams_peer() -> Path:
    """The Kafka Streams peer's runnable jar, built by Maven when it is missing or older than its sources."""
    sources = [KSTREAMS_POM, *KSTREAMS_POM.parent.glob("src/**/*.java")]
    if KSTREAMS_JAR.exists() and KSTREAMS_JAR.stat().st_mtime >= max(p.stat().st_mtime for p in sources):
        return KSTREAMS_JAR
    for tool in ("mvn", "java"):
        if shutil.which(tool) is None:
            raise HarnessError(f"the Kafka Streams peer needs {tool} (Maven and a JDK 17) on the PATH")
    proc = subprocess.run(["mvn", "-q", "-f", str(KSTREAMS_POM), "package"], cwd=ROOT, capture_output=True,
                          text=True)
    if proc.returncode != 0 or not KSTREAMS_JAR.exists():
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-20:])
        raise HarnessError(f"building the Kafka Streams peer (mvn -q -f {KSTREAMS_POM} package) failed:\n{tail}")
    return KSTREAMS_JAR


def check_peers() -> Path:
    """Before anything is measured: the Kafka Streams peer built, Quix Streams installed."""
    try:
        importlib.metadata.version("quixstreams")
    except importlib.metadata.PackageNotFoundError:
        raise HarnessError("the Quix Streams peer needs quixstreams: make install (pip install -e '.[dev]')") from None
    return build_kstreams_peer()


@dataclass
class Peers:
    kstreams: Result
    quix: Result


def kstreams_version() -> str:
    m = re.search(r"<kafka.version>([^<]+)</kafka.version>", KSTREAMS_POM.read_text())
    return m.group(1) if m else "?"


async def measure_peers(kafka: Kafka, names: Names, raw: str, records: int, jar: Path, took: dict[str, float],
                        case: str = "") -> Peers:
    """Kafka Streams then Quix Streams on `raw`, each with a fresh group (application id), output topic and
    state directory; `case` (e.g. "a") names a scale run's case."""
    prefix, title = (f"{case}-", f"({case}) ") if case else ("", "")
    with timed(f"{prefix}kstreams", f"{title}the Kafka Streams peer", took):
        kstreams = await measure_child(
            kafka, names, f"{prefix}kstreams", raw, records, ["java", "-jar", str(jar)],
            f"{title}Kafka Streams {kstreams_version()} peer (bench/peers/kstreams)",
            f"{PEER_NOTE}; at_least_once, commit every 30 s, 1 thread; RocksDB store with its record cache",
            changelog="{group}-devices-changelog")
    with timed(f"{prefix}quix", f"{title}the Quix Streams peer", took):
        quix = await measure_child(
            kafka, names, f"{prefix}quix", raw, records, [PYTHON, str(QUIX_PEER)],
            f"{title}Quix Streams {importlib.metadata.version('quixstreams')} peer (bench/peers/quix_peer.py)",
            f"{PEER_NOTE}; at-least-once, commit every 5 s; stateful apply, RocksDB",
            changelog=f"changelog__{{group}}--{raw}--default")  # Quix's name for the changelog of the state
    return Peers(kstreams, quix)


def versus_lines(worker: Result, ceilings: dict[str, Result], peers: Peers, what: str = "worker") -> list[str]:
    """The report's lines: the worker against each ceiling (its contract named) and each peer."""
    lines = [f"- **{what} / ceiling ({c}): {ratio(worker.rate, r.rate)} of the events/s** of a bare passthrough "
             f"that promises {c} ({CONTRACTS[c].how}), {ratio(worker.cpu_us, r.cpu_us)}x its CPU per event."
             for c, r in ceilings.items()]
    for peer, r in (("Kafka Streams", peers.kstreams), ("Quix Streams", peers.quix)):
        lines.append(f"- **{what} / {peer}: {ratio(worker.rate, r.rate)}x** the events/s ({fmt(worker.rate)} "
                     f"against {fmt(r.rate)}), {ratio(r.cpu_us, worker.cpu_us)}x less CPU per event, peak RSS "
                     f"{fmt(worker.peak_rss_mib)} MiB against {fmt(r.peak_rss_mib)} MiB.")
    return lines
