"""Run raw records through `streams.offline.replay.replay` with `--persons`, as files, and read what it wrote."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from streams.enrich import EnrichSettings
from streams.identity import Settings
from streams.offline.replay import replay

from .model import Config


@dataclass
class Run:
    enriched: list[dict[str, Any]]
    dead: list[dict[str, Any]]
    persons: bytes  # the --persons file, byte for byte
    output: bytes  # the enriched file, byte for byte
    changes: bytes = b""  # the --identity-changes file (one process only)

    def mappings(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.persons.splitlines()]

    def by_user(self) -> dict[str, dict[str, Any]]:
        return {m["user_id"]: m for m in self.mappings()}

    def change_rows(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.changes.splitlines()]


def changes_end_at(rows: Sequence[Mapping[str, Any]]) -> bytes:
    """The mapping the change log's last row per user says, as a --persons file: sorted by user ID, one line
    each of the users mapped. Checks on the way that a user's versions count up one by one, a mapping row before
    its link rows."""
    last: dict[str, Mapping[str, Any]] = {}
    for row in rows:
        user, version = row["user_id"], row["version"]
        if row["kind"] == "mapping":
            assert version == (last[user]["version"] + 1 if user in last else 1), row
            last[user] = row
        else:
            assert last[user]["version"] == version and last[user]["person_id"] == row["person_id"], row
    mapped = [{k: r[k] for k in ("user_id", "person_id", "via", "device_id", "identity_key") if k in r}
              for user, r in sorted(last.items()) if r["person_id"] is not None]
    return b"".join(orjson.dumps(m) + b"\n" for m in mapped)


def enrich_settings(config: Config) -> EnrichSettings:
    return EnrichSettings(identity=Settings(hashed_keys=config.hashed_keys), person_salt=config.salt,
                          person_max_devices=config.max_devices)


def jsonl(records: Sequence[Mapping[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in records)


def run_replay(records: Sequence[Mapping[str, Any]], config: Config | None = None, *, jobs: int = 1,
               state_dir: str | Path | None = None, persons: bool = True) -> Run:
    """One replay of `records`. `state_dir`: continue from (and leave) the states there."""
    with tempfile.TemporaryDirectory(prefix="persons-") as tmp:
        base = Path(tmp)
        source, out, dead, persons_file, changes = (
            base / name for name in ("in.jsonl", "out.jsonl", "dead.jsonl", "persons.jsonl", "changes.jsonl"))
        source.write_bytes(jsonl(records))
        replay(str(source), str(out), str(dead), enrich_settings(config or Config()),
               state_dir=str(state_dir) if state_dir is not None else None, jobs=jobs,
               persons_path=str(persons_file) if persons else None,
               changes_path=str(changes) if persons and jobs == 1 else None)
        output = out.read_bytes()
        return Run([orjson.loads(line) for line in output.splitlines()],
                   [orjson.loads(line) for line in dead.read_bytes().splitlines()],
                   persons_file.read_bytes() if persons else b"", output,
                   changes.read_bytes() if persons and jobs == 1 else b"")
