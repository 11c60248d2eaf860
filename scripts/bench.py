"""make bench: how fast the worker is, measured side by side with what it is compared with, on one input.

One run, one deterministic input (seeded), and every figure next to its reference from the same run, because
the machine is small and shared: absolute numbers move from run to run, ratios much less.

1. generate a realistic raw stream (JSONL under .cache/bench/, reused when it exists);
2. load it into a fresh raw topic, keyed by device_id;
3. measure, each on fresh output topics, consumer group and state directory, one after the other:
   - the ceilings: a bare aiokafka consume-and-produce passthrough (no logic at all), twice, each named by
     its delivery contract: fire-and-forget (acks=1, offsets committed without waiting for acks) and
     at-least-once (acks=all, offsets committed only after the outputs are acknowledged: the worker's);
   - the baseline: a stock Faust agent around the same engine (scripts/bench_baseline.py), on a prefix;
   - the worker end to end (`python -m streams worker`), its CPU per event and peak RSS;
   - the peers, the same shape of work at their default settings (bench/peers/): a Kafka Streams app (its jar
     built by Maven on first use into .cache/bench-peers/) and a Quix Streams app, each a RocksDB store
     with a changelog keyed by device, one output per input carrying the device's running identity;
   - the worker's added latency at a fixed lower input rate;
   - `python -m streams replay` offline, and its RSS with `--state-dir` at 1x and 10x the devices;
   - correctness: the worker's output must equal replay's for the same input (fields the schema marks
     "worker output only" set aside and checked on their own), else FAIL and exit 1;
   - the persons stage: --records over as many device IDs (their own raw topic), the worker with
     STREAMS_PERSONS=off then on, alternating, twice; the on/off ratio of events/s, and each run's output
     against replay's, the persons topic's final mapping against `replay --persons`'s (polled until it
     settles), how long it took to settle after the enriched output, and how many device users it maps;
4. print a markdown table and write it to .cache/bench/last.md.

Throughput of a consumer = input records / (last - first output record's broker append time): the output
topics are created with message.timestamp.type=LogAppendTime, so the broker's clock stamps them.

    .venv/bin/python scripts/bench.py [--records N] [--devices D] [--quick] [--keep]

`--persons-only` runs only the persons stage's part (report in .cache/bench/last-persons.md):

    .venv/bin/python scripts/bench.py --persons-only [--records N] [--persons-pairs N] [--persons-timeout S]

`--scale` (make bench-scale) runs the scale runs instead, each beside its own ceiling and checked against
replay: (a) --records (default 1,000,000) over as many device IDs; (b) --state-devices (default 10,000,000)
logged in through the worker, which is restarted on its state, then --records over them; (c) two workers in
one group against one on (a)'s input; the peers beside (a). Report in .cache/bench/last-scale.md.

    .venv/bin/python scripts/bench.py --scale [--records N] [--state-devices N] [--brokers HOST:PORT] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import hashlib
import importlib.metadata
import itertools
import logging
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, ClassVar

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.partitioner import murmur2

from streams.config import env_name
from streams.kafka.clients import device_key

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / ".cache" / "bench"
PYTHON = sys.executable
PARTITIONS = 4
# the worker's own fetch size (STREAMS_BATCH_RECORDS' default): the ceiling fetches as much per batch
BATCH_RECORDS = 10_000
LOG_APPEND_TIME = {"message.timestamp.type": "LogAppendTime"}
STALL_SECONDS = 180.0  # a consumer that makes no progress this long has failed (startup included)
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A measurement could not be made (a child died, a consumer stalled): the run fails."""


# -- sizes and names -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    records: int
    devices: int
    baseline_records: int  # the stock Faust agent is slow: it runs on the input's first records only
    wide_devices: int  # devices of the second input, for replay's RSS against the number of devices
    latency_rate: int
    latency_seconds: float
    seed: int
    quick: bool
    persons_pairs: int = 2  # the persons stage off then on, this many times
    persons_timeout: float = 120.0

    @property
    def latency_records(self) -> int:
        return int(self.latency_rate * self.latency_seconds)


@dataclass(frozen=True)
class Names:
    """Every topic, group and directory of one run holds its stamp: cleanup deletes the topics by it."""

    stamp: str
    run_dir: Path

    def topic(self, name: str) -> str:
        return f"{self.stamp}.{name}"

    def group(self, name: str) -> str:
        return f"{self.stamp}-{name}"


# -- 1. the input ------------------------------------------------------------------------------------------

GENERATOR_VERSION = 1  # bump when the generator changes: cached inputs are named after it
T0_MS = 1_712_000_000_000
BAD_RATE = 0.001
PLATFORM_WEIGHTS = {
    "mp-wechat": 40, "web": 22, "mp-alipay": 10, "mp-bytedance": 8, "mp-baidu": 4, "mp-jd": 4,
    "mp-kuaishou": 3, "mp-xiaohongshu": 3, "mp-taobao": 2, "mp-qq": 2, "mp-feishu": 2,
}  # fmt: skip
NO_ASSOCIATION = {"mp-jd", "mp-kuaishou", "mp-qq"}  # no bind/unbind, no login under a key there
# cumulative probabilities of the valid actions; the rest of each draw is `track` (~90% in all)
ACTIONS = list(itertools.accumulate([0.02, 0.02, 0.015, 0.012, 0.012, 0.008, 0.008]))
ACTION_NAMES = ["set_customer_ids", "login", "bind", "logout", "identify", "unbind", "profile_set"]
MP_EVENTS = ["$MPViewScreen"] * 6 + ["$MPClick"] * 3 + ["$MPShow", "$MPLaunch", "$MPHide", "buttonClick",
                                                        "buttonClick", "addToCart", "payOrder", "search"]
WEB_EVENTS = ["$pageview"] * 6 + ["$WebClick"] * 3 + ["$WebStay", "buttonClick", "buttonClick", "addToCart",
                                                      "search"]
PATHS = ["pages/index/index", "pages/goods/detail", "pages/cart/cart", "pages/order/list", "pages/me/me",
         "pages/search/result", "pages/activity/spring"]
REFERRERS = ["直接打开", "pages/index/index", "pages/goods/detail", "扫一扫", "分享卡片"]
TITLES = ["首页", "商品详情", "购物车", "我的订单", "个人中心", "Home", "Spring sale"]
BIND_KEYS = ["$identity_mobile", "$identity_email"]
BAD_KEYS = ["1abc", "mobile-no", "$identity mobile", "邮箱"]
UNKNOWN_PLATFORMS = ["mp-tiktok", "android", "mp-weibo"]


@dataclass(slots=True)
class Device:
    device_id: str
    platform: str
    user: str  # the login ID of the person on this device
    login_key: str | None = None  # the generator's view of the login, only to keep the actions plausible
    bound: dict[str, str] = field(default_factory=dict)


def make_device_id(rng: random.Random, platform_name: str) -> str:
    if platform_name == "web":  # the Web JS SDK's cookie ID
        return (f"{rng.getrandbits(56):014x}-{rng.getrandbits(64):016x}-{rng.getrandbits(32):08x}-"
                f"{rng.choice(('1296000', '2073600', '3686400'))}-{rng.getrandbits(56):014x}")
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
        devices.append(Device(device_id, p, str(60_000_000_000_000_000 + rng.randrange(users) * 7919)))
    return devices


def phone(rng: random.Random) -> str:
    return f"1{rng.choice('3578')}{rng.randrange(10)}****{rng.randrange(10_000):04d}"


def track_fields(rng: random.Random, device: Device) -> tuple[str, dict[str, Any] | None]:
    if device.platform == "web":
        event = rng.choice(WEB_EVENTS)
        props: dict[str, Any] = {"$url": f"https://shop.example.com/{rng.choice(PATHS)}",
                                 "$title": rng.choice(TITLES), "$timezone_offset": -480}
    else:
        event = rng.choice(MP_EVENTS)
        props = {"$url_path": rng.choice(PATHS), "$referrer": rng.choice(REFERRERS), "$title": rng.choice(TITLES)}
        if event == "$MPLaunch":
            props["$scene"] = f"a{1000 + rng.randrange(200)}"
    if not event.startswith("$"):
        props["product_id"] = f"sku-{rng.randrange(50_000)}"
        props["price"] = round(rng.uniform(1, 500), 2)
    if rng.random() < 0.05:
        return event, None
    return event, props


def valid_record(rng: random.Random, device: Device, t: int) -> dict[str, Any]:
    """One valid raw record for this device, its action drawn from ACTIONS, plausible for its state."""
    rec: dict[str, Any] = {"device_id": device.device_id, "platform": device.platform}
    associates = device.platform not in NO_ASSOCIATION
    draw = rng.random()
    action = ACTION_NAMES[bisect.bisect(ACTIONS, draw)] if draw < ACTIONS[-1] else "track"
    if action in ("bind", "unbind") and not associates:
        action = "track"
    if action == "track":
        if rng.random() < 0.8:  # `action` defaults to track: some producers leave it out
            rec["action"] = "track"
        rec["event"], props = track_fields(rng, device)
        if props is not None:
            rec["properties"] = props
    elif action == "login":
        rec["action"] = "login"
        if associates and rng.random() < 0.25:  # loginWithKey
            rec["key"] = device.login_key = rng.choice(BIND_KEYS)
            rec["id"] = phone(rng) if rec["key"] == "$identity_mobile" else f"u{rng.randrange(10**6)}@example.com"
        else:
            rec["id"] = device.user
            device.login_key = "$identity_login_id"
        device.bound.clear()
    elif action == "logout":
        rec["action"] = "logout"
        device.login_key = None
        device.bound.clear()
    elif action == "identify":
        rec["action"] = "identify"
        rec["id"] = f"oX{rng.getrandbits(104):026x}"  # a WeChat openid-like ID
    elif action == "bind":
        key = rng.choice([k for k in BIND_KEYS if k != device.login_key])  # binding the login's key is refused
        value = phone(rng) if key == "$identity_mobile" else f"u{rng.randrange(10**6)}@example.com"
        device.bound[key] = value
        rec.update(action="bind", key=key, value=value)
    elif action == "unbind":
        if device.bound and rng.random() < 0.8:
            key = rng.choice(sorted(device.bound))
            value = device.bound.pop(key)
        else:
            key, value = "$identity_mobile", phone(rng)
        rec.update(action="unbind", key=key, value=value)
    elif action == "set_customer_ids":
        rec["action"] = "set_customer_ids"
        r = rng.random()
        if r < 0.4:  # the login bridge: AUTHENTICATED userid logs in
            rec["customer_ids"] = {"userid": {"id": device.user, "authState": "AUTHENTICATED"}}
            device.login_key = "$identity_login_id"
            device.bound.clear()
        elif r < 0.6:  # and LOGGED_OUT logs out
            rec["customer_ids"] = {"userid": {"id": device.user, "authState": "LOGGED_OUT"}}
            device.login_key = None
            device.bound.clear()
        elif r < 0.85:
            rec["customer_ids"] = {"dpuuid": f"{rng.getrandbits(128):032x}"}
        else:
            rec["customer_ids"] = {"email": {"id": f"u{rng.randrange(10**6)}@example.com", "authState": 1}}
            rec["hash"] = "SHA-256"
    else:
        rec["action"] = "profile_set"
        rec["properties"] = {"city": rng.choice(["上海", "北京", "深圳", "杭州"]), "vip_level": rng.randrange(5),
                             "gender": rng.choice(["f", "m"])}
    rec["time"] = t
    return rec


