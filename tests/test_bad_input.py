"""Bad input: generated ModelDeployments and pod annotations, and engines that answer garbage.

Property-based (hypothesis), against the real API server and the real operator and agent processes:

- a generated ModelDeployment is either refused at admission with a message naming the field, and
  nothing is stored, or accepted, and then the operator reconciles it (owned Deployment with the
  right replicas, status for the current generation); the operator never crashes;
- a generated change to a stored ModelDeployment is either refused and changes nothing
  (same generation, same spec), or accepted and reconciled;
- a generated `hibernate.dev/sleep-level` on a pod makes the agent move the engine there, or report
  Failed with the valid values (InvalidSleepLevel) and leave the engine as it was; and makes the
  operator's status Degraded with the pod and the value, never crash.

Engines that misbehave (tests/faultkit.BadEngine: garbage, wrong JSON, not HTTP, hangs, trickles,
closes mid-answer, huge bodies, errors) must give a clear Failed state within a bound, while the agent
stays healthy and keeps serving other pods.

Example counts stay modest for CI (HIBERNATE_HYPOTHESIS_EXAMPLES overrides them).
"""

from __future__ import annotations

import itertools
import json
import os
import string
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from kubernetes.client.exceptions import ApiException

from hibernate.api import constants as c
from hibernate.api.levels import LEVEL_NAMES, InvalidSleepLevel, SleepLevel
from hibernate.api.v1alpha1 import ModelDeploymentSpec
from hibernate.controller.kube import apply_body
from tests.cluster import Cluster, Process, eventually, hibernate_process
from tests.engine_fixtures import FakeEngine, complete, start_fake_engine
from tests.faultkit import BadEngine, MirrorAgent, free_port, service_account_ready
from tests.modeldeployments import pods
from tests.pods import annotate, annotations, create_engine_pod, ensure_node, start_pod

NODE = "bad-input-node"
EXAMPLES = int(os.environ.get("HIBERNATE_HYPOTHESIS_EXAMPLES", "0"))
SETTINGS = {
    "deadline": None,
    "derandomize": True,  # the same examples on every run: CI failures reproduce
    "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    "database": None,
    # No shrinking: each example waits on real processes, and shrinking one failure can take minutes.
    "phases": (Phase.explicit, Phase.reuse, Phase.generate),
}
# Text within the Basic Multilingual Plane; characters beyond it are the subject of a test of their own
# (test_a_character_beyond_the_bmp_in_the_spec_is_reconciled).
TEXT = st.characters(max_codepoint=0xFFFF)
_counter = itertools.count()


# -- strategies ------------------------------------------------------------------------------------


def _cased(name: str) -> st.SearchStrategy[str]:
    return st.lists(st.booleans(), min_size=len(name), max_size=len(name)).map(
        lambda flips: "".join(ch.upper() if up else ch.lower() for ch, up in zip(name, flips, strict=True))
    )


