#!/usr/bin/env bash
# Local single-node Apache Kafka (KRaft, combined broker + controller) for
# development, tests and CI.
#
# Without Docker the broker runs straight from Kafka's jars on Maven Central,
# so a clean machine only needs Java 17 and Maven. When a Docker engine
# answers, the same subcommands drive docker-compose.yml instead.
#
# Usage: scripts/kafka.sh <command> [args]
#   install            download the broker jars into the cache (idempotent)
#   start              install if needed, format storage once, start, wait
#   stop               stop the broker started by `start` (idempotent)
#   status             exit 0 if the broker answers, 1 otherwise
#   restart            stop, then start (data is kept)
#   reset              stop and delete the data directory (jars are kept)
#   topics ARGS...     kafka-topics with --bootstrap-server filled in
#
# A three-node cluster (KRaft, each node broker + controller, jars only) for
# replication tests; its own ports and data, independent of the single node:
#   cluster-start          format once (one cluster id), start all, wait
#   cluster-stop           stop all nodes (SIGTERM, SIGKILL after a while)
#   cluster-status         one line per node; exit 0 only if all answer
#   cluster-brokers        print the bootstrap list (host:port,...)
#   cluster-kill N         SIGKILL node N (1-3), as a crash would
#   cluster-stop-node N    stop node N cleanly (SIGTERM)
#   cluster-start-node N   start node N (formatted again if wiped), wait
#   cluster-wipe-node N    SIGKILL node N and delete its data (a lost disk)
#   cluster-reset          stop all nodes and delete the cluster's data
#
# Environment (defaults in brackets):
#   KAFKA_CACHE            jar cache root            [<repo>/.cache/kafka]
#   KAFKA_DATA             config, logs, pid, data   [<repo>/.cache/kafka/data]
#   KAFKA_PORT             PLAINTEXT listener        [9092]
#   KAFKA_SASL_PORT        SASL_PLAINTEXT listener   [9094]
#   KAFKA_CONTROLLER_PORT  KRaft controller listener [9093]
#   KAFKA_HEAP_OPTS        broker heap               [-Xmx1G -Xms1G]
#   KAFKA_OPTS             extra broker JVM flags    []
#   KAFKA_START_TIMEOUT    seconds to wait for start [90]
#   KAFKA_STOP_TIMEOUT     seconds before SIGKILL    [30]
#   KAFKA_RUNTIME          auto | jar | docker       [auto]
#   KAFKA_CLUSTER_DATA     the cluster's data root   [<repo>/.cache/kafka/cluster]
#   KAFKA_CLUSTER_PORTS    nodes' PLAINTEXT ports    [19092 29092 39092]
#                          (each node's controller listens on its port + 1)
#   KAFKA_CLUSTER_HEAP_OPTS  heap per node           [-Xmx512m -Xms512m]
#   KAFKA_TESTHOST_ADDRESS the test hosts' listener  [192.0.2.1]
#   KAFKA_TESTHOST_PORT    its port                  [9096]
#
# Every listener binds 127.0.0.1 only (with Docker too: the compose file's
# services use the host's network), but one: as root, the single node also
# listens on KAFKA_TESTHOST_ADDRESS, an address of TEST-NET-1 added to the
# loopback interface, which the test hosts (network namespaces that the
# network-fault tests make, scripts/testhosts.py) reach through their veth
# link. No one else's host is there: the address exists only on this machine. SASL_PLAINTEXT accepts PLAIN, SCRAM-SHA-256 and
# SCRAM-SHA-512 for user "streams" / "streams-secret".
#
# With Docker, `start` starts only the kafka service of docker-compose.yml;
# `stop` and `reset` take the whole compose stack down (the worker too, if it
# was started with `docker compose up`).

set -euo pipefail

readonly KAFKA_VERSION=4.3.1
readonly SCALA_VERSION=2.13
# Pinned so the resolution does not depend on whatever plugin version the
# installed Maven defaults to.
readonly DEPENDENCY_PLUGIN_VERSION=3.8.1

readonly HOST=127.0.0.1
readonly SASL_USER=streams
readonly SASL_PASSWORD=streams-secret

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT
readonly CACHE_DIR="${KAFKA_CACHE:-$REPO_ROOT/.cache/kafka}"
readonly VERSION_DIR="$CACHE_DIR/$KAFKA_VERSION"
readonly LIB_DIR="$VERSION_DIR/libs"
readonly DATA_DIR="${KAFKA_DATA:-$REPO_ROOT/.cache/kafka/data}"
readonly PORT="${KAFKA_PORT:-9092}"
readonly SASL_PORT="${KAFKA_SASL_PORT:-9094}"
readonly CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-9093}"
readonly START_TIMEOUT="${KAFKA_START_TIMEOUT:-90}"
readonly STOP_TIMEOUT="${KAFKA_STOP_TIMEOUT:-30}"
readonly BOOTSTRAP="$HOST:$PORT"
readonly TESTHOST_ADDRESS="${KAFKA_TESTHOST_ADDRESS:-192.0.2.1}"
readonly TESTHOST_PORT="${KAFKA_TESTHOST_PORT:-9096}"

