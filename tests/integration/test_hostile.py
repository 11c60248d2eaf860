"""Hostile input through the real worker: every class of bad record lands in the dead-letter topic with its
reason, its field and its original bytes, and the worker neither stops nor logs an error."""

from __future__ import annotations

import asyncio
import base64
import hashlib

import orjson
import pytest

from streams.config import Settings
from streams.kafka import clients as kafka_clients
from tests.integration import kit

pytestmark = pytest.mark.kafka

W = b'"device_id": "h1", "platform": "mp-wechat"'
MAX_RECORD_BYTES = 200_000  # the worker under test refuses larger records


def rec(body: bytes) -> bytes:
    return b"{" + W + b", " + body + b"}"


# (class, raw bytes, reason, field)
HOSTILE: list[tuple[str, bytes, str, str]] = [
    ("not JSON", b'{"device_id": "h1", ', "not_json", ""),
    ("empty message", b"", "not_json", ""),
    ("JSON array", b'["h1"]', "not_object", ""),
    ("JSON string", b'"h1"', "not_object", ""),
    ("JSON null", b"null", "not_object", ""),
    ("invalid UTF-8", b'{"device_id": "h\xff\xfe1"}', "not_utf8", ""),
    ("null byte", b'{"device_id": "h1\x00"}', "not_json", ""),
    ("NaN", rec(b'"event": "e", "time": NaN'), "not_json", ""),
    ("lone surrogate", rec(b'"event": "\\ud800"'), "not_json", ""),
    ("huge, not JSON", b'{"x": "' + b"\x01" * 900_000 + b'"}', "too_large", ""),
    ("too large", rec(b'"event": "e", "properties": {"x": "' + b"y" * 300_000 + b'"}'), "too_large", ""),
    ("deep nesting", rec(b'"event": "e", "properties": ' + b"[" * 3000 + b"]" * 3000), "too_deep", ""),
    ("device_id a number", b'{"device_id": 7, "platform": "web", "event": "e"}', "wrong_type", "device_id"),
    ("empty device_id", b'{"device_id": "", "platform": "web", "event": "e"}', "empty_value", "device_id"),
    ("256-char device_id", b'{"device_id": "' + b"d" * 256 + b'", "platform": "web", "event": "e"}', "too_long",
     "device_id"),
    ("unknown action", rec(b'"action": "signup"'), "unknown_action", "action"),
    ("unknown platform", b'{"device_id": "h1", "platform": "ios", "event": "e"}', "unknown_platform", "platform"),
    ("event a number", rec(b'"event": 5'), "wrong_type", "event"),
    ("properties an array", rec(b'"event": "e", "properties": [1]'), "wrong_type", "properties"),
    ("time a string", rec(b'"event": "e", "time": "now"'), "wrong_type", "time"),
    ("empty ID", rec(b'"action": "login", "id": ""'), "empty_value", "id"),
    ("256-char ID", rec(b'"action": "identify", "id": "' + b"i" * 256 + b'"'), "too_long", "id"),
    ("ID an object", rec(b'"action": "login", "id": {"a": 1}'), "wrong_type", "id"),
    ("negative ID", rec(b'"action": "login", "id": -1'), "invalid_number", "id"),
    ("bad identity key", rec(b'"action": "bind", "key": "1abc", "value": "v"'), "invalid_key", "key"),
    ("reserved key", rec(b'"action": "bind", "key": "Date", "value": "v"'), "reserved_key", "key"),
    ("refused key", rec(b'"action": "login", "key": "$identity_anonymous_id", "id": "u"'), "refused_key", "key"),
    ("default key bound", rec(b'"action": "bind", "key": "$identity_mp_id", "value": "v"'), "refused_key", "key"),
    ("invalid authState", rec(b'"action": "set_customer_ids", "customer_ids": {"u": {"id": "x", "authState": 3}}'),
     "invalid_auth_state", "customer_ids.u.authState"),
    ("null customer ID", rec(b'"action": "set_customer_ids", "customer_ids": {"u": null}'), "invalid_customer_id",
     "customer_ids.u"),
    ("unknown hash", rec(b'"action": "set_customer_ids", "customer_ids": {"u": "x"}, "hash": "MD5"'),
     "invalid_hash", "hash"),
    ("bind on a platform without association",
     b'{"device_id": "h1", "platform": "mp-jd", "action": "bind", "key": "k", "value": "v"}',
     "unsupported_on_platform", "action"),
]


def kept_input(letter: dict[str, object]) -> tuple[bytes, bool]:
    raw = letter["raw"]
    assert isinstance(raw, str)
    data = base64.b64decode(raw) if letter.get("raw_encoding") == "base64" else raw.encode()
    return data, bool(letter.get("raw_truncated"))


def test_every_class_of_bad_input_is_kept_and_the_worker_goes_on(topics: Settings,
                                                                 start_worker: kit.StartWorker) -> None:
    assert len(HOSTILE) >= 20
    worker = start_worker(topics, max_record_bytes=MAX_RECORD_BYTES)
    worker.wait_ready()
    good = b'{"device_id": "h1", "platform": "mp-wechat", "event": "after"}'
    sent = asyncio.run(kafka_clients.produce(topics, [(b"h1", raw) for _, raw, _, _ in HOSTILE] + [(b"h1", good)]))
    outputs = kit.wait_for_outputs(topics, len(HOSTILE) + 1, workers=[worker])
    worker.check_alive()

    letters = {(d["source"]["partition"], d["source"]["offset"]): d for d in outputs.dead_values}
    assert len(letters) == len(HOSTILE)
    # 900 KB of control characters, escaped as JSON, would not fit in a Kafka message: kept cut, with its hash
    assert sum(bool(d.get("raw_truncated")) for d in letters.values()) == 1
    for (name, raw, reason, field), meta in zip(HOSTILE, sent, strict=False):
        letter = letters[(meta.partition, meta.offset)]
        assert (letter["reason"], letter["field"]) == (reason, field), name
        assert letter["source"]["topic"] == topics.raw_topic
        kept, truncated = kept_input(letter)
        if truncated:
            assert raw.startswith(kept) and letter["raw_sha256"] == hashlib.sha256(raw).hexdigest(), name
        else:
            assert kept == raw, name
    # the stream goes on: the good record after them is enriched
    assert [orjson.loads(r.value)["event"] for r in outputs.enriched] == ["after"]
    assert worker.errors() == []
    assert worker.stop() == 0
