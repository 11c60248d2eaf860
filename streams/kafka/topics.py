"""The Kafka side of the tools: topics, producing a JSONL file, reading a topic back.

Lives here: what the `produce` and `tail` commands do and what the integration tests use to drive the real
broker: `partition_count`, `ensure_topics` (the raw topic, then the enriched and dead-letter topics with
its partition count), `produce_file` / `produce` (one message per line, keyed by device ID, delivery
awaited), `tail` (a topic as people read it) and `read_all` (a topic's whole content). aiokafka only: the
worker's Faust app (`streams.worker.app`) is not needed to feed it or to look at what it wrote. Topic names come
from `config.Settings`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, TextIO, TypeVar

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment
from aiokafka.errors import KafkaError, NodeNotReadyError, TopicAlreadyExistsError, for_code

from streams import config
from streams.config import Settings
from streams.kafka.partitioners import aiokafka_partitioner

SAMPLE = Path(__file__).resolve().parent / "samples" / "seed.jsonl"
UNKNOWN_TOPIC = 3  # UNKNOWN_TOPIC_OR_PARTITION
TOPIC_EXISTS = TopicAlreadyExistsError.errno  # 36
SEND_WINDOW = 10_000  # deliveries awaited in chunks: memory stays flat for any file size
RAW_PREVIEW = 120


T = TypeVar("T")


class TopicMissing(Exception):
    def __init__(self, topic: str) -> None:
        super().__init__(f"topic {topic!r} does not exist")
        self.topic = topic


class TopicCreationFailed(KafkaError):  # type: ignore[misc]
    """The broker refused to create a topic (its answer carries the error; aiokafka does not raise it)."""

    def __init__(self, topic: str, code: int, message: str | None) -> None:
        error = for_code(code)
        super().__init__(f"cannot create topic {topic!r}: {error.__name__} (error code {code})"
                         + (f": {message}" if message else ""))
        self.topic = topic
        self.code = code
        # e.g. a request timeout is worth another try; an invalid replication factor is not
        self.retriable = bool(getattr(error, "retriable", False))


# -- an admin client that survives a broker down ---------------------------------------------------------


class Admin(AIOKafkaAdminClient):  # type: ignore[misc]
    """aiokafka's admin client, whose requests go to a broker that answers.

    aiokafka sends a request that names no broker (metadata, topic configs, consumer groups) to a random
    broker of the cluster's metadata, one that is down included: with one broker of three down, one call in
    three failed with NodeNotReadyError, and the worker died at start-up. The metadata lists a broker that
    was killed until the controller fences it (seconds later); a stale controller the same."""

    async def _send_request(self, request: Any, node_id: int | None = None) -> Any:
        if node_id is None:
            node_id = await self.reachable_node()
        return await self._client.send(node_id, request)

    async def reachable_node(self) -> int:
        nodes = [b.nodeId for b in self._client.cluster.brokers()]
        random.shuffle(nodes)
        for node_id in nodes:
            if await self._client.ready(node_id):
                return int(node_id)
        raise NodeNotReadyError(f"none of the brokers {sorted(nodes)} answers")

    async def _send_to_controller(self, request: Any) -> Any:
        # aiokafka waits for the controller its metadata names until the request times out, also when that
        # broker is down. With KRaft the metadata names any live broker, and any broker forwards controller
        # requests (CreateTopics) to the controller quorum: when the one named does not answer, ask another.
        # (A broker of an older cluster that is not the controller answers NOT_CONTROLLER, which is retried.)
        controller = self._client.cluster.controller
        if controller is None or not await self._client.ready(controller.nodeId):
            await self._client.force_metadata_update()
            controller = self._client.cluster.controller
        if controller is not None and await self._client.ready(controller.nodeId):
            node_id = controller.nodeId
        else:
            node_id = await self.reachable_node()
        return await self._client.send(node_id, request)


async def retrying(call: Callable[[], Awaitable[T]], patience: float) -> T:
    """`call()` again, with backoff, while it fails with a retriable Kafka error (a broker down, a leader
    moving, a controller changing, a bootstrap that found no broker yet), for up to `patience` seconds."""
    deadline = time.monotonic() + patience
    pause = 0.25
    while True:
        try:
            return await call()
        except (KafkaError, OSError) as e:  # OSError: TimeoutError and refused connections too
            retriable = not isinstance(e, KafkaError) or e.retriable
            if not retriable or time.monotonic() + pause > deadline:
                raise
            logging.getLogger(__name__).warning("Kafka call failed (%s: %s); trying again in %.1fs",
                                                type(e).__name__, e, pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 5.0)


# -- topics ----------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _admin(settings: Settings) -> AsyncIterator[Any]:
    admin = Admin(bootstrap_servers=settings.brokers, request_timeout_ms=30_000, **settings.kafka_options())
    await admin.start()
    try:
        yield admin
    finally:
        await admin.close()


async def _partition_count(admin: Any, topic: str, wait: float = 10.0) -> int | None:
    # All topics' metadata rather than the one topic's: a metadata request that names a topic may create
    # it on a broker with auto.create.topics.enable.
    deadline = time.monotonic() + wait
    while True:
        found = [t for t in await admin.describe_topics() if t["topic"] == topic]
        if not found:
            return None
        error = found[0]["error_code"]
        partitions = found[0]["partitions"]
        if error == UNKNOWN_TOPIC:
            return None
        if error == 0 and partitions and all(p["error_code"] == 0 for p in partitions):
            return len(partitions)
        if time.monotonic() >= deadline:  # e.g. LEADER_NOT_AVAILABLE right after creation
            if partitions:
                return len(partitions)
            raise KafkaError(f"metadata of topic {topic!r}: error code {error}")
        await asyncio.sleep(0.1)


async def partition_count(settings: Settings, topic: str) -> int | None:
    """The topic's number of partitions; None when it does not exist."""
    async def count() -> int | None:
        async with _admin(settings) as admin:
            return await _partition_count(admin, topic)

    return await retrying(count, patience=30.0)


