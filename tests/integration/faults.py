"""`python -m tests.integration.faults worker`: the worker with the faults a test names in FAULT_* variables
patched into its process. The product keeps no test hooks; this is how a test reaches the paths that only a
defect of ours, or a record no broker takes, would open.

- FAULT_SEND_POISON=TEXT: a send of the batch step fails, as a defect would (a RuntimeError, inside the
  partition's transaction in exactly-once), whenever it holds an enriched record that contains TEXT.
- FAULT_SEND_TOO_LARGE=TEXT: the same, with the error the producer raises for a record over its size limit.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

from aiokafka.errors import MessageSizeTooLargeError

from streams.cli import main
from streams.worker.send import Message
from streams.worker.stages import commit


def _failing_send(text: bytes, error: type[Exception]) -> Any:
    real = commit.send_all

    async def send_all(outbox: Mapping[tuple[str, int], list[Message]], producer: Any) -> list[tuple[Any, int]]:
        for (topic, _), messages in outbox.items():
            if topic.endswith(".enriched") and any(value and text in value for _, value, _ in messages):
                raise error(f"injected fault: a send holding {text!r}")
        return await real(outbox, producer)

    return send_all


if poison := os.environ.get("FAULT_SEND_POISON"):
    commit.send_all = _failing_send(poison.encode(), RuntimeError)
if too_large := os.environ.get("FAULT_SEND_TOO_LARGE"):
    commit.send_all = _failing_send(too_large.encode(), MessageSizeTooLargeError)

if __name__ == "__main__":
    sys.exit(main())
