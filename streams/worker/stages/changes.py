"""The identity change log stage: a row per change of a device user's mapping, appended to its topic, keyed by
user ID (schemas/identity-change.schema.json).

It watches the persons index (`streams.worker.stages.persons`), the one writer of each user's mapping: where a
message changes what the persons topic holds, it writes the change's rows, numbered by a version per user kept
with the index (`streams.state.pairs`, key `V`). The rows go with the persons topic's writes, in the partition's
state outbox: fenced with the state, in exactly-once in the partition's transaction. A message applied again
after a crash meets the version as it was stored and carries the same broker timestamp, so at-least-once repeats
a row byte for byte; exactly-once writes it once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from streams import codec
from streams.persons.changes import Change
from streams.worker.stages.persons import Send

if TYPE_CHECKING:
    from streams.worker.batch import Run


def begin(run: Run, p: int) -> None:
    """Partition p's change log for this batch (when it is on, and the persons stage with it)."""
    stage = run.persons.get(p)
    topic = run.step.topics.identity_changes
    if stage is None or topic is None:
        return
    pairs, key_hash = stage.pairs, stage.route.key_hash
    partitions = run.step.topics.identity_changes_partitions or run.step.topics.partitions

    def write(change: Change, processed_time: int | None, send: Send) -> None:
        user = change.user_id
        version = pairs.version(user) + 1
        pairs.put_version(user, version)
        key, target = user.encode(), key_hash(user) % partitions
        for row in codec.encode_rows(change.rows(version, processed_time)):
            send(topic, target, (key, row, None))
            stage.counters.change_rows += 1

    stage.watchers.append(write)
