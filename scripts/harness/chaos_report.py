"""make chaos's report: what came out against the references, what the run did to the workers and the broker,
the findings and the first differences of each kind, and PASS or FAIL.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from harness.broker import PARTITIONS
from harness.chaos_group import GroupChaos
from harness.chaos_run import Finding
from harness.chaos_single import Chaos
from harness.checks import Check
from harness.report import durations, fmt_n, fmt_s
from streams.config import Settings


@dataclass
class Outcome:
    checks: list[Check]
    records: int
    devices_seen: int
    wall: float
    phases: dict[str, float]
    seed: int
    code: str  # the commit the worker ran at the start of the chaos


def result_lines(checks: Sequence[Check], records: int, devices_seen: int) -> list[str]:
    """The report's lines on what came out: losses, inventions, duplicates; the states and the persons last."""
    enriched, dead, states, persons, changes = checks
    wrong = "not what the engine makes of its raw record"

    def n(check: Check, key: str) -> int:
        return check.counts.get(key, 0)

    return [
        f"records in            {records:,} raw records over {devices_seen:,} devices "
        f"(replay: {n(enriched, 'expected'):,} enriched, {n(dead, 'expected'):,} dead letters)",
        f"enriched out          {n(enriched, 'distinct'):,} distinct / "
        f"{n(enriched, 'distinct') + n(enriched, 'copies'):,} with duplicates",
        f"dead letters          {n(dead, 'distinct'):,} distinct / {n(dead, 'distinct') + n(dead, 'copies'):,}"
        f" with duplicates",
        f"lost                  {n(enriched, 'lost'):,} enriched, {n(dead, 'lost'):,} dead letters",
        f"invented / wrong      {n(enriched, 'invented') + n(dead, 'invented'):,} / "
        f"{n(enriched, wrong) + n(dead, wrong):,} (out of order: {n(enriched, 'out of order'):,})",
        f"duplicated            {n(enriched, 'copies'):,} enriched copies of "
        f"{n(enriched, 'duplicated_ids'):,} records, {n(dead, 'copies'):,} dead-letter copies",
        f"differing duplicates  {n(enriched, 'differing duplicates') + n(dead, 'differing duplicates'):,}",
        f"state mismatches      {n(states, 'state mismatches'):,} of {n(states, 'expected'):,} devices with "
        f"state ({n(states, 'stored'):,} stored, {n(states, 'changelog_records'):,} changelog records; "
        f"applied-offset mismatches {n(states, 'applied offsets'):,}, wrong partition "
        f"{n(states, 'wrong partition'):,})",
        f"persons mapping       {n(persons, 'mapped'):,} mapped on the topic, replay {n(persons, 'expected'):,}; "
        f"missing {n(persons, 'persons missing'):,}, invented {n(persons, 'persons invented'):,}, "
        f"differing {n(persons, 'persons differing'):,}",
        f"identity change log   {n(changes, 'distinct'):,} distinct rows / "
        f"{n(changes, 'distinct') + n(changes, 'copies'):,} with duplicates (differing "
        f"{n(changes, 'differing duplicates'):,}); its last rows: {n(changes, 'mapped'):,} mapped, "
        f"{n(changes, 'ending elsewhere'):,} ending elsewhere than replay",
    ]


def failed(checks: Sequence[Check], findings: Sequence[Finding]) -> bool:
    return any(c.failed for c in checks) or any(f.fatal for f in findings)


def closing_lines(checks: Sequence[Check], findings: Sequence[Finding], settings: Settings) -> list[str]:
    """The findings, the first differences of each kind, and the verdict."""
    lines: list[str] = []
    for f in findings:
        lines += ["", ("FAILURE: " if f.fatal else "note: ") + f.text]
    for check in checks:
        for kind, texts in check.problems.items():
            if texts:
                lines += ["", f"FAILURE: {check.name}: {check.counts.get(kind, 0):,} {kind}; the first:",
                          *(f"  - {text}" for text in texts)]
    lines.append("")
    if failed(checks, findings):
        lines.append("FAIL")
    elif settings.exactly_once:
        lines.append("PASS: nothing lost, invented or duplicated, dead letters and states as replay's")
    else:
        lines.append("PASS: nothing lost or invented, every duplicate identical, dead letters and states as replay's")
    return lines


def error_kind(line: str) -> str:
    """A log line without its time, pid and numbers: lines that say the same thing count as one kind."""
    text = re.sub(r"^\[[^]]*\] \[\d+\] ", "", line)
    return re.sub(r"\d+", "N", text)[:160]


