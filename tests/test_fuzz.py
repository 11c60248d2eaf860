"""Fuzzing the decoder and the enrich step: whatever bytes arrive, `Enricher.step` answers, and well.

What lives here: strategies for arbitrary bytes, arbitrary JSON, and JSON objects made of the raw record's own
field names (with values of every JSON type, nested customer IDs included), and the properties every outcome
must have (identity.md §5: a record is never dropped silently; enriched records and dead letters are
well-formed). Not here: whether an identity is right (that is `tests/identity/test_model.py`).

All examples share one `MemoryStore`, so later records meet devices that earlier ones changed.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams import codec
from streams.enrich import Enricher, MemoryStore, Outcome
from streams.identity import PLATFORMS, DeviceState, Reason, Rejected, Settings, apply, plain_track

STORE = MemoryStore()
ENRICHER = Enricher()
REASONS = {r.value for r in Reason}
PROFILE_TYPES = {
    "profile_set", "profile_set_once", "profile_increment", "profile_append", "profile_unset", "profile_delete",
}  # fmt: skip
# how many records a taken record gives, per action (identity.md §3, §5): nothing for identify, logout and
# reset; at most one $SignUp for login and set_customer_ids (none when repeated, a no-op, or no login)
EMITS: dict[str, range] = {
    "identify": range(0, 1),
    "logout": range(0, 1),
    "reset_anonymous_id": range(0, 1),
    "login": range(0, 2),
    "set_customer_ids": range(0, 2),
    "track": range(1, 2),
    "bind": range(1, 2),
    "unbind": range(1, 2),
    **dict.fromkeys(PROFILE_TYPES, range(1, 2)),
}
RECORD_TYPES = {"track", "track_signup", "track_id_bind", "track_id_unbind", *PROFILE_TYPES}

FUZZ = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- strategies ---------------------------------------------------------------------------------------------

# orjson writes integers of 64 bits at most (what longer ones become: tests/identity/test_model.py's ID pool)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


def small_text(*common: str) -> st.SearchStrategy[str]:
    """Mostly a name the engine knows, sometimes any text: known names reach deeper code."""
    return st.sampled_from(common) | st.text(max_size=12)


ids = st.sampled_from(["u1", "d1", "", " ", "x" * 256, "$identity_email+e1"]) | json_values
keys = small_text("$identity_email", "$identity_login_id", "$identity_anonymous_id", "$identity_mp_id",
                  "$identity_cookie_id", "date", "1abc", "k" * 101) | json_values
auth_states = st.sampled_from([0, 1, 2, "UNKNOWN", "AUTHENTICATED", "LOGGED_OUT", 3, "2"]) | json_values
customer_entries = (
    json_values
    | st.fixed_dictionaries({}, optional={"id": ids, "authState": auth_states, "hashType": json_values})
)
customer_ids = st.dictionaries(small_text("userid", "dpuuid", "__proto__"), customer_entries, max_size=3) | json_values
hashes = st.sampled_from(["SHA-256", "sha256", "md5"]) | json_values

device_ids = st.sampled_from(["d1", "d2", "d3"])
platforms = st.sampled_from(sorted(PLATFORMS))
actions = st.sampled_from(sorted(EMITS))
# the fields an action reads, each present or not, each with its usual kind of value or any JSON value
ACTION_FIELDS = {
    "event": small_text("buy", "$SignUp") | json_values,
    "properties": st.dictionaries(st.text(max_size=8), json_values, max_size=3) | json_values,
    "time": st.integers(min_value=-(2**63), max_value=2**63 - 1) | json_values,
    "id": ids,
    "key": keys,
    "value": ids,
    "customer_ids": customer_ids,
    "hash": hashes,
}
# any of a raw record's fields, the envelope's included
record_fields = st.fixed_dictionaries(
    {},
    optional={
        "device_id": device_ids | json_values,
        "platform": platforms | json_values,
        "action": actions | json_values,
        **ACTION_FIELDS,
    },
)
# a good envelope (known device, platform and action), so that the action's own fields get tested
good_envelopes = st.fixed_dictionaries(
    {"device_id": device_ids, "platform": platforms, "action": actions}, optional=ACTION_FIELDS
)
# where a record came from, in either form the dead-letter schema allows
sources = st.fixed_dictionaries(
    {
        "topic": st.from_regex(r"[a-zA-Z0-9._-]{1,20}", fullmatch=True),  # Kafka's topic name characters
        "partition": st.integers(0, 63),
        "offset": st.integers(0, 2**40),
    }
) | st.fixed_dictionaries({"line": st.integers(1, 10**6)})


def encodings(value: Any) -> st.SearchStrategy[bytes]:
    """The same JSON as orjson writes it, or as the stdlib writes it (spaces, \\u escapes)."""
    return st.sampled_from(
        [orjson.dumps(value), json.dumps(value).encode(), json.dumps(value, ensure_ascii=False, indent=1).encode()]
    )


# -- what every outcome must be --------------------------------------------------------------------------


def check_outcome(raw: bytes, source: dict[str, Any], outcome: Outcome) -> None:
    assert not (outcome.records and outcome.dead_letter is not None), "records and a dead letter"
    if outcome.dead_letter is not None:
        check_dead_letter(raw, source, outcome.dead_letter)
        return
    # taken: so it was a JSON object naming a known action (track when it names none)
    record = orjson.loads(raw)
    action = record.get("action", "track")
    assert len(outcome.records) in EMITS[action], f"{action} taken, {len(outcome.records)} records: {raw!r}"
    for data in outcome.records:
        check_record(record, data)


def check_dead_letter(raw: bytes, source: dict[str, Any], data: bytes) -> None:
    letter = orjson.loads(data)
    assert letter["reason"] in REASONS
    # internal_error is "a defect of ours" (errors.py): bad input must get its own reason, never a crash (§3)
    assert letter["reason"] != Reason.INTERNAL_ERROR, f"a crash on {raw[:200]!r}: {letter['detail']}"
    assert isinstance(letter["field"], str)
    assert isinstance(letter["detail"], str)
    if letter.get("raw_encoding") == "base64":
        assert base64.b64decode(letter["raw"], validate=True) == raw
    else:
        assert "raw_encoding" not in letter
        assert letter["raw"].encode("utf-8") == raw
    assert letter["source"] == source


def check_record(raw: dict[str, Any], data: bytes) -> None:
    rec = orjson.loads(data)
    assert isinstance(rec, dict)
    for name in ("distinct_id", "anonymous_id", "type", "device_id", "platform"):
        assert isinstance(rec.get(name), str) and rec[name], f"{name} missing or empty in {rec!r}"
    assert rec["type"] in RECORD_TYPES
    assert (rec["device_id"], rec["platform"]) == (raw["device_id"], raw["platform"])


def step(raw: bytes, source: dict[str, Any]) -> Outcome:
    outcome = ENRICHER.step(raw, source, STORE)  # must not raise, whatever `raw` is
    check_outcome(raw, source, outcome)
    return outcome


# -- the properties -------------------------------------------------------------------------------------


@FUZZ
@given(raw=st.binary(max_size=256), source=sources)
def test_arbitrary_bytes(raw: bytes, source: dict[str, Any]) -> None:
    step(raw, source)


@FUZZ
@given(raw=st.one_of(
    st.text(max_size=64).map(str.encode),
    st.binary(max_size=64).map(lambda b: b'{"device_id":"d1","platform":"web","event":"' + b + b'"}'),
), source=sources)
def test_almost_json(raw: bytes, source: dict[str, Any]) -> None:
    """Text, and a good record with arbitrary bytes inside a string (invalid UTF-8, bad escapes, quotes)."""
    step(raw, source)


@FUZZ
@given(data=st.data(), value=json_values, source=sources)
def test_arbitrary_json(data: st.DataObject, value: Any, source: dict[str, Any]) -> None:
    step(data.draw(encodings(value)), source)


@FUZZ
@given(data=st.data(), fields=record_fields, source=sources)
def test_record_shaped(data: st.DataObject, fields: dict[str, Any], source: dict[str, Any]) -> None:
    step(data.draw(encodings(fields)), source)


@FUZZ
@given(data=st.data(), fields=good_envelopes, source=sources)
def test_good_envelope(data: st.DataObject, fields: dict[str, Any], source: dict[str, Any]) -> None:
    step(data.draw(encodings(fields)), source)


def snapshot() -> dict[str, bytes]:
    """Every stored device state as bytes: a state object changed in place could not hide."""
    return {d: codec.encode_state(s) for d, s in STORE.states.items()}


@FUZZ
@given(batch=st.lists(good_envelopes | record_fields, min_size=1, max_size=8), source=sources)
def test_rejected_record_leaves_store_unchanged(batch: list[dict[str, Any]], source: dict[str, Any]) -> None:
    """§3: a record that fails validation changes nothing, whatever the device's state (the batch gives the
    devices a state first)."""
    for fields in batch:
        raw = orjson.dumps(fields)
        before = snapshot()
        outcome = step(raw, source)
        if outcome.dead_letter is not None:
            assert snapshot() == before, f"a dead letter changed the store: {raw!r}"


def test_unhashable_hash_is_bad_input() -> None:
    """§4: a `hash` other than the four SHA-256 spellings is bad input: an array or object included."""
    for bad in ([], ["SHA-256"], {"type": "SHA-256"}):
        raw = orjson.dumps(
            {"device_id": "d9", "platform": "web", "action": "set_customer_ids", "customer_ids": {}, "hash": bad}
        )
        outcome = ENRICHER.step(raw, {"line": 1}, MemoryStore())
        assert outcome.dead_letter is not None
        assert orjson.loads(outcome.dead_letter)["reason"] == Reason.INVALID_HASH, outcome.dead_letter


# tracks, and things that look like them: the shapes where the hot path and the action table could part
track_shaped = st.fixed_dictionaries(
    {"device_id": device_ids},
    optional={
        "platform": platforms | json_values,
        "action": st.sampled_from(["track", "login", "Track"]) | json_values,
        "event": ACTION_FIELDS["event"],
        "properties": ACTION_FIELDS["properties"],
        "time": ACTION_FIELDS["time"],
    },
)


@FUZZ
@given(batch=st.lists(good_envelopes, max_size=6), fields=track_shaped,
       default_platform=st.none() | platforms | st.just("nowhere"))
def test_plain_track_is_what_apply_does(batch: list[dict[str, Any]], fields: dict[str, Any],
                                        default_platform: str | None) -> None:
    """The hot path for tracks (`plain_track`) either declines or gives exactly what `apply` gives, on any
    state (the batch gives the device one) and any record."""
    store = MemoryStore()
    for earlier in batch:
        ENRICHER.step(orjson.dumps(earlier), {"line": 1}, store)
    device_id = fields["device_id"]
    state = store.get(device_id) or DeviceState.new(device_id)
    raw = orjson.loads(orjson.dumps(fields))
    fast = plain_track(state, raw, default_platform, device_id)
    try:
        new, emitted = apply(state, raw, Settings(), default_platform, device_id)
    except Rejected:
        assert fast is None, f"the hot path took a record apply refuses: {raw!r}"
        return
    if raw.get("action", "track") == "track":
        assert fast is not None, f"the hot path declined a valid track: {raw!r}"
    if fast is not None:
        assert new is state and emitted == [fast]
        assert list(emitted[0]) == list(fast)  # the same fields in the same order: the same bytes
