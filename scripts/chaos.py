"""make chaos: the worker killed with SIGKILL again and again while it consumes, the broker restarted under it
once, and then what it wrote compared with what replay makes of the same input.

The at-least-once contract under test (README, "The worker"): whatever moment a crash hits, the worker neither
loses nor invents records; a record written again is byte for byte its first copy (same `record_id`); dead
letters are those replay gives; the device table ends in the state replay computes.

1. generate a deterministic raw stream (seeded) under .cache/chaos/ (reused when it exists);
2. the references: `python -m streams replay` on the file, and the same engine in-process (per raw record
   its outputs, and every device's final state);
3. fresh topics and group `chaos-<stamp>`; start the worker; produce the input in chunks while it runs; kill
   it (SIGKILL) at seeded random moments and start it again (twice after deleting its state directory, so the
   table is restored from its changelog); restart the broker once while it runs; let the last worker catch
   up, then stop it with SIGTERM (it must exit 0);
4. read the enriched, dead-letter and changelog topics (read_committed) and compare with the references;
5. stop whatever still runs, delete the run's topics (unless --keep), leave the broker as it was found.

    .venv/bin/python scripts/chaos.py [--records N] [--devices D] [--kills K] [--seed S] [--keep]
                                      [--processing-guarantee exactly_once]

With `--processing-guarantee exactly_once` the enriched and dead-letter topics, read committed, must hold
each record exactly once: a duplicate, however identical, is a failure.

    .venv/bin/python scripts/chaos.py --faults partition|pause [--records N] [--devices D] [--rate R] ...

`--faults` runs two workers of one group, each on its own test host (a network namespace of
`scripts/testhosts.py`, needs root), while the input flows at a steady rate (--rate, 1,200 records/s; a smaller
input slower, so that it flows for 160 s at least). Three times, on one worker drawn at random, for 25 s
(longer than the session timeout): `partition` cuts its test host off the network and heals it; `pause` stops
the process (SIGSTOP) and lets it go on (SIGCONT). Before the next fault the group must be whole again (two
stable members holding every partition). No worker is killed: at the end both are stopped with SIGTERM and
must exit 0; the checks are the group runs' (exit 2 when no test hosts can be made here).

Exit 0 when nothing was lost or invented, every duplicate is identical to its first copy, the dead letters and
the final states match, and the worker always came back and stopped cleanly; 1 otherwise (the first
differences and the worker's log lines are printed); 2 when the harness itself could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import os
import queue
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TextIO

import orjson
import testhosts  # scripts/testhosts.py: this file's directory is on the path when it runs
from aiokafka import AIOKafkaConsumer, TopicPartition

from streams import codec
from streams.config import Settings, env_name
from streams.enrich import Enricher, MemoryStore
from streams.identity import DeviceState
from streams.kafka import admin as kafka_admin
from streams.kafka import clients as kafka_clients
from streams.state.keys import is_internal

ROOT = Path(__file__).resolve().parent.parent
CHAOS_DIR = ROOT / ".cache" / "chaos"
KAFKA_SH = ROOT / "scripts" / "kafka.sh"
PYTHON = sys.executable
BROKERS = f"127.0.0.1:{os.environ.get('KAFKA_PORT', '9092')}"  # where scripts/kafka.sh puts the broker
PARTITIONS = 4
# a restarted worker first waits for the group to drop its killed predecessor (the session timeout, 10 s),
# then restores its table: minutes mean it is not coming back
READY_TIMEOUT = 180.0
BROKER_RECOVERY_TIMEOUT = 240.0
CATCH_UP_TIMEOUT = 900.0
STALL_TIMEOUT = 240.0  # the last worker made no progress this long: it is stuck
STOP_TIMEOUT = 60.0
GIVE_UP_AFTER = 3  # lives in a row that did not come back: stop killing, go to the checks
RECORD_ID = re.compile(r"(?P<topic>.+):(?P<partition>[0-9]+):(?P<offset>[0-9]+):(?P<n>[0-9]+)")
METRIC = re.compile(r"^(?P<name>[a-z_]+)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
SHOW = 5  # differences shown per kind
FAULT_KINDS = ("partition", "pause")
FAULTS = 3  # per --faults run, each on a worker drawn at random
FAULT_SECONDS = 25.0  # longer than the session timeout (10 s): the group goes on without the worker
FEED_RATE = 1200.0  # --faults: input records per second (the issue's run)
FEED_SECONDS = 160.0  # --faults: a smaller input is spread over this long, so that the faults fall within it
# --faults: the test hosts' numbers are the first free ones from stv11 on (the tests take theirs from stv1 on)
FIRST_TEST_HOST = 11


class HarnessError(Exception):
    """The harness itself could not go on (no broker, replay failed, a produce failed): exit 2."""


def log(message: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- 1. the input ------------------------------------------------------------------------------------------

GENERATOR_VERSION = 1  # bump when the generator changes: cached inputs are named after it
T0_MS = 1_713_000_000_000
PLATFORM_WEIGHTS = {
    "mp-wechat": 30, "web": 20, "mp-alipay": 12, "mp-bytedance": 7, "mp-jd": 6, "mp-baidu": 5, "mp-kuaishou": 4,
    "mp-qq": 4, "mp-xiaohongshu": 4, "mp-taobao": 4, "mp-feishu": 4,
}  # fmt: skip
NO_ASSOCIATION = frozenset({"mp-jd", "mp-kuaishou", "mp-qq"})  # no bind, unbind, reset or login key there
ACTION_WEIGHTS = {
    "track": 850, "login": 35, "set_customer_ids": 25, "bind": 20, "unbind": 15, "logout": 15, "identify": 15,
    "profile_set": 15, "reset_anonymous_id": 10,
}  # fmt: skip
BAD_RATE = 0.005
BAD_KINDS = ("not_json", "not_utf8", "unknown_platform", "invalid_key", "missing_field", "not_object",
             "invalid_auth_state", "empty_value")
BIND_KEYS = ("$identity_mobile", "$identity_email")
EVENTS = ("$pageview", "$MPViewScreen", "$MPClick", "buttonClick", "addToCart", "payOrder", "search")


@dataclass(slots=True)
class Device:
    device_id: str
    platform: str
    user: str  # the login ID of the person on this device
    # the generator's view of the device, only to keep actions plausible (unbind what was bound, ...)
    login_key: str | None = None
    bound: dict[str, str] = field(default_factory=dict)


def make_device_id(rng: random.Random, platform: str) -> str:
    if platform == "web":  # the Web JS SDK's cookie ID
        return (f"{rng.getrandbits(56):014x}-{rng.getrandbits(64):016x}-{rng.getrandbits(32):08x}-1296000-"
                f"{rng.getrandbits(56):014x}")
    # the mini programs' default ID: a time, two random parts and a counter
    return (f"{T0_MS - rng.randrange(90 * 86_400_000)}-{rng.randrange(10**7):07d}-{rng.getrandbits(60):015x}-"
            f"{rng.randrange(10**8):08d}")


def make_devices(rng: random.Random, count: int) -> list[Device]:
    names = list(PLATFORM_WEIGHTS)
    platforms = rng.choices(names, weights=[PLATFORM_WEIGHTS[n] for n in names], k=count)
    users = max(1, count // 2)  # some people use several devices
    seen: set[str] = set()
    devices = []
    for p in platforms:
        device_id = make_device_id(rng, p)
        while device_id in seen:
            device_id = make_device_id(rng, p)
        seen.add(device_id)
        devices.append(Device(device_id, p, f"u{70_000_000 + rng.randrange(users) * 7919}"))
    return devices


def phone(rng: random.Random) -> str:
    return f"1{rng.choice('3578')}{rng.randrange(10)}****{rng.randrange(10_000):04d}"


def email(rng: random.Random) -> str:
    return f"u{rng.randrange(10**6)}@example.com"


def valid_record(rng: random.Random, dev: Device, t: int) -> dict[str, Any]:
    """One valid raw record for this device, its action drawn from ACTION_WEIGHTS, plausible for its state."""
    rec: dict[str, Any] = {"device_id": dev.device_id, "platform": dev.platform}
    associates = dev.platform not in NO_ASSOCIATION
    action = rng.choices(list(ACTION_WEIGHTS), weights=list(ACTION_WEIGHTS.values()))[0]
    if action in ("bind", "unbind", "reset_anonymous_id") and not associates:
        action = "track"
    if action == "track":
        if rng.random() < 0.8:  # `action` defaults to track: some producers leave it out
            rec["action"] = "track"
        rec["event"] = rng.choice(EVENTS)
        if rng.random() < 0.9:
            rec["properties"] = {"$title": rng.choice(("首页", "商品详情", "Cart", "我的")),
                                 "page": f"/p/{rng.randrange(40)}", "price": round(rng.uniform(1, 500), 2)}
    elif action == "login":
        rec["action"] = "login"
        if associates and rng.random() < 0.25:  # loginWithKey
            key = rng.choice(BIND_KEYS)
            rec["key"], rec["id"] = key, phone(rng) if key == "$identity_mobile" else email(rng)
            dev.login_key = key
        else:
            rec["id"] = dev.user
            dev.login_key = "$identity_login_id"
        dev.bound.clear()
    elif action == "logout":
        rec["action"] = "logout"
        dev.login_key = None
        dev.bound.clear()
    elif action == "identify":
        rec["action"] = "identify"
        if dev.platform != "web" or rng.random() < 0.8:  # the Web SDK generates one when none is given
            rec["id"] = f"oX{rng.getrandbits(104):026x}"
    elif action == "reset_anonymous_id":
        rec["action"] = "reset_anonymous_id"
        if rng.random() < 0.5:  # else a generated UUIDv5: the same input must give the same ID
            rec["id"] = f"reset-{rng.getrandbits(48):012x}"
    elif action == "bind":
        key = rng.choice([k for k in BIND_KEYS if k != dev.login_key])  # binding the login's key is refused
        value = phone(rng) if key == "$identity_mobile" else email(rng)
        dev.bound[key] = value
        rec.update(action="bind", key=key, value=value)
    elif action == "unbind":
        if dev.bound and rng.random() < 0.8:
            key = rng.choice(sorted(dev.bound))
            value = dev.bound.pop(key)
        else:
            key, value = "$identity_mobile", phone(rng)
        rec.update(action="unbind", key=key, value=value)
    elif action == "set_customer_ids":
        rec["action"] = "set_customer_ids"
        r = rng.random()
        if r < 0.4:  # the login bridge: AUTHENTICATED userid logs in
            rec["customer_ids"] = {"userid": {"id": dev.user, "authState": "AUTHENTICATED"}}
            dev.login_key = "$identity_login_id"
            dev.bound.clear()
        elif r < 0.65:  # and LOGGED_OUT logs out
            rec["customer_ids"] = {"userid": {"id": dev.user, "authState": "LOGGED_OUT"}}
            dev.login_key = None
            dev.bound.clear()
        elif r < 0.85:
            rec["customer_ids"] = {"dpuuid": f"{rng.getrandbits(128):032x}"}
        else:
            rec["customer_ids"] = {"email": {"id": email(rng), "authState": 1}}
            rec["hash"] = "SHA-256"
    else:
        rec["action"] = "profile_set"
        rec["properties"] = {"city": rng.choice(("上海", "北京", "深圳")), "vip_level": rng.randrange(5)}
    rec["time"] = t
    return rec


def bad_record(rng: random.Random, dev: Device, t: int) -> bytes:
    """One bad raw record: rejected at the byte level (no key: it lands in any partition) or by the engine."""
    kind = rng.choice(BAD_KINDS)
    base = {"device_id": dev.device_id, "platform": dev.platform, "action": "track", "event": "$pageview", "time": t}
    if kind == "not_json":
        text = orjson.dumps({**base, "properties": {"$title": "商品详情"}}).decode()
        return text[: rng.randrange(len(text) // 2, len(text) - 1)].encode()  # cut in characters, not bytes
    if kind == "not_utf8":
        return orjson.dumps(base)[:-1] + b', "note": "\xff\xfe\xc3"}'
    if kind == "unknown_platform":
        return orjson.dumps({**base, "platform": rng.choice(("android", "mp-tiktok", "mp-weibo"))})
    if kind == "invalid_key":
        action = "login" if dev.platform in NO_ASSOCIATION else "bind"
        return orjson.dumps({**base, "action": action, "key": rng.choice(("1abc", "$identity mobile", "邮箱")),
                             "id": dev.user, "value": phone(rng)})
    if kind == "missing_field":
        return orjson.dumps({k: v for k, v in base.items() if k != "device_id"})
    if kind == "not_object":
        return orjson.dumps([dev.device_id, t])
    if kind == "invalid_auth_state":
        return orjson.dumps({**base, "action": "set_customer_ids",
                             "customer_ids": {"userid": {"id": dev.user, "authState": 3}}})
    return orjson.dumps({**base, "event": ""})  # empty_value


def input_path(records: int, devices: int, seed: int) -> Path:
    return CHAOS_DIR / f"input-n{records}-d{devices}-s{seed}-v{GENERATOR_VERSION}.jsonl"


def generate(path: Path, records: int, devices: int, seed: int) -> Path:
    """Write `records` raw records over `devices` devices (activity skewed, log-normal), each with its own
    `time`, so that no two expected records are alike. Kept: the same arguments give the same bytes."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"chaos-input-{seed}")
    devs = make_devices(rng, devices)
    weights = list(itertools.accumulate(rng.lognormvariate(0.0, 1.0) for _ in range(devices)))
    picks = rng.choices(range(devices), cum_weights=weights, k=records)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb", buffering=1 << 20) as f:
        for i, d in enumerate(picks):
            device = devs[d]
            t = T0_MS + i * 10 + rng.randrange(10)
            line = bad_record(rng, device, t) if rng.random() < BAD_RATE else orjson.dumps(valid_record(rng, device, t))
            f.write(line + b"\n")
    partial.rename(path)
    return path


