"""make chaos's group kind: two workers in one group; SIGKILL to either one at random moments while the input
flows, and each time it starts again at once (once with its state directory deleted). Once in the run the
broker is restarted under both (single broker), or one node of the cluster is killed with SIGKILL and started
again a few worker kills later (cluster). At the end both are stopped with SIGTERM.
"""

from __future__ import annotations

import random
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import testhosts  # scripts/testhosts.py: scripts/ is on the path

from harness.broker import PARTITIONS, Broker, HarnessError, free_port
from harness.chaos_run import (
    READY_TIMEOUT,
    TAIL,
    Finding,
    back_at_work,
    log,
    run_async,
    start_worker,
    stop_at_the_end,
    wait_caught_up,
)
from harness.children import Worker
from harness.feeder import Feeder
from harness.report import fmt_s, indent, spread
from streams.config import Settings
from streams.kafka import admin as kafka_admin


@dataclass
class Slot:
    """One of the two workers: its state directory, and the process of its current life."""

    name: str
    state_dir: str
    log_path: Path
    worker: Worker | None = None
    host: testhosts.TestHost | None = None  # --faults: the test host it runs on
    lives: int = 0
    killed: int = 0


@dataclass
class GroupKill:
    number: int
    slot: str
    back_after: float | None  # the group had two members holding every partition again
    lived: float
    delete_state: bool
    exited_early: bool


