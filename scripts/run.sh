#!/usr/bin/env bash
# make run: the main job end to end on this machine. Starts a broker when none answers, creates the topics,
# starts the worker, sends the sample (the seed's sessions and a few bad records) to the raw topic, and
# prints what arrives on the enriched, dead-letter and persons topics; then stops the worker, loads this run's
# topics into a DuckDB file and prints events per person from it. Leaves the broker running.
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
run_dir=.cache/run
mkdir -p "$run_dir"

started_broker=0
if ! bash scripts/kafka.sh status >/dev/null 2>&1; then
  bash scripts/kafka.sh start
  started_broker=1
fi

# a fresh set of topics and state per run, so the output shows this run's sample and nothing older
stamp=$(date +%Y%m%d%H%M%S)
export STREAMS_RAW_TOPIC="${STREAMS_RAW_TOPIC:-demo-$stamp.raw}"
export STREAMS_ENRICHED_TOPIC="${STREAMS_ENRICHED_TOPIC:-demo-$stamp.enriched}"
export STREAMS_DEAD_LETTER_TOPIC="${STREAMS_DEAD_LETTER_TOPIC:-demo-$stamp.dead-letter}"
export STREAMS_PERSONS_TOPIC="${STREAMS_PERSONS_TOPIC:-demo-$stamp.persons}"
export STREAMS_IDENTITY_CHANGES_TOPIC="${STREAMS_IDENTITY_CHANGES_TOPIC:-demo-$stamp.identity-changes}"
export STREAMS_GROUP="${STREAMS_GROUP:-demo-$stamp}"
export STREAMS_STATE_DIR="${STREAMS_STATE_DIR:-$run_dir/state-$stamp}"
export STREAMS_WEB_PORT="${STREAMS_WEB_PORT:-6066}"

echo "== sending the sample to $STREAMS_RAW_TOPIC"
$py -m streams produce

echo "== starting the worker (log: $run_dir/worker.log)"
$py -m streams worker --log-level info >"$run_dir/worker.log" 2>&1 &
worker=$!
trap 'kill -TERM $worker 2>/dev/null; wait $worker 2>/dev/null || true' EXIT

echo "== enriched records on $STREAMS_ENRICHED_TOPIC"
$py -m streams tail enriched --max 23 --idle-timeout 120
echo
echo "== dead letters on $STREAMS_DEAD_LETTER_TOPIC"
$py -m streams tail dead-letter --max 7 --idle-timeout 30
echo
echo "== persons mapping on $STREAMS_PERSONS_TOPIC (device users -> the login users they belong to)"
$py -m streams tail persons --max 5 --idle-timeout 30
echo

# SIGTERM: the worker finishes its batch and commits, so the load below reads all that it wrote
echo "== stopping the worker"
kill -TERM $worker 2>/dev/null || true
wait $worker || true
trap - EXIT

warehouse="$run_dir/warehouse-$stamp.duckdb"
echo "== loading this run's topics into $warehouse"
$py -m streams load --into "$warehouse"
echo
echo "== events per person (events_with_person): a person's devices in one row"
$py - "$warehouse" <<'PY'
import sys

import duckdb

with duckdb.connect(sys.argv[1], read_only=True) as con:
    rows = con.execute("SELECT person_id, COUNT(*) AS events, COUNT(DISTINCT device_id) AS devices, "
                       "MAX(login_id) AS login_id FROM events_with_person "
                       "GROUP BY person_id ORDER BY events DESC, person_id").fetchall()
print(f"{'person_id':<36}  events  devices  login_id")
for person, events, devices, login in rows:
    print(f"{person:<36}  {events:>6}  {devices:>7}  {login or ''}".rstrip())
PY
echo
echo "== done: the broker keeps running (make kafka-stop stops it)"
[ "$started_broker" = 1 ] && echo "   (this run started the broker)"
exit 0
