"""The device stage: each routed record through the enrich step, against the batch's state transaction.

A record whose effect the device's stored state already holds (its marks say so: it was applied, and its
outputs delivered, before a crash) is skipped. Otherwise the shared step (`streams.enrich`) gives its enriched
records, or its dead letter, and the device's new state; both go into the partition's outbox, keyed by the
device ID, and what watches the outcomes (the persons stage) sees each record that emitted something.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from streams.worker.send import box, put
from streams.worker.stages.route import Routed, dead_letter

if TYPE_CHECKING:
    from streams.worker.batch import Run


def apply(run: Run, p: int, item: Routed) -> None:
    step, counters, t = run.step, run.counters, run.step.topics
    state = run.states[p]
    outbox = run.outbox(p)
    try:
        if state.holds(item.device_id, item.watermark, item.offset):
            counters.skipped += 1
            return
        outcome = step.enricher.step(item.raw, item.source, state, item.record)
        h = step.key_hash(item.device_id)
        if outcome.dead_letter is not None:
            put(outbox, t.dead_letter, h % (t.dead_letter_partitions or t.partitions),
                (item.key, outcome.dead_letter, None))
            counters.dead_letter(outcome.reason or "internal_error")
        if outcome.records:
            enriched = box(outbox, t.enriched, h % (t.enriched_partitions or t.partitions))
            for out in outcome.records:
                enriched.append((item.key, out, None))
            for observe in run.observers.get(p, ()):
                observe(outcome)
        for kind in outcome.types:
            counters.enriched_out[kind] = counters.enriched_out.get(kind, 0) + 1
    except Exception as e:
        dead_letter(run, p, e, item.raw, item.source, item.device_id, item.rec.partition)
