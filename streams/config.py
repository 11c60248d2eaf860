"""The one settings object: every setting has an environment variable and a command-line flag.

Lives here: `Settings` (frozen), where each field names its variable, its flag, its help and the values it
allows, and the code that reads them (flag beats variable beats default). The topic names live here and nowhere
else. An unknown STREAMS_* variable, a value out of range, settings that contradict each other, a TLS file that
cannot be used: each is a `SettingError`, which every entry point says in one line, exiting with `EX_CONFIG`.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import socket
import ssl
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any

from streams.codec import DEFAULT_MAX_RECORD_BYTES
from streams.enrich import EnrichSettings
from streams.identity import PLATFORMS
from streams.identity import Settings as IdentitySettings
from streams.identity.values import KEY_PATTERN

ENV_PREFIX = "STREAMS_"
EX_CONFIG = 78  # sysexits.h: a configuration error; restarting will not help

# the variables Faust reads by itself when it is imported (its data dir, event loop, web port, debug mode...)
FAUST_PREFIXES = ("FAUST_", "F_")


@dataclass(frozen=True)
class Rule:
    """The values a setting allows: `allows(value)`, and `text` for people (the error, the README's table)."""

    text: str
    allows: Callable[[Any], bool]


def at_least(low: int) -> Rule:
    return Rule(f"{low} or more", lambda v: v >= low)


TOPIC_CHARS = re.compile(r"[a-zA-Z0-9._-]+")
TOPIC_MAX = 249  # Kafka's longest topic name


def _topic_name(value: str) -> bool:
    return bool(TOPIC_CHARS.fullmatch(value)) and len(value) <= TOPIC_MAX and value not in (".", "..")


def _brokers(value: str) -> bool:
    for entry in (e.strip() for e in value.split(",")):
        host, colon, port = entry.rpartition(":")
        # no port (the client's default, 9092) or a bare IPv6 address; else a port 1-65535 after a host
        port_ok = not colon or host.endswith(":") or (bool(host) and port.isdigit() and 1 <= int(port) <= 65535)
        if not entry or "://" in entry or any(c.isspace() for c in entry) or not port_ok:
            return False
    return True


def _url(value: str) -> bool:
    try:
        parts = urllib.parse.urlsplit(value)
        parts.port  # noqa: B018  (raises on a port out of range)
    except ValueError:
        return False
    return not value or (parts.scheme in ("http", "https") and bool(parts.hostname))


TOPIC = Rule(f"a Kafka topic name: 1 to {TOPIC_MAX} letters, digits, '.', '_' or '-'", _topic_name)
GROUP = Rule("1 or more letters, digits, '.', '_' or '-' (it prefixes topic names)", _topic_name)
BROKERS = Rule("host:port, comma-separated, no scheme, ports 1 to 65535", _brokers)
REPLICAS = Rule("-1 (the brokers' default.replication.factor) or 1 to 32767", lambda v: v == -1 or 1 <= v <= 32767)
PORT = Rule("1 to 65535", lambda v: 1 <= v <= 65535)
URL = Rule("empty, or http://HOST[:PORT] or https://HOST[:PORT]", _url)
NOT_EMPTY = Rule("not empty", lambda v: v != "")
IDENTITY_KEYS = Rule("identity keys (letters, digits, _ or $, not starting with a digit), comma-separated",
                     lambda v: all(KEY_PATTERN.fullmatch(k.strip()) for k in v.split(",") if k.strip()))


def setting(default: Any, help: str, *, flag: str | None = None, choices: Sequence[str] | None = None,
            groups: tuple[str, ...] = ("worker",), rule: Rule | None = None, secret: bool = False) -> Any:
    """A field of `Settings`. `rule`: the values it allows besides `choices`; `secret`: never in a message."""
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices, "groups": groups,
                                            "rule": rule, "secret": secret})


