"""How the long-running commands set Python's garbage collector.

With the default thresholds the collector sweeps the whole heap, every cached device state included, every
few thousand allocations: measured, a third of the worker's CPU at 100,000 devices. The states are
immutable and hold no reference cycles, so full sweeps are made rare and what start-up built is frozen out
of the collector's way. For processes (the worker, replay), not for a library caller.
"""

from __future__ import annotations

import gc


def tune_gc() -> None:
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)
