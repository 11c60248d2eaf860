#!/usr/bin/env bash
# What the distribution's bin/kafka-consumer-groups.sh runs.
exec "$(dirname "$0")/kafka-run-class.sh" org.apache.kafka.tools.consumer.group.ConsumerGroupCommand "$@"