readonly PID_FILE="$DATA_DIR/kafka.pid"
readonly SERVER_PROPS="$DATA_DIR/server.properties"
readonly CLIENT_PROPS="$DATA_DIR/client.properties"
readonly SERVER_LOG4J="$DATA_DIR/log4j2.properties"
readonly TOOLS_LOG4J="$DATA_DIR/tools-log4j2.properties"
readonly SERVER_LOG="$DATA_DIR/server.log"
readonly STDOUT_LOG="$DATA_DIR/kafka.out"
readonly LOG_DIR="$DATA_DIR/logs"

# Main classes inside the jars (what bin/kafka-*.sh would run).
readonly MAIN_BROKER=kafka.Kafka
readonly MAIN_STORAGE=kafka.tools.StorageTool
readonly MAIN_TOPICS=org.apache.kafka.tools.TopicCommand

# Inside the container the image ships the usual bin/ scripts.
readonly COMPOSE_FILE="$REPO_ROOT/docker-compose.yml"
readonly CONTAINER_BIN=/opt/kafka/bin

log() { printf 'kafka: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }
# usage, and run_command: a subcommand runs its cmd_* function
# shellcheck source=scripts/lib.sh
source "$REPO_ROOT/scripts/lib.sh"

# --------------------------------------------------------------------------
# Runtime selection
# --------------------------------------------------------------------------

# Docker is used only when an engine really answers (a bare CLI is not
# enough) and the compose plugin is present; otherwise the jars run. Decided
# once per invocation: the readiness loop asks many times.
RUNTIME=""
use_docker() {
    if [[ -z "$RUNTIME" ]]; then
        case "${KAFKA_RUNTIME:-auto}" in
            jar | docker) RUNTIME="$KAFKA_RUNTIME" ;;
            auto)
                if command -v docker >/dev/null 2>&1 \
                    && docker info >/dev/null 2>&1 \
                    && docker compose version >/dev/null 2>&1; then
                    RUNTIME=docker
                else
                    RUNTIME=jar
                fi
                ;;
            *) die "KAFKA_RUNTIME must be auto, jar or docker (got '${KAFKA_RUNTIME}')" ;;
        esac
    fi
    [[ "$RUNTIME" == docker ]]
}

compose() { docker compose -f "$COMPOSE_FILE" "$@"; }

# --------------------------------------------------------------------------
# install: jars from Maven Central
# --------------------------------------------------------------------------

is_installed() { [[ -f "$LIB_DIR/.complete" ]]; }

# A throwaway POM whose only purpose is to let Maven resolve Kafka's runtime
# classpath. kafka-tools (TopicCommand) is added without its Connect/Jetty
# dependencies, which only the Connect-related tools need; everything else it
# uses is already on the broker's classpath. Extra dependencies (the log4j
# SLF4J binding) are passed as "groupId:artifactId:version" arguments.
write_pom() {
    local pom="$1"; shift
    local extra="" gav g a v
    for gav in "$@"; do
        IFS=: read -r g a v <<<"$gav"
        extra+="    <dependency><groupId>$g</groupId><artifactId>$a</artifactId><version>$v</version></dependency>"$'\n'
    done
    cat >"$pom" <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.kafka</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>$KAFKA_VERSION</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_$SCALA_VERSION</artifactId>
      <version>$KAFKA_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka-tools</artifactId>
      <version>$KAFKA_VERSION</version>
      <exclusions>
        <exclusion><groupId>org.apache.kafka</groupId><artifactId>connect-runtime</artifactId></exclusion>
        <exclusion><groupId>com.fasterxml.jackson.jakarta.rs</groupId><artifactId>*</artifactId></exclusion>
      </exclusions>
    </dependency>
$extra  </dependencies>
  <build>
    <plugins>
      <plugin>
        <groupId>org.apache.maven.plugins</groupId>
        <artifactId>maven-dependency-plugin</artifactId>
        <version>$DEPENDENCY_PLUGIN_VERSION</version>
      </plugin>
    </plugins>
  </build>
</project>
EOF
}