def read_lines(path: Path) -> list[bytes]:
    """The non-blank lines, bytes unchanged: what `replay` and `produce_file` take as records."""
    return [line for line in path.read_bytes().split(b"\n") if line.strip()]


# -- 2. the references -------------------------------------------------------------------------------------


class TrackingStore(MemoryStore):
    """Replay's in-memory store that also remembers which input line last changed each device: the worker's
    stored state must say it reflects exactly that raw record (its `applied` offsets)."""

    def __init__(self) -> None:
        super().__init__()
        self.line = -1
        self.last_change: dict[str, int] = {}
        # MemoryStore makes `put` the dict's own __setitem__, an instance attribute that a method here would
        # not override
        self.put = self.tracking_put

    def tracking_put(self, device_id: str, state: DeviceState) -> None:
        self.states[device_id] = state
        self.last_change[device_id] = self.line


@dataclass
class Reference:
    outputs: list[list[bytes]]  # per input line (0-based), the enriched records it gives, in order
    dead: list[bytes | None]  # per input line, its dead letter
    states: dict[str, DeviceState]  # the final state of every device that has one
    last_change: dict[str, int]  # device -> the input line that last changed its state
    replay_enriched: list[bytes]  # `python -m streams replay`'s output, line by line
    replay_dead: list[bytes]
    replay_summary: str
    persons: dict[str, bytes] = field(default_factory=dict)  # `replay --persons`: user ID -> its mapping


def replay_in_process(lines: Sequence[bytes]) -> tuple[list[list[bytes]], list[bytes | None], TrackingStore]:
    """The engine over the whole input in order, as replay runs it (source {"line": n}: no record_id)."""
    enricher = Enricher()
    store = TrackingStore()
    outputs: list[list[bytes]] = []
    dead: list[bytes | None] = []
    for i, line in enumerate(lines):
        store.line = i
        outcome = enricher.step(line, {"line": i + 1}, store)
        outputs.append(outcome.records)
        dead.append(outcome.dead_letter)
    return outputs, dead, store


def replay_subprocess(path: Path, run_dir: Path) -> tuple[list[bytes], list[bytes], str]:
    """`python -m streams replay` on the input with the default settings (the worker's): the reference (its
    persons mapping: `replay-persons.jsonl`)."""
    out, dead = run_dir / "replay.jsonl", run_dir / "replay-dead.jsonl"
    run = subprocess.run(
        [PYTHON, "-m", "streams", "replay", "--input", str(path), "--output", str(out), "--dead-letter", str(dead),
         "--persons", str(run_dir / "replay-persons.jsonl")],
        cwd=ROOT, env=clean_env(), capture_output=True, timeout=1800, stdin=subprocess.DEVNULL,
    )
    if run.returncode != 0:
        raise HarnessError(f"replay exited {run.returncode}: {run.stderr.decode(errors='replace')[-2000:]}")
    summary = run.stderr.decode(errors="replace").strip().splitlines()
    return read_lines(out), read_lines(dead), (summary[-1] if summary else "")


def build_reference(path: Path, lines: Sequence[bytes], run_dir: Path) -> Reference:
    outputs, dead, store = replay_in_process(lines)
    replay_enriched, replay_dead, summary = replay_subprocess(path, run_dir)
    # the in-process run stands in for replay record by record and for the states: it must be replay
    flat = [r for rs in outputs for r in rs]
    letters = [d for d in dead if d is not None]
    if flat != replay_enriched or letters != replay_dead:
        raise HarnessError(f"the in-process engine differs from `streams replay` ({len(flat)} vs "
                           f"{len(replay_enriched)} records, {len(letters)} vs {len(replay_dead)} dead letters)")
    persons = {orjson.loads(line)["user_id"]: line for line in read_lines(run_dir / "replay-persons.jsonl")}
    return Reference(outputs, dead, store.states, store.last_change, replay_enriched, replay_dead, summary, persons)


# -- the broker --------------------------------------------------------------------------------------------


def kafka_sh(command: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(KAFKA_SH), command, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


class Broker:
    """The single-node broker of scripts/kafka.sh: started when down, and left as it was found."""

    def __init__(self) -> None:
        self.was_up = self.up()
        self.restarts: list[float] = []  # seconds each restart took

    @staticmethod
    def up() -> bool:
        return kafka_sh("status", timeout=120).returncode == 0

    def ensure_up(self) -> None:
        if self.up():
            return
        log("starting the broker (bash scripts/kafka.sh start)")
        run = kafka_sh("start", timeout=1800)
        if run.returncode != 0:
            raise HarnessError(f"`bash scripts/kafka.sh start` failed ({run.returncode}):\n{run.stderr[-3000:]}")

    def restart(self) -> float:
        started = time.monotonic()
        run = kafka_sh("restart", timeout=600)
        took = time.monotonic() - started
        if run.returncode != 0:
            raise HarnessError(f"`bash scripts/kafka.sh restart` failed ({run.returncode}):\n{run.stderr[-3000:]}")
        self.restarts.append(took)
        return took

    def leave_as_found(self) -> None:
        if self.was_up:
            if not self.up():
                log("the broker was up at the start: starting it again")
                kafka_sh("start", timeout=1800)
        else:
            log("the broker was down at the start: stopping it (bash scripts/kafka.sh stop)")
            kafka_sh("stop", timeout=180)


# -- Kafka helpers -----------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def admin_client(brokers: str) -> Any:
    # the project's admin client: it asks a broker that answers, also while one of the cluster is down
    admin = kafka_admin.Admin(bootstrap_servers=brokers, request_timeout_ms=15_000)
    await admin.start()
    try:
        yield admin
    finally:
        await admin.close()


def run_async(coro: Any, timeout: float = 60.0) -> Any:
    """One Kafka call from synchronous code, bounded: a call that hangs must not hang the harness."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def delete_topics(brokers: str, prefix: str) -> list[str]:
    """Every topic of the run: ours, and the worker's changelog, repartition and leader topics (named after
    the group, which starts with the same stamp)."""
    async with admin_client(brokers) as admin:
        mine = sorted(t for t in await admin.list_topics() if t.startswith(prefix))
        if mine:
            await admin.delete_topics(mine)
        return mine


@dataclass
class Offsets:
    raw_end: dict[int, int]
    committed: dict[int, int]  # the group's committed offsets on the raw topic (-1: none)
    outputs_end: dict[str, int]  # enriched, dead-letter, repartition: the sum of their partitions' ends

    def lag(self) -> int:
        return sum(max(0, end - max(0, self.committed.get(p, -1))) for p, end in self.raw_end.items())


async def offsets(settings: Settings, repartition: str) -> Offsets:
    outputs = {"enriched": settings.enriched_topic, "dead-letter": settings.dead_letter_topic,
               "repartition": repartition}
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.brokers, group_id=None, enable_auto_commit=False,
                                request_timeout_ms=15_000)
    await consumer.start()
    try:
        async with admin_client(settings.brokers) as admin:
            existing = set(await admin.list_topics())
            raw_tps = [TopicPartition(settings.raw_topic, p) for p in range(PARTITIONS)]
            committed = await admin.list_consumer_group_offsets(settings.group, partitions=raw_tps)
        names = [settings.raw_topic, *(t for t in outputs.values() if t in existing)]
        ends = await consumer.end_offsets([TopicPartition(t, p) for t in names for p in range(PARTITIONS)])
    finally:
        await consumer.stop()
    return Offsets(
        raw_end={tp.partition: o for tp, o in ends.items() if tp.topic == settings.raw_topic},
        committed={tp.partition: c.offset for tp, c in committed.items()},
        outputs_end={k: sum(o for tp, o in ends.items() if tp.topic == t) for k, t in outputs.items()},
    )


async def outputs_grow(settings: Settings, then: Callable[[], Any], timeout: float = 60.0) -> float | None:
    """Call `then`, and return how many seconds later the enriched and dead-letter topics hold more records
    than before (None: not within `timeout`)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.brokers, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t in (settings.enriched_topic, settings.dead_letter_topic)
               for p in range(PARTITIONS)]
        before = sum((await consumer.end_offsets(tps)).values())
        then()
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if sum((await consumer.end_offsets(tps)).values()) > before:
                return time.monotonic() - started
            await asyncio.sleep(0.01)
        return None
    finally:
        await consumer.stop()