def bad_record(rng: random.Random, device: Device, t: int) -> bytes:
    """One of the three kinds of bad input, each a dead letter: not JSON, unknown platform, invalid key."""
    kind = rng.randrange(3)
    if kind == 0:
        text = orjson.dumps({"device_id": device.device_id, "platform": device.platform, "action": "track",
                             "event": "$MPViewScreen", "properties": {"$title": rng.choice(TITLES)},
                             "time": t}).decode()
        return text[: rng.randrange(len(text) // 2, len(text) - 1)].encode()  # cut in characters, not bytes
    if kind == 1:
        return orjson.dumps({"device_id": device.device_id, "platform": rng.choice(UNKNOWN_PLATFORMS),
                             "action": "track", "event": "$MPViewScreen", "time": t})
    # bind checks the association first, login checks the key first: both end on the key
    action = "login" if device.platform in NO_ASSOCIATION else "bind"
    return orjson.dumps({"device_id": device.device_id, "platform": device.platform, "action": action,
                         "key": rng.choice(BAD_KEYS), "id": device.user, "value": phone(rng), "time": t})


def generate(path: Path, records: int, devices: int, seed: int, *, tag: bool = False) -> Path:
    """Write `records` raw records over `devices` devices to `path` (kept: the same arguments give the same
    bytes, so a later run reuses it). Devices' activity is skewed (log-normal); `tag` puts each record's
    number in its properties as `bench_seq`, for the latency measurement."""
    if path.exists():
        return path
    rng = random.Random(seed)
    devs = make_devices(rng, devices)
    weights = list(itertools.accumulate(rng.lognormvariate(0.0, 1.0) for _ in range(devices)))
    picks = rng.choices(range(devices), cum_weights=weights, k=records)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb", buffering=1 << 20) as f:
        for i, d in enumerate(picks):
            device = devs[d]
            t = T0_MS + i * 7 + rng.randrange(7)
            if rng.random() < BAD_RATE:
                line = bad_record(rng, device, t)
            else:
                rec = valid_record(rng, device, t)
                if tag:
                    rec.setdefault("properties", {})["bench_seq"] = i
                line = orjson.dumps(rec)
            f.write(line + b"\n")
    partial.rename(path)
    return path


def input_path(kind: str, records: int, devices: int, seed: int) -> Path:
    return BENCH_DIR / f"input-{kind}-n{records}-d{devices}-s{seed}-v{GENERATOR_VERSION}.jsonl"


def write_prefix(src: Path, dst: Path, count: int) -> None:
    with open(src, "rb") as f, open(dst, "wb") as out:
        out.writelines(itertools.islice(f, count))


# -- Kafka -------------------------------------------------------------------------------------------------


def partition_of(key: bytes, partitions: int = PARTITIONS) -> int:
    """Kafka's default partitioner (murmur2, as the Java client): the partition the worker expects."""
    return int(murmur2(key) & 0x7FFFFFFF) % partitions


class Kafka:
    """The bench's admin and offset lookups on the broker."""

    def __init__(self, brokers: str) -> None:
        self.brokers = brokers
        self.admin = AIOKafkaAdminClient(bootstrap_servers=brokers, request_timeout_ms=30_000)
        self.lookup = AIOKafkaConsumer(bootstrap_servers=brokers, group_id=None, enable_auto_commit=False)

    async def start(self) -> None:
        await self.admin.start()
        await self.lookup.start()

    async def close(self) -> None:
        await self.lookup.stop()
        await self.admin.close()

    async def create_topics(self, names: Iterable[str], partitions: int = PARTITIONS,
                            configs: dict[str, str] | None = None) -> None:
        """Fresh topics stamped by the broker's clock (LogAppendTime): the throughput and latency figures
        come from these stamps, not from any client's clock. `configs`: more topic settings."""
        names = list(names)
        response = await self.admin.create_topics(
            [NewTopic(n, partitions, 1, topic_configs={**LOG_APPEND_TIME, **(configs or {})}) for n in names])
        for name, code, *_ in response.topic_errors:
            if code:
                raise BenchError(f"cannot create topic {name}: error code {code}")
        deadline = time.monotonic() + 30
        while True:  # until every partition has a leader
            meta = {t["topic"]: t for t in await self.admin.describe_topics(names)}
            if all(n in meta and not meta[n]["error_code"] and len(meta[n]["partitions"]) == partitions
                   and all(not p["error_code"] for p in meta[n]["partitions"]) for n in names):
                return
            if time.monotonic() > deadline:
                raise BenchError(f"topics {names} did not become ready")
            await asyncio.sleep(0.1)

    async def end_offsets(self, topic: str) -> dict[int, int]:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        return {tp.partition: o for tp, o in (await self.lookup.end_offsets(tps)).items()}

    async def count(self, topics: Iterable[str]) -> int:
        return sum([sum((await self.end_offsets(t)).values()) for t in topics])

    async def committed(self, group: str, topic: str) -> int:
        """How many records of `topic` the group has committed (fresh topics: offsets start at 0)."""
        offsets = await self.admin.list_consumer_group_offsets(group)
        return sum(max(0, o.offset) for tp, o in offsets.items() if tp.topic == topic)

    async def delete_run_topics(self, stamp: str) -> list[str]:
        """Every topic whose name holds the run's stamp: it starts most (Quix names its changelogs
        changelog__<group>--<topic>--<store>)."""
        names = sorted(t for t in await self.admin.list_topics() if stamp in t)
        for i in range(0, len(names), 20):
            await self.admin.delete_topics(names[i: i + 20])
        return names


async def load_topic(brokers: str, topic: str, path: Path) -> tuple[int, float]:
    """Send every line of `path` to `topic`, keyed by its device_id (as `streams produce` keys it), in
    per-partition batches built by hand: much faster than a send() per record, and the broker sees the same
    records. Returns (records, seconds)."""
    producer = AIOKafkaProducer(bootstrap_servers=brokers, acks="all", linger_ms=50, max_batch_size=512 << 10,
                                max_request_size=4 << 20)
    await producer.start()
    started = time.monotonic()
    partition_cache: dict[bytes, int] = {}  # murmur2 in pure Python: once per device
    batches: dict[int, Any] = {}
    pending: list[asyncio.Future[Any]] = []
    unkeyed = itertools.cycle(range(PARTITIONS))
    count = 0
    try:
        with open(path, "rb") as f:
            for line in f:
                value = line.rstrip(b"\n")
                key = device_key(value)
                if key is None:
                    p = next(unkeyed)
                else:
                    p = partition_cache.get(key, -1)
                    if p < 0:
                        p = partition_cache[key] = partition_of(key)
                batch = batches.get(p)
                if batch is None:
                    batch = batches[p] = producer.create_batch()
                if batch.append(key=key, value=value, timestamp=None) is None:  # full: send it, start another
                    pending.append(await producer.send_batch(batch, topic, partition=p))
                    batch = batches[p] = producer.create_batch()
                    batch.append(key=key, value=value, timestamp=None)
                count += 1
                if len(pending) >= 64:
                    await asyncio.gather(*pending)
                    pending = []
        for p, batch in batches.items():
            if batch.record_count():
                pending.append(await producer.send_batch(batch, topic, partition=p))
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return count, time.monotonic() - started


def scan_consumer(brokers: str) -> AIOKafkaConsumer:
    # read_committed: what a warehouse loading the exactly-once worker's output would read
    return AIOKafkaConsumer(bootstrap_servers=brokers, group_id=None, enable_auto_commit=False,
                            auto_offset_reset="earliest", max_partition_fetch_bytes=8 << 20,
                            fetch_max_bytes=64 << 20, isolation_level="read_committed")


async def scan_topic(brokers: str, topic: str, on_record: Callable[[ConsumerRecord], None]) -> int:
    """Call `on_record` for every record now in `topic`, partition by partition in offset order."""
    consumer = scan_consumer(brokers)
    await consumer.start()
    count = 0
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        await consumer.seek_to_beginning(*tps)
        left = {tp for tp in tps if ends[tp] > 0}
        last = time.monotonic()
        while left:
            batch = await consumer.getmany(*left, timeout_ms=500, max_records=50_000)
            for tp, records in batch.items():
                for r in records:
                    if r.offset < ends[tp]:
                        on_record(r)
                        count += 1
                if records:
                    last = time.monotonic()
            for tp in list(left):
                # by position, not by the last record's offset: the last offsets may be transaction markers
                if await consumer.position(tp) >= ends[tp]:
                    left.discard(tp)
            if time.monotonic() - last > 60:
                raise BenchError(f"reading {topic} stalled with {count} records read")
    finally:
        await consumer.stop()
    return count


async def first_and_last_stamps(consumer: AIOKafkaConsumer, tp: TopicPartition, begin: int, end: int) -> list[int]:
    """The timestamps of a partition's first and last records. The last offsets may be transaction markers
    (the exactly-once worker's output), which are no records: look back further until a record shows."""
    consumer.seek(tp, begin)
    first = await read_stamps(consumer, tp, end, max_records=1)
    if not first:
        raise BenchError(f"cannot read {tp} at offset {begin}")
    back = 1
    while True:
        start = max(begin, end - back)
        consumer.seek(tp, start)
        last = await read_stamps(consumer, tp, end)
        if last:
            return [first[0], last[-1]]
        if start == begin:
            raise BenchError(f"no record in {tp} between offsets {begin} and {end}")
        back *= 16


async def read_stamps(consumer: AIOKafkaConsumer, tp: TopicPartition, end: int,
                      max_records: int | None = None) -> list[int]:
    """Timestamps of the records from the position up to `end` (or the first `max_records` of them)."""
    stamps: list[int] = []
    deadline = time.monotonic() + 30
    while await consumer.position(tp) < end and time.monotonic() < deadline:
        records = (await consumer.getmany(tp, timeout_ms=1000, max_records=max_records)).get(tp, [])
        stamps += [r.timestamp for r in records]
        if max_records is not None and len(stamps) >= max_records:
            break
    return stamps


async def append_span(brokers: str, topics: Iterable[str]) -> tuple[float, float]:
    """(first, last) broker append time in seconds over the topics' records: each partition's first and last
    record, fetched by offset (LogAppendTime only grows within a partition)."""
    consumer = scan_consumer(brokers)
    await consumer.start()
    stamps: list[int] = []
    try:
        for topic in topics:
            tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
            begins = await consumer.beginning_offsets(tps)
            ends = await consumer.end_offsets(tps)
            for tp in tps:
                if ends[tp] > begins[tp]:
                    consumer.assign([tp])
                    stamps += await first_and_last_stamps(consumer, tp, begins[tp], ends[tp])
    finally:
        await consumer.stop()
    if not stamps:
        raise BenchError(f"no output on {list(topics)}")
    return min(stamps) / 1000, max(stamps) / 1000


# -- child processes ---------------------------------------------------------------------------------------


def clean_env(**settings: str) -> dict[str, str]:
    """This environment without any STREAMS_* or BENCH_* setting of the caller's (the runs must all see the
    same settings: the defaults), plus `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMS_", "BENCH_"))}
    env.update(settings)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Child:
    """A subprocess of the bench, watched from /proc every 0.05 s: CPU time (so that CPU can be read for any
    time window) and VmHWM, the peak RSS since its exec. Not wait4's ru_maxrss: Linux keeps the forked
    bench's own RSS in it across the exec, so every child would show at least the bench's size. Reaped with
    wait4 for its total CPU time."""

    registry: ClassVar[list[Child]] = []  # every child ever started: stopped in main's finally, whatever happened

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.log = log
        self.samples: list[tuple[float, float]] = []  # (wall time, CPU seconds)
        self.hwm_kib = 0
        self.rusage: Any = None
        self.returncode: int | None = None
        self._log_file: IO[bytes] = open(log, "wb")  # noqa: SIM115 - closed when the child is reaped
        # a session of its own: a Ctrl-C at the terminal reaches the bench, which stops its children in order
        self.proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=self._log_file,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        Child.registry.append(self)
        self._sampler = threading.Thread(target=self._sample, name=f"sample-{name}", daemon=True)
        self._sampler.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _sample(self) -> None:
        stat_path, status_path = f"/proc/{self.pid}/stat", f"/proc/{self.pid}/status"
        # until it has exec'd, the child is a copy of the bench, VmHWM included: wait for its own command line
        bench_cmdline = Path("/proc/self/cmdline").read_bytes()
        while self.returncode is None:
            try:
                if Path(f"/proc/{self.pid}/cmdline").read_bytes() == bench_cmdline:
                    time.sleep(0.005)
                    continue
                with open(stat_path) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(status_path) as f:
                    status = f.read()
            except OSError:
                return
            if fields[0] == "Z":  # exited, not reaped yet
                return
            cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
            self.samples.append((time.time(), cpu))
            m = re.search(r"VmHWM:\s+(\d+)", status)
            if m:
                self.hwm_kib = max(self.hwm_kib, int(m.group(1)))
            time.sleep(0.05)

    def cpu_at(self, wall: float) -> float:
        """The child's CPU seconds at wall-clock time `wall`, interpolated between samples."""
        samples = list(self.samples)
        if not samples:
            return 0.0
        i = bisect.bisect(samples, (wall, float("inf")))
        if i == 0:
            return samples[0][1]
        if i == len(samples):
            return samples[-1][1]
        (t0, c0), (t1, c1) = samples[i - 1], samples[i]
        return c0 + (c1 - c0) * (wall - t0) / (t1 - t0) if t1 > t0 else c1

    def alive(self) -> bool:
        if self.returncode is not None:
            return False
        pid, status, usage = os.wait4(self.pid, os.WNOHANG)
        if pid:
            self._reaped(status, usage)
            return False
        return True

    def _reaped(self, status: int, usage: Any) -> None:
        self.returncode = self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.rusage = usage
        self._log_file.close()

    def wait(self) -> int:
        """Block until it exits by itself."""
        if self.returncode is None:
            _, status, usage = os.wait4(self.pid, 0)
            self._reaped(status, usage)
        assert self.returncode is not None
        return self.returncode

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds; reaps it. Idempotent."""
        if not self.alive():
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self.alive():
            if time.monotonic() > deadline:
                print(f"bench: {self.name} (pid {self.pid}) still running {grace:.0f}s after SIGTERM: SIGKILL",
                      file=sys.stderr)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self.wait()
                break
            time.sleep(0.1)

    @property
    def peak_rss_mib(self) -> float:
        return self.hwm_kib / 1024

    @property
    def cpu_total(self) -> float:
        if self.rusage is not None:
            return float(self.rusage.ru_utime + self.rusage.ru_stime)
        return self.samples[-1][1] if self.samples else 0.0

    def tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""


# -- results -----------------------------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    input: str
    events: int
    seconds: float
    cpu_seconds: float | None
    peak_rss_mib: float
    note: str = ""

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_us(self) -> float | None:
        return None if self.cpu_seconds is None else self.cpu_seconds / self.events * 1e6


async def wait_consumed(kafka: Kafka, child: Child | list[Child], group: str, source: str, records: int,
                        outputs: list[str], expected_out: int | None) -> None:
    """Until the group has committed all `records` of `source` and the outputs hold `expected_out` records
    (when known). Fails when the child (any of them) exits, or nothing moves for STALL_SECONDS."""
    last_state: tuple[int, int] | None = None
    last_move = time.monotonic()
    children = child if isinstance(child, list) else [child]
    child = children[0]
    while True:
        for c in children:
            if not c.alive():
                raise BenchError(f"{c.name} exited with code {c.returncode}; the end of {c.log}:\n{c.tail()}")
        committed = await kafka.committed(group, source)
        out = await kafka.count(outputs)
        if committed >= records and (expected_out is None or out >= expected_out):
            return
        if (committed, out) != last_state:
            last_state, last_move = (committed, out), time.monotonic()
        elif time.monotonic() - last_move > STALL_SECONDS:
            raise BenchError(f"{child.name} stalled: {committed:,} of {records:,} input records committed, "
                             f"{out:,} of {expected_out or '?'} output records; the end of {child.log}:\n"
                             f"{child.tail()}")
        await asyncio.sleep(0.5)


async def consumer_result(kafka: Kafka, child: Child, name: str, input_label: str, records: int,
                          outputs: list[str], note: str, changelog: str | None = None) -> Result:
    """Events/s over the output's append-time span; CPU of the child over the same window. With a Faust
    table, also how many changelog records it wrote per input record."""
    first, last = await append_span(kafka.brokers, outputs)
    cpu = child.cpu_at(last) - child.cpu_at(first)
    child.stop()
    if changelog is not None:
        written = await scan_topic(kafka.brokers, changelog, lambda r: None)  # records, not markers
        note += f"; {written:,} changelog records ({written / records:.2f} per input record)"
    return Result(name, input_label, records, last - first, cpu, child.peak_rss_mib, note)


# -- 3a. replay ----------------------------------------------------------------------------------------------

SUMMARY = re.compile(r"replay: ([\d,]+) records in, ([\d,]+) enriched out, ([\d,]+) dead letters, "
                     r"([\d.]+)s \(([\d,]+) records/s\)")


@dataclass
class ReplayRun:
    records: int
    enriched: int
    dead_letters: int
    rate: float  # records/s as its summary line gives it (computed from the unrounded time)
    cpu_seconds: float
    peak_rss_mib: float
    output: Path
    dead: Path
    persons: Path | None = None  # the final persons mapping (`--persons`)


async def run_replay(names: Names, label: str, src: Path, state_dir: Path | None = None, jobs: int = 1,
                     discard: bool = False, persons: bool = False) -> ReplayRun:
    """`discard`: the enriched output to /dev/null (only its counts are wanted); `persons`: write the final
    persons mapping too (`--persons`)."""
    out, dead = names.run_dir / f"replay-{label}.jsonl", names.run_dir / f"replay-{label}.dead.jsonl"
    if discard:
        out = Path(os.devnull)
    argv = [PYTHON, "-m", "streams", "replay", "--input", str(src), "--output", str(out), "--dead-letter", str(dead)]
    persons_file = names.run_dir / f"replay-{label}.persons.jsonl" if persons else None
    if persons_file is not None:
        argv += ["--persons", str(persons_file)]
    if state_dir is not None:
        argv += ["--state-dir", str(state_dir)]
    if jobs > 1:
        argv += ["--jobs", str(jobs)]
    child = Child(f"replay {label}", argv, clean_env(), names.run_dir / f"replay-{label}.log")
    code = await asyncio.to_thread(child.wait)
    if code != 0:
        raise BenchError(f"replay {label} exited with {code}:\n{child.tail()}")
    m = SUMMARY.search(child.log.read_text())
    if m is None:
        raise BenchError(f"replay {label}: no summary line in {child.log}")
    records, enriched, dead_letters = (int(g.replace(",", "")) for g in m.group(1, 2, 3))
    return ReplayRun(records, enriched, dead_letters, float(m.group(5).replace(",", "")), child.cpu_total,
                     child.peak_rss_mib, out, dead, persons_file)


# -- 3b. the ceilings -------------------------------------------------------------------------------------


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


async def measure_child(kafka: Kafka, names: Names, label: str, raw: str, records: int, argv: list[str], name: str,
                        note: str, changelog: str | None = None) -> Result:
    """A consume-and-produce child that writes one output per input to the topic it is given: `argv` is
    completed with the brokers, its group, `raw`, its output topic (fresh, LogAppendTime) and, when it keeps
    state (`changelog`: its changelog topic, in which `{group}` stands for its group), a fresh state directory."""
    out, group = names.topic(f"{label}.out"), names.group(label)
    await kafka.create_topics([out])
    argv = [*argv, kafka.brokers, group, raw, out]
    if changelog is not None:
        argv.append(str(names.run_dir / f"{label}-state"))
    child = Child(label, argv, clean_env(), names.run_dir / f"{label}.log")
    await wait_consumed(kafka, child, group, raw, records, [out], records)
    result = await consumer_result(kafka, child, name, "all", records, [out], note,
                                   changelog=None if changelog is None else changelog.format(group=group))
    produced = await kafka.count([out])
    if produced != records:
        result.note += f"; WARNING {produced:,} records out for {records:,} in"
    return result


async def measure_ceiling(kafka: Kafka, names: Names, raw: str, records: int, label: str = "ceiling",
                          contract: str = WORKER_CONTRACT) -> Result:
    return await measure_child(
        kafka, names, label, raw, records, [PYTHON, __file__, "--passthrough-contract", contract, "--passthrough"],
        f"ceiling, {contract}: bare aiokafka passthrough",
        f"no logic: fetch {BATCH_RECORDS:,}, send each; {CONTRACTS[contract].how}")


async def measure_ceilings(kafka: Kafka, names: Names, raw: str, records: int, label: str = "ceiling") -> dict[
        str, Result]:
    """Both ceilings, one after the other, each on its own output topic and group."""
    return {c: await measure_ceiling(kafka, names, raw, records, f"{label}-{c}", c) for c in CEILINGS}


# -- 3b'. the peers: the same shape of work in Kafka Streams and in Quix Streams ----------------------------------

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
            raise BenchError(f"the Kafka Streams peer needs {tool} (Maven and a JDK 17) on the PATH")
    proc = subprocess.run(["mvn", "-q", "-f", str(KSTREAMS_POM), "package"], cwd=ROOT, capture_output=True,
                          text=True)
    if proc.returncode != 0 or not KSTREAMS_JAR.exists():
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-20:])
        raise BenchError(f"building the Kafka Streams peer (mvn -q -f {KSTREAMS_POM} package) failed:\n{tail}")
    return KSTREAMS_JAR


def check_peers() -> Path:
    """Before anything is measured: the Kafka Streams peer built, Quix Streams installed."""
    try:
        importlib.metadata.version("quixstreams")
    except importlib.metadata.PackageNotFoundError:
        raise BenchError("the Quix Streams peer needs quixstreams: make install (pip install -e '.[dev]')") from None
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


# -- 3c. the baseline --------------------------------------------------------------------------------------


async def measure_baseline(kafka: Kafka, names: Names, raw: str, records: int, expected: ReplayRun) -> tuple[
        Result, Digest]:
    enriched, dead = names.topic("baseline.enriched"), names.topic("baseline.dead-letter")
    group = names.group("baseline")
    await kafka.create_topics([enriched, dead])
    env = clean_env(BENCH_BROKERS=kafka.brokers, BENCH_GROUP=group, BENCH_RAW_TOPIC=raw,
                    BENCH_ENRICHED_TOPIC=enriched, BENCH_DEAD_LETTER_TOPIC=dead,
                    BENCH_STATE_DIR=str(names.run_dir / "baseline-state"), BENCH_WEB_PORT=str(free_port()),
                    BENCH_PARTITIONS=str(PARTITIONS))
    argv = [PYTHON, str(ROOT / "scripts" / "bench_baseline.py"), "worker", "--loglevel", "warn"]
    child = Child("baseline", argv, env, names.run_dir / "baseline.log")
    await wait_consumed(kafka, child, group, raw, records, [enriched, dead],
                        expected.enriched + expected.dead_letters)
    result = await consumer_result(kafka, child, "baseline: stock Faust agent + Table", f"first {records:,}",
                                   records, [enriched, dead],
                                   "one event at a time, table get/set and `await send` per event",
                                   changelog=f"{group}-devices-changelog")
    return result, await topic_digest(kafka.brokers, raw, enriched, dead)


# -- 3d. the worker ----------------------------------------------------------------------------------------


def worker_child(kafka: Kafka, names: Names, label: str, raw: str, enriched: str, dead: str,
                 guarantee: str = "at_least_once", group: str | None = None, state: str | None = None,
                 **more: str) -> Child:
    """A worker with its own group and state directory, named after `label` unless `group`/`state` say, and
    its own persons topic (the persons stage is on by default: without one of its own, every worker of every
    run would write the shared default topic). `more`: further settings, by Settings field name."""
    settings = {
        "brokers": kafka.brokers, "raw_topic": raw, "enriched_topic": enriched, "dead_letter_topic": dead,
        "persons_topic": names.topic(f"{group or label}.persons"),
        "group": names.group(group or label), "state_dir": str(names.run_dir / f"{state or label}-state"),
        "web_port": str(free_port()), "partitions": str(PARTITIONS), "log_level": "warning",
        "processing_guarantee": guarantee, **more,
    }
    env = clean_env(**{env_name(k): v for k, v in settings.items()})
    return Child(label, [PYTHON, "-m", "streams", "worker"], env, names.run_dir / f"{label}.log")


async def measure_worker(kafka: Kafka, names: Names, raw: str, records: int, expected: ReplayRun,
                         guarantee: str = "at_least_once") -> tuple[Result, Digest]:
    label = "worker" if guarantee == "at_least_once" else "worker-eos"
    enriched, dead = names.topic(f"{label}.enriched"), names.topic(f"{label}.dead-letter")
    await kafka.create_topics([enriched, dead])  # before the worker does: with LogAppendTime
    child = worker_child(kafka, names, label, raw, enriched, dead, guarantee)
    await wait_consumed(kafka, child, names.group(label), raw, records, [enriched, dead],
                        expected.enriched + expected.dead_letters)
    if guarantee == "at_least_once":
        name, note = ("worker: python -m streams worker", "batches of up to 10,000, state written once per batch; "
                      "persons stage on (the default)")
    else:
        name, note = "worker, --processing-guarantee exactly_once", "the same, one transaction per partition a batch"
    result = await consumer_result(kafka, child, name, "all", records, [enriched, dead], note,
                                   changelog=f"{names.group(label)}-devices-changelog")
    return result, await topic_digest(kafka.brokers, raw, enriched, dead)


# -- 3e. latency -------------------------------------------------------------------------------------------


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

    def on_raw(r: ConsumerRecord) -> None:
        seq = seq_of(r.value)
        if seq is not None:
            sent[seq] = r.timestamp

    def on_out(r: ConsumerRecord) -> None:
        seq = seq_of(r.value)
        if seq is not None:
            received[seq] = r.timestamp

    await scan_topic(kafka.brokers, raw, on_raw)
    await scan_topic(kafka.brokers, enriched, on_out)
    latencies = sorted(float(t - sent[s]) for s, t in received.items() if s in sent)
    if not latencies:
        raise BenchError("latency: no output record could be matched to its input")
    span = (max(sent.values()) - min(sent.values())) / 1000
    return Latency(len(sent) / span if span else 0.0, span, len(latencies), percentile(latencies, 0.5),
                   percentile(latencies, 0.99), latencies[-1], worker_cpu)


# -- correctness -----------------------------------------------------------------------------------------


# Fields the worker adds and replay does not (schemas/enriched.schema.json: "worker output only"): set aside
# before comparing, and checked on their own
WORKER_ONLY_FIELDS = ("record_id",)
RECORD_ID = re.compile(r"(.+):([0-9]+):([0-9]+):([0-9]+)")  # <raw topic>:<partition>:<offset>:<n>


@dataclass
class Digest:
    """An output as comparable facts: per device, its enriched records' count and a chained hash of their
    canonical JSON (order matters, key order does not), and the dead letters as a multiset of
    (reason, field, device_id, raw). Small enough for a million records."""

    devices: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    dead: Counter[tuple[str, str, str, str]] = field(default_factory=Counter)
    enriched: int = 0
    wrong_keys: int = 0  # Kafka records whose key is not their device_id
    record_ids: int = 0  # records that carried a record_id
    bad_record_ids: list[str] = field(default_factory=list)  # malformed, another topic, or out of order
    _last_position: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    def add_enriched(self, value: bytes, key: bytes | None = None, *, raw_topic: str | None = None) -> None:
        """One enriched record; from Kafka (`raw_topic` given) its key and worker-only fields are checked."""
        record = orjson.loads(value)
        device_id = str(record.get("device_id"))
        if raw_topic is not None:
            if key != device_id.encode():
                self.wrong_keys += 1
            self._check_record_id(device_id, record.pop("record_id", None), raw_topic)
        count, chain = self.devices.get(device_id, (0, b""))
        canonical = orjson.dumps(record, option=orjson.OPT_SORT_KEYS)
        self.devices[device_id] = (count + 1, hashlib.blake2b(chain + canonical, digest_size=16).digest())
        self.enriched += 1

    def _check_record_id(self, device_id: str, record_id: Any, raw_topic: str) -> None:
        """A device's records come from one raw partition in order: their ids must name the raw topic and
        grow strictly (offset, then n). That also means no id repeats."""
        if record_id is None:
            return
        self.record_ids += 1
        m = RECORD_ID.fullmatch(record_id) if isinstance(record_id, str) else None
        position = (int(m.group(2)), int(m.group(3)), int(m.group(4))) if m else None
        last = self._last_position.get(device_id)
        if m is None or position is None or m.group(1) != raw_topic or (last is not None and position <= last):
            if len(self.bad_record_ids) < 1000:
                self.bad_record_ids.append(f"{device_id}: {record_id!r} after {last}")
            return
        self._last_position[device_id] = position

    def add_dead(self, value: bytes) -> None:
        d = orjson.loads(value)
        self.dead[(str(d.get("reason")), str(d.get("field")), str(d.get("device_id", "")), str(d.get("raw")))] += 1

    def reasons(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for (reason, *_), n in self.dead.items():
            out[reason] += n
        return out


def file_digest(run: ReplayRun) -> Digest:
    digest = Digest()
    with open(run.output, "rb") as f:
        for line in f:
            digest.add_enriched(line)
    with open(run.dead, "rb") as f:
        for line in f:
            digest.add_dead(line)
    return digest


async def topic_digest(brokers: str, raw: str, enriched: str, dead: str) -> Digest:
    digest = Digest()
    await scan_topic(brokers, enriched, lambda r: digest.add_enriched(r.value or b"", r.key, raw_topic=raw))
    await scan_topic(brokers, dead, lambda r: digest.add_dead(r.value or b""))
    return digest


@dataclass
class Verdict:
    ok: bool
    lines: list[str]
    first_device: str | None = None  # the first device whose records differ, to show the difference


def compare(expected: Digest, actual: Digest, what: str) -> Verdict:
    """`actual` (from Kafka) against `expected` (replay), device by device."""
    problems: list[str] = []
    devices = expected.devices.keys() | actual.devices.keys()
    differing = sorted(d for d in devices if expected.devices.get(d) != actual.devices.get(d))
    if differing:
        missing = sum(max(0, expected.devices.get(d, (0, b""))[0] - actual.devices.get(d, (0, b""))[0])
                      for d in differing)
        extra = sum(max(0, actual.devices.get(d, (0, b""))[0] - expected.devices.get(d, (0, b""))[0])
                    for d in differing)
        problems.append(f"{len(differing):,} of {len(devices):,} devices differ ({missing:,} records missing, "
                        f"{extra:,} extra, the rest changed or reordered); e.g. {differing[:3]}")
    if actual.wrong_keys:
        problems.append(f"{actual.wrong_keys:,} enriched records not keyed by their device_id")
    if expected.dead != actual.dead:
        problems.append(f"dead letters differ: replay {dict(expected.reasons())}, {what} {dict(actual.reasons())}")
    if actual.bad_record_ids:
        problems.append(f"{len(actual.bad_record_ids):,} record_ids malformed, of another topic or not increasing "
                        f"per device; e.g. {actual.bad_record_ids[:3]}")
    if problems:
        return Verdict(False, problems, differing[0] if differing else None)
    aside = ""
    if actual.record_ids:
        aside = (f"; {', '.join(WORKER_ONLY_FIELDS)} (worker output only) set aside, present on "
                 f"{actual.record_ids:,} of {actual.enriched:,} records, well-formed and increasing per device")
    return Verdict(True, [f"{what} == replay: {len(devices):,} devices, {actual.enriched:,} enriched records "
                          f"in the same order per device, {sum(actual.dead.values()):,} dead letters "
                          f"(same reason, field, device and raw input){aside}"])


def first_difference(replay_output: Path, records: list[bytes], device_id: str) -> str:
    """For a FAIL: the first record of `device_id` where the worker's output leaves replay's."""
    expected = []
    with open(replay_output, "rb") as f:
        for line in f:
            if device_id.encode() in line:
                record = orjson.loads(line)
                if record.get("device_id") == device_id:
                    expected.append(record)
    actual = [orjson.loads(v) for v in records]
    for record in actual:
        for name in WORKER_ONLY_FIELDS:
            record.pop(name, None)
    for i, (e, a) in enumerate(itertools.zip_longest(expected, actual)):
        if e != a:
            return f"record #{i} of {device_id}:\n  replay: {e}\n  worker: {a}"
    return "no difference found on a second read"


async def device_records(brokers: str, topic: str, device_id: str) -> list[bytes]:
    found: list[bytes] = []
    key = device_id.encode()
    await scan_topic(brokers, topic, lambda r: found.append(r.value or b"") if r.key == key else None)
    return found


# -- 3f. the persons stage ---------------------------------------------------------------------------------

PERSONS_PAIRS = Plan.persons_pairs  # off then on, this many times: one pair's ratio moves with the machine's noise
PERSONS_TIMEOUT = Plan.persons_timeout  # seconds the persons topic has, after the enriched output, to settle


def read_persons_file(path: Path) -> dict[str, bytes]:
    """`replay --persons`'s file as a table: user ID -> its line's bytes."""
    with open(path, "rb") as f:
        return {orjson.loads(line)["user_id"]: line.rstrip(b"\n") for line in f if line.strip()}


def via_counts(mapping: dict[str, bytes]) -> Counter[str]:
    return Counter(str(orjson.loads(v).get("via")) for v in mapping.values())


class TopicTable:
    """A compacted topic read as a table, from its beginning and then as it grows: the last value per key, a
    tombstone (null value) removing the key. Counts the values and tombstones read, and keeps the latest
    broker append time."""

    def __init__(self, brokers: str, topic: str) -> None:
        self.topic = topic
        self.consumer = scan_consumer(brokers)
        self.tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        self.table: dict[str, bytes] = {}
        self.values = 0
        self.tombstones = 0
        self.last_stamp: int | None = None  # ms

    async def start(self) -> None:
        await self.consumer.start()
        self.consumer.assign(self.tps)
        await self.consumer.seek_to_beginning(*self.tps)

    async def stop(self) -> None:
        await self.consumer.stop()

    async def catch_up(self) -> None:
        """Read up to the end offsets of now."""
        ends = await self.consumer.end_offsets(self.tps)
        left = {tp for tp in self.tps if await self.consumer.position(tp) < ends[tp]}
        last = time.monotonic()
        while left:
            batch = await self.consumer.getmany(*left, timeout_ms=500, max_records=50_000)
            for records in batch.values():
                for r in records:
                    key = r.key.decode(errors="replace") if r.key is not None else ""
                    if r.value is None:
                        self.table.pop(key, None)
                        self.tombstones += 1
                    else:
                        self.table[key] = r.value
                        self.values += 1
                    self.last_stamp = r.timestamp if self.last_stamp is None else max(self.last_stamp, r.timestamp)
                if records:
                    last = time.monotonic()
            for tp in list(left):
                if await self.consumer.position(tp) >= ends[tp]:
                    left.discard(tp)
            if time.monotonic() - last > 60:
                raise BenchError(f"reading {self.topic} stalled")


def mapping_difference(expected: dict[str, bytes], actual: dict[str, bytes]) -> list[str]:
    """What differs between two persons tables, counted, with a few examples."""
    missing = sorted(expected.keys() - actual.keys())
    invented = sorted(actual.keys() - expected.keys())
    differing = sorted(k for k in expected.keys() & actual.keys() if expected[k] != actual[k])
    lines = [f"{len(missing):,} user IDs missing, {len(invented):,} invented, {len(differing):,} with another "
             f"value (of replay's {len(expected):,})"]
    for user in differing[:2]:
        lines.append(f"e.g. {user}: topic {actual[user].decode(errors='replace')}, replay "
                     f"{expected[user].decode(errors='replace')}")
    for user in missing[:1]:
        lines.append(f"e.g. missing {expected[user].decode(errors='replace')}")
    for user in invented[:1]:
        lines.append(f"e.g. invented {actual[user].decode(errors='replace')}")
    return lines


@dataclass
class PersonsReference:
    replay: ReplayRun
    digest: Digest
    mapping: dict[str, bytes]  # user ID -> replay's line


async def persons_reference(names: Names, src: Path) -> PersonsReference:
    """`replay --persons` on the persons input (state in memory): the enriched output and the final mapping
    the worker must give."""
    run = await run_replay(names, "persons", src, persons=True)
    assert run.persons is not None
    digest = await asyncio.to_thread(file_digest, run)
    mapping = await asyncio.to_thread(read_persons_file, run.persons)
    run.output.unlink()
    return PersonsReference(run, digest, mapping)


@dataclass
class PersonsRun:
    result: Result
    persons: bool
    enriched_ok: bool
    enriched_line: str
    mapping_ok: bool | None = None  # None: the stage was off
    mapping_lines: list[str] = field(default_factory=list)
    settled_after: float | None = None  # s from the last enriched record to the persons topic's last record
    seen_after: float | None = None  # s from the last enriched record until the bench saw the topic settled
    tail_cpu: float | None = None  # the worker's CPU seconds from the last enriched record until then
    values: int = 0  # mapping records on the persons topic
    tombstones: int = 0
    messages: int = 0  # records on the stage's internal topic
    via: Counter[str] = field(default_factory=Counter)


async def persons_settled(kafka: Kafka, tail: TopicTable, group: str, repartition: str,
                          expected: dict[str, bytes], timeout: float) -> bool:
    """Poll until the persons topic equals `expected` and the stage is idle (the group has committed every
    message of its internal topic: nothing more is on the way), or `timeout` seconds. True when equal."""
    deadline = time.monotonic() + timeout
    while True:
        await tail.catch_up()
        if tail.table == expected:
            idle = await kafka.committed(group, repartition) >= await kafka.count([repartition])
            if idle:
                await tail.catch_up()  # what was written before the last message was committed
                if tail.table == expected:
                    return True
        if time.monotonic() > deadline:
            return tail.table == expected
        await asyncio.sleep(0.5)


async def measure_persons_run(kafka: Kafka, names: Names, label: str, raw: str, ref: PersonsReference,
                              persons: bool, timeout: float) -> PersonsRun:
    """One worker over `raw` with the persons stage on or off: fresh group, state directory and topics (its own
    persons topic, compacted, with LogAppendTime as the outputs). Events/s and CPU as the worker's measurement;
    with the stage on, then until the persons topic settles, and its final mapping against replay's."""
    enriched, dead, persons_topic = (names.topic(f"{label}.{t}") for t in ("enriched", "dead-letter", "persons"))
    await kafka.create_topics([enriched, dead])
    await kafka.create_topics([persons_topic], configs={"cleanup.policy": "compact"})
    group = names.group(label)
    repartition = f"{group}-persons-repartition"  # the stage's internal topic (streams.worker.names.topic_names)
    child = worker_child(kafka, names, label, raw, enriched, dead, persons="on" if persons else "off",
                         persons_topic=persons_topic)
    records = ref.replay.records
    await wait_consumed(kafka, child, group, raw, records, [enriched, dead],
                        ref.replay.enriched + ref.replay.dead_letters)
    first, last = await append_span(kafka.brokers, [enriched, dead])
    cpu = child.cpu_at(last) - child.cpu_at(first)
    mapping_ok, seen, tail_cpu = False, time.time(), 0.0
    tail = TopicTable(kafka.brokers, persons_topic)
    await tail.start()
    try:
        if persons:
            mapping_ok = await persons_settled(kafka, tail, group, repartition, ref.mapping, timeout)
            seen = time.time()
            tail_cpu = child.cpu_at(seen) - child.cpu_at(last)
        else:
            await tail.catch_up()
    finally:
        await tail.stop()
    if not child.alive():
        raise BenchError(f"{child.name} exited with code {child.returncode}; the end of {child.log}:\n{child.tail()}")
    child.stop()
    state = "on" if persons else "off"
    result = Result(f"worker, persons {state} ({label.rsplit('-', 1)[-1]})", "all", records, last - first, cpu,
                    child.peak_rss_mib, f"STREAMS_PERSONS={state}")
    verdict = compare(ref.digest, await topic_digest(kafka.brokers, raw, enriched, dead), f"worker, persons {state}")
    run = PersonsRun(result, persons, verdict.ok, " ".join(verdict.lines), values=tail.values,
                     tombstones=tail.tombstones)
    if not persons:
        run.mapping_lines = [f"{tail.values + tail.tombstones:,} records on its persons topic (the stage is off)"]
        return run
    run.messages = await kafka.count([repartition])
    run.via = via_counts(tail.table)
    run.tail_cpu = tail_cpu
    run.seen_after = seen - last
    if tail.last_stamp is not None:
        run.settled_after = tail.last_stamp / 1000 - last
    run.mapping_ok = mapping_ok
    if mapping_ok:
        run.mapping_lines = [f"the persons topic's final mapping == replay --persons: {len(tail.table):,} device "
                             f"users (last value per key, tombstones removing the key)"]
    else:
        run.mapping_lines = [f"the persons topic's final mapping != replay --persons after {timeout:.0f}s: "
                             + "; ".join(mapping_difference(ref.mapping, tail.table))]
    result.note = (f"STREAMS_PERSONS=on; {tail.values:,} mappings and {tail.tombstones:,} tombstones written, "
                   f"{run.messages:,} internal messages; topic settled {fmt(run.settled_after, 1)}s after the last "
                   f"enriched record")
    return run


async def measure_persons(kafka: Kafka, names: Names, raw: str, ref: PersonsReference, pairs: int,
                          timeout: float, devices: int) -> tuple[list[str], list[str]]:
    """The worker with the persons stage off, then on, `pairs` times over the same raw topic. Returns the
    report's lines and the failures."""
    runs: list[PersonsRun] = []
    for i in range(1, pairs + 1):
        for on in (False, True):
            label = f"persons-{'on' if on else 'off'}-{i}"
            step(f"  {label}")
            TROUBLE.step = label
            runs.append(await measure_persons_run(kafka, names, label, raw, ref, on, timeout))
    offs, ons = [r for r in runs if not r.persons], [r for r in runs if r.persons]
    failures = [f"{r.result.name}: {r.enriched_line}" for r in runs if not r.enriched_ok]
    failures += [f"{r.result.name}: {' '.join(r.mapping_lines)}" for r in ons if not r.mapping_ok]
    off_rate = sum(r.result.rate for r in offs) / len(offs)
    on_rate = sum(r.result.rate for r in ons) / len(ons)
    off_cpu = sum(r.result.cpu_us or 0 for r in offs) / len(offs)
    on_cpu = sum(r.result.cpu_us or 0 for r in ons) / len(ons)
    per_pair = ", ".join(f"pair {i + 1} {ratio(on.result.rate, off.result.rate)} "
                         f"({fmt(on.result.rate)} / {fmt(off.result.rate)})"
                         for i, (off, on) in enumerate(zip(offs, ons, strict=True)))
    ref_via = via_counts(ref.mapping)
    last_on = ons[-1]
    lines = [
        f"### The persons stage: on against off, {ref.replay.records:,} records over {devices:,} device IDs",
        "",
        *table([r.result for r in runs]),
        "",
        f"- **persons on / off: {ratio(on_rate, off_rate)} of the events/s** (mean events/s of {pairs} run(s) "
        f"each; target >= 0.8); per pair, run one after the other: {per_pair}. CPU per event on / off: "
        f"{ratio(on_cpu, off_cpu)}x.",
        "- the persons topic settled (its last record appended) "
        + ", ".join(f"{fmt(r.settled_after, 1)}s" for r in ons)
        + " after the last enriched record; the bench saw it equal replay's and the stage idle after "
        + ", ".join(f"{fmt(r.seen_after, 1)}s" for r in ons)
        + " (polled every 0.5 s); the worker's CPU meanwhile "
        + ", ".join(f"{fmt(r.tail_cpu, 1)}s" for r in ons)
        + " (not in the table's CPU, which is that of the enriched output's window).",
        f"- the stage's work (last run): {last_on.messages:,} messages through its internal topic, "
        f"{last_on.values:,} mapping records and {last_on.tombstones:,} tombstones written to the persons topic; "
        f"**{sum(last_on.via.values()):,} device users mapped: {last_on.via['login']:,} via login, "
        f"{last_on.via['identity']:,} via identity** (replay --persons: {len(ref.mapping):,}, "
        f"{ref_via['login']:,} and {ref_via['identity']:,}).",
        "",
        "Correctness of these runs: " + ("PASS." if not failures else "**FAIL**."),
        *[f"- {r.result.name}: {r.enriched_line}" for r in runs],
        *[f"- {r.result.name}: {' '.join(r.mapping_lines)}" for r in runs],
        "",
        "How: `python -m streams worker` as in the worker's measurement, each run with its own consumer group, "
        "state directory and topics (its own "
        "STREAMS_PERSONS_TOPIC, created compacted with LogAppendTime), off then on, alternating, on one raw "
        "topic loaded once. Events/s and CPU over the enriched and dead-letter outputs' append span; the "
        "persons topic is read as a table (last value per key, a tombstone removing it) until it equals "
        f"replay --persons's file and the group has committed its internal topic ({timeout:.0f}s at most).",
    ]
    return lines, failures


# -- the machine and the report ----------------------------------------------------------------------------


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"model name\s*:\s*(.+)", cpuinfo)
    mem = re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())
    cores = len(os.sched_getaffinity(0))
    return (f"{cores} CPUs ({model.group(1).strip() if model else platform.machine()}), "
            f"{int(mem.group(1)) / 2**20:.1f} GiB RAM" if mem else f"{cores} CPUs")


