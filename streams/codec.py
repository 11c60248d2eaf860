"""Bytes in and out: raw records, enriched records, dead letters and stored device states.

Lives here: the one place that turns bytes into Python values and back (orjson), and the byte-level
reasons for refusing a record (not UTF-8, not JSON, not an object, too large, too deep). It knows nothing
of what an action means: field rules are `identity`'s.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from streams.identity import CustomerId, DeviceState, Reason, Rejected
from streams.persons import DevicePersons, Entry
from streams.persons import Mapping as PersonMapping
from streams.persons.changes import Trigger
from streams.persons.pairs import Summary

DEFAULT_MAX_RECORD_BYTES = 1 << 20
# the largest value the worker produces: under Kafka's default message limit (max.message.bytes 1048588 and the
# producer's max_request_size 1 MiB, record overhead included). A larger output could never be delivered and
# would stop the partition, so it becomes a dead letter instead
MAX_OUTPUT_BYTES = 1_000_000
STATE_FORMAT = 3
# format 2 had no persons part (read as none);
# format 1 kept the offset of the record that last changed the state, one per source partition for records
# applied directly and records forwarded alike (they shadowed each other); its offsets are dropped when read
OLD_STATE_FORMATS = frozenset({1, 2})


def decode(raw: bytes, max_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> dict[str, Any]:
    """A raw record's bytes as a JSON object, or `Rejected`."""
    if len(raw) > max_bytes:
        raise Rejected(Reason.TOO_LARGE, "", f"{len(raw)} bytes; the limit is {max_bytes}")
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise _why_not_json(raw, e) from None
    if not isinstance(value, dict):
        raise Rejected(Reason.NOT_OBJECT, "", f"a record is a JSON object, got {_json_type(value)}")
    # most records (tracks) carry none of the fields the exact parse is about: three lookups decide
    if ("id" in value or "value" in value or "customer_ids" in value) and _may_hold_big_integers(value):
        # orjson reads integers beyond 64 bits as floats; an ID must stay the integer the producer wrote
        exact: dict[str, Any] = json.loads(raw)
        return exact
    return value


def _may_hold_big_integers(record: dict[str, Any]) -> bool:
    """A float where the engine reads identifiers: only then is the slower exact parse worth it."""
    if type(record.get("id")) is float or type(record.get("value")) is float:
        return True
    ids = record.get("customer_ids")
    if type(ids) is dict:
        for v in ids.values():
            if type(v) is float or (type(v) is dict and type(v.get("id")) is float):
                return True
    return False


def dumps(value: Any) -> bytes:
    """orjson, and the standard library for what orjson cannot write (integers beyond 64 bits)."""
    try:
        return orjson.dumps(value)
    except TypeError as e:
        if "64-bit" not in str(e):
            raise
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _why_not_json(raw: bytes, error: orjson.JSONDecodeError) -> Rejected:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return Rejected(Reason.NOT_UTF8, "", f"invalid UTF-8 at byte {e.start}")
    message = str(error)
    # orjson stops at 1024 levels of nesting
    if "depth limit" in message or "recursion" in message:
        return Rejected(Reason.TOO_DEEP, "", "nested deeper than 1024 levels")
    return Rejected(Reason.NOT_JSON, "", message[:200])


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "array"}.get(
        type(value), type(value).__name__
    )


def encode(record: Mapping[str, Any]) -> bytes:
    try:
        data = orjson.dumps(record)  # `dumps`, without a call around it for the common case
    except TypeError:
        try:
            data = dumps(record)
        except (TypeError, UnicodeEncodeError) as e:  # a lone surrogate: valid JSON escapes, but not UTF-8
            raise Rejected(Reason.UNENCODABLE, "", f"cannot be written as UTF-8 JSON: {e}") from None
    if len(data) > MAX_OUTPUT_BYTES:
        raise Rejected(Reason.TOO_LARGE, "properties",
                       f"the enriched record would be {len(data)} bytes; Kafka takes {MAX_OUTPUT_BYTES}")
    return data


