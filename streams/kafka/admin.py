"""Kafka administration for the worker, the tools and the tests: topics and the consumer group.

Lives here: an admin client that asks a broker that answers (also with one of three down), `retrying` with
backoff, partition counts, the brokers' replication factor, topic creation (an error the broker answers is
raised), `ensure_topics` (the raw topic, then the enriched and dead-letter topics with its partition count) and
`group_assignment` (the worker group's state and who holds which partition). aiokafka only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment, ConsumerProtocolMemberMetadata
from aiokafka.errors import KafkaError, NodeNotReadyError, TopicAlreadyExistsError, for_code

from streams.config import Settings

UNKNOWN_TOPIC = 3  # UNKNOWN_TOPIC_OR_PARTITION
TOPIC_EXISTS = TopicAlreadyExistsError.errno  # 36


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


async def _worker_group(settings: Settings) -> tuple[Any, ...] | None:
    """The worker group as the brokers describe it (error, group ID, state, protocol type, protocol, members),
    None when there is no such group."""
    async def describe() -> Any:
        async with _admin(settings) as admin:
            return await admin.describe_consumer_groups([settings.group])

    for response in await retrying(describe, patience=30.0):
        for group in response.groups:
            if group[1] == settings.group:
                return tuple(group)
    return None


async def member_urls(settings: Settings) -> dict[str, str]:
    """The URL each member of the worker group advertises (Faust's member metadata), by member ID."""
    group = await _worker_group(settings)
    urls: dict[str, str] = {}
    for member in group[5] if group is not None else ():
        member_id, metadata = member[0], member[-2]
        try:
            user_data = ConsumerProtocolMemberMetadata.decode(metadata).user_data
            urls[member_id] = str(json.loads(user_data)["url"])
        except Exception:
            continue  # not a worker of ours (or a protocol this does not read): no URL to compare
    return urls


async def group_assignment(settings: Settings) -> tuple[str, list[set[int]]]:
    """The worker group's state and, per member, the raw-topic partitions it holds ("absent" when there is no
    such group): what tests and the fault harness wait on around rebalances."""
    group = await _worker_group(settings)
    if group is None:
        return "absent", []
    error, _, state, _, _, members, *_ = group
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

