"""A batch that fails on one record of its own, on the real broker, in both delivery modes: the batch is tried
whole a bounded number of times, then its records one at a time (`BatchConsumer._isolate`); the record that
fails alone is kept as a dead letter, and the rest comes out as replay's. The faults are patched into the
worker's process from here (`tests/integration/faults.py`)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from streams.config import Settings
from tests.integration import kit

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(300)]


def poisoned_input(marker: str) -> tuple[list[bytes], bytes]:
    lines = kit.generate(400, 40, prefix="iso", seed=23)
    poison = orjson.dumps({"device_id": "iso-poison", "platform": "web", "action": "track", "event": marker,
                           "time": 1_712_100_000_500})
    return [*lines[:200], poison, *lines[200:]], poison


@pytest.mark.parametrize("guarantee", kit.GUARANTEES)
@pytest.mark.parametrize("fault", ["FAULT_SEND_POISON", "FAULT_SEND_TOO_LARGE"])
def test_a_record_that_fails_alone_is_isolated_and_kept(topics: Settings, start_worker: kit.StartWorker,
                                                        tmp_path: Path, guarantee: str, fault: str) -> None:
    marker = "poison-event"
    lines, poison = poisoned_input(marker)
    expected, expected_dead = kit.replay_outputs(topics, kit.write_jsonl(tmp_path / "input.jsonl",
                                                                          [line for line in lines if line != poison]))
    worker = start_worker(topics, processing_guarantee=guarantee, faults={fault: marker})
    worker.wait_ready()
    kit.produce(topics, kit.keyed(lines))
    repeats = guarantee == "at_least_once"
    out = kit.wait_for_outputs(topics, len(expected) + len(expected_dead) + 1, workers=[worker], distinct=repeats)

    got = kit.enriched_by_device(out.enriched)
    if repeats:
        got = {d: kit.without_repeats(rs)[0] for d, rs in got.items()}
    kit.assert_same_per_device(got, kit.by_device(expected))
    letters = out.dead_values
    kept = [d for d in letters if d["raw"] == poison.decode()]
    assert kept and all(d["reason"] == "internal_error" for d in kept), kept
    assert kit.dead_letters_without_source(d for d in letters if d not in kept) == \
        kit.dead_letters_without_source(expected_dead)
    if not repeats:
        assert len(kept) == 1 and len(letters) == len(expected_dead) + 1
    log = worker.log_path.read_text(errors="replace")
    assert "tried one at a time" in log
    worker.check_alive()
