#!/usr/bin/env bash
# What the distribution's bin/kafka-topics.sh runs.
exec "$(dirname "$0")/kafka-run-class.sh" org.apache.kafka.tools.TopicCommand "$@"
