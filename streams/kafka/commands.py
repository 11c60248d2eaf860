"""The `produce` and `tail` commands: a JSONL file into the raw topic, and a topic as people read it. Topic names
come from `config.Settings`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from typing import Any, TextIO

import orjson
from aiokafka.errors import KafkaError

from streams import config
from streams.config import Settings
from streams.kafka.admin import TopicMissing, ensure_topics, partition_count
from streams.kafka.clients import assigned, produce_file, topic_of

RAW_PREVIEW = 120




def _text(value: Any) -> str:
    """A value as one token: bare when plain, else JSON-quoted."""
    if isinstance(value, str) and value and not any(c.isspace() or c in '"={},' for c in value):
        return value
    if isinstance(value, str):
        return orjson.dumps(value).decode()
    return orjson.dumps(value).decode() if not isinstance(value, bytes) else repr(value)


def _preview(text: str, limit: int = RAW_PREVIEW) -> str:
    text = text.replace("\n", "\\n").replace("\r", "\\r")
    return text if len(text) <= limit else text[:limit] + "…"


def format_record(record: Any) -> str:
    """One line for people: an enriched record, a dead letter, or (another topic) the key and value."""
    where = f"[p{record.partition}@{record.offset}]"
    if record.value is None and record.key is not None:  # a tombstone: on the persons topic, a mapping ended
        return f"{where} key={_text(record.key.decode('utf-8', 'backslashreplace'))} (tombstone)"
    value: bytes = record.value if record.value is not None else b""
    try:
        data = orjson.loads(value)
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict) and "reason" in data and "source" in data and "raw" in data:
        return f"{where} " + _dead_letter_line(data)
    if isinstance(data, dict) and "distinct_id" in data and "device_id" in data:
        return f"{where} " + _enriched_line(data)
    if isinstance(data, dict) and data.get("kind") in ("mapping", "link") and "version" in data:
        return f"{where} " + _change_line(data)
    if isinstance(data, dict) and "person_id" in data and "user_id" in data:
        key = f" key={data['identity_key']}" if "identity_key" in data else ""
        return (f"{where} user={data['user_id']} -> person={data['person_id']} via {data.get('via')}{key} "
                f"d={_text(data.get('device_id'))}")
    key = "-" if record.key is None else _text(record.key.decode("utf-8", "backslashreplace"))
    return f"{where} key={key} " + _preview(value.decode("utf-8", "backslashreplace"), 200)


def _enriched_line(r: dict[str, Any]) -> str:
    parts = [f"d={_text(r.get('device_id'))}", str(r.get("platform", "?")), str(r.get("type", "?"))]
    if "event" in r:
        parts.append(_text(r["event"]))
    parts.append(f"distinct_id={_text(r.get('distinct_id'))}")
    for name in ("login_id", "original_id"):
        if name in r:
            parts.append(f"{name}={_text(r[name])}")
    identities = r.get("identities")
    if isinstance(identities, dict):
        parts.append("{" + ", ".join(f"{k}={_text(v)}" for k, v in identities.items()) + "}")
    customer_ids = r.get("customer_ids")
    if isinstance(customer_ids, dict):
        cids = []
        for t, c in customer_ids.items():
            c = c if isinstance(c, dict) else {}
            cid = f"{t}={_text(c.get('id'))}/{c.get('authState')}"
            cids.append(cid + (f"/{c['hashType']}" if "hashType" in c else ""))
        parts.append("customer_ids{" + ", ".join(cids) + "}")
    return " ".join(parts)


def _change_line(r: dict[str, Any]) -> str:
    """A row of the identity change log."""
    head = f"user={r.get('user_id')} v{r.get('version')}"
    if r["kind"] == "link":
        return f"{head} link {_text(r.get('key'))} hash={r.get('value_hash')} -> person={r.get('person_id')}"
    way = f" via {r['via']}" if r.get("via") else ""
    if r.get("identity_key"):
        way += f" key={r['identity_key']}"
    cause = r.get("record_id") or (f"line {r['line']}" if "line" in r else "?")
    return (f"{head} {r.get('op')}: {r.get('previous_person_id') or '-'} -> {r.get('person_id') or '-'}{way} "
            f"d={_text(r.get('device_id'))} by {cause}")


def _dead_letter_line(d: dict[str, Any]) -> str:
    head = "DEAD"
    if "device_id" in d:
        head += f" d={_text(d['device_id'])}"
    raw_name = "raw(base64)" if d.get("raw_encoding") == "base64" else "raw"
    return (
        f"{head} reason={d.get('reason')} field={_text(d.get('field'))}: {d.get('detail')}"
        f" | {raw_name}={_preview(str(d.get('raw')))}"
    )


def _write_raw(out: TextIO, value: bytes | None) -> None:
    buffer = getattr(out, "buffer", None)
    if buffer is not None:
        out.flush()
        buffer.write((value or b"") + b"\n")
    else:
        out.write((value or b"").decode("utf-8", "replace") + "\n")


async def tail(
    settings: Settings,
    which: str,
    *,
    from_beginning: bool = True,
    max_records: int | None = None,
    idle_timeout: float | None = None,
    out: TextIO | None = None,
    raw: bool = False,
) -> int:
    """Print a topic's records ('enriched', 'dead-letter' or a topic name), every partition, from its
    beginning or from now on: a line each for people, or with `raw` each value as it is. Stops after
    `max_records`, or after `idle_timeout` seconds without a new record; else runs until cancelled.
    Prints to `out` (default: stdout). Returns how many records it printed."""
    out = sys.stdout if out is None else out
    topic = topic_of(settings, which)
    shown = 0
    if max_records is not None and max_records <= 0:
        return 0
    async with assigned(settings, topic, from_beginning=from_beginning) as consumer:
        last = time.monotonic()
        while True:
            wait = 1.0 if idle_timeout is None else max(0.0, min(1.0, last + idle_timeout - time.monotonic()))
            batch = await consumer.getmany(timeout_ms=int(wait * 1000))
            records = [r for tp in sorted(batch, key=lambda tp: tp.partition) for r in batch[tp]]
            for record in records:
                if raw:
                    _write_raw(out, record.value)
                else:
                    out.write(format_record(record) + "\n")
                shown += 1
                if max_records is not None and shown >= max_records:
                    out.flush()
                    return shown
            if records:
                out.flush()
                last = time.monotonic()
            elif idle_timeout is not None and time.monotonic() - last >= idle_timeout:
                return shown


# -- command line ----------------------------------------------------------------------------------------

PRODUCE_EXAMPLES = """examples:
  python -m streams produce                                # the built-in sample, keyed by device_id
  python -m streams produce --file day1.jsonl --brokers kafka1:9092,kafka2:9092
  cat raw.jsonl | python -m streams produce --file - --no-key
  python -m streams produce --file replay-me.jsonl --topic events.raw.backfill