LEVELS = st.one_of(
    st.integers(-2, 7),
    st.sampled_from([str(i) for i in range(-1, 7)] + ["05", " 1", "L1 ", "", "l", "Sleep", "3.0"]),
    st.sampled_from(LEVEL_NAMES).flatmap(_cased),
    st.text(TEXT, max_size=8),
    st.booleans(),
    st.floats(-2, 7, allow_nan=False).filter(lambda f: f != int(f)),
    st.none(),
)
QUANTITIES = st.one_of(
    st.integers(-2, 8), st.sampled_from(["1", "16Gi", "500m", "1.5", "abc", "", "-1", "1e3"]), st.floats(0, 4)
)
# Names the workload can carry (DNS-1035 labels; a counter of up to 3 digits is appended), and names the
# API server refuses for any object. Names valid for a custom resource but not for the Service or the
# model label (a dot, a digit first, over 63 characters) are test_a_name_the_workload_cannot_carry_...
NAMES = st.one_of(
    st.from_regex(r"[a-z]([a-z0-9-]{0,56}[a-z0-9])?", fullmatch=True),
    st.text(alphabet=string.ascii_letters + string.digits + "-_", min_size=1, max_size=12).filter(
        lambda n: not n.islower() or "_" in n
    ),
)
SPECS = st.fixed_dictionaries(
    {},
    optional={
        "model": st.one_of(st.text(TEXT, max_size=30), st.integers(0, 3), st.none()),
        "replicas": st.one_of(
            st.integers(-3, 4), st.sampled_from([999, 1000, 1001, 2**31, 2**40]), st.text(TEXT, max_size=3)
        ),
        "sleepLevel": LEVELS,
        "engine": st.fixed_dictionaries(
            {},
            optional={
                "port": st.one_of(st.integers(-1, 70000), st.text(TEXT, max_size=4)),
                "image": st.one_of(st.text(TEXT, max_size=20), st.integers()),
                "args": st.one_of(st.lists(st.text(TEXT, max_size=8), max_size=3), st.text(TEXT, max_size=5)),
                "resources": st.fixed_dictionaries(
                    {},
                    optional={
                        "limits": st.dictionaries(st.sampled_from(["nvidia.com/gpu", "cpu"]), QUANTITIES)
                    },
                ),
                "startupSeconds": st.integers(-5, 100),
            },
        ),
        "checkpoint": st.fixed_dictionaries({}, optional={"directory": st.text(TEXT, max_size=20)}),
        "idle": st.one_of(
            st.none(),
            st.fixed_dictionaries(
                {"after": st.sampled_from(["10m", "1h30m", "0s", "abc", "", "5", "-1m"])},
                optional={"level": LEVELS},
            ),
        ),
    },
).map(
    lambda spec: (
        {"model": "facebook/opt-125m", **spec} if "model" not in spec or spec.get("model") is None else spec
    )
)
PATCHES = st.fixed_dictionaries(
    {},
    optional={
        "replicas": st.one_of(st.integers(-2, 3), st.just(5000), st.text(TEXT, max_size=2), st.none()),
        "sleepLevel": LEVELS,
        "model": st.one_of(st.just(""), st.text(TEXT, max_size=10), st.integers(0, 2)),
        "engine": st.fixed_dictionaries(
            {}, optional={"port": st.one_of(st.integers(-1, 70000), st.text(TEXT, max_size=3))}
        ),
    },
).filter(bool)


def _examples(default: int) -> int:
    return EXAMPLES or default


# -- the operator: ModelDeployments ------------------------------------------------------------------


@pytest.fixture
def operator_proc(cluster: Cluster, tmp_path: Path, namespace: str) -> Iterator[Process]:
    service_account_ready(cluster, namespace)
    proc = hibernate_process(cluster, tmp_path / "operator.log", "operator", "--namespace", namespace).start()
    yield proc
    assert proc.popen is not None and proc.popen.poll() is None, (
        "the operator crashed:\n" + proc.output()[-3000:]
    )
    proc.stop()


def _create(cluster: Cluster, namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    body = {"apiVersion": c.API_VERSION, "kind": c.KIND, "metadata": {"name": name}, "spec": spec}
    obj: dict[str, Any] = cluster.custom.create_namespaced_custom_object(
        c.GROUP, c.VERSION, namespace, c.PLURAL, body
    )
    return obj


def _get(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = cluster.custom.get_namespaced_custom_object(
        c.GROUP, c.VERSION, namespace, c.PLURAL, name
    )
    return obj


def _refusal(e: ApiException) -> str:
    assert e.status in (400, 422), f"not a refusal but HTTP {e.status}: {e.body}"
    body = json.loads(e.body)
    message: str = body.get("message", "")
    assert message, body
    return message


def _reconciled(cluster: Cluster, namespace: str, name: str, operator: Process) -> None:
    """The operator has acted on the stored spec: Deployment replicas and status for this generation."""

    def check() -> bool:
        md = _get(cluster, namespace, name)
        spec = ModelDeploymentSpec.model_validate(md["spec"])
        want = 0 if spec.level == SleepLevel.STOP else spec.replicas
        dep = cluster.apps.read_namespaced_deployment(name, namespace)
        assert dep.spec.replicas == want, (dep.spec.replicas, want)
        assert (md.get("status") or {}).get("observedGeneration") == md["metadata"]["generation"], md.get(
            "status"
        )
        return True

    try:
        eventually(check, timeout=20, what=f"{name} reconciled")
    except AssertionError:
        raise AssertionError(
            f"{name} was accepted by the API server but not reconciled:\n{operator.output()[-2500:]}"
        ) from None


@pytest.mark.k8s
def test_generated_model_deployments_are_refused_clearly_or_reconciled(
    cluster: Cluster, namespace: str, operator_proc: Process
) -> None:
    seen = {"accepted": 0, "refused": 0}

    @settings(max_examples=_examples(40), **SETTINGS)  # type: ignore[arg-type]
    @given(base=NAMES, spec=SPECS)
    @example(base="x" * 60, spec={"model": "m"})  # 61-63 characters: the longest label value
    @example(base="Upper", spec={"model": "m"})
    @example(base="under_score", spec={"model": "m"})
    def check(base: str, spec: dict[str, Any]) -> None:
        name = f"{base}{next(_counter)}"
        try:
            _create(cluster, namespace, name, spec)
        except ApiException as e:
            message = _refusal(e)
            assert "spec." in message or "metadata.name" in message or "name" in message, message
            with pytest.raises(ApiException) as missing:
                _get(cluster, namespace, name)
            assert missing.value.status == 404, "a refused object must not be stored"
            seen["refused"] += 1
            return
        seen["accepted"] += 1
        stored = _get(cluster, namespace, name)
        ModelDeploymentSpec.model_validate(stored["spec"])  # what the API accepts, the operator reads
        _reconciled(cluster, namespace, name, operator_proc)
        cluster.custom.delete_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.PLURAL, name)

    check()
    print("generated ModelDeployments:", seen)
    assert seen["accepted"] and seen["refused"], seen


@pytest.mark.k8s
@pytest.mark.parametrize("name", ["model.v1", "9lives", "y" * 64], ids=["dot", "digit-first", "64-chars"])
def test_a_name_the_workload_cannot_carry_is_refused_at_admission(
    cluster: Cluster, namespace: str, name: str
) -> None:
    try:
        _create(cluster, namespace, name, {"model": "facebook/opt-125m"})
    except ApiException as e:
        assert "metadata.name" in _refusal(e)
        return
    cluster.custom.delete_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.PLURAL, name)
    raise AssertionError(f"{name!r} was accepted, but no Service or model label can carry it")


@pytest.mark.k8s
def test_a_character_beyond_the_bmp_in_the_spec_is_reconciled(
    cluster: Cluster, namespace: str, operator_proc: Process
) -> None:
    _create(
        cluster,
        namespace,
        "emoji",
        {"model": "facebook/opt-125m", "engine": {"args": ["--served-model-name", "llama-\U0001f999"]}},
    )
    try:
        deployment = eventually(
            lambda: cluster.apps.read_namespaced_deployment("emoji", namespace), timeout=10
        )
    except AssertionError:
        raise AssertionError("accepted but never reconciled:\n" + operator_proc.output()[-1500:]) from None
    engine = next(c for c in deployment.spec.template.spec.containers if c.name == "engine")
    assert "llama-\U0001f999" in engine.args, "the character arrives intact"


# Keys are bounded: YAML (PyYAML and the API server's decoder alike) refuses an implicit key over
# 1024 characters, and a key of 100 characters beyond the BMP escapes to 1000. Kubernetes keys
# (field names, label and annotation keys) are far shorter; values are not bounded.
@settings(max_examples=_examples(200), deadline=None, derandomize=True, database=None)
@given(text=st.text(), key=st.text(max_size=100))
def test_an_apply_body_is_ascii_yaml_that_reads_back_as_the_object(text: str, key: str) -> None:
    obj = {"kind": "Deployment", "metadata": {"name": "m"}, "spec": {"args": [text], key: 1}}
    body = apply_body(obj)
    assert body.isascii()
    assert yaml.safe_load(body) == obj


@pytest.mark.k8s
def test_generated_changes_are_refused_without_changing_anything_or_reconciled(
    cluster: Cluster, namespace: str, operator_proc: Process
) -> None:
    _create(cluster, namespace, "target", {"model": "facebook/opt-125m", "replicas": 1})
    _reconciled(cluster, namespace, "target", operator_proc)

    @settings(max_examples=_examples(30), **SETTINGS)  # type: ignore[arg-type]
    @given(patch=PATCHES)
    @example(patch={"model": 2, "replicas": 5000})
    def check(patch: dict[str, Any]) -> None:
        before = _get(cluster, namespace, "target")
        try:
            cluster.custom.patch_namespaced_custom_object(
                c.GROUP, c.VERSION, namespace, c.PLURAL, "target", {"spec": patch}
            )
        except ApiException as e:
            message = _refusal(e)
            assert "spec." in message, message
            after = _get(cluster, namespace, "target")
            # (resourceVersion moves with the operator's status writes; generation only with the spec)
            assert after["metadata"]["generation"] == before["metadata"]["generation"], "refused: unchanged"
            assert after["spec"] == before["spec"]
            return
        ModelDeploymentSpec.model_validate(_get(cluster, namespace, "target")["spec"])
        _reconciled(cluster, namespace, "target", operator_proc)

    check()


# -- pod annotations: the agent and the operator ---------------------------------------------------


def _annotation_values() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(
            ["0", "1", "2", "5", "Awake", "l1", "L2", "STOP", " 1 ", "3.0", "-1", "6", "", "sleep"]
        ),
        st.sampled_from(LEVEL_NAMES).flatmap(_cased),
        st.text(TEXT, max_size=10),
    )


@pytest.mark.k8s
def test_generated_sleep_level_annotations_move_the_engine_or_are_refused(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    ensure_node(cluster, NODE)
    service_account_ready(cluster, namespace)
    agent = hibernate_process(
        cluster,
        tmp_path / "agent.log",
        "agent",
        "--node-name",
        NODE,
        "--metrics-port",
        "0",
        "--engine-timeout",
        "5",
    ).start()
    try:
        with start_fake_engine(weights_mib=16, kv_mib=4) as engine:
            port = int(engine.url.rsplit(":", 1)[1])
            pod = create_engine_pod(cluster, namespace, NODE, port, level="Awake")["name"]
            start_pod(cluster, namespace, pod)
            eventually(lambda: annotations(cluster, namespace, pod).get(c.ANN_STATE) == "Awake", timeout=30)
            baseline = complete(engine.url, max_tokens=6)
            _annotation_property(cluster, namespace, pod, engine, baseline)
            assert agent.popen is not None and agent.popen.poll() is None, "the agent crashed"
            annotate(cluster, namespace, pod, "Awake")
            eventually(lambda: annotations(cluster, namespace, pod).get(c.ANN_STATE) == "Awake", timeout=30)
            assert complete(engine.url, max_tokens=6) == baseline
    finally:
        agent.stop()
        print(agent.output()[-3000:])


def _annotation_property(
    cluster: Cluster, namespace: str, pod: str, engine: FakeEngine, baseline: str
) -> None:
    @settings(max_examples=_examples(30), **SETTINGS)  # type: ignore[arg-type]
    @given(value=_annotation_values())
    def check(value: str) -> None:
        before = annotations(cluster, namespace, pod)
        engine_before = httpx.get(f"{engine.url}/is_sleeping", timeout=5).json()["is_sleeping"]
        try:
            level: SleepLevel | None = SleepLevel.parse(value)
        except InvalidSleepLevel:
            level = None
        annotate(cluster, namespace, pod, value)
        if level is None:

            def refused() -> bool:
                ann = annotations(cluster, namespace, pod)
                op = json.loads(ann.get(c.ANN_LAST_OPERATION, "{}"))
                assert ann.get(c.ANN_STATE) == "Failed", ann
                assert f"invalid sleep level {value!r}" in (op.get("error") or ""), op
                assert "valid values are 0-5 or Awake, L1, L2, CudaSuspend, Checkpoint, Stop" in op["error"]
                return True

            eventually(refused, timeout=15, what=f"{value!r} refused")
            assert httpx.get(f"{engine.url}/is_sleeping", timeout=5).json()["is_sleeping"] == engine_before
            assert annotations(cluster, namespace, pod)[c.ANN_OBSERVED_LEVEL] == before.get(
                c.ANN_OBSERVED_LEVEL
            )
        elif level == SleepLevel.STOP:
            time.sleep(0.3)  # level 5 is the operator's (scaling): the agent leaves the pod as it is
            after = annotations(cluster, namespace, pod)
            assert after.get(c.ANN_OBSERVED_LEVEL) == before.get(c.ANN_OBSERVED_LEVEL)
        elif level in (SleepLevel.CUDA_SUSPEND, SleepLevel.CHECKPOINT):
            # This pod has no processes on the node (a plain fake engine): a clear, rolled-back failure.
            def failed() -> bool:
                ann = annotations(cluster, namespace, pod)
                op = json.loads(ann.get(c.ANN_LAST_OPERATION, "{}"))
                assert ann.get(c.ANN_STATE) == "Failed" and op.get("target") == level.label, ann
                assert ann[c.ANN_OBSERVED_LEVEL] == "0" and op.get("error"), ann
                return True

            eventually(failed, timeout=20, what=f"{value!r} failed clearly")
            assert httpx.get(f"{engine.url}/is_sleeping", timeout=5).json()["is_sleeping"] is False
        else:
            state = "Awake" if level == SleepLevel.AWAKE else "Asleep"

            def moved() -> bool:
                ann = annotations(cluster, namespace, pod)
                return (ann.get(c.ANN_STATE), ann.get(c.ANN_OBSERVED_LEVEL)) == (state, str(int(level)))

            eventually(moved, timeout=20, what=f"{value!r} reached")
            memory = httpx.get(f"{engine.url}/debug/memory", timeout=5).json()
            assert (memory["sleep_level"] or 0) == int(level), memory
            if level == SleepLevel.AWAKE:
                assert complete(engine.url, max_tokens=6) == baseline

    check()


@pytest.mark.k8s
def test_a_bad_sleep_level_on_an_operator_pod_degrades_the_status_with_the_value(
    cluster: Cluster, namespace: str, operator_proc: Process
) -> None:
    _create(cluster, namespace, "m", {"model": "facebook/opt-125m", "replicas": 2})
    with MirrorAgent(cluster, namespace):
        eventually(
            lambda: (_get(cluster, namespace, "m").get("status") or {}).get("phase") == "Awake", timeout=30
        )
        name = pods(cluster, namespace, "m")[0].metadata.name

        @settings(max_examples=_examples(12), **SETTINGS)  # type: ignore[arg-type]
        @given(value=_annotation_values())
        def check(value: str) -> None:
            annotate(cluster, namespace, name, value)
            try:
                SleepLevel.parse(value)
                valid = True
            except InvalidSleepLevel:
                valid = False

            def status() -> bool:
                md = _get(cluster, namespace, "m")
                degraded = next(x for x in md["status"]["conditions"] if x["type"] == "Degraded")
                if valid:
                    assert degraded["status"] == "False", degraded
                else:
                    assert degraded["status"] == "True" and repr(value) in degraded.get("message", ""), (
                        degraded
                    )
                    assert md["status"]["phase"] == "Failed"
                return True

            eventually(status, timeout=15, what=f"status after {value!r}")

        check()


# -- engines that misbehave ----------------------------------------------------------------------------


@pytest.mark.k8s
def test_engines_that_answer_garbage_hang_or_hang_up_give_a_clear_failure_not_a_hung_agent(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    """Every mode at once (one pod each, one agent), for a sleep and for a wake."""
    ensure_node(cluster, NODE)
    service_account_ready(cluster, namespace)
    port = free_port()
    agent = hibernate_process(
        cluster,
        tmp_path / "agent.log",
        "agent",
        "--node-name",
        NODE,
        "--metrics-port",
        str(port),
        "--engine-timeout",
        "2",
    ).start()
    expected = {
        "garbage": "garbage answer, not JSON",
        "wrong-json": "unexpected answer",
        "not-http": "",
        "hang": "timeout",
        "hang-body": "timeout",
        "trickle": "timeout",
        "close": "",
        "close-mid-body": "",
        "huge": "answer larger than 1048576 bytes, not read",
        "error": "HTTP 500",
    }
    engines = [BadEngine(mode) for mode in BadEngine.MODES]
    started = time.monotonic()
    try:
        for e in engines:
            e.__enter__()
        cases: dict[str, tuple[str, str]] = {}
        for e in engines:
            for action in ("sleep", "wake"):
                # A 3 s drain, not the default 30 s: a hung `mode=wait` sleep is cut at the drain, then
                # the `mode=abort` one hangs too and times out (2 s), as with any drain deadline.
                created = create_engine_pod(
                    cluster,
                    namespace,
                    NODE,
                    e.port,
                    level="L1" if action == "sleep" else "Awake",
                    drain_seconds=3,
                )
                name = created["name"]
                if action == "wake":  # reported asleep at L1 by an earlier agent; now asked to wake
                    cluster.core.patch_namespaced_pod(
                        name,
                        namespace,
                        {"metadata": {"annotations": {c.ANN_STATE: "Asleep", c.ANN_OBSERVED_LEVEL: "1"}}},
                    )
                start_pod(cluster, namespace, name)
                cases[name] = (e.mode, action)

        # A failed wake is retried with backoff (Waking again meanwhile): record each pod's first Failed.
        failures: dict[str, dict[str, Any]] = {}

        def all_failed() -> bool:
            for name, (_mode, action) in cases.items():
                if name in failures:
                    continue
                ann = annotations(cluster, namespace, name)
                op = json.loads(ann.get(c.ANN_LAST_OPERATION, "{}"))
                if ann.get(c.ANN_STATE) == "Failed" and op.get("action") == action:
                    failures[name] = op
            missing = [cases[n] for n in cases if n not in failures]
            assert not missing, f"not Failed yet: {missing}"
            return True

        eventually(all_failed, timeout=60, interval=0.2, what="every pod Failed")
        took = time.monotonic() - started
        for name, op in failures.items():
            mode, action = cases[name]
            error = op["error"]
            assert error.startswith("engine http://127.0.0.1:"), (mode, action, error)
            assert expected[mode].lower() in error.lower(), (mode, action, error)
            assert len(error) < 2000, "a bounded message"
        assert agent.popen is not None and agent.popen.poll() is None, "the agent crashed"
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
        # Still serving other pods: a good engine converges while the bad ones keep failing.
        with start_fake_engine(weights_mib=8, kv_mib=2) as good:
            created = create_engine_pod(cluster, namespace, NODE, int(good.url.rsplit(":", 1)[1]), level="L1")
            start_pod(cluster, namespace, created["name"])
            eventually(
                lambda: annotations(cluster, namespace, created["name"]).get(c.ANN_STATE) == "Asleep",
                timeout=20,
            )
        print(f"{len(cases)} misbehaving engines all Failed within {took:.1f} s")
    finally:
        for e in engines:
            e.__exit__()
        agent.stop()
        print(agent.output()[-3000:])
