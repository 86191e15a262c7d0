"""The wake-on-request gateway against a real API server, the operator, the agent stand-in and fake
engines: no request is lost to sleep, one wake for many requests, failures answer 503 in time,
streams pass through chunk by chunk. A wake is an automatic level: the spec, the person's, stays."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx

from hibernate.api import constants as c
from tests.agent_standin import AgentStandin
from tests.cluster import Cluster, Process, eventually
from tests.engine_fixtures import free_port
from tests.gateway_helpers import (
    GatewayProcess,
    apply_model,
    complete,
    metric_sum,
    settled,
    start_gateway,
)
from tests.modeldeployments import get, set_level

WAKE_ON_REQUEST = "hibernate.dev/wake-on-request"


def phase_is(cluster: Cluster, ns: str, name: str, level: str, phase: str) -> bool:
    """The level in effect (the automatic one, else the spec's) is `level`, at `phase`."""
    return settled(get(cluster, ns, name), level, phase)


def wait_phase(cluster: Cluster, ns: str, name: str, level: str, phase: str, timeout: float = 30) -> None:
    eventually(
        lambda: phase_is(cluster, ns, name, level, phase), timeout=timeout, what=f"{name} {level} {phase}"
    )


def test_200_concurrent_requests_to_a_sleeping_model_are_all_answered_after_exactly_one_wake(
    cluster: Cluster, namespace: str, operator: Process, tmp_path: Path
) -> None:
    port = free_port()
    prompts = [f"prompt number {i}" for i in range(20)]
    with (
        AgentStandin(cluster, namespace, tmp_path) as standin,
        start_gateway(cluster, namespace, tmp_path) as gw,
    ):
        standin.serve("m", "hib/tiny", port)
        apply_model(cluster, namespace, "m", "hib/tiny", port)
        wait_phase(cluster, namespace, "m", "Awake", "Awake")
        with httpx.Client(timeout=30) as client:
            expected = {p: complete(client, gw, "hib/tiny", p).json()["choices"][0]["text"] for p in prompts}
            direct = complete(client, standin.engine_url("m"), "hib/tiny", prompts[0]).json()
        assert direct["choices"][0]["text"] == expected[prompts[0]], "the gateway changed the answer"

        set_level(cluster, namespace, "m", "L1")  # a person puts it to sleep
        wait_phase(cluster, namespace, "m", "L1", "Asleep")
        before = gw.metrics()

        async def burst() -> list[httpx.Response]:
            limits = httpx.Limits(max_connections=250, max_keepalive_connections=250)
            async with httpx.AsyncClient(timeout=60, limits=limits) as client:
                return await asyncio.gather(
                    *(
                        client.post(
                            f"{gw.url}/v1/completions",
                            json={"model": "hib/tiny", "prompt": prompts[i % 20], "max_tokens": 8},
                        )
                        for i in range(200)
                    )
                )

        started = time.monotonic()
        responses = asyncio.run(burst())
        elapsed = time.monotonic() - started
        bad = [(r.status_code, r.text[:200]) for r in responses if r.status_code != 200]
        assert not bad, bad[:5]
        wrong = [
            i for i, r in enumerate(responses) if r.json()["choices"][0]["text"] != expected[prompts[i % 20]]
        ]
        assert not wrong, f"{len(wrong)} answers differ from the awake answers"

        after = gw.metrics()
        assert (
            metric_sum(after, "hibernate_gateway_wakes_total")
            - metric_sum(before, "hibernate_gateway_wakes_total")
            == 1
        )
        assert after['hibernate_gateway_wakes_total{level="L1"}'] == 1
        assert standin.wakes("m") == 1
        assert [call for _, call in standin.calls].count("POST /wake_up") == 1, standin.calls
        obj = get(cluster, namespace, "m")
        # The person's L1 stays in the spec; the request's wake is an automatic level over it.
        assert obj["spec"]["sleepLevel"] == "L1" and obj["metadata"]["generation"] == 2
        assert obj["metadata"]["annotations"][c.ANN_AUTO_LEVEL] == "Awake"
        assert obj["metadata"]["annotations"][c.ANN_AUTO_SOURCE] == "gateway"
        assert obj["status"]["automaticLevel"]["source"] == "gateway"
        assert obj["status"]["effectiveLevel"] == "Awake"
        assert c.ANN_LAST_ACTIVITY in obj["metadata"]["annotations"]
        held = after["hibernate_gateway_hold_seconds_count"] - before.get(
            "hibernate_gateway_hold_seconds_count", 0
        )
        assert held >= 150, held  # (a few may arrive after the wake and pass straight through)
        assert after["hibernate_gateway_requests_held"] == 0
        ok = (
            after['hibernate_gateway_requests_total{result="ok"}']
            - before['hibernate_gateway_requests_total{result="ok"}']
        )
        assert ok == 200
        # Activity marks are throttled: far fewer writes than requests.
        assert after["hibernate_gateway_activity_writes_total"] < 30
        print(f"200 held requests answered in {elapsed:.2f} s")


def test_routing_models_listing_health_and_activity(
    cluster: Cluster, namespace: str, operator: Process, tmp_path: Path
) -> None:
    awake_port, asleep_port = free_port(), free_port()
    with (
        AgentStandin(cluster, namespace, tmp_path) as standin,
        start_gateway(cluster, namespace, tmp_path) as gw,
    ):
        standin.serve("a", "hib/awake", awake_port)
        standin.serve("b", "hib/asleep", asleep_port)
        apply_model(cluster, namespace, "a", "hib/awake", awake_port)
        apply_model(cluster, namespace, "b", "hib/asleep", asleep_port)
        wait_phase(cluster, namespace, "a", "Awake", "Awake")
        wait_phase(cluster, namespace, "b", "Awake", "Awake")
        with httpx.Client(timeout=30) as client:
            expected = complete(client, standin.engine_url("b"), "hib/asleep", "deep sleep").json()
            set_level(cluster, namespace, "b", "L2")
            wait_phase(cluster, namespace, "b", "L2", "Asleep")
            listed = client.get(f"{gw.url}/v1/models").json()["data"]
            by_id = {m["id"]: m for m in listed}
            assert set(by_id) == {"hib/awake", "hib/asleep"}
            assert by_id["hib/asleep"]["hibernate"]["sleepLevel"] == "L2"
            assert by_id["hib/asleep"]["hibernate"]["automaticLevel"] is None
            assert by_id["hib/asleep"]["hibernate"]["ready"] is False

            unknown = complete(client, gw, "no/such-model", "x")
            assert unknown.status_code == 404 and "hib/awake" in unknown.json()["error"]["message"]
            bad = client.post(f"{gw.url}/v1/completions", content=b"not json")
            assert bad.status_code == 400 and bad.json()["error"]["code"] == 400

            # By ModelDeployment name: the gateway sends the engine its served name.
            by_name = complete(client, gw, "a", "hello")
            assert by_name.status_code == 200 and by_name.json()["model"] == "hib/awake"
            # Engine errors pass through untouched.
            refused = client.post(f"{gw.url}/v1/completions", json={"model": "hib/awake", "prompt": 3})
            assert refused.status_code == 400 and "prompt" in refused.json()["error"]["message"]

            # A request for a model at L2: held, woken (weights reloaded), answered correctly.
            answer = complete(client, gw, "hib/asleep", "deep sleep")
            assert answer.status_code == 200, answer.text
            assert answer.json()["choices"][0]["text"] == expected["choices"][0]["text"]

            health = client.get(f"{gw.url}/healthz").json()
            assert health == {"status": "ok", "synced": True, "models": 2}
            text = client.get(f"{gw.url}/metrics").text
            for name in (
                "hibernate_gateway_requests_total",
                "hibernate_gateway_requests_held",
                "hibernate_gateway_hold_seconds_bucket",
                "hibernate_gateway_wakes_total",
            ):
                assert name in text
            assert 'result="unknown_model"} 1.0' in text and 'result="bad_request"} 1.0' in text

        # Activity marks land on the ModelDeployment, as RFC 3339 UTC.
        def stamped() -> str:
            return str(get(cluster, namespace, "a")["metadata"]["annotations"][c.ANN_LAST_ACTIVITY])

        stamp = eventually(stamped, what="last-activity on a")
        assert stamp.endswith("Z") and "T" in stamp


def test_a_failed_wake_a_silent_agent_a_full_queue_and_wake_on_request_false_answer_503_in_time(
    cluster: Cluster, namespace: str, operator: Process, tmp_path: Path
) -> None:
    ports = {name: free_port() for name in ("fails", "silent", "manual")}
    with (
        AgentStandin(cluster, namespace, tmp_path) as standin,
        start_gateway(cluster, namespace, tmp_path, "--max-held", "5", hold_timeout=3) as gw,
    ):
        for name, port in ports.items():
            standin.serve(name, f"hib/{name}", port)
            annotations = {WAKE_ON_REQUEST: "false"} if name == "manual" else None
            apply_model(cluster, namespace, name, f"hib/{name}", port, level="L1", annotations=annotations)
        for name in ports:
            wait_phase(cluster, namespace, name, "L1", "Asleep")

        # The engine refuses to wake: the agent reports Failed; 503 at once, not after the timeout.
        httpx.post(f"{standin.engine_url('fails')}/debug/faults", json={"fail_wake": True})
        with httpx.Client(timeout=30) as client:
            started = time.monotonic()
            failed = complete(client, gw, "hib/fails", "x")
            assert time.monotonic() - started < 2.9
            assert failed.status_code == 503 and int(failed.headers["Retry-After"]) > 0
            error = failed.json()["error"]
            assert "failed to wake" in error["message"] and "wake_up" in error["message"], error
            # The model stays Failed: the next request is refused at once too.
            again = complete(client, gw, "hib/fails", "x")
            assert again.status_code == 503 and "failed to wake" in again.json()["error"]["message"]

            # A person said no wake on request: 503 at once, and the level stays.
            manual = complete(client, gw, "hib/manual", "x")
            assert manual.status_code == 503 and WAKE_ON_REQUEST in manual.json()["error"]["message"]
            assert get(cluster, namespace, "manual")["spec"]["sleepLevel"] == "L1"

        # The agent never answers: held requests end with 503 after the hold timeout (3 s); beyond
        # --max-held 5, the rest are refused at once.
        standin.paused("silent")

        async def burst() -> list[tuple[float, httpx.Response]]:
            async with httpx.AsyncClient(timeout=30) as client:

                async def one() -> tuple[float, httpx.Response]:
                    t = time.monotonic()
                    r = await client.post(
                        f"{gw.url}/v1/completions", json={"model": "hib/silent", "prompt": "x"}
                    )
                    return time.monotonic() - t, r

                return await asyncio.gather(*(one() for _ in range(8)))

        results = asyncio.run(burst())
        assert all(r.status_code == 503 and "Retry-After" in r.headers for _, r in results)
        full = [(t, r) for t, r in results if "already holds" in r.json()["error"]["message"]]
        timed_out = [(t, r) for t, r in results if "did not wake within 3 s" in r.json()["error"]["message"]]
        assert len(full) == 3 and len(timed_out) == 5, [r.json() for _, r in results]
        assert all(t < 1.0 for t, _ in full)
        assert all(2.5 < t < 5.0 for t, _ in timed_out)

        metrics = gw.metrics()
        assert metrics['hibernate_gateway_requests_total{result="wake_failed"}'] == 2
        assert metrics['hibernate_gateway_requests_total{result="wake_disabled"}'] == 1
        assert metrics['hibernate_gateway_requests_total{result="queue_full"}'] == 3
        assert metrics['hibernate_gateway_requests_total{result="hold_timeout"}'] == 5
        assert metrics["hibernate_gateway_requests_held"] == 0
        assert metric_sum(metrics, "hibernate_gateway_wakes_total") == 2  # fails and silent, not manual


def stream(
    client: httpx.Client, gw: GatewayProcess | str, body: dict[str, Any], path: str
) -> tuple[list[float], str]:
    """Send a streaming request; returns the arrival times of the data chunks and the text."""
    base = gw if isinstance(gw, str) else gw.url
    times: list[float] = []
    text: list[str] = []
    with client.stream("POST", f"{base}{path}", json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            times.append(time.monotonic())
            choice = json.loads(line[6:])["choices"][0]
            text.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
    return times, "".join(text)


def test_streaming_passes_through_chunk_by_chunk_awake_and_after_a_wake(
    cluster: Cluster, namespace: str, operator: Process, tmp_path: Path
) -> None:
    port = free_port()
    with (
        AgentStandin(cluster, namespace, tmp_path) as standin,
        start_gateway(cluster, namespace, tmp_path) as gw,
    ):
        standin.serve("s", "hib/stream", port, "--token-delay", "0.05")
        apply_model(cluster, namespace, "s", "hib/stream", port)
        wait_phase(cluster, namespace, "s", "Awake", "Awake")
        completion = {"model": "hib/stream", "prompt": "tell me", "max_tokens": 12}
        chat = {"model": "hib/stream", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 12}
        with httpx.Client(timeout=30) as client:
            _, direct = stream(client, standin.engine_url("s"), completion, "/v1/completions")
            times, through = stream(client, gw, completion, "/v1/completions")
            assert through == direct and len(through.split()) == 12
            # Chunks arrive as the engine makes them (50 ms a token), not all at the end.
            assert len(times) >= 12 and times[-1] - times[0] >= 0.4, times
            _, chat_direct = stream(client, standin.engine_url("s"), chat, "/v1/chat/completions")
            _, chat_through = stream(client, gw, chat, "/v1/chat/completions")
            assert chat_through == chat_direct

            set_level(cluster, namespace, "s", "L2")
            wait_phase(cluster, namespace, "s", "L2", "Asleep")
            times, held = stream(client, gw, completion, "/v1/completions")
            assert held == direct
            assert times[-1] - times[0] >= 0.4
        assert standin.wakes("s") == 1
