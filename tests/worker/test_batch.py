"""The whole batch step over the fake broker, crashes and all: mixed keying loses nothing and repeats records byte for
byte; without crashes each record comes out once."""

from __future__ import annotations

import random

import pytest

from tests.fakes import Broker
from tests.worker.steps import T, mixed_input, new_broker, outputs, produce, run_worker


@pytest.mark.parametrize("seed", range(8))
def test_mixed_keying_loses_nothing_and_repeats_records_byte_for_byte(seed: int) -> None:
    rng = random.Random(seed)
    broker = new_broker(rng, failure_rate=0.15)
    lines = mixed_input(rng, devices=12, per_device=6)
    produce(broker, lines, rng)
    crashes = run_worker(broker, rng)
    assert crashes > 0, "the run must crash between outputs and state to test anything"

    copies = outputs(broker)
    expected = {f"raw:{p}:{rec.offset}:0" for p in range(T.partitions) for rec in broker.logs[(T.raw, p)]}
    assert set(copies) == expected, f"lost: {sorted(expected - set(copies))[:5]}"
    differing = {rid: set(values) for rid, values in copies.items() if len(set(values)) > 1}
    assert not differing, f"{len(differing)} record_ids with different bytes, e.g. {next(iter(differing.items()))}"
    assert not any(broker.logs[(T.dead_letter, p)] for p in range(T.partitions))


def test_without_crashes_each_record_comes_out_once() -> None:
    rng = random.Random(7)
    broker = Broker(rng)
    produce(broker, mixed_input(rng, devices=10, per_device=5), rng)
    assert run_worker(broker, rng) == 0
    copies = outputs(broker)
    assert len(copies) == 50 and all(len(v) == 1 for v in copies.values())
