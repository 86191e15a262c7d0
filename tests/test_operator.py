"""The operator against a real API server: what a user sees after `kubectl apply`.

No kubelet runs here: pods stay unscheduled, so the tests play the kubelet (readiness through the
status subresource) and the node agent (the pod annotations it writes).
"""

from __future__ import annotations

import json
import os

from hibernate.api import constants as c
from tests.cluster import Cluster, Process, eventually, hibernate_process
from tests.modeldeployments import (
    apply,
    condition,
    events_for,
    get,
    manifest,
    mark_ready,
    pods,
    report,
    set_level,
)


def desired_levels(cluster: Cluster, ns: str, name: str) -> list[str]:
    return sorted((p.metadata.annotations or {}).get(c.ANN_SLEEP_LEVEL, "") for p in pods(cluster, ns, name))


def test_apply_creates_an_owned_deployment_and_service_running_vllm_with_sleep_mode(
    cluster: Cluster, namespace: str, operator: Process
) -> None:
    apply(
        cluster,
        namespace,
        manifest("llama", args=["--max-model-len", "4096"], resources={"limits": {"nvidia.com/gpu": 1}}),
    )
    svc = eventually(lambda: cluster.core.read_namespaced_service("llama", namespace), what="service")
    dep = cluster.apps.read_namespaced_deployment("llama", namespace)
    md = get(cluster, namespace, "llama")

    for obj in (dep, svc):
        (owner,) = obj.metadata.owner_references
        assert (owner.kind, owner.name, owner.uid, owner.controller) == (
            "ModelDeployment",
            "llama",
            md["metadata"]["uid"],
            True,
        )
    template = dep.spec.template
    assert template.metadata.labels[c.LABEL_MODEL] == "llama"
    assert template.metadata.labels[c.LABEL_MANAGED] == "true"
    (engine,) = template.spec.containers
    argv = [*engine.command, *engine.args]
    assert "vllm.entrypoints.openai.api_server" in " ".join(argv)
    assert argv[argv.index("--model") + 1] == "facebook/opt-125m"
    assert "--enable-sleep-mode" in argv and argv[-2:] == ["--max-model-len", "4096"]
    assert {e.name: e.value for e in engine.env}["VLLM_SERVER_DEV_MODE"] == "1"
    assert engine.readiness_probe.http_get.path == "/health"
    # Ready only while the agent says Awake: a sleeping replica leaves the Service's ready endpoints.
    assert [g.condition_type for g in template.spec.readiness_gates] == [c.CONDITION_AWAKE]
    assert engine.liveness_probe is None, "a liveness probe would kill a sleeping engine"
    assert engine.resources.limits == {"nvidia.com/gpu": "1"}
    assert svc.spec.selector == {c.LABEL_MODEL: "llama"} and svc.spec.ports[0].port == 8000


def test_a_spec_change_updates_the_deployment(cluster: Cluster, namespace: str, operator: Process) -> None:
    apply(cluster, namespace, manifest("m", image="vllm/vllm-openai:v0.32.0"))
    eventually(lambda: cluster.apps.read_namespaced_deployment("m", namespace))
    apply(cluster, namespace, manifest("m", image="vllm/vllm-openai:v0.33.0", replicas=2))

    def updated() -> bool:
        dep = cluster.apps.read_namespaced_deployment("m", namespace)
        return dep.spec.replicas == 2 and dep.spec.template.spec.containers[0].image.endswith("v0.33.0")

    eventually(updated, what="deployment updated")


def test_a_level_change_reaches_every_pod_and_pods_created_later(
    cluster: Cluster, namespace: str, operator: Process
) -> None:
    apply(cluster, namespace, manifest("m", replicas=2))
    eventually(lambda: desired_levels(cluster, namespace, "m") == ["Awake", "Awake"], what="Awake on 2 pods")

    set_level(cluster, namespace, "m", "cudasuspend")
    eventually(
        lambda: desired_levels(cluster, namespace, "m") == ["CudaSuspend"] * 2, what="CudaSuspend on 2 pods"
    )

    apply(cluster, namespace, manifest("m", level="cudasuspend", replicas=3))
    eventually(lambda: desired_levels(cluster, namespace, "m") == ["CudaSuspend"] * 3, what="the new pod too")


