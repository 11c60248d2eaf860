"""make chaos's checks: what the workers wrote (read committed) against the references. Nothing lost or invented,
a record written again only as the very bytes of its first copy (exactly-once: not at all), each record what
the engine makes of the raw record it names, the dead letters and the final states as replay's, the persons
topic's final mapping as `replay --persons`'s, and the identity change log's last rows as that mapping too.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from harness.broker import fold
from harness.chaos_run import log, run_async
from harness.digest import RECORD_ID
from harness.feeder import Feeder
from harness.reference import Reference
from streams import codec
from streams.config import Settings
from streams.identity import DeviceState
from streams.kafka import admin as kafka_admin
from streams.kafka import clients as kafka_clients
from streams.state.keys import is_internal

SHOW = 5  # differences shown per kind


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
    fold(final, sorted(records, key=lambda r: (r.partition, r.offset)))
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


def check_changes(settings: Settings, ref: Reference) -> Check:
    """The identity change log (read after the persons topic settled: its rows are written with it): each row
    under its user's key, a user's versions only growing, a row written twice only as the same bytes
    (exactly-once: never), and the last row per user saying replay's mapping."""
    c = Check("identity change log")
    seen: dict[tuple[Any, ...], bytes] = {}
    last: dict[str, dict[str, Any]] = {}
    for r in sorted(read_topic(settings, settings.identity_changes_topic), key=lambda r: (r.partition, r.offset)):
        row = orjson.loads(r.value)
        if r.key is None or r.key.decode() != row["user_id"]:
            c.problem("rows under another key", brief(r.value))
        place = (row["kind"], row["user_id"], row["version"], row.get("key"), row.get("value_hash"))
        if place in seen:
            c.counts["copies"] = c.counts.get("copies", 0) + 1
            if seen[place] != r.value:
                c.problem("differing duplicates", f"{brief(seen[place])}\n      {brief(r.value)}")
            continue
        seen[place] = r.value
        if row["kind"] != "mapping":
            continue
        before = last.get(row["user_id"])
        if before is not None and row["version"] <= before["version"]:
            c.problem("versions going back", f"{brief(orjson.dumps(before))}\n      {brief(r.value)}")
        last[row["user_id"]] = row
    keys = ("user_id", "person_id", "via", "device_id", "identity_key")
    final = {user: orjson.dumps({k: row[k] for k in keys if k in row})
             for user, row in last.items() if row["person_id"] is not None}
    for user in sorted(ref.persons.keys() | final.keys()):
        if final.get(user) != ref.persons.get(user):
            c.problem("ending elsewhere", f"{user}:\n      log:    {brief(final.get(user))}\n"
                      f"      replay: {brief(ref.persons.get(user))}")
    c.counts.update(distinct=len(seen), users=len(last), mapped=len(final))
    return c


def read_topic(settings: Settings, topic: str) -> list[Any]:
    try:
        return list(run_async(kafka_clients.read_all(settings, topic, idle_timeout=10.0), timeout=900))
    except kafka_admin.TopicMissing:
        return []


def run_checks(settings: Settings, ref: Reference, feeder: Feeder, phases: dict[str, float]) -> list[Check]:
    """Read the enriched, dead-letter, changelog, persons and identity change log topics, and check them:
    enriched, dead letters, states, persons, the change log (the time each phase took in `phases`)."""
    log("reading the enriched, dead-letter and changelog topics")
    started = time.monotonic()
    enriched, dead, changelog = (read_topic(settings, t) for t in (
        settings.enriched_topic, settings.dead_letter_topic, f"{settings.group}-devices-changelog"))
    phases["read"] = time.monotonic() - started
    placed = line_index(feeder.placed)
    checks = [check_enriched(enriched, ref, placed, settings.raw_topic),
              check_dead_letters(dead, ref, placed, settings.raw_topic),
              check_states(changelog, ref, feeder.placed, feeder.lines), check_persons(settings, ref)]
    checks.append(check_changes(settings, ref))
    if settings.exactly_once:
        no_duplicates([*checks[:2], checks[4]])
    phases["compare"] = time.monotonic() - started - phases["read"]
    return checks