def scrape(settings: Settings) -> list[tuple[str, dict[str, str], float]] | None:
    """The worker's /metrics as (name, labels, value), at the address it binds (a wildcard: this machine's
    loopback); None when it does not answer."""
    host = "127.0.0.1" if settings.web_bind in ("", "0.0.0.0", "::", "[::]") else settings.web_bind
    try:
        with urllib.request.urlopen(f"http://{host}:{settings.web_port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except (OSError, ValueError):
        return None
    samples = []
    for line in text.splitlines():
        m = METRIC.match(line)
        if m:
            labels = dict(LABEL.findall(m["labels"] or ""))
            with contextlib.suppress(ValueError):
                samples.append((m["name"], labels, float(m["value"])))
    return samples


def metric(samples: Sequence[tuple[str, dict[str, str], float]] | None, name: str) -> float | None:
    if samples is None:
        return None
    values = [v for n, _, v in samples if n == name]
    return sum(values) if values else None


def raw_lag(samples: Sequence[tuple[str, dict[str, str], float]] | None, raw_topic: str) -> dict[int, float]:
    """streams_consumer_lag per raw partition, as far as the worker reports it."""
    return {int(labels["partition"]): v for n, labels, v in samples or ()
            if n == "streams_consumer_lag" and labels.get("topic") == raw_topic}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the worker process ------------------------------------------------------------------------------------


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMS_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def worker_env(settings: Settings) -> dict[str, str]:
    env = clean_env()
    for f in fields(settings):
        value = getattr(settings, f.name)
        if value is not None:
            env[env_name(f.name)] = str(value)
    return env


class WorkerProcess:
    """`python -m streams worker` with the run's settings; every life appends to one log, after a marker."""

    def __init__(self, settings: Settings, log_path: Path, life: int, note: str, prefix: Sequence[str] = ()) -> None:
        self.settings = settings
        self.log_path = log_path
        self.life = life
        with open(log_path, "ab") as out:
            self.log_from = out.tell()
            out.write(f"==== chaos life #{life}: python -m streams worker ({note}), web {settings.web_bind}:"
                      f"{settings.web_port}, {time.strftime('%H:%M:%S')}\n".encode())
            out.flush()
            # its own session: a Ctrl-C on the harness reaches the harness only, which then stops the worker.
            # `prefix`: where it runs (`ip netns exec HOST`, which execs it: the pid stays the worker's)
            self.proc = subprocess.Popen([*prefix, PYTHON, "-m", "streams", "worker"], cwd=ROOT,
                                         env=worker_env(settings), stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.started = time.monotonic()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> int:
        if self.alive:
            self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait(30)

    def terminate(self, timeout: float) -> tuple[int, float, bool]:
        """SIGTERM; (exit code, seconds it took, whether SIGKILL was needed after `timeout`)."""
        started = time.monotonic()
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return self.kill(), time.monotonic() - started, True
        return code, time.monotonic() - started, False

    def text(self) -> str:
        """This life's part of the log."""
        with open(self.log_path, "rb") as f:
            f.seek(self.log_from)
            data = f.read()
        end = data.find(b"\n==== chaos life #", 1)
        return (data if end < 0 else data[: end + 1]).decode(errors="replace")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def errors(self) -> list[str]:
        """The ERROR, CRITICAL and traceback lines of this life."""
        return [line for line in self.text().splitlines()
                if "[ERROR]" in line or "[CRITICAL]" in line or line.startswith(("Traceback", "streams worker:"))]


# -- producing the input while the worker runs -------------------------------------------------------------


@dataclass
class Job:
    count: int
    spread: float  # seconds over which to send it: 0 = one burst
    started: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    took: float | None = None  # seconds it took to send, once done


class Feeder(threading.Thread):
    """Sends the input to the raw topic, keyed by device_id, job after job (a job: the next `count` lines,
    in chunks over `spread` seconds), and remembers where each line landed (partition, offset): that is how
    a record_id or a dead letter's source is traced back to its input line.

    `gate` is held while a chunk is sent: the broker restart takes it, so that no produce is cut in half (a
    half-delivered chunk could not be sent again without duplicating input records)."""

    def __init__(self, settings: Settings, lines: Sequence[bytes]) -> None:
        super().__init__(name="feeder", daemon=True)
        self.settings = settings
        self.lines = lines
        self.keys = [kafka_clients.device_key(v) for v in lines]
        self.placed: list[tuple[int, int] | None] = [None] * len(lines)
        self.next = 0
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.gate = threading.Lock()
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    def submit(self, count: int, spread: float) -> Job:
        job = Job(count, spread)
        self.jobs.put(job)
        return job

    @property
    def produced(self) -> int:
        return self.next

    @property
    def finished(self) -> bool:
        return self.next >= len(self.lines)

    def stop(self) -> None:
        self.stopping.set()
        self.jobs.put(None)

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                job = self.jobs.get()
                if job is None:
                    return
                self._do(job)
        except BaseException as e:  # the main thread reports it: a lost produce makes every check moot
            self.error = e

    def _do(self, job: Job) -> None:
        job.started.set()
        began = time.monotonic()
        try:
            count = min(job.count, len(self.lines) - self.next)
            chunks = max(1, int(job.spread / 0.25)) if count else 0
            size = -(-count // chunks) if chunks else 0
            pause = job.spread / chunks if chunks else 0.0
            sent = 0
            while sent < count and not self.stopping.is_set():
                n = min(size, count - sent)
                with self.gate:
                    self._send(self.next, n)
                sent += n
                if pause and sent < count:
                    time.sleep(pause)
        finally:
            job.took = time.monotonic() - began
            job.done.set()

    def _send(self, first: int, n: int) -> None:
        messages = [(self.keys[i], self.lines[i]) for i in range(first, first + n)]
        delivered = run_async(kafka_clients.produce(self.settings, messages), timeout=120)
        for i, md in enumerate(delivered, first):
            self.placed[i] = (md.partition, md.offset)
        self.next = first + n

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.error is not None:
                raise HarnessError(f"producing the input failed: {self.error!r}")
            if self.jobs.empty() and (self.finished or self.stopping.is_set()):
                return True
            time.sleep(0.2)
        return False


# -- 3. the chaos ------------------------------------------------------------------------------------------


@dataclass
class LifePlan:
    mode: str  # running: kill after `delay` s of work | burst: a burst of input, then kill | startup | final
    delay: float  # running: seconds after ready; burst: seconds after ready before the burst; startup: after start
    after_burst: float  # burst: seconds after the burst's first outputs showed
    quota: int  # input lines produced during this life
    delete_state: bool  # the state directory is deleted before this life starts
    broker_restart: bool  # the broker is restarted while this life runs


def make_plan(kills: int, records: int, seed: int) -> list[LifePlan]:
    """kills + 1 lives: each of the first `kills` ends with SIGKILL, the last one with SIGTERM."""
    rng = random.Random(f"chaos-plan-{seed}")
    deletes = set(rng.sample(range(2, kills), k=min(2, max(0, kills - 2)))) if kills > 2 else set()
    restart_at = rng.randrange(max(1, kills // 3), max(2, (2 * kills) // 3 + 1)) if kills >= 2 else -1
    weights = [rng.uniform(0.5, 1.5) for _ in range(kills + 1)]
    quotas = [int(records * w / sum(weights)) for w in weights]
    quotas[-1] += records - sum(quotas)
    plan = []
    for i in range(kills + 1):
        if i == kills:
            mode = "final"
        elif i == 0 or i == restart_at:
            mode = "running"  # something is processed before the first kill; the broker goes down mid-work
        else:
            mode = rng.choices(("running", "burst", "startup"), weights=(0.4, 0.4, 0.2))[0]
        delay = {"running": rng.uniform(1.0, 6.0), "burst": rng.uniform(1.0, 4.0), "startup": rng.uniform(0.5, 6.0),
                 "final": 5.0}[mode]
        plan.append(LifePlan(mode, delay, rng.uniform(0.0, 0.4), quotas[i], i in deletes, i == restart_at))
    return plan


@dataclass
class Life:
    number: int
    plan: LifePlan
    worker: WorkerProcess
    ready_after: float | None = None
    lived: float = 0.0
    lag_at_end: float | None = None  # the worker's own lag metric just before the kill
    uncommitted: int | None = None  # raw records not committed when it died (broker's view, right after)
    records_in: float | None = None  # its counters just before the kill (per process)
    skipped: float | None = None
    batches: float | None = None
    exit_code: int | None = None
    exited_early: bool = False  # it was gone before the harness killed it
    came_back: bool | None = None  # it became ready (None: not waited for, a kill during start-up)
    notes: list[str] = field(default_factory=list)


@dataclass
class Finding:
    fatal: bool
    text: str


class Chaos:
    def __init__(self, settings: Settings, run_dir: Path, feeder: Feeder, plan: list[LifePlan], broker: Broker,
                 seed: int) -> None:
        self.settings = settings
        self.run_dir = run_dir
        self.log_path = run_dir / "worker.log"
        self.feeder = feeder
        self.plan = plan
        self.broker = broker
        self.rng = random.Random(f"chaos-broker-{seed}")  # when, in its life, the broker goes down
        self.repartition = f"{settings.group}-{settings.raw_topic}-repartition"
        self.lives: list[Life] = []
        self.findings: list[Finding] = []
        self.worker: WorkerProcess | None = None
        self.broker_survived: bool | None = None
        self.broker_recovery: float | None = None
        self.stop_result: tuple[int, float, bool] | None = None
        self.caught_up: bool = False

    # -- one life

    def start(self, number: int, plan: LifePlan) -> Life:
        note = plan.mode + (", state directory deleted" if plan.delete_state else "")
        if plan.delete_state:
            shutil.rmtree(self.settings.state_dir, ignore_errors=True)
        # a fresh port per life: the killed worker's port may not be free again at once
        settings = replace(self.settings, web_port=free_port())
        life = Life(number, plan, WorkerProcess(settings, self.log_path, number, note))
        self.worker = life.worker
        self.lives.append(life)
        return life

    def wait_ready(self, life: Life, timeout: float = READY_TIMEOUT) -> bool:
        """Until this worker reports a lag for every raw partition (it holds them all and fetches them: its
        table is restored) and the group is stable with one member. The group alone is not enough: until
        the session timeout, the member that still holds everything may be the killed predecessor."""
        worker = life.worker
        deadline = time.monotonic() + timeout
        last = "not asked yet"
        while time.monotonic() < deadline:
            if not worker.alive:
                life.came_back = False
                return False
            lag = raw_lag(scrape(worker.settings), self.settings.raw_topic)
            if set(lag) != set(range(PARTITIONS)):
                last = f"the worker reports a lag for raw partitions {sorted(lag)}"
                time.sleep(0.5)
                continue
            try:
                state, held = run_async(kafka_admin.group_assignment(self.settings), timeout=20)
            except Exception as e:
                state, held = f"unknown ({type(e).__name__})", []
            last = f"group {state}, raw partitions per member {held}"
            if state == "Stable" and len(held) == 1 and held[0] == set(range(PARTITIONS)):
                life.ready_after = time.monotonic() - worker.started
                life.came_back = True
                return True
            time.sleep(0.5)
        life.notes.append(f"not ready after {timeout:.0f}s ({last})")
        life.came_back = False
        return False

    def sample(self, life: Life) -> None:
        samples = scrape(life.worker.settings)
        if samples is None:
            return
        lag = raw_lag(samples, self.settings.raw_topic)
        life.lag_at_end = sum(lag.values()) if lag else None
        life.records_in = metric(samples, "streams_records_in_total")
        life.skipped = metric(samples, "streams_already_applied_total")
        life.batches = metric(samples, "streams_batches_total")

    def end_with_kill(self, life: Life) -> None:
        self.sample(life)
        life.exited_early = not life.worker.alive
        life.exit_code = life.worker.kill()
        life.lived = time.monotonic() - life.worker.started
        # what the dead worker left uncommitted: work in flight or not begun, to be done again by the next
        with contextlib.suppress(Exception):
            life.uncommitted = run_async(offsets(self.settings, self.repartition), timeout=30).lag()
        if life.exited_early:
            tolerated = life.plan.broker_restart  # "the worker must survive it or be restarted"
            self.findings.append(Finding(not tolerated, (
                f"life #{life.number} ({life.plan.mode}): the worker exited by itself with code {life.exit_code}"
                f"{' during the broker restart' if tolerated else ''}; its last log lines:\n"
                f"{indent(life.worker.tail())}")))

    def run_life(self, number: int, plan: LifePlan) -> bool:
        """One life that ends with SIGKILL; False when the worker did not come back (not ready in time)."""
        life = self.start(number, plan)
        came_back = True
        if plan.mode == "startup":
            life.came_back = None  # killed on purpose before it is ready: the next lives tell
            # input flows while it starts, joins and restores: the next life finds a backlog
            self.feeder.submit(plan.quota, plan.delay)
            time.sleep(plan.delay)
        elif not self.wait_ready(life):
            came_back = False
            self.feeder.submit(plan.quota, 0.0)  # the input must all be produced all the same
            self.findings.append(Finding(True, (
                f"life #{number} ({plan.mode}{', after deleting the state directory' if plan.delete_state else ''})"
                f": the worker did not come back ({'; '.join(life.notes) or 'it exited'}, exit "
                f"{life.worker.proc.poll()}); its last log lines:\n{indent(life.worker.tail())}")))
        elif plan.mode == "running":
            # input keeps coming while it works (longer around the broker restart, which pauses the feeder)
            self.feeder.submit(plan.quota, plan.delay + (10.0 if plan.broker_restart else 0.0))
            if plan.broker_restart:
                self.restart_broker(life)
            time.sleep(plan.delay)
        elif plan.mode == "burst":
            time.sleep(plan.delay)
            # the worker gets through ~10,000 records in well under a second: kill it a random moment after its
            # first outputs of the burst show, when it is most likely between producing them and committing
            submitted: list[Job] = []
            try:
                took = run_async(outputs_grow(self.settings, lambda: submitted.append(
                    self.feeder.submit(plan.quota, 0.0))), timeout=90)
            except Exception as e:  # the watch failed, not the worker: kill it all the same
                took = None
                life.notes.append(f"burst watch failed: {type(e).__name__}")
                if not submitted:
                    self.feeder.submit(plan.quota, 0.0)
            life.notes.append(f"burst: first outputs after {fmt_s(took)}, killed {plan.after_burst:.2f}s later")
            time.sleep(plan.after_burst)
        self.end_with_kill(life)
        return came_back

    def restart_broker(self, life: Life) -> None:
        """Restart the broker under the running worker, then wait until the worker is back at work: its
        committed offsets reach what the raw topic held when the broker answered again."""
        time.sleep(self.rng.uniform(1.0, 3.0))
        log(f"life #{life.number}: restarting the broker (bash scripts/kafka.sh restart) under the worker")
        with self.feeder.gate:
            took = self.broker.restart()
        life.notes.append(f"broker restarted in {took:.1f}s")
        log(f"broker back after {took:.1f}s; worker {'alive' if life.worker.alive else 'GONE'}")
        started = time.monotonic()
        target: Offsets | None = None
        deadline = started + BROKER_RECOVERY_TIMEOUT
        while time.monotonic() < deadline and life.worker.alive:
            with contextlib.suppress(Exception):
                now = run_async(offsets(self.settings, self.repartition), timeout=30)
                target = target or now
                if all(now.committed.get(p, -1) >= end for p, end in target.raw_end.items()):
                    self.broker_recovery = time.monotonic() - started
                    self.broker_survived = True
                    life.notes.append(f"worker back at work {self.broker_recovery:.1f}s after the broker")
                    return
            time.sleep(1.0)
        self.broker_survived = False
        alive = life.worker.alive
        self.findings.append(Finding(alive, (
            f"life #{life.number}: after the broker restart the worker "
            f"{'made no progress for ' + str(int(BROKER_RECOVERY_TIMEOUT)) + 's' if alive else 'exited'} "
            f"(exit {life.worker.proc.poll()}); its last log lines:\n{indent(life.worker.tail(60))}")))

    # -- the last life

    def final_life(self, number: int, plan: LifePlan) -> None:
        """Start the worker one last time, give it the rest of the input, wait until it has caught up, stop it
        with SIGTERM."""
        life = self.start(number, plan)
        ready = self.wait_ready(life)
        if not ready:
            self.findings.append(Finding(True, (
                f"life #{number} (final): the worker did not come back ({'; '.join(life.notes) or 'it exited'});"
                f" its last log lines:\n{indent(life.worker.tail())}")))
        self.feeder.submit(plan.quota, plan.delay if ready else 0.0)
        if not self.feeder.wait_idle(600):
            raise HarnessError("the input was not all produced after 10 min")
        if ready:
            self.caught_up = self.wait_caught_up(life)
        self.sample(life)
        life.exited_early = not life.worker.alive
        code, took, forced = life.worker.terminate(STOP_TIMEOUT)
        life.exit_code, life.lived = code, time.monotonic() - life.worker.started
        self.stop_result = (code, took, forced)
        if code != 0 or forced:
            self.findings.append(Finding(True, (
                f"life #{number} (final): SIGTERM gave exit code {code} after {took:.1f}s"
                f"{' (SIGKILL was needed)' if forced else ''}; its last log lines:\n{indent(life.worker.tail())}")))

    def wait_caught_up(self, life: Life) -> bool:
        """Until every input record is committed, the worker reports no lag on any raw partition, and the
        output topics stopped growing (two polls 2 s apart agree)."""
        deadline = time.monotonic() + CATCH_UP_TIMEOUT
        progress_at, last_committed = time.monotonic(), -1
        previous: Offsets | None = None
        while time.monotonic() < deadline:
            if not life.worker.alive:
                self.findings.append(Finding(True, (
                    f"life #{life.number} (final): the worker exited ({life.worker.proc.poll()}) before it caught "
                    f"up; its last log lines:\n{indent(life.worker.tail())}")))
                return False
            try:
                now = run_async(offsets(self.settings, self.repartition), timeout=30)
            except Exception as e:
                log(f"offsets: {type(e).__name__}: {e}")
                time.sleep(2)
                continue
            committed = sum(max(0, c) for c in now.committed.values())
            if committed != last_committed:
                progress_at, last_committed = time.monotonic(), committed
            lag = raw_lag(scrape(life.worker.settings), self.settings.raw_topic)
            done = (sum(now.raw_end.values()) == len(self.feeder.lines) and now.lag() == 0
                    and set(lag) == set(range(PARTITIONS)) and not any(lag.values()))
            if done and previous is not None and previous.outputs_end == now.outputs_end:
                return True
            previous = now if done else None
            if time.monotonic() - progress_at > STALL_TIMEOUT:
                self.findings.append(Finding(True, (
                    f"life #{life.number} (final): no progress for {STALL_TIMEOUT:.0f}s, lag {now.lag()} "
                    f"(committed {now.committed}, ends {now.raw_end}, metric {lag}); its last log lines:\n"
                    f"{indent(life.worker.tail())}")))
                return False
            time.sleep(2)
        self.findings.append(Finding(True, f"the worker did not catch up within {CATCH_UP_TIMEOUT:.0f}s"))
        return False

    # -- all of it

    def run(self) -> None:
        failures_in_a_row = 0
        kills = len(self.plan) - 1
        for number, plan in enumerate(self.plan[:-1]):
            if self.feeder.error is not None:
                raise HarnessError(f"producing the input failed: {self.feeder.error!r}")
            if failures_in_a_row >= GIVE_UP_AFTER:
                # it does not come back: still produce the rest, so that the checks show what is missing
                self.feeder.submit(plan.quota, 0.0)
                continue
            came_back = self.run_life(number, plan)
            failures_in_a_row = 0 if came_back else failures_in_a_row + 1
            life = self.lives[-1]
            log(f"life #{number}/{kills} {plan.mode:8}{' [state deleted]' if plan.delete_state else ''}"
                f"{' [broker restart]' if plan.broker_restart else ''}: ready after {fmt_s(life.ready_after)}, "
                f"killed after {life.lived:.1f}s (exit {life.exit_code}); produced {self.feeder.produced:,}; "
                f"worker had read {fmt_n(life.records_in)} in {fmt_n(life.batches)} batches, skipped "
                f"{fmt_n(life.skipped)}, lag {fmt_n(life.lag_at_end)}, left uncommitted {fmt_n(life.uncommitted)}")
        self.final_life(kills, self.plan[-1])
        life = self.lives[-1]
        log(f"life #{kills}/{kills} final: ready after {fmt_s(life.ready_after)}, caught up: {self.caught_up}, "
            f"SIGTERM exit {life.exit_code}; read {fmt_n(life.records_in)}, skipped {fmt_n(life.skipped)}")

    def stop_everything(self) -> None:
        self.feeder.stop()
        if self.worker is not None and self.worker.alive:
            log(f"stopping the worker (pid {self.worker.proc.pid})")
            self.worker.kill()
        self.feeder.join(30)


# -- 3b. group chaos: two workers, and a broker restarted or (with the cluster) a broker killed ---------------


class ClusterBroker:
    """The three-node cluster of scripts/kafka.sh cluster-*: started when down, left as it was found; one node
    killed with SIGKILL and started again while the workers run."""

    def __init__(self) -> None:
        self.was_up = self.up()

    @staticmethod
    def up() -> bool:
        return kafka_sh("cluster-status", timeout=120).returncode == 0

    @staticmethod
    def brokers() -> str:
        return kafka_sh("cluster-brokers", timeout=60).stdout.strip()

    def ensure_up(self) -> None:
        if self.up():
            return
        log("starting the three-broker cluster (bash scripts/kafka.sh cluster-start)")
        run = kafka_sh("cluster-start", timeout=1800)
        if run.returncode != 0:
            raise HarnessError(f"`bash scripts/kafka.sh cluster-start` failed ({run.returncode}):\n"
                               f"{run.stderr[-3000:]}")

    def kill(self, node: int) -> None:
        run = kafka_sh("cluster-kill", str(node), timeout=120)
        if run.returncode != 0:
            raise HarnessError(f"`bash scripts/kafka.sh cluster-kill {node}` failed:\n{run.stderr[-3000:]}")

    def start(self, node: int) -> float:
        started = time.monotonic()
        run = kafka_sh("cluster-start-node", str(node), timeout=600)
        if run.returncode != 0:
            raise HarnessError(f"`bash scripts/kafka.sh cluster-start-node {node}` failed:\n{run.stderr[-3000:]}")
        return time.monotonic() - started

    def leave_as_found(self) -> None:
        if self.was_up:
            if not self.up():
                log("the cluster was up at the start: starting its nodes again")
                kafka_sh("cluster-start", timeout=1800)
        else:
            log("the cluster was down at the start: stopping it (bash scripts/kafka.sh cluster-stop)")
            kafka_sh("cluster-stop", timeout=300)


@dataclass
class Slot:
    """One of the two workers: its state directory, and the process of its current life."""

    name: str
    state_dir: str
    log_path: Path
    worker: WorkerProcess | None = None
    lives: int = 0
    killed: int = 0
    host: testhosts.TestHost | None = None  # --faults: the test host it runs on


@dataclass
class GroupKill:
    number: int
    slot: str
    lived: float
    delete_state: bool
    exited_early: bool
    back_after: float | None  # the group had two members holding every partition again


class GroupChaos:
    """Two workers in one group; SIGKILL to either one at random moments while the input flows, and each time
    it starts again at once (once with its state directory deleted). Once in the run the broker is restarted
    under both (single broker), or one node of the cluster is killed with SIGKILL and started again a few
    worker kills later (cluster). At the end both are stopped with SIGTERM."""

    def __init__(self, settings: Settings, run_dir: Path, feeder: Feeder, kills: int, seed: int,
                 broker: Broker | None, cluster: ClusterBroker | None) -> None:
        self.settings = settings
        self.run_dir = run_dir
        self.feeder = feeder
        self.kills = kills
        self.broker = broker
        self.cluster = cluster
        self.rng = random.Random(f"chaos-group-{seed}")
        self.slots = [Slot(name, str(run_dir / f"state-{name}"), run_dir / f"worker-{name}.log") for name in "ab"]
        self.repartition = f"{settings.group}-{settings.raw_topic}-repartition"
        self.history: list[GroupKill] = []
        self.findings: list[Finding] = []
        self.processes: list[WorkerProcess] = []
        self.broker_events: list[str] = []
        self.node_down: int | None = None
        self.kills_while_node_down = 0
        self.caught_up = False
        self.stop_results: dict[str, tuple[int, float, bool]] = {}

    def start(self, slot: Slot, note: str) -> None:
        slot.lives += 1
        # a fresh port per life: the killed worker's port may not be free again at once
        settings = replace(self.settings, state_dir=slot.state_dir, web_port=free_port())
        prefix: list[str] = []
        if slot.host is not None:  # its HTTP server on the test host's address, which this machine reaches
            settings = replace(settings, web_bind=slot.host.address)
            prefix = slot.host.command([])
            note += f", on test host {slot.host.name}"
        slot.worker = WorkerProcess(settings, slot.log_path, slot.lives, f"worker {slot.name}, {note}", prefix)
        self.processes.append(slot.worker)

    def start_group(self) -> bool:
        """Both workers started and a stable group of the two; False (reported, and the input all produced, so
        that the checks show what is missing) when they never formed one."""
        for slot in self.slots:
            self.start(slot, "first start")
        if self.group_ready() is None:
            self.findings.append(Finding(True, "the two workers never formed a stable group"))
            self.feeder.submit(len(self.feeder.lines), 0.0)
            return False
        return True

    def restart_gone(self) -> bool:
        """Start again each worker that exited by itself (already reported); whether there was one."""
        gone = [slot for slot in self.slots if slot.worker is None]
        for slot in gone:
            self.start(slot, "after exiting by itself")
        return bool(gone)

    def exited_by_itself(self) -> bool:
        gone = [s for s in self.slots if s.worker is not None and not s.worker.alive]
        for slot in gone:
            assert slot.worker is not None
            self.findings.append(Finding(True, (
                f"worker {slot.name} (life #{slot.lives}) exited by itself with code {slot.worker.proc.poll()}"
                f"{f' while node {self.node_down} was down' if self.node_down else ''}; its last log lines:\n"
                f"{indent(slot.worker.tail())}")))
            slot.worker = None
        return bool(gone)

    def group_ready(self, timeout: float = READY_TIMEOUT) -> float | None:
        """Seconds until both workers fetch and the group is stable with two members that hold every raw
        partition between them; None when that did not happen (or a worker exited)."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.exited_by_itself():
                return None
            # each worker reports a lag for the raw partitions it holds and fetches (its tables restored)
            held = [set(raw_lag(scrape(s.worker.settings), self.settings.raw_topic))
                    for s in self.slots if s.worker is not None]
            if all(held) and set().union(*held) == set(range(PARTITIONS)) and not held[0] & held[1]:
                try:
                    state, members = run_async(kafka_admin.group_assignment(self.settings), timeout=40)
                except Exception:
                    state, members = "unknown", []
                if state == "Stable" and len(members) == 2 and all(members):
                    return time.monotonic() - started
            time.sleep(0.5)
        return None

    def broker_event(self, number: int) -> None:
        if self.cluster is not None:
            node = self.rng.randint(1, 3)
            log(f"kill #{number}: killing node {node} of the cluster (SIGKILL) under both workers")
            self.cluster.kill(node)
            self.node_down = node
            self.broker_events.append(f"node {node} killed (SIGKILL) before worker kill #{number}")
            return
        assert self.broker is not None
        time.sleep(self.rng.uniform(0.5, 2.0))
        log(f"kill #{number}: restarting the broker (bash scripts/kafka.sh restart) under both workers")
        with self.feeder.gate:
            took = self.broker.restart()
        # back at work: the group's committed offsets reach what the raw topic held when the broker answered
        started, target, back = time.monotonic(), None, None
        while back is None and time.monotonic() - started < BROKER_RECOVERY_TIMEOUT:
            if self.exited_by_itself():
                break
            with contextlib.suppress(Exception):
                now = run_async(offsets(self.settings, self.repartition), timeout=30)
                target = target or now
                if all(now.committed.get(p, -1) >= end for p, end in target.raw_end.items()):
                    back = time.monotonic() - started
                    break
            time.sleep(0.5)
        survived = all(slot.worker is not None and slot.worker.alive for slot in self.slots)
        self.broker_events.append(f"restarted in {took:.1f}s under both workers before worker kill #{number}; "
                                  f"{'both survived it' if survived else 'a worker did NOT survive it'}, the "
                                  f"group's commits caught up {fmt_s(back)} after")
        if back is None or self.group_ready() is None:
            self.findings.append(Finding(True, "after the broker restart the group did not come back to work"))

    def node_back(self) -> None:
        if self.cluster is None or self.node_down is None:
            return
        node, self.node_down = self.node_down, None
        took = self.cluster.start(node)
        self.broker_events.append(f"node {node} started again in {took:.1f}s, after {self.kills_while_node_down} "
                                  f"worker kills and restarts while it was down")
        log(f"node {node} back after {took:.1f}s")

    def run(self) -> None:
        if not self.start_group():
            return
        event_at = self.rng.randrange(1, max(2, self.kills - 2))
        deletes = {self.rng.randrange(2, max(3, self.kills))}
        quota = len(self.feeder.lines) // (self.kills + 1)
        for number in range(self.kills):
            self.feeder.submit(quota, self.rng.uniform(2.0, 6.0))
            time.sleep(self.rng.uniform(1.0, 5.0))
            if number == event_at:
                self.broker_event(number + 1)
            if self.node_down is not None and number >= event_at + 3:
                self.node_back()
            slot = self.rng.choice(self.slots)
            if slot.worker is None:  # it exited by itself and was reported: start it again
                self.start(slot, "after exiting by itself")
                continue
            exited_early = not slot.worker.alive
            if exited_early:
                self.exited_by_itself()
            else:
                slot.worker.kill()
            slot.killed += 1
            lived = time.monotonic() - slot.worker.started if slot.worker is not None else 0.0
            delete_state = number in deletes
            if delete_state:
                shutil.rmtree(slot.state_dir, ignore_errors=True)
            self.start(slot, "after SIGKILL" + (", state directory deleted" if delete_state else ""))
            if self.node_down is not None:
                self.kills_while_node_down += 1
            back = self.group_ready()
            self.history.append(GroupKill(number, slot.name, lived, delete_state, exited_early, back))
            log(f"kill #{number + 1}/{self.kills}: worker {slot.name} (life #{slot.lives - 1}) after {lived:.1f}s"
                f"{' [state deleted]' if delete_state else ''}"
                f"{f' [node {self.node_down} down]' if self.node_down else ''}; group back after {fmt_s(back)}; "
                f"produced {self.feeder.produced:,}")
            if back is None:
                self.findings.append(Finding(True, f"after kill #{number + 1} the group did not come back"))
                self.restart_gone()
        self.node_back()
        self.final()

    def final(self) -> None:
        self.feeder.submit(len(self.feeder.lines), 2.0)  # the rest
        if not self.feeder.wait_idle(600):
            raise HarnessError("the input was not all produced after 10 min")
        self.caught_up = self.wait_caught_up()
        for slot in self.slots:
            if slot.worker is None:
                continue
            code, took, forced = slot.worker.terminate(STOP_TIMEOUT)
            self.stop_results[slot.name] = (code, took, forced)
            if code != 0 or forced:
                self.findings.append(Finding(True, (
                    f"worker {slot.name}: SIGTERM gave exit code {code} after {took:.1f}s"
                    f"{' (SIGKILL was needed)' if forced else ''}; its last log lines:\n{indent(slot.worker.tail())}")))

    def wait_caught_up(self) -> bool:
        """Until every input record is committed, both workers report no lag, and the output topics stopped
        growing (two polls 2 s apart agree)."""
        deadline = time.monotonic() + CATCH_UP_TIMEOUT
        progress_at, last_committed = time.monotonic(), -1
        previous: Offsets | None = None
        while time.monotonic() < deadline:
            if self.exited_by_itself():
                return False
            try:
                now = run_async(offsets(self.settings, self.repartition), timeout=30)
            except Exception as e:
                log(f"offsets: {type(e).__name__}: {e}")
                time.sleep(2)
                continue
            committed = sum(max(0, c) for c in now.committed.values())
            if committed != last_committed:
                progress_at, last_committed = time.monotonic(), committed
            lags = [raw_lag(scrape(s.worker.settings), self.settings.raw_topic)
                    for s in self.slots if s.worker is not None]
            done = (sum(now.raw_end.values()) == len(self.feeder.lines) and now.lag() == 0
                    and not any(v for lag in lags for v in lag.values()))
            if done and previous is not None and previous.outputs_end == now.outputs_end:
                return True
            previous = now if done else None
            if time.monotonic() - progress_at > STALL_TIMEOUT:
                self.findings.append(Finding(True, f"no progress for {STALL_TIMEOUT:.0f}s, lag {now.lag()}"))
                return False
            time.sleep(2)
        self.findings.append(Finding(True, f"the workers did not catch up within {CATCH_UP_TIMEOUT:.0f}s"))
        return False

    def stop_everything(self) -> None:
        self.feeder.stop()
        for slot in self.slots:
            if slot.worker is not None and slot.worker.alive:
                log(f"stopping worker {slot.name} (pid {slot.worker.proc.pid})")
                slot.worker.kill()
        self.feeder.join(30)

    # -- the report

    def headline(self, seed: int) -> str:
        where = "a three-broker cluster (replication factor 3, min ISR 2)" if self.cluster else "a single broker"
        return (f"group chaos: {self.settings.raw_topic}, {PARTITIONS} partitions, group {self.settings.group}, "
                f"2 workers on {where}, seed {seed}, {len(self.history)} kills, {self.settings.processing_guarantee}")

    def event_lines(self) -> list[str]:
        backs = sorted(k.back_after for k in self.history if k.back_after is not None)
        per_slot = ", ".join(f"{s.name}: {s.killed}" for s in self.slots)
        deleted = sum(1 for k in self.history if k.delete_state)
        return [
            f"kills survived        {len(backs)} of {len(self.history)} SIGKILLs of either worker ({per_slot}; "
            f"{deleted} restart{'s' if deleted != 1 else ''} with the state directory deleted); group whole again "
            f"after {spread(backs)}",
            f"{'broker' if self.cluster is None else 'cluster':<22}" + "; ".join(self.broker_events or ["-"]),
        ]


# -- 3c. network faults: two workers on test hosts, one cut off or paused at a time ------------------------------


@dataclass
class Fault:
    number: int
    slot: str
    at: float  # seconds into the input stream
    lasted: float  # from the cut (SIGSTOP) to the heal (SIGCONT)
    dropped_after: float | None  # the group went on without the worker: stable, the other holding everything
    back_after: float | None  # after the heal (SIGCONT): two members holding every partition again
    produced: int  # input records produced during the fault


class FaultChaos(GroupChaos):
    """Two workers in one group, each on its own test host, the input flowing at a steady rate. Three times, on
    one worker drawn at random, for FAULT_SECONDS: its host cut off the network (`partition`) or its process
    stopped (`pause`), then healed (continued) and the group whole again before the next. None is killed; at the
    end both are stopped with SIGTERM (`final`, as the group runs)."""

    def __init__(self, settings: Settings, run_dir: Path, feeder: Feeder, kind: str, hosts: Sequence[
            testhosts.TestHost], seed: int, rate: float) -> None:
        super().__init__(settings, run_dir, feeder, 0, seed, None, None)
        self.kind = kind
        self.rate = rate
        self.rng = random.Random(f"chaos-{kind}-{seed}")
        for slot, host in zip(self.slots, hosts, strict=True):
            slot.host = host
        self.faults: list[Fault] = []
        self.feed: Job | None = None
        self.feed_started = 0.0

    def run(self) -> None:
        if not self.start_group():
            return
        lines = len(self.feeder.lines)
        self.feed_started = time.monotonic()
        self.feed = self.feeder.submit(lines, lines / self.rate)
        log(f"feeding {lines:,} records at {self.rate:,.0f}/s over {lines / self.rate:.0f}s")
        for number in range(1, FAULTS + 1):
            time.sleep(self.rng.uniform(3.0, 8.0))
            slot = self.rng.choice(self.slots)
            if self.restart_gone():  # one exited by itself (reported): the group whole again first
                self.group_ready()
            self.fault(number, slot)
        self.final()

    def fault(self, number: int, slot: Slot) -> None:
        worker, host = slot.worker, slot.host
        assert worker is not None and host is not None
        at, produced = time.monotonic() - self.feed_started, self.feeder.produced
        what = f"test host {host.name} cut off" if self.kind == "partition" else f"pid {worker.proc.pid} stopped"
        log(f"fault #{number}/{FAULTS}: {self.kind} of worker {slot.name} ({what}) for {FAULT_SECONDS:.0f}s, "
            f"{at:.1f}s into the input")
        began = time.monotonic()
        try:
            if self.kind == "partition":
                host.cut()
            else:
                worker.proc.send_signal(signal.SIGSTOP)
            dropped = self.group_without_it(began + FAULT_SECONDS)
        finally:
            if self.kind == "partition":
                host.heal()
            elif worker.alive:
                worker.proc.send_signal(signal.SIGCONT)
        lasted = time.monotonic() - began
        back = self.group_ready()
        self.faults.append(Fault(number, slot.name, at, lasted, dropped, back, self.feeder.produced - produced))
        log(f"fault #{number}/{FAULTS}: {self.ended} after {lasted:.1f}s; the group went on without worker "
            f"{slot.name} after {fmt_s(dropped)}, whole again {fmt_s(back)} after that; produced "
            f"{self.feeder.produced:,}")
        if dropped is None:
            self.findings.append(Finding(False, f"fault #{number}: the group did not go on without worker "
                                                f"{slot.name} within {FAULT_SECONDS:.0f}s"))
        if back is None:
            self.findings.append(Finding(True, f"after fault #{number} ({self.kind} of worker {slot.name}) the group "
                                               f"was not whole again within {READY_TIMEOUT:.0f}s"))
            self.restart_gone()

    def group_without_it(self, until: float) -> float | None:
        """Waits until `until` (the fault's end); returns the seconds after which the group was stable with one
        member (the other worker) holding every partition (None: not seen). A worker exiting meanwhile is
        reported."""
        began, dropped = time.monotonic(), None
        while (left := until - time.monotonic()) > 0:
            self.exited_by_itself()
            if dropped is None:
                with contextlib.suppress(Exception):
                    state, members = run_async(kafka_admin.group_assignment(self.settings), timeout=min(left, 10))
                    if state == "Stable" and members == [set(range(PARTITIONS))]:
                        dropped = time.monotonic() - began
            time.sleep(min(1.0, max(0.0, until - time.monotonic())))
        return dropped

    def headline(self, seed: int) -> str:
        hosts = ", ".join(f"{s.name} on {s.host.name} ({s.host.address})" for s in self.slots if s.host)
        return (f"{self.kind} chaos: {self.settings.raw_topic}, {PARTITIONS} partitions, group {self.settings.group}, "
                f"2 workers on test hosts ({hosts}) of the broker at {self.settings.brokers}, seed {seed}, "
                f"{len(self.faults)} faults of {FAULT_SECONDS:.0f}s, {self.settings.processing_guarantee}")

    def event_lines(self) -> list[str]:
        drops = sorted(f.dropped_after for f in self.faults if f.dropped_after is not None)
        backs = sorted(f.back_after for f in self.faults if f.back_after is not None)
        per_slot = ", ".join(f"{s.name}: {sum(1 for f in self.faults if f.slot == s.name)}" for s in self.slots)
        lines = len(self.feeder.lines)
        took = self.feed.took if self.feed is not None else None
        fed = f"in {took:.0f}s ({lines / took:,.0f}/s)" if took else "(not all)"
        action = {"partition": "cut off", "pause": "SIGSTOP"}[self.kind]
        out = [f"input flow            {lines:,} records at {self.rate:,.0f}/s asked, fed {fed}",
               f"faults survived       {len(backs)} of {len(self.faults)} ({self.kind}, worker {per_slot}); group on "
               f"without it after {spread(drops)}, whole again {spread(backs)} after the {self.ended}"]
        for f in self.faults:
            out.append(f"  fault #{f.number:<13}worker {f.slot} {action} {f.at:.1f}s into the input for "
                       f"{f.lasted:.1f}s; the group on without it after {fmt_s(f.dropped_after)}, whole again "
                       f"{fmt_s(f.back_after)} after the {self.ended}; {f.produced:,} records produced meanwhile")
        return out

    @property
    def ended(self) -> str:
        """How the fault ends: a cut is healed, a stopped worker continued."""
        return "heal" if self.kind == "partition" else "SIGCONT"


def spread(values: Sequence[float]) -> str:
    """Sorted seconds as `min-max (median)`."""
    if not values:
        return "-"
    return f"{values[0]:.1f}-{values[-1]:.1f}s (median {values[len(values) // 2]:.1f}s)"


def group_report(checks: list[Check], chaos: GroupChaos, records: int, devices_seen: int, wall: float,
                 settings: Settings, seed: int, code: str, out: TextIO) -> bool:
    def w(text: str = "") -> None:
        print(text, file=out)

    failed = any(c.failed for c in checks) or any(f.fatal for f in chaos.findings)
    w()
    w(f"== {chaos.headline(seed)}; worker code {code}")
    for line in [*result_lines(checks, records, devices_seen), *chaos.event_lines()]:
        w(line)
    selfexits = sum(1 for f in chaos.findings if "exited by itself" in f.text)
    w(f"exits by themselves   {selfexits}")
    stops = ", ".join(f"{name}: exit {c} after {t:.1f}s{' (forced)' if forced else ''}"
                      for name, (c, t, forced) in chaos.stop_results.items())
    w(f"final SIGTERM         {stops or '-'}; caught up: {'yes' if chaos.caught_up else 'NO'}")
    w(f"wall time             {wall:.0f}s")
    for f in chaos.findings:
        w()
        w(("FAILURE: " if f.fatal else "note: ") + f.text)
    for check in checks:
        for kind, texts in check.problems.items():
            if texts:
                w()
                w(f"FAILURE: {check.name}: {check.counts.get(kind, 0):,} {kind}; the first:")
                for text in texts:
                    w(f"  - {text}")
    w()
    if failed:
        w("FAIL")
    elif settings.exactly_once:
        w("PASS: nothing lost, invented or duplicated, dead letters and states as replay's")
    else:
        w("PASS: nothing lost or invented, every duplicate identical, dead letters and states as replay's")
    return not failed


def error_kind(line: str) -> str:
    """A log line without its time, pid and numbers: lines that say the same thing count as one kind."""
    text = re.sub(r"^\[[^]]*\] \[\d+\] ", "", line)
    return re.sub(r"\d+", "N", text)[:160]


def fmt_s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f}s"


def fmt_n(value: float | None) -> str:
    return "-" if value is None else f"{int(value):,}"


def indent(text: str, prefix: str = "    | ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())


# -- 4. the checks -----------------------------------------------------------------------------------------


def canonical(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def brief(value: bytes | None, limit: int = 600) -> str:
    if value is None:
        return "(none)"
    text = value.decode(errors="replace")
    return text if len(text) <= limit else text[:limit] + "…"


@dataclass
class Check:
    name: str
    counts: dict[str, int] = field(default_factory=dict)
    problems: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def problem(self, kind: str, text: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if len(self.problems[kind]) < SHOW:
            self.problems[kind].append(text)

    @property
    def failed(self) -> bool:
        return any(self.problems.values())


def line_index(placed: Sequence[tuple[int, int] | None]) -> dict[tuple[int, int], int]:
    return {where: i for i, where in enumerate(placed) if where is not None}


def no_duplicates(checks: Sequence[Check]) -> None:
    """Exactly-once: a record read committed twice is a failure, however identical."""
    for c in checks:
        if c.counts.get("copies"):
            c.problem("duplicates (exactly-once)", f"{c.counts['copies']:,} records of the {c.name} topic were "
                      "committed more than once")


def check_enriched(records: Sequence[Any], ref: Reference, placed: dict[tuple[int, int], int],
                   raw_topic: str) -> Check:
    """No loss, no invention, duplicates identical: per device, the distinct records (first copy of each
    record_id, in partition order) must be replay's sequence for that device; each record must also be what
    the engine made of the raw record its record_id names."""
    c = Check("enriched")
    first_copy: dict[str, bytes] = {}
    repeated: set[str] = set()
    actual: dict[str, list[bytes]] = defaultdict(list)
    where: dict[str, set[int]] = defaultdict(set)
    copies = 0
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        value = orjson.loads(r.value)
        record_id = value.pop("record_id", None)
        m = RECORD_ID.fullmatch(record_id) if isinstance(record_id, str) else None
        if m is None or m["topic"] != raw_topic:
            c.problem("bad record_id", f"p{r.partition}@{r.offset}: record_id {record_id!r}: {brief(r.value)}")
            continue
        if record_id in first_copy:
            # written again after a crash: allowed, but only as the very bytes of the first copy
            copies += 1
            repeated.add(record_id)
            if first_copy[record_id] != r.value:
                c.problem("differing duplicates", f"{record_id} at p{r.partition}@{r.offset}:\n"
                          f"      first: {brief(first_copy[record_id])}\n      again: {brief(r.value)}")
            continue
        first_copy[record_id] = r.value
        device_id = value.get("device_id")
        if r.key != str(device_id).encode():
            c.problem("wrong key", f"p{r.partition}@{r.offset}: key {r.key!r}, device_id {device_id!r}")
        where[str(device_id)].add(r.partition)
        mine = canonical(value)
        actual[str(device_id)].append(mine)
        line = placed.get((int(m["partition"]), int(m["offset"])))
        n = int(m["n"])
        if line is None:
            c.problem("invented", f"{record_id} names no input record: {brief(r.value)}")
        elif n >= len(ref.outputs[line]) or canonical(orjson.loads(ref.outputs[line][n])) != mine:
            made = ref.outputs[line][n] if n < len(ref.outputs[line]) else None
            c.problem("not what the engine makes of its raw record", f"{record_id} (input line {line + 1}):\n"
                      f"      got:      {brief(r.value)}\n      expected: {brief(made)}")
    placed_at = {i: where for where, i in placed.items()}
    expected: dict[str, list[bytes]] = defaultdict(list)
    for line_bytes in ref.replay_enriched:
        value = orjson.loads(line_bytes)
        expected[value["device_id"]].append(canonical(value))
    origin: dict[bytes, int] | None = None  # expected record -> its input line, built only for a loss
    for device_id in sorted(expected.keys() | actual.keys()):
        a, e = actual.get(device_id, []), expected.get(device_id, [])
        if a == e:
            continue
        lost, extra = Counter(e) - Counter(a), Counter(a) - Counter(e)
        if lost and origin is None:
            origin = {canonical(orjson.loads(r)): i for i, rs in enumerate(ref.outputs) for r in rs}
        for record in lost.elements():
            i = origin.get(record, -1) if origin is not None else -1
            source = f"input line {i + 1}, raw p{placed_at[i][0]}@{placed_at[i][1]}" if i in placed_at else "?"
            c.problem("lost", f"device {device_id} ({source}): {brief(record)}")
        for record in extra.elements():
            c.problem("invented", f"device {device_id}: {brief(record)}")
        if not lost and not extra:
            i = next(i for i, (x, y) in enumerate(zip(a, e, strict=True)) if x != y)
            c.problem("out of order", f"device {device_id}, record #{i}:\n      got:      {brief(a[i])}\n"
                      f"      expected: {brief(e[i])}")
    for device_id, partitions in where.items():
        if len(partitions) > 1:
            c.problem("split device", f"device {device_id} has enriched records in partitions {sorted(partitions)}")
    c.counts.update(expected=len(ref.replay_enriched), distinct=len(first_copy), copies=copies,
                    duplicated_ids=len(repeated))
    return c


def check_dead_letters(records: Sequence[Any], ref: Reference, placed: dict[tuple[int, int], int],
                       raw_topic: str) -> Check:
    """The same multiset of dead letters as replay (all but `source`), a copy (same source) only when
    identical, and each the engine's dead letter for the raw record its source names."""
    c = Check("dead letters")
    first_copy: dict[tuple[int, int], bytes] = {}
    actual: Counter[bytes] = Counter()
    copies = 0
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        value = orjson.loads(r.value)
        source = value.pop("source", None)
        if not isinstance(source, dict) or source.get("topic") != raw_topic:
            c.problem("bad source", f"p{r.partition}@{r.offset}: {brief(r.value)}")
            continue
        partition, offset = source.get("partition"), source.get("offset")
        if type(partition) is not int or type(offset) is not int:
            c.problem("bad source", f"p{r.partition}@{r.offset}: {brief(r.value)}")
            continue
        key = (partition, offset)
        if key in first_copy:
            # a dead letter written again after a crash: allowed only as the very bytes of the first copy
            copies += 1
            if first_copy[key] != r.value:
                c.problem("differing duplicates", f"source p{partition}@{offset}:\n"
                          f"      first: {brief(first_copy[key])}\n      again: {brief(r.value)}")
            continue
        first_copy[key] = r.value
        mine = canonical(value)
        actual[mine] += 1
        line = placed.get(key)
        expected = ref.dead[line] if line is not None else None
        if line is None or expected is None:
            c.problem("invented", f"source p{partition}@{offset} is no input record that gives a dead letter: "
                      f"{brief(r.value)}")
        else:
            e = orjson.loads(expected)
            e.pop("source")
            if canonical(e) != mine:
                c.problem("not what the engine makes of its raw record",
                          f"source p{partition}@{offset} (input line {line + 1}):\n"
                          f"      got:      {brief(r.value)}\n      expected: {brief(expected)}")
    expected_letters: Counter[bytes] = Counter()
    for line_bytes in ref.replay_dead:
        value = orjson.loads(line_bytes)
        value.pop("source")
        expected_letters[canonical(value)] += 1
    for letter in (expected_letters - actual).elements():
        c.problem("lost", brief(letter))
    for letter in (actual - expected_letters).elements():
        c.problem("invented", brief(letter))
    c.counts.update(expected=len(ref.replay_dead), distinct=len(first_copy), copies=copies)
    return c


def check_states(changelog: Sequence[Any], ref: Reference, placed: Sequence[tuple[int, int] | None],
                 lines: Sequence[bytes]) -> Check:
    """The table's changelog (latest value per key) against replay's final states: the same devices, the same
    state, in the device's partition, reflecting exactly the raw record that last changed it."""
    c = Check("states")
    latest: dict[bytes, tuple[bytes, int]] = {}
    for r in sorted(changelog, key=lambda r: (r.partition, r.offset)):
        if r.key is None:
            continue
        if is_internal(r.key):
            continue  # the partition's own keys (applied offsets, batch plan), not a device's state
        if r.value is None:
            latest.pop(r.key, None)  # a tombstone: the table deleted the key
        else:
            latest[r.key] = (r.value, r.partition)
    stored: dict[str, tuple[DeviceState, dict[int, int], int]] = {}
    for key, (value, partition) in latest.items():
        try:
            state, applied = codec.decode_stored(value)
        except Exception as e:
            c.problem("undecodable", f"{key!r}: {type(e).__name__}: {e}: {brief(value)}")
            continue
        stored[key.decode(errors="replace")] = (state, applied, partition)
    for device_id in sorted(ref.states.keys() | stored.keys()):
        expected = ref.states.get(device_id)
        got = stored.get(device_id)
        if expected is None:
            have_json = codec.state_as_json(got[0]) if got is not None else None
            c.problem("state mismatches", f"{device_id}: stored, but replay gives it no state: "
                      f"{orjson.dumps(have_json).decode()}")
            continue
        if got is None:
            c.problem("state mismatches", f"{device_id}: no stored state; replay's: "
                      f"{orjson.dumps(codec.state_as_json(expected)).decode()}")
            continue
        state, applied, partition = got
        want, have = codec.state_as_json(expected), codec.state_as_json(state)
        if want != have:
            c.problem("state mismatches", f"{device_id}:\n      stored: {orjson.dumps(have).decode()}\n"
                      f"      replay: {orjson.dumps(want).decode()}")
        last = ref.last_change[device_id]
        where = placed[last]
        # the state's mark for its raw partition: at least the last raw record that changed it (the marks of
        # forwarded records' source partitions may stand beside it). Later when the persons stage wrote the
        # state again (a claim, an owner's answer) without changing its identity
        if where is not None and applied.get(where[0], -1) < where[1]:
            c.problem("applied offsets", f"{device_id}: the state says it reflects {applied}, the last raw record "
                      f"that changed it is p{where[0]}@{where[1]} (input line {last + 1}: {brief(lines[last], 200)})")
        if where is not None and partition != where[0]:
            c.problem("wrong partition", f"{device_id}: changelog partition {partition}, raw partition {where[0]}")
    c.counts.update(expected=len(ref.states), stored=len(stored), changelog_records=len(changelog))
    return c


def persons_table(records: Sequence[Any]) -> dict[str, bytes]:
    """The persons topic as a table: the last value per key, a tombstone removing the key."""
    final: dict[str, bytes] = {}
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        key = r.key.decode(errors="replace") if r.key is not None else ""
        if r.value is None:
            final.pop(key, None)
        else:
            final[key] = r.value
    return final


def check_persons(settings: Settings, ref: Reference, timeout: float = 180.0) -> Check:
    """The persons topic's final mapping against `replay --persons`'s (it settles shortly after the enriched
    output: the stage's messages go through its own topic)."""
    c = Check("persons")
    deadline = time.monotonic() + timeout
    while True:
        got = persons_table(read_topic(settings, settings.persons_topic))
        if got == ref.persons or time.monotonic() > deadline:
            break
        time.sleep(2.0)
    for user in sorted(ref.persons.keys() | got.keys()):
        want, have = ref.persons.get(user), got.get(user)
        if want is None:
            c.problem("persons invented", f"{user}: {brief(have or b'')}")
        elif have is None:
            c.problem("persons missing", f"{user}: replay's {brief(want)}")
        elif want != have:
            c.problem("persons differing", f"{user}:\n      topic:  {brief(have)}\n      replay: {brief(want)}")
    c.counts.update(expected=len(ref.persons), mapped=len(got))
    return c


def read_topic(settings: Settings, topic: str) -> list[Any]:
    try:
        return list(run_async(kafka_clients.read_all(settings, topic, idle_timeout=10.0), timeout=900))
    except kafka_admin.TopicMissing:
        return []


# -- the report --------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    checks: list[Check]
    chaos: Chaos
    records: int
    devices_seen: int
    wall: float
    phases: dict[str, float]
    seed: int
    code: str  # the commit the worker ran at the start of the chaos

    @property
    def ok(self) -> bool:
        return not any(c.failed for c in self.checks) and not any(f.fatal for f in self.chaos.findings)


def code_version() -> str:
    """The worker code the run exercised: the commit, and the files of `streams/` changed since (other people
    edit the tree while a run goes on)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "streams"], cwd=ROOT, capture_output=True,
                               text=True, timeout=30).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    changed = [line[3:] for line in dirty if line.strip()]
    return f"{head or '?'}" + (f" + uncommitted changes in {', '.join(changed)}" if changed else "")


def result_lines(checks: Sequence[Check], records: int, devices_seen: int) -> list[str]:
    """The report's lines on what came out: losses, inventions, duplicates; the states and the persons last."""
    enriched, dead, states, persons = checks
    wrong = "not what the engine makes of its raw record"

    def n(check: Check, key: str) -> int:
        return check.counts.get(key, 0)

    lines: list[str] = []
    lines.append(f"records in            {records:,} raw records over {devices_seen:,} devices "
                 f"(replay: {n(enriched, 'expected'):,} enriched, {n(dead, 'expected'):,} dead letters)")
    lines.append(f"enriched out          {n(enriched, 'distinct'):,} distinct / "
                 f"{n(enriched, 'distinct') + n(enriched, 'copies'):,} with duplicates")
    lines.append(f"dead letters          {n(dead, 'distinct'):,} distinct / {n(dead, 'distinct') + n(dead, 'copies'):,}"
                 f" with duplicates")
    lines.append(f"lost                  {n(enriched, 'lost'):,} enriched, {n(dead, 'lost'):,} dead letters")
    lines.append(f"invented / wrong      {n(enriched, 'invented') + n(dead, 'invented'):,} / "
                 f"{n(enriched, wrong) + n(dead, wrong):,} (out of order: {n(enriched, 'out of order'):,})")
    lines.append(f"duplicated            {n(enriched, 'copies'):,} enriched copies of "
                 f"{n(enriched, 'duplicated_ids'):,} records, {n(dead, 'copies'):,} dead-letter copies")
    lines.append(f"differing duplicates  {n(enriched, 'differing duplicates') + n(dead, 'differing duplicates'):,}")
    lines.append(f"state mismatches      {n(states, 'state mismatches'):,} of {n(states, 'expected'):,} devices with "
                 f"state ({n(states, 'stored'):,} stored, {n(states, 'changelog_records'):,} changelog records; "
                 f"applied-offset mismatches {n(states, 'applied offsets'):,}, wrong partition "
                 f"{n(states, 'wrong partition'):,})")
    lines.append(f"persons mapping       {n(persons, 'mapped'):,} mapped on the topic, replay "
                 f"{n(persons, 'expected'):,}; "
                 f"missing {n(persons, 'persons missing'):,}, invented {n(persons, 'persons invented'):,}, "
                 f"differing {n(persons, 'persons differing'):,}")
    return lines


def report(o: Outcome, settings: Settings, out: TextIO) -> None:
    chaos = o.chaos
    kills = [life for life in chaos.lives if life.plan.mode != "final"]
    # a kill is survived when the next start came back; a start killed on purpose during start-up counts with
    # the kill before it (the worker after it has to come back from both)
    not_back = sum(1 for life in chaos.lives[1:] if life.came_back is False)
    startup_kills = sum(1 for life in kills if life.plan.mode == "startup")
    deleted = sum(1 for life in chaos.lives if life.plan.delete_state)
    mid_stream = sum(1 for life in kills if life.uncommitted)

    def w(text: str = "") -> None:
        print(text, file=out)

    if chaos.broker_survived:
        broker_fate = f"worker survived it, back at work after {fmt_s(chaos.broker_recovery)}"
    else:
        broker_fate = "worker did NOT survive it" if chaos.broker_survived is False else "-"
    stop = chaos.stop_result
    stopped = "-" if stop is None else f"exit {stop[0]} after {stop[1]:.1f}s" + (" (forced)" if stop[2] else "")
    w()
    w(f"== chaos: {settings.raw_topic}, {PARTITIONS} partitions, group {settings.group}, seed {o.seed}, "
      f"{len(kills)} kills, {settings.processing_guarantee}; worker code {o.code}")
    results = result_lines(o.checks, o.records, o.devices_seen)
    for line in results[:-1]:
        w(line)
    w(f"kills survived        {len(kills) - not_back} of {len(kills)} SIGKILLs ({mid_stream} with unprocessed input "
      f"at the kill, {startup_kills} during start-up, {deleted} restarts with the state directory deleted)")
    w(f"broker restarts       {len(chaos.broker.restarts)} (" + ", ".join(f"{t:.1f}s" for t in chaos.broker.restarts)
      + f"; {broker_fate})")
    w(results[-1])
    w(f"final SIGTERM         {stopped}; caught up: {'yes' if chaos.caught_up else 'NO'}")
    w(f"wall time             {o.wall:.0f}s (" + ", ".join(f"{k} {v:.0f}s" for k, v in o.phases.items()) + ")")
    w()
    w("lives: #  mode      ready   lived  exit  read     skipped  batches  lag@end  uncommitted  notes")
    for life in chaos.lives:
        flags = (["state deleted"] if life.plan.delete_state else []) + life.notes
        w(f"     {life.number:>3} {life.plan.mode:8} {fmt_s(life.ready_after):>6} {life.lived:6.1f}s "
          f"{life.exit_code!s:>4}  {fmt_n(life.records_in):>8} {fmt_n(life.skipped):>8} {fmt_n(life.batches):>8} "
          f"{fmt_n(life.lag_at_end):>8} {fmt_n(life.uncommitted):>12}  {'; '.join(flags)}")
    errors = [(life.number, line) for life in chaos.lives for line in life.worker.errors()]
    w()
    w(f"worker log: {chaos.log_path} ({len(errors)} ERROR/CRITICAL/traceback lines; by kind, with the lives "
      f"they came from, and the first of each kind)")
    kinds: dict[str, tuple[int, set[int], str]] = {}
    for number, line in errors:
        kind = error_kind(line)
        count, lives, first = kinds.get(kind, (0, set(), line))
        kinds[kind] = (count + 1, lives | {number}, first)
    for _kind, (count, lives, first) in sorted(kinds.items(), key=lambda item: -item[1][0]):
        w(f"    {count:>5} x in lives {','.join(map(str, sorted(lives)))}: {first[:300]}")
    for f in chaos.findings:
        w()
        w(("FAILURE: " if f.fatal else "note: ") + f.text)
    for check in o.checks:
        for kind, texts in check.problems.items():
            if not texts:
                continue
            w()
            w(f"FAILURE: {check.name}: {check.counts.get(kind, 0):,} {kind}; the first:")
            for text in texts:
                w(f"  - {text}")
    w()
    if not o.ok:
        w("FAIL")
    elif settings.exactly_once:
        w("PASS: nothing lost, invented or duplicated, dead letters and states as replay's")
    else:
        w("PASS: nothing lost or invented, every duplicate identical, dead letters and states as replay's")


# -- 5. main -----------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Kill the worker (SIGKILL) again and again while it consumes, restart the broker once, then "
                    "compare its output and table with replay's for the same input.")
    parser.add_argument("--records", type=int, default=200_000, help="raw records to generate (default 200,000)")
    parser.add_argument("--devices", type=int, default=None, help="devices (default: records / 10)")
    parser.add_argument("--kills", type=int, default=24, help="SIGKILLs of the worker (default 24)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the input, the kill moments and the plan")
    parser.add_argument("--keep", action="store_true", help="keep the run's topics and state directory")
    parser.add_argument("--brokers", default=BROKERS, help=f"bootstrap servers (default {BROKERS})")
    parser.add_argument("--processing-guarantee", choices=["at_least_once", "exactly_once"], default="at_least_once",
                        help="the worker's delivery mode; exactly_once also fails on any duplicate "
                             "(default at_least_once)")
    parser.add_argument("--group", action="store_true",
                        help="two workers in one group, either one killed at random, and the broker restarted once")
    parser.add_argument("--cluster", action="store_true",
                        help="with --group: on the three-broker cluster (scripts/kafka.sh cluster-start), one node "
                             "killed with SIGKILL and started again instead of the broker restart")
    parser.add_argument("--faults", choices=FAULT_KINDS, default=None,
                        help=f"two workers in one group, each on its own test host (root): {FAULTS} times one of "
                             f"them cut off the network (partition) or stopped with SIGSTOP (pause) for "
                             f"{FAULT_SECONDS:.0f}s while the input flows; none killed")
    parser.add_argument("--rate", type=float, default=None,
                        help=f"with --faults: input records per second (default {FEED_RATE:,.0f}, less for an input "
                             f"smaller than {FEED_RATE * FEED_SECONDS:,.0f}: it flows for {FEED_SECONDS:.0f}s)")
    args = parser.parse_args(argv)
    if args.cluster and not args.group:
        parser.error("--cluster goes with --group")
    if args.faults and (args.group or args.cluster):
        parser.error("--faults runs its own two workers: not with --group or --cluster")
    if args.rate is not None and (not args.faults or args.rate <= 0):
        parser.error("--rate goes with --faults, and must be positive")
    if args.records < 100 or args.kills < 1:
        parser.error("--records must be at least 100 and --kills at least 1")
    args.devices = args.devices or max(1, args.records // 10)
    args.rate = args.rate or min(FEED_RATE, args.records / FEED_SECONDS)
    return args


def run_settings(stamp: str, run_dir: Path, brokers: str, guarantee: str) -> Settings:
    name = f"chaos-{stamp}"
    return replace(
        Settings(), brokers=brokers, raw_topic=f"{name}.raw", enriched_topic=f"{name}.enriched",
        dead_letter_topic=f"{name}.dead-letter", persons_topic=f"{name}.persons", group=name,
        state_dir=str(run_dir / "state"),
        partitions=PARTITIONS, log_level="info", processing_guarantee=guarantee,
    )


@contextlib.contextmanager
def terminate_as_exit() -> Iterator[None]:
    """SIGTERM on the harness runs its cleanup (stop the worker, delete the topics) like Ctrl-C does."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def timed(phases: dict[str, float], name: str, step: Callable[[], Any]) -> Any:
    started = time.monotonic()
    try:
        return step()
    finally:
        phases[name] = time.monotonic() - started


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # the harness's own Kafka clients log every refused connection while a broker is down: the report says
    # what matters
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    started = time.monotonic()
    phases: dict[str, float] = {}
    stamp = f"{time.strftime('%Y%m%d%H%M%S')}-{os.getpid()}"
    run_dir = CHAOS_DIR / stamp
    run_dir.mkdir(parents=True, exist_ok=True)
    settings = run_settings(stamp, run_dir, args.brokers, args.processing_guarantee)
    faults = f"{FAULTS} {args.faults} faults of {FAULT_SECONDS:.0f}s" if args.faults else f"{args.kills} kills"
    log(f"run {stamp}: {args.records:,} records, {args.devices:,} devices, {faults}, seed {args.seed}, "
        f"{args.processing_guarantee}; files in {run_dir}")

    path = timed(phases, "input", lambda: generate(input_path(args.records, args.devices, args.seed),
                                                   args.records, args.devices, args.seed))
    lines = read_lines(path)
    log(f"input {path.name}: {len(lines):,} records")
    try:
        ref = timed(phases, "reference", lambda: build_reference(path, lines, run_dir))
    except HarnessError as e:
        print(f"chaos: {e}", file=sys.stderr)
        return 2
    log(f"reference: {ref.replay_summary}; {len(ref.states):,} devices with state")

    if args.group or args.faults:
        return main_group(args, settings, run_dir, lines, ref, started)

    broker: Broker | None = None
    chaos: Chaos | None = None
    try:
        with terminate_as_exit():
            broker = Broker()
            broker.ensure_up()
            run_async(kafka_admin.ensure_topics(settings, PARTITIONS))
            feeder = Feeder(settings, lines)
            feeder.start()
            plan = make_plan(args.kills, len(lines), args.seed)
            chaos = Chaos(settings, run_dir, feeder, plan, broker, args.seed)
            code = code_version()
            try:
                timed(phases, "chaos", chaos.run)
            finally:
                chaos.stop_everything()
            if feeder.error is not None or not feeder.finished:
                raise HarnessError(f"the input was not all produced ({feeder.produced:,} of {len(lines):,}): "
                                   f"{feeder.error!r}")
            log("reading the enriched, dead-letter and changelog topics")
            changelog_topic = f"{settings.group}-devices-changelog"
            enriched, dead, changelog = timed(phases, "read", lambda: (
                read_topic(settings, settings.enriched_topic), read_topic(settings, settings.dead_letter_topic),
                read_topic(settings, changelog_topic)))
            placed = line_index(feeder.placed)
            checks = timed(phases, "compare", lambda: [
                check_enriched(enriched, ref, placed, settings.raw_topic),
                check_dead_letters(dead, ref, placed, settings.raw_topic),
                check_states(changelog, ref, feeder.placed, lines),
                check_persons(settings, ref),
            ])
            if settings.exactly_once:
                no_duplicates(checks[:2])
            devices_seen = len({k for k in feeder.keys if k is not None})
            outcome = Outcome(checks, chaos, len(lines), devices_seen, time.monotonic() - started, phases,
                              args.seed, code)
            with open(run_dir / "report.txt", "w") as f:
                report(outcome, settings, f)
            report(outcome, settings, sys.stdout)
            if outcome.ok and not args.keep:
                # replay's output is ~90 MB a run, and only worth keeping to look into a failure
                for name in ("replay.jsonl", "replay-dead.jsonl", "replay-persons.jsonl"):
                    (run_dir / name).unlink(missing_ok=True)
            return 0 if outcome.ok else 1
    except HarnessError as e:
        print(f"chaos: {e}", file=sys.stderr)
        if chaos is not None:
            for finding in chaos.findings:
                print(("FAILURE: " if finding.fatal else "note: ") + finding.text, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("chaos: interrupted", file=sys.stderr)
        return 130
    finally:
        if chaos is not None:
            chaos.stop_everything()
        cleanup(settings, run_dir, broker, args.keep)


def main_group(args: argparse.Namespace, settings: Settings, run_dir: Path, lines: list[bytes], ref: Reference,
               started: float) -> int:
    """make chaos's group runs: two workers, either one killed at random, and a broker restarted (single
    broker) or killed and started again (the three-broker cluster); or (--faults) two workers on test hosts,
    one cut off or paused at a time."""
    broker: Broker | ClusterBroker | None = None
    chaos: GroupChaos | None = None
    hosts: list[testhosts.TestHost] = []
    try:
        with terminate_as_exit():
            if args.cluster:
                broker = cluster = ClusterBroker()
                cluster.ensure_up()
                settings = replace(settings, brokers=cluster.brokers())
                chaos_broker: Broker | None = None
            else:
                broker = chaos_broker = Broker()
                broker.ensure_up()
                cluster = None
            if args.faults:
                hosts = make_test_hosts()
                settings = replace(settings, brokers=testhosts.BROKERS)  # the listener the test hosts reach
            run_async(kafka_admin.ensure_topics(settings, PARTITIONS))
            feeder = Feeder(settings, lines)
            feeder.start()
            if args.faults:
                chaos = FaultChaos(settings, run_dir, feeder, args.faults, hosts, args.seed, args.rate)
            else:
                chaos = GroupChaos(settings, run_dir, feeder, args.kills, args.seed, chaos_broker, cluster)
            code = code_version()
            try:
                chaos.run()
            finally:
                chaos.stop_everything()
            if feeder.error is not None or not feeder.finished:
                raise HarnessError(f"the input was not all produced ({feeder.produced:,} of {len(lines):,}): "
                                   f"{feeder.error!r}")
            log("reading the enriched, dead-letter and changelog topics")
            enriched = read_topic(settings, settings.enriched_topic)
            dead = read_topic(settings, settings.dead_letter_topic)
            changelog = read_topic(settings, f"{settings.group}-devices-changelog")
            placed = line_index(feeder.placed)
            checks = [check_enriched(enriched, ref, placed, settings.raw_topic),
                      check_dead_letters(dead, ref, placed, settings.raw_topic),
                      check_states(changelog, ref, feeder.placed, lines), check_persons(settings, ref)]
            if settings.exactly_once:
                no_duplicates(checks[:2])
            devices_seen = len({k for k in feeder.keys if k is not None})
            wall = time.monotonic() - started
            with open(run_dir / "report.txt", "w") as f:
                group_report(checks, chaos, len(lines), devices_seen, wall, settings, args.seed, code, f)
            ok = group_report(checks, chaos, len(lines), devices_seen, wall, settings, args.seed, code, sys.stdout)
            if ok and not args.keep:
                for name in ("replay.jsonl", "replay-dead.jsonl", "replay-persons.jsonl"):
                    (run_dir / name).unlink(missing_ok=True)
            return 0 if ok else 1
    except testhosts.Unavailable as e:
        print(f"chaos: cannot make test hosts here: {e}", file=sys.stderr)
        return 2
    except HarnessError as e:
        print(f"chaos: {e}", file=sys.stderr)
        if chaos is not None:
            for finding in chaos.findings:
                print(("FAILURE: " if finding.fatal else "note: ") + finding.text, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("chaos: interrupted", file=sys.stderr)
        return 130
    finally:
        if chaos is not None:
            chaos.stop_everything()
        remove_test_hosts(hosts)
        cleanup(settings, run_dir, broker, args.keep)


def make_test_hosts() -> list[testhosts.TestHost]:
    """Two fresh test hosts, after removing those a run killed before its clean-up left. Raises
    testhosts.Unavailable where this machine cannot make them, HarnessError where the broker is not there for
    them."""
    testhosts.ensure_tools()
    if not testhosts.broker_reachable():
        raise HarnessError(f"the broker does not listen on {testhosts.BROKERS} for the test hosts: it was started "
                           "before scripts/kafka.sh added that listener, or not as root (`bash scripts/kafka.sh "
                           "restart` as root)")
    testhosts.remove_all()
    try:
        hosts = testhosts.make_hosts(2, first=FIRST_TEST_HOST)
    except RuntimeError as e:  # a step of making one failed: what was made goes
        testhosts.remove_all()
        raise HarnessError(f"making the test hosts failed: {e}") from e
    log("test hosts: " + ", ".join(f"{h.name} ({h.address})" for h in hosts))
    return hosts


def remove_test_hosts(hosts: Sequence[testhosts.TestHost]) -> None:
    """Healed and removed (their workers are stopped first), whatever happened."""
    for host in hosts:
        try:
            host.heal()
            host.remove()
        except Exception as e:
            print(f"chaos: removing test host {host.name}: {type(e).__name__}: {e}", file=sys.stderr)


def cleanup(settings: Settings, run_dir: Path, broker: Broker | ClusterBroker | None, keep: bool) -> None:
    """Delete the run's topics and state directory (unless --keep), and leave the broker as it was found."""
    if broker is None:
        return
    try:
        if not keep:
            broker.ensure_up()  # a failure mid-restart may have left it down: the topics go all the same
            deleted = run_async(delete_topics(settings.brokers, settings.group))
            log(f"deleted {len(deleted)} topics: {', '.join(deleted)}")
            shutil.rmtree(settings.state_dir, ignore_errors=True)
            for name in ("state-a", "state-b"):  # group runs: one per worker
                shutil.rmtree(run_dir / name, ignore_errors=True)
        else:
            log(f"kept the topics {settings.group}* and the state directory {settings.state_dir}")
    except Exception as e:
        print(f"chaos: cleanup: {type(e).__name__}: {e}", file=sys.stderr)
    finally:
        broker.leave_as_found()


if __name__ == "__main__":
    sys.exit(main())
