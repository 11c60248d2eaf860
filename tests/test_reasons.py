"""Every dead-letter reason, with the field it names: one case per code (and the list is complete)."""

from __future__ import annotations

import base64
import hashlib

import orjson
import pytest

from streams.enrich import Enricher, EnrichSettings, MemoryStore
from streams.identity import Reason

from .helpers import Session

W = {"device_id": "d", "platform": "mp-wechat"}


def raw(**fields: object) -> bytes:
    return orjson.dumps(fields)


CASES: dict[Reason, list[tuple[bytes, str]]] = {
    Reason.NOT_UTF8: [(b'{"device_id": "\xff\xfe"}', "")],
    Reason.NOT_JSON: [(b'{"device_id": "d", ', ""), (b'{"a": NaN}', ""), (b'{"a": "\x00"}', "")],
    Reason.NOT_OBJECT: [(b'["d"]', ""), (b'"d"', ""), (b"null", ""), (b"42", "")],
    Reason.TOO_LARGE: [(raw(**W, event="e", properties={"x": "y" * 2_000_000}), "")],
    Reason.TOO_DEEP: [(b'{"properties": ' + b"[" * 2000 + b"]" * 2000 + b"}", "")],
    Reason.MISSING_FIELD: [
        (raw(platform="web", event="e"), "device_id"),
        (raw(device_id="d", event="e"), "platform"),
        (raw(**W), "event"),
        (raw(**W, action="login"), "id"),
        (raw(**W, action="bind", value="v"), "key"),
        (raw(**W, action="set_customer_ids"), "customer_ids"),
    ],
    Reason.WRONG_TYPE: [
        (raw(device_id=7, platform="web", event="e"), "device_id"),
        (raw(**W, event=["e"]), "event"),
        (raw(**W, event="e", properties=[1]), "properties"),
        (raw(**W, event="e", time="2024-01-01"), "time"),
        (raw(**W, event="e", time=1.5), "time"),
        (raw(**W, action="login", id=None), "id"),
        (raw(**W, action="login", id=True), "id"),
        (raw(**W, action="bind", key=5, value="v"), "key"),
        (raw(device_id="d", platform="web", action="bind", key="k", value=5), "value"),
        (raw(**W, action="set_customer_ids", customer_ids=["a"]), "customer_ids"),
    ],
    Reason.EMPTY_VALUE: [
        (raw(device_id="", platform="web", event="e"), "device_id"),
        (raw(**W, event=""), "event"),
        (raw(**W, action="identify", id=""), "id"),
        (raw(device_id="d", platform="web", action="login", id="  "), "id"),
        (raw(**W, action="bind", key="k", value=""), "value"),
    ],
    Reason.TOO_LONG: [
        (raw(device_id="d" * 256, platform="web", event="e"), "device_id"),
        (raw(**W, action="login", id="x" * 256), "id"),
        (raw(**W, action="bind", key="k", value="😀" * 128), "value"),  # 256 UTF-16 units
    ],
    Reason.INVALID_NUMBER: [
        (raw(**W, action="login", id=-1), "id"),
        (raw(**W, action="identify", id=1.5), "id"),
        (raw(**W, action="bind", key="k", value=2**53), "value"),
    ],
    Reason.INVALID_KEY: [
        (raw(**W, action="bind", key="1abc", value="v"), "key"),
        (raw(**W, action="bind", key="a b", value="v"), "key"),
        (raw(**W, action="login", key="k" * 101, id="u"), "key"),
        (raw(**W, action="unbind", key="k\n", value="v"), "key"),
    ],
    Reason.RESERVED_KEY: [
        (raw(**W, action="bind", key="Date", value="v"), "key"),
        (raw(**W, action="bind", key="user_group_x", value="v"), "key"),
        (raw(**W, action="login", key="DEVICE_ID", id="u"), "key"),
    ],
    Reason.REFUSED_KEY: [
        (raw(**W, action="bind", key="$identity_mp_id", value="v"), "key"),
        (raw(**W, action="bind", key="$identity_login_id", value="v"), "key"),
        (raw(**W, action="login", key="$identity_anonymous_id", id="u"), "key"),
        (raw(**W, action="login", key="$mp_openid", id="u"), "key"),
        (raw(**W, action="unbind", key="$identity_anonymous_id", value="v"), "key"),
        (raw(device_id="d", platform="web", action="login", key="$identity_cookie_id", id="u"), "key"),
    ],
    Reason.UNKNOWN_PLATFORM: [(raw(device_id="d", platform="android", event="e"), "platform")],
    Reason.UNKNOWN_ACTION: [(raw(**W, action="signup"), "action"), (raw(**W, action=3), "action")],
    Reason.UNSUPPORTED_ON_PLATFORM: [
        (raw(device_id="d", platform="mp-jd", action="bind", key="k", value="v"), "action"),
        (raw(device_id="d", platform="mp-qq", action="reset_anonymous_id"), "action"),
        (raw(device_id="d", platform="mp-kuaishou", action="login", key="$identity_email", id="u"), "key"),
    ],
    Reason.INVALID_AUTH_STATE: [
        (raw(**W, action="set_customer_ids", customer_ids={"u": {"id": "x", "authState": 3}}),
         "customer_ids.u.authState"),
        (raw(**W, action="set_customer_ids", customer_ids={"u": {"id": "x", "authState": "2"}}),
         "customer_ids.u.authState"),
        (raw(**W, action="set_customer_ids", customer_ids={"u": {"id": "x", "authState": None}}),
         "customer_ids.u.authState"),
    ],
    Reason.INVALID_HASH: [
        (raw(**W, action="set_customer_ids", customer_ids={"u": "x"}, hash="MD5"), "hash"),
        (raw(**W, action="set_customer_ids", customer_ids={"u": {"id": "x", "hashType": "SHA-256"}}),
         "customer_ids.u.hashType"),
    ],
    Reason.INVALID_CUSTOMER_ID: [
        (raw(**W, action="set_customer_ids", customer_ids={"u": None}), "customer_ids.u"),
        (raw(**W, action="set_customer_ids", customer_ids={"u": ["x"]}), "customer_ids.u"),
        (raw(**W, action="set_customer_ids", customer_ids={"u": {"id": {"x": 1}}}), "customer_ids.u.id"),
    ],
    Reason.INVALID_LOGIN_ID: [
        (raw(**W, action="set_customer_ids", customer_ids={"userid": {"id": 1.5, "authState": 1}}),
         "customer_ids.userid.id"),
    ],
}
# no input reaches these two: orjson refuses lone surrogates before the engine sees them, and internal
# errors are defects; both are driven below by breaking the engine on purpose. unreadable_state is the worker's
# (a stored state it cannot decode): tests/worker/test_devices.py and tests/integration/test_edges.py drive it
UNREACHABLE_FROM_INPUT = {Reason.UNENCODABLE, Reason.INTERNAL_ERROR, Reason.UNREADABLE_STATE}