async def replication_factor(admin: Any, settings: Settings) -> int:
    """The replication factor topics are created with: the setting, or (-1) the brokers' own
    default.replication.factor, read from a broker that answers."""
    if settings.replication_factor > 0:
        return settings.replication_factor
    node = await admin.reachable_node()
    responses = await admin.describe_configs(
        [ConfigResource(ConfigResourceType.BROKER, str(node), {"default.replication.factor": None})])
    for response in responses:
        for error, message, _type, _name, entries, *_ in response.resources:
            if error:
                raise KafkaError(f"cannot read broker {node}'s configuration: error code {error} {message or ''}")
            for entry in entries:
                if entry[0] == "default.replication.factor":
                    return int(entry[1])
    raise KafkaError(f"broker {node} did not tell its default.replication.factor")


async def create_topic(admin: Any, topic: str, partitions: int, replication: int,
                       configs: dict[str, str] | None = None) -> bool:
    """Create the topic; False when it exists already (also when another client created it first). Any other
    error in the broker's answer raises TopicCreationFailed."""
    response = await admin.create_topics([NewTopic(topic, partitions, replication, topic_configs=configs)])
    created = False
    for name, code, *message in response.topic_errors:
        if code == TOPIC_EXISTS:
            return False
        if code:
            raise TopicCreationFailed(name, code, message[0] if message else None)
        created = created or name == topic
    if not created:
        raise KafkaError(f"the broker's answer to creating topic {topic!r} does not name it")
    return True


async def _create_and_wait(admin: Any, topic: str, partitions: int, replication: int, wait: float = 15.0) -> int:
    """Create the topic (unless it exists); its partition count once the broker's metadata shows it (a
    topic the controller has created reaches the metadata a moment later)."""
    await create_topic(admin, topic, partitions, replication)
    deadline = time.monotonic() + wait
    while (count := await _partition_count(admin, topic)) is None:
        if time.monotonic() >= deadline:
            raise KafkaError(f"topic {topic!r} was created but does not show in the metadata after {wait:.0f}s")
        await asyncio.sleep(0.1)
    return count


async def ensure_topics(settings: Settings, partitions: int | None = None) -> int:
    """Create the raw topic if missing (with `partitions`, default `settings.partitions`), then the
    enriched and dead-letter topics if missing, with the raw topic's partition count. Returns that count.
    Existing topics are left as they are, whatever their partition count."""
    async def ensure() -> int:
        async with _admin(settings) as admin:
            count = await _partition_count(admin, settings.raw_topic)
            replication = await replication_factor(admin, settings)
            if count is None:
                count = await _create_and_wait(admin, settings.raw_topic, partitions or settings.partitions,
                                               replication)
            for topic in (settings.enriched_topic, settings.dead_letter_topic):
                if await _partition_count(admin, topic) is None:
                    await _create_and_wait(admin, topic, count, replication)
            return count

    return await retrying(ensure, patience=30.0)


# -- producing -------------------------------------------------------------------------------------------


async def group_assignment(settings: Settings) -> tuple[str, list[set[int]]]:
    """The worker group's state and, per member, the raw-topic partitions it holds ("absent" when there is no
    such group): what tests and the fault harness wait on around rebalances."""
    async def describe() -> Any:
        async with _admin(settings) as admin:
            return await admin.describe_consumer_groups([settings.group])

    responses = await retrying(describe, patience=30.0)
    for response in responses:
        for group in response.groups:
            error, group_id, state, _, _, members, *_ = group
            if group_id != settings.group:
                continue
            held = []
            for member in members:
                partitions: set[int] = set()
                if member[-1]:
                    assignment = ConsumerProtocolMemberAssignment.decode(member[-1])
                    for topic, parts in assignment.assignment:
                        if topic == settings.raw_topic:
                            partitions.update(parts)
                held.append(partitions)
            return (state if not error else f"error {error}"), held
    return "absent", []


