"""Where a keyed record goes: the producers' partitioner, which the device table must follow.

Lives here: `key_hash(name)`, the hash of a key that, modulo the partition count, gives the partition a
producer with that partitioner chooses; and `aiokafka_partitioner(name)`, the same placement for the
project's own producer (`produce`). The worker keeps each device's state in the partition the raw topic's
producers put its keyed records in: records found elsewhere must be forwarded through the repartition
topic, which doubles their traffic.

| name | hash | producers that place keys this way |
|---|---|---|
| `murmur2` | murmur2 of the key, top bit cleared | the Java client's default (Kafka Streams, MirrorMaker 2, |
| | | the REST proxy), aiokafka's, librdkafka's `murmur2_random` |
| `crc32` | CRC-32 of the key | librdkafka's default `consistent_random` (confluent-kafka for |
| | | Python, Go, .NET, Node; kcat; PHP) |

Unkeyed records: every producer spreads them (random or sticky); the worker forwards them by device ID.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Sequence

from streams.kafka.murmur2 import murmur2

PARTITIONERS = ("murmur2", "crc32")


def _murmur2_hash(key: bytes) -> int:
    return murmur2(key) & 0x7FFFFFFF


def key_hash(name: str) -> Callable[[bytes], int]:
    """The hash whose remainder by the partition count is the partition of a key."""
    if name == "murmur2":
        return _murmur2_hash
    if name == "crc32":
        # librdkafka's rd_kafka_msg_partitioner_consistent: rd_crc32(key) % partition_cnt, the standard CRC-32
        return zlib.crc32
    raise ValueError(f"unknown partitioner {name!r}: one of {', '.join(PARTITIONERS)}")


def aiokafka_partitioner(name: str) -> Callable[[bytes | None, Sequence[int], Sequence[int]], int]:
    """An aiokafka producer's `partitioner` placing keys as `name` does."""
    hash_ = key_hash(name)

    def partition(key: bytes | None, all_partitions: Sequence[int], available: Sequence[int]) -> int:
        if key is None:
            return random.choice(available or all_partitions)
        return sorted(all_partitions)[hash_(key) % len(all_partitions)]

    return partition
