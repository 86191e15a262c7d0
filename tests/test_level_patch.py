"""Which pods get the spec's level written, decided from a full pod and from kopf's index view of it
(the resync timer decides from the index, and must decide the same)."""

from __future__ import annotations

from typing import Any

import pytest

from hibernate.api import constants as c
from hibernate.api.levels import SleepLevel
from hibernate.controller.reconcile import level_patch, needs_level
from hibernate.controller.status import PodView


def pod(annotations: dict[str, str] | None = None, terminating: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "m-0", "namespace": "ns", "resourceVersion": "7"}
    if annotations is not None:
        meta["annotations"] = annotations
    if terminating:
        meta["deletionTimestamp"] = "2026-11-25T12:00:00Z"
    return {"metadata": meta, "status": {"conditions": [{"type": "Ready", "status": "True"}]}}


CASES = {
    "a new pod gets the level": (pod(), SleepLevel.L1, {c.ANN_SLEEP_LEVEL: "L1", c.ANN_SPEC_LEVEL: "L1"}),
    "a pod at the spec's level is left alone": (
        pod({c.ANN_SLEEP_LEVEL: "L1", c.ANN_SPEC_LEVEL: "L1"}),
        SleepLevel.L1,
        None,
    ),
    "a person's override holds while the spec's level is unchanged": (
        pod({c.ANN_SLEEP_LEVEL: "Awake", c.ANN_SPEC_LEVEL: "L2"}),
        SleepLevel.L2,
        None,
    ),
    "a change of the spec's level overrides it": (
        pod({c.ANN_SLEEP_LEVEL: "Awake", c.ANN_SPEC_LEVEL: "L2"}),
        SleepLevel.CHECKPOINT,
        {c.ANN_SLEEP_LEVEL: "Checkpoint", c.ANN_SPEC_LEVEL: "Checkpoint"},
    ),
    "a removed sleep-level is written again": (
        pod({c.ANN_SPEC_LEVEL: "L1"}),
        SleepLevel.L1,
        {c.ANN_SLEEP_LEVEL: "L1", c.ANN_SPEC_LEVEL: "L1"},
    ),
    "a terminating pod is left alone": (pod(terminating=True), SleepLevel.L1, None),
    "Stop is never written on a pod": (pod(), SleepLevel.STOP, None),
}


@pytest.mark.parametrize(("the_pod", "level", "expected"), list(CASES.values()), ids=list(CASES))
def test_level_patch(the_pod: dict[str, Any], level: SleepLevel, expected: dict[str, str] | None) -> None:
    assert level_patch(the_pod, level) == expected


@pytest.mark.parametrize(("the_pod", "level", "expected"), list(CASES.values()), ids=list(CASES))
def test_the_resync_decides_from_the_index_as_from_the_pod(
    the_pod: dict[str, Any], level: SleepLevel, expected: dict[str, str] | None
) -> None:
    assert needs_level(PodView.from_pod(the_pod), level) == (expected is not None)
