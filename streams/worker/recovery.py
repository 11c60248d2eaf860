"""The worker's table recovery: Faust's, which also knows a changelog that ends in a transaction marker, and
which writes fetched changelog records straight to RocksDB (`streams.state.restore`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, cast

from faust.tables import TableManager
from faust.tables.recovery import Recovery

from streams.state import restore
from streams.state.restore import RestoreCounters

log = logging.getLogger(__name__)



class MarkerAwareRecovery(Recovery):
    """Faust's table recovery, which also knows a changelog that ends in a transaction marker, and which
    writes fetched changelog records straight to RocksDB (`streams.state.restore`) instead of through Faust's
    event path.

    Recovery is done when the last record read is the one before the partition's end offset; with
    transactions, the last offsets are commit markers (and records of aborted transactions) that a consumer
    never sees as records, so Faust's own check waits for ever unless its own exactly-once mode is on. Here
    a partition also counts as read when the consumer's position has passed its end and every record
    fetched has been handed on (`BatchConsumer.settled_positions`) and applied."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.restore_counters = RestoreCounters()
        # the active partitions' highwaters and start offsets are built and the reading has begun: only then
        # may `settle` end a recovery (before, they are the previous rebalance's)
        self._reading = False

    def need_recovery(self) -> bool:
        remaining = self.active_remaining()
        if not any(n > 0 for n in remaining.values()):
            return False
        if not self.tables.changelog_queue.empty():
            return True
        positions = getattr(self.app.consumer, "settled_positions", {})
        return any(n > 0 and positions.get(tp, -1) <= self.active_highwaters[tp] for tp, n in remaining.items())

    def restore_fetched(self, tp: Any, records: Sequence[Any]) -> bool:
        """Apply the fetched changelog records of an active partition in recovery or of a standby, in one
        RocksDB write batch; False when `tp` is neither (then they take Faust's own path)."""
        if not restore.BATCHED:
            return False
        if tp in self.active_tps:
            role, offsets = "active", self.active_offsets
            self._active_events_received_at[tp] = time.monotonic()  # else Faust warns of a stalled partition
        elif tp in self.standby_tps:
            role, offsets = "standby", self.standby_offsets
        else:
            return False
        table = self.tp_to_table.get(tp)
        if table is None:
            return False
        fresh = restore.newer_than(records, offsets.get(tp))
        if fresh:
            buffered = self.buffers.get(table)
            if buffered:
                # records that took Faust's path before this one: theirs are older, so they are written first
                table.apply_changelog_batch(buffered)
                buffered.clear()
            started = time.monotonic()
            offsets[tp] = restore.write_records(cast(Any, table).data, tp.partition, fresh)
            counters = self.restore_counters
            counters.records[role] += len(fresh)
            counters.batches += 1
            counters.seconds += time.monotonic() - started
            if role == "active" and self._devices(tp):
                counters.offsets[tp.partition] = offsets[tp]
        return True

    def _devices(self, tp: Any) -> bool:
        """Whether `tp` is of the device table's changelog: the per-partition figures are the device table's
        (the persons table has its own changelog, with other offsets, under the same partition numbers)."""
        pipeline = getattr(self.app, "streams_pipeline", None)
        return pipeline is None or tp.topic == pipeline.topics.changelog

    def standby_positions(self) -> dict[int, int]:
        """Per standby partition, the changelog offset its copy of the device table holds (one with nothing new
        to read too)."""
        return {tp.partition: offset for tp in list(self.standby_tps)
                if self._devices(tp) and (offset := self.standby_offsets.get(tp)) is not None}

    def settle(self) -> None:
        """Called by the consumer each time every record it fetched has been handed on: the recovery ends
        as soon as it is complete, not at the next 5-second tick of Faust's changelog reader."""
        if self._reading and self.in_recovery and not self.need_recovery():
            self.flush_buffers()
            self._set_recovery_ended()
            self.signal_recovery_end.set()

    async def _seek_offsets(self, consumer: Any, tps: Any, offsets: Any, title: str) -> None:
        await super()._seek_offsets(consumer, tps, offsets, title)
        if title == "active":
            self._reading = True
            for tp in tps:
                if self._devices(tp):
                    self.restore_counters.started_after[tp.partition] = offsets[tp]

    def _set_recovery_ended(self) -> None:
        self._reading = False
        super()._set_recovery_ended()

    async def on_rebalance(self, assigned: Any, revoked: Any, newly_assigned: Any, generation_id: int = 0) -> None:
        self._reading = False
        persons = getattr(getattr(self.app, "streams_pipeline", None), "topics", None)
        for tp in revoked:
            if persons is not None and tp.topic == persons.persons_changelog:
                continue  # the partition's device figures go with its other topics
            self.restore_counters.offsets.pop(tp.partition, None)
            self.restore_counters.started_after.pop(tp.partition, None)
        await super().on_rebalance(assigned, revoked, newly_assigned, generation_id)


class StreamsTableManager(TableManager):
    @property
    def recovery(self) -> Recovery:
        if self._recovery is None:
            self._recovery = MarkerAwareRecovery(self.app, self, beacon=self.beacon, loop=self.loop)
        return self._recovery

