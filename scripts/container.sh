#!/usr/bin/env bash
# The container images of this project, built and run with Podman on a machine with no Docker engine and no
# image registry (how: ../shared/spec/vendor/faust-and-kafka.md §7).
#
# Usage: scripts/container.sh <command> [args]
#   install          podman, runc, debootstrap (apt) and podman-compose (into .venv) when missing
#   base             the Debian bookworm base and the Python 3.11 base on it (cached: built when missing)
#   kafka-image      Apache Kafka from the jars scripts/kafka.sh installs (cached: built when missing)
#   worker-image     the worker's image from the Dockerfile, on the Python base (podman's layer cache)
#   build            all of the above, with the time each step took
#   images           the images and their sizes
#   podman ARGS...   podman with the global flags this machine needs
#   compose ARGS...  podman-compose on docker-compose.yml with those flags and the local images
#                    (project "streams" unless COMPOSE_PROJECT_NAME or -p says otherwise)
#   up [-p PROJECT]  the stack in the order docker compose would start it: kafka, once healthy the worker,
#                    once healthy the sample (waited for: it exits once sent)
#   down [-p PROJECT]  stop the stack and delete its volumes
#
# Environment (defaults in brackets):
#   WORKER_IMAGE         the worker's image                  [localhost/streams:latest]
#   BASE_IMAGE           its base (the build argument)        [localhost/streams-python:3.11-bookworm]
#   KAFKA_IMAGE          for `compose`: the broker's image    [localhost/streams-kafka:4.3.1]
#   DEBIAN_MIRROR        debootstrap's mirror                 [the Debian mirror apt uses here]
#   CONTAINER_CACHE      stamps, debootstrap's tree, contexts [<repo>/.cache/container]
#   KAFKA_CACHE          the jars (as scripts/kafka.sh)       [<repo>/.cache/kafka]
#   HEALTHY_TIMEOUT      for `up`: seconds per service        [240]
# docker-compose.yml's own variables (KAFKA_PORT, STREAMS_WEB_PORT, ...) pass through to `compose` and `up`.
#
# Every image is built and every container runs with the host's network; nothing listens beyond 127.0.0.1
# unless a setting says so.

set -euo pipefail

readonly KAFKA_VERSION=4.3.1
readonly SUITE=bookworm

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT
readonly CACHE="${CONTAINER_CACHE:-$REPO_ROOT/.cache/container}"
readonly KAFKA_LIBS="${KAFKA_CACHE:-$REPO_ROOT/.cache/kafka}/$KAFKA_VERSION/libs"
readonly DEBIAN_IMAGE=localhost/debian:bookworm-minbase
readonly BASE_IMAGE="${BASE_IMAGE:-localhost/streams-python:3.11-bookworm}"
readonly WORKER_IMAGE="${WORKER_IMAGE:-localhost/streams:latest}"
readonly LOCAL_KAFKA_IMAGE=localhost/streams-kafka:$KAFKA_VERSION
readonly VENV_BIN="$REPO_ROOT/.venv/bin"
readonly PODMAN_COMPOSE_VERSION=1.6.0

# crun (Debian's default) fails here with "cgroups in hybrid mode not supported", and there is no systemd
# to manage cgroups: runc and cgroupfs, on every podman call.
readonly PODMAN_FLAGS=(--runtime runc --cgroup-manager=cgroupfs)
# The default open-files limit cannot be set inside the container here ("setrlimit RLIMIT_NOFILE:
# Operation not permitted"): explicit limits, on every build and run.
readonly ULIMITS=(--ulimit nofile=20000:20000 --ulimit nproc=4096:4096)

