"""The keys the worker keeps beside the device states in each table partition's RocksDB database.

Device states are stored under the device ID's UTF-8 bytes. Every internal key starts with byte 0xFF, which
UTF-8 never contains: no device ID, whatever a client sends, encodes to one of them. (Faust's own offset key,
`__faust\\0offset__`, is a string a raw record's `device_id` can hold: `streams.state.devicestore` moves it here.)
"""

from __future__ import annotations

INTERNAL = b"\xff"
# the changelog offset that the partition's database holds everything up to (Faust's persisted offset)
OFFSET_KEY = INTERNAL + b"changelog-offset"
# how far the partition's stored states hold its inputs (`streams.worker.batch.Applied`), written with them
APPLIED_KEY = INTERNAL + b"applied"
# at-least-once: where the last batch that applied repartitioned records stopped in both input logs (see
# `streams.worker.batch`), written to the changelog before that batch's outputs
PLAN_KEY = INTERNAL + b"batch-plan"


def is_internal(key: bytes) -> bool:
    return key[:1] == INTERNAL