def producer(settings: Settings) -> Any:
    """Not started; every message acknowledged by all in-sync replicas, no duplicates on retry."""
    return AIOKafkaProducer(bootstrap_servers=settings.brokers, acks="all", enable_idempotence=True, linger_ms=5,
                            partitioner=aiokafka_partitioner(settings.partitioner), **settings.kafka_options())


def device_key(value: bytes) -> bytes | None:
    """The record's device_id as UTF-8, when it is a JSON object with a string device_id; else None."""
    try:
        record = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(record, dict):
        return None
    device_id = record.get("device_id")
    if not isinstance(device_id, str):
        return None
    try:
        return device_id.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        return None


def _lines(src: BinaryIO) -> Iterator[bytes]:
    """Each non-blank line without its newline, bytes unchanged (as `replay` reads them)."""
    for line in src:
        value = line[:-1] if line.endswith(b"\n") else line
        if value.strip():
            yield value


@contextlib.contextmanager
def _open_in(path: str | None) -> Iterator[BinaryIO]:
    if path == "-":
        yield sys.stdin.buffer
    else:
        with open(SAMPLE if path is None else path, "rb") as f:
            yield f


async def _send_all(
    producer: Any, topic: str, messages: Iterable[tuple[bytes | None, bytes]], keep: list[Any] | None
) -> int:
    count = 0
    pending: list[asyncio.Future[Any]] = []
    for key, value in messages:
        pending.append(await producer.send(topic, value, key=key))
        count += 1
        if len(pending) >= SEND_WINDOW:
            delivered = await asyncio.gather(*pending)
            if keep is not None:
                keep.extend(delivered)
            pending = []
    delivered = await asyncio.gather(*pending)
    if keep is not None:
        keep.extend(delivered)
    return count


async def produce(
    settings: Settings, messages: Iterable[tuple[bytes | None, bytes]], *, topic: str | None = None
) -> list[Any]:
    """Send (key, value) pairs in order to `topic` (default: the raw topic) and await every delivery.
    Returns each message's RecordMetadata (topic, partition, offset), in the order given."""
    out: list[Any] = []
    p = producer(settings)
    await p.start()
    try:
        await _send_all(p, topic or settings.raw_topic, messages, out)
    finally:
        await p.stop()
    return out


async def produce_file(
    settings: Settings, path_or_dash: str | None, *, keyed: bool = True, topic: str | None = None
) -> int:
    """Send each non-blank line of a JSONL file ('-' = stdin; None = the built-in sample) as one message,
    bytes unchanged, keyed by its device_id when it has one (and `keyed`), else without key. Awaits every
    delivery; returns the number of messages."""
    p = producer(settings)
    with _open_in(path_or_dash) as src:
        await p.start()
        try:
            messages = ((device_key(v) if keyed else None, v) for v in _lines(src))
            return await _send_all(p, topic or settings.raw_topic, messages, None)
        finally:
            await p.stop()


# -- reading ---------------------------------------------------------------------------------------------


def topic_of(settings: Settings, which: str) -> str:
    return {"enriched": settings.enriched_topic, "dead-letter": settings.dead_letter_topic,
            "persons": settings.persons_topic}.get(which, which)


@contextlib.asynccontextmanager
async def _assigned(settings: Settings, topic: str, *, from_beginning: bool = True) -> AsyncIterator[Any]:
    """A consumer without group that holds every partition of `topic`, at its beginning or end."""
    count = await partition_count(settings, topic)
    if count is None:
        raise TopicMissing(topic)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.brokers,
        **settings.kafka_options(),
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(count)]
        consumer.assign(partitions)
        if from_beginning:
            await consumer.seek_to_beginning(*partitions)
        else:
            await consumer.seek_to_end(*partitions)
        yield consumer
    finally:
        await consumer.stop()


async def read_all(settings: Settings, topic: str, *, idle_timeout: float = 5.0) -> list[ConsumerRecord]:
    """Every record now in the topic (all partitions, committed only), by partition then offset. Reads up
    to the end offsets taken at the start, or until `idle_timeout` seconds pass without progress."""
    async with _assigned(settings, topic) as consumer:
        partitions = sorted(consumer.assignment(), key=lambda tp: tp.partition)
        ends = await consumer.end_offsets(partitions)
        records: list[Any] = []
        last = time.monotonic()
        while True:
            positions = {tp: await consumer.position(tp) for tp in partitions}
            if all(positions[tp] >= ends[tp] for tp in partitions):
                break
            if time.monotonic() - last > idle_timeout:
                break
            batch = await consumer.getmany(timeout_ms=100)
            for tp_records in batch.values():
                records.extend(tp_records)
            if batch or [tp for tp in partitions if await consumer.position(tp) != positions[tp]]:
                last = time.monotonic()
        records.sort(key=lambda r: (r.partition, r.offset))
        return records


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
    async with _assigned(settings, topic, from_beginning=from_beginning) as consumer:
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
                             help="'enriched', 'dead-letter', 'persons', or a topic name")
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
