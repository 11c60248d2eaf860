# What scripts/kafka.sh and scripts/container.sh share: sourced by them, not run.

# The "Usage:" paragraph of the header of the script that runs.
usage() {
    sed -n '/^# Usage:/,/^$/s/^# \{0,1\}//p' "${BASH_SOURCE[-1]}"
}

# run_command COMMAND ARGS...: the script's subcommand COMMAND runs its
# function cmd_COMMAND (dashes as underscores) with ARGS; help (-h, --help)
# prints the usage, and anything else prints it on stderr and exits 2.
run_command() {
    local cmd="${1:-}" fn
    [[ $# -gt 0 ]] && shift
    case "$cmd" in
        -h | --help | help) usage; return 0 ;;
    esac
    fn="cmd_${cmd//-/_}"
    if [[ -z "$cmd" ]] || ! declare -F "$fn" >/dev/null; then
        usage >&2
        exit 2
    fi
    "$fn" "$@"
}
