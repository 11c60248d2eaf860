# The two commands a newcomer needs:  make run  (the main job, end to end)  and  make test  (every test).
# Everything they need is installed by the targets below: a virtualenv in .venv, Kafka's jars in .cache.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: install run test lint unit integration conformance kafka kafka-stop kafka-reset cluster cluster-stop bench \
	bench-scale bench-recovery chaos images clean

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(INSTALLED)

install: $(INSTALLED)

## the main job: a broker (started when none answers), the worker, the sample in, what comes out
run: install
	bash scripts/run.sh

## every test: lint, types, unit and engine tests, conformance, and the integration tests on a real broker;
## the 15 slowest are listed at the end. They run in TEST_JOBS processes side by side (pytest-xdist: the
## integration tests mostly wait, each on its own topics, group, state directory and test hosts; the longest
## are handed out first); TEST_JOBS=1 runs them in this one. The three-broker cluster's tests run after the
## others, alone: they kill, wipe and restart brokers, whose restarts under the load of the others on two
## cores were what failed
TEST_JOBS ?= 4
test: install lint
	$(BIN)/pytest -q -m "not cluster" $(if $(filter-out 1,$(TEST_JOBS)),-n $(TEST_JOBS) --dist loadgroup) \
		--durations=15
	$(BIN)/pytest -q -m cluster --durations=6

lint: install
	$(BIN)/ruff check streams tests scripts
	$(BIN)/mypy

unit: install
	$(BIN)/pytest -q -m "not kafka"

integration: install
	$(BIN)/pytest -q -m kafka

conformance: install
	$(BIN)/python ../shared/conformance/check.py $(BIN)/python
	$(BIN)/python ../shared/conformance/check_customer_ids.py $(BIN)/python

## the benchmark: two ceilings (fire-and-forget and at-least-once passthroughs), stock-Faust baseline, worker,
## the Kafka Streams and Quix Streams peers (bench/peers/; the Kafka Streams jar is built by Maven on first use,
## into .cache/bench-peers/), latency, replay, correctness, the warehouse loader beside a bare consume of the
## worker's outputs (alone: scripts/bench.py --loader-only), and the worker with the persons stage off, on, and
## on without the identity change log at 1M device IDs, side by side, its mapping checked against replay's
## (.cache/bench/last.md; that part alone: .venv/bin/python scripts/bench.py --persons-only)
bench: install
	$(BIN)/python scripts/bench.py

## the scale runs (~18 min, minutes more the first time to generate the inputs; .cache/bench/last-scale.md):
## 1M records over 1M device IDs, 10M devices logged in and then 1M records over them, two workers against
## one; each beside the ceiling, the first also beside the Kafka Streams and Quix Streams peers, with the
## worker's peak RSS, the output checked against replay's
## (BENCH_ARGS=--brokers 127.0.0.1:PORT for a broker elsewhere)
bench-scale: install
	$(BIN)/python scripts/bench.py --scale $(BENCH_ARGS)

## state rebuild and failover: 1M device states rebuilt from the changelog (batched and Faust's own path), then
## kill -9 of one of two workers with and without a standby (.cache/bench-recovery/last.md; RECOVERY_ARGS= adds flags)
RECOVERY_ARGS ?=
bench-recovery: install
	$(BIN)/python scripts/bench_recovery.py $(RECOVERY_ARGS)

## the fault tests; output and state must equal replay's in each delivery mode (GUARANTEES= picks one):
## at-least-once allows identical duplicates, exactly-once none. CHAOS= picks the kinds:
##   single   one worker, 200k records, 24 SIGKILLs and a broker restart
##   group    two workers, either one SIGKILLed at random (12 times), a broker restart under both
##   cluster  the same on the three-broker cluster, one broker SIGKILLed and started again
## and, as root (network namespaces: scripts/testhosts.py):
##   partition  two workers, each on its own test host, 200k records fed at 1,200/s; three times one of them
##              cut off the network for 25 s (longer than the session timeout), then healed
##   pause      the same with the worker stopped (SIGSTOP) for 25 s, then continued (SIGCONT)
GUARANTEES ?= at_least_once exactly_once
CHAOS ?= single group cluster partition pause
GROUP_CHAOS := --group --records 60000 --kills 12
chaos: install
	set -e; for k in $(CHAOS); do for g in $(GUARANTEES); do case $$k in \
	  single) $(BIN)/python scripts/chaos.py --processing-guarantee $$g ;; \
	  group) $(BIN)/python scripts/chaos.py $(GROUP_CHAOS) --processing-guarantee $$g ;; \
	  cluster) $(BIN)/python scripts/chaos.py $(GROUP_CHAOS) --cluster --processing-guarantee $$g ;; \
	  partition|pause) $(BIN)/python scripts/chaos.py --faults $$k --processing-guarantee $$g ;; \
	  *) echo "unknown chaos kind $$k (single, group, cluster, partition, pause)"; exit 2 ;; \
	esac; done; done

kafka:
	bash scripts/kafka.sh start

## the container images with Podman (installs podman, runc, debootstrap and podman-compose when missing)
images: install
	bash scripts/container.sh build

kafka-stop:
	bash scripts/kafka.sh stop

kafka-reset:
	bash scripts/kafka.sh reset

## the three-broker cluster (127.0.0.1:19092,29092,39092) the replication tests and `make chaos` use
cluster:
	bash scripts/kafka.sh cluster-start

cluster-stop:
	bash scripts/kafka.sh cluster-stop

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis data
