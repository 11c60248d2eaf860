"""`streams.kafka.topics` against the real broker: topics, producing a file, reading back, the two commands."""

from __future__ import annotations

import argparse
import asyncio
import io
from pathlib import Path

import orjson
import pytest

from streams import config
from streams.config import Settings
from streams.kafka import admin as kafka_admin
from streams.kafka import clients as kafka_clients
from streams.kafka import commands as kafka_commands
from tests.conftest import validate
from tests.integration import kit

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(120)]


def cli(*argv: str) -> tuple[argparse.Namespace, Settings]:
    """The two commands, parsed as `streams.cli` wires them."""
    parser = argparse.ArgumentParser(prog="streams")
    kafka_commands.add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args, Settings().with_args(args)


def kafka_flags(settings: Settings) -> list[str]:
    return ["--brokers", settings.brokers, "--raw-topic", settings.raw_topic, "--enriched-topic",
            settings.enriched_topic, "--dead-letter-topic", settings.dead_letter_topic]


def test_ensure_topics_and_partition_count(topics: Settings) -> None:
    assert asyncio.run(kafka_admin.partition_count(topics, topics.enriched_topic)) is None
    assert asyncio.run(kafka_admin.ensure_topics(topics)) == 4  # the raw topic exists with 4
    for topic in (topics.raw_topic, topics.enriched_topic, topics.dead_letter_topic):
        assert asyncio.run(kafka_admin.partition_count(topics, topic)) == 4
    assert asyncio.run(kafka_admin.ensure_topics(topics, partitions=8)) == 4  # existing: left alone

    fresh = Settings(brokers=topics.brokers, raw_topic=topics.raw_topic + "2", enriched_topic=topics.enriched_topic
                     + "2", dead_letter_topic=topics.dead_letter_topic + "2", partitions=3)
    assert asyncio.run(kafka_admin.ensure_topics(fresh)) == 3
    assert asyncio.run(kafka_admin.partition_count(fresh, fresh.dead_letter_topic)) == 3


def test_produce_file_keys_and_bytes(topics: Settings, tmp_path: Path) -> None:
    lines = [
        b'{"device_id": "d1", "event": "a"}',
        b"   ",
        b'{"device_id": "d\xc3\xa9", "event": "b"}',
        b'{"device_id": 5}',
        b"[1, 2]",
        b"\xff not json",
        b'{"device_id": "d1",   "event": "c"}\r',
    ]
    path = kit.write_jsonl(tmp_path / "in.jsonl", lines)
    assert asyncio.run(kafka_clients.produce_file(topics, str(path))) == 6
    records = asyncio.run(kafka_clients.read_all(topics, topics.raw_topic))
    assert sorted(r.value for r in records) == sorted(v for v in lines if v.strip())  # bytes unchanged
    keys = {r.value: r.key for r in records}
    assert keys[lines[0]] == b"d1" and keys[lines[6]] == b"d1"
    assert keys[lines[2]] == "dé".encode()
    assert keys[lines[3]] is keys[lines[4]] is keys[lines[5]] is None
    # one device, one partition, in file order
    d1 = [r for r in records if r.key == b"d1"]
    assert [r.value for r in sorted(d1, key=lambda r: r.offset)] == [lines[0], lines[6]]

    assert asyncio.run(kafka_clients.produce_file(topics, str(path), keyed=False)) == 6
    records = asyncio.run(kafka_clients.read_all(topics, topics.raw_topic))
    assert len(records) == 12 and sum(r.key is None for r in records) == 6 + 3


def test_produce_the_sample_and_tail(topics: Settings, tmp_path: Path) -> None:
    assert asyncio.run(kafka_clients.produce_file(topics, None)) == 41
    # an enriched and a dead-letter topic with what replay makes of the sample, to look at
    enriched, dead = kit.replay_outputs(topics, kafka_clients.SAMPLE)
    asyncio.run(kafka_admin.ensure_topics(topics))
    asyncio.run(kafka_clients.produce(topics, [(r["device_id"].encode(), orjson.dumps(r)) for r in enriched],
                                     topic=topics.enriched_topic))
    asyncio.run(kafka_clients.produce(topics, [(None, orjson.dumps(d)) for d in dead],
                                     topic=topics.dead_letter_topic))

    out = io.StringIO()
    assert asyncio.run(kafka_commands.tail(topics, "enriched", max_records=100, idle_timeout=2, out=out)) == 23
    lines = out.getvalue().splitlines()
    assert len(lines) == 23
    device = "1712042794795-4430041-097b46dd83f7da8-29832842"
    signup = next(line for line in lines if "track_signup" in line and f"d={device} " in line)
    assert signup.startswith("[p") and "@" in signup.split()[0]
    assert f"d={device} mp-wechat track_signup $SignUp" in signup
    assert "distinct_id=your_customer_id login_id=your_customer_id" in signup
    assert "$identity_login_id=your_customer_id" in signup

    out = io.StringIO()
    asyncio.run(kafka_commands.tail(topics, "dead-letter", idle_timeout=1, out=out))
    letters = out.getvalue().splitlines()
    assert len(letters) == 7
    assert any("DEAD d=d-bad-3 reason=invalid_key field=key: " in line and "| raw={" in line for line in letters)

    out = io.StringIO()
    assert asyncio.run(kafka_commands.tail(topics, "dead-letter", max_records=3, raw=True, out=out)) == 3
    for line in out.getvalue().splitlines():
        validate("dead-letter", line)

    # from the end: nothing old, then what arrives
    out = io.StringIO()
    assert asyncio.run(kafka_commands.tail(topics, "dead-letter", from_beginning=False, idle_timeout=1,
                                         out=out)) == 0


def test_the_commands(topics: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fresh = Settings(brokers=topics.brokers, raw_topic=topics.raw_topic + "x", enriched_topic=topics.enriched_topic
                     + "x", dead_letter_topic=topics.dead_letter_topic + "x")
    args, settings = cli("produce", *kafka_flags(fresh), "--partitions", "2")
    assert kafka_commands.run(args, settings) == 0  # creates the missing topics
    assert "41 records from the built-in sample" in capsys.readouterr().err
    assert asyncio.run(kafka_admin.partition_count(fresh, fresh.enriched_topic)) == 2

    args, settings = cli("tail", fresh.raw_topic, *kafka_flags(fresh), "--max", "2", "--raw")
    assert kafka_commands.run(args, settings) == 0
    shown = capsys.readouterr().out.splitlines()
    assert len(shown) == 2 and all(line.startswith('{"device_id"') for line in shown)

    args, settings = cli("tail", "enriched", *kafka_flags(fresh), "--idle-timeout", "0.5")
    assert kafka_commands.run(args, settings) == 0
    assert capsys.readouterr().out == ""

    args, settings = cli("tail", "no.such.topic", *kafka_flags(fresh), "--max", "1")
    assert kafka_commands.run(args, settings) == 1
    assert "topic 'no.such.topic' does not exist" in capsys.readouterr().err

    args, settings = cli("produce", "--topic", "no.such.topic", *kafka_flags(fresh))
    assert kafka_commands.run(args, settings) == 1

    args, settings = cli("produce", "--file", str(tmp_path / "missing.jsonl"), *kafka_flags(fresh))
    assert kafka_commands.run(args, settings) == 1
    assert "No such file" in capsys.readouterr().err


def test_help_has_examples(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("produce", "tail"):
        with pytest.raises(SystemExit):
            cli(command, "--help")
        text = capsys.readouterr().out
        assert "examples:" in text and f"python -m streams {command}" in text
        assert config.flag_name("brokers") in text
