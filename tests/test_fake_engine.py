"""The fake vLLM engine behaves like vLLM's sleep API, and its memory and answers show what a wake did."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.engine_fixtures import FakeEngine, start_fake_engine

MIB = 1024 * 1024
WEIGHTS_MIB = 32
PROMPT = "The capital of France is"


@pytest.fixture
def engine() -> Iterator[FakeEngine]:
    with start_fake_engine(weights_mib=WEIGHTS_MIB, kv_mib=8) as running:
        yield running


def call(engine: FakeEngine, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, engine.url + path, timeout=10, **kwargs)


def complete(engine: FakeEngine, prompt: str = PROMPT, timeout: float = 10) -> str:
    response = httpx.post(
        f"{engine.url}/v1/completions",
        json={"model": "fake-model", "prompt": prompt, "max_tokens": 8},
        timeout=timeout,
    )
    response.raise_for_status()
    text: str = response.json()["choices"][0]["text"]
    return text


def is_sleeping(engine: FakeEngine) -> bool:
    sleeping: bool = call(engine, "GET", "/is_sleeping").json()["is_sleeping"]
    return sleeping


def waiting_requests(engine: FakeEngine) -> int:
    for line in call(engine, "GET", "/metrics").text.splitlines():
        if line.startswith("vllm:num_requests_waiting{"):
            return int(line.split()[-1])
    raise AssertionError("no vllm:num_requests_waiting in /metrics")


def until_held(engine: FakeEngine, count: int = 1) -> None:
    """Wait until `count` requests are held by the engine (a slow machine may take a while to send)."""
    deadline = time.monotonic() + 5
    while waiting_requests(engine) < count:
        assert time.monotonic() < deadline, "the request never reached the engine"
        time.sleep(0.02)


def memory(engine: FakeEngine) -> dict[str, Any]:
    report: dict[str, Any] = call(engine, "GET", "/debug/memory").json()
    return report


def test_health_and_models_answer_and_an_awake_engine_is_not_sleeping(engine: FakeEngine) -> None:
    assert call(engine, "GET", "/health").status_code == 200
    assert call(engine, "GET", "/v1/models").json()["data"][0]["id"] == "fake-model"
    assert is_sleeping(engine) is False
    assert memory(engine)["device_bytes"] == (WEIGHTS_MIB + 8) * MIB


def test_answers_are_deterministic_per_prompt(engine: FakeEngine) -> None:
    assert complete(engine) == complete(engine)
    assert complete(engine) != complete(engine, "Another prompt")


def test_level1_cycle_frees_device_memory_and_restores_the_same_answer(engine: FakeEngine) -> None:
    before = complete(engine)
    rss_awake = engine.rss_bytes()

    assert call(engine, "POST", "/sleep?level=1").json() == {"status": "sleeping", "level": 1}
    assert is_sleeping(engine)
    assert call(engine, "GET", "/health").status_code == 200
    assert rss_awake - engine.rss_bytes() >= WEIGHTS_MIB * MIB * 0.9
    asleep = memory(engine)
    assert asleep["device_bytes"] == 0
    assert asleep["host_bytes"] == WEIGHTS_MIB * MIB
    assert asleep["sleep_level"] == 1

    assert call(engine, "POST", "/wake_up").json() == {"status": "awake", "tags": None}
    assert not is_sleeping(engine)
    assert engine.rss_bytes() >= rss_awake - 4 * MIB
    assert memory(engine)["host_bytes"] == 0
    assert complete(engine) == before


def test_level2_cycle_with_the_full_wake_sequence_restores_the_same_answer(engine: FakeEngine) -> None:
    before = complete(engine)
    rss_awake = engine.rss_bytes()

    assert call(engine, "POST", "/sleep?level=2").json() == {"status": "sleeping", "level": 2}
    assert rss_awake - engine.rss_bytes() >= WEIGHTS_MIB * MIB * 0.9
    assert memory(engine)["host_bytes"] == 0  # discarded, not offloaded

    assert call(engine, "POST", "/wake_up?tags=weights").json() == {"status": "sleeping", "tags": ["weights"]}
    assert call(engine, "POST", "/collective_rpc", json={"method": "reload_weights"}).json() == {
        "results": [None]
    }
    assert call(engine, "POST", "/wake_up?tags=kv_cache").json() == {"status": "awake", "tags": ["kv_cache"]}
    assert call(engine, "POST", "/reset_prefix_cache").json() == {"success": True}

    assert not is_sleeping(engine)
    assert memory(engine)["weights_loaded"] is True
    assert complete(engine) == before


def test_a_reload_in_a_new_pod_without_the_weights_file_fetches_the_weights_again(tmp_path: Path) -> None:
    """An engine restored from a snapshot into a new pod (docs/snapshots.md) finds a fresh temporary
    directory: its reload makes the weights again from the model, as vLLM fetches them again."""
    with start_fake_engine(env={"TMPDIR": str(tmp_path)}) as engine:
        before = complete(engine)
        call(engine, "POST", "/sleep?level=2")
        (weights,) = (tmp_path / "hibernate-fake-engine").iterdir()
        weights.unlink()
        call(engine, "POST", "/wake_up?tags=weights")
        call(engine, "POST", "/collective_rpc", json={"method": "reload_weights"})
        call(engine, "POST", "/wake_up?tags=kv_cache")
        call(engine, "POST", "/reset_prefix_cache")
        assert weights.is_file() and memory(engine)["weights_loaded"] is True
        assert complete(engine) == before


def test_level2_wake_without_reload_weights_answers_wrongly(engine: FakeEngine) -> None:
    before = complete(engine)
    call(engine, "POST", "/sleep?level=2")
    call(engine, "POST", "/wake_up")
    call(engine, "POST", "/reset_prefix_cache")

    assert not is_sleeping(engine)
    assert memory(engine)["weights_loaded"] is False
    assert complete(engine) != before


def test_level2_wake_without_reset_prefix_cache_answers_wrongly_for_a_cached_prompt(
    engine: FakeEngine,
) -> None:
    cached = complete(engine)
    call(engine, "POST", "/sleep?level=2")
    call(engine, "POST", "/wake_up?tags=weights")
    call(engine, "POST", "/collective_rpc", json={"method": "reload_weights"})
    call(engine, "POST", "/wake_up?tags=kv_cache")

    assert complete(engine) != cached  # served from a prefix-cache entry whose memory was discarded
    fresh = "A prompt first seen after the wake"
    uncached = complete(engine, fresh)
    call(engine, "POST", "/reset_prefix_cache")
    assert complete(engine, fresh) == uncached  # the weights themselves are right
    assert complete(engine) == cached


def test_partial_wake_stays_sleeping_until_every_tag_is_back(engine: FakeEngine) -> None:
    call(engine, "POST", "/sleep?level=1")
    call(engine, "POST", "/wake_up?tags=weights")
    assert is_sleeping(engine)
    assert memory(engine)["asleep_tags"] == ["kv_cache"]
    call(engine, "POST", "/wake_up?tags=kv_cache")
    assert not is_sleeping(engine)


def test_level0_pauses_scheduling_only(engine: FakeEngine) -> None:
    assert call(engine, "POST", "/sleep?level=0").json() == {"status": "sleeping", "level": 0}
    assert is_sleeping(engine)
    assert memory(engine)["device_bytes"] == (WEIGHTS_MIB + 8) * MIB
    assert call(engine, "POST", "/wake_up?tags=scheduling").json()["status"] == "awake"
    assert not is_sleeping(engine)


def test_a_request_sent_while_asleep_is_held_and_answered_after_the_wake(engine: FakeEngine) -> None:
    before = complete(engine)
    call(engine, "POST", "/sleep?level=1")
    with ThreadPoolExecutor(1) as pool:
        held: Future[str] = pool.submit(complete, engine)
        until_held(engine)
        time.sleep(0.3)
        assert not held.done()  # held, neither answered nor failed
        call(engine, "POST", "/wake_up?tags=weights")
        time.sleep(0.2)
        assert not held.done()  # a partial wake does not resume scheduling
        call(engine, "POST", "/wake_up?tags=kv_cache")
        assert held.result(timeout=5) == before


def test_sleep_in_abort_mode_aborts_the_requests_it_holds(engine: FakeEngine) -> None:
    call(engine, "POST", "/sleep?level=1")

    def finish_reason() -> str:
        body = call(engine, "POST", "/v1/completions", json={"prompt": PROMPT}).json()
        reason: str = body["choices"][0]["finish_reason"]
        return reason

    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(finish_reason)
        until_held(engine)
        call(engine, "POST", "/sleep?level=1&mode=abort")  # a second sleep aborts what queued meanwhile
        assert held.result(timeout=5) == "abort"


def running_requests(engine: FakeEngine) -> int:
    for line in call(engine, "GET", "/metrics").text.splitlines():
        if line.startswith("vllm:num_requests_running{"):
            return int(line.split()[-1])
    raise AssertionError("no vllm:num_requests_running in /metrics")


def until_running(engine: FakeEngine, count: int = 1) -> None:
    deadline = time.monotonic() + 5
    while running_requests(engine) < count:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.02)


def long_completion(engine: FakeEngine, max_tokens: int) -> dict[str, Any]:
    body = {"model": "fake-model", "prompt": PROMPT, "max_tokens": max_tokens}
    response = httpx.post(f"{engine.url}/v1/completions", json=body, timeout=60)
    response.raise_for_status()
    choice: dict[str, Any] = response.json()["choices"][0]
    return choice


def test_a_sleep_in_wait_mode_lets_the_running_requests_finish_and_holds_new_ones() -> None:
    with (
        start_fake_engine("--token-delay", "0.05", weights_mib=4, kv_mib=1) as engine,
        ThreadPoolExecutor(3) as pool,
    ):
        running = pool.submit(long_completion, engine, 20)  # about 1 s
        until_running(engine)
        started = time.monotonic()
        sleep = pool.submit(call, engine, "POST", "/sleep?level=1&mode=wait")
        time.sleep(0.2)
        assert not sleep.done()  # waits for the running request
        newcomer = pool.submit(long_completion, engine, 2)
        until_held(engine)  # a new request queues, as in vLLM (PAUSED_NEW)
        choice = running.result(timeout=10)
        assert choice["finish_reason"] == "length" and len(choice["text"].split()) == 20
        assert sleep.result(timeout=5).status_code == 200
        assert time.monotonic() - started >= 0.5
        assert is_sleeping(engine) and memory(engine)["sleep_level"] == 1
        assert not newcomer.done()
        call(engine, "POST", "/wake_up")
        assert newcomer.result(timeout=5)["finish_reason"] == "length"


def test_an_abort_sleep_ends_a_drain_that_is_still_waiting() -> None:
    with (
        start_fake_engine("--token-delay", "0.1", weights_mib=4, kv_mib=1) as engine,
        ThreadPoolExecutor(2) as pool,
    ):
        running = pool.submit(long_completion, engine, 200)  # about 20 s
        until_running(engine)
        waiting = pool.submit(call, engine, "POST", "/sleep?level=1&mode=wait")
        time.sleep(0.3)
        started = time.monotonic()
        assert call(engine, "POST", "/sleep?level=1&mode=abort").status_code == 200
        assert time.monotonic() - started < 2
        assert running.result(timeout=5)["finish_reason"] == "abort"
        assert waiting.result(timeout=5).status_code == 200  # then finds it asleep: a no-op
        assert is_sleeping(engine)


def test_metrics_count_finished_requests_by_finish_reason_as_vllm_does(engine: FakeEngine) -> None:
    def finished() -> dict[str, float]:
        out = {}
        for line in call(engine, "GET", "/metrics").text.splitlines():
            if line.startswith("vllm:request_success_total{"):
                reason = line.split('finished_reason="')[1].split('"')[0]
                out[reason] = float(line.split()[-1])
        return out

    before = finished()
    assert set(before) >= {"length", "abort"}
    complete(engine)
    complete(engine, "another prompt")
    after = finished()
    assert after["length"] == before["length"] + 2 and after["abort"] == before["abort"]
    text = call(engine, "GET", "/metrics").text
    assert "# TYPE vllm:request_success_total counter" in text


def test_streaming_sends_sse_chunks_then_done_with_the_same_text(engine: FakeEngine) -> None:
    text = complete(engine)
    completion = stream(engine, "/v1/completions", {"prompt": PROMPT, "max_tokens": 8, "stream": True})
    assert completion[-1] == "[DONE]"
    chunks = [json.loads(data) for data in completion[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"

    chat = stream(
        engine,
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True},
    )
    deltas = [json.loads(data)["choices"][0]["delta"] for data in chat[:-1]]
    assert deltas[0]["role"] == "assistant"
    assert len("".join(d.get("content", "") for d in deltas).split()) == 4
    assert chat[-1] == "[DONE]"


def stream(engine: FakeEngine, path: str, body: dict[str, Any]) -> list[str]:
    with httpx.stream("POST", engine.url + path, json=body, timeout=10) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        return [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]


def test_chat_completion_has_the_openai_shape(engine: FakeEngine) -> None:
    body = call(
        engine, "POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}
    ).json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["completion_tokens"] == 16


def test_bad_level_mode_or_rpc_body_is_a_400_with_an_openai_error() -> None:
    with start_fake_engine(weights_mib=4, kv_mib=1) as engine:
        for query in ("level=3", "level=-1", "level=one", "level=1&mode=later"):
            response = call(engine, "POST", f"/sleep?{query}")
            assert response.status_code == 400, query
            assert response.json()["error"]["code"] == 400
        assert call(engine, "POST", "/collective_rpc", content=b"{not json").status_code == 400
        assert call(engine, "POST", "/collective_rpc", json={"args": []}).status_code == 400
        assert call(engine, "POST", "/collective_rpc", json=["reload_weights"]).status_code == 400
        assert not is_sleeping(engine)


def test_api_030_answers_sleep_and_wake_up_with_empty_bodies() -> None:
    with start_fake_engine("--api", "0.30", weights_mib=4, kv_mib=1) as engine:
        slept = call(engine, "POST", "/sleep?level=1")
        assert (slept.status_code, slept.content) == (200, b"")
        assert is_sleeping(engine)
        woke = call(engine, "POST", "/wake_up")
        assert (woke.status_code, woke.content) == (200, b"")
        assert not is_sleeping(engine)


def test_sleep_endpoints_exist_only_with_sleep_mode_or_dev_mode() -> None:
    with start_fake_engine(weights_mib=4, kv_mib=1, sleep_mode=False) as engine:
        for method, path in [("POST", "/sleep"), ("POST", "/wake_up"), ("GET", "/is_sleeping")]:
            assert call(engine, method, path).status_code == 404
        assert call(engine, "GET", "/health").status_code == 200
    with start_fake_engine(
        weights_mib=4, kv_mib=1, sleep_mode=False, env={"VLLM_SERVER_DEV_MODE": "1"}
    ) as engine:
        assert call(engine, "POST", "/sleep?level=1").status_code == 200


def test_fault_knobs_make_sleep_fail_or_hang() -> None:
    with start_fake_engine("--fail-sleep", weights_mib=4, kv_mib=1) as engine:
        assert call(engine, "POST", "/sleep?level=1").status_code == 500
        assert not is_sleeping(engine)  # a failed sleep changes nothing
        call(engine, "POST", "/debug/faults", json={"fail_sleep": False, "hang_wake": True})
        assert call(engine, "POST", "/sleep?level=1").status_code == 200
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{engine.url}/wake_up", timeout=0.5)


def test_the_test_only_wrong_after_wake_knob_makes_a_woken_engine_answer_otherwise() -> None:
    """For the agent's wake check: an engine whose wake lost its weights, on demand (never in vLLM)."""
    with start_fake_engine(weights_mib=4, kv_mib=1) as engine:
        before = complete(engine)
        call(engine, "POST", "/debug/faults", json={"wrong_after_wake": True})
        assert complete(engine) == before, "the knob alone changes nothing"
        assert call(engine, "POST", "/sleep?level=1").status_code == 200
        assert call(engine, "POST", "/wake_up").status_code == 200
        assert not is_sleeping(engine)
        assert complete(engine) != before
    with start_fake_engine("--wrong-after-wake", weights_mib=4, kv_mib=1) as engine:
        assert call(engine, "GET", "/debug/faults").json()["wrong_after_wake"] is True


def test_sigterm_stops_the_engine_cleanly_even_with_a_held_request(engine: FakeEngine) -> None:
    assert os.listdir(f"/proc/{engine.pid}/task") == [str(engine.pid)]  # one thread, for CRIU
    call(engine, "POST", "/sleep?level=1")
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(complete, engine)
        until_held(engine)
        engine.process.send_signal(signal.SIGTERM)
        assert engine.process.wait(timeout=5) == 0
        held.exception(timeout=5)