def test_a_persons_annotation_on_one_pod_holds_until_the_spec_level_changes(
    cluster: Cluster, namespace: str, operator: Process
) -> None:
    apply(cluster, namespace, manifest("m", replicas=2))
    eventually(lambda: desired_levels(cluster, namespace, "m") == ["Awake", "Awake"])
    one = pods(cluster, namespace, "m")[0].metadata.name
    cluster.kubectl("annotate", "pod", one, "-n", namespace, f"{c.ANN_SLEEP_LEVEL}=1", "--overwrite")

    # Reconciling the model again (here: one more replica) must not undo it.
    apply(cluster, namespace, manifest("m", replicas=3))
    eventually(
        lambda: desired_levels(cluster, namespace, "m") == ["1", "Awake", "Awake"],
        what=f"override kept, not {desired_levels(cluster, namespace, 'm')}",
    )

    set_level(cluster, namespace, "m", "L2")
    eventually(lambda: desired_levels(cluster, namespace, "m") == ["L2"] * 3, what="spec level wins again")


def test_stop_scales_to_zero_and_a_lower_level_restores_the_replicas(
    cluster: Cluster, namespace: str, operator: Process
) -> None:
    apply(cluster, namespace, manifest("m", replicas=3))
    eventually(lambda: len(pods(cluster, namespace, "m")) == 3, what="3 pods")

    set_level(cluster, namespace, "m", 5)
    dep = eventually(
        lambda: (d := cluster.apps.read_namespaced_deployment("m", namespace)).spec.replicas == 0 and d
    )
    assert dep.metadata.annotations[c.ANN_REPLICAS_BEFORE_STOP] == "3"
    eventually(lambda: not pods(cluster, namespace, "m"), what="pods gone")
    eventually(lambda: get(cluster, namespace, "m")["status"]["phase"] == "Stopped", what="phase Stopped")
    assert get(cluster, namespace, "m")["status"]["sleepLevel"] == "Stop"
    assert condition(get(cluster, namespace, "m"), "Asleep")["status"] == "True"

    set_level(cluster, namespace, "m", "L1")
    eventually(
        lambda: cluster.apps.read_namespaced_deployment("m", namespace).spec.replicas == 3, what="3 again"
    )
    eventually(lambda: desired_levels(cluster, namespace, "m") == ["L1"] * 3, what="new pods get L1")


def test_agent_reports_fold_into_phase_level_conditions_and_transition(
    cluster: Cluster, namespace: str, operator: Process
) -> None:
    apply(cluster, namespace, manifest("m", replicas=2))
    names = eventually(
        lambda: (
            [p.metadata.name for p in pods(cluster, namespace, "m")]
            if len(pods(cluster, namespace, "m")) == 2
            else None
        )
    )
    eventually(lambda: get(cluster, namespace, "m")["status"]["phase"] == "Pending", what="Pending")
    for pod in names:
        mark_ready(cluster, namespace, pod)
        report(cluster, namespace, pod, 0, "Awake")
    eventually(lambda: get(cluster, namespace, "m")["status"]["phase"] == "Awake", what="Awake")
    md = get(cluster, namespace, "m")
    assert md["status"]["readyReplicas"] == 2 and md["status"]["sleepLevel"] == "Awake"
    assert condition(md, "Ready")["status"] == "True"
    assert condition(md, "Ready")["observedGeneration"] == md["metadata"]["generation"]

    set_level(cluster, namespace, "m", "CudaSuspend")
    eventually(lambda: get(cluster, namespace, "m")["status"]["phase"] == "Sleeping", what="Sleeping")
    report(cluster, namespace, names[0], 3, "Asleep")
    report(cluster, namespace, names[1], 1, "Sleeping")
    # Not every replica is at 3 yet: the level every replica has reached is the shallower one.
    eventually(lambda: get(cluster, namespace, "m")["status"]["sleepLevel"] == "L1", what="L1 reached by all")
    assert condition(get(cluster, namespace, "m"), "Progressing")["status"] == "True"
    report(cluster, namespace, names[1], 3, "Asleep")

    md = eventually(
        lambda: (m := get(cluster, namespace, "m"))["status"]["phase"] == "Asleep" and m, what="Asleep"
    )
    assert md["status"]["sleepLevel"] == "CudaSuspend"
    assert condition(md, "Asleep")["status"] == "True"
    assert condition(md, "Ready")["status"] == "False" and condition(md, "Ready")["reason"] == "Asleep"
    assert condition(md, "Progressing")["status"] == "False"
    transition = md["status"]["lastTransition"]
    assert (transition["from"], transition["to"]) == ("Awake", "CudaSuspend")
    assert transition["seconds"] >= 0 and transition["finished"] >= transition["started"]
    reasons = [e.reason for e in events_for(cluster, namespace, "m")]
    assert "Transition" in reasons and "Reached" in reasons
    assert all(key not in md["status"] for key in ("kopf", "reconcile_model")), (
        "kopf's bookkeeping leaked into status"
    )