# Maven's output goes to a log that is shown only on failure (even -q leaves
# stray ANSI codes on stdout).
copy_dependencies() {
    local pom="$1" out="$2" mvn_log="$VERSION_DIR/mvn.log"
    if ! mvn -q -B -f "$pom" dependency:copy-dependencies \
        -DincludeScope=runtime -DoutputDirectory="$out" >"$mvn_log" 2>&1; then
        cat "$mvn_log" >&2
        die "mvn could not resolve Kafka $KAFKA_VERSION (log: $mvn_log)"
    fi
}

# Version of a jar in $1 named "<artifact>-<version>.jar", or nothing.
jar_version() {
    local dir="$1" artifact="$2" jar
    for jar in "$dir/$artifact"-[0-9]*.jar; do
        [[ -e "$jar" ]] || continue
        jar="${jar##*/}"; jar="${jar#"$artifact"-}"; printf '%s\n' "${jar%.jar}"
        return 0
    done
}

cmd_install() {
    # One install at a time: the test processes start the single broker and the cluster side by side, and a
    # second install would delete the jars a node just launched by the first one is loading
    mkdir -p "$CACHE_DIR"
    exec 9>"$CACHE_DIR/install.lock"
    flock 9
    if is_installed; then
        log "Kafka $KAFKA_VERSION already installed in $LIB_DIR"
        return 0
    fi
    command -v java >/dev/null 2>&1 || die "java not found (Java 17+ is required)"
    command -v mvn >/dev/null 2>&1 || die "mvn not found (Maven resolves the Kafka jars)"

    log "installing Kafka $KAFKA_VERSION into $LIB_DIR"
    local started=$SECONDS
    mkdir -p "$VERSION_DIR"
    # Resolve into a scratch directory and rename at the end, so an
    # interrupted install never looks complete.
    local tmp="$VERSION_DIR/libs.partial"
    rm -rf "$tmp"

    # Pass 1: Kafka itself. It brings log4j-core but no SLF4J binding, and
    # Kafka logs through SLF4J, so without a binding the broker logs nothing.
    local pom="$VERSION_DIR/pom.xml"
    write_pom "$pom"
    copy_dependencies "$pom" "$tmp"

    # Pass 2: the log4j binding matching the SLF4J API Kafka ships (1.x uses
    # log4j-slf4j-impl, 2.x log4j-slf4j2-impl) at Kafka's log4j version.
    local log4j slf4j binding
    log4j="$(jar_version "$tmp" log4j-core)"
    slf4j="$(jar_version "$tmp" slf4j-api)"
    [[ -n "$log4j" && -n "$slf4j" ]] || die "log4j-core or slf4j-api missing from Kafka's dependencies"
    case "$slf4j" in
        1.*) binding="log4j-slf4j-impl" ;;
        *) binding="log4j-slf4j2-impl" ;;
    esac
    write_pom "$pom" "org.apache.logging.log4j:$binding:$log4j"
    copy_dependencies "$pom" "$tmp"

    # The binding must not drag in a second slf4j-api or log4j version.
    local n
    n="$(find "$tmp" -name 'slf4j-api-*.jar' | wc -l)"
    [[ "$n" -eq 1 ]] || die "expected one slf4j-api jar, found $n"

    touch "$tmp/.complete"
    rm -rf "$LIB_DIR"
    mv "$tmp" "$LIB_DIR"
    log "installed $(find "$LIB_DIR" -name '*.jar' | wc -l) jars ($(du -sh "$LIB_DIR" | cut -f1)) in $((SECONDS - started))s; $binding $log4j for slf4j $slf4j"
}

# (An if, not "is_installed || cmd_install": bash ignores set -e inside a
# function that runs on the left of || or &&.)
ensure_installed() {
    if ! is_installed; then cmd_install; fi
}

# --------------------------------------------------------------------------
# Java helpers
# --------------------------------------------------------------------------

