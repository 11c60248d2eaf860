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
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from scripts import testhosts
from streams.config import Settings
from tests.integration import kit
from tests.integration.conftest import fresh_topics

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(600)]

SESSION_TIMEOUT = 6  # seconds: a cut longer than this moves the cut worker's partitions
CUT = 14.0
CUTS = 3
FEED = CUTS * (4 + CUT + 7)  # seconds the input flows: each cut's lead-in, the cut, and the rejoin


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


@pytest.mark.parametrize("guarantee", kit.GUARANTEES)
def test_a_cut_off_worker_corrupts_nothing(host_topics: Settings, hosts: list[testhosts.TestHost],
                                           start_worker: kit.StartWorker, tmp_path: Path, guarantee: str) -> None:
    settings = replace(host_topics, processing_guarantee=guarantee, session_timeout=SESSION_TIMEOUT)
    lines = kit.generate(6000, 12, prefix="cut", seed=19)
    expected, _ = kit.replay_outputs(settings, kit.write_jsonl(tmp_path / "input.jsonl", lines))
    workers = []
    for i, host in enumerate(hosts):
        workers.append(start_worker(settings, f"w{i}", prefix=host.command([]), web_bind=host.address,
                                    web_port=kit.free_port(), state_dir=str(tmp_path / f"state-{i}")))
    for w in workers:
        w.wait_ready(members=2, timeout=120)
    cut_host = hosts[0]
    # a steady stream from this machine (never cut) for about as long as the cuts and rejoins take
    feeding = kit.produce_slowly(settings, lines, chunks=len(lines) // 20, pause=FEED / (len(lines) // 20))
    for _ in range(CUTS):
        time.sleep(4)
        cut_host.cut()
        time.sleep(CUT)
        cut_host.heal()
        # back in the group (Kafka's client can take a request timeout to find its coordinator again)
        kit.wait_for_group(settings, lambda state, held: state == "Stable" and len(held) == 2 and all(held), 120,
                       "the healed worker did not rejoin", workers[0].log_tail)
    feeding.join()
    outputs = kit.wait_for_outputs(settings, len(expected), timeout=240, distinct=True, settle=5)
    for w in workers:
        # neither exits by itself
        w.check_alive()
    got = kit.enriched_by_device(outputs.enriched)
    firsts = {d: kit.without_repeats(records)[0] for d, records in got.items()}
    kit.assert_same_per_device(firsts, kit.by_device(expected))
