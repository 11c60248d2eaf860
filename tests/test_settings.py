"""Settings never fail silently: an unknown STREAMS_* variable, a value out of its range, settings that contradict
each other and a TLS file that cannot be used each stop every command that reads settings at once, with one line
that names the variable (exit 78, EX_CONFIG). Then what the worker checks against the brokers at start-up (the
existing topics' settings, the session timeout), that its clients create no topic, and its isolation from Faust's
own variables under every entry point."""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiokafka.admin.client
import aiokafka.client
import pytest
from aiokafka.protocol.metadata import MetadataRequest, MetadataRequest_v5

from streams import config
from streams.config import EX_CONFIG, SettingError, Settings
from streams.worker import startup
from streams.worker.startup import ConfigurationError, ExistingTopic, topic_problems
from tests.conftest import ROOT

BIN = Path(sys.executable).parent


def run(command: list[str], env: Mapping[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=ROOT, env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def refusal(out: subprocess.CompletedProcess[str]) -> str:
    """The one line a command says when it refuses its settings (and that it exited 78 without a traceback)."""
    assert out.returncode == EX_CONFIG, (out.returncode, out.stderr[-3000:])
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    return lines[0]


def load(**environ: str) -> Settings:
    return Settings.load(environ)


# -- unknown variables ---------------------------------------------------------------------------------------


# every command that reads settings, as each is started
ENTRY_POINTS = {
    "worker": [sys.executable, "-m", "streams", "worker"],
    "replay": [sys.executable, "-m", "streams", "replay", "--input", "-", "--output", "-", "--dead-letter",
               "/dev/null"],
    "produce": [sys.executable, "-m", "streams", "produce"],
    "tail": [sys.executable, "-m", "streams", "tail", "enriched"],
    "state": [sys.executable, "-m", "streams", "state", "some-device"],
    "person": [sys.executable, "-m", "streams", "person", "6b0f3c1e-8a4d-5b2e-9c7f-0d1e2f3a4b5c"],
    "console script": [str(BIN / "streams"), "worker"],
    "faust -A streams.worker.app": [str(BIN / "faust"), "-A", "streams.worker.app", "worker"],
    "faust -A streams.web": [str(BIN / "faust"), "-A", "streams.web", "worker"],
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_misspelt_variable_stops_every_command_and_names_the_setting(entry: str) -> None:
    # a broker nobody answers on: a command that went on would hang or say "cannot reach Kafka" instead
    out = run(ENTRY_POINTS[entry], {"STREAMS_BROKER": "127.0.0.1:1"})
    line = refusal(out)
    assert "STREAMS_BROKER is no setting; did you mean STREAMS_BROKERS?" in line, line


def test_unknown_variables_are_named_with_the_closest_setting() -> None:
    environ = {"STREAMS_BROKER": "x", "streams_group": "g", "STREAMS_REPLICATION": "3", "STREAMS_ZZZ": "1",
               "STREAMS_SASL_PASSWROD": "secret", "STREAMS_BROKERS": "kafka:9092", "OTHER": "1"}
    assert config.unknown_variables(environ) == [
        "STREAMS_BROKER is no setting; did you mean STREAMS_BROKERS?",
        "STREAMS_REPLICATION is no setting; did you mean STREAMS_REPLICATION_FACTOR?",
        "STREAMS_SASL_PASSWROD is no setting; did you mean STREAMS_SASL_PASSWORD?",
        "STREAMS_ZZZ is no setting (the settings: --help, or the README's Settings)",
        "streams_group is no setting; did you mean STREAMS_GROUP?",
    ]
    with pytest.raises(SettingError) as refused:
        load(**environ)
    assert "secret" not in str(refused.value)  # names only, never a value


def test_kubernetes_service_links_are_let_be() -> None:
    """A service named `streams` (or `streams-web`) puts these into every pod of its namespace."""
    links = {"STREAMS_SERVICE_HOST": "10.0.0.11", "STREAMS_SERVICE_PORT": "6066", "STREAMS_SERVICE_PORT_HTTP": "6066",
             "STREAMS_PORT": "tcp://10.0.0.11:6066", "STREAMS_PORT_6066_TCP": "tcp://10.0.0.11:6066",
             "STREAMS_PORT_6066_TCP_PROTO": "tcp", "STREAMS_PORT_6066_TCP_PORT": "6066",
             "STREAMS_PORT_6066_TCP_ADDR": "10.0.0.11", "STREAMS_WEB_SERVICE_HOST": "10.0.0.12"}
    assert config.unknown_variables(links) == []
    assert load(**links) == Settings()
    # but a port that is not a link's is a misspelt setting
    assert config.unknown_variables({"STREAMS_PORT": "6067"}) == [
        "STREAMS_PORT is no setting; did you mean STREAMS_WEB_PORT?"]
    # and a link that lands on a setting says where it comes from
    with pytest.raises(SettingError, match="Kubernetes sets it for a service named streams-web"):
        load(STREAMS_WEB_PORT="tcp://10.0.0.12:80")


# -- values out of range -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "value", "allowed"), [
    ("STREAMS_PARTITIONS", "0", "1 or more"),
    ("STREAMS_REPLICATION_FACTOR", "0", "-1 (the brokers' default.replication.factor) or 1 to 32767"),
    ("STREAMS_REPLICATION_FACTOR", "-2", "-1 (the brokers' default.replication.factor) or 1 to 32767"),
    ("STREAMS_REPLICATION_FACTOR", "40000", "-1 (the brokers' default.replication.factor) or 1 to 32767"),
    ("STREAMS_WEB_PORT", "0", "1 to 65535"),
    ("STREAMS_WEB_PORT", "65536", "1 to 65535"),
    ("STREAMS_SESSION_TIMEOUT", "0", "1 or more"),
    ("STREAMS_BATCH_RECORDS", "0", "1 or more"),
    ("STREAMS_BATCH_RETRIES", "-1", "0 or more"),
    ("STREAMS_STANDBY_REPLICAS", "-1", "0 or more"),
    ("STREAMS_PERSON_MAX_DEVICES", "0", "1 or more"),
    ("STREAMS_MAX_RECORD_BYTES", "0", "1 or more"),
    ("STREAMS_REPLAY_JOBS", "0", "1 or more"),
    ("STREAMS_CACHE_DEVICES", "-1", "0 or more"),
    ("STREAMS_ROCKSDB_CACHE_MB", "0", "1 or more"),
    ("STREAMS_BROKERS", "", "host:port, comma-separated"),
    ("STREAMS_BROKERS", "kafka://k1:9092", "no scheme"),
    ("STREAMS_BROKERS", "k1:9092,", "host:port, comma-separated"),
    ("STREAMS_BROKERS", "k1:99999", "ports 1 to 65535"),
    ("STREAMS_BROKERS", "k1 :9092", "host:port"),
    ("STREAMS_RAW_TOPIC", "events raw", "a Kafka topic name"),
    ("STREAMS_ENRICHED_TOPIC", "", "a Kafka topic name"),
    ("STREAMS_DEAD_LETTER_TOPIC", "..", "a Kafka topic name"),
    ("STREAMS_PERSONS_TOPIC", "p" * 250, "1 to 249"),
    ("STREAMS_GROUP", "my group", "letters, digits"),
    ("STREAMS_STATE_DIR", "", "not empty"),
    ("STREAMS_ADVERTISED_URL", "worker-3:6066", "http://HOST[:PORT]"),
    ("STREAMS_ADVERTISED_URL", "http://worker-3:99999", "http://HOST[:PORT]"),
    ("STREAMS_HASH_IDENTITY_KEYS", "$identity_mobile,1mail", "identity keys"),
    ("STREAMS_MISSING_RAW_TOPIC", "maybe", "fail, create"),
    ("STREAMS_PARTITIONER", "consistent_random", "murmur2, crc32"),
    ("STREAMS_PROCESSING_GUARANTEE", "exactly-once", "at_least_once, exactly_once"),
    ("STREAMS_PERSONS", "yes", "on, off"),
    ("STREAMS_SECURITY_PROTOCOL", "TLS", "PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL"),
    ("STREAMS_SASL_MECHANISM", "GSSAPI", "PLAIN, SCRAM-SHA-256, SCRAM-SHA-512"),
    ("STREAMS_LOG_LEVEL", "verbose", "debug, info, warning, error"),
    ("STREAMS_DEFAULT_PLATFORM", "ios", "mp-alipay"),
])
def test_a_value_out_of_range_names_the_variable_and_what_it_allows(name: str, value: str, allowed: str) -> None:
    with pytest.raises(SettingError) as refused:
        load(**{name: value})
    message = str(refused.value)
    flag = "--jobs" if name == "STREAMS_REPLAY_JOBS" else config.flag_name(name.removeprefix("STREAMS_").lower())
    shown = value if value.lstrip("-").isdigit() else repr(value)  # as the setting holds it
    assert message.startswith(f"{name} ({flag}) is {shown}; allowed: "), message
    assert allowed in message, message


def test_a_whole_number_that_is_not_one_is_named() -> None:
    with pytest.raises(SettingError, match=r"^STREAMS_PARTITIONS \(--partitions\) is 'four', not a whole number$"):
        load(STREAMS_PARTITIONS="four")


@pytest.mark.parametrize(("name", "value"), [
    ("STREAMS_REPLICATION_FACTOR", "-1"), ("STREAMS_REPLICATION_FACTOR", "3"), ("STREAMS_WEB_PORT", "65535"),
    ("STREAMS_BROKERS", "k1:9092,k2:9092, k3:9092"), ("STREAMS_BROKERS", "[::1]:9092,kafka"),
    ("STREAMS_ADVERTISED_URL", "http://worker-3.streams.svc:6066"), ("STREAMS_ADVERTISED_URL", ""),
    ("STREAMS_HASH_IDENTITY_KEYS", "$identity_mobile, $identity_email"), ("STREAMS_DEFAULT_PLATFORM", ""),
    ("STREAMS_BATCH_RETRIES", "0"), ("STREAMS_STANDBY_REPLICAS", "0"), ("STREAMS_CACHE_DEVICES", "0"),
    ("STREAMS_RAW_TOPIC", "app.events_raw-2"), ("STREAMS_LOGIN_CUSTOMER_ID_TYPE", ""),
])
def test_values_in_range_are_taken(name: str, value: str) -> None:
    load(**{name: value})


def test_the_rules_hold_for_flags_and_for_every_settings_object() -> None:
    """One place: the settings object checks itself, whatever made it."""
    with pytest.raises(SettingError, match=r"STREAMS_PARTITIONS \(--partitions\) is 0"):
        Settings.load({}, argparse.Namespace(partitions=0))
    with pytest.raises(SettingError, match="STREAMS_WEB_PORT"):
        Settings(web_port=0)
    with pytest.raises(SettingError, match="STREAMS_SESSION_TIMEOUT"):
        replace(Settings(), session_timeout=0)
    # the flag beats a variable it replaces, whatever that holds
    assert Settings.load({"STREAMS_PARTITIONS": "0"}, argparse.Namespace(partitions=6)).partitions == 6


def test_a_flag_out_of_range_stops_the_command() -> None:
    line = refusal(run([sys.executable, "-m", "streams", "replay", "--input", "-", "--output", "-", "--dead-letter",
                        "/dev/null", "--max-record-bytes", "0"], {}))
    assert line == "streams replay: STREAMS_MAX_RECORD_BYTES (--max-record-bytes) is 0; allowed: 1 or more"


# -- settings that need each other ---------------------------------------------------------------------------


@pytest.mark.parametrize(("environ", "expected"), [
    ({"STREAMS_SSL_CAFILE": "/etc/ca.pem"},
     "STREAMS_SSL_CAFILE (--ssl-cafile) is set, but STREAMS_SECURITY_PROTOCOL (--security-protocol) is PLAINTEXT, "
     "which uses no TLS"),
    ({"STREAMS_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "STREAMS_SSL_CERTFILE": "/etc/client.pem"},
     "STREAMS_SSL_CERTFILE (--ssl-certfile) is set, but STREAMS_SECURITY_PROTOCOL (--security-protocol) is "
     "SASL_PLAINTEXT, which uses no TLS"),
    ({"STREAMS_SECURITY_PROTOCOL": "SSL", "STREAMS_SSL_KEYFILE": "/etc/client.key"},
     "STREAMS_SSL_KEYFILE (--ssl-keyfile) is set without STREAMS_SSL_CERTFILE"),
    ({"STREAMS_SECURITY_PROTOCOL": "SASL_SSL"},
     "STREAMS_SECURITY_PROTOCOL (--security-protocol) is SASL_SSL, but STREAMS_SASL_USERNAME (--sasl-username) is "
     "empty"),
    ({"STREAMS_SASL_USERNAME": "streams", "STREAMS_SASL_PASSWORD": "hunter2"},
     "STREAMS_SASL_USERNAME (--sasl-username) is set, but STREAMS_SECURITY_PROTOCOL (--security-protocol) is "
     "PLAINTEXT, which uses no SASL"),
    ({"STREAMS_SASL_PASSWORD": "hunter2"},
     "STREAMS_SASL_PASSWORD (--sasl-password) is set, but STREAMS_SECURITY_PROTOCOL (--security-protocol) is "
     "PLAINTEXT, which uses no SASL"),
])
def test_settings_that_mean_nothing_alone_are_refused(environ: dict[str, str], expected: str) -> None:
    with pytest.raises(SettingError) as refused:
        load(**environ)
    assert str(refused.value).startswith(expected), refused.value
    assert "hunter2" not in str(refused.value)


# -- TLS files -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pem(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A self-signed certificate and its key (cert.pem, key.pem), the key encrypted (encrypted.pem), a file
    that holds no PEM (garbage.pem)."""
    where = tmp_path_factory.mktemp("pem")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-days", "1", "-subj", "/CN=streams-test"]
    subprocess.run(["openssl", "req", "-x509", *ec, "-nodes", "-keyout", where / "key.pem", "-out",
                    where / "cert.pem"], check=True, capture_output=True)
    subprocess.run(["openssl", "req", "-x509", *ec, "-passout", "pass:secret", "-keyout", where / "encrypted.pem",
                    "-out", where / "encrypted-cert.pem"], check=True, capture_output=True)
    (where / "garbage.pem").write_text("not a certificate\n")
    return where


def tls(**files: str) -> Settings:
    return Settings(security_protocol="SSL", **files)


def test_usable_tls_files_make_a_context(pem: Path) -> None:
    settings = tls(ssl_cafile=str(pem / "cert.pem"), ssl_certfile=str(pem / "cert.pem"),
                   ssl_keyfile=str(pem / "key.pem"))
    settings.check_files()
    assert settings.kafka_options()["ssl_context"] is not None


@pytest.mark.parametrize(("name", "file", "problem"), [
    ("ssl_cafile", "missing.pem", "No such file or directory"),
    ("ssl_cafile", ".", "Is a directory"),
    ("ssl_certfile", "missing.pem", "No such file or directory"),
    ("ssl_keyfile", "missing.pem", "No such file or directory"),
])
def test_a_tls_file_that_cannot_be_read_is_named(pem: Path, name: str, file: str, problem: str) -> None:
    files = {"ssl_certfile": str(pem / "cert.pem"), name: str(pem / file)}
    settings = tls(**files)
    with pytest.raises(SettingError) as refused:
        settings.check_files()
    assert str(refused.value) == f"{config._named(name)}: cannot read {pem / file}: {problem}"
    # also where a client is made, rather than a connection that fails for 30 s
    with pytest.raises(SettingError):
        settings.kafka_options()


def test_a_tls_file_that_holds_no_pem_is_named(pem: Path) -> None:
    with pytest.raises(SettingError, match=rf"^STREAMS_SSL_CAFILE \(--ssl-cafile\): {pem}/garbage.pem holds no CA "):
        tls(ssl_cafile=str(pem / "garbage.pem")).check_files()
    with pytest.raises(SettingError,
                       match=rf"^STREAMS_SSL_CERTFILE / STREAMS_SSL_KEYFILE: {pem}/garbage.pem and {pem}/key.pem "):
        tls(ssl_certfile=str(pem / "garbage.pem"), ssl_keyfile=str(pem / "key.pem")).check_files()


def test_an_encrypted_key_is_refused_without_a_prompt(pem: Path) -> None:
    with pytest.raises(SettingError, match="the private key is encrypted, and no setting holds its password"):
        tls(ssl_certfile=str(pem / "encrypted-cert.pem"), ssl_keyfile=str(pem / "encrypted.pem")).check_files()


@pytest.mark.parametrize("entry", ["worker", "produce", "faust -A streams.worker.app"])
def test_a_missing_ca_file_stops_the_kafka_commands_at_once(entry: str, tmp_path: Path) -> None:
    missing = tmp_path / "ca.pem"
    out = run(ENTRY_POINTS[entry], {"STREAMS_BROKERS": "127.0.0.1:1", "STREAMS_SECURITY_PROTOCOL": "SSL",
                                    "STREAMS_SSL_CAFILE": str(missing)}, timeout=20)
    line = refusal(out)
    assert line.endswith(f"STREAMS_SSL_CAFILE (--ssl-cafile): cannot read {missing}: No such file or directory")


# -- Faust's own variables -----------------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["streams.worker.app", "streams.web"])
def test_faust_a_ignores_fausts_variables_as_python_m_streams_does(module: str) -> None:
    """Faust reads them when it is imported, before the worker's module: the command runs again without them."""
    env = {"F_DEBUG": "1", "FAUST_BLOCKING_TIMEOUT": "0.5", "STREAMS_BROKER": "127.0.0.1:1"}
    faust_a = run([str(BIN / "faust"), "-A", module, "worker"], env)
    python_m = run([sys.executable, "-m", "streams", "worker"], env)
    for out in (faust_a, python_m):
        assert out.returncode == EX_CONFIG, out.stderr
        # said once each: the command that went on (and read the settings) did not see them
        assert out.stderr.splitlines() == [
            "streams worker: ignoring FAUST_BLOCKING_TIMEOUT (the worker is configured by STREAMS_* variables only)",
            "streams worker: ignoring F_DEBUG (the worker is configured by STREAMS_* variables only)",
            "streams worker: STREAMS_BROKER is no setting; did you mean STREAMS_BROKERS?",
        ], out.stderr


def test_faust_a_refuses_a_faust_workdir_it_cannot_undo(tmp_path: Path) -> None:
    line = refusal(run([str(BIN / "faust"), "-A", "streams.worker.app", "worker"], {"FAUST_WORKDIR": str(tmp_path)}))
    assert "FAUST_WORKDIR" in line and "python -m streams worker" in line


# -- the worker's own clients create no topic ----------------------------------------------------------------


def test_the_worker_s_metadata_requests_ask_for_no_topic_creation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aiokafka.client, "MetadataRequest", aiokafka.client.MetadataRequest)
    monkeypatch.setattr(aiokafka.admin.client, "MetadataRequest", aiokafka.admin.client.MetadataRequest)
    assert MetadataRequest(["events.raw"]).build(MetadataRequest_v5).allow_auto_topic_creation  # aiokafka's own
    startup.forbid_topic_auto_creation()
    for module in (aiokafka.client, aiokafka.admin.client):
        request = module.MetadataRequest(["events.raw"])  # type: ignore[attr-defined]
        built = request.build(MetadataRequest_v5)
        assert built.topics == ["events.raw"] and built.allow_auto_topic_creation is False


# -- existing topics -----------------------------------------------------------------------------------------


def existing(name: str = "g-devices-changelog", compacted: bool = True, replicas: int = 3, policy: str = "compact",
             min_insync: int = 2) -> ExistingTopic:
    return ExistingTopic(name, "the device table's changelog" if compacted else "the enriched topic", compacted,
                         4, replicas, policy, min_insync)


SETTINGS = Settings(brokers="k1:9092,k2:9092", group="g")


def test_a_topic_as_the_worker_would_create_it_passes() -> None:
    assert topic_problems(SETTINGS, existing(), replication=3, min_insync=2) == []
    assert topic_problems(SETTINGS, existing("events.enriched", False, policy="delete"), 3, 2) == []
    # more replicas, or more of them in sync, than the worker would make: fine
    assert topic_problems(SETTINGS, existing(replicas=5, min_insync=3), replication=3, min_insync=2) == []


@pytest.mark.parametrize("policy", ["delete", "compact,delete"])
def test_a_changelog_that_is_not_compacted_is_refused_with_the_fix(policy: str) -> None:
    [problem] = topic_problems(SETTINGS, existing(policy=policy), replication=3, min_insync=2)
    assert problem.startswith(f"g-devices-changelog (the device table's changelog) has cleanup.policy={policy}, "
                              "but it holds the latest value of each key and must be compacted")
    assert problem.endswith(": kafka-configs.sh --bootstrap-server k1:9092,k2:9092 --alter --entity-type topics "
                            "--entity-name g-devices-changelog --add-config cleanup.policy=compact")


def test_an_output_that_is_compacted_is_refused_with_the_fix() -> None:
    [problem] = topic_problems(SETTINGS, existing("events.enriched", False, policy="compact,delete"), 3, 2)
    assert "compaction keeps only the last of each key" in problem
    assert problem.endswith("--entity-name events.enriched --add-config cleanup.policy=delete")


def test_fewer_replicas_than_the_worker_creates_are_refused() -> None:
    [problem] = topic_problems(SETTINGS, existing(replicas=1, min_insync=1), replication=3, min_insync=2)
    assert problem.startswith("g-devices-changelog (the device table's changelog) has 1 replica(s), but the worker "
                              "creates its topics with 3 (the brokers' default.replication.factor)")
    assert "kafka-reassign-partitions.sh --bootstrap-server k1:9092,k2:9092" in problem
    assert "each of its 4 partitions 3 brokers" in problem
    assert "kafka-topics.sh --bootstrap-server k1:9092,k2:9092 --delete --topic g-devices-changelog" in problem
    assert problem.endswith("Or accept it with STREAMS_REPLICATION_FACTOR=1")
    named = replace(SETTINGS, replication_factor=3)
    assert "with 3 (STREAMS_REPLICATION_FACTOR)" in topic_problems(named, existing(replicas=1), 3, 2)[0]


def test_fewer_replicas_in_sync_than_the_brokers_give_is_refused() -> None:
    """The issue's example: a changelog with min.insync.replicas 1 on replication factor 3."""
    [problem] = topic_problems(SETTINGS, existing(min_insync=1), replication=3, min_insync=2)
    assert problem.startswith("g-devices-changelog (the device table's changelog) has min.insync.replicas=1, but "
                              "the worker's topics get the brokers' 2")
    assert problem.endswith("--entity-name g-devices-changelog --add-config min.insync.replicas=2")


def test_more_replicas_in_sync_than_replicas_is_refused() -> None:
    [problem] = topic_problems(SETTINGS, existing(replicas=3, min_insync=4), replication=3, min_insync=2)
    assert "has min.insync.replicas=4 but 3 replica(s): no write with acks=all can succeed" in problem
    assert problem.endswith("--add-config min.insync.replicas=2")


def test_the_fix_on_a_secured_cluster_takes_the_client_config() -> None:
    secured = replace(SETTINGS, security_protocol="SASL_SSL", sasl_username="streams")
    [problem] = topic_problems(secured, existing(policy="delete"), replication=3, min_insync=2)
    assert "kafka-configs.sh --bootstrap-server k1:9092,k2:9092 --command-config client.properties --alter" in problem


class FakeAdmin:
    """What `_check_existing_topics` asks of the admin client: a broker that answers, and configurations."""

    def __init__(self, configs: dict[str, dict[str, str]], error: int = 0, **broker: str) -> None:
        self.configs = configs
        self.broker = {"min.insync.replicas": "2", "group.min.session.timeout.ms": "6000",
                       "group.max.session.timeout.ms": "1800000"} | {k.replace("_", "."): v for k, v in broker.items()}
        self.error = error

    async def reachable_node(self) -> int:
        return 1

    async def describe_configs(self, resources: list[Any]) -> list[Any]:
        found = []
        for resource in resources:
            values = self.broker if resource.name == "1" else self.configs[resource.name]
            entries = [(key, value, False, 5, False, []) for key, value in values.items()]
            found.append((self.error if resource.name != "1" else 0, None, 2, resource.name, entries))
        return [SimpleNamespace(resources=found)]


def partitions(replicas: int, count: int = 4) -> list[dict[str, Any]]:
    return [{"partition": p, "replicas": list(range(replicas))} for p in range(count)]


def check(admin: FakeAdmin, metadata: dict[str, list[dict[str, Any]]], replication: int = 3,
          settings: Settings = SETTINGS) -> None:
    asyncio.run(startup._check_against_brokers(admin, settings, metadata, replication))


def test_every_topic_of_the_worker_is_checked_for_its_promise() -> None:
    good_compact = {"cleanup.policy": "compact", "min.insync.replicas": "2"}
    good_delete = {"cleanup.policy": "delete", "min.insync.replicas": "2"}
    roles = {"g-devices-changelog": good_compact, "g-persons-changelog": good_compact,
             "events.persons": good_compact, "events.enriched": good_delete, "events.dead-letter": good_delete,
             "g-events.raw-repartition": good_delete, "g-persons-repartition": good_delete}
    metadata = {name: partitions(3) for name in roles} | {"events.raw": partitions(1), "unrelated": partitions(1)}
    check(FakeAdmin(roles), metadata)  # all as the worker would create them; the raw topic is not the worker's
    for name in roles:
        broken = {**roles, name: {**roles[name], "min.insync.replicas": "1"}}
        with pytest.raises(ConfigurationError) as refused:
            check(FakeAdmin(broken), metadata)
        assert str(refused.value).startswith(
            "1 setting(s) of existing topics on k1:9092,k2:9092 break what the worker promises; put them right, "
            f"then start it again:\n  - {name} ("), refused.value
    # with the persons stage off, its topics are not the worker's
    check(FakeAdmin({**roles, "events.persons": good_delete}), metadata, settings=replace(SETTINGS, persons="off"))


def test_every_problem_is_listed_at_once() -> None:
    metadata = {"events.persons": partitions(3), "g-devices-changelog": partitions(1)}
    admin = FakeAdmin({"events.persons": {"cleanup.policy": "delete", "min.insync.replicas": "1"},
                       "g-devices-changelog": {"cleanup.policy": "compact", "min.insync.replicas": "2"}})
    with pytest.raises(ConfigurationError) as refused:
        check(admin, metadata)
    lines = str(refused.value).splitlines()
    assert lines[0].startswith("3 setting(s) of existing topics")
    named = sorted(line.split(" ")[3] for line in lines[1:])
    assert named == ["events.persons", "events.persons", "g-devices-changelog"]


def test_a_replication_below_the_brokers_min_insync_replicas_is_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"^the worker would create its topics with 1 replica\(s\) "
                       r"\(STREAMS_REPLICATION_FACTOR\), fewer than the brokers' min.insync.replicas=2 on "
                       r"k1:9092,k2:9092: no write with acks=all could succeed"):
        check(FakeAdmin({}), {}, replication=1, settings=replace(SETTINGS, replication_factor=1))