classpath() {
    local jars=("$LIB_DIR"/*.jar)
    local IFS=:
    printf '%s' "${jars[*]}"
}

# The java command line for short-lived tools, in the TOOL_JAVA array: small
# heap, C1 only (starts faster), log warnings only and to stderr, so their
# stdout stays parseable.
tool_java() {
    write_tools_log4j
    TOOL_JAVA=(
        java -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1
        -Djava.awt.headless=true
        -Dlog4j2.configurationFile="$TOOLS_LOG4J"
        -cp "$(classpath)"
    )
}

# run_tool MAIN_CLASS ARGS...
run_tool() {
    tool_java
    "${TOOL_JAVA[@]}" "$@"
}

write_tools_log4j() {
    [[ -f "$TOOLS_LOG4J" ]] && return 0
    mkdir -p "$DATA_DIR"
    cat >"$TOOLS_LOG4J" <<'EOF'
status = warn
appender.stderr.type = Console
appender.stderr.name = STDERR
appender.stderr.target = SYSTEM_ERR
appender.stderr.layout.type = PatternLayout
appender.stderr.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.stderr.ref = STDERR
EOF
}

# --------------------------------------------------------------------------
# Broker configuration
# --------------------------------------------------------------------------

# As root: the test hosts' address on the loopback interface (kept if there);
# prints the listener to add, or nothing where it cannot be had.
testhost_listener() {
    [[ "$(id -u)" == 0 ]] && command -v ip >/dev/null 2>&1 || return 0
    if ! ip -4 addr show dev lo | grep -q "inet $TESTHOST_ADDRESS/"; then
        ip addr add "$TESTHOST_ADDRESS/32" dev lo 2>/dev/null || return 0
    fi
    printf ',TESTHOSTS://%s:%s' "$TESTHOST_ADDRESS" "$TESTHOST_PORT"
}

write_server_properties() {
    mkdir -p "$DATA_DIR"
    local testhosts
    testhosts="$(testhost_listener)"
    cat >"$SERVER_PROPS" <<EOF
# Written by scripts/kafka.sh on every start; edits are overwritten.

# KRaft, one process acting as broker and controller. The quorum is a
# single-node dynamic quorum created by "StorageTool format --standalone".
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=$HOST:$CONTROLLER_PORT
controller.listener.names=CONTROLLER

# Loopback only (and, as root, the test hosts' address: see the top).
listeners=PLAINTEXT://$HOST:$PORT,CONTROLLER://$HOST:$CONTROLLER_PORT,SASL_PLAINTEXT://$HOST:$SASL_PORT$testhosts
advertised.listeners=PLAINTEXT://$HOST:$PORT,SASL_PLAINTEXT://$HOST:$SASL_PORT$testhosts
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT,TESTHOSTS:PLAINTEXT
inter.broker.listener.name=PLAINTEXT

# SASL on its own listener. PLAIN users live in the JAAS line; SCRAM users
# are stored in the metadata log (created by "format --add-scram"). Every
# enabled mechanism needs a JAAS entry on the listener.
sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-256,SCRAM-SHA-512
listener.name.sasl_plaintext.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required user_$SASL_USER="$SASL_PASSWORD";
listener.name.sasl_plaintext.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;

EOF
    # One node: every internal topic has a single replica.
    broker_defaults 1 1 "$LOG_DIR" >>"$SERVER_PROPS"
}

# broker_defaults RF MIN_ISR LOG_DIR: what every broker here is configured
# with, its internal topics on RF nodes with MIN_ISR in sync.
broker_defaults() {
    cat <<EOF

# The internal topics. Creating the default 50 partitions of them on first
# use costs seconds on a development machine; a handful is plenty here.
offsets.topic.replication.factor=$1
transaction.state.log.replication.factor=$1
transaction.state.log.min.isr=$2
share.coordinator.state.topic.replication.factor=$1
share.coordinator.state.topic.min.isr=$2
offsets.topic.num.partitions=4
transaction.state.log.num.partitions=4

# Consumers join at once instead of waiting for more members.
group.initial.rebalance.delay.ms=0
num.partitions=1
# Topics are created explicitly (scripts/kafka.sh topics --create ...).
auto.create.topics.enable=false

log.dir=$3
EOF
}

# write_log4j FILE LOG BACKUPS: a broker's log4j2 configuration, its log in
# LOG, rolled over at 50 MB, BACKUPS old ones kept.
write_log4j() {
    cat >"$1" <<EOF
status = warn
appender.file.type = RollingFile
appender.file.name = FILE
appender.file.fileName = $2
appender.file.filePattern = $2.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 50MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = $3
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
EOF
}

write_server_log4j() {
    mkdir -p "$DATA_DIR"
    write_log4j "$SERVER_LOG4J" "$SERVER_LOG" 3
}

# The client side of the readiness probe: fail fast instead of the admin
# client's default 60 s while the broker is still coming up.
write_client_properties() {
    mkdir -p "$DATA_DIR"
    cat >"$CLIENT_PROPS" <<'EOF'
request.timeout.ms=5000
default.api.timeout.ms=10000
EOF
}

# A Kafka cluster id is 16 random bytes in unpadded base64url. Kafka avoids
# ids starting with "-" because command lines would read them as options.
new_cluster_id() {
    local id
    while :; do
        id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"
        [[ "$id" != -* ]] && break
    done
    printf '%s\n' "$id"
}

# Format the log dir once. SCRAM credentials can be written into the initial
# metadata here, so no running broker is needed to create the users.
format_storage_once() {
    [[ -f "$LOG_DIR/meta.properties" ]] && return 0
    local cluster_id
    cluster_id="$(new_cluster_id)"
    log "formatting $LOG_DIR (cluster id $cluster_id)"
    run_tool "$MAIN_STORAGE" format --standalone \
        -t "$cluster_id" -c "$SERVER_PROPS" \
        --add-scram "SCRAM-SHA-256=[name=$SASL_USER,password=$SASL_PASSWORD]" \
        --add-scram "SCRAM-SHA-512=[name=$SASL_USER,password=$SASL_PASSWORD]" \
        >/dev/null
}

# --------------------------------------------------------------------------
# Process and readiness helpers
# --------------------------------------------------------------------------

# Is anything accepting TCP connections on the port? (bash's /dev/tcp, so no
# nc/ss needed.)
port_open() {
    (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null
}

# The pid in the pid file, if that process is still our broker. Checking the
# command line guards against a recycled pid.
broker_pid() { pid_of "$PID_FILE" "$SERVER_PROPS"; }

# pid_of PID_FILE PROPERTIES: the pid in PID_FILE, if that process runs and
# is a broker on PROPERTIES (the command line guards against a recycled pid).
pid_of() {
    [[ -f "$1" ]] || return 1
    local pid
    pid="$(<"$1")"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    if [[ -r "/proc/$pid/cmdline" ]]; then
        tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$MAIN_BROKER $2" || return 1
    fi
    printf '%s\n' "$pid"
}

# The broker "answers" when it serves metadata, not merely when the port is
# open: list topics through the admin API.
broker_answers() {
    if use_docker; then
        compose exec -T kafka "$CONTAINER_BIN/kafka-topics.sh" \
            --bootstrap-server "$BOOTSTRAP" --list >/dev/null 2>&1
        return
    fi
    lists_topics "$PORT"
}

# lists_topics PORT: the broker of the jars on PORT lists its topics.
lists_topics() {
    port_open "$1" || return 1
    is_installed || return 1
    write_client_properties
    tool_java
    # Hard stop in case the admin client hangs regardless of its timeouts.
    local limit=()
    command -v timeout >/dev/null 2>&1 && limit=(timeout 30)
    "${limit[@]}" "${TOOL_JAVA[@]}" "$MAIN_TOPICS" --bootstrap-server "$HOST:$1" \
        --command-config "$CLIENT_PROPS" --list >/dev/null 2>&1
}

# On a failed start: the errors first (the tail alone is often just the
# broker's config dump), then the end of each log.
print_log_tail() {
    local f
    if [[ -s "$SERVER_LOG" ]] && grep -q -E '^\[[^]]*\] (ERROR|FATAL) ' "$SERVER_LOG"; then
        log "---- errors in $SERVER_LOG ----"
        grep -E '^\[[^]]*\] (ERROR|FATAL) ' "$SERVER_LOG" | tail -n 10 >&2
    fi
    for f in "$SERVER_LOG" "$STDOUT_LOG"; do
        [[ -s "$f" ]] || continue
        log "---- last lines of $f ----"
        tail -n 30 "$f" >&2
    done
}

# Poll until the broker answers; $1 is the pid to watch (empty for Docker).
wait_until_ready() {
    local pid="${1:-}" deadline=$((SECONDS + START_TIMEOUT))
    while ((SECONDS < deadline)); do
        if [[ -n "$pid" ]] && ! kill -0 "$pid" 2>/dev/null; then
            log "broker process $pid exited during startup"
            print_log_tail
            return 1
        fi
        broker_answers && return 0
        sleep 0.5
    done
    log "broker did not answer on $BOOTSTRAP within ${START_TIMEOUT}s"
    if use_docker; then
        compose logs --tail 40 kafka >&2 || true
    else
        print_log_tail
    fi
    return 1
}

# --------------------------------------------------------------------------
# Subcommands
# --------------------------------------------------------------------------

cmd_start() {
    local started=$SECONDS
    if use_docker; then
        start_docker
    else
        start_jar
    fi
    log "up on $BOOTSTRAP (SASL_PLAINTEXT on $HOST:$SASL_PORT) after $((SECONDS - started))s"
}

start_jar() {
    local pid
    if pid="$(broker_pid)"; then
        # Possibly still starting (e.g. a parallel start): wait for it too.
        log "already running (pid $pid), waiting until it answers"
        wait_until_ready "$pid" || exit 1
        return 0
    fi
    if port_open "$PORT"; then
        log "something already answers on $BOOTSTRAP; not starting another broker"
        exit 0
    fi
    ensure_installed

    write_server_properties
    write_server_log4j
    format_storage_once

    local heap_opts extra_opts
    read -r -a heap_opts <<<"${KAFKA_HEAP_OPTS:--Xmx1G -Xms1G}"
    read -r -a extra_opts <<<"${KAFKA_OPTS:-}"
    local jvm_opts=(
        "${heap_opts[@]}"
        # The GC settings Kafka's own start script uses.
        -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35
        -XX:+ExplicitGCInvokesConcurrent
        -Djava.awt.headless=true
        -Dkafka.logs.dir="$DATA_DIR"
        -Dlog4j2.configurationFile="$SERVER_LOG4J"
        "${extra_opts[@]}"
    )

    # nohup + own stdin/stdout: the broker outlives this shell and never
    # holds the caller's terminal or pipes open.
    nohup java "${jvm_opts[@]}" -cp "$(classpath)" "$MAIN_BROKER" "$SERVER_PROPS" \
        </dev/null >"$STDOUT_LOG" 2>&1 &
    pid=$!
    printf '%s\n' "$pid" >"$PID_FILE"
    log "started pid $pid, waiting up to ${START_TIMEOUT}s (log: $SERVER_LOG)"

    if ! wait_until_ready "$pid"; then
        stop_pid "$pid"
        rm -f "$PID_FILE"
        exit 1
    fi
}

start_docker() {
    if ! broker_answers && port_open "$PORT"; then
        log "something already answers on $BOOTSTRAP; not starting another broker"
        exit 0
    fi
    log "Docker engine found: starting the kafka service from $COMPOSE_FILE"
    compose up -d kafka
    wait_until_ready || exit 1
    # The image formats its storage itself, without SCRAM users, so they are
    # added through the admin API. Idempotent (it overwrites the same secret);
    # one call per mechanism because the broker rejects a request that alters
    # the same user twice.
    local mechanism
    for mechanism in SCRAM-SHA-256 SCRAM-SHA-512; do
        compose exec -T kafka "$CONTAINER_BIN/kafka-configs.sh" \
            --bootstrap-server "$BOOTSTRAP" --alter --entity-type users --entity-name "$SASL_USER" \
            --add-config "$mechanism=[password=$SASL_PASSWORD]" >/dev/null
    done
}

# SIGTERM lets Kafka shut down cleanly (next start skips log recovery);
# SIGKILL only if it hangs.
stop_pid() {
    local pid="$1" deadline=$((SECONDS + STOP_TIMEOUT))
    kill -TERM "$pid" 2>/dev/null || return 0
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            log "pid $pid still running after ${STOP_TIMEOUT}s, sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.2
    done
    # Reap it if it is our own child (start failed in this shell).
    wait "$pid" 2>/dev/null || true
}

cmd_stop() {
    if use_docker; then
        compose down
        return
    fi
    local pid
    if pid="$(broker_pid)"; then
        log "stopping pid $pid"
        stop_pid "$pid"
        log "stopped"
    elif port_open "$PORT"; then
        log "$BOOTSTRAP is served by a process this script did not start; leaving it alone"
    else
        log "not running"
    fi
    rm -f "$PID_FILE"
}

cmd_status() {
    if broker_answers; then
        printf 'kafka: up on %s\n' "$BOOTSTRAP"
        return 0
    fi
    printf 'kafka: down on %s\n' "$BOOTSTRAP"
    return 1
}

cmd_restart() {
    cmd_stop
    cmd_start
}

cmd_reset() {
    cmd_stop
    if use_docker; then
        compose down -v
        return
    fi
    # Refuse obviously wrong targets before rm -rf.
    case "$DATA_DIR" in
        "" | / | "$REPO_ROOT" | "$HOME" | "$CACHE_DIR" | "$VERSION_DIR" | "$LIB_DIR")
            die "refusing to delete KAFKA_DATA=$DATA_DIR" ;;
    esac
    rm -rf "$DATA_DIR"
    log "deleted $DATA_DIR"
}

cmd_topics() {
    if use_docker; then
        compose exec -T kafka "$CONTAINER_BIN/kafka-topics.sh" --bootstrap-server "$BOOTSTRAP" "$@"
        return
    fi
    ensure_installed
    run_tool "$MAIN_TOPICS" --bootstrap-server "$BOOTSTRAP" "$@"
}

# --------------------------------------------------------------------------
# The three-node cluster
# --------------------------------------------------------------------------

# Three combined broker + controller nodes on loopback with a static quorum
# of all three: replication factor 3 and min ISR 2 by default and for the
# internal topics, so any one node can die without losing an acknowledged
# write (acks=all) and without stopping writes. Always run from the jars.
readonly CLUSTER_DIR="${KAFKA_CLUSTER_DATA:-$REPO_ROOT/.cache/kafka/cluster}"
read -r -a CLUSTER_PORTS <<<"${KAFKA_CLUSTER_PORTS:-19092 29092 39092}"
readonly CLUSTER_PORTS
readonly CLUSTER_NODES=${#CLUSTER_PORTS[@]}

node_dir() { printf '%s/node%s\n' "$CLUSTER_DIR" "$1"; }
node_port() { printf '%s\n' "${CLUSTER_PORTS[$(($1 - 1))]}"; }
node_cport() { printf '%s\n' "$(($(node_port "$1") + 1))"; }

cluster_brokers() {
    local n out=()
    for ((n = 1; n <= CLUSTER_NODES; n++)); do out+=("$HOST:$(node_port "$n")"); done
    local IFS=,
    printf '%s\n' "${out[*]}"
}

check_node() {
    [[ "${1:-}" =~ ^[0-9]+$ ]] && (($1 >= 1 && $1 <= CLUSTER_NODES)) \
        || die "a node number from 1 to $CLUSTER_NODES is needed (got '${1:-}')"
}

write_node_config() {
    local n="$1" dir port cport voters="" i
    dir="$(node_dir "$n")"; port="$(node_port "$n")"; cport="$(node_cport "$n")"
    for ((i = 1; i <= CLUSTER_NODES; i++)); do
        voters+="${voters:+,}$i@$HOST:$(node_cport "$i")"
    done
    mkdir -p "$dir"
    cat >"$dir/server.properties" <<EOF
# Written by scripts/kafka.sh on every start of node $n; edits are overwritten.
process.roles=broker,controller
node.id=$n
# A static quorum: every node votes, any two make a majority.
controller.quorum.voters=$voters
controller.listener.names=CONTROLLER
listeners=PLAINTEXT://$HOST:$port,CONTROLLER://$HOST:$cport
advertised.listeners=PLAINTEXT://$HOST:$port
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
inter.broker.listener.name=PLAINTEXT

# What a production cluster of three has: every topic on all three nodes,
# an acks=all write acknowledged once two of them hold it.
default.replication.factor=3
min.insync.replicas=2
unclean.leader.election.enable=false
EOF
    broker_defaults 3 2 "$dir/logs" >>"$dir/server.properties"
    write_log4j "$dir/log4j2.properties" "$dir/server.log" 2
}

# The pid of node N, if it runs (the command line guards against a recycled pid).
node_pid() {
    local dir
    dir="$(node_dir "$1")"
    pid_of "$dir/kafka.pid" "$dir/server.properties"
}

node_answers() { lists_topics "$(node_port "$1")"; }

# One cluster id for all nodes, kept beside them: a wiped node is formatted
# again with it and rejoins, fetching the metadata log and its replicas.
cluster_id() {
    local file="$CLUSTER_DIR/cluster.id"
    mkdir -p "$CLUSTER_DIR"
    [[ -s "$file" ]] || new_cluster_id >"$file"
    printf '%s\n' "$(<"$file")"
}

format_node_once() {
    local n="$1" dir id
    dir="$(node_dir "$n")"
    [[ -f "$dir/logs/meta.properties" ]] && return 0
    id="$(cluster_id)"
    log "node $n: formatting $dir/logs (cluster id $id)"
    run_tool "$MAIN_STORAGE" format -t "$id" -c "$dir/server.properties" >/dev/null
}

# Start node N without waiting for it.
launch_node() {
    local n="$1" dir pid
    dir="$(node_dir "$n")"
    if pid="$(node_pid "$n")"; then
        log "node $n already running (pid $pid)"
        return 0
    fi
    if port_open "$(node_port "$n")"; then
        die "port $(node_port "$n") of node $n is taken by a process this script did not start"
    fi
    write_node_config "$n"
    format_node_once "$n"
    local heap_opts
    read -r -a heap_opts <<<"${KAFKA_CLUSTER_HEAP_OPTS:--Xmx512m -Xms512m}"
    nohup java "${heap_opts[@]}" \
        -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 \
        -XX:+ExplicitGCInvokesConcurrent -Djava.awt.headless=true \
        -Dkafka.logs.dir="$dir" -Dlog4j2.configurationFile="$dir/log4j2.properties" \
        -cp "$(classpath)" "$MAIN_BROKER" "$dir/server.properties" \
        </dev/null >"$dir/kafka.out" 2>&1 &
    printf '%s\n' "$!" >"$dir/kafka.pid"
    log "node $n: started pid $! on $HOST:$(node_port "$n") (log: $dir/server.log)"
}

wait_node_ready() {
    local n="$1" deadline=$((SECONDS + START_TIMEOUT)) pid
    # the pid file's process, not node_pid: right after the launch the child may not have exec'd java yet
    # (its command line is still this script's), which is no exit. A node found running already may have lost
    # its pid file since (killed meanwhile): then only its answer counts
    pid="$(cat "$(node_dir "$n")/kafka.pid" 2>/dev/null || true)"
    while ((SECONDS < deadline)); do
        if [[ -n "$pid" ]] && ! kill -0 "$pid" 2>/dev/null; then
            log "node $n exited during startup"
            tail -n 30 "$(node_dir "$n")/kafka.out" "$(node_dir "$n")/server.log" >&2 2>/dev/null || true
            return 1
        fi
        node_answers "$n" && return 0
        sleep 0.5
    done
    log "node $n did not answer on $HOST:$(node_port "$n") within ${START_TIMEOUT}s"
    return 1
}

cmd_cluster_start() {
    local started=$SECONDS n
    ensure_installed
    mkdir -p "$DATA_DIR"  # the tools' log config lives there
    for ((n = 1; n <= CLUSTER_NODES; n++)); do launch_node "$n"; done
    # a node answers only once a quorum has formed: all start before any is waited for
    for ((n = 1; n <= CLUSTER_NODES; n++)); do wait_node_ready "$n" || exit 1; done
    log "cluster up on $(cluster_brokers) after $((SECONDS - started))s"
}

stop_node() {
    local n="$1" pid
    if pid="$(node_pid "$n")"; then
        stop_pid "$pid"
        log "node $n stopped"
    fi
    rm -f "$(node_dir "$n")/kafka.pid"
}

cmd_cluster_stop() {
    local n pid running=()
    # SIGTERM to all at once: one node shutting down alone first hands its
    # leaderships over, which takes the others being up
    for ((n = 1; n <= CLUSTER_NODES; n++)); do
        if pid="$(node_pid "$n")"; then
            kill -TERM "$pid" 2>/dev/null || true
            running+=("$n")
        fi
    done
    for n in "${running[@]}"; do stop_node "$n"; done
    log "cluster stopped"
}

cmd_cluster_status() {
    local n up=0
    for ((n = 1; n <= CLUSTER_NODES; n++)); do
        if node_answers "$n"; then
            printf 'node %s: up on %s:%s\n' "$n" "$HOST" "$(node_port "$n")"
            up=$((up + 1))
        else
            printf 'node %s: down on %s:%s\n' "$n" "$HOST" "$(node_port "$n")"
        fi
    done
    ((up == CLUSTER_NODES))
}

cmd_cluster_kill() {
    check_node "${1:-}"
    local pid
    if pid="$(node_pid "$1")"; then
        kill -KILL "$pid"
        while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
        log "node $1 killed (pid $pid)"
    else
        log "node $1 is not running"
    fi
    rm -f "$(node_dir "$1")/kafka.pid"
}

cmd_cluster_start_node() {
    check_node "${1:-}"
    ensure_installed
    mkdir -p "$DATA_DIR"
    launch_node "$1"
    wait_node_ready "$1" || exit 1
    log "node $1 up on $HOST:$(node_port "$1")"
}

cmd_cluster_wipe_node() {
    check_node "${1:-}"
    cmd_cluster_kill "$1"
    rm -rf "$(node_dir "$1")/logs"
    log "node $1: its data is deleted ($(node_dir "$1")/logs)"
}

cmd_cluster_reset() {
    cmd_cluster_stop
    case "$CLUSTER_DIR" in
        "" | / | "$REPO_ROOT" | "$HOME" | "$CACHE_DIR" | "$VERSION_DIR" | "$LIB_DIR")
            die "refusing to delete KAFKA_CLUSTER_DATA=$CLUSTER_DIR" ;;
    esac
    rm -rf "$CLUSTER_DIR"
    log "deleted $CLUSTER_DIR"
}

cmd_cluster_brokers() { cluster_brokers; }

cmd_cluster_stop_node() {
    check_node "${1:-}"
    stop_node "$1"
}

run_command "$@"
