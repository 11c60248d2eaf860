"""make bench's correctness: an output (a file of replay's, or the topics of a run) as comparable facts, and the
verdict of one against replay's.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from harness.broker import scan_topic
from harness.replay import ReplayRun

# Fields the worker adds and replay does not (schemas/enriched.schema.json: "worker output only"): set aside
# before comparing, and checked on their own
WORKER_ONLY_FIELDS = ("record_id",)
# <raw topic>:<partition>:<offset>:<n>
RECORD_ID = re.compile(r"(?P<topic>.+):(?P<partition>[0-9]+):(?P<offset>[0-9]+):(?P<n>[0-9]+)")


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


def verdict_line(expected: Digest, actual: Digest | None, what: str, failures: list[str]) -> str:
    """The comparison as a report line; a failure also goes to `failures`."""
    assert actual is not None
    verdict = compare(expected, actual, what)
    if not verdict.ok:
        failures.append(f"{what}: " + " ".join(verdict.lines))
    return ("PASS: " if verdict.ok else "**FAIL**: ") + " ".join(verdict.lines)


async def explained(verdict: Verdict, brokers: str, topic: str, replay_output: Path) -> Verdict:
    """A failed verdict with the first record of its first differing device where `topic` leaves replay."""
    if verdict.first_device is not None:
        found: list[bytes] = []
        key = verdict.first_device.encode()
        await scan_topic(brokers, topic, lambda r: found.append(r.value or b"") if r.key == key else None)
        verdict.lines.append(first_difference(replay_output, found, verdict.first_device))
    return verdict


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