def test_a_failed_pod_makes_the_model_degraded_with_the_reason(
    cluster: Cluster, namespace: str, operator: Process
) -> None:
    apply(cluster, namespace, manifest("m", level="L1"))
    (pod,) = eventually(lambda: pods(cluster, namespace, "m"))
    report(
        cluster, namespace, pod.metadata.name, 0, "Failed", error="engine did not answer POST /sleep in 30 s"
    )
    md = eventually(
        lambda: (m := get(cluster, namespace, "m"))["status"]["phase"] == "Failed" and m, what="Failed"
    )
    degraded = condition(md, "Degraded")
    assert degraded["status"] == "True" and "did not answer" in degraded["message"]
    # The event is posted after the status is written: wait for it too.
    warnings = eventually(
        lambda: [e for e in events_for(cluster, namespace, "m") if e.type == "Warning"], what="a Warning"
    )
    assert "did not answer" in warnings[0].message


def test_stop_on_one_pod_makes_the_model_failed_with_the_reason_not_progressing_for_ever(
    cluster: Cluster, namespace: str, operator: Process
) -> None:
    apply(cluster, namespace, manifest("m"))
    (pod,) = eventually(lambda: pods(cluster, namespace, "m"))
    name = pod.metadata.name
    mark_ready(cluster, namespace, name)
    report(cluster, namespace, name, 0, "Awake")
    eventually(lambda: get(cluster, namespace, "m")["status"]["phase"] == "Awake", what="Awake")

    cluster.core.patch_namespaced_pod(
        name, namespace, {"metadata": {"annotations": {c.ANN_SLEEP_LEVEL: "Stop"}}}
    )
    md = eventually(
        lambda: (m := get(cluster, namespace, "m"))["status"]["phase"] == "Failed" and m, what="Failed"
    )
    assert condition(md, "Progressing")["status"] == "False"
    degraded = condition(md, "Degraded")
    assert degraded["status"] == "True" and degraded["message"] == f"pod {name}: {c.STOP_ON_POD}"
    # The pod still serves: the model is Ready through it.
    assert condition(md, "Ready")["status"] == "True"
    # Kept as it is: the operator does not write the spec's level over a person's wish.
    assert desired_levels(cluster, namespace, "m") == ["Stop"]
    failed = eventually(lambda: [e for e in events_for(cluster, namespace, "m") if e.reason == "Failed"])
    assert len(failed) == 1 and (failed[0].count or 1) == 1