def dead_letter(
    rejected: Rejected, raw: bytes, source: Mapping[str, Any], device_id: str | None = None
) -> bytes:
    """The dead-letter record: why, where it came from, and the input exactly as it arrived. Input that would
    make it larger than MAX_OUTPUT_BYTES (JSON escaping can grow text six-fold) is kept as base64, and beyond
    that cut, with its full length and SHA-256: the raw topic, which `source` names, still has it whole."""
    letter: dict[str, Any] = {"reason": rejected.reason.value, "field": rejected.field, "detail": rejected.detail}
    try:
        letter["raw"] = raw.decode("utf-8")
    except UnicodeDecodeError:
        letter["raw"] = base64.b64encode(raw).decode("ascii")
        letter["raw_encoding"] = "base64"
    letter["source"] = dict(source)
    if device_id is not None:
        letter["device_id"] = device_id
    data = orjson.dumps(letter)
    if len(data) <= MAX_OUTPUT_BYTES:
        return data
    room = (MAX_OUTPUT_BYTES - len(data) + len(orjson.dumps(letter["raw"])) - 512) * 3 // 4
    kept = raw[: max(room, 0)]
    letter["raw"] = base64.b64encode(kept).decode("ascii")
    letter["raw_encoding"] = "base64"
    if len(kept) < len(raw):
        letter["raw_truncated"] = True
        letter["raw_bytes"] = len(raw)
        letter["raw_sha256"] = hashlib.sha256(raw).hexdigest()
    return orjson.dumps(letter)


# -- stored state: RocksDB values and changelog records (the same bytes) ---------------------------------


def encode_state(state: DeviceState, applied: Mapping[int, int] | None = None,
                 persons: DevicePersons | None = None) -> bytes:
    """A device's state as stored in RocksDB and its changelog. `applied`: per input log of its partition
    (`streams.worker.batch.FORWARDED`), the offset of the last record applied when the state was written (the
    worker skips records up to it after a crash). `persons`: the device's persons part, stored with the state
    so that a record's effect on both is durable at once."""
    return dumps(
        [
            STATE_FORMAT,
            state.anonymous_id,
            state.default_id,
            state.login_key,
            state.login_value,
            [list(pair) for pair in state.bound],
            [[t, c.id, c.auth_state, c.hash_type] for t, c in state.customer_ids],
            state.generated,
            [[p, o] for p, o in applied.items()] if applied else [],
            encode_persons(persons) if persons is not None else None,
        ]
    )


def decode_state(data: bytes) -> DeviceState:
    return decode_stored(data)[0]


def decode_stored(data: bytes) -> tuple[DeviceState, dict[int, int]]:
    state, applied, _ = decode_full(data)
    return state, applied


def decode_full(data: bytes) -> tuple[DeviceState, dict[int, int], DevicePersons | None]:
    """A stored state, how far it holds its partition's inputs, and the device's persons part."""
    loaded = orjson.loads(data)
    if any(type(c[1]) is float for c in loaded[6]):
        loaded = json.loads(data)  # a customer id beyond 64 bits, kept exact
    fmt = loaded[0]
    persons = None
    if fmt == STATE_FORMAT:
        _, anonymous_id, default_id, login_key, login_value, bound, customer_ids, generated, applied, p = loaded
        persons = decode_persons(p)
    elif fmt in OLD_STATE_FORMATS:
        _, anonymous_id, default_id, login_key, login_value, bound, customer_ids, generated, applied = loaded
        if fmt == 1:
            applied = []
    else:
        raise ValueError(f"stored state format {fmt} is not {STATE_FORMAT}")
    state = DeviceState(
        anonymous_id=anonymous_id,
        default_id=default_id,
        login_key=login_key,
        login_value=login_value,
        bound=tuple((k, v) for k, v in bound),
        customer_ids=tuple((t, CustomerId(i, a, h)) for t, i, a, h in customer_ids),
        generated=generated,
    )
    return state, {p: o for p, o in applied}, persons


def encode_applied(raw: int, foreign: int, forwarded: Mapping[int, int]) -> bytes:
    """What a table partition's stored states hold of its inputs (`streams.worker.batch.Applied`)."""
    return dumps([raw, foreign, [[q, o] for q, o in sorted(forwarded.items())]])


def decode_applied(data: bytes) -> tuple[int, int, dict[int, int]]:
    raw, foreign, forwarded = orjson.loads(data)
    return int(raw), int(foreign), {int(q): int(o) for q, o in forwarded}