def kafka_version() -> str:
    """The running broker's version, from its jar on its command line; else the one scripts/kafka.sh pins."""
    pid_file = ROOT / ".cache" / "kafka" / "data" / "kafka.pid"
    with contextlib.suppress(OSError, ValueError):
        cmdline = Path(f"/proc/{int(pid_file.read_text())}/cmdline").read_bytes().decode(errors="replace")
        m = re.search(r"kafka_[\d.]+-([\d.]+)\.jar", cmdline)
        if m:
            return f"{m.group(1)} (the running broker's jar)"
    m = re.search(r"KAFKA_VERSION=([\d.]+)", (ROOT / "scripts" / "kafka.sh").read_text())
    return f"{m.group(1)} (as scripts/kafka.sh pins it)" if m else "unknown"


def versions() -> str:
    libs = ", ".join(f"{n} {importlib.metadata.version(n)}"
                     for n in ("faust-streaming", "aiokafka", "orjson", "rocksdict"))
    return f"Python {platform.python_version()}, Kafka {kafka_version()}, {libs}"


def fmt(x: float | None, digits: int = 0) -> str:
    return "n/a" if x is None else f"{x:,.{digits}f}"


def table(results: list[Result]) -> list[str]:
    rows = ["| run | input records | events/s | CPU µs/event | peak RSS MiB | how |",
            "|---|---:|---:|---:|---:|---|"]
    for r in results:
        rows.append(f"| {r.name} | {r.input} ({r.events:,}) | {fmt(r.rate)} | {fmt(r.cpu_us)} | "
                    f"{fmt(r.peak_rss_mib)} | {r.note} |")
    return rows


