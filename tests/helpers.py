"""Small drivers shared by the tests: run raw records through the real enrich step."""

from __future__ import annotations

from typing import Any

import orjson

from streams.enrich import Enricher, EnrichSettings, MemoryStore


class Session:
    """One store and one enricher; `send` feeds raw records and returns what came out, decoded."""

    def __init__(self, settings: EnrichSettings | None = None) -> None:
        self.enricher = Enricher(settings)
        self.store = MemoryStore()
        self.line = 0

    def send(self, **raw: Any) -> list[dict[str, Any]]:
        out, dead = self.send_raw(orjson.dumps(raw))
        assert dead is None, f"unexpected dead letter: {dead}"
        return out

    def refuse(self, **raw: Any) -> dict[str, Any]:
        out, dead = self.send_raw(orjson.dumps(raw))
        assert dead is not None, f"expected a dead letter, got {out}"
        return dead

    def send_raw(self, data: bytes) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        self.line += 1
        outcome = self.enricher.step(data, {"line": self.line}, self.store)
        dead = orjson.loads(outcome.dead_letter) if outcome.dead_letter is not None else None
        return [orjson.loads(r) for r in outcome.records], dead


IDENTITY_FIELDS = ("type", "event", "distinct_id", "anonymous_id", "login_id", "original_id", "identities",
                   "properties")


def identity_view(record: dict[str, Any]) -> dict[str, Any]:
    return {k: record[k] for k in IDENTITY_FIELDS if k in record}
