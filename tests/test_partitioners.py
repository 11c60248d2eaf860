"""The producers' partitioners: the project's placement equals the clients' own."""

from __future__ import annotations

import zlib

from aiokafka.partitioner import DefaultPartitioner
from hypothesis import given
from hypothesis import strategies as st

from streams.kafka.partitioners import aiokafka_partitioner, key_hash


@given(st.binary(max_size=300), st.integers(min_value=1, max_value=64))
def test_murmur2_places_keys_as_aiokafka_and_the_java_client_do(key: bytes, partitions: int) -> None:
    everything = list(range(partitions))
    expected = DefaultPartitioner()(key, everything, everything)
    assert aiokafka_partitioner("murmur2")(key, everything, everything) == expected
    assert key_hash("murmur2")(key) % partitions == expected


@given(st.binary(max_size=300), st.integers(min_value=1, max_value=64))
def test_crc32_is_librdkafkas_consistent_partitioner(key: bytes, partitions: int) -> None:
    # rd_kafka_msg_partitioner_consistent: rd_crc32(key) % partition_cnt, over all partitions
    everything = list(range(partitions))[::-1]  # the client may list them in any order
    assert aiokafka_partitioner("crc32")(key, everything, everything[:1]) == zlib.crc32(key) % partitions


def test_known_crc32_placements() -> None:
    # CRC-32 check value of the standard ("123456789" -> 0xCBF43926)
    assert key_hash("crc32")(b"123456789") == 0xCBF43926


def test_unkeyed_records_go_to_an_available_partition() -> None:
    place = aiokafka_partitioner("crc32")
    assert {place(None, [0, 1, 2, 3], [2]) for _ in range(20)} == {2}
