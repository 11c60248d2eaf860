"""Before the worker starts: the raw topic's real partition count, the worker's other topics made to match it
(or a clear refusal), and how Faust reaches a controller with a broker down."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import faust
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError, NodeNotReadyError
from aiokafka.protocol.metadata import MetadataRequest

from streams.config import Settings
from streams.kafka import admin as kafka_admin
from streams.worker.names import topic_names

log = logging.getLogger(__name__)


class ConfigurationError(Exception):
    pass


# -- start-up checks ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """The raw topic's partition count, the output topics' (which existing topics may have their own), and
    the replication factor of the topics the worker creates (Faust's changelog and repartition topics too)."""

    partitions: int
    outputs: Mapping[str, int]
    replication: int = 1


# how long start-up goes on trying while brokers do not answer (a broker restarting, one of three down and
# still in the metadata, a controller moving): a few broker restarts' worth
START_PATIENCE = 30.0


async def prepare_topics(settings: Settings) -> Layout:
    """The raw topic's real partition count; the other topics made to match it, or a clear refusal."""
    return await kafka_admin.retrying(lambda: _prepare_topics(settings), patience=START_PATIENCE)


async def _prepare_topics(settings: Settings) -> Layout:
    admin = kafka_admin.Admin(bootstrap_servers=settings.brokers, request_timeout_ms=15_000,
                               **settings.kafka_options())
    await admin.start()
    try:
        counts = await _partition_counts(admin)
        replication = await kafka_admin.replication_factor(admin, settings)
        partitions = counts.get(settings.raw_topic)
        if partitions is None:
            if settings.missing_raw_topic != "create":
                raise ConfigurationError(
                    f"the raw topic {settings.raw_topic} does not exist on {settings.brokers}. Check its name "
                    f"(STREAMS_RAW_TOPIC / --raw-topic) and the brokers (STREAMS_BROKERS / --brokers); create it, "
                    f"or let the worker create it with STREAMS_MISSING_RAW_TOPIC=create (--missing-raw-topic "
                    f"create; {settings.partitions} partitions, STREAMS_PARTITIONS)."
                )
            partitions = settings.partitions
            log.warning("raw topic %s does not exist: creating it with %d partitions, replication factor %d",
                        settings.raw_topic, partitions, replication)
            await _create(admin, settings, settings.raw_topic, partitions, replication)
        topics = topic_names(settings, partitions)
        for name in (topics.changelog, topics.repartition, topics.persons_changelog, topics.persons_repartition):
            if name is None:
                continue
            existing = counts.get(name)
            if existing is not None and existing != partitions:
                raise ConfigurationError(
                    f"{name} has {existing} partitions but {settings.raw_topic} has {partitions}: the device "
                    f"table must be partitioned like its input. Either give {settings.raw_topic} {existing} "
                    f"partitions again, or rebuild the state under a new consumer group (STREAMS_GROUP / "
                    f"--group), or delete {name} and the state directory {settings.state_dir} to start the "
                    f"table afresh (device states are then rebuilt only from the records still in the topic)."
                )
        outputs = {}
        for name in (topics.enriched, topics.dead_letter, topics.persons):
            if name is None:
                continue
            if name not in counts:
                # the persons topic holds the latest mapping per user ID: compacted, as a table is
                configs = {"cleanup.policy": "compact"} if name == topics.persons else None
                await _create(admin, settings, name, partitions, replication, configs)
            outputs[name] = counts.get(name, partitions)
        # the tables' changelogs and the repartition topics, made here rather than by Faust as it starts (with
        # the same settings: a changelog is compacted): a topic made just before the group's first assignment can
        # be missing from the metadata the assignment is computed from, and is then left out of it until the
        # next rebalance (seen: the persons stage's input not read, its table assigned to no one)
        made = []
        changelogs = (topics.changelog, topics.persons_changelog)
        for name in (*changelogs, topics.repartition, topics.persons_repartition):
            if name is not None and name not in counts:
                configs = {"cleanup.policy": "compact"} if name in changelogs else None
                await _create(admin, settings, name, partitions, replication, configs)
                made.append(name)
        await _until_listed(admin, made)
        return Layout(partitions, outputs, replication)
    finally:
        await admin.close()


async def _partition_counts(admin: AIOKafkaAdminClient) -> dict[str, int]:
    metadata = await admin.describe_topics()
    return {t["topic"]: len(t["partitions"]) for t in metadata if not t.get("error_code")}


async def _until_listed(admin: AIOKafkaAdminClient, names: Sequence[str], wait: float = 15.0) -> None:
    """Until the brokers' metadata shows the topics just created (the controller made them a moment before)."""
    deadline = time.monotonic() + wait
    while missing := set(names) - (await _partition_counts(admin)).keys():
        if time.monotonic() >= deadline:
            raise KafkaError(f"topics {sorted(missing)} were created but do not show in the metadata after "
                             f"{wait:.0f}s")
        await asyncio.sleep(0.1)


async def _create(admin: AIOKafkaAdminClient, settings: Settings, name: str, partitions: int,
                  replication: int, configs: dict[str, str] | None = None) -> None:
    try:
        await kafka_admin.create_topic(admin, name, partitions, replication, configs)
    except kafka_admin.TopicCreationFailed as e:
        if e.retriable:
            raise
        # e.g. a replication factor above the number of brokers, a policy, an invalid name: not worth a retry
        raise ConfigurationError(f"{e} on {settings.brokers} ({partitions} partitions, replication factor "
                                 f"{replication}; STREAMS_REPLICATION_FACTOR / --replication-factor)") from e


async def controller_node(owner: Any, client: Any, timeout: int = 30000) -> int | None:
    """Faust's lookup of the broker to create its topics through, for a cluster with a broker down.

    Faust asks the first broker of its metadata and gives up when that one does not answer: with one broker
    of three down the worker could not start (NodeNotReadyError). This asks any broker that answers, and
    uses it when the controller it names does not (with KRaft every broker forwards CreateTopics to the
    controller quorum)."""
    deadline = time.monotonic() + timeout / 1000
    while True:
        nodes = [b.nodeId for b in client.cluster.brokers()]
        random.shuffle(nodes)
        for node_id in nodes:
            if not await client.ready(node_id):
                continue
            result = await owner.wait(client.send(node_id, MetadataRequest([])), timeout=timeout)
            if result.stopped:
                return None
            controller = result.result.controller_id
            return int(controller) if controller >= 0 and await client.ready(controller) else int(node_id)
        if time.monotonic() > deadline:
            raise NodeNotReadyError(f"none of the brokers {sorted(nodes)} answers")
        await asyncio.sleep(1.0)
        with contextlib.suppress(KafkaError):
            await client.force_metadata_update()


def credentials(settings: Settings) -> Any:
    """The same connection settings in Faust's terms (it passes them on to its aiokafka clients)."""
    context = settings.ssl_context()
    if settings.security_protocol.startswith("SASL"):
        return faust.SASLCredentials(username=settings.sasl_username, password=settings.sasl_password,
                                     mechanism=settings.sasl_mechanism, ssl_context=context)
    if context is not None:
        return faust.SSLCredentials(context)
    return None