def test_every_reason_has_cases() -> None:
    assert set(CASES) | UNREACHABLE_FROM_INPUT == set(Reason)


@pytest.mark.parametrize(("reason", "data", "field"),
                         [(r, d, f) for r, cases in CASES.items() for d, f in cases])
def test_reason(reason: Reason, data: bytes, field: str) -> None:
    session = Session()
    session.send(device_id="d", platform="mp-wechat", action="login", id="before")
    before = dict(session.store.states)
    out, dead = session.send_raw(data)
    assert out == []
    assert dead is not None
    assert (dead["reason"], dead["field"]) == (reason.value, field), dead["detail"]
    assert dead["detail"]
    kept = base64.b64decode(dead["raw"]) if dead.get("raw_encoding") == "base64" else dead["raw"].encode()
    if dead.get("raw_truncated"):  # too large to keep whole: its start, its length and its hash
        assert data.startswith(kept) and dead["raw_bytes"] == len(data)
        assert dead["raw_sha256"] == hashlib.sha256(data).hexdigest()
    else:
        assert kept == data
    assert dead["source"] == {"line": session.line}
    assert session.store.states == before  # a rejection changes nothing


def test_internal_errors_become_dead_letters(monkeypatch: pytest.MonkeyPatch) -> None:
    """A defect of ours must not stop the stream: the record is kept with reason internal_error."""
    from streams import enrich

    def broken(*args: object, **kwargs: object) -> object:
        raise KeyError("a bug")

    monkeypatch.setattr(enrich, "apply", broken)
    monkeypatch.setattr(enrich, "plain_track", broken)  # the engine's hot path for tracks
    outcome = Enricher(EnrichSettings()).step(raw(**W, event="e"), {"line": 1}, MemoryStore())
    assert outcome.records == []
    assert outcome.dead_letter is not None
    assert orjson.loads(outcome.dead_letter)["reason"] == "internal_error"


def test_unencodable_output_is_a_dead_letter(monkeypatch: pytest.MonkeyPatch) -> None:
    from streams import enrich

    def with_lone_surrogate(state, record, *args):  # type: ignore[no-untyped-def]
        return state, [{"distinct_id": "\ud800"}]

    monkeypatch.setattr(enrich, "apply", with_lone_surrogate)
    monkeypatch.setattr(enrich, "plain_track", lambda *args: {"distinct_id": "\ud800"})
    outcome = Enricher(EnrichSettings()).step(raw(**W, event="e"), {"line": 1}, MemoryStore())
    assert outcome.dead_letter is not None
    assert orjson.loads(outcome.dead_letter)["reason"] == "unencodable"


def test_dead_letter_keeps_bytes_that_are_not_utf8_as_base64() -> None:
    data = b'{"device_id": "\xc3\x28"}'
    _, dead = Session().send_raw(data)
    assert dead is not None
    assert dead["raw_encoding"] == "base64"
    assert base64.b64decode(dead["raw"]) == data


def test_a_dead_letter_never_outgrows_what_kafka_takes() -> None:
    """1 MiB of control characters is not JSON, and escaped as JSON it would be six times as large."""
    import hashlib

    from streams import codec

    data = b'{"x": "' + b"\x01" * (codec.DEFAULT_MAX_RECORD_BYTES - 10) + b'"}'
    _, dead = Session().send_raw(data)
    assert dead is not None and dead["reason"] == "not_json"
    assert len(orjson.dumps(dead)) <= codec.MAX_OUTPUT_BYTES
    assert dead["raw_truncated"] is True and dead["raw_bytes"] == len(data)
    assert dead["raw_sha256"] == hashlib.sha256(data).hexdigest()
    assert data.startswith(base64.b64decode(dead["raw"]))


def test_an_enriched_record_too_large_for_kafka_is_a_dead_letter() -> None:
    from streams import codec

    session = Session(EnrichSettings(max_record_bytes=2 << 20))
    data = orjson.dumps({**W, "event": "e", "properties": {"blob": "y" * 1_100_000}})
    out, dead = session.send_raw(data)
    assert out == []
    assert dead is not None and (dead["reason"], dead["field"]) == ("too_large", "properties")
    assert len(orjson.dumps(dead)) <= codec.MAX_OUTPUT_BYTES
