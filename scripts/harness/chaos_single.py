"""make chaos's single kind: one worker killed with SIGKILL again and again while it consumes (running, after a
burst of input, during start-up; twice after deleting its state directory), the broker restarted once under
it, the last life given the rest of the input and stopped with SIGTERM.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from harness.broker import PARTITIONS, Broker, HarnessError, free_port
from harness.chaos_run import (
    BROKER_RECOVERY_TIMEOUT,
    READY_TIMEOUT,
    TAIL,
    Finding,
    back_at_work,
    log,
    offsets,
    outputs_grow,
    repartition_of,
    run_async,
    start_worker,
    stop_at_the_end,
    wait_caught_up,
)
from harness.children import Worker, metric
from harness.feeder import Feeder, Job
from harness.report import fmt_n, fmt_s, indent
from streams.config import Settings
from streams.kafka import admin as kafka_admin

GIVE_UP_AFTER = 3  # lives in a row that did not come back: stop killing, go to the checks


@dataclass
class LifePlan:
    mode: str  # running: kill after `delay` s of work | burst: a burst of input, then kill | startup | final
    delay: float  # running: seconds after ready; burst: seconds after ready before the burst; startup: after start
    after_burst: float  # burst: seconds after the burst's first outputs showed
    quota: int  # input lines produced during this life
    delete_state: bool  # the state directory is deleted before this life starts
    broker_restart: bool  # the broker is restarted while this life runs


def make_plan(kills: int, records: int, seed: int) -> list[LifePlan]:
    """kills + 1 lives: each of the first `kills` ends with SIGKILL, the last one with SIGTERM."""
    rng = random.Random(f"chaos-plan-{seed}")
    deletes = set(rng.sample(range(2, kills), k=min(2, max(0, kills - 2)))) if kills > 2 else set()
    restart_at = rng.randrange(max(1, kills // 3), max(2, (2 * kills) // 3 + 1)) if kills >= 2 else -1
    weights = [rng.uniform(0.5, 1.5) for _ in range(kills + 1)]
    quotas = [int(records * w / sum(weights)) for w in weights]
    quotas[-1] += records - sum(quotas)
    plan = []
    for i in range(kills + 1):
        if i == kills:
            mode = "final"
        elif i == 0 or i == restart_at:
            mode = "running"  # something is processed before the first kill; the broker goes down mid-work
        else:
            mode = rng.choices(("running", "burst", "startup"), weights=(0.4, 0.4, 0.2))[0]
        delay = {"running": rng.uniform(1.0, 6.0), "burst": rng.uniform(1.0, 4.0), "startup": rng.uniform(0.5, 6.0),
                 "final": 5.0}[mode]
        plan.append(LifePlan(mode, delay, rng.uniform(0.0, 0.4), quotas[i], i in deletes, i == restart_at))
    return plan


@dataclass
class Life:
    number: int
    plan: LifePlan
    worker: Worker
    ready_after: float | None = None
    lived: float = 0.0
    lag_at_end: float | None = None  # the worker's own lag metric just before the kill
    uncommitted: int | None = None  # raw records not committed when it died (broker's view, right after)
    records_in: float | None = None  # its counters just before the kill (per process)
    skipped: float | None = None
    batches: float | None = None
    exit_code: int | None = None
    exited_early: bool = False  # it was gone before the harness killed it
    came_back: bool | None = None  # it became ready (None: not waited for, a kill during start-up)
    notes: list[str] = field(default_factory=list)


@dataclass(eq=False)
class Chaos:
    settings: Settings
    run_dir: Path
    feeder: Feeder
    plan: list[LifePlan]
    broker: Broker
    seed: int
    lives: list[Life] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    worker: Worker | None = None
    broker_survived: bool | None = None
    broker_recovery: float | None = None
    stop_result: tuple[int, float, bool] | None = None
    caught_up: bool = False

    @property
    def log_path(self) -> Path:
        return self.run_dir / "worker.log"

    # -- one life

    def start(self, number: int, plan: LifePlan) -> Life:
        note = plan.mode + (", state directory deleted" if plan.delete_state else "")
        if plan.delete_state:
            shutil.rmtree(self.settings.state_dir, ignore_errors=True)
        # a fresh port per life: the killed worker's port may not be free again at once
        settings = replace(self.settings, web_port=free_port())
        life = Life(number, plan, start_worker(settings, self.log_path, number, note))
        self.worker = life.worker
        self.lives.append(life)
        return life

    def wait_ready(self, life: Life, timeout: float = READY_TIMEOUT) -> bool:
        """Until this worker reports a lag for every raw partition (it holds them all and fetches them: its
        table is restored) and the group is stable with one member. The group alone is not enough: until
        the session timeout, the member that still holds everything may be the killed predecessor."""
        worker = life.worker
        deadline = time.monotonic() + timeout
        last = "not asked yet"
        while time.monotonic() < deadline:
            if not worker.alive():
                life.came_back = False
                return False
            lag = worker.raw_lag(self.settings.raw_topic)
            if set(lag) != set(range(PARTITIONS)):
                last = f"the worker reports a lag for raw partitions {sorted(lag)}"
                time.sleep(0.5)
                continue
            try:
                state, held = run_async(kafka_admin.group_assignment(self.settings), timeout=20)
            except Exception as e:
                state, held = f"unknown ({type(e).__name__})", []
            last = f"group {state}, raw partitions per member {held}"
            if state == "Stable" and len(held) == 1 and held[0] == set(range(PARTITIONS)):
                life.ready_after = worker.age()
                life.came_back = True
                return True
            time.sleep(0.5)
        life.notes.append(f"not ready after {timeout:.0f}s ({last})")
        life.came_back = False
        return False

    def sample(self, life: Life) -> None:
        samples = life.worker.metrics()
        if samples is None:
            return
        lag = life.worker.raw_lag(self.settings.raw_topic)
        life.lag_at_end = sum(lag.values()) if lag else None
        life.records_in = metric(samples, "streams_records_in_total")
        life.skipped = metric(samples, "streams_already_applied_total")
        life.batches = metric(samples, "streams_batches_total")

    def end_with_kill(self, life: Life) -> None:
        self.sample(life)
        life.exited_early = not life.worker.alive()
        life.exit_code = life.worker.kill()
        life.lived = life.worker.age()
        # what the dead worker left uncommitted: work in flight or not begun, to be done again by the next
        with contextlib.suppress(Exception):
            life.uncommitted = run_async(offsets(self.settings, repartition_of(self.settings)), timeout=30).lag()
        if life.exited_early:
            tolerated = life.plan.broker_restart  # "the worker must survive it or be restarted"
            self.findings.append(Finding(not tolerated, (
                f"life #{life.number} ({life.plan.mode}): the worker exited by itself with code {life.exit_code}"
                f"{' during the broker restart' if tolerated else ''}; its last log lines:\n"
                f"{indent(life.worker.tail(TAIL))}")))

    def run_life(self, number: int, plan: LifePlan) -> bool:
        """One life that ends with SIGKILL; False when the worker did not come back (not ready in time)."""
        life = self.start(number, plan)
        came_back = True
        if plan.mode == "startup":
            life.came_back = None  # killed on purpose before it is ready: the next lives tell
            # input flows while it starts, joins and restores: the next life finds a backlog
            self.feeder.submit(plan.quota, plan.delay)
            time.sleep(plan.delay)
        elif not self.wait_ready(life):
            came_back = False
            self.feeder.submit(plan.quota, 0.0)  # the input must all be produced all the same
            self.findings.append(Finding(True, (
                f"life #{number} ({plan.mode}{', after deleting the state directory' if plan.delete_state else ''})"
                f": the worker did not come back ({'; '.join(life.notes) or 'it exited'}, exit "
                f"{life.worker.poll()}); its last log lines:\n{indent(life.worker.tail(TAIL))}")))
        elif plan.mode == "running":
            # input keeps coming while it works (longer around the broker restart, which pauses the feeder)
            self.feeder.submit(plan.quota, plan.delay + (10.0 if plan.broker_restart else 0.0))
            if plan.broker_restart:
                self.restart_broker(life)
            time.sleep(plan.delay)
        elif plan.mode == "burst":
            time.sleep(plan.delay)
            # the worker gets through ~10,000 records in well under a second: kill it a random moment after its
            # first outputs of the burst show, when it is most likely between producing them and committing
            submitted: list[Job] = []
            try:
                took = run_async(outputs_grow(self.settings, lambda: submitted.append(
                    self.feeder.submit(plan.quota, 0.0))), timeout=90)
            except Exception as e:  # the watch failed, not the worker: kill it all the same
                took = None
                life.notes.append(f"burst watch failed: {type(e).__name__}")
                if not submitted:
                    self.feeder.submit(plan.quota, 0.0)
            life.notes.append(f"burst: first outputs after {fmt_s(took)}, killed {plan.after_burst:.2f}s later")
            time.sleep(plan.after_burst)
        self.end_with_kill(life)
        return came_back

    def restart_broker(self, life: Life) -> None:
        """Restart the broker under the running worker, then wait until the worker is back at work: its
        committed offsets reach what the raw topic held when the broker answered again."""
        time.sleep(random.Random(f"chaos-broker-{self.seed}").uniform(1.0, 3.0))
        log(f"life #{life.number}: restarting the broker (bash scripts/kafka.sh restart) under the worker")
        with self.feeder.gate:
            took = self.broker.restart()
        life.notes.append(f"broker restarted in {took:.1f}s")
        log(f"broker back after {took:.1f}s; worker {'alive' if life.worker.alive() else 'GONE'}")
        self.broker_recovery = back_at_work(self.settings, life.worker.alive)
        self.broker_survived = self.broker_recovery is not None
        if self.broker_survived:
            life.notes.append(f"worker back at work {self.broker_recovery:.1f}s after the broker")
            return
        alive = life.worker.alive()
        self.findings.append(Finding(alive, (
            f"life #{life.number}: after the broker restart the worker "
            f"{'made no progress for ' + str(int(BROKER_RECOVERY_TIMEOUT)) + 's' if alive else 'exited'} "
            f"(exit {life.worker.poll()}); its last log lines:\n{indent(life.worker.tail(60))}")))

    # -- the last life

    def final_life(self, number: int, plan: LifePlan) -> None:
        """Start the worker one last time, give it the rest of the input, wait until it has caught up, stop it
        with SIGTERM."""
        life = self.start(number, plan)
        ready = self.wait_ready(life)
        if not ready:
            self.findings.append(Finding(True, (
                f"life #{number} (final): the worker did not come back ({'; '.join(life.notes) or 'it exited'});"
                f" its last log lines:\n{indent(life.worker.tail(TAIL))}")))
        self.feeder.submit(plan.quota, plan.delay if ready else 0.0)
        if not self.feeder.wait_idle(600):
            raise HarnessError("the input was not all produced after 10 min")
        if ready:
            def gone() -> str | None:
                return None if life.worker.alive() else (
                    f"life #{number} (final): the worker exited ({life.worker.poll()}) before it caught up; its "
                    f"last log lines:\n{indent(life.worker.tail(TAIL))}")

            self.caught_up = wait_caught_up(self.settings, len(self.feeder.lines), f"life #{number} (final)",
                                            lambda: [life.worker], gone, self.findings, every_partition=True)
        self.sample(life)
        life.exited_early = not life.worker.alive()
        self.stop_result = stop_at_the_end(life.worker, f"life #{number} (final)", self.findings)
        life.exit_code, life.lived = self.stop_result[0], life.worker.age()

    # -- all of it

    def run(self) -> None:
        failures_in_a_row = 0
        kills = len(self.plan) - 1
        for number, plan in enumerate(self.plan[:-1]):
            if self.feeder.error is not None:
                raise HarnessError(f"producing the input failed: {self.feeder.error!r}")
            if failures_in_a_row >= GIVE_UP_AFTER:
                # it does not come back: still produce the rest, so that the checks show what is missing
                self.feeder.submit(plan.quota, 0.0)
                continue
            came_back = self.run_life(number, plan)
            failures_in_a_row = 0 if came_back else failures_in_a_row + 1
            life = self.lives[-1]
            log(f"life #{number}/{kills} {plan.mode:8}{' [state deleted]' if plan.delete_state else ''}"
                f"{' [broker restart]' if plan.broker_restart else ''}: ready after {fmt_s(life.ready_after)}, "
                f"killed after {life.lived:.1f}s (exit {life.exit_code}); produced {self.feeder.produced:,}; "
                f"worker had read {fmt_n(life.records_in)} in {fmt_n(life.batches)} batches, skipped "
                f"{fmt_n(life.skipped)}, lag {fmt_n(life.lag_at_end)}, left uncommitted {fmt_n(life.uncommitted)}")
        self.final_life(kills, self.plan[-1])
        life = self.lives[-1]
        log(f"life #{kills}/{kills} final: ready after {fmt_s(life.ready_after)}, caught up: {self.caught_up}, "
            f"SIGTERM exit {life.exit_code}; read {fmt_n(life.records_in)}, skipped {fmt_n(life.skipped)}")

    def stop_everything(self) -> None:
        self.feeder.stop()
        if self.worker is not None and self.worker.alive():
            log(f"stopping the worker (pid {self.worker.pid})")
            self.worker.kill()
        self.feeder.join(30)