def test_deleting_the_model_deletes_its_children(cluster: Cluster, namespace: str, operator: Process) -> None:
    apply(cluster, namespace, manifest("m"))
    eventually(lambda: pods(cluster, namespace, "m"), what="pod")
    cluster.kubectl("delete", "md", "m", "-n", namespace, "--wait=true", "--timeout=30s")

    def gone() -> bool:
        deps = cluster.apps.list_namespaced_deployment(namespace).items
        svcs = cluster.core.list_namespaced_service(namespace).items
        return not deps and not svcs and not pods(cluster, namespace, "m")

    eventually(gone, timeout=30, what="garbage collection of Deployment, Service and pods")


def test_an_operator_killed_mid_transition_finishes_after_restart_without_repeating_work(
    cluster: Cluster, namespace: str, tmp_path: os.PathLike[str]
) -> None:
    # Watching only this namespace: a cluster-wide operator could meet the armed fault point while
    # resuming another test's ModelDeployment first.
    first = hibernate_process(cluster, tmp_path / "op1.log", "operator", "--namespace", namespace)  # type: ignore[operator]
    first.env["HIBERNATE_FAULTS"] = "operator.after-deployment"  # SIGKILL between Deployment and Service
    first.start()
    apply(cluster, namespace, manifest("m", replicas=3))
    assert first.popen is not None
    first.popen.wait(30)
    assert "operator.after-deployment armed" in first.output()
    assert cluster.core.list_namespaced_service(namespace).items == []
    generation = cluster.apps.read_namespaced_deployment("m", namespace).metadata.generation

    second = hibernate_process(cluster, tmp_path / "op2.log", "operator", "--namespace", namespace).start()  # type: ignore[operator]
    try:
        eventually(lambda: cluster.core.read_namespaced_service("m", namespace), what="service after restart")
        eventually(
            lambda: desired_levels(cluster, namespace, "m") == ["Awake"] * 3, what="all pods after restart"
        )
        eventually(lambda: get(cluster, namespace, "m").get("status", {}).get("phase") == "Pending")
        assert cluster.apps.read_namespaced_deployment("m", namespace).metadata.generation == generation
        moves = [e for e in events_for(cluster, namespace, "m") if e.reason == "Transition"]
        assert len(moves) == 1 and sum(e.count or 1 for e in moves) == 1, [e.message for e in moves]
    finally:
        second.stop()
    assert json.dumps(get(cluster, namespace, "m")["status"])  # serialisable, written


def test_the_operator_serves_metrics_of_completed_transitions(
    cluster: Cluster, namespace: str, tmp_path: os.PathLike[str]
) -> None:
    import socket

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = hibernate_process(cluster, tmp_path / "op.log", "operator", "--metrics-port", str(port)).start()  # type: ignore[operator]
    try:
        apply(cluster, namespace, manifest("m", level="L1"))
        (pod,) = eventually(lambda: pods(cluster, namespace, "m"))
        report(cluster, namespace, pod.metadata.name, 1, "Asleep")
        eventually(lambda: get(cluster, namespace, "m")["status"]["phase"] == "Asleep", what="Asleep")
        text = eventually(lambda: httpx.get(f"http://127.0.0.1:{port}/metrics").text, what="metrics")
        assert 'hibernate_operator_transitions_total{level="L1"}' in text
        assert "hibernate_operator_transition_seconds_bucket" in text
        assert "hibernate_idle_transitions_total" in text
    finally:
        proc.stop()


def test_a_deleted_deployment_or_service_of_a_live_model_is_made_again(
    cluster: Cluster, namespace: str, operator: Process
) -> None:
    apply(cluster, namespace, manifest("m"))
    first = eventually(lambda: cluster.core.read_namespaced_service("m", namespace), what="service")
    cluster.apps.delete_namespaced_deployment("m", namespace)
    cluster.core.delete_namespaced_service(
        "m", namespace, _preload_content=False
    )  # client can't parse Status
    eventually(
        lambda: cluster.core.read_namespaced_service("m", namespace).metadata.uid != first.metadata.uid,
        what="a new Service",
    )
    eventually(lambda: cluster.apps.read_namespaced_deployment("m", namespace), what="a new Deployment")