log() { printf 'container: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }
# usage, and run_command: a subcommand runs its cmd_* function
# shellcheck source=scripts/lib.sh
source "$REPO_ROOT/scripts/lib.sh"

# Without systemd Podman schedules no healthchecks and says so on every container it creates or removes:
# that line is left out (`podman healthcheck run` still runs a check on demand).
pod() { podman "${PODMAN_FLAGS[@]}" "$@" 2> >(grep -v 'unable to get systemd connection' >&2); }

# --------------------------------------------------------------------------
# install
# --------------------------------------------------------------------------

cmd_install() {
    local missing=() tool
    for tool in podman runc debootstrap; do
        command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
    done
    if ((${#missing[@]})); then
        [[ $(id -u) == 0 ]] || die "missing ${missing[*]}; install them as root: apt-get install -y podman runc debootstrap"
        log "installing ${missing[*]} from Debian's packages"
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap >/dev/null
    fi
    if [[ ! -x "$VENV_BIN/podman-compose" ]]; then
        [[ -x "$VENV_BIN/pip" ]] || die "no $VENV_BIN/pip: run make install first"
        log "installing podman-compose $PODMAN_COMPOSE_VERSION into .venv"
        "$VENV_BIN/pip" install -q "podman-compose==$PODMAN_COMPOSE_VERSION"
    fi
}

# --------------------------------------------------------------------------
# cached images: built when missing or when their recipe changed
# --------------------------------------------------------------------------

# A stamp per image holds the hash of what it was built from; the image must also still be in podman's
# storage. fresh IMAGE HASH -> 0 when both hold.
stamp_file() { printf '%s/%s.stamp\n' "$CACHE" "$(printf '%s' "$1" | tr '/:' '__')"; }

fresh() {
    local image="$1" hash="$2" stamp
    stamp="$(stamp_file "$image")"
    [[ -f "$stamp" && "$(<"$stamp")" == "$hash" ]] && pod image exists "$image"
}

mark_fresh() { mkdir -p "$CACHE"; printf '%s\n' "$2" >"$(stamp_file "$1")"; }

recipe_hash() { cat "$@" | sha256sum | cut -c1-16; }

# pod_build IMAGE NAME ARGS...: podman build -t IMAGE ARGS (the context last) with the host's network and
# the limits this machine needs; its output in $CACHE/NAME-build.log, whose end is shown when it fails.
pod_build() {
    local image="$1" build_log="$CACHE/$2-build.log"
    shift 2
    pod build --network host "${ULIMITS[@]}" -t "$image" "$@" >"$build_log" 2>&1 \
        || { tail -n 30 "$build_log" >&2; die "building $image failed (log: $build_log)"; }
}

# built IMAGE HASH STARTED DIR: the image stamped with the hash of its recipe, the directory it was built
# from deleted, and how long it took since STARTED ($SECONDS then).
built() {
    rm -rf "$4"
    mark_fresh "$1" "$2"
    log "built $1 in $((SECONDS - $3))s"
}

# The Debian mirror apt already uses on this machine (one-line or deb822 sources), else Debian's CDN.
debian_mirror() {
    if [[ -n "${DEBIAN_MIRROR:-}" ]]; then printf '%s\n' "$DEBIAN_MIRROR"; return; fi
    local f uri=""
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f "$f" ]] || continue
        # "deb [options] URI SUITE COMPONENTS..."
        uri="$(awk -v s="$SUITE" '$1 == "deb" && $0 !~ /security/ {
                   sub(/\[[^]]*\]/, ""); if ($3 == s) { print $2; exit } }' "$f")"
        [[ -n "$uri" ]] && break
    done
    if [[ -z "$uri" ]]; then
        for f in /etc/apt/sources.list.d/*.sources; do
            [[ -f "$f" ]] || continue
            # deb822: paragraphs of "Field: value"; the paragraph that offers the suite itself
            uri="$(awk -v s="$SUITE" 'BEGIN { RS = ""; FS = "\n" }
                   { u = ""; ok = 0
                     for (i = 1; i <= NF; i++) {
                       if ($i ~ /^URIs:/) { split($i, a, /[ \t]+/); u = a[2] }
                       if ($i ~ /^Suites:/) { n = split($i, b, /[ \t]+/); for (j = 2; j <= n; j++) if (b[j] == s) ok = 1 }
                     }
                     if (ok && u != "" && u !~ /security/) { print u; exit } }' "$f")"
            [[ -n "$uri" ]] && break
        done
    fi
    printf '%s\n' "${uri:-http://deb.debian.org/debian}"
}

build_debian() {
    local hash mirror rootfs started=$SECONDS
    hash="$(printf 'debootstrap --variant=minbase %s v1' "$SUITE" | sha256sum | cut -c1-16)"
    fresh "$DEBIAN_IMAGE" "$hash" && return 0
    mirror="$(debian_mirror)"
    rootfs="$CACHE/rootfs-$SUITE"
    rm -rf "$rootfs"
    mkdir -p "$CACHE"
    log "debootstrap $SUITE from $mirror (about 30 s)"
    if ! debootstrap --variant=minbase "$SUITE" "$rootfs" "$mirror" >"$CACHE/debootstrap.log" 2>&1; then
        tail -n 20 "$CACHE/debootstrap.log" >&2
        die "debootstrap failed (log: $CACHE/debootstrap.log)"
    fi
    # apt's downloads are not part of an image
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | pod import -q - "$DEBIAN_IMAGE" >/dev/null
    built "$DEBIAN_IMAGE" "$hash" "$started" "$rootfs"
}

# The host's local certificate authorities go into the Python base (deploy/python/Containerfile says why).
local_cas() {
    [[ -d /usr/local/share/ca-certificates ]] || return 0
    find /usr/local/share/ca-certificates -name '*.crt' -type f | sort
}

cmd_base() {
    build_debian
    local hash context started=$SECONDS
    local cas=()
    mapfile -t cas < <(local_cas)
    hash="$(cat "$REPO_ROOT/deploy/python/Containerfile" "${cas[@]}" | sha256sum | cut -c1-16)"
    fresh "$BASE_IMAGE" "$hash" && return 0
    context="$CACHE/python-context"
    rm -rf "$context"
    mkdir -p "$context/local-ca"
    cp "$REPO_ROOT/deploy/python/Containerfile" "$context/"
    ((${#cas[@]} == 0)) || cp "${cas[@]}" "$context/local-ca/"
    log "building $BASE_IMAGE (Debian's python3 3.11)"
    pod_build "$BASE_IMAGE" base --build-arg DEBIAN_IMAGE="$DEBIAN_IMAGE" "$context"
    built "$BASE_IMAGE" "$hash" "$started" "$context"
}

cmd_kafka_image() {
    build_debian
    if [[ ! -f "$KAFKA_LIBS/.complete" ]]; then
        bash "$REPO_ROOT/scripts/kafka.sh" install
    fi
    local hash context started=$SECONDS
    hash="$(cd "$REPO_ROOT/deploy/kafka" && { find . -type f | sort | xargs cat; ls "$KAFKA_LIBS"; } | sha256sum | cut -c1-16)"
    fresh "$LOCAL_KAFKA_IMAGE" "$hash" && return 0
    context="$CACHE/kafka-context"
    rm -rf "$context"
    mkdir -p "$context"
    cp -a "$REPO_ROOT/deploy/kafka/." "$context/"
    mkdir -p "$context/libs"
    cp "$KAFKA_LIBS"/*.jar "$context/libs/"
    log "building $LOCAL_KAFKA_IMAGE from $KAFKA_LIBS"
    pod_build "$LOCAL_KAFKA_IMAGE" kafka --build-arg DEBIAN_IMAGE="$DEBIAN_IMAGE" "$context"
    built "$LOCAL_KAFKA_IMAGE" "$hash" "$started" "$context"
}

# Not stamped: podman's layer cache makes an unchanged build take seconds, and a changed source file must
# always reach the image. Docker's image format: the OCI format podman defaults to drops HEALTHCHECK.
cmd_worker_image() {
    cmd_base
    local started=$SECONDS
    mkdir -p "$CACHE"
    pod_build "$WORKER_IMAGE" worker --format docker --build-arg BASE_IMAGE="$BASE_IMAGE" "$REPO_ROOT"
    log "built $WORKER_IMAGE in $((SECONDS - started))s"
}

cmd_build() {
    local started=$SECONDS
    cmd_install
    cmd_base
    cmd_kafka_image
    cmd_worker_image
    log "images ready in $((SECONDS - started))s"
}

cmd_images() {
    pod images --format '{{.Repository}}:{{.Tag}} {{.Size}}' \
        | grep -E "^($DEBIAN_IMAGE|$BASE_IMAGE|$LOCAL_KAFKA_IMAGE|$WORKER_IMAGE) " || true
}

# podman-compose with this machine's podman flags; the broker from the local image unless KAFKA_IMAGE says
# otherwise.
cmd_compose() {
    [[ -x "$VENV_BIN/podman-compose" ]] || die "no $VENV_BIN/podman-compose: run scripts/container.sh install"
    # -p PROJECT in the arguments wins over the project name
    # (env: WORKER_IMAGE and BASE_IMAGE are read-only variables here, which bash refuses to assign)
    env COMPOSE_PROJECT_NAME="${COMPOSE_PROJECT_NAME:-streams}" \
        KAFKA_IMAGE="${KAFKA_IMAGE:-$LOCAL_KAFKA_IMAGE}" WORKER_IMAGE="$WORKER_IMAGE" BASE_IMAGE="$BASE_IMAGE" \
        "$VENV_BIN/podman-compose" --podman-args="${PODMAN_FLAGS[*]}" -f "$REPO_ROOT/docker-compose.yml" "$@"
}

# podman-compose ignores depends_on's health conditions with Podman before 4.6 (Debian bookworm has 4.3)
# and Podman runs no healthchecks without systemd, so `up` starts the services one at a time and runs
# each one's healthcheck itself until it passes: what `docker compose up` does from the conditions.
container_of() {
    pod ps -a --filter "label=io.podman.compose.project=$1" --filter "label=com.docker.compose.service=$2" \
        --format '{{.Names}}' | head -n 1
}

wait_healthy() {
    local project="$1" service="$2" name deadline=$((SECONDS + ${HEALTHY_TIMEOUT:-240}))
    name="$(container_of "$project" "$service")"
    [[ -n "$name" ]] || die "no container of service $service in project $project"
    while ! pod healthcheck run "$name" >/dev/null 2>&1; do
        if [[ "$(pod inspect "$name" --format '{{.State.Running}}')" != true ]]; then
            pod logs --tail 40 "$name" >&2 || true
            die "$service ($name) stopped before it was healthy"
        fi
        if ((SECONDS >= deadline)); then
            pod logs --tail 40 "$name" >&2 || true
            die "$service ($name) not healthy after ${HEALTHY_TIMEOUT:-240}s"
        fi
        sleep 2
    done
    log "$service healthy ($name)"
}

project_arg() {
    if [[ "${1:-}" == -p && -n "${2:-}" ]]; then printf '%s\n' "$2"; else printf '%s\n' "${COMPOSE_PROJECT_NAME:-streams}"; fi
}

cmd_up() {
    local project started=$SECONDS name code
    project="$(project_arg "$@")"
    cmd_compose -p "$project" up -d kafka >/dev/null 2>&1 || die "podman-compose could not start kafka"
    wait_healthy "$project" kafka
    cmd_compose -p "$project" up -d --no-deps worker >/dev/null 2>&1 || die "podman-compose could not start the worker"
    wait_healthy "$project" worker
    cmd_compose -p "$project" up -d --no-deps sample >/dev/null 2>&1 || die "podman-compose could not start the sample"
    name="$(container_of "$project" sample)"
    code="$(pod wait "$name")"
    pod logs "$name" >&2
    [[ "$code" == 0 ]] || die "the sample exited with code $code"
    log "stack $project up in $((SECONDS - started))s: the sample is sent"
}

# podman-compose's down leaves the anonymous volumes (the image's VOLUME in the sample's container): the
# containers go first, with theirs.
cmd_down() {
    local project ids
    project="$(project_arg "$@")"
    ids="$(pod ps -a -q --filter "label=io.podman.compose.project=$project")"
    if [[ -n "$ids" ]]; then
        # shellcheck disable=SC2086 # one id a word
        pod rm -f -v -t 30 $ids >/dev/null
    fi
    cmd_compose -p "$project" down -v >/dev/null 2>&1
}

# exec: signals (SIGTERM to a foreground `podman run`) reach podman, which passes them on
cmd_podman() { exec podman "${PODMAN_FLAGS[@]}" "$@" 2> >(grep -v 'unable to get systemd connection' >&2); }

run_command "$@"
