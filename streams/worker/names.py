"""The one place that knows the worker's topic names: those the settings name (raw, enriched, dead letters, the
persons topic), and those the worker derives from its group (the tables' changelogs, the repartition topics)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from streams.config import Settings

TABLE = "devices"
PERSONS_TABLE = "persons"  # pair claims and the persons index (`streams.state.pairs`)


@dataclass(frozen=True)
class Topics:
    raw: str
    repartition: str
    enriched: str
    dead_letter: str
    changelog: str
    partitions: int
    # the output topics' partition counts (the worker creates them like the raw topic; existing ones may differ)
    enriched_partitions: int = 0
    dead_letter_partitions: int = 0
    # the persons stage (None: off): its repartition topic (claims keyed by pair, mappings keyed by user ID,
    # owners' answers keyed by device ID), its table's changelog, the persons topic and its partition count
    persons_repartition: str | None = None
    persons_changelog: str | None = None
    persons: str | None = None
    persons_partitions: int = 0
    # the identity change log (None: off, or the persons stage off): rows keyed by user ID, appended
    identity_changes: str | None = None
    identity_changes_partitions: int = 0


def topic_names(settings: Settings, partitions: int, outputs: Mapping[str, int] | None = None) -> Topics:
    outputs = outputs or {}
    persons = settings.persons == "on"
    changes = persons and settings.identity_changes == "on"
    return Topics(
        raw=settings.raw_topic,
        repartition=f"{settings.group}-{settings.raw_topic}-repartition",
        enriched=settings.enriched_topic,
        dead_letter=settings.dead_letter_topic,
        changelog=f"{settings.group}-{TABLE}-changelog",
        partitions=partitions,
        enriched_partitions=outputs.get(settings.enriched_topic, partitions),
        dead_letter_partitions=outputs.get(settings.dead_letter_topic, partitions),
        persons_repartition=f"{settings.group}-persons-repartition" if persons else None,
        persons_changelog=f"{settings.group}-{PERSONS_TABLE}-changelog" if persons else None,
        persons=settings.persons_topic if persons else None,
        persons_partitions=outputs.get(settings.persons_topic, partitions) if persons else 0,
        identity_changes=settings.identity_changes_topic if changes else None,
        identity_changes_partitions=outputs.get(settings.identity_changes_topic, partitions) if changes else 0,
    )


def input_topics(topics: Topics) -> set[str]:
    """The topics the batch step reads: raw, repartition, and the persons stage's repartition topic."""
    return {t for t in (topics.raw, topics.repartition, topics.persons_repartition) if t}
