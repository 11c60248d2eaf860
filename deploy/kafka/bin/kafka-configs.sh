#!/usr/bin/env bash
# What the distribution's bin/kafka-configs.sh runs.
exec "$(dirname "$0")/kafka-run-class.sh" kafka.admin.ConfigCommand "$@"