def state_as_json(state: DeviceState) -> dict[str, Any]:
    """A device's state as people read it (the `state` command, the web lookup)."""
    out: dict[str, Any] = {
        "anonymous_id": state.anonymous_id,
        "default_id": state.default_id,
        "distinct_id": state.distinct_id,
        "logged_in": state.logged_in,
    }
    if state.logged_in:
        out["login_key"] = state.login_key
        out["login_value"] = state.login_value
        out["login_id"] = state.login_id
    out["bound"] = dict(state.bound)
    # entries without id too: they are part of the state, though no record carries them
    out["customer_ids"] = {t: c.visible() for t, c in state.customer_ids}
    out["generated_ids"] = state.generated
    return out


# -- the persons stage: a device's persons part, pair claims, messages between the stages --------------------


def encode_persons(persons: DevicePersons) -> Any:
    """A device's persons part, as the element its stored state carries (None: nothing)."""
    if not persons:
        return None
    return [
        [[pair, [[c, login] for c, login in claimants.items()]] for pair, claimants in persons.claims.items()],
        [[u, p] for u, p in persons.signups.items()],
        [[pair, o] for pair, o in persons.owners.items()],
        sorted(persons.blocked),
    ]


def decode_persons(data: Any) -> DevicePersons | None:
    if not data:
        return None
    claims, signups, owners, blocked = data
    return DevicePersons(
        claims={pair: {c: bool(login) for c, login in claimants} for pair, claimants in claims},
        signups={u: p for u, p in signups},
        owners={pair: o for pair, o in owners},
        blocked=frozenset(blocked),
    )


def load_json(data: bytes) -> Any:
    return orjson.loads(data)


def encode_device_persons(persons: DevicePersons) -> bytes:
    return dumps(encode_persons(persons))


def decode_device_persons(data: bytes) -> DevicePersons | None:
    return decode_persons(orjson.loads(data))


def encode_entry(entry: Entry) -> bytes:
    return orjson.dumps([list(entry.logins), entry.device_user])


def decode_entry(data: bytes) -> Entry:
    logins, device_user = orjson.loads(data)
    return Entry(tuple(logins), bool(device_user))


def encode_summary(summary: Summary) -> bytes:
    return orjson.dumps(list(summary))


def decode_summary(data: bytes) -> Summary:
    owner, shared = orjson.loads(data)
    return Summary(owner, bool(shared))


def encode_claim(device_id: str, entry: Entry | None) -> bytes:
    """A device's claims on a pair, to the pair stage (keyed by the pair)."""
    return orjson.dumps([device_id, list(entry.logins), entry.device_user] if entry is not None else [device_id])


def decode_claim(data: bytes) -> tuple[str, Entry | None]:
    loaded = orjson.loads(data)
    if len(loaded) == 1:
        return str(loaded[0]), None
    device_id, logins, device_user = loaded
    return str(device_id), Entry(tuple(str(u) for u in logins), bool(device_user))


def encode_owner(pair: str, owner: str | None) -> bytes:
    """The pair stage's answer to a device (keyed by the device ID)."""
    return orjson.dumps([pair, owner])


def decode_owner(data: bytes) -> tuple[str, str | None]:
    pair, owner = orjson.loads(data)
    return str(pair), owner


def encode_user(mapping: PersonMapping | None, conflict: bool) -> bytes:
    """A device user's mapping now, to the stage that keeps the persons index (keyed by the user ID)."""
    return orjson.dumps([mapping.record() if mapping is not None else None, conflict])


def decode_user(data: bytes) -> tuple[PersonMapping | None, bool]:
    record, conflict = orjson.loads(data)
    return (PersonMapping.from_record(record) if record is not None else None), bool(conflict)


def encode_cause(cause: Trigger, links: Sequence[tuple[str, str]] = ()) -> bytes:
    """What caused a persons message (the change log's trigger), and for a user message the identifiers that
    link the user: a header of the message, so that its value is what a release without the log reads."""
    return orjson.dumps([cause.record_id, cause.event_time, [list(link) for link in links]])


def decode_cause(data: bytes) -> tuple[Trigger, tuple[tuple[str, str], ...]]:
    record_id, event_time, links = orjson.loads(data)
    return Trigger(record_id, event_time), tuple((str(k), str(h)) for k, h in links)


def encode_rows(rows: Sequence[Mapping[str, Any]]) -> list[bytes]:
    """The identity change log's rows (schemas/identity-change.schema.json)."""
    return [orjson.dumps(row) for row in rows]


def encode_mapping(mapping: PersonMapping) -> bytes:
    """The mapping record (persons.md §4): on the persons topic, and a line of replay's --persons file."""
    return orjson.dumps(mapping.record())
