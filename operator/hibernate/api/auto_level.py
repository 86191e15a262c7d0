"""Automatic levels: what the idle ladder, a wake on request (or another automaton) decided, beside
the person's `spec.sleepLevel`. Pure: reads a ModelDeployment as a plain dict, no API calls.

`spec` is the person's (and the GitOps tool's): automata never write it. Their decision lives in
annotations on the ModelDeployment (constants.AUTO_ANNOTATIONS), which Argo CD and Flux leave alone
because their manifests do not carry them. The rule, everywhere (operator, gateway, kubectl plugin):

- the **automatic level** is in effect while `hibernate.dev/auto-sleep-level` holds a valid level and
  `hibernate.dev/auto-sleep-level-generation` equals `metadata.generation`: it was decided on the
  spec as it is now. Any change of the spec bumps the generation, so a person's change resets it;
  re-applying the same manifest changes nothing and keeps it;
- the **effective level**, the one the operator applies (pod annotations, Stop scaling), is the
  automatic level while it is in effect, else `spec.sleepLevel`.

The writes are in hibernate.controller.auto_level (`set_automatic_level`, `clear_automatic_level`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from hibernate.api import constants as c
from hibernate.api.levels import InvalidSleepLevel, SleepLevel

# Who decided (the `source`): the names used by hibernate's own automata.
SOURCE_IDLE: Final = "idle"
SOURCE_GATEWAY: Final = "gateway"
MAX_REASON: Final = 1024  # an annotation value is free text; keep it readable


@dataclass(frozen=True)
class AutomaticLevel:
    """One automatic decision, as its annotations say."""

    level: SleepLevel
    source: str
    reason: str
    generation: int | None  # the metadata.generation it was decided at; None when unreadable
    time: str | None

    def to_status(self) -> dict[str, Any]:
        """`status.automaticLevel`, as the operator writes it."""
        out: dict[str, Any] = {"level": self.level.label, "source": self.source or "unknown"}
        if self.reason:
            out["reason"] = self.reason
        if self.time:
            out["since"] = self.time
        return out


def _annotations(md: dict[str, Any]) -> dict[str, str]:
    return dict((md.get("metadata") or {}).get("annotations") or {})


def _generation(md: dict[str, Any]) -> int:
    try:
        return int((md.get("metadata") or {}).get("generation") or 0)
    except (TypeError, ValueError):
        return 0


def recorded(md: dict[str, Any]) -> AutomaticLevel | None:
    """The automatic decision the annotations record, in effect or not; None when there is none (or
    its level is not a level)."""
    annotations = _annotations(md)
    raw = annotations.get(c.ANN_AUTO_LEVEL)
    if raw is None:
        return None
    try:
        level = SleepLevel.parse(raw)
    except InvalidSleepLevel:
        return None
    try:
        generation: int | None = int(annotations.get(c.ANN_AUTO_GENERATION, ""))
    except ValueError:
        generation = None
    return AutomaticLevel(
        level=level,
        source=annotations.get(c.ANN_AUTO_SOURCE, ""),
        reason=annotations.get(c.ANN_AUTO_REASON, ""),
        generation=generation,
        time=annotations.get(c.ANN_AUTO_TIME),
    )


def automatic_level(md: dict[str, Any]) -> AutomaticLevel | None:
    """The automatic decision in effect: recorded, and decided on the spec of the current generation."""
    found = recorded(md)
    if found is None or found.generation != _generation(md):
        return None
    return found


def stale(md: dict[str, Any]) -> bool:
    """Automatic annotations are there but not in effect (the spec changed since, or they are
    unreadable): the operator removes them."""
    annotations = _annotations(md)
    return any(key in annotations for key in c.AUTO_ANNOTATIONS) and automatic_level(md) is None


def spec_level(md: dict[str, Any]) -> SleepLevel | None:
    """`spec.sleepLevel` (Awake when absent); None when it is not a level."""
    try:
        return SleepLevel.parse((md.get("spec") or {}).get("sleepLevel", SleepLevel.AWAKE.label))
    except InvalidSleepLevel:
        return None


def effective_level(md: dict[str, Any], spec: SleepLevel) -> SleepLevel:
    """The level the operator applies: the automatic level in effect, else `spec` (the spec's level,
    as the caller has parsed it)."""
    auto = automatic_level(md)
    return auto.level if auto is not None else spec


def effective_level_of(md: dict[str, Any]) -> SleepLevel | None:
    """`effective_level`, reading the spec's level itself; None only when that is invalid and no
    automatic level overrides it."""
    auto = automatic_level(md)
    return auto.level if auto is not None else spec_level(md)


def annotations_for(
    level: SleepLevel, *, source: str, reason: str, generation: int, time: str
) -> dict[str, str | None]:
    """The annotations that record one automatic decision (a merge patch of metadata.annotations)."""
    reason = " ".join(reason.split())
    return {
        c.ANN_AUTO_LEVEL: level.label,
        c.ANN_AUTO_SOURCE: source,
        c.ANN_AUTO_REASON: reason[:MAX_REASON] if reason else None,
        c.ANN_AUTO_GENERATION: str(generation),
        c.ANN_AUTO_TIME: time,
    }


def cleared() -> dict[str, str | None]:
    """The merge patch of metadata.annotations that removes every automatic annotation."""
    return dict.fromkeys(c.AUTO_ANNOTATIONS, None)
