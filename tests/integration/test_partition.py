"""A worker cut off from the network while records flow: it loses its partitions without being told, and must
never process them again from what it kept, nor let a write it still had in flight land after their new owner
has started.

Two workers, each on its own test host (a network namespace, `scripts/testhosts.py`), a handful of devices whose
records arrive at a steady rate. One worker's network is cut for longer than the session timeout, twice: the
group gives its partitions to the other, and the cut worker rejoins once healed. The enriched topic must then
hold, per device and without its exact repeats, what `replay` makes of the same input, in the same order.
Needs root (namespaces, nftables), as CI has.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from scripts import testhosts
from streams.config import Settings
from tests.integration.conftest import (
    Worker,
    assert_same_per_device,
    by_device,
    enriched_by_device,
    free_port,
    fresh_topics,
    replay_outputs,
    wait_for_group,
    wait_for_outputs,
    without_repeats,
    write_jsonl,
)
from tests.integration.test_worker import generate, produce_slowly

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(600)]

StartWorker = Callable[..., Worker]
SESSION_TIMEOUT = 6  # seconds: a cut longer than this moves the cut worker's partitions
CUT = 14.0
CUTS = 3


@pytest.fixture
def hosts() -> Iterator[list[testhosts.TestHost]]:
    try:
        made = testhosts.make_hosts(2)
    except testhosts.Unavailable as e:
        pytest.fail(f"cannot make test hosts here: {e}", pytrace=False)
    yield made
    for host in made:
        host.heal()
        host.remove()


@pytest.fixture
def host_topics(kafka: str, tmp_path: Path) -> Iterator[Settings]:
    """As `topics`, through the broker's test-host listener (the address the test hosts reach)."""
    if not testhosts.broker_reachable():
        pytest.fail(f"the broker does not listen on {testhosts.BROKERS} for the test hosts: it was started "
                    "before scripts/kafka.sh added that listener, or not as root. `bash scripts/kafka.sh restart` "
                    "as root", pytrace=False)
    with fresh_topics(testhosts.BROKERS, tmp_path) as settings:
        yield settings


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_a_cut_off_worker_corrupts_nothing(host_topics: Settings, hosts: list[testhosts.TestHost],
                                           start_worker: StartWorker, tmp_path: Path, guarantee: str) -> None:
    settings = replace(host_topics, processing_guarantee=guarantee, session_timeout=SESSION_TIMEOUT)
    lines = generate(6000, 12, prefix="cut", seed=19)
    expected, _ = replay_outputs(settings, write_jsonl(tmp_path / "input.jsonl", lines))
    workers = []
    for i, host in enumerate(hosts):
        workers.append(start_worker(settings, f"w{i}", prefix=host.command([]), web_bind=host.address,
                                    web_port=free_port(), state_dir=str(tmp_path / f"state-{i}")))
    for w in workers:
        w.wait_ready(members=2, timeout=120)
    cut_host = hosts[0]
    # a steady stream over about 120 s, from this machine (never cut)
    feeding = produce_slowly(settings, lines, chunks=len(lines) // 20, pause=120 / (len(lines) // 20))
    for _ in range(CUTS):
        time.sleep(4)
        cut_host.cut()
        time.sleep(CUT)
        cut_host.heal()
        # back in the group (Kafka's client can take a request timeout to find its coordinator again)
        wait_for_group(settings, lambda state, held: state == "Stable" and len(held) == 2 and all(held), 120,
                       "the healed worker did not rejoin", workers[0].log_tail)
    feeding.join()
    outputs = wait_for_outputs(settings, len(expected), timeout=240, distinct=True, settle=5)
    for w in workers:
        # neither exits by itself
        w.check_alive()
    got = enriched_by_device(outputs.enriched)
    firsts = {d: without_repeats(records)[0] for d, records in got.items()}
    assert_same_per_device(firsts, by_device(expected))