def ratio(a: float | None, b: float | None) -> str:
    return "n/a" if not a or not b else f"{a / b:.2f}"


# -- the run -------------------------------------------------------------------------------------------------


async def broker_up() -> bool:
    proc = await asyncio.create_subprocess_exec("bash", str(ROOT / "scripts" / "kafka.sh"), "status",
                                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return await proc.wait() == 0


async def kafka_script(command: str) -> None:
    proc = await asyncio.create_subprocess_exec("bash", str(ROOT / "scripts" / "kafka.sh"), command)
    if await proc.wait() != 0:
        raise BenchError(f"scripts/kafka.sh {command} failed")


class KafkaTrouble(logging.Handler):
    """Counts the Kafka clients' errors per step of the run, and shows only the first few: the broker is
    shared, and when someone restarts it under the bench, the figures of that step are not to be trusted."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.step = "start"
        self.errors: Counter[str] = Counter()
        self.shown: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR:
            self.errors[self.step] += 1
        self.shown[self.step] += 1
        if self.shown[self.step] <= 3:
            print(f"bench: [{self.step}] aiokafka {record.levelname.lower()}: {record.getMessage()}",
                  file=sys.stderr)

    def install(self) -> None:
        kafka_log = logging.getLogger("aiokafka")
        kafka_log.addHandler(self)
        kafka_log.propagate = False


TROUBLE = KafkaTrouble()


def step(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def timed(key: str, text: str, took: dict[str, float]) -> Iterator[None]:
    """A step of the run: announced on stderr, its duration kept under `key` for the report."""
    started = time.monotonic()
    step(text + " ...")
    TROUBLE.step = key
    try:
        yield
    finally:
        took[key] = time.monotonic() - started


async def bench(plan: Plan, brokers: str, keep: bool) -> int:
    started = time.monotonic()
    load_before = os.getloadavg()
    stamp = f"bench-{time.strftime('%Y%m%d%H%M%S')}-{os.getpid()}"
    names = Names(stamp, BENCH_DIR / stamp)
    names.run_dir.mkdir(parents=True, exist_ok=True)
    took: dict[str, float] = {}
    started_broker = False
    kafka: Kafka | None = None
    try:
        if brokers == "127.0.0.1:9092" and not await broker_up():
            step("no broker answers: starting one (scripts/kafka.sh start); it is stopped again at the end")
            await kafka_script("start")
            started_broker = True

        with timed("peers-build", "the peers: Kafka Streams' jar (built by Maven when missing), Quix Streams", took):
            jar = await asyncio.to_thread(check_peers)
        with timed("inputs", "generating the inputs (cached under .cache/bench)", took):
            main_in = await asyncio.to_thread(
                generate, input_path("main", plan.records, plan.devices, plan.seed), plan.records, plan.devices,
                plan.seed)
            wide_in = await asyncio.to_thread(
                generate, input_path("wide", plan.records, plan.wide_devices, plan.seed + 1), plan.records,
                plan.wide_devices, plan.seed + 1)
            latency_devices = max(1000, plan.latency_rate)
            latency_in = await asyncio.to_thread(
                generate, input_path("latency", plan.latency_records + 500, latency_devices, plan.seed + 2),
                plan.latency_records + 500, latency_devices, plan.seed + 2, tag=True)
            # the persons stage's input: as many device IDs as records (the same file as wide_in by default)
            persons_in = await asyncio.to_thread(
                generate, input_path("wide", plan.records, plan.records, plan.seed + 1), plan.records,
                plan.records, plan.seed + 1)
            prefix_in = names.run_dir / "prefix.jsonl"
            write_prefix(main_in, prefix_in, plan.baseline_records)
            empty_in = names.run_dir / "empty.jsonl"
            empty_in.touch()

        with timed("replay", "replay (offline: the reference output, its speed and memory)", took):
            startup = await run_replay(names, "empty", empty_in)  # the interpreter's start, to subtract
            memory = await run_replay(names, "memory", main_in)
            jobs = await run_replay(names, "jobs", main_in, jobs=2)
            state_main = await run_replay(names, "state", main_in, names.run_dir / "replay-state")
            state_wide = await run_replay(names, "state-wide", wide_in, names.run_dir / "replay-state-wide")
            prefix = await run_replay(names, "prefix", prefix_in)
            persons_ref = await persons_reference(names, persons_in)
            reference = await asyncio.to_thread(file_digest, memory)
            prefix_reference = await asyncio.to_thread(file_digest, prefix)
            state_same = hashlib.sha256(memory.output.read_bytes()).digest() == hashlib.sha256(
                state_main.output.read_bytes()).digest()
            jobs_same = hashlib.sha256(memory.output.read_bytes()).digest() == hashlib.sha256(
                jobs.output.read_bytes()).digest()
            jobs.output.unlink()
            state_wide.output.unlink()
            state_main.output.unlink()

        kafka = Kafka(brokers)
        await kafka.start()
        raw, prefix_raw, persons_raw = names.topic("raw"), names.topic("prefix.raw"), names.topic("persons.raw")
        with timed("load", "loading the raw topics", took):
            await kafka.create_topics([raw, prefix_raw, persons_raw])
            loaded, load_seconds = await load_topic(brokers, raw, main_in)
            await load_topic(brokers, prefix_raw, prefix_in)
            await load_topic(brokers, persons_raw, persons_in)
            if loaded != plan.records:
                raise BenchError(f"loaded {loaded:,} records, expected {plan.records:,}")

        with timed("ceilings", f"the ceilings: bare aiokafka passthroughs, {' then '.join(CEILINGS)}", took):
            ceilings = await measure_ceilings(kafka, names, raw, plan.records)
        with timed("baseline", f"the baseline: stock Faust agent on the first {plan.baseline_records:,} records", took):
            baseline, baseline_digest = await measure_baseline(kafka, names, prefix_raw, plan.baseline_records,
                                                               prefix)
        with timed("worker", "the worker, end to end", took):
            worker, worker_digest = await measure_worker(kafka, names, raw, plan.records, memory)
        peers = await measure_peers(kafka, names, raw, plan.records, jar, took)
        with timed("worker-eos", "the worker in exactly-once mode, end to end", took):
            eos, eos_digest = await measure_worker(kafka, names, raw, plan.records, memory, "exactly_once")
        with timed("compare", "correctness: the worker's output against replay's", took):
            verdict = compare(reference, worker_digest, "worker")
            if verdict.first_device is not None:
                records = await device_records(brokers, names.topic("worker.enriched"), verdict.first_device)
                verdict.lines.append(first_difference(memory.output, records, verdict.first_device))
            eos_verdict = compare(reference, eos_digest, "worker (exactly-once)")
            if eos_verdict.first_device is not None:
                records = await device_records(brokers, names.topic("worker-eos.enriched"),
                                               eos_verdict.first_device)
                eos_verdict.lines.append(first_difference(memory.output, records, eos_verdict.first_device))
            verdict.lines += eos_verdict.lines
            verdict.ok = verdict.ok and eos_verdict.ok
            baseline_verdict = compare(prefix_reference, baseline_digest, "baseline")
        with timed("latency", f"latency at {plan.latency_rate:,} records/s for {plan.latency_seconds:g}s", took):
            latency = await measure_latency(kafka, names, plan, latency_in, warmup=500)
        with timed("persons", f"the persons stage off and on, {plan.records:,} records over as many device IDs "
                   f"({plan.persons_pairs} pairs, alternating)", took):
            persons_lines, persons_failures = await measure_persons(kafka, names, persons_raw, persons_ref,
                                                                    plan.persons_pairs, plan.persons_timeout,
                                                                    plan.records)

        startup_cpu = startup.cpu_seconds

        def replay_result(name: str, run: ReplayRun, label: str, note: str) -> Result:
            seconds = run.records / run.rate if run.rate else 0.0
            return Result(name, label, run.records, seconds, max(0.0, run.cpu_seconds - startup_cpu),
                          run.peak_rss_mib, note)

        results = [
            *ceilings.values(), baseline, worker, peers.kstreams, peers.quix, eos,
            replay_result("replay (state in memory)", memory, "all", "JSONL file in and out, no broker"),
            replay_result("replay --jobs 2", jobs, "all", "devices split between 2 processes; CPU of all, RSS of "
                          "the merging one"),
            replay_result(f"replay --state-dir, {plan.devices:,} devices", state_main, "all",
                          "RocksDB state behind a 100,000-device cache"),
            replay_result(f"replay --state-dir, {plan.wide_devices:,} devices", state_wide, "other input",
                          f"{plan.wide_devices // plan.devices}x the devices, same record count"),
        ]
        size = f"{plan.records:,} records over {plan.devices:,} devices, seed {plan.seed}" + (
            ", --quick" if plan.quick else "")
        dead = ", ".join(f"{r} {n:,}" for r, n in sorted(reference.reasons().items()))
        report = [
            f"## make bench: {time.strftime('%Y-%m-%d %H:%M')}, {size}",
            "",
            f"Input: {memory.records:,} raw records -> {memory.enriched:,} enriched records and "
            f"{memory.dead_letters:,} dead letters ({dead}).",
            "",
            *table(results),
            "",
            f"- **worker / baseline: {ratio(worker.rate, baseline.rate)}x the events/s**, "
            f"{ratio(baseline.cpu_us, worker.cpu_us)}x less CPU per event "
            f"(the baseline ran on the first {plan.baseline_records:,} records only: it is slow).",
            *versus_lines(worker, ceilings, peers),
            f"- worker / replay (memory): {ratio(worker.rate, memory.rate)} of the events/s.",
            f"- **exactly-once / at-least-once: {ratio(eos.rate, worker.rate)} of the events/s**, "
            f"{ratio(eos.cpu_us, worker.cpu_us)}x the CPU per event (four transactions a batch, one per partition).",
            f"- Added latency of the worker at {latency.rate:,.0f} records/s for {latency.seconds:.1f}s "
            f"(asked {plan.latency_rate:,}/s), output append time - input append time over {latency.samples:,} "
            f"records: **p50 {latency.p50:.0f} ms, p99 {latency.p99:.0f} ms**, max {latency.max:.0f} ms; the "
            f"worker used {latency.worker_cpu:.2f} CPU cores meanwhile.",
            f"- Replay RSS against devices: {state_main.peak_rss_mib:,.0f} MiB at {plan.devices:,} devices, "
            f"{state_wide.peak_rss_mib:,.0f} MiB at {plan.wide_devices:,} "
            f"({ratio(state_wide.peak_rss_mib, state_main.peak_rss_mib)}x for "
            f"{plan.wide_devices // plan.devices}x the devices); in memory {memory.peak_rss_mib:,.0f} MiB. "
            f"Replay with --state-dir gave the same bytes as in memory: {'yes' if state_same else 'NO'}; "
            f"with --jobs 2: {'yes' if jobs_same else 'NO'}.",
            f"- Load: {loaded:,} records into {raw} in {load_seconds:.1f}s ({loaded / load_seconds:,.0f}/s).",
            "",
            "Correctness: " + ("PASS. " if verdict.ok else "**FAIL**. ") + " ".join(verdict.lines),
            "Baseline check (same engine, so it must match replay of its prefix): "
            + ("same output. " if baseline_verdict.ok else "DIFFERENT: ") + " ".join(baseline_verdict.lines[:2]),
            "",
            "How: events/s of the Kafka runs = input records / (last - first output record's broker append "
            "time), topics with LogAppendTime; the window starts after the first fetched batch is done, for "
            "all alike. CPU = the process's user+sys in that window (sampled from /proc every 0.05 s). "
            "Replay: records/s from its own summary line, CPU from wait4 minus a replay of an empty file "
            f"({startup_cpu:.2f}s). Peak RSS = the process's VmHWM (its last sample, at most 0.05 s before it ended). "
            "Each run has its own "
            "topics, group and state directory, one after the other, on the same broker.",
            "",
            *persons_lines,
            "",
            f"Machine: {machine()}; load average {load_before[0]:.2f} at the start, "
            f"{os.getloadavg()[0]:.2f} at the end. {versions()}.",
            f"Took {time.monotonic() - started:,.0f}s: " + ", ".join(f"{k} {v:.0f}s" for k, v in took.items()) + ".",
        ]
        if TROUBLE.errors:
            report[2:2] = [
                f"**WARNING: the bench's Kafka clients logged errors during: "
                f"{', '.join(f'{k} ({n:,})' for k, n in TROUBLE.errors.items())}. The broker was unreachable for "
                "a while (restarted by another user?): those steps' figures are not to be trusted; run again.**",
                ""]
        text = "\n".join(report) + "\n"
        print(text)
        (BENCH_DIR / "last.md").write_text(text)
        if not (state_same and jobs_same):
            print("bench: FAIL: replay's output changed with --state-dir or --jobs", file=sys.stderr)
            return 1
        if not verdict.ok:
            print("bench: FAIL: the worker's output differs from replay's for the same input", file=sys.stderr)
            for line in verdict.lines:
                print(f"bench: FAIL: {line}", file=sys.stderr)
            return 1
        for failure in persons_failures:
            print(f"bench: FAIL: {failure}", file=sys.stderr)
        return 1 if persons_failures else 0
    except BenchError as e:
        print(f"bench: FAIL: {e}", file=sys.stderr)
        return 1
    finally:
        for child in Child.registry:
            child.stop()
        if kafka is not None:
            try:
                deleted = await kafka.delete_run_topics(stamp)
                step(f"deleted {len(deleted)} topics of this run")
            except Exception as e:  # e.g. someone stopped the shared broker: say what is left behind
                step(f"could not delete the topics {stamp}*: {type(e).__name__}: {e}")
            await kafka.close()
        if started_broker:
            await kafka_script("stop")
        if not keep:
            shutil.rmtree(names.run_dir, ignore_errors=True)


# -- make bench-scale: millions of devices -------------------------------------------------------------------

SCALE_WIDE_DEVICES = 1_000_000  # (a) as many device IDs as records: most states absent or beyond any cache
SCALE_STATE_DEVICES = 10_000_000  # (b) devices in state before the measured records


_PLATFORM_NAMES = list(PLATFORM_WEIGHTS)
_PLATFORM_CUM = list(itertools.accumulate(PLATFORM_WEIGHTS.values()))


def scale_device(seed: int, i: int) -> Device:
    """Device number `i` of a population too large to hold (10M `Device`s would take gigabytes): drawn from a
    hash of (seed, i), so the preload and the records over it agree without keeping the devices. IDs shaped
    as `make_device_id`'s, the device number at the end keeping them apart."""
    h = int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=32).digest(), "little")
    platform_name = _PLATFORM_NAMES[bisect.bisect(_PLATFORM_CUM, (h & 0xFFFF) / 0x10000 * _PLATFORM_CUM[-1])]
    h >>= 16
    if platform_name == "web":
        device_id = (f"{h & (1 << 56) - 1:014x}-{h >> 56 & (1 << 64) - 1:016x}-{h >> 120 & 0xFFFFFFFF:08x}-"
                     f"{('1296000', '2073600', '3686400')[h >> 152 & 1]}-{i:x}")
    else:
        device_id = (f"{T0_MS - h % (90 * 86_400_000)}-{h >> 40 & 0xFFFFFF:07d}-{h >> 64 & (1 << 60) - 1:015x}-"
                     f"{i:08d}")
    return Device(device_id, platform_name, str(60_000_000_000_000_000 + i * 7919), "$identity_login_id")