"""

TAIL_EXAMPLES = """examples:
  python -m streams tail enriched                          # everything so far, then follow
  python -m streams tail dead-letter --idle-timeout 5      # stop after 5 s without a new record
  python -m streams tail enriched --from-end --max 10      # the next 10 records
  python -m streams tail enriched --raw --idle-timeout 2 > enriched.jsonl
  python -m streams tail events.raw --raw --max 1
"""


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    produce_parser = commands.add_parser(
        "produce",
        help="send a JSONL file's lines to the raw topic",
        description=(
            "Send each non-blank line of a JSONL file to Kafka as one message, bytes unchanged, keyed by\n"
            "the record's device_id (records without one: no key). Waits until every message is\n"
            "acknowledged (acks=all, idempotent). When the target is the raw topic and it does not exist\n"
            "yet, creates it (--partitions) and the enriched and dead-letter topics."
        ),
        epilog=PRODUCE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    produce_parser.add_argument(
        "--file", metavar="PATH", default=None,
        help="raw records, JSONL ('-' = stdin; default: the built-in sample streams/samples/seed.jsonl)",
    )
    produce_parser.add_argument("--no-key", action="store_true",
                                help="send without keys (the worker repartitions by device_id)")
    produce_parser.add_argument("--topic", metavar="TOPIC", default=None,
                                help="send here instead of the raw topic (--raw-topic)")
    config.add_arguments(produce_parser, "kafka")

    tail_parser = commands.add_parser(
        "tail",
        help="print a topic's records as people read them",
        description=(
            "Print the records of the enriched or dead-letter topic (or any topic), every partition, one\n"
            "line each: [p<partition>@<offset>], then the device, platform, type, event, IDs and identities;\n"
            "for a dead letter its reason, field, detail and the start of the raw input. Reads from the\n"
            "beginning and follows until interrupted, unless --max or --idle-timeout says when to stop."
        ),
        epilog=TAIL_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tail_parser.add_argument("which", metavar="TOPIC",
                             help="'enriched', 'dead-letter', 'persons', 'identity-changes', or a topic name")
    tail_parser.add_argument("--from-end", action="store_true", help="only records that arrive from now on")
    tail_parser.add_argument("--max", type=int, metavar="N", default=None, help="stop after N records")
    tail_parser.add_argument("--idle-timeout", type=float, metavar="S", default=None,
                             help="stop after S seconds without a new record")
    tail_parser.add_argument("--raw", action="store_true", help="print each value as it is (JSONL)")
    config.add_arguments(tail_parser, "kafka")


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run `produce` or `tail`; the exit code."""
    name = args.command
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        if name == "produce":
            return asyncio.run(_run_produce(args, settings))
        if name == "tail":
            return asyncio.run(_run_tail(args, settings))
    except TopicMissing as e:
        print(f"streams {name}: {e} on {settings.brokers}", file=sys.stderr)
        return 1
    except OSError as e:
        if isinstance(e, BrokenPipeError):  # `| head`: stop quietly; stdout to /dev/null for the exit flush
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        print(f"streams {name}: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    except KafkaError as e:
        print(f"streams {name}: Kafka at {settings.brokers}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    raise ValueError(f"not a command of streams.kafka.topics: {name}")


async def _run_produce(args: argparse.Namespace, settings: Settings) -> int:
    topic = args.topic or settings.raw_topic
    if await partition_count(settings, topic) is None:
        if topic != settings.raw_topic:
            raise TopicMissing(topic)
        count = await ensure_topics(settings)
        print(f"streams produce: created {topic} ({count} partitions)", file=sys.stderr)
    started = time.monotonic()
    n = await produce_file(settings, args.file, keyed=not args.no_key, topic=topic)
    source = "the built-in sample" if args.file is None else ("stdin" if args.file == "-" else args.file)
    took = time.monotonic() - started
    print(f"streams produce: {n:,} record{'' if n == 1 else 's'} from {source} to {topic} in {took:.1f}s",
          file=sys.stderr)
    return 0


async def _run_tail(args: argparse.Namespace, settings: Settings) -> int:
    if args.max is not None and args.max < 0:
        print("streams tail: --max must be 0 or more", file=sys.stderr)
        return 2
    await tail(settings, args.which, from_beginning=not args.from_end, max_records=args.max,
               idle_timeout=args.idle_timeout, raw=args.raw)
    return 0