def single_report(o: Outcome, chaos: Chaos, settings: Settings) -> list[str]:
    kills = [life for life in chaos.lives if life.plan.mode != "final"]
    # a kill is survived when the next start came back; a start killed on purpose during start-up counts with
    # the kill before it (the worker after it has to come back from both)
    not_back = sum(1 for life in chaos.lives[1:] if life.came_back is False)
    startup_kills = sum(1 for life in kills if life.plan.mode == "startup")
    deleted = sum(1 for life in chaos.lives if life.plan.delete_state)
    mid_stream = sum(1 for life in kills if life.uncommitted)
    if chaos.broker_survived:
        broker_fate = f"worker survived it, back at work after {fmt_s(chaos.broker_recovery)}"
    else:
        broker_fate = "worker did NOT survive it" if chaos.broker_survived is False else "-"
    stop = chaos.stop_result
    stopped = "-" if stop is None else f"exit {stop[0]} after {stop[1]:.1f}s" + (" (forced)" if stop[2] else "")
    results = result_lines(o.checks, o.records, o.devices_seen)
    lines = [
        "",
        f"== chaos: {settings.raw_topic}, {PARTITIONS} partitions, group {settings.group}, seed {o.seed}, "
        f"{len(kills)} kills, {settings.processing_guarantee}; worker code {o.code}",
        *results[:-1],
        f"kills survived        {len(kills) - not_back} of {len(kills)} SIGKILLs ({mid_stream} with unprocessed "
        f"input at the kill, {startup_kills} during start-up, {deleted} restarts with the state directory deleted)",
        f"broker restarts       {len(chaos.broker.restarts)} (" + ", ".join(f"{t:.1f}s" for t in chaos.broker.restarts)
        + f"; {broker_fate})",
        results[-1],
        f"final SIGTERM         {stopped}; caught up: {'yes' if chaos.caught_up else 'NO'}",
        f"wall time             {o.wall:.0f}s ({durations(o.phases)})",
        "",
        "lives: #  mode      ready   lived  exit  read     skipped  batches  lag@end  uncommitted  notes",
    ]
    for life in chaos.lives:
        flags = (["state deleted"] if life.plan.delete_state else []) + life.notes
        lines.append(f"     {life.number:>3} {life.plan.mode:8} {fmt_s(life.ready_after):>6} {life.lived:6.1f}s "
                     f"{life.exit_code!s:>4}  {fmt_n(life.records_in):>8} {fmt_n(life.skipped):>8} "
                     f"{fmt_n(life.batches):>8} {fmt_n(life.lag_at_end):>8} {fmt_n(life.uncommitted):>12}  "
                     f"{'; '.join(flags)}")
    errors = [(life.number, line) for life in chaos.lives for line in life.worker.errors()]
    lines += ["", f"worker log: {chaos.log_path} ({len(errors)} ERROR/CRITICAL/traceback lines; by kind, with the "
                  "lives they came from, and the first of each kind)"]
    kinds: dict[str, tuple[int, set[int], str]] = {}
    for number, line in errors:
        kind = error_kind(line)
        count, lives, first = kinds.get(kind, (0, set(), line))
        kinds[kind] = (count + 1, lives | {number}, first)
    for _kind, (count, lives, first) in sorted(kinds.items(), key=lambda item: -item[1][0]):
        lines.append(f"    {count:>5} x in lives {','.join(map(str, sorted(lives)))}: {first[:300]}")
    return lines + closing_lines(o.checks, chaos.findings, settings)


def group_report(o: Outcome, chaos: GroupChaos, settings: Settings) -> list[str]:
    selfexits = sum(1 for f in chaos.findings if "exited by itself" in f.text)
    stops = ", ".join(f"{name}: exit {c} after {t:.1f}s{' (forced)' if forced else ''}"
                      for name, (c, t, forced) in chaos.stop_results.items())
    return ["",
            f"== {chaos.headline(o.seed)}; worker code {o.code}",
            *result_lines(o.checks, o.records, o.devices_seen),
            *chaos.event_lines(),
            f"exits by themselves   {selfexits}",
            f"final SIGTERM         {stops or '-'}; caught up: {'yes' if chaos.caught_up else 'NO'}",
            f"wall time             {o.wall:.0f}s",
            *closing_lines(o.checks, chaos.findings, settings)]
