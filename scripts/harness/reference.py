"""make chaos's references: `python -m streams replay` on the input, and the same engine in-process (per raw
record its outputs, and every device's final state, with the input line that last changed it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from harness.broker import HarnessError
from harness.inputs import read_lines
from harness.replay import ReplayRun, run_replay
from streams.enrich import Enricher, MemoryStore
from streams.identity import DeviceState


class TrackingStore(MemoryStore):
    """Replay's in-memory store that also remembers which input line last changed each device: the worker's
    stored state must say it reflects exactly that raw record (its `applied` offsets)."""

    def __init__(self) -> None:
        super().__init__()
        self.line = -1
        self.last_change: dict[str, int] = {}
        # MemoryStore makes `put` the dict's own __setitem__, an instance attribute that a method here would
        # not override
        self.put = self.tracking_put

    def tracking_put(self, device_id: str, state: DeviceState) -> None:
        self.states[device_id] = state
        self.last_change[device_id] = self.line


@dataclass
class Reference:
    outputs: list[list[bytes]]  # per input line (0-based), the enriched records it gives, in order
    dead: list[bytes | None]  # per input line, its dead letter
    states: dict[str, DeviceState]  # the final state of every device that has one
    last_change: dict[str, int]  # device -> the input line that last changed its state
    replay_enriched: list[bytes]  # `python -m streams replay`'s output, line by line
    replay_dead: list[bytes]
    replay: ReplayRun
    persons: dict[str, bytes] = field(default_factory=dict)  # `replay --persons`: user ID -> its mapping


def replay_in_process(lines: Sequence[bytes]) -> tuple[list[list[bytes]], list[bytes | None], TrackingStore]:
    """The engine over the whole input in order, as replay runs it (source {"line": n}: no record_id)."""
    enricher = Enricher()
    store = TrackingStore()
    outputs: list[list[bytes]] = []
    dead: list[bytes | None] = []
    for i, line in enumerate(lines):
        store.line = i
        outcome = enricher.step(line, {"line": i + 1}, store)
        outputs.append(outcome.records)
        dead.append(outcome.dead_letter)
    return outputs, dead, store


def build_reference(path: Path, lines: Sequence[bytes], run_dir: Path) -> Reference:
    """Both references; the in-process run stands in for replay record by record and for the states: it must
    be replay (with the default settings, the worker's)."""
    outputs, dead, store = replay_in_process(lines)
    run = asyncio.run(run_replay(run_dir, "chaos", path, persons=True))
    assert run.persons is not None
    replay_enriched, replay_dead = read_lines(run.output), read_lines(run.dead)
    flat = [r for rs in outputs for r in rs]
    letters = [d for d in dead if d is not None]
    if flat != replay_enriched or letters != replay_dead:
        raise HarnessError(f"the in-process engine differs from `streams replay` ({len(flat)} vs "
                           f"{len(replay_enriched)} records, {len(letters)} vs {len(replay_dead)} dead letters)")
    persons = {orjson.loads(line)["user_id"]: line for line in read_lines(run.persons)}
    return Reference(outputs, dead, store.states, store.last_change, replay_enriched, replay_dead, run, persons)
