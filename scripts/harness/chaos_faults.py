"""make chaos's network faults (--faults, as root): two workers of one group, each on its own test host
(scripts/testhosts.py), the input flowing at a steady rate; three times, on one worker drawn at random, its
host cut off the network (`partition`) or its process stopped (`pause`) for longer than the session timeout,
then healed (continued), the group whole again before the next. None is killed.
"""

from __future__ import annotations

import contextlib
import random
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import testhosts  # scripts/testhosts.py: scripts/ is on the path

from harness.broker import PARTITIONS, HarnessError
from harness.chaos_group import GroupChaos, Slot
from harness.chaos_run import READY_TIMEOUT, Finding, log, run_async
from harness.feeder import Job
from harness.report import fmt_s, spread
from streams.kafka import admin as kafka_admin

FAULT_KINDS = ("partition", "pause")
FAULTS = 3  # per --faults run, each on a worker drawn at random
FAULT_SECONDS = 25.0  # longer than the session timeout (10 s): the group goes on without the worker
FEED_RATE = 1200.0  # input records per second (the run)
FEED_SECONDS = 160.0  # a smaller input is spread over this long, so that the faults fall within it
# the test hosts' numbers are the first free ones from stv11 on (the tests take theirs from stv1 on)
FIRST_TEST_HOST = 11


@dataclass
class Fault:
    number: int
    slot: str
    at: float  # seconds into the input stream
    lasted: float  # from the cut (SIGSTOP) to the heal (SIGCONT)
    dropped_after: float | None  # the group went on without the worker: stable, the other holding everything
    back_after: float | None  # after the heal (SIGCONT): two members holding every partition again
    produced: int  # input records produced during the fault


