"""Before the worker starts: the raw topic's real partition count, the worker's other topics made to match it
(or a clear refusal), the settings of the topics that exist already checked against what the worker promises,
no topic created by a client of the worker once it runs, and how Faust reaches a controller with a broker
down."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiokafka.admin.client
import aiokafka.client
import faust
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    KafkaError,
    NodeNotReadyError,
    TopicAuthorizationFailedError,
    for_code,
)
from aiokafka.protocol.metadata import MetadataRequest

from streams.config import Settings
from streams.kafka import admin as kafka_admin
from streams.worker.names import topic_names

log = logging.getLogger(__name__)

TOPIC_AUTHORIZATION_FAILED = TopicAuthorizationFailedError.errno  # 29
CLUSTER_AUTHORIZATION_FAILED = ClusterAuthorizationFailedError.errno  # 31


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
        metadata = await _topics(admin)
        counts = {name: len(partitions) for name, partitions in metadata.items()}
        replication = await kafka_admin.replication_factor(admin, settings)
        await _check_against_brokers(admin, settings, metadata, replication)
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
        for name in (topics.enriched, topics.dead_letter, topics.persons, topics.identity_changes):
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


async def _topics(admin: AIOKafkaAdminClient) -> dict[str, list[dict[str, Any]]]:
    """Every topic's partitions (with their replicas). All topics rather than some by name: a metadata request
    that names a topic may create it on a broker with auto.create.topics.enable."""
    metadata = await admin.describe_topics()
    return {t["topic"]: t["partitions"] for t in metadata if not t.get("error_code")}


async def _partition_counts(admin: AIOKafkaAdminClient) -> dict[str, int]:
    return {name: len(partitions) for name, partitions in (await _topics(admin)).items()}


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


# -- the settings of the topics that exist already ------------------------------------------------------------


@dataclass(frozen=True)
class ExistingTopic:
    """A topic of the worker's as the brokers describe it."""

    name: str
    role: str  # what it is, in a message: "the device table's changelog"
    compacted: bool  # whether the worker's promises need it compacted (else: never compacted)
    partitions: int
    replicas: int  # the fewest replicas of any of its partitions
    cleanup_policy: str
    min_insync_replicas: int


def topic_problems(settings: Settings, topic: ExistingTopic, replication: int, min_insync: int) -> list[str]:
    """What is wrong with an existing topic, each with the command that puts it right: its compaction (a
    changelog and the persons topic hold the latest value of each key and must be compacted; the other outputs
    and the repartition topics hold every record, and compaction would keep only the last of each key), and
    its durability as the worker would create it (`replication` replicas, the brokers' `min_insync` replicas
    in sync for a write with acks=all)."""
    problems = []
    name, policy = topic.name, topic.cleanup_policy
    if topic.compacted and policy != "compact":
        fix = _configs(settings, name, "--add-config cleanup.policy=compact")
        problems.append(f"{name} ({topic.role}) has cleanup.policy={policy}, but it holds the latest value of "
                        f"each key and must be compacted, or the values of keys not written for a while are "
                        f"deleted with their segments: {fix}")
    if not topic.compacted and "compact" in policy.split(","):
        problems.append(f"{name} ({topic.role}) has cleanup.policy={policy}, but it holds every record, and "
                        f"compaction keeps only the last of each key: "
                        f"{_configs(settings, name, '--add-config cleanup.policy=delete')}")
    source = ("STREAMS_REPLICATION_FACTOR" if settings.replication_factor > 0
              else "the brokers' default.replication.factor")
    if topic.replicas < replication:
        problems.append(
            f"{name} ({topic.role}) has {topic.replicas} replica(s), but the worker creates its topics with "
            f"{replication} ({source}): kafka-topics.sh cannot add replicas; kafka-reassign-partitions.sh "
            f"--bootstrap-server {settings.brokers} --reassignment-json-file more-replicas.json --execute can, with "
            f"a plan that gives each of its {topic.partitions} partitions {replication} brokers. If what it holds "
            f"may be lost: kafka-topics.sh --bootstrap-server {settings.brokers} --delete --topic {name} (the "
            f"worker creates it again). Or accept it with STREAMS_REPLICATION_FACTOR={topic.replicas}")
    elif topic.min_insync_replicas < min_insync:
        problems.append(
            f"{name} ({topic.role}) has min.insync.replicas={topic.min_insync_replicas}, but the worker's topics "
            f"get the brokers' {min_insync}: a write would count as done on fewer replicas than promised: "
            f"{_configs(settings, name, f'--add-config min.insync.replicas={min_insync}')}")
    elif topic.min_insync_replicas > topic.replicas:
        problems.append(
            f"{name} ({topic.role}) has min.insync.replicas={topic.min_insync_replicas} but {topic.replicas} "
            f"replica(s): no write with acks=all can succeed: "
            f"{_configs(settings, name, f'--add-config min.insync.replicas={min_insync}')}")
    return problems


def _configs(settings: Settings, topic: str, change: str) -> str:
    """The kafka-configs.sh command line that makes `change` to `topic`."""
    secured = "" if settings.security_protocol == "PLAINTEXT" else " --command-config client.properties"
    return (f"kafka-configs.sh --bootstrap-server {settings.brokers}{secured} --alter --entity-type topics "
            f"--entity-name {topic} {change}")