def test_configurations_the_worker_may_not_read_are_a_configuration_error() -> None:
    metadata = {"events.enriched": partitions(3)}
    with pytest.raises(ConfigurationError, match="may not read the configuration of events.enriched "
                       r"\(TopicAuthorizationFailedError\).*DescribeConfigs"):
        check(FakeAdmin({"events.enriched": {}}, error=29), metadata)


def test_a_session_timeout_the_brokers_refuse_is_refused_at_start() -> None:
    """Else one error in the log (InvalidSessionTimeoutError), and a worker that never joins its group."""
    with pytest.raises(ConfigurationError, match=r"^STREAMS_SESSION_TIMEOUT \(--session-timeout\) is 2 s, but the "
                       r"brokers on k1:9092,k2:9092 take 6 to 1800 s \(group.min.session.timeout.ms, "):
        check(FakeAdmin({}), {}, settings=replace(SETTINGS, session_timeout=2))
    with pytest.raises(ConfigurationError, match="is 60 s, but the brokers on k1:9092,k2:9092 take 6 to 30 s"):
        check(FakeAdmin({}, group_max_session_timeout_ms="30000"), {}, settings=replace(SETTINGS, session_timeout=60))
    check(FakeAdmin({}), {}, settings=replace(SETTINGS, session_timeout=6))
