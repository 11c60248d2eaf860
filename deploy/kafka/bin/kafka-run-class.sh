#!/usr/bin/env bash
# `kafka-run-class.sh MAIN ARGS...` for the command-line tools: a small heap, C1 only (they start faster),
# warnings on stderr.
exec java -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Djava.awt.headless=true \
    -Dlog4j2.configurationFile=/opt/kafka/config/tools-log4j2.properties \
    -cp '/opt/kafka/libs/*' "$@"
