"""The product as containers, with Podman: the worker's image against the test broker, and the compose stack
(`docker-compose.yml` through podman-compose, Kafka from a locally built image), each checked against
`replay` on the built-in sample.

`scripts/container.sh build` installs what is missing (podman, runc, debootstrap, podman-compose) and builds
the images: the Debian and Python bases and the Kafka image only when missing (minutes, once), the worker's
image from the Dockerfile on podman's layer cache (seconds when nothing changed). A step that cannot run
here fails with the script's reason.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import fields, replace
from pathlib import Path

import pytest

from streams.config import Settings, env_name
from streams.kafka import clients as kafka_clients
from tests.conftest import ROOT
from tests.integration import kit

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(2400), pytest.mark.xdist_group("container")]

CONTAINER_SH = ROOT / "scripts" / "container.sh"
SAMPLE = kafka_clients.SAMPLE
IMAGE = "localhost/streams:latest"
STATE_DIR = "/var/lib/streams/state"  # the image's volume
# what this machine's Podman needs on every run (../shared/spec/vendor/faust-and-kafka.md §7)
RUN_FLAGS = ["--network", "host", "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=4096:4096"]
BUILD_TIMEOUT = 1800  # a fresh machine: apt, debootstrap, three image builds
UP_TIMEOUT = 900


def container_sh(*args: str, timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(CONTAINER_SH), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, env=env)


def podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return container_sh("podman", *args, timeout=timeout)


def must(run: subprocess.CompletedProcess[str], what: str) -> str:
    if run.returncode != 0:
        pytest.fail(f"{what} failed with exit code {run.returncode}:\n{run.stdout[-3000:]}\n{run.stderr[-5000:]}",
                    pytrace=False)
    return run.stdout


@pytest.fixture(scope="module")
def images() -> str:
    """The images, built or found in podman's storage; the worker's image name."""
    if not CONTAINER_SH.exists():
        pytest.fail(f"{CONTAINER_SH} is missing: it installs Podman and builds the images", pytrace=False)
    # one build at a time across the test processes of `pytest -n`: two would share .cache/container
    with kit.one_at_a_time("container-build"):
        must(container_sh("build", timeout=BUILD_TIMEOUT), "`bash scripts/container.sh build`")
    return IMAGE


def container_env(settings: Settings) -> list[str]:
    """`settings` as STREAMS_* variables, as `-e` arguments of podman run."""
    args = []
    for f in fields(settings):
        value = getattr(settings, f.name)
        if value is not None:
            args += ["-e", f"{env_name(f.name)}={value}"]
    return args


class ContainerWorker(kit.Worker):
    """The worker's image run in the foreground by `podman run`: the conftest's `Worker`, whose process is
    podman's client (it passes SIGTERM on to the container)."""

    def __init__(self, settings: Settings, log_path: Path, image: str) -> None:
        self.settings = settings
        self.name = f"streams-test-{settings.group}"
        self.log_path = log_path
        self.expected_exit = False
        self.forced = False
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["bash", str(CONTAINER_SH), "podman", "run", "--rm", "--name", self.name, *RUN_FLAGS,
                 *container_env(settings), image],
                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        self.started = time.monotonic()

    def remove(self) -> None:
        podman("rm", "-f", "-v", "-t", "10", self.name)
        if self.alive:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def container_worker(topics: Settings, tmp_path: Path, images: str) -> Iterator[ContainerWorker]:
    # the state lives in the image's volume (an anonymous one, removed with the container); the HTTP server
    # stays on the loopback of the host's network
    settings = replace(topics, state_dir=STATE_DIR, web_bind="127.0.0.1")
    worker = ContainerWorker(settings, tmp_path / "container-worker.log", images)
    try:
        yield worker
    finally:
        worker.remove()


def test_worker_image_output_equals_replay(container_worker: ContainerWorker, images: str, tmp_path: Path) -> None:
    settings = container_worker.settings
    expected, expected_dead = kit.replay_outputs(replace(settings, state_dir=str(tmp_path / "replay")), SAMPLE)
    assert len(expected) == 23 and len(expected_dead) == 7

    container_worker.wait_ready()
    # the image's HEALTHCHECK passes once the worker serves HTTP (podman runs it on demand: no systemd here)
    must(podman("healthcheck", "run", container_worker.name), "the worker image's HEALTHCHECK")

    # the sample, sent by the same image's `produce`
    sent = podman("run", "--rm", *RUN_FLAGS, *container_env(settings), images, "produce", timeout=180)
    must(sent, "`produce` from the image")
    assert "41 records from the built-in sample" in sent.stderr, sent.stderr

    out = kit.wait_for_outputs(settings, len(expected) + len(expected_dead), workers=[container_worker])
    kit.assert_same_per_device(kit.enriched_by_device(out.enriched), kit.by_device(expected))
    assert len(out.enriched) == len(expected)
    assert kit.dead_letters_without_source(out.dead_values) == kit.dead_letters_without_source(expected_dead)
    kit.assert_sources_in(out.dead_values, settings)

    # SIGTERM reaches the worker through podman: it finishes, commits and exits cleanly
    assert container_worker.stop(timeout=60) == 0, container_worker.log_tail()
    assert not container_worker.forced


def test_compose_stack_enriches_the_sample(images: str, tmp_path: Path) -> None:
    """docker-compose.yml through podman-compose: Kafka from the local image on ports of its own (the test
    broker keeps its own), the worker, and the `sample` service; what the worker writes equals replay's."""
    project = f"streams-test-{uuid.uuid4().hex[:8]}"
    port = kit.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMS_", "KAFKA_"))}
    env.update(
        KAFKA_PORT=str(port),
        KAFKA_CONTROLLER_PORT=str(kit.free_port()),
        KAFKA_SASL_PORT=str(kit.free_port()),
        KAFKA_HEAP_OPTS="-Xmx512m -Xms512m",
        KAFKA_CACHE=os.environ.get("KAFKA_CACHE", str(ROOT / ".cache" / "kafka")),
        STREAMS_WEB_PORT=str(kit.free_port()),
    )
    # the compose file's default topic names, on the stack's own broker
    settings = replace(Settings(), brokers=f"127.0.0.1:{port}")
    expected, expected_dead = kit.replay_outputs(replace(settings, state_dir=str(tmp_path / "replay")), SAMPLE)
    try:
        up = container_sh("up", "-p", project, timeout=UP_TIMEOUT, env=env)
        must(up, f"`scripts/container.sh up -p {project}` (podman-compose)")
        assert "41 records from the built-in sample to events.raw" in up.stderr, up.stderr

        out = kit.wait_for_outputs(settings, len(expected) + len(expected_dead))
        kit.assert_same_per_device(kit.enriched_by_device(out.enriched), kit.by_device(expected))
        assert len(out.enriched) == len(expected)
        assert kit.dead_letters_without_source(out.dead_values) == kit.dead_letters_without_source(expected_dead)
        kit.assert_sources_in(out.dead_values, settings)
    finally:
        logs = podman("logs", "--tail", "200", f"{project}_worker_1")
        (tmp_path / "compose-worker.log").write_text(logs.stdout + logs.stderr)
        down = container_sh("down", "-p", project, timeout=300, env=env)
        left = podman("ps", "-a", "-q", "--filter", f"label=io.podman.compose.project={project}").stdout.split()
    must(down, f"`scripts/container.sh down -p {project}`")
    assert not left, f"containers of {project} left after down: {left}"
