"""The plan stage (at-least-once): which of a partition's records this batch may apply, and the plan to make
durable before its outputs.

A device's records reach it by two logs, the raw partition and the repartition partition, and the order in
which the two interleave decides its state. Outputs are sent before the state is made durable, so after a crash
in between the same records are applied again, and must meet the same states: the same `record_id` must carry
the same bytes. So once forwarded records reach p, each batch first records how far it goes in both logs (the
plan, in the changelog, before any output; `streams.worker.stages.commit`). Until both logs are past the plan's
ends, a later batch applies exactly the plan's records, in the same order (raw ones first), and holds back the
rest. A partition that never receives a forwarded record never writes a plan. Exactly-once needs none: a
batch's outputs and state commit together.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from streams.state.keys import PLAN_KEY
from streams.state.transaction import PartitionDB

if TYPE_CHECKING:
    from streams.worker.batch import Run
    from streams.worker.stages.route import Part

log = logging.getLogger(__name__)


def order(run: Run, p: int) -> None:
    """Partition p's records held back where its plan says so, and the new plan to write, if any."""
    if run.step.exactly_once:
        return
    direct, forwarded, messages = run.parts[p]
    direct, forwarded, plan = _order(run, p, run.states[p].db, direct, forwarded, run.positions, run.ends,
                                     run.rewind)
    run.parts[p] = (direct, forwarded, messages)
    if plan is not None:
        run.plans[p] = plan


def _order(run: Run, p: int, db: PartitionDB, direct: Part, forwarded: Part,
           positions: Mapping[tuple[str, int], int], ends: Mapping[tuple[str, int], int],
           rewind: dict[Any, int]) -> tuple[Part, Part, bytes | None]:
    """Partition p's raw and forwarded records this batch may apply, and the plan to write (None: none)."""
    t = run.step.topics
    raw_next = direct[1][0].offset if direct[1] else positions.get((t.raw, p))
    forwarded_next = forwarded[1][0].offset if forwarded[1] else positions.get((t.repartition, p))
    stored = _decode_plan(db.get(PLAN_KEY))
    if stored is None:
        if not forwarded[1]:
            return direct, forwarded, None
        # the first forwarded records: batches before wrote no plan, and any raw record they may have sent
        # outputs for (before a crash) must come before them. Every such record is below the raw log's end
        raw_high = ends.get((t.raw, p))
        if raw_high is None or forwarded_next is None:
            return direct, _upto(forwarded, -1, rewind), None
        return direct, _upto(forwarded, -1, rewind), _encode_plan(raw_high, forwarded_next)
    raw_end, forwarded_end = stored
    if raw_next is None or raw_next < raw_end or forwarded_next is None or forwarded_next < forwarded_end:
        direct = _upto(direct, raw_end, rewind)
        raw_after = direct[1][-1].offset + 1 if direct[1] else raw_next
        if raw_after is None or raw_after < raw_end:
            # the plan's raw records are not all applied yet: its forwarded ones wait for them
            forwarded = _upto(forwarded, -1, rewind)
        else:
            forwarded = _upto(forwarded, forwarded_end, rewind)
        return direct, forwarded, None
    raw_after = direct[1][-1].offset + 1 if direct[1] else raw_next
    forwarded_after = forwarded[1][-1].offset + 1 if forwarded[1] else forwarded_next
    return direct, forwarded, _encode_plan(raw_after, forwarded_after)


def _upto(part: Part, end: int, rewind: dict[Any, int]) -> Part:
    """The part's records before offset `end`; the rest is held back (fetched again later)."""
    tp, records = part
    if not records or records[-1].offset < end:
        return part
    kept = [r for r in records if r.offset < end]
    rewind[tp] = records[len(kept)].offset
    return tp, kept


def _encode_plan(raw_end: int, forwarded_end: int) -> bytes:
    return f"{raw_end},{forwarded_end}".encode()


def _decode_plan(data: Any) -> tuple[int, int] | None:
    if not isinstance(data, bytes):
        return None
    try:
        raw_end, forwarded_end = data.split(b",")
        return int(raw_end), int(forwarded_end)
    except ValueError:
        # damaged: taken as no plan (the first forwarded records then wait for the raw log's end, as the first
        # time), never as a reason to stop the partition
        log.error("the partition's batch plan cannot be read; starting a new one")
        return None