def generate_preload(path: Path, devices: int, seed: int) -> Path:
    """One login per device of the population: every device then has a stored state."""
    if path.exists():
        return path
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb", buffering=1 << 20) as f:
        for i in range(devices):
            d = scale_device(seed, i)
            f.write(orjson.dumps({"device_id": d.device_id, "platform": d.platform, "action": "login",
                                  "id": d.user, "time": T0_MS - 86_400_000 + i}) + b"\n")
    partial.rename(path)
    return path


def generate_over(path: Path, records: int, devices: int, seed: int) -> Path:
    """`records` records over the population of `generate_preload(devices, seed)`, with `generate`'s mix and
    skew; only the devices drawn are built."""
    if path.exists():
        return path
    rng = random.Random(seed + 1)
    weights = list(itertools.accumulate(rng.lognormvariate(0.0, 1.0) for _ in range(devices)))
    picks = rng.choices(range(devices), cum_weights=weights, k=records)
    del weights
    devs: dict[int, Device] = {}
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb", buffering=1 << 20) as f:
        for i, d in enumerate(picks):
            device = devs.get(d)
            if device is None:
                device = devs[d] = scale_device(seed, d)
            t = T0_MS + i * 7 + rng.randrange(7)
            line = bad_record(rng, device, t) if rng.random() < BAD_RATE else orjson.dumps(
                valid_record(rng, device, t))
            f.write(line + b"\n")
    partial.rename(path)
    return path


