"""How the worker tries a failed batch again: after a growing pause, and never for ever on one record.

Lives here: `Retries`, the count of a partition set's consecutive failures with the pause before the next
try (0.5 s doubling to 30 s), and the decision to stop trying the batch whole. A batch fails for one of two
kinds of reason:
- Kafka trouble that passes (a broker down, a leader moving, a fenced producer): nothing in the records is
  wrong; the batch is tried again, with the pause, until Kafka answers. Dropping records would lose them, and
  exiting would only move the wait to the next worker.
- anything else: a defect of ours that the per-record checks missed, or a record that no broker will ever
  take (`REFUSED_RECORD`: too large for it, say). Trying again would fail again. After `isolate_after` tries
  its records are tried one at a time, and a record that fails alone is kept as a dead letter; the partition
  goes on.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiokafka.errors import (
    CorruptRecordException,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
)

# the broker (or the client, before it sends) refuses the record itself: no retry can cure it
REFUSED_RECORD = (MessageSizeTooLargeError, RecordListTooLargeError, RecordTooLargeError, CorruptRecordException)


def transient(error: BaseException) -> bool:
    """Whether `error` is Kafka trouble that passes, to be waited out rather than isolated."""
    return isinstance(error, TimeoutError | KafkaError | OSError) and not isinstance(error, REFUSED_RECORD)

FIRST_PAUSE = 0.5
LONGEST_PAUSE = 30.0


@dataclass
class Retries:
    isolate_after: int = 3
    failures: int = 0  # consecutive failed tries of the batch step

    def failed(self) -> float:
        """Count a failure; the pause before the next try, in seconds."""
        self.failures += 1
        return min(FIRST_PAUSE * 2.0 ** (self.failures - 1), LONGEST_PAUSE)

    def succeeded(self) -> None:
        self.failures = 0

    def isolate(self, kafka_trouble: bool) -> bool:
        """Whether to stop trying the batch whole and try its records one at a time."""
        return not kafka_trouble and self.failures > self.isolate_after