@dataclass(eq=False)
class GroupChaos:
    settings: Settings
    run_dir: Path
    feeder: Feeder
    kills: int
    seed: int
    broker: Broker | None  # restarted (a single node), or a node of it killed (the cluster); None: neither
    history: list[GroupKill] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    broker_events: list[str] = field(default_factory=list)
    node_down: int | None = None
    kills_while_node_down: int = 0
    caught_up: bool = False
    stop_results: dict[str, tuple[int, float, bool]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = random.Random(f"chaos-group-{self.seed}")
        self.slots = [Slot(n, str(self.run_dir / f"state-{n}"), self.run_dir / f"worker-{n}.log") for n in "ab"]

    def workers(self) -> list[Worker]:
        return [slot.worker for slot in self.slots if slot.worker is not None]

    def start(self, slot: Slot, note: str) -> None:
        slot.lives += 1
        # a fresh port per life: the killed worker's port may not be free again at once
        settings = replace(self.settings, state_dir=slot.state_dir, web_port=free_port())
        prefix: list[str] = []
        if slot.host is not None:  # its HTTP server on the test host's address, which this machine reaches
            settings = replace(settings, web_bind=slot.host.address)
            prefix = slot.host.command([])
            note += f", on test host {slot.host.name}"
        slot.worker = start_worker(settings, slot.log_path, slot.lives, f"worker {slot.name}, {note}", prefix)

    def start_group(self) -> bool:
        """Both workers started and a stable group of the two; False (reported, and the input all produced, so
        that the checks show what is missing) when they never formed one."""
        for slot in self.slots:
            self.start(slot, "first start")
        if self.group_ready() is None:
            self.findings.append(Finding(True, "the two workers never formed a stable group"))
            self.feeder.submit(len(self.feeder.lines), 0.0)
            return False
        return True

    def restart_gone(self) -> bool:
        """Start again each worker that exited by itself (already reported); whether there was one."""
        gone = [slot for slot in self.slots if slot.worker is None]
        for slot in gone:
            self.start(slot, "after exiting by itself")
        return bool(gone)

    def exited_by_itself(self) -> bool:
        gone = [s for s in self.slots if s.worker is not None and not s.worker.alive()]
        for slot in gone:
            assert slot.worker is not None
            self.findings.append(Finding(True, (
                f"worker {slot.name} (life #{slot.lives}) exited by itself with code {slot.worker.poll()}"
                f"{f' while node {self.node_down} was down' if self.node_down else ''}; its last log lines:\n"
                f"{indent(slot.worker.tail(TAIL))}")))
            slot.worker = None
        return bool(gone)

    def group_ready(self, timeout: float = READY_TIMEOUT) -> float | None:
        """Seconds until both workers fetch and the group is stable with two members that hold every raw
        partition between them; None when that did not happen (or a worker exited)."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.exited_by_itself():
                return None
            # each worker reports a lag for the raw partitions it holds and fetches (its tables restored)
            held = [set(w.raw_lag(self.settings.raw_topic)) for w in self.workers()]
            if all(held) and set().union(*held) == set(range(PARTITIONS)) and not held[0] & held[1]:
                try:
                    state, members = run_async(kafka_admin.group_assignment(self.settings), timeout=40)
                except Exception:
                    state, members = "unknown", []
                if state == "Stable" and len(members) == 2 and all(members):
                    return time.monotonic() - started
            time.sleep(0.5)
        return None

    def broker_event(self, number: int) -> None:
        assert self.broker is not None
        if self.broker.cluster:
            node = self.rng.randint(1, 3)
            log(f"kill #{number}: killing node {node} of the cluster (SIGKILL) under both workers")
            self.broker.kill(node)
            self.node_down = node
            self.broker_events.append(f"node {node} killed (SIGKILL) before worker kill #{number}")
            return
        time.sleep(self.rng.uniform(0.5, 2.0))
        log(f"kill #{number}: restarting the broker (bash scripts/kafka.sh restart) under both workers")
        with self.feeder.gate:
            took = self.broker.restart()
        back = back_at_work(self.settings, lambda: not self.exited_by_itself())
        survived = all(slot.worker is not None and slot.worker.alive() for slot in self.slots)
        self.broker_events.append(f"restarted in {took:.1f}s under both workers before worker kill #{number}; "
                                  f"{'both survived it' if survived else 'a worker did NOT survive it'}, the "
                                  f"group's commits caught up {fmt_s(back)} after")
        if back is None or self.group_ready() is None:
            self.findings.append(Finding(True, "after the broker restart the group did not come back to work"))

    def node_back(self) -> None:
        if self.broker is None or self.node_down is None:
            return
        node, self.node_down = self.node_down, None
        took = self.broker.start_node(node)
        self.broker_events.append(f"node {node} started again in {took:.1f}s, after {self.kills_while_node_down} "
                                  f"worker kills and restarts while it was down")
        log(f"node {node} back after {took:.1f}s")

    def kill_one(self, number: int, deletes: set[int]) -> None:
        slot = self.rng.choice(self.slots)
        if slot.worker is None:  # it exited by itself and was reported: start it again
            self.start(slot, "after exiting by itself")
            return
        exited_early = not slot.worker.alive()
        if exited_early:
            self.exited_by_itself()
        else:
            slot.worker.kill()
        slot.killed += 1
        lived = slot.worker.age() if slot.worker is not None else 0.0
        delete_state = number in deletes
        if delete_state:
            shutil.rmtree(slot.state_dir, ignore_errors=True)
        self.start(slot, "after SIGKILL" + (", state directory deleted" if delete_state else ""))
        if self.node_down is not None:
            self.kills_while_node_down += 1
        back = self.group_ready()
        self.history.append(GroupKill(number, slot.name, back, lived, delete_state, exited_early))
        log(f"kill #{number + 1}/{self.kills}: worker {slot.name} (life #{slot.lives - 1}) after {lived:.1f}s"
            f"{' [state deleted]' if delete_state else ''}"
            f"{f' [node {self.node_down} down]' if self.node_down else ''}; group back after {fmt_s(back)}; "
            f"produced {self.feeder.produced:,}")
        if back is None:
            self.findings.append(Finding(True, f"after kill #{number + 1} the group did not come back"))
            self.restart_gone()

    def run(self) -> None:
        if not self.start_group():
            return
        event_at = self.rng.randrange(1, max(2, self.kills - 2))
        deletes = {self.rng.randrange(2, max(3, self.kills))}
        quota = len(self.feeder.lines) // (self.kills + 1)
        for number in range(self.kills):
            self.feeder.submit(quota, self.rng.uniform(2.0, 6.0))
            time.sleep(self.rng.uniform(1.0, 5.0))
            if number == event_at:
                self.broker_event(number + 1)
            if self.node_down is not None and number >= event_at + 3:
                self.node_back()
            self.kill_one(number, deletes)
        self.node_back()
        self.final()

    def final(self) -> None:
        self.feeder.submit(len(self.feeder.lines), 2.0)  # the rest
        if not self.feeder.wait_idle(600):
            raise HarnessError("the input was not all produced after 10 min")
        self.caught_up = wait_caught_up(self.settings, len(self.feeder.lines), "the workers", self.workers,
                                        lambda: "" if self.exited_by_itself() else None, self.findings,
                                        every_partition=False)
        for slot in self.slots:
            if slot.worker is None:
                continue
            self.stop_results[slot.name] = stop_at_the_end(slot.worker, f"worker {slot.name}", self.findings)

    def stop_everything(self) -> None:
        self.feeder.stop()
        for slot in self.slots:
            if slot.worker is not None and slot.worker.alive():
                log(f"stopping worker {slot.name} (pid {slot.worker.pid})")
                slot.worker.kill()
        self.feeder.join(30)

    # -- the report

    def headline(self, seed: int) -> str:
        cluster = self.broker is not None and self.broker.cluster
        where = "a three-broker cluster (replication factor 3, min ISR 2)" if cluster else "a single broker"
        return (f"group chaos: {self.settings.raw_topic}, {PARTITIONS} partitions, group {self.settings.group}, "
                f"2 workers on {where}, seed {seed}, {len(self.history)} kills, {self.settings.processing_guarantee}")

    def event_lines(self) -> list[str]:
        backs = sorted(k.back_after for k in self.history if k.back_after is not None)
        per_slot = ", ".join(f"{s.name}: {s.killed}" for s in self.slots)
        deleted = sum(1 for k in self.history if k.delete_state)
        cluster = self.broker is not None and self.broker.cluster
        return [
            f"kills survived        {len(backs)} of {len(self.history)} SIGKILLs of either worker ({per_slot}; "
            f"{deleted} restart{'s' if deleted != 1 else ''} with the state directory deleted); group whole again "
            f"after {spread(backs)}",
            f"{'cluster' if cluster else 'broker':<22}" + "; ".join(self.broker_events or ["-"]),
        ]