async def _check_against_brokers(admin: Any, settings: Settings, metadata: Mapping[str, list[dict[str, Any]]],
                                 replication: int) -> None:
    """Refuse to start with settings the brokers would refuse later, one error in a log and an idle worker (a
    session timeout out of their bounds; a replication factor that no write with acks=all could satisfy), and
    on existing topics that break what the worker promises (`topic_problems`)."""
    node = await admin.reachable_node()
    wanted = {"min.insync.replicas": None, "group.min.session.timeout.ms": None,
              "group.max.session.timeout.ms": None}
    broker = (await _describe(admin, ConfigResource(ConfigResourceType.BROKER, str(node), wanted))).get(str(node), {})
    low, high = (int(broker.get(f"group.{bound}.session.timeout.ms", default)) // 1000
                 for bound, default in (("min", "6000"), ("max", "1800000")))
    if not low <= settings.session_timeout <= high:
        raise ConfigurationError(
            f"STREAMS_SESSION_TIMEOUT (--session-timeout) is {settings.session_timeout} s, but the brokers on "
            f"{settings.brokers} take {low} to {high} s (group.min.session.timeout.ms, "
            "group.max.session.timeout.ms): the group would not let the worker join")
    min_insync = int(broker.get("min.insync.replicas", "1"))
    if replication < min_insync:
        source = ("STREAMS_REPLICATION_FACTOR" if settings.replication_factor > 0
                  else "the brokers' default.replication.factor")
        raise ConfigurationError(
            f"the worker would create its topics with {replication} replica(s) ({source}), fewer than the "
            f"brokers' min.insync.replicas={min_insync} on {settings.brokers}: no write with acks=all could "
            f"succeed. Set STREAMS_REPLICATION_FACTOR (--replication-factor) to {min_insync} or more")
    topics = topic_names(settings, settings.partitions)
    roles = {
        topics.enriched: ("the enriched topic", False),
        topics.dead_letter: ("the dead-letter topic", False),
        topics.repartition: ("the raw topic's repartition topic", False),
        topics.changelog: ("the device table's changelog", True),
    }
    if topics.persons is not None:
        roles[topics.persons] = ("the persons topic", True)
    if topics.identity_changes is not None:
        roles[topics.identity_changes] = ("the identity change log", False)
    if topics.persons_repartition is not None:
        roles[topics.persons_repartition] = ("the persons stage's repartition topic", False)
    if topics.persons_changelog is not None:
        roles[topics.persons_changelog] = ("the persons table's changelog", True)
    existing = [name for name in roles if name in metadata]
    if not existing:
        return
    configs = await _topic_configs(admin, existing)
    problems = []
    for name in existing:
        role, compacted = roles[name]
        partitions = metadata[name]
        topic = ExistingTopic(
            name, role, compacted, len(partitions), min((len(p["replicas"]) for p in partitions), default=0),
            configs[name].get("cleanup.policy", "delete"), int(configs[name].get("min.insync.replicas", "1")))
        problems += topic_problems(settings, topic, replication, min_insync)
    if problems:
        raise ConfigurationError(
            f"{len(problems)} setting(s) of existing topics on {settings.brokers} break what the worker promises; "
            "put them right, then start it again:\n" + "\n".join(f"  - {p}" for p in problems))


async def _topic_configs(admin: Any, names: Sequence[str]) -> dict[str, dict[str, str]]:
    wanted = {"cleanup.policy": None, "min.insync.replicas": None}
    return await _describe(admin, *(ConfigResource(ConfigResourceType.TOPIC, n, dict(wanted)) for n in names))


async def _describe(admin: Any, *resources: ConfigResource) -> dict[str, dict[str, str]]:
    """The configuration entries of each resource, by its name."""
    found: dict[str, dict[str, str]] = {}
    for response in await admin.describe_configs(list(resources)):
        for error, message, _type, name, entries, *_ in response.resources:
            if error in (TOPIC_AUTHORIZATION_FAILED, CLUSTER_AUTHORIZATION_FAILED):
                raise ConfigurationError(f"the worker may not read the configuration of {name} "
                                         f"({for_code(error).__name__}): it checks its topics' settings at start-up "
                                         "and needs DescribeConfigs on its topics and on the cluster")
            if error:
                raise KafkaError(f"cannot read the configuration of {name}: error code {error} {message or ''}")
            found[name] = {entry[0]: entry[1] for entry in entries}
    return found


# -- no topic created by a client of the worker ----------------------------------------------------------------


class _NoAutoCreation(MetadataRequest):  # type: ignore[misc]
    """A metadata request that asks the brokers not to create the topics it names."""

    def __init__(self, topics: list[str] | None = None, allow_auto_topic_creation: bool | None = None) -> None:
        super().__init__(topics, allow_auto_topic_creation=False)


def forbid_topic_auto_creation() -> None:
    """No Kafka client of this process asks the brokers to create a topic it names in a metadata request.

    aiokafka (0.14) asks for it in every such request and has no setting against it (its consumer has no
    allow_auto_create_topics): on brokers with auto.create.topics.enable=true (Kafka's default), the worker's
    consumer would create its raw topic again, with the brokers' default partition count, the moment someone
    deleted it, and a producer would create a deleted output topic the same way. The worker creates the topics it
    needs at start-up, explicitly (`prepare_topics`); the raw topic only with STREAMS_MISSING_RAW_TOPIC=create."""
    aiokafka.client.MetadataRequest = _NoAutoCreation
    aiokafka.admin.client.MetadataRequest = _NoAutoCreation


# -- Faust's own lookups, made to survive a broker down -------------------------------------------------------


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


