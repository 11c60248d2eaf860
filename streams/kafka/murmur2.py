"""Kafka's default partitioner hash (murmur2, as `org.apache.kafka.common.utils.Utils.murmur2`).

aiokafka ships the same function in pure Python, reading the key a byte at a time. This one reads the
4-byte words in one `struct` call and does the same arithmetic: about three times faster, which matters
because the worker hashes every device it has not seen recently (to check that a record sits in the
partition its device belongs to, and to choose its output partition). A test checks it against
aiokafka's on random keys of every length.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from functools import lru_cache

_M = 0x5BD1E995
_SEED = 0x9747B28C
_MASK = 0xFFFFFFFF


@lru_cache(maxsize=256)
def _words(count: int) -> Callable[[bytes], tuple[int, ...]]:
    return struct.Struct(f"<{count}I").unpack_from


def murmur2(data: bytes) -> int:
    """The unsigned 32-bit murmur2 hash of `data`; `& 0x7FFFFFFF` and `% partitions` give the partition."""
    length = len(data)
    h = _SEED ^ length
    for k in _words(length >> 2)(data):
        k = (k * _M) & _MASK
        k ^= k >> 24
        h = ((h * _M) & _MASK) ^ ((k * _M) & _MASK)
    tail = length & 3
    if tail:
        i = length & ~3
        if tail == 3:
            h ^= data[i + 2] << 16
        if tail >= 2:
            h ^= data[i + 1] << 8
        h = ((h ^ data[i]) * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    return h ^ (h >> 15)


def partition_of(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner gives a keyed record."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions
