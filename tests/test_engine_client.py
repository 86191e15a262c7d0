"""The agent's engine client: whole sleep/wake transitions against the fake engine, and clear errors."""

from __future__ import annotations

import asyncio
import importlib.abc
import json
import sys
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import httpx
import pytest

from hibernate.agent.engine_client import EngineClient, EngineError
from hibernate.agent.levels import Host
from hibernate.agent.podref import PodRef
from hibernate.api import constants as c
from tests.engine_fixtures import FakeEngine, free_port, start_fake_engine

T = TypeVar("T")
PROMPT = "Sleep well, little model"


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


def complete(engine: FakeEngine) -> str:
    body = httpx.post(f"{engine.url}/v1/completions", json={"prompt": PROMPT}, timeout=10).json()
    text: str = body["choices"][0]["text"]
    return text


def device_bytes(engine: FakeEngine) -> int:
    value: int = httpx.get(f"{engine.url}/debug/memory", timeout=10).json()["device_bytes"]
    return value


Handler = Callable[[httpx.Request], httpx.Response]


def mocked(handler: Handler, **options: Any) -> tuple[EngineClient, list[str]]:
    """A client whose engine is `handler`; the list records "METHOD /path?query" of every request."""
    seen: list[str] = []

    def record(request: httpx.Request) -> httpx.Response:
        query = request.url.query.decode()
        seen.append(f"{request.method} {request.url.path}" + (f"?{query}" if query else ""))
        return handler(request)

    options = {"retries": 2, "backoff": 0.01, "timeout": 2.0, **options}
    return EngineClient("http://engine.test:8000", transport=httpx.MockTransport(record), **options), seen


def answer(body: object = None, status: int = 200, text: str | None = None) -> Handler:
    content = text if text is not None else ("" if body is None else json.dumps(body))
    return lambda request: httpx.Response(status, text=content)


# --- whole transitions against the fake engine --------------------------------------------------


def test_level1_sleep_and_wake_free_the_device_memory_and_keep_the_answer() -> None:
    with start_fake_engine(weights_mib=16, kv_mib=4) as engine:
        before = complete(engine)

        async def cycle() -> None:
            async with EngineClient(engine.url, timeout=5) as client:
                await client.sleep_level(1)
                assert await client.is_sleeping()
                assert device_bytes(engine) == 0
                await client.wake(1)
                assert not await client.is_sleeping()

        run(cycle())
        assert complete(engine) == before


def test_wake_from_level2_reloads_the_weights_and_resets_the_prefix_cache() -> None:
    with start_fake_engine(weights_mib=16, kv_mib=4) as engine:
        before = complete(engine)  # now also in the prefix cache

        async def cycle() -> None:
            async with EngineClient(engine.url, timeout=5) as client:
                await client.sleep_level(2)
                await client.wake(2)

        run(cycle())
        assert complete(engine) == before


class _ImportWatch(importlib.abc.MetaPathFinder):
    """A finder first on sys.meta_path: it sees every module that Python searches for, finds none."""

    def __init__(self) -> None:
        self.searched: list[str] = []

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> None:
        self.searched.append(fullname)
        return None


def test_a_request_to_the_engine_searches_the_import_path_for_nothing() -> None:
    # httpcore imports sniffio on every lock it makes; where sniffio is missing that import fails
    # each time, uncached, and costs a search of sys.path per request (encode/httpcore#1103).
    watch = _ImportWatch()
    with start_fake_engine(weights_mib=4, kv_mib=1) as engine:

        async def calls() -> None:
            async with EngineClient(engine.url, timeout=5) as client:
                await client.is_sleeping()  # the first request imports what it needs once
                sys.meta_path.insert(0, watch)
                try:
                    for _ in range(3):
                        await client.is_sleeping()
                        await client.wake_up()
                finally:
                    sys.meta_path.remove(watch)

        run(calls())
    assert watch.searched == []


def test_api_030_empty_bodies_are_accepted() -> None:
    with start_fake_engine("--api", "0.30", weights_mib=4, kv_mib=1) as engine:

        async def cycle() -> None:
            async with EngineClient(engine.url, timeout=5) as client:
                assert await client.sleep(1) is None
                assert await client.wake_up() is None
                await client.sleep_level(2)
                await client.wake(2)

        run(cycle())


def test_an_engine_that_fails_to_sleep_is_reported_with_its_status_and_message() -> None:
    with start_fake_engine("--fail-sleep", weights_mib=4, kv_mib=1) as engine:
        with pytest.raises(EngineError) as failure:
            run(EngineClient(engine.url, timeout=5, retries=1, backoff=0.01).sleep_level(1))
        assert failure.value.status == 500
        assert "HTTP 500" in str(failure.value)
        assert "injected fault" in str(failure.value)
        assert "after 2 attempts" in str(failure.value)


# --- errors -------------------------------------------------------------------------------------


def test_a_refused_connection_is_retried_then_named_in_the_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    client = EngineClient(url, timeout=2, retries=2, backoff=0.01)
    with pytest.raises(EngineError) as failure:
        run(client.sleep(1))
    message = str(failure.value)
    assert url in message
    assert "POST /sleep?level=1&mode=abort" in message
    assert "connection refused (after 3 attempts)" in message
    assert (failure.value.url, failure.value.step) == (url, "POST /sleep?level=1&mode=abort")
    assert run(EngineClient(url, timeout=2).health()) is False


def test_a_hanging_engine_times_out_instead_of_hanging_the_agent() -> None:
    with start_fake_engine("--hang-sleep", weights_mib=4, kv_mib=1) as engine:
        client = EngineClient(engine.url, timeout=0.5, retries=3, backoff=0.01)
        started = time.monotonic()
        with pytest.raises(EngineError, match=r"no answer within 0.5s \(timeout\)"):
            run(client.sleep(1))
        assert time.monotonic() - started < 1.5  # a stuck engine is not asked again
        assert run(EngineClient(engine.url, timeout=2).health()) is True


def test_garbage_answers_are_errors_that_quote_the_answer() -> None:
    client, _ = mocked(answer(text="<html>502 Bad Gateway</html>"))
    with pytest.raises(EngineError, match=r"GET /is_sleeping failed: garbage answer, not JSON: '<html>502"):
        run(client.is_sleeping())
    client, _ = mocked(answer({"sleeping": "yes"}))
    with pytest.raises(EngineError, match="unexpected answer"):
        run(client.is_sleeping())
    client, _ = mocked(answer(["sleeping"]))
    with pytest.raises(EngineError, match="unexpected answer"):
        run(client.sleep(1))


def test_5xx_answers_are_retried_with_backoff_then_reported() -> None:
    client, seen = mocked(answer({"error": {"message": "EngineCore died"}}, status=500), retries=2)
    with pytest.raises(EngineError) as failure:
        run(client.wake_up(["weights"]))
    assert seen == ["POST /wake_up?tags=weights"] * 3
    assert failure.value.status == 500
    assert "HTTP 500" in str(failure.value)
    assert "EngineCore died" in str(failure.value)


def test_a_5xx_followed_by_an_answer_recovers() -> None:
    answers = iter([httpx.Response(503, text="busy"), httpx.Response(200, json={"is_sleeping": True})])
    client, seen = mocked(lambda request: next(answers))
    assert run(client.is_sleeping()) is True
    assert len(seen) == 2


def test_4xx_is_not_retried_and_404_points_at_dev_mode() -> None:
    client, seen = mocked(answer({"detail": "Not Found"}, status=404))
    with pytest.raises(EngineError, match="VLLM_SERVER_DEV_MODE=1") as failure:
        run(client.sleep(2))
    assert failure.value.status == 404
    assert len(seen) == 1


def test_reset_prefix_cache_is_repeated_while_the_engine_answers_success_false() -> None:
    answers = iter([{"success": False}, {"success": False}, {"success": True}])
    client, seen = mocked(lambda request: httpx.Response(200, json=next(answers)), retries=3)
    run(client.reset_prefix_cache())
    assert len(seen) == 3

    client, seen = mocked(answer({"success": False}), retries=2)
    with pytest.raises(EngineError, match="success false after 3 attempts"):
        run(client.reset_prefix_cache())


def test_wake_from_level2_calls_the_documented_sequence_in_order() -> None:
    bodies: list[Any] = []

    def engine(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/collective_rpc":
            bodies.append(json.loads(request.content))
            return httpx.Response(200, json={"results": [None]})
        if request.url.path == "/is_sleeping":
            return httpx.Response(200, json={"is_sleeping": False})
        return httpx.Response(200, json={"success": True} if "reset" in request.url.path else {})

    client, seen = mocked(engine)
    run(client.wake(2))
    assert seen == [
        "POST /wake_up?tags=weights",
        "POST /collective_rpc",
        "POST /wake_up?tags=kv_cache",
        "POST /reset_prefix_cache",
        "GET /is_sleeping",
    ]
    assert bodies == [{"method": "reload_weights"}]


def test_a_wake_that_leaves_the_engine_sleeping_is_an_error() -> None:
    def engine(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/is_sleeping":
            return httpx.Response(200, json={"is_sleeping": True})
        return httpx.Response(200)

    client, _ = mocked(engine)
    with pytest.raises(EngineError, match=r"wake from level 1 failed: .*/is_sleeping is true"):
        run(client.wake(1))


def test_a_sleep_the_engine_does_not_report_is_an_error() -> None:
    def engine(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/is_sleeping":
            return httpx.Response(200, json={"is_sleeping": False})
        return httpx.Response(200, json={"status": "sleeping", "level": 1})

    client, _ = mocked(engine)
    with pytest.raises(EngineError, match="sleep level 1 failed"):
        run(client.sleep_level(1))


def test_collective_rpc_returns_the_results_or_none_for_an_empty_answer() -> None:
    client, _ = mocked(answer({"results": ["ok", None]}))
    assert run(client.collective_rpc("ping", args=["a"], kwargs={"k": "v"})) == ["ok", None]
    client, _ = mocked(answer(None))
    assert run(client.collective_rpc("ping")) is None


def test_levels_outside_the_engine_api_are_refused_before_any_request() -> None:
    client, seen = mocked(answer({}))
    with pytest.raises(ValueError):
        run(client.sleep_level(3))
    with pytest.raises(ValueError):
        run(client.wake(4))
    assert seen == []


def test_an_endless_answer_is_cut_off_and_reported_not_read_into_memory() -> None:
    """An engine is hostile input: a 'boolean' answer of 2 MiB stops at the agent's limit."""
    client, _ = mocked(answer(text="[" + "1," * (1 << 20) + "1]"))
    with pytest.raises(EngineError, match=r"GET /is_sleeping failed: answer larger than 1048576 bytes"):
        run(client.is_sleeping())


# --- a sleep drains first -------------------------------------------------------------------------


def completion(engine: FakeEngine, max_tokens: int) -> dict[str, Any]:
    body = {"model": "fake-model", "prompt": PROMPT, "max_tokens": max_tokens}
    choice: dict[str, Any] = httpx.post(f"{engine.url}/v1/completions", json=body, timeout=60).json()[
        "choices"
    ][0]
    return choice


def running(engine: FakeEngine) -> int:
    for line in httpx.get(f"{engine.url}/metrics", timeout=5).text.splitlines():
        if line.startswith("vllm:num_requests_running{"):
            return int(line.split()[-1])
    return 0


def in_flight(engine: FakeEngine, max_tokens: int) -> tuple[ThreadPoolExecutor, Future[dict[str, Any]]]:
    pool = ThreadPoolExecutor(1)
    request = pool.submit(completion, engine, max_tokens)
    deadline = time.monotonic() + 5
    while running(engine) < 1:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.02)
    return pool, request


def test_a_sleep_lets_the_request_in_flight_finish_before_the_engine_sleeps() -> None:
    with start_fake_engine("--token-delay", "0.05", weights_mib=4, kv_mib=1) as engine:
        pool, request = in_flight(engine, 30)  # about 1.5 s of tokens
        started = time.monotonic()
        run(EngineClient(engine.url, timeout=5, drain_seconds=10).sleep_level(1))
        took = time.monotonic() - started
        assert request.done(), "the engine slept before the request finished"
        choice = request.result()
        pool.shutdown()
        assert choice["finish_reason"] == "length" and len(choice["text"].split()) == 30
        assert 0.5 < took < 8, took
        assert httpx.get(f"{engine.url}/is_sleeping").json() == {"is_sleeping": True}


def test_after_the_drain_deadline_the_requests_still_running_are_aborted() -> None:
    with start_fake_engine("--token-delay", "0.1", weights_mib=4, kv_mib=1) as engine:
        pool, request = in_flight(engine, 300)  # about 30 s of tokens
        started = time.monotonic()
        run(EngineClient(engine.url, timeout=5, drain_seconds=1).sleep_level(1))
        took = time.monotonic() - started
        assert 0.9 < took < 5, took
        assert request.result(timeout=5)["finish_reason"] == "abort"
        pool.shutdown()
        assert httpx.get(f"{engine.url}/is_sleeping").json() == {"is_sleeping": True}


def test_the_drain_asks_for_mode_wait_and_falls_back_to_abort_where_it_is_refused() -> None:
    def engine(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/is_sleeping":
            return httpx.Response(200, json={"is_sleeping": True})
        if request.url.params.get("mode") == "wait":
            return httpx.Response(400, json={"error": {"message": "mode must be one of ['abort']"}})
        return httpx.Response(200, json={"status": "sleeping", "level": 2})

    client, seen = mocked(engine, drain_seconds=30)
    run(client.sleep_level(2))
    assert seen == ["POST /sleep?level=2&mode=wait", "POST /sleep?level=2&mode=abort", "GET /is_sleeping"]
    # No drain (0 s), or an explicit mode: one call, as asked.
    client, seen = mocked(engine)
    run(client.sleep_level(1))
    assert seen == ["POST /sleep?level=1&mode=abort", "GET /is_sleeping"]
    client, seen = mocked(engine, drain_seconds=30)
    run(client.sleep_level(1, mode="keep"))
    assert seen[0] == "POST /sleep?level=1&mode=keep"


# --- the agent's hint: what follows the sleep --------------------------------------------------


def test_a_sleep_carries_the_hint_of_what_follows_it_and_the_fake_engine_records_it() -> None:
    with start_fake_engine(weights_mib=4, kv_mib=1) as engine:

        async def cycle() -> None:
            async with EngineClient(engine.url, timeout=5) as client:
                await client.sleep_level(1, prepare=c.PREPARE_CUDA_SUSPEND)
                await client.wake(1)
                await client.sleep_level(2, prepare=c.PREPARE_CHECKPOINT)
                await client.wake(2)
                await client.sleep_level(1)  # a plain level 1: no hint

        run(cycle())
        memory = httpx.get(f"{engine.url}/debug/memory", timeout=10).json()
        assert memory["sleep_hints"] == [c.PREPARE_CUDA_SUSPEND, c.PREPARE_CHECKPOINT]


def test_an_engine_that_refuses_the_hint_is_asked_again_without_it() -> None:
    with start_fake_engine(weights_mib=4, kv_mib=1) as engine:
        httpx.post(f"{engine.url}/debug/faults", json={"refuse_hints": True}, timeout=10)

        async def cycle() -> None:
            async with EngineClient(engine.url, timeout=5, drain_seconds=5) as client:
                await client.sleep_level(2, prepare=c.PREPARE_CHECKPOINT)  # the drain path
                assert await client.is_sleeping()
                await client.wake(2)
                await client.sleep_level(1, mode="abort", prepare=c.PREPARE_CUDA_SUSPEND)
                assert await client.is_sleeping()

        run(cycle())
        memory = httpx.get(f"{engine.url}/debug/memory", timeout=10).json()
        assert memory["sleep_hints"] == [] and memory["sleep_level"] == 1


def test_the_hint_goes_as_a_query_parameter_and_a_5xx_is_not_taken_for_a_refusal() -> None:
    client, seen = mocked(answer({"error": "boom"}, status=500), retries=0)
    with pytest.raises(EngineError):
        run(client.sleep(2, prepare=c.PREPARE_CHECKPOINT))
    assert seen == ["POST /sleep?level=2&mode=abort&hibernate=checkpoint"]
    with pytest.raises(ValueError, match="sleep hints"):
        run(client.sleep(1, prepare="make-coffee"))


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, 30.0),
        ("5", 5.0),
        ("0", 0.0),
        ("2.5", 2.5),
        ("-3", 0.0),
        ("1e9", 3600.0),
        ("soon", 30.0),
        ("nan", 30.0),
    ],
)
def test_the_agent_takes_the_drain_deadline_from_the_pod(raw: str | None, expected: float) -> None:
    annotations = {c.ANN_DRAIN_SECONDS: raw} if raw is not None else {}
    pod = PodRef.from_pod(
        {"metadata": {"name": "p", "annotations": annotations}, "status": {"podIP": "10.0.0.1"}}
    )
    assert pod.drain_seconds == expected
    client = Host().engine(pod)
    assert client.drain_seconds == expected
    run(client.aclose())
