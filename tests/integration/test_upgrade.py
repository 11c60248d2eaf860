"""Upgrade and rollback on one state: the previous release's worker, then this one, then the previous release
again, each in turn on the same state directory, group and topics, with a third of the input each. The outputs
are replay's of the whole input, as if one worker had read it: the previous release reads what this one leaves
(the persons table's `V` keys, the persons messages' cause header) and ignores it (README, "Upgrading")."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from streams.config import Settings
from streams.worker.stages.persons import CAUSE_HEADER, kind_of
from tests.integration import kit

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(420)]

# the previous release, named by its commit: a copy of the repository may come without its tags
PREVIOUS = ("v0.9.0", "0a5180c24789b2df19fee53bf021732dc195811a")

# three bad records in each third (not JSON, a bad key on a device that sends good ones, not an object): dead
# letters across the versions
BAD = [b'{"device_id": "up-003", "platform": "mp-wechat", "event": "cut short"',
       b'{"device_id": "up-004", "platform": "mp-wechat", "action": "bind", "key": "1abc", "value": "v", "time": 1}',
       b'["not", "an", "object"]']


@pytest.fixture(scope="module")
def previous(tmp_path_factory: pytest.TempPathFactory) -> kit.Release:
    return kit.extract_release(*PREVIOUS, tmp_path_factory.mktemp("release") / PREVIOUS[0])


@pytest.fixture
def start_previous(previous: kit.Release, tmp_path: Path) -> Iterator[Callable[..., kit.Worker]]:
    """Start the previous release's workers; whatever still runs at the end of the test is stopped."""
    started: list[kit.Worker] = []

    def start(settings: Settings, name: str) -> kit.Worker:
        worker = kit.ReleaseWorker(previous, settings, tmp_path / f"{name}.log", name)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop(timeout=15)


def thirds(lines: list[bytes]) -> list[list[bytes]]:
    size = -(-len(lines) // 3)
    return [lines[i:i + size] + BAD for i in range(0, len(lines), size)]


def run_third(worker: kit.Worker, settings: Settings, lines: list[bytes], outputs: int, repeats: bool
              ) -> list[Any]:
    """`worker` takes the group and reads `lines`, and is stopped (SIGTERM) as soon as the group has committed
    them: the persons messages they started are then still on their way (claims, owners' answers, mappings: a
    batch each), and the next worker applies what this one sent. Returns those messages."""
    worker.wait_ready()
    ends: dict[int, int] = {}
    for m in kit.produce(settings, kit.keyed(lines)):
        ends[m.partition] = max(ends.get(m.partition, 0), m.offset + 1)
    deadline = time.monotonic() + kit.OUTPUT_TIMEOUT
    while any(committed(settings, settings.raw_topic).get(q, 0) < end for q, end in ends.items()):
        worker.check_alive()
        assert time.monotonic() < deadline, f"{worker.name} did not commit its input\n{worker.log_tail()}"
        time.sleep(0.02)
    assert worker.stop() == 0, f"{worker.name}: exit {worker.proc.returncode}\n{worker.log_tail()}"
    assert worker.errors() == []
    kit.wait_for_outputs(settings, outputs, distinct=repeats, settle=0)
    repartition = f"{settings.group}-persons-repartition"
    done = committed(settings, repartition)
    return [r for r in kit.read_topic(settings, repartition) if r.offset >= done.get(r.partition, 0)]


def committed(settings: Settings, topic: str) -> dict[int, int]:
    """The group's committed offsets in `topic`, by partition."""
    offsets = asyncio.run(kit.admin_call(settings.brokers, lambda a: a.list_consumer_group_offsets(settings.group)))
    return {tp.partition: m.offset for tp, m in offsets.items() if tp.topic == topic}


def output_count(settings: Settings, path: Path) -> int:
    enriched, dead = kit.replay_outputs(settings, path)
    return len(enriched) + len(dead)


@pytest.mark.parametrize("guarantee", kit.GUARANTEES)
def test_upgrade_and_roll_back_on_one_state(topics: Settings, start_worker: kit.StartWorker,
                                            start_previous: Callable[..., kit.Worker], previous: kit.Release,
                                            tmp_path: Path, guarantee: str) -> None:
    settings = replace(topics, processing_guarantee=guarantee)
    repeats = guarantee == "at_least_once"
    parts = thirds(kit.persons_input(n_devices=40, n_records=450, seed=21, prefix="up"))
    lines = [line for part in parts for line in part]
    path = kit.write_jsonl(tmp_path / "input.jsonl", lines)
    enriched, dead = kit.replay_outputs(settings, path)
    persons = kit.replay_persons(settings, path)
    upto = [output_count(settings, kit.write_jsonl(tmp_path / f"first-{n}.jsonl", lines[:sum(map(len, parts[:n]))]))
            for n in (1, 2)]
    assert len(persons) > 10 and dead, (len(persons), len(dead))

    left = run_third(start_previous(settings, f"{previous.tag}-before"), settings, parts[0], upto[0], repeats)
    assert left, "the previous release's persons messages were all applied before the upgrade"

    # the upgrade: this version on the previous release's state and persons messages
    left = run_third(start_worker(settings, "upgraded"), settings, parts[1], upto[1], repeats)
    changes = kit.read_topic(settings, settings.identity_changes_topic)
    assert changes, "the upgraded worker wrote no identity change log"
    assert any(kind_of(r.headers, CAUSE_HEADER) for r in left), \
        f"none of the {len(left)} persons messages left to the rollback carries its cause"

    # the rollback: the previous release on the state this version left (the persons table's V keys) and its
    # persons messages (with their cause header)
    rolled_back = start_previous(settings, f"{previous.tag}-after")
    rolled_back.wait_ready()
    kit.produce(settings, kit.keyed(parts[2]))
    out = kit.wait_for_outputs(settings, len(enriched) + len(dead), workers=[rolled_back], distinct=repeats)
    kit.wait_for_persons(settings, persons, [rolled_back])

    got = kit.enriched_by_device(out.enriched)  # a record written twice must be the same bytes
    if repeats:
        got = {device: kit.without_repeats(records)[0] for device, records in got.items()}
    else:
        assert len(out.enriched) == len(enriched), "exactly-once: a record was written twice"
    kit.assert_same_per_device(got, kit.by_device(enriched))
    letters: dict[bytes, Any] = {kit.canonical(d): d for d in out.dead_values}  # a repeat has the same source
    assert repeats or len(letters) == len(out.dead), "exactly-once: a dead letter was written twice"
    assert kit.dead_letters_without_source(letters.values()) == kit.dead_letters_without_source(dead)
    # the previous release ran: it writes no change log
    assert len(kit.read_topic(settings, settings.identity_changes_topic)) == len(changes)
    assert rolled_back.errors() == []
    assert rolled_back.stop() == 0, rolled_back.log_tail()
