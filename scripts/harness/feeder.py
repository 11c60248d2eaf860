"""make chaos's input while the workers run: sent to the raw topic job after job, and where each line landed
(partition, offset), which is how a record_id or a dead letter's source is traced back to its input line.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from harness.broker import HarnessError
from harness.chaos_run import run_async
from streams.config import Settings
from streams.kafka import clients as kafka_clients


@dataclass
class Job:
    count: int
    spread: float  # seconds over which to send it: 0 = one burst
    started: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    took: float | None = None  # seconds it took to send, once done


class Feeder(threading.Thread):
    """Sends the input to the raw topic, keyed by device_id, job after job (a job: the next `count` lines,
    in chunks over `spread` seconds), and remembers where each line landed (partition, offset).

    `gate` is held while a chunk is sent: the broker restart takes it, so that no produce is cut in half (a
    half-delivered chunk could not be sent again without duplicating input records)."""

    def __init__(self, settings: Settings, lines: Sequence[bytes]) -> None:
        super().__init__(name="feeder", daemon=True)
        self.settings = settings
        self.lines = lines
        self.keys = [kafka_clients.device_key(v) for v in lines]
        self.placed: list[tuple[int, int] | None] = [None] * len(lines)
        self.next = 0
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.gate = threading.Lock()
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    def submit(self, count: int, spread: float) -> Job:
        job = Job(count, spread)
        self.jobs.put(job)
        return job

    @property
    def produced(self) -> int:
        return self.next

    @property
    def finished(self) -> bool:
        return self.next >= len(self.lines)

    def devices(self) -> int:
        """The devices of the input (records with a key)."""
        return len({k for k in self.keys if k is not None})

    def stop(self) -> None:
        self.stopping.set()
        self.jobs.put(None)

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                job = self.jobs.get()
                if job is None:
                    return
                self._do(job)
        except BaseException as e:  # the main thread reports it: a lost produce makes every check moot
            self.error = e

    def _do(self, job: Job) -> None:
        job.started.set()
        began = time.monotonic()
        try:
            count = min(job.count, len(self.lines) - self.next)
            chunks = max(1, int(job.spread / 0.25)) if count else 0
            size = -(-count // chunks) if chunks else 0
            pause = job.spread / chunks if chunks else 0.0
            sent = 0
            while sent < count and not self.stopping.is_set():
                n = min(size, count - sent)
                with self.gate:
                    self._send(self.next, n)
                sent += n
                if pause and sent < count:
                    time.sleep(pause)
        finally:
            job.took = time.monotonic() - began
            job.done.set()

    def _send(self, first: int, n: int) -> None:
        messages = [(self.keys[i], self.lines[i]) for i in range(first, first + n)]
        delivered = run_async(kafka_clients.produce(self.settings, messages), timeout=120)
        for i, md in enumerate(delivered, first):
            self.placed[i] = (md.partition, md.offset)
        self.next = first + n

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.error is not None:
                raise HarnessError(f"producing the input failed: {self.error!r}")
            if self.jobs.empty() and (self.finished or self.stopping.is_set()):
                return True
            time.sleep(0.2)
        return False

    def check(self) -> None:
        """After the run: every line produced, else HarnessError."""
        if self.error is not None or not self.finished:
            raise HarnessError(f"the input was not all produced ({self.produced:,} of {len(self.lines):,}): "
                               f"{self.error!r}")
