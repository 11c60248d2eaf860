"""make bench's Quix Streams peer: the worker's shape of work, not its identity rules.

For each raw record (key = device_id bytes, value = JSON bytes): read the device's state (Quix's RocksDB
store, with its changelog topic, through `apply(..., stateful=True)`), update a small running identity
(anonymous id, last login id, a count), write it back, and produce one output record per input, keyed as it
came, carrying the device's running identity (JSON). A record without a key or whose value is not a JSON
object gets one output too, an error record, and no state. The rule is the Kafka Streams peer's
(bench/peers/kstreams): login sets the login id, logout clears it, identify sets the anonymous id.

Quix's defaults (at-least-once, commit every 5 s, its JSON serializer for the output) but two settings the
bench needs: the raw topic is read from its beginning (Quix's default is `latest`) and its values as bytes
(its default JSON deserializer would stop the application at the first record that is not JSON).

    .venv/bin/python bench/peers/quix_peer.py BROKERS GROUP INPUT OUTPUT STATE_DIR

SIGTERM stops it cleanly (Quix's own handler: the last checkpoint committed). Nothing is printed per record.
"""

from __future__ import annotations

import argparse
from typing import Any

import orjson
from quixstreams import Application, State


def identity(value: bytes, key: bytes | None, timestamp: int, headers: Any,
             state: State[str, Any]) -> dict[str, Any]:
    try:
        event = orjson.loads(value)
    except orjson.JSONDecodeError:
        event = None
    if key is None or not isinstance(event, dict):
        return {"error": "no device_id, or not a JSON object", "raw": value.decode("utf-8", "replace")}
    current = state.get("identity") or {"anonymous_id": key.decode("utf-8", "replace"), "login_id": None,
                                        "events": 0}
    action, id_ = event.get("action", "track"), event.get("id")
    if action == "login" and isinstance(id_, str):
        current["login_id"] = id_
    elif action == "logout":
        current["login_id"] = None
    elif action == "identify" and isinstance(id_, str):
        current["anonymous_id"] = id_
    current["events"] += 1
    state.set("identity", current)
    login = current["login_id"]
    event["identity"] = {**current, "distinct_id": current["anonymous_id"] if login is None else login}
    return event


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in ("brokers", "group", "input", "output", "state_dir"):
        parser.add_argument(name)
    args = parser.parse_args()
    app = Application(broker_address=args.brokers, consumer_group=args.group, auto_offset_reset="earliest",
                      state_dir=args.state_dir, loglevel="WARNING")
    source = app.topic(args.input, key_deserializer="bytes", value_deserializer="bytes")
    target = app.topic(args.output, key_serializer="bytes")  # values: Quix's default JSON serializer
    sdf = app.dataframe(source).apply(identity, stateful=True, metadata=True)
    sdf.to_topic(target)
    app.run()


if __name__ == "__main__":
    main()
