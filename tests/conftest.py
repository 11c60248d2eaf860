"""Test-wide checks: every record any test makes the product write is validated against `schemas/`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest

from streams import codec

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
SCHEMAS = {
    name: jsonschema.Draft202012Validator(json.loads((ROOT / "schemas" / f"{name}.schema.json").read_text()))
    for name in ("raw", "enriched", "dead-letter", "person", "identity-change")
}


def validate(kind: str, record: Any) -> None:
    if isinstance(record, bytes | str):
        record = orjson.loads(record)
    errors = sorted(SCHEMAS[kind].iter_errors(record), key=str)
    assert not errors, f"{kind} record breaks schemas/{kind}.schema.json: {errors[0].message}\n{record}"


@pytest.fixture(autouse=True)
def _outputs_follow_the_schemas(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    encode, dead_letter, encode_mapping = codec.encode, codec.dead_letter, codec.encode_mapping
    encode_rows = codec.encode_rows

    def checked_encode(record: Any) -> bytes:
        data = encode(record)
        validate("enriched", data)
        return data

    def checked_dead_letter(*args: Any, **kwargs: Any) -> bytes:
        data = dead_letter(*args, **kwargs)
        validate("dead-letter", data)
        return data

    def checked_mapping(*args: Any, **kwargs: Any) -> bytes:
        data = encode_mapping(*args, **kwargs)
        validate("person", data)
        return data

    def checked_rows(*args: Any, **kwargs: Any) -> list[bytes]:
        rows = encode_rows(*args, **kwargs)
        for row in rows:
            validate("identity-change", row)
        return rows

    monkeypatch.setattr(codec, "encode", checked_encode)
    monkeypatch.setattr(codec, "encode_rows", checked_rows)
    monkeypatch.setattr(codec, "encode_mapping", checked_mapping)
    monkeypatch.setattr(codec, "dead_letter", checked_dead_letter)
    yield


# The longest tests first. `pytest -n` hands tests (and the cluster's tests, one group) to its processes in
# collection order, so a long test collected last would run alone at the end while the others wait.
LONGEST_FIRST = (
    "tests/integration/test_cluster.py",
    "tests/integration/test_partition.py",
    "tests/integration/test_container.py",
    "tests/integration/test_failover.py",
    "tests/identity/test_model.py",
    "tests/persons/test_model.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        return next((i for i, path in enumerate(LONGEST_FIRST) if item.nodeid.startswith(path)), len(LONGEST_FIRST))

    items.sort(key=rank)
