"""make chaos: the worker killed with SIGKILL again and again while it consumes, the broker restarted under it
once, and then what it wrote compared with what replay makes of the same input.

The at-least-once contract under test (README, "The worker"): whatever moment a crash hits, the worker neither
loses nor invents records; a record written again is byte for byte its first copy (same `record_id`); dead
letters are those replay gives; the device table ends in the state replay computes.

1. generate a deterministic raw stream (seeded) under .cache/chaos/ (reused when it exists);
2. the references: `python -m streams replay` on the file, and the same engine in-process (per raw record
   its outputs, and every device's final state);
3. fresh topics and group `chaos-<stamp>`; start the worker; produce the input in chunks while it runs; kill
   it (SIGKILL) at seeded random moments and start it again (twice after deleting its state directory, so the
   table is restored from its changelog); restart the broker once while it runs; let the last worker catch
   up, then stop it with SIGTERM (it must exit 0);
4. read the enriched, dead-letter and changelog topics (read_committed) and compare with the references;
5. stop whatever still runs, delete the run's topics (unless --keep), leave the broker as it was found.

    .venv/bin/python scripts/chaos.py [--records N] [--devices D] [--kills K] [--seed S] [--keep]
                                      [--processing-guarantee exactly_once]

With `--processing-guarantee exactly_once` the enriched and dead-letter topics, read committed, must hold
each record exactly once: a duplicate, however identical, is a failure.

    .venv/bin/python scripts/chaos.py --faults partition|pause [--records N] [--devices D] [--rate R] ...

`--faults` runs two workers of one group, each on its own test host (a network namespace of
`scripts/testhosts.py`, needs root), while the input flows at a steady rate (--rate, 1,200 records/s; a smaller
input slower, so that it flows for 160 s at least). Three times, on one worker drawn at random, for 25 s
(longer than the session timeout): `partition` cuts its test host off the network and heals it; `pause` stops
the process (SIGSTOP) and lets it go on (SIGCONT). Before the next fault the group must be whole again (two
stable members holding every partition). No worker is killed: at the end both are stopped with SIGTERM and
must exit 0; the checks are the group runs' (exit 2 when no test hosts can be made here).

Exit 0 when nothing was lost or invented, every duplicate is identical to its first copy, the dead letters and
the final states match, and the worker always came back and stopped cleanly; 1 otherwise (the first
differences and the worker's log lines are printed); 2 when the harness itself could not run.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import testhosts  # scripts/testhosts.py: this file's directory is on the path when it runs
from harness.broker import BROKERS, PARTITIONS, Broker, HarnessError
from harness.chaos_faults import (
    FAULT_KINDS,
    FAULT_SECONDS,
    FAULTS,
    FEED_RATE,
    FEED_SECONDS,
    FaultChaos,
    make_test_hosts,
    remove_test_hosts,
)
from harness.chaos_group import GroupChaos
from harness.chaos_report import Outcome, failed, group_report, single_report
from harness.chaos_run import CHAOS_DIR, cleanup, log, run_async, run_settings, terminate_as_exit
from harness.chaos_single import Chaos, make_plan
from harness.checks import run_checks
from harness.feeder import Feeder
from harness.inputs import generate, input_path, read_lines
from harness.reference import build_reference
from harness.report import code_version, publish

from streams.config import Settings
from streams.kafka import admin as kafka_admin

T = TypeVar("T")
BAD_RATE = 0.005  # more bad records than make bench's: every kind of them, many times over


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Kill the worker (SIGKILL) again and again while it consumes, restart the broker once, then "
                    "compare its output and table with replay's for the same input.")
    parser.add_argument("--records", type=int, default=200_000, help="raw records to generate (default 200,000)")
    parser.add_argument("--devices", type=int, default=None, help="devices (default: records / 10)")
    parser.add_argument("--kills", type=int, default=24, help="SIGKILLs of the worker (default 24)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the input, the kill moments and the plan")
    parser.add_argument("--keep", action="store_true", help="keep the run's topics and state directory")
    parser.add_argument("--brokers", default=BROKERS, help=f"bootstrap servers (default {BROKERS})")
    parser.add_argument("--processing-guarantee", choices=["at_least_once", "exactly_once"], default="at_least_once",
                        help="the worker's delivery mode; exactly_once also fails on any duplicate "
                             "(default at_least_once)")
    parser.add_argument("--group", action="store_true",
                        help="two workers in one group, either one killed at random, and the broker restarted once")
    parser.add_argument("--cluster", action="store_true",
                        help="with --group: on the three-broker cluster (scripts/kafka.sh cluster-start), one node "
                             "killed with SIGKILL and started again instead of the broker restart")
    parser.add_argument("--faults", choices=FAULT_KINDS, default=None,
                        help=f"two workers in one group, each on its own test host (root): {FAULTS} times one of "
                             f"them cut off the network (partition) or stopped with SIGSTOP (pause) for "
                             f"{FAULT_SECONDS:.0f}s while the input flows; none killed")
    parser.add_argument("--rate", type=float, default=None,
                        help=f"with --faults: input records per second (default {FEED_RATE:,.0f}, less for an input "
                             f"smaller than {FEED_RATE * FEED_SECONDS:,.0f}: it flows for {FEED_SECONDS:.0f}s)")
    args = parser.parse_args(argv)
    if args.cluster and not args.group:
        parser.error("--cluster goes with --group")
    if args.faults and (args.group or args.cluster):
        parser.error("--faults runs its own two workers: not with --group or --cluster")
    if args.rate is not None and (not args.faults or args.rate <= 0):
        parser.error("--rate goes with --faults, and must be positive")
    if args.records < 100 or args.kills < 1:
        parser.error("--records must be at least 100 and --kills at least 1")
    args.devices = args.devices or max(1, args.records // 10)
    args.rate = args.rate or min(FEED_RATE, args.records / FEED_SECONDS)
    return args


def timed(phases: dict[str, float], name: str, step: Callable[[], T]) -> T:
    started = time.monotonic()
    try:
        return step()
    finally:
        phases[name] = time.monotonic() - started


def make_chaos(args: argparse.Namespace, settings: Settings, run_dir: Path, feeder: Feeder, broker: Broker,
               hosts: Sequence[testhosts.TestHost]) -> Chaos | GroupChaos:
    """The run's kind: single (one worker killed again and again), group (two, the broker restarted or a node
    of the cluster killed), or faults (two on test hosts, cut off or paused)."""
    if args.faults:
        return FaultChaos(settings, run_dir, feeder, 0, args.seed, None, kind=args.faults, hosts=hosts,
                          rate=args.rate)
    if args.group:
        return GroupChaos(settings, run_dir, feeder, args.kills, args.seed, broker)
    return Chaos(settings, run_dir, feeder, make_plan(args.kills, len(feeder.lines), args.seed), broker, args.seed)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # the harness's own Kafka clients log every refused connection while a broker is down: the report says
    # what matters
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    started = time.monotonic()
    phases: dict[str, float] = {}
    stamp = f"{time.strftime('%Y%m%d%H%M%S')}-{os.getpid()}"
    run_dir = CHAOS_DIR / stamp
    run_dir.mkdir(parents=True, exist_ok=True)
    settings = run_settings(stamp, run_dir, args.brokers, args.processing_guarantee)
    faults = f"{FAULTS} {args.faults} faults of {FAULT_SECONDS:.0f}s" if args.faults else f"{args.kills} kills"
    log(f"run {stamp}: {args.records:,} records, {args.devices:,} devices, {faults}, seed {args.seed}, "
        f"{args.processing_guarantee}; files in {run_dir}")

    path = timed(phases, "input", lambda: generate(input_path(CHAOS_DIR, "chaos", args.records, args.devices,
                                                              args.seed), args.records, args.devices, args.seed,
                                                   bad_rate=BAD_RATE))
    lines = read_lines(path)
    log(f"input {path.name}: {len(lines):,} records")
    try:
        ref = timed(phases, "reference", lambda: build_reference(path, lines, run_dir))
    except HarnessError as e:
        print(f"chaos: {e}", file=sys.stderr)
        return 2
    log(f"reference: {ref.replay.summary}; {len(ref.states):,} devices with state")

    broker: Broker | None = None
    chaos: Chaos | GroupChaos | None = None
    hosts: list[testhosts.TestHost] = []
    try:
        with terminate_as_exit():
            broker = Broker(log, cluster=args.cluster)
            broker.ensure_up()
            if args.cluster:
                settings = replace(settings, brokers=broker.brokers())
            if args.faults:
                hosts = make_test_hosts()
                settings = replace(settings, brokers=testhosts.BROKERS)  # the listener the test hosts reach
            run_async(kafka_admin.ensure_topics(settings, PARTITIONS))
            feeder = Feeder(settings, lines)
            feeder.start()
            chaos = make_chaos(args, settings, run_dir, feeder, broker, hosts)
            code = code_version()
            try:
                timed(phases, "chaos", chaos.run)
            finally:
                chaos.stop_everything()
            feeder.check()
            checks = run_checks(settings, ref, feeder, phases)
            outcome = Outcome(checks, len(lines), feeder.devices(), time.monotonic() - started, phases, args.seed,
                              code)
            if isinstance(chaos, Chaos):
                publish(single_report(outcome, chaos, settings), run_dir / "report.txt")
            else:
                publish(group_report(outcome, chaos, settings), run_dir / "report.txt")
            ok = not failed(checks, chaos.findings)
            if ok and not args.keep:
                # replay's output is ~90 MB a run, and only worth keeping to look into a failure
                for name in ref.replay.files():
                    name.unlink(missing_ok=True)
            return 0 if ok else 1
    except testhosts.Unavailable as e:
        print(f"chaos: cannot make test hosts here: {e}", file=sys.stderr)
        return 2
    except HarnessError as e:
        print(f"chaos: {e}", file=sys.stderr)
        if chaos is not None:
            for finding in chaos.findings:
                print(("FAILURE: " if finding.fatal else "note: ") + finding.text, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("chaos: interrupted", file=sys.stderr)
        return 130
    finally:
        if chaos is not None:
            chaos.stop_everything()
        remove_test_hosts(hosts)
        cleanup(settings, run_dir, broker, args.keep)


if __name__ == "__main__":
    sys.exit(main())
