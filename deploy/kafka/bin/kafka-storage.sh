#!/usr/bin/env bash
# What the distribution's bin/kafka-storage.sh runs.
exec "$(dirname "$0")/kafka-run-class.sh" kafka.tools.StorageTool "$@"
