"""The one settings object: every setting has an environment variable and a command-line flag.

Lives here: `Settings` (frozen), where each field names its variable, its flag and its help, and the code
that reads them (flag beats variable beats default). The topic names live here and nowhere else.
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any

from streams.codec import DEFAULT_MAX_RECORD_BYTES
from streams.enrich import EnrichSettings
from streams.identity import PLATFORMS
from streams.identity import Settings as IdentitySettings

ENV_PREFIX = "STREAMS_"


def setting(default: Any, help: str, *, flag: str | None = None, choices: Sequence[str] | None = None,
            groups: tuple[str, ...] = ("worker",)) -> Any:
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices, "groups": groups})


@dataclass(frozen=True)
class Settings:
    brokers: str = setting("localhost:9092", "Kafka bootstrap servers, comma-separated",
                           groups=("worker", "kafka"))
    raw_topic: str = setting("events.raw", "topic the raw records are read from", groups=("worker", "kafka"))
    enriched_topic: str = setting("events.enriched", "topic the enriched records go to",
                                  groups=("worker", "kafka"))
    dead_letter_topic: str = setting("events.dead-letter", "topic the dead letters go to",
                                     groups=("worker", "kafka"))
    persons_topic: str = setting("events.persons", "compacted topic the persons mapping goes to, keyed by user_id "
                                 "(persons.md §4)", groups=("worker", "kafka"))
    group: str = setting("streams-enricher", "consumer group, and the Faust app id (prefixes the changelog)",
                         groups=("worker", "kafka"))
    state_dir: str = setting("data/state", "where the worker keeps RocksDB state")
    partitions: int = setting(4, "partitions of the raw topic when the worker or produce has to create it",
                              groups=("worker", "kafka"))
    replication_factor: int = setting(
        -1, "replicas of every topic the worker or produce creates (raw, enriched, dead-letter, the table's "
        "changelog, repartition); -1 = the brokers' default.replication.factor", groups=("worker", "kafka"))
    missing_raw_topic: str = setting(
        "fail", "what the worker does when the raw topic does not exist: fail (exit 78, naming the topic and the "
        "brokers) or create it", choices=["fail", "create"])
    web_port: int = setting(6066, "the worker's HTTP port (metrics, device lookup)", groups=("worker", "state"))
    web_bind: str = setting("127.0.0.1", "the address the worker's HTTP server listens on",
                            groups=("worker", "state"))
    advertised_url: str = setting("", "the URL the other workers reach this one's HTTP server at, to route "
                                  "lookups to the owner of a device (default: http://WEB_BIND:WEB_PORT, the host's "
                                  "name for a bind to 0.0.0.0)")
    partitioner: str = setting(
        "murmur2", "how the raw topic's producers place keyed records, and so the device table: murmur2 (the Java "
        "client's default, Kafka Streams, librdkafka's murmur2_random) or crc32 (librdkafka's default "
        "consistent_random: confluent-kafka, kcat, the Go, .NET and Node clients)",
        choices=["murmur2", "crc32"], groups=("worker", "kafka"))
    batch_retries: int = setting(3, "tries of a batch that fails on something other than Kafka before its "
                                 "records are tried one at a time (one that fails alone becomes a dead letter)")
    processing_guarantee: str = setting(
        "at_least_once", "at_least_once: a crash may repeat outputs, byte for byte (same record_id); "
        "exactly_once: outputs, state and input offsets commit in one Kafka transaction per partition",
        choices=["at_least_once", "exactly_once"])
    batch_records: int = setting(10_000, "most records the worker fetches and applies as one batch")
    session_timeout: int = setting(10, "seconds after which a silent worker's partitions go to the others")
    standby_replicas: int = setting(1, "other workers that keep a copy of each partition's device states "
                                    "(from its changelog), so that one can take the partition over at once "
                                    "when its owner dies; 0: the taker rebuilds it from the changelog")
    default_platform: str | None = setting(None, "platform of records that carry none",
                                           choices=sorted(PLATFORMS), groups=("worker", "replay"))
    login_customer_id_type: str = setting("userid", "customer-ID type that logs in and out ('' = none)",
                                          groups=("worker", "replay"))
    hash_identity_keys: str = setting("", "identity keys whose values are stored and sent only as SHA-256 hex, "
                                      "comma-separated (e.g. $identity_mobile,$identity_email)",
                                      groups=("worker", "replay"))
    persons: str = setting("on", "the persons mapping stage: claims across devices, the persons topic, replay's "
                           "claims with --state-dir (user_id is stamped either way)", choices=["on", "off"])
    person_salt: str = setting("", "a secret that salts every user_id and person_id (persons.md §1); unset, anyone "
                               "can recompute them from a guessed login ID", groups=("worker", "replay"))
    person_max_devices: int = setting(50, "a pair claimed from more devices than this has no owner and maps no one "
                                      "(persons.md §3)", groups=("worker", "replay"))
    max_record_bytes: int = setting(DEFAULT_MAX_RECORD_BYTES, "larger raw records are dead letters",
                                    groups=("worker", "replay"))
    replay_jobs: int = setting(1, "replay's processes, the devices split between them (in-memory state only; "
                               "the output is the same bytes)", flag="--jobs", groups=("replay",))
    cache_devices: int = setting(100_000, "device states kept in memory in front of RocksDB")
    rocksdb_cache_mb: int = setting(64, "RocksDB block cache per partition, MiB (Faust's default: 2048)")
    security_protocol: str = setting("PLAINTEXT", "how the Kafka clients connect",
                                     choices=["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"],
                                     groups=("worker", "kafka"))
    sasl_mechanism: str = setting("PLAIN", "SASL mechanism (with SASL_PLAINTEXT or SASL_SSL)",
                                  choices=["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"], groups=("worker", "kafka"))
    sasl_username: str = setting("", "SASL user name", groups=("worker", "kafka"))
    sasl_password: str = setting("", "SASL password (prefer the environment variable to the flag)",
                                 groups=("worker", "kafka"))
    ssl_cafile: str = setting("", "CA certificates to verify the brokers with (SSL, SASL_SSL; default: the "
                              "system's)", groups=("worker", "kafka"))
    ssl_certfile: str = setting("", "client certificate, for brokers that require one", groups=("worker", "kafka"))
    ssl_keyfile: str = setting("", "the client certificate's private key", groups=("worker", "kafka"))
    log_level: str = setting("warning", "log level", choices=["debug", "info", "warning", "error"],
                             groups=("worker", "replay", "kafka"))

    def enrich_settings(self) -> EnrichSettings:
        return EnrichSettings(
            identity=IdentitySettings(
                login_customer_id_type=self.login_customer_id_type,
                hashed_keys=frozenset(k.strip() for k in self.hash_identity_keys.split(",") if k.strip()),
            ),
            default_platform=self.default_platform,
            max_record_bytes=self.max_record_bytes,
            person_salt=self.person_salt,
            person_max_devices=self.person_max_devices,
            persons=self.persons == "on",
        )

    @property
    def web_url(self) -> str:
        """The URL the other workers reach this one's HTTP server at. A wildcard bind reaches nobody by that
        address: then the host's name (which a pod's DNS, or a compose service, resolves to it)."""
        if self.advertised_url:
            return self.advertised_url
        host = self.web_bind
        if host in ("", "0.0.0.0", "::", "[::]"):
            host = socket.gethostname()
        return f"http://{host}:{self.web_port}"

    @property
    def exactly_once(self) -> bool:
        return self.processing_guarantee == "exactly_once"

    def ssl_context(self) -> ssl.SSLContext | None:
        if "SSL" not in self.security_protocol:
            return None
        context = ssl.create_default_context(cafile=self.ssl_cafile or None)
        if self.ssl_certfile:
            context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile or None)
        return context

    def kafka_options(self) -> dict[str, Any]:
        """What every aiokafka client of the project is given besides the bootstrap servers."""
        options: dict[str, Any] = {"security_protocol": self.security_protocol}
        if self.security_protocol.startswith("SASL"):
            options.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.sasl_username,
                           sasl_plain_password=self.sasl_password)
        context = self.ssl_context()
        if context is not None:
            options["ssl_context"] = context
        return options

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = env_name(f.name)
            if name in environ:
                try:
                    values[f.name] = _convert(f, environ[name])
                except ValueError:
                    raise SettingError(f"{name}={environ[name]!r} is not a whole number") from None
                choices = f.metadata["choices"]
                if choices and values[f.name] is not None and values[f.name] not in choices:
                    raise SettingError(f"{name}={environ[name]!r}: one of {', '.join(choices)}")
        return cls(**values)

    def with_args(self, args: argparse.Namespace) -> Settings:
        given = {f.name: getattr(args, f.name) for f in fields(self) if getattr(args, f.name, None) is not None}
        return replace(self, **given)


class SettingError(ValueError):
    """A STREAMS_* variable that holds no valid value: said at start, rather than taken as a default."""


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _convert(f: Any, text: str) -> Any:
    default = f.default if f.default is not MISSING else None
    if isinstance(default, bool):
        return text.lower() in ("1", "true", "yes", "on")
    if isinstance(default, int):
        return int(text)
    if f.name == "default_platform" and text == "":
        return None
    return text


def add_arguments(parser: argparse.ArgumentParser, group: str) -> None:
    """One flag per setting of `group`; the help names its variable and default."""
    for f in fields(Settings):
        if group not in f.metadata["groups"]:
            continue
        kind = int if isinstance(f.default, int) and not isinstance(f.default, bool) else str
        parser.add_argument(
            f.metadata["flag"] or flag_name(f.name),
            dest=f.name,
            type=kind,
            default=None,
            choices=f.metadata["choices"],
            metavar=f.name.upper() if not f.metadata["choices"] else None,
            help=f"{f.metadata['help']} (env {env_name(f.name)}; default: {f.default!r})",
        )


def table_markdown() -> str:
    """The README's settings table, from the one source of truth."""
    rows = ["| variable | flag | default | meaning |", "|---|---|---|---|"]
    for f in fields(Settings):
        flag = f.metadata["flag"] or flag_name(f.name)
        rows.append(f"| `{env_name(f.name)}` | `{flag}` | `{f.default!r}` | {f.metadata['help']} |")
    return "\n".join(rows)
