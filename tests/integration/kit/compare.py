"""The comparisons the tests share: per device and in order, repeats set aside, dead letters by content."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Any

import orjson

from streams.config import Settings

RECORD_ID = re.compile(r"[a-zA-Z0-9._-]+:[0-9]+:[0-9]+:[0-9]+")


def canonical(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def by_device(records: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        out[r["device_id"]].append(r)
    return dict(out)


def enriched_by_device(records: Iterable[Any]) -> dict[str, list[dict[str, Any]]]:
    """Enriched Kafka records per device in partition order; each must be keyed by its device_id, and all
    of a device's records must sit in one partition (else their order means nothing)."""
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    partitions: dict[str, set[int]] = defaultdict(set)
    wrong_keys = []
    first_copy: dict[str, bytes] = {}
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        value = orjson.loads(r.value)
        device_id = value["device_id"]
        # the worker's record id names the raw record (topic:partition:offset:n); replay has none to give.
        # A record written twice (after a crash) must be byte for byte the first copy
        record_id = value.pop("record_id")
        assert RECORD_ID.fullmatch(record_id), record_id
        assert first_copy.setdefault(record_id, r.value) == r.value, f"{record_id}: a repeat that differs"
        if r.key != device_id.encode():
            wrong_keys.append(f"p{r.partition}@{r.offset}: key {r.key!r}, device_id {device_id!r}")
        partitions[device_id].add(r.partition)
        out[device_id].append(value)
    assert not wrong_keys, f"{len(wrong_keys)} enriched records not keyed by their device_id: {wrong_keys[:5]}"
    split = {d: sorted(p) for d, p in partitions.items() if len(p) > 1}
    assert not split, f"{len(split)} devices have enriched records in several partitions: {list(split.items())[:5]}"
    return dict(out)


def _brief(record: dict[str, Any] | None) -> str:
    return "(none)" if record is None else orjson.dumps(record).decode()[:400]


def assert_same_per_device(actual: dict[str, list[dict[str, Any]]], expected: dict[str, list[dict[str, Any]]],
                           what: str = "replay") -> None:
    """Each device's sequence of records equals `expected`'s (records of different devices may interleave)."""
    problems = []
    for device_id in sorted(expected.keys() | actual.keys()):
        a, e = actual.get(device_id, []), expected.get(device_id, [])
        if a == e:
            continue
        i = next((i for i, (x, y) in enumerate(zip(a, e, strict=False)) if x != y), min(len(a), len(e)))
        problems.append(
            f"device {device_id!r}: {len(a)} records, {what} has {len(e)}; first difference at #{i}:\n"
            f"    got:      {_brief(a[i] if i < len(a) else None)}\n"
            f"    expected: {_brief(e[i] if i < len(e) else None)}"
        )
    assert not problems, (f"{len(problems)} of {len(expected)} devices differ from {what}:\n"
                          + "\n".join(problems[:5]))


def without_repeats(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """Records with every exact repeat of an earlier one dropped, and how many were dropped."""
    seen: set[bytes] = set()
    kept = []
    for r in records:
        c = canonical(r)
        if c not in seen:
            seen.add(c)
            kept.append(r)
    return kept, len(records) - len(kept)


def dead_letters_without_source(letters: Iterable[dict[str, Any]]) -> Counter[bytes]:
    return Counter(canonical({k: v for k, v in d.items() if k != "source"}) for d in letters)


def assert_sources_in(letters: Iterable[dict[str, Any]], settings: Settings) -> None:
    for d in letters:
        source = d["source"]
        assert set(source) == {"topic", "partition", "offset"}, d
        assert source["topic"] == settings.raw_topic, d
        assert 0 <= source["partition"] < settings.partitions, d


def change_log_state(records: Iterable[Any], exactly_once: bool) -> dict[str, bytes]:
    """The identity change log read as the persons topic: per user, the mapping its row of the highest version
    says (as the persons record's bytes; none when unmapped). On the way: every row keyed by its user, a user's
    versions growing in the log's order, and a row seen twice (at-least-once after a crash) the same bytes;
    exactly-once sees no row twice."""
    seen: dict[tuple[Any, ...], bytes] = {}
    last: dict[str, dict[str, Any]] = {}
    repeats = 0
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        row = orjson.loads(r.value)
        assert r.key.decode() == row["user_id"], f"a row under another key: {r.key!r} {row}"
        place = (row["kind"], row["user_id"], row["version"], row.get("key"), row.get("value_hash"))
        if place in seen:
            assert seen[place] == r.value, f"a row repeated with other bytes:\n  {seen[place]!r}\n  {r.value!r}"
            repeats += 1
            continue
        seen[place] = r.value
        if row["kind"] == "mapping":
            before = last.get(row["user_id"])
            assert before is None or row["version"] > before["version"], f"a version going back: {before} {row}"
            last[row["user_id"]] = row
    assert not (exactly_once and repeats), f"exactly-once wrote {repeats} rows twice"
    keys = ("user_id", "person_id", "via", "device_id", "identity_key")
    return {user: orjson.dumps({k: row[k] for k in keys if k in row})
            for user, row in last.items() if row["person_id"] is not None}