@dataclass(frozen=True)
class Settings:
    brokers: str = setting("localhost:9092", "Kafka bootstrap servers, comma-separated",
                           groups=("worker", "kafka"), rule=BROKERS)
    raw_topic: str = setting("events.raw", "topic the raw records are read from", groups=("worker", "kafka"),
                            rule=TOPIC)
    enriched_topic: str = setting("events.enriched", "topic the enriched records go to",
                                  groups=("worker", "kafka"), rule=TOPIC)
    dead_letter_topic: str = setting("events.dead-letter", "topic the dead letters go to",
                                     groups=("worker", "kafka"), rule=TOPIC)
    persons_topic: str = setting("events.persons", "compacted topic the persons mapping goes to, keyed by user_id "
                                 "(persons.md §4)", groups=("worker", "kafka"), rule=TOPIC)
    identity_changes_topic: str = setting(
        "events.identity-changes", "append-only topic the identity change log goes to, keyed by user_id: a row per "
        "change of a device user's mapping, and the identifiers that link it (schemas/identity-change.schema.json)",
        groups=("worker", "kafka"), rule=TOPIC)
    group: str = setting("streams-enricher", "consumer group, and the Faust app id (prefixes the changelog)",
                         groups=("worker", "kafka"), rule=GROUP)
    state_dir: str = setting("data/state", "where the worker keeps RocksDB state", rule=NOT_EMPTY)
    partitions: int = setting(4, "partitions of the raw topic when the worker or produce has to create it",
                              groups=("worker", "kafka"), rule=at_least(1))
    replication_factor: int = setting(
        -1, "replicas of every topic the worker or produce creates (raw, enriched, dead-letter, the table's "
        "changelog, repartition); -1 = the brokers' default.replication.factor", groups=("worker", "kafka"),
        rule=REPLICAS)
    missing_raw_topic: str = setting(
        "fail", "what the worker does when the raw topic does not exist: fail (exit 78, naming the topic and the "
        "brokers) or create it", choices=["fail", "create"])
    web_port: int = setting(6066, "the worker's HTTP port (metrics, device lookup)", groups=("worker", "state"),
                            rule=PORT)
    web_bind: str = setting("127.0.0.1", "the address the worker's HTTP server listens on",
                            groups=("worker", "state"))
    advertised_url: str = setting("", "the URL the other workers reach this one's HTTP server at, to route "
                                  "lookups to the owner of a device (default: http://WEB_BIND:WEB_PORT, the host's "
                                  "name for a bind to 0.0.0.0)", rule=URL)
    partitioner: str = setting(
        "murmur2", "how the raw topic's producers place keyed records, and so the device table: murmur2 (the Java "
        "client's default, Kafka Streams, librdkafka's murmur2_random) or crc32 (librdkafka's default "
        "consistent_random: confluent-kafka, kcat, the Go, .NET and Node clients)",
        choices=["murmur2", "crc32"], groups=("worker", "kafka"))
    batch_retries: int = setting(3, "tries of a batch that fails on something other than Kafka before its "
                                 "records are tried one at a time (one that fails alone becomes a dead letter)",
                                 rule=at_least(0))
    processing_guarantee: str = setting(
        "at_least_once", "at_least_once: a crash may repeat outputs, byte for byte (same record_id); "
        "exactly_once: outputs, state and input offsets commit in one Kafka transaction per partition",
        choices=["at_least_once", "exactly_once"])
    batch_records: int = setting(10_000, "most records the worker fetches and applies as one batch", rule=at_least(1))
    session_timeout: int = setting(10, "seconds after which a silent worker's partitions go to the others",
                                   rule=at_least(1))
    standby_replicas: int = setting(1, "other workers that keep a copy of each partition's device states "
                                    "(from its changelog), so that one can take the partition over at once "
                                    "when its owner dies; 0: the taker rebuilds it from the changelog",
                                    rule=at_least(0))
    default_platform: str | None = setting(None, "platform of records that carry none",
                                           choices=sorted(PLATFORMS), groups=("worker", "replay"))
    login_customer_id_type: str = setting("userid", "customer-ID type that logs in and out ('' = none)",
                                          groups=("worker", "replay"))
    hash_identity_keys: str = setting("", "identity keys whose values are stored and sent only as SHA-256 hex, "
                                      "comma-separated (e.g. $identity_mobile,$identity_email)",
                                      groups=("worker", "replay"), rule=IDENTITY_KEYS)
    persons: str = setting("on", "the persons mapping stage: claims across devices, the persons topic, replay's "
                           "claims with --state-dir (user_id is stamped either way)", choices=["on", "off"])
    identity_changes: str = setting("on", "the identity change log (with the persons stage on): a row per change of "
                                    "a device user's mapping to IDENTITY_CHANGES_TOPIC", choices=["on", "off"])
    person_salt: str = setting("", "a secret that salts every user_id and person_id (persons.md §1); unset, anyone "
                               "can recompute them from a guessed login ID", groups=("worker", "replay"), secret=True)
    person_max_devices: int = setting(50, "a pair claimed from more devices than this has no owner and maps no one "
                                      "(persons.md §3)", groups=("worker", "replay"), rule=at_least(1))
    max_record_bytes: int = setting(DEFAULT_MAX_RECORD_BYTES, "larger raw records are dead letters",
                                    groups=("worker", "replay"), rule=at_least(1))
    replay_jobs: int = setting(1, "replay's processes, the devices split between them (in-memory state only; "
                               "the output is the same bytes)", flag="--jobs", groups=("replay",), rule=at_least(1))
    cache_devices: int = setting(100_000, "device states kept in memory in front of RocksDB", rule=at_least(0))
    rocksdb_cache_mb: int = setting(64, "RocksDB block cache per partition, MiB (Faust's default: 2048)",
                                   rule=at_least(1))
    security_protocol: str = setting("PLAINTEXT", "how the Kafka clients connect",
                                     choices=["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"],
                                     groups=("worker", "kafka"))
    sasl_mechanism: str = setting("PLAIN", "SASL mechanism (with SASL_PLAINTEXT or SASL_SSL)",
                                  choices=["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"], groups=("worker", "kafka"))
    sasl_username: str = setting("", "SASL user name", groups=("worker", "kafka"))
    sasl_password: str = setting("", "SASL password (prefer the environment variable to the flag)",
                                 groups=("worker", "kafka"), secret=True)
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

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            choices, rule = f.metadata["choices"], f.metadata["rule"]
            if choices and value is not None and value not in choices:
                raise SettingError(f"{_named(f.name)} is {_shown(f, value)}; allowed: {', '.join(choices)}")
            if rule is not None and not rule.allows(value):
                raise SettingError(f"{_named(f.name)} is {_shown(f, value)}; allowed: {rule.text}")
        self._check_together()

    def _check_together(self) -> None:
        """Settings that mean nothing without another one: said, rather than left unused."""
        protocol = self.security_protocol
        for names, uses, kind in ((("ssl_cafile", "ssl_certfile", "ssl_keyfile"), ("SSL", "SASL_SSL"), "TLS"),
                                  (("sasl_username", "sasl_password"), ("SASL_PLAINTEXT", "SASL_SSL"), "SASL")):
            for name in (n for n in names if getattr(self, n) and protocol not in uses):
                raise SettingError(f"{_named(name)} is set, but {_named('security_protocol')} is {protocol}, "
                                   f"which uses no {kind}: set it to {' or '.join(uses)}, or unset {env_name(name)}")
        if self.ssl_keyfile and not self.ssl_certfile:
            raise SettingError(f"{_named('ssl_keyfile')} is set without {_named('ssl_certfile')}: a private key "
                               "is used with its certificate only")
        if protocol.startswith("SASL") and not self.sasl_username:
            raise SettingError(f"{_named('security_protocol')} is {protocol}, but {_named('sasl_username')} is empty")

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of every Kafka client; a file that cannot be used is a SettingError that names it."""
        if "SSL" not in self.security_protocol:
            return None
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(self, name)
            if path:
                try:
                    with open(path, "rb"):
                        pass
                except OSError as e:
                    raise SettingError(f"{_named(name)}: cannot read {path}: {e.strerror or e}") from None
        try:
            context = ssl.create_default_context(cafile=self.ssl_cafile or None)
        except ssl.SSLError as e:
            raise SettingError(f"{_named('ssl_cafile')}: {self.ssl_cafile} holds no CA certificate in PEM "
                               f"({e.reason or e})") from None
        if self.ssl_certfile:
            try:
                context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile or None, password=_no_password)
            except (ssl.SSLError, ValueError) as e:
                files = " and ".join(p for p in (self.ssl_certfile, self.ssl_keyfile) if p)
                names = " / ".join(env_name(n) for n in ("ssl_certfile", "ssl_keyfile") if getattr(self, n))
                detail = getattr(e, "reason", None) or str(e)
                raise SettingError(f"{names}: {files} hold no certificate and its unencrypted private key in "
                                   f"PEM ({detail})") from None
        return context

    def check_files(self) -> None:
        """Every file the settings name can be read and used, now rather than at the first connection."""
        self.ssl_context()

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
    def load(cls, environ: Mapping[str, str] | None = None, args: argparse.Namespace | None = None) -> Settings:
        """The settings from `environ` (default: the process's) and the flags in `args`: a flag beats its
        variable, which beats the default. A STREAMS_* variable that names no setting is an error too."""
        environ = os.environ if environ is None else environ
        unknown = unknown_variables(environ)
        if unknown:
            raise SettingError("; ".join(unknown))
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = env_name(f.name)
            if args is not None and getattr(args, f.name, None) is not None:
                values[f.name] = getattr(args, f.name)
            elif name in environ:
                values[f.name] = _convert(f, environ[name])
        return cls(**values)

    def with_args(self, args: argparse.Namespace) -> Settings:
        given = {f.name: getattr(args, f.name) for f in fields(self) if getattr(args, f.name, None) is not None}
        return replace(self, **given)


class SettingError(ValueError):
    """A setting that cannot be right, said at start (exit EX_CONFIG) rather than taken as a default or found
    out at the first connection."""


def _no_password() -> str:
    # asked for only when the key is encrypted; without this OpenSSL would prompt on the terminal
    raise ValueError("the private key is encrypted, and no setting holds its password")


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _named(name: str) -> str:
    """A setting as a message names it: its variable and its flag."""
    f = next(f for f in fields(Settings) if f.name == name)
    return f"{env_name(name)} ({f.metadata['flag'] or flag_name(name)})"


def _shown(f: Any, value: Any) -> str:
    return "(hidden)" if f.metadata["secret"] else repr(value)


# What Kubernetes puts into every pod of a namespace for a service named `streams` (`streams-web`, ...), left be:
# STREAMS_SERVICE_HOST, STREAMS_SERVICE_PORT[_NAME], STREAMS_PORT=tcp://..., STREAMS_PORT_6066_TCP[_PROTO|...]
_SERVICE_LINK = re.compile(r"STREAMS(_[A-Z0-9_]+)?_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT_\d+_(TCP|UDP|SCTP)"
                           r"(_PROTO|_PORT|_ADDR)?)")
_SERVICE_URL = re.compile(r"(tcp|udp|sctp)://\S+")


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """A sentence for each STREAMS_* variable (in any case) that names no setting, with the closest setting's
    name: a misspelt variable would otherwise leave its setting at the default without a word."""
    known = [env_name(f.name) for f in fields(Settings)]
    found = []
    for name in sorted(environ):
        link = _SERVICE_LINK.fullmatch(name) or (name.endswith("_PORT") and _SERVICE_URL.fullmatch(environ[name]))
        if not name.upper().startswith(ENV_PREFIX) or name in known or link:
            continue
        # compared without the prefix that they all share
        close = difflib.get_close_matches(name.upper().removeprefix(ENV_PREFIX),
                                          [k.removeprefix(ENV_PREFIX) for k in known], n=1, cutoff=0.6)
        found.append(f"{name} is no setting; did you mean {ENV_PREFIX}{close[0]}?" if close else
                     f"{name} is no setting (the settings: --help, or the README's Settings)")
    return found


def _convert(f: Any, text: str) -> Any:
    default = f.default if f.default is not MISSING else None
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            service = env_name(f.name).removesuffix("_PORT").lower().replace("_", "-")
            hint = (f" (Kubernetes sets it for a service named {service}: rename the service, or set "
                    "enableServiceLinks: false in the pod's spec)") if _SERVICE_URL.fullmatch(text) else ""
            raise SettingError(f"{_named(f.name)} is {_shown(f, text)}, not a whole number{hint}") from None
    if f.name == "default_platform" and text == "":
        return None
    return text


def faust_variables(environ: Mapping[str, str]) -> list[str]:
    """The variables Faust would read by itself (FAUST_*, F_*): the worker is configured by STREAMS_* only."""
    return sorted(n for n in environ if n.startswith(FAUST_PREFIXES))


FAUST_IGNORED = "ignoring {} (the worker is configured by STREAMS_* variables only)"


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
    rows = ["| variable | flag | default | allowed | meaning |", "|---|---|---|---|---|"]
    for f in fields(Settings):
        flag = f.metadata["flag"] or flag_name(f.name)
        rule = f.metadata["rule"]
        allowed = ", ".join(f.metadata["choices"] or ()) or (rule.text if rule is not None else "any")
        rows.append(f"| `{env_name(f.name)}` | `{flag}` | `{f.default!r}` | {allowed} | {f.metadata['help']} |")
    return "\n".join(rows)