async def measure_workers(kafka: Kafka, names: Names, label: str, raw: str, events: int, expected_out: int,
                          count: int = 1, *, group: str | None = None, state: str | None = None,
                          committed: int | None = None, digest: bool = True, name: str = "",
                          note: str = "") -> tuple[Result, Digest | None]:
    """`count` worker processes in one consumer group on `raw`, until the group has committed `committed`
    records of it (default `events`: a fresh group) and the outputs hold `expected_out` records; `events`
    input records are measured. Events/s over the outputs' append span, CPU of all the processes in that
    window, peak RSS of the largest; and the outputs' digest (`digest`)."""
    enriched, dead = names.topic(f"{label}.enriched"), names.topic(f"{label}.dead-letter")
    await kafka.create_topics([enriched, dead])
    group = group or label
    children = [worker_child(kafka, names, f"{label}-{i}" if count > 1 else label, raw, enriched, dead,
                             group=group, state=f"{state or label}-{i}" if count > 1 else state or label)
                for i in range(count)]
    await wait_consumed(kafka, children, names.group(group), raw, committed or events, [enriched, dead],
                        expected_out)
    first, last = await append_span(kafka.brokers, [enriched, dead])
    cpu = sum(c.cpu_at(last) - c.cpu_at(first) for c in children)
    for c in children:
        c.stop()
    result = Result(name or label, "all", events, last - first, cpu, max(c.peak_rss_mib for c in children), note)
    return result, await topic_digest(kafka.brokers, raw, enriched, dead) if digest else None


