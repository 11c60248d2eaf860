"""The harness of scripts/bench.py, scripts/chaos.py and scripts/bench_recovery.py, one role a module.

Shared by all three: inputs (the one raw-input generator), broker (scripts/kafka.sh, topics, loading and
reading them, the children's environment), children (the processes a run starts), report (figures, tables,
the machine and the code a report names).
make bench: bench_run (a run's names, steps and teardown), measure (what a consumer does with a topic),
replay, ceilings (the passthroughs and the peers), latency, digest (outputs compared with replay's), persons
(the stage and the identity change log on and off), bench_loader (the warehouse loader beside a bare consume),
bench_main, bench_scale.
make chaos: chaos_run (a run's log, findings, worker lives, offsets and cleanup), feeder (the input while the
workers run), reference (replay's outputs and states), checks, chaos_single, chaos_group, chaos_faults,
chaos_report.
make bench-recovery: recovery (the states, the worker, the output watch).

The entry points put scripts/ on the path (it is the directory of the script that runs), so `import harness`
finds this package; mypy finds it the same way (scripts/ has no __init__.py: it is the package's base).
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
