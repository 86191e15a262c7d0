"""A woken replica serves only once it answers right (issue 15): the wake check.

Before a sleep at CudaSuspend or Checkpoint the agent records a short greedy completion; after the
wake the same prompt must give the same text, or the wake is Failed (both answers in the Warning) and
the engine is restarted cold in its pod. The fake engine's test-only `wrong_after_wake` knob plays an
engine whose wake lost its weights. On by default, off with `spec.verifyWake: false`.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from hibernate.agent.engine_client import EngineClient
from hibernate.agent.podref import PodRef
from hibernate.agent.wakecheck import MAX_TOKENS, PROMPT, Reference
from hibernate.api import constants as c
from hibernate.api.v1alpha1 import ModelDeploymentSpec
from hibernate.controller import workload
from tests.cluster import Cluster, eventually
from tests.engine_fixtures import start_fake_engine
from tests.faultkit import AgentRunner, EnginePod, assert_truth, engine_pod, need_root_and_criu, reported
from tests.modeldeployments import apply, get, manifest
from tests.pods import pod_events

LEVELS = {3: "CudaSuspend", 4: "Checkpoint"}


@pytest.fixture
def agents(cluster: Cluster, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[AgentRunner]:
    need_root_and_criu()
    runner = AgentRunner(cluster, tmp_path, tmp_path / "checkpoints", tmp_path / "fake-cuda")
    yield runner
    runner.stop_all()
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    if failed or os.environ.get("HIBERNATE_TEST_LOGS"):
        print(runner.logs())


def answer_wrong_after_the_next_wake(pod: EnginePod) -> None:
    httpx.post(f"{pod.url}/debug/faults", json={"wrong_after_wake": True}, timeout=10).raise_for_status()


# -- the switch: spec.verifyWake -> the pod template ---------------------------------------------------


def test_verify_wake_is_on_by_default_and_off_through_a_pod_template_annotation() -> None:
    on = workload.pod_template("m", ModelDeploymentSpec(model="m"), "")
    assert c.ANN_VERIFY_WAKE not in on["metadata"]["annotations"], "the default template is unchanged"
    off = workload.pod_template(
        "m", ModelDeploymentSpec.model_validate({"model": "m", "verifyWake": False}), ""
    )
    assert off["metadata"]["annotations"][c.ANN_VERIFY_WAKE] == "false"


def test_the_api_server_defaults_verify_wake_to_true(cluster: Cluster, namespace: str) -> None:
    apply(cluster, namespace, manifest("on"))
    apply(cluster, namespace, {**manifest("off"), "spec": {**manifest("off")["spec"], "verifyWake": False}})
    assert get(cluster, namespace, "on")["spec"]["verifyWake"] is True
    assert get(cluster, namespace, "off")["spec"]["verifyWake"] is False


# -- the engine client's completion ---------------------------------------------------------------------


def test_the_engine_client_asks_the_served_model_a_greedy_completion_cut_to_size() -> None:
    async def ask(url: str) -> tuple[list[str], str, str, str]:
        async with EngineClient(url, timeout=10) as engine:
            models = await engine.models()
            first = await engine.complete(models[0], PROMPT, MAX_TOKENS)
            again = await engine.complete(models[0], PROMPT, MAX_TOKENS)
            short = await engine.complete(models[0], PROMPT, MAX_TOKENS, limit=5)
            return models, first, again, short

    with start_fake_engine("--served-model-name", "served-a", "served-b", weights_mib=4, kv_mib=1) as engine:
        models, first, again, short = asyncio.run(ask(engine.url))
    assert models == ["served-a", "served-b"]
    assert first == again and len(first.split()) == MAX_TOKENS
    assert short == first[:5]


def test_a_record_that_is_not_the_agents_is_no_reference() -> None:
    def ref(raw: str) -> PodRef:
        return PodRef.from_pod({"metadata": {"uid": "u", "annotations": {c.ANN_WAKE_CHECK: raw}}})

    good = Reference("m", PROMPT, MAX_TOKENS, " a b", "2026-12-01T00:00:00Z")
    assert Reference.from_pod(ref(good.to_json())) == good
    for bad in (
        "",
        "{",
        "[]",
        json.dumps({"model": "m"}),
        json.dumps({**json.loads(good.to_json()), "max_tokens": 10**6}),
    ):
        assert Reference.from_pod(ref(bad)) is None, bad


# -- through the agent ------------------------------------------------------------------------------------


@pytest.mark.criu
@pytest.mark.parametrize("level", [3, 4], ids=LEVELS.get)
def test_a_woken_engine_that_answers_otherwise_fails_with_both_answers_and_starts_cold(
    cluster: Cluster, namespace: str, agents: AgentRunner, level: int
) -> None:
    with engine_pod(cluster, namespace, agents.checkpoints, agents.fake_cuda, "Awake") as pod:
        agent = agents.start()
        reported(pod, 0, "Awake")
        answer_wrong_after_the_next_wake(pod)  # the knob changes nothing until a wake
        pod.annotate(LEVELS[level])
        op = reported(pod, level, "Asleep", timeout=90)
        assert op["wake_check"] == "recorded", op
        recorded = json.loads(pod.annotations()[c.ANN_WAKE_CHECK])
        assert (recorded["model"], recorded["prompt"], recorded["max_tokens"]) == (
            "fake-model",
            PROMPT,
            MAX_TOKENS,
        )

        pod.annotate("Awake")
        op = reported(pod, level, "Failed", timeout=90)
        assert op["action"] == "cold-start" and "seconds" not in op, op
        assert "the woken engine answers" in op["error"] and repr(recorded["text"]) in op["error"], op
        failed = eventually(
            lambda: [e.message for e in pod_events(cluster, namespace, pod.name) if e.reason == "Failed"],
            what="the Warning",
        )
        assert f"wake {LEVELS[level]} failed: the woken engine answers" in failed[0], failed
        assert f"where it answered {recorded['text']!r} before the sleep" in failed[0], failed
        assert c.ANN_WAKE_CHECK not in pod.annotations()

        pod.restart_container()
        op = reported(pod, 0, "Awake", timeout=90)
        assert op["action"] == "cold-start" and op["error"] is None, op
        assert_truth(pod, 0)  # cold, and right: the baseline answer again
        agent.stop()


@pytest.mark.criu
def test_with_verify_wake_off_nothing_is_recorded_or_checked(
    cluster: Cluster, namespace: str, agents: AgentRunner
) -> None:
    with engine_pod(cluster, namespace, agents.checkpoints, agents.fake_cuda, "Awake") as pod:
        body = {"metadata": {"annotations": {c.ANN_VERIFY_WAKE: "false"}}}
        cluster.core.patch_namespaced_pod(pod.name, namespace, body)
        agent = agents.start()
        reported(pod, 0, "Awake")
        answer_wrong_after_the_next_wake(pod)
        pod.annotate("CudaSuspend")
        op = reported(pod, 3, "Asleep")
        assert "wake_check" not in op and c.ANN_WAKE_CHECK not in pod.annotations(), op
        pod.annotate("Awake")
        op = reported(pod, 0, "Awake")
        assert op["action"] == "wake" and op["error"] is None, op
        assert pod.complete() != pod.baseline, "unchecked: the wrong answers go out (what the check is for)"
        agent.stop()