def verdict_line(expected: Digest, actual: Digest | None, what: str, failures: list[str]) -> str:
    assert actual is not None
    verdict = compare(expected, actual, what)
    if not verdict.ok:
        failures.append(f"{what}: " + " ".join(verdict.lines))
    return ("PASS: " if verdict.ok else "**FAIL**: ") + " ".join(verdict.lines)


async def bench_scale(brokers: str, keep: bool, records: int, state_devices: int, seed: int) -> int:
    """(a) `records` over as many device IDs; (b) `state_devices` devices logged in first (through the
    worker, a restart, then) `records` over them; (c) two workers against one on (a)'s input."""
    started = time.monotonic()
    load_before = os.getloadavg()
    stamp = f"bench-{time.strftime('%Y%m%d%H%M%S')}-{os.getpid()}"
    names = Names(stamp, BENCH_DIR / stamp)
    names.run_dir.mkdir(parents=True, exist_ok=True)
    took: dict[str, float] = {}
    kafka: Kafka | None = None
    failures: list[str] = []
    try:
        with timed("peers-build", "the peers: Kafka Streams' jar (built by Maven when missing), Quix Streams", took):
            jar = await asyncio.to_thread(check_peers)
        with timed("inputs", "generating the scale inputs (cached under .cache/bench; the first time takes "
                   "minutes)", took):
            wide_in = await asyncio.to_thread(
                generate, input_path("wide", records, records, seed + 1), records, records, seed + 1)
            preload_in = await asyncio.to_thread(
                generate_preload, input_path("preload", state_devices, state_devices, seed + 3), state_devices,
                seed + 3)
            over_in = await asyncio.to_thread(
                generate_over, input_path("over", records, state_devices, seed + 3), records, state_devices,
                seed + 3)

        with timed("replay", "replay: the reference outputs", took):
            wide_ref = await run_replay(names, "wide", wide_in)
            wide_state = await run_replay(names, "wide-state", wide_in, names.run_dir / "replay-wide-state")
            wide_same = wide_state.output.read_bytes() == wide_ref.output.read_bytes()
            wide_state.output.unlink()
            preload = await run_replay(names, "preload", preload_in, names.run_dir / "replay-state-10m",
                                       discard=True)
            over_ref = await run_replay(names, "over", over_in, names.run_dir / "replay-state-10m")
            wide_digest = await asyncio.to_thread(file_digest, wide_ref)
            over_digest = await asyncio.to_thread(file_digest, over_ref)
            if not wide_same:
                failures.append("replay --state-dir gave other bytes than replay in memory")

        kafka = Kafka(brokers)
        await kafka.start()
        wide_raw, over_raw, state_raw = names.topic("wide.raw"), names.topic("over.raw"), names.topic("state.raw")
        with timed("load", "loading the raw topics", took):
            await kafka.create_topics([wide_raw, over_raw, state_raw])
            await load_topic(brokers, wide_raw, wide_in)
            await load_topic(brokers, over_raw, over_in)  # the ceiling of (b) reads the same records
            loaded, load_seconds = await load_topic(brokers, state_raw, preload_in)

        # (a) and (c)
        wide_out = wide_ref.enriched + wide_ref.dead_letters
        with timed("a-ceiling", f"(a) the ceiling on {records:,} records over {records:,} devices", took):
            a_ceiling = await measure_ceiling(kafka, names, wide_raw, records, "a-ceiling")
            a_ceiling.name = f"(a) {a_ceiling.name}"
        with timed("a-worker", "(a) the worker", took):
            a_worker, digest = await measure_workers(
                kafka, names, "a-worker", wide_raw, records, wide_out, name="(a) worker, one process",
                note=f"{records:,} records over {records:,} device IDs")
            a_line = verdict_line(wide_digest, digest, "(a) worker", failures)
        a_peers = await measure_peers(kafka, names, wide_raw, records, jar, took, "a")
        with timed("c-workers", "(c) two workers in one group", took):
            c_workers, digest = await measure_workers(
                kafka, names, "c-workers", wide_raw, records, wide_out, count=2,
                name="(c) two worker processes, one group", note="the same input; CPU of both, RSS of the larger")
            c_line = verdict_line(wide_digest, digest, "(c) two workers", failures)

        # (b)
        with timed("b-ceiling", f"(b) the ceiling on the {records:,} records over {state_devices:,} devices", took):
            b_ceiling = await measure_ceiling(kafka, names, over_raw, records, "b-ceiling")
            b_ceiling.name = f"(b) {b_ceiling.name}"
        with timed("b-preload", f"(b) the worker logs in {state_devices:,} devices", took):
            # 10M records: counted, not digested (that would take minutes and gigabytes)
            b_preload, _ = await measure_workers(
                kafka, names, "b-preload", state_raw, state_devices, preload.enriched + preload.dead_letters,
                group="b-worker", state="b-worker", digest=False,
                name=f"(b) worker, loading: one login each for {state_devices:,} devices",
                note="every record a new device and a state write")
            counted = (await kafka.count([names.topic("b-preload.enriched")]),
                       await kafka.count([names.topic("b-preload.dead-letter")]))
            preload_line = (f"{counted[0]:,} enriched records and {counted[1]:,} dead letters; replay "
                            f"{preload.enriched:,} and {preload.dead_letters:,} (counted, not compared record "
                            "by record)")
            if counted != (preload.enriched, preload.dead_letters):
                failures.append(f"(b) loading: {preload_line}")
        with timed("b-worker", f"(b) the worker (restarted on its state) on {records:,} records", took):
            await load_topic(brokers, state_raw, over_in)
            b_worker, digest = await measure_workers(
                kafka, names, "b-worker", state_raw, records, over_ref.enriched + over_ref.dead_letters,
                group="b-worker", state="b-worker", committed=state_devices + records,
                name=f"(b) worker, {state_devices:,} devices in state",
                note=f"restarted on the state the loading left; {records:,} records over those devices")
            b_line = verdict_line(over_digest, digest, "(b) worker", failures)

        empty_in = names.run_dir / "empty.jsonl"
        empty_in.touch()
        startup_cpu = (await run_replay(names, "empty", empty_in)).cpu_seconds

        def replay_result(name: str, run: ReplayRun, note: str) -> Result:
            seconds = run.records / run.rate if run.rate else 0.0
            return Result(name, "all", run.records, seconds, max(0.0, run.cpu_seconds - startup_cpu),
                          run.peak_rss_mib, note)

        results = [
            a_ceiling, a_worker, a_peers.kstreams, a_peers.quix, c_workers, b_ceiling, b_preload, b_worker,
            replay_result(f"replay, {records:,} device IDs", wide_ref, "state in memory"),
            replay_result(f"replay --state-dir, {records:,} device IDs", wide_state, "RocksDB behind a "
                          "100,000-device cache"),
            replay_result(f"replay --state-dir, loading {state_devices:,} devices", preload, "one login each"),
            replay_result(f"replay --state-dir, {state_devices:,} devices in state", over_ref,
                          f"{records:,} records over them"),
        ]
        report = [
            f"## make bench-scale: {time.strftime('%Y-%m-%d %H:%M')}, seed {seed}",
            "",
            *table(results),
            "",
            *versus_lines(a_worker, {WORKER_CONTRACT: a_ceiling}, a_peers, "(a) worker"),
            f"- (b) **worker / ceiling: {ratio(b_worker.rate, b_ceiling.rate)}** of the events/s with "
            f"{state_devices:,} devices in state ({ratio(b_worker.cpu_us, b_ceiling.cpu_us)}x its CPU per event); "
            f"**peak RSS {b_worker.peak_rss_mib:,.0f} MiB** (while loading them: {b_preload.peak_rss_mib:,.0f} MiB).",
            f"- (c) **two workers / one: {ratio(c_workers.rate, a_worker.rate)}** of the events/s "
            f"({fmt(c_workers.rate)} against {fmt(a_worker.rate)}), "
            f"{ratio(c_workers.cpu_us, a_worker.cpu_us)}x the CPU per event; two workers / ceiling "
            f"{ratio(c_workers.rate, a_ceiling.rate)}.",
            f"- Load: {loaded:,} logins into {state_raw} in {load_seconds:.1f}s ({loaded / load_seconds:,.0f}/s).",
            "",
            "Correctness:",
            f"- (a) {a_line}",
            f"- (b) {b_line}",
            f"- (c) {c_line}",
            f"- (b) loading: {preload_line}",
            f"- replay --state-dir, {records:,} device IDs, gave the bytes of replay in memory: "
            f"{'yes' if wide_same else 'NO'}.",
            "",
            "How: as `make bench` (events/s over the outputs' broker append times, CPU from /proc in that window, "
            "peak RSS = VmHWM). (b)'s worker logs every device in, is stopped (SIGTERM) and started again on "
            "the same group and state directory, then the records are appended to its raw topic; its output "
            "is compared with replay's of the same records after replay --state-dir has loaded the same "
            "logins. Each ceiling runs on its own copy of the measured records.",
            "",
            f"Machine: {machine()}; load average {load_before[0]:.2f} at the start, "
            f"{os.getloadavg()[0]:.2f} at the end. {versions()}.",
            f"Took {time.monotonic() - started:,.0f}s: " + ", ".join(f"{k} {v:.0f}s" for k, v in took.items()) + ".",
        ]
        if TROUBLE.errors:
            report[2:2] = [f"**WARNING: the bench's Kafka clients logged errors during: "
                           f"{', '.join(f'{k} ({n:,})' for k, n in TROUBLE.errors.items())}: those steps' "
                           "figures are not to be trusted; run again.**", ""]
        text = "\n".join(report) + "\n"
        print(text)
        (BENCH_DIR / "last-scale.md").write_text(text)
        for failure in failures:
            print(f"bench: FAIL: {failure}", file=sys.stderr)
        return 1 if failures else 0
    except BenchError as e:
        print(f"bench: FAIL: {e}", file=sys.stderr)
        return 1
    finally:
        for child in Child.registry:
            child.stop()
        if kafka is not None:
            try:
                deleted = await kafka.delete_run_topics(stamp)
                step(f"deleted {len(deleted)} topics of this run")
            except Exception as e:
                step(f"could not delete the topics {stamp}*: {type(e).__name__}: {e}")
            await kafka.close()
        if not keep:
            shutil.rmtree(names.run_dir, ignore_errors=True)