@dataclass(eq=False)
class FaultChaos(GroupChaos):
    """The group kind's two workers on test hosts, faults instead of kills; at the end both are stopped with
    SIGTERM (`final`, as the group runs)."""

    kind: str = field(kw_only=True)
    hosts: Sequence[testhosts.TestHost] = field(kw_only=True)
    rate: float = field(kw_only=True)
    faults: list[Fault] = field(default_factory=list)
    feed: Job | None = None
    feed_started: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.rng = random.Random(f"chaos-{self.kind}-{self.seed}")
        for slot, host in zip(self.slots, self.hosts, strict=True):
            slot.host = host

    def run(self) -> None:
        if not self.start_group():
            return
        lines = len(self.feeder.lines)
        self.feed_started = time.monotonic()
        self.feed = self.feeder.submit(lines, lines / self.rate)
        log(f"feeding {lines:,} records at {self.rate:,.0f}/s over {lines / self.rate:.0f}s")
        for number in range(1, FAULTS + 1):
            time.sleep(self.rng.uniform(3.0, 8.0))
            slot = self.rng.choice(self.slots)
            if self.restart_gone():  # one exited by itself (reported): the group whole again first
                self.group_ready()
            self.fault(number, slot)
        self.final()

    def fault(self, number: int, slot: Slot) -> None:
        worker, host = slot.worker, slot.host
        assert worker is not None and host is not None
        at, produced = time.monotonic() - self.feed_started, self.feeder.produced
        what = f"test host {host.name} cut off" if self.kind == "partition" else f"pid {worker.pid} stopped"
        log(f"fault #{number}/{FAULTS}: {self.kind} of worker {slot.name} ({what}) for {FAULT_SECONDS:.0f}s, "
            f"{at:.1f}s into the input")
        began = time.monotonic()
        try:
            if self.kind == "partition":
                host.cut()
            else:
                worker.send(signal.SIGSTOP)
            dropped = self.group_without_it(began + FAULT_SECONDS)
        finally:
            if self.kind == "partition":
                host.heal()
            else:
                worker.send(signal.SIGCONT)
        lasted = time.monotonic() - began
        back = self.group_ready()
        self.faults.append(Fault(number, slot.name, at, lasted, dropped, back, self.feeder.produced - produced))
        log(f"fault #{number}/{FAULTS}: {self.ended} after {lasted:.1f}s; the group went on without worker "
            f"{slot.name} after {fmt_s(dropped)}, whole again {fmt_s(back)} after that; produced "
            f"{self.feeder.produced:,}")
        if dropped is None:
            self.findings.append(Finding(False, f"fault #{number}: the group did not go on without worker "
                                                f"{slot.name} within {FAULT_SECONDS:.0f}s"))
        if back is None:
            self.findings.append(Finding(True, f"after fault #{number} ({self.kind} of worker {slot.name}) the group "
                                               f"was not whole again within {READY_TIMEOUT:.0f}s"))
            self.restart_gone()

    def group_without_it(self, until: float) -> float | None:
        """Waits until `until` (the fault's end); returns the seconds after which the group was stable with one
        member (the other worker) holding every partition (None: not seen). A worker exiting meanwhile is
        reported."""
        began, dropped = time.monotonic(), None
        while (left := until - time.monotonic()) > 0:
            self.exited_by_itself()
            if dropped is None:
                with contextlib.suppress(Exception):
                    state, members = run_async(kafka_admin.group_assignment(self.settings), timeout=min(left, 10))
                    if state == "Stable" and members == [set(range(PARTITIONS))]:
                        dropped = time.monotonic() - began
            time.sleep(min(1.0, max(0.0, until - time.monotonic())))
        return dropped

    def headline(self, seed: int) -> str:
        hosts = ", ".join(f"{s.name} on {s.host.name} ({s.host.address})" for s in self.slots if s.host)
        return (f"{self.kind} chaos: {self.settings.raw_topic}, {PARTITIONS} partitions, group {self.settings.group}, "
                f"2 workers on test hosts ({hosts}) of the broker at {self.settings.brokers}, seed {seed}, "
                f"{len(self.faults)} faults of {FAULT_SECONDS:.0f}s, {self.settings.processing_guarantee}")

    def event_lines(self) -> list[str]:
        drops = sorted(f.dropped_after for f in self.faults if f.dropped_after is not None)
        backs = sorted(f.back_after for f in self.faults if f.back_after is not None)
        per_slot = ", ".join(f"{s.name}: {sum(1 for f in self.faults if f.slot == s.name)}" for s in self.slots)
        lines = len(self.feeder.lines)
        took = self.feed.took if self.feed is not None else None
        fed = f"in {took:.0f}s ({lines / took:,.0f}/s)" if took else "(not all)"
        action = {"partition": "cut off", "pause": "SIGSTOP"}[self.kind]
        out = [f"input flow            {lines:,} records at {self.rate:,.0f}/s asked, fed {fed}",
               f"faults survived       {len(backs)} of {len(self.faults)} ({self.kind}, worker {per_slot}); group on "
               f"without it after {spread(drops)}, whole again {spread(backs)} after the {self.ended}"]
        for f in self.faults:
            out.append(f"  fault #{f.number:<13}worker {f.slot} {action} {f.at:.1f}s into the input for "
                       f"{f.lasted:.1f}s; the group on without it after {fmt_s(f.dropped_after)}, whole again "
                       f"{fmt_s(f.back_after)} after the {self.ended}; {f.produced:,} records produced meanwhile")
        return out

    @property
    def ended(self) -> str:
        """How the fault ends: a cut is healed, a stopped worker continued."""
        return "heal" if self.kind == "partition" else "SIGCONT"


def make_test_hosts() -> list[testhosts.TestHost]:
    """Two fresh test hosts, after removing those a run killed before its clean-up left. Raises
    testhosts.Unavailable where this machine cannot make them, HarnessError where the broker is not there for
    them."""
    testhosts.ensure_tools()
    if not testhosts.broker_reachable():
        raise HarnessError(f"the broker does not listen on {testhosts.BROKERS} for the test hosts: it was started "
                           "before scripts/kafka.sh added that listener, or not as root (`bash scripts/kafka.sh "
                           "restart` as root)")
    testhosts.remove_all()
    try:
        hosts = testhosts.make_hosts(2, first=FIRST_TEST_HOST)
    except RuntimeError as e:  # a step of making one failed: what was made goes
        testhosts.remove_all()
        raise HarnessError(f"making the test hosts failed: {e}") from e
    log("test hosts: " + ", ".join(f"{h.name} ({h.address})" for h in hosts))
    return hosts


def remove_test_hosts(hosts: Sequence[testhosts.TestHost]) -> None:
    """Healed and removed (their workers are stopped first), whatever happened."""
    for host in hosts:
        try:
            host.heal()
            host.remove()
        except Exception as e:
            print(f"chaos: removing test host {host.name}: {type(e).__name__}: {e}", file=sys.stderr)