async def bench_persons_only(brokers: str, keep: bool, records: int, seed: int, pairs: int, timeout: float) -> int:
    """`make bench`'s persons part alone: `records` over as many device IDs, the worker with the persons stage
    off then on, `pairs` times. Report in .cache/bench/last-persons.md."""
    started = time.monotonic()
    load_before = os.getloadavg()
    stamp = f"bench-{time.strftime('%Y%m%d%H%M%S')}-{os.getpid()}"
    names = Names(stamp, BENCH_DIR / stamp)
    names.run_dir.mkdir(parents=True, exist_ok=True)
    took: dict[str, float] = {}
    started_broker = False
    kafka: Kafka | None = None
    try:
        if brokers == "127.0.0.1:9092" and not await broker_up():
            step("no broker answers: starting one (scripts/kafka.sh start); it is stopped again at the end")
            await kafka_script("start")
            started_broker = True
        with timed("inputs", "generating the input (cached under .cache/bench)", took):
            src = await asyncio.to_thread(generate, input_path("wide", records, records, seed + 1), records,
                                          records, seed + 1)
        with timed("replay", "replay --persons: the reference output and mapping", took):
            ref = await persons_reference(names, src)
        kafka = Kafka(brokers)
        await kafka.start()
        raw = names.topic("persons.raw")
        with timed("load", "loading the raw topic", took):
            await kafka.create_topics([raw])
            loaded, load_seconds = await load_topic(brokers, raw, src)
            if loaded != records:
                raise BenchError(f"loaded {loaded:,} records, expected {records:,}")
        with timed("persons", f"the persons stage off and on ({pairs} pair(s), alternating)", took):
            lines, failures = await measure_persons(kafka, names, raw, ref, pairs, timeout, records)
        dead = ", ".join(f"{r} {n:,}" for r, n in sorted(ref.digest.reasons().items()))
        report = [
            f"## bench.py --persons-only: {time.strftime('%Y-%m-%d %H:%M')}, seed {seed + 1}",
            "",
            f"Input: {ref.replay.records:,} raw records -> {ref.replay.enriched:,} enriched records and "
            f"{ref.replay.dead_letters:,} dead letters ({dead}); {loaded:,} loaded in {load_seconds:.1f}s.",
            "",
            *lines,
            "",
            f"Machine: {machine()}; load average {load_before[0]:.2f} at the start, "
            f"{os.getloadavg()[0]:.2f} at the end. {versions()}.",
            f"Took {time.monotonic() - started:,.0f}s: " + ", ".join(f"{k} {v:.0f}s" for k, v in took.items()) + ".",
        ]
        if TROUBLE.errors:
            report[2:2] = [f"**WARNING: the bench's Kafka clients logged errors during: "
                           f"{', '.join(f'{k} ({n:,})' for k, n in TROUBLE.errors.items())}: those steps' "
                           "figures are not to be trusted; run again.**", ""]
        text = "\n".join(report) + "\n"
        print(text)
        (BENCH_DIR / "last-persons.md").write_text(text)
        for failure in failures:
            print(f"bench: FAIL: {failure}", file=sys.stderr)
        return 1 if failures else 0
    except BenchError as e:
        print(f"bench: FAIL: {e}", file=sys.stderr)
        return 1
    finally:
        for child in Child.registry:
            child.stop()
        if kafka is not None:
            try:
                deleted = await kafka.delete_run_topics(stamp)
                step(f"deleted {len(deleted)} topics of this run")
            except Exception as e:
                step(f"could not delete the topics {stamp}*: {type(e).__name__}: {e}")
            await kafka.close()
        if started_broker:
            await kafka_script("stop")
        if not keep:
            shutil.rmtree(names.run_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, help="raw records (default 1,000,000; --quick 200,000)")
    parser.add_argument("--devices", type=int, help="devices (default 100,000; --quick 20,000)")
    parser.add_argument("--quick", action="store_true", help="a smaller run")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--brokers", default="127.0.0.1:9092")
    parser.add_argument("--baseline-records", type=int,
                        help="records the stock Faust baseline runs on (default 50,000; --quick 20,000)")
    parser.add_argument("--latency-rate", type=int, default=5000, help="records/s of the latency run")
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    parser.add_argument("--keep", action="store_true", help="keep this run's directory under .cache/bench")
    parser.add_argument("--scale", action="store_true",
                        help="the scale runs instead (make bench-scale): --records over as many device IDs, then "
                        "--state-devices logged in first and --records over them, and two workers against one")
    parser.add_argument("--persons-only", action="store_true",
                        help="only the persons stage's part of make bench: --records (default 1,000,000) over as "
                        "many device IDs, the worker with STREAMS_PERSONS=off then on, --persons-pairs times "
                        "(.cache/bench/last-persons.md)")
    parser.add_argument("--persons-pairs", type=int, default=PERSONS_PAIRS,
                        help=f"off/on pairs of the persons stage's runs (default {PERSONS_PAIRS})")
    parser.add_argument("--persons-timeout", type=float, default=PERSONS_TIMEOUT,
                        help=f"seconds the persons topic has to settle after the enriched output (default "
                        f"{PERSONS_TIMEOUT:.0f})")
    parser.add_argument("--state-devices", type=int, default=SCALE_STATE_DEVICES,
                        help=f"devices in state for --scale (default {SCALE_STATE_DEVICES:,})")
    parser.add_argument("--passthrough", nargs=4, metavar=("BROKERS", "GROUP", "SOURCE", "TARGET"),
                        help=argparse.SUPPRESS)  # a ceiling's child process
    parser.add_argument("--passthrough-contract", choices=CEILINGS, default=WORKER_CONTRACT,
                        help=argparse.SUPPRESS)  # what that passthrough waits for
    args = parser.parse_args(argv)
    if args.passthrough:
        brokers, group, source, target = args.passthrough
        asyncio.run(passthrough(brokers, group, source, target, args.passthrough_contract))
        return 0
    if args.scale:
        BENCH_DIR.mkdir(parents=True, exist_ok=True)
        TROUBLE.install()
        return asyncio.run(with_signals(bench_scale(args.brokers, args.keep, args.records or SCALE_WIDE_DEVICES,
                                                    args.state_devices, args.seed)))
    records = args.records or (200_000 if args.quick else 1_000_000)
    if args.persons_only:
        BENCH_DIR.mkdir(parents=True, exist_ok=True)
        TROUBLE.install()
        return asyncio.run(with_signals(bench_persons_only(args.brokers, args.keep, records, args.seed,
                                                           args.persons_pairs, args.persons_timeout)))
    devices = args.devices or (20_000 if args.quick else 100_000)
    plan = Plan(records=records, devices=devices,
                baseline_records=min(records, args.baseline_records or (20_000 if args.quick else 50_000)),
                wide_devices=devices * 10, latency_rate=args.latency_rate, latency_seconds=args.latency_seconds,
                seed=args.seed, quick=args.quick, persons_pairs=args.persons_pairs,
                persons_timeout=args.persons_timeout)
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    TROUBLE.install()
    return asyncio.run(bench_with_signals(plan, args.brokers, args.keep))


async def bench_with_signals(plan: Plan, brokers: str, keep: bool) -> int:
    return await with_signals(bench(plan, brokers, keep))


async def with_signals(run: Awaitable[int]) -> int:
    """SIGTERM cancels the run like Ctrl-C does, so the finally clause stops the children and the topics."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await run


if __name__ == "__main__":
    sys.exit(main())
