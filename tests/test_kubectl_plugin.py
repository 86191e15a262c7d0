"""`kubectl hibernate sleep|wake|status`, run by a real kubectl against the test control plane.

No operator, agent or kubelet runs here: the tests play the operator (status through the status
subresource) and the agent (pod annotations), and watch what the plugin does with it.
"""

from __future__ import annotations

import json
import os
import pty
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hibernate.api import constants as c
from hibernate.api.levels import SleepLevel, valid_values_text
from hibernate.kubectl_plugin import (
    PluginError,
    Target,
    last_operation_text,
    main,
    parse_group_ref,
    parse_ref,
    wait_for,
)
from tests.cluster import Cluster, assets_dir, eventually, install_gpu_group_crd
from tests.modeldeployments import apply, get, manifest, report, set_level
from tests.pods import ensure_node

PLUGIN = Path(sys.executable).parent / "kubectl-hibernate"


def kubectl_env(cluster: Cluster, kubeconfig: str | None = None) -> dict[str, str]:
    env = cluster.env()
    env["KUBECONFIG"] = kubeconfig or cluster.kubeconfig
    env["PATH"] = f"{PLUGIN.parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def hibernate(
    cluster: Cluster, *args: str, kubeconfig: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`kubectl hibernate ARGS`: kubectl finds the plugin on $PATH, as for a user."""
    return subprocess.run(
        [str(assets_dir() / "kubectl"), "hibernate", *args],
        env=kubectl_env(cluster, kubeconfig),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def background(cluster: Cluster) -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def start(cluster: Cluster, background: list[subprocess.Popen[str]], *args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [str(assets_dir() / "kubectl"), "hibernate", *args],
        env=kubectl_env(cluster),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    background.append(proc)
    return proc


def finish(proc: subprocess.Popen[str], timeout: float = 15) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def read_until(proc: subprocess.Popen[str], last: Callable[[str], bool], timeout: float = 30) -> str:
    """What `proc` prints up to and including the first line for which `last` holds."""
    lines: list[str] = []
    done = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if last(line):
                break
        done.set()

    threading.Thread(target=read, daemon=True).start()
    assert done.wait(timeout), f"nothing like that printed within {timeout}s: {''.join(lines)!r}"
    return "".join(lines)


def still_waiting(proc: subprocess.Popen[str], seconds: float = 1.5) -> bool:
    time.sleep(seconds)
    return proc.poll() is None


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write_status(
    cluster: Cluster,
    ns: str,
    name: str,
    phase: str,
    level: str | None,
    generation: int,
    failure: str | None = None,
    failed_since: str | None = None,
) -> None:
    """What the operator writes (controller/status.py), reduced to what the plugin reads."""
    conditions = [
        {
            "type": "Degraded",
            "status": "True" if failure else "False",
            "reason": "SleepOrWakeFailed" if failure else "AsExpected",
            "lastTransitionTime": failed_since or now(),
            "observedGeneration": generation,
            **({"message": failure} if failure else {}),
        }
    ]
    status: dict[str, Any] = {
        "phase": phase,
        "sleepLevel": level,
        "observedGeneration": generation,
        "conditions": conditions,
    }
    cluster.custom.patch_namespaced_custom_object_status(
        c.GROUP, c.VERSION, ns, c.PLURAL, name, {"status": status}
    )


def create_md(cluster: Cluster, ns: str, name: str, level: str = "Awake", **metadata: Any) -> dict[str, Any]:
    body = manifest(name, level)
    body["metadata"].update(metadata)
    apply(cluster, ns, body)
    return get(cluster, ns, name)


def requested(cluster: Cluster, ns: str, name: str, level: str) -> dict[str, Any]:
    def check() -> dict[str, Any]:
        md = get(cluster, ns, name)
        assert md["spec"]["sleepLevel"] == level
        return md

    md: dict[str, Any] = eventually(check, timeout=20, what=f"spec.sleepLevel={level}")
    return md


# ---- sleep and wake ------------------------------------------------------------------------------


def test_sleep_wait_returns_when_every_replica_reached_the_level(
    cluster: Cluster, namespace: str, background: list[subprocess.Popen[str]]
) -> None:
    # The idle ladder had put it at L1 (an automatic level, decided on generation 1).
    create_md(
        cluster,
        namespace,
        "llama",
        annotations={c.ANN_AUTO_LEVEL: "L1", c.ANN_AUTO_SOURCE: "idle", c.ANN_AUTO_GENERATION: "1"},
    )
    write_status(cluster, namespace, "llama", "Awake", "Awake", 1)
    proc = start(
        cluster,
        background,
        "sleep",
        "md/llama",
        "--level",
        "cudasuspend",
        "--wait",
        "--timeout",
        "60",
        "-n",
        namespace,
    )
    md = requested(cluster, namespace, "llama", "CudaSuspend")
    gen = md["metadata"]["generation"]
    assert gen == 2
    # A person asked: the idle ladder's automatic level is gone.
    assert not set(c.AUTO_ANNOTATIONS) & set(md["metadata"].get("annotations", {}))

    write_status(cluster, namespace, "llama", "Sleeping", "Awake", gen)
    assert still_waiting(proc)
    # Asleep, but at another level: not what was asked.
    write_status(cluster, namespace, "llama", "Asleep", "L1", gen)
    assert still_waiting(proc)
    write_status(cluster, namespace, "llama", "Asleep", "CudaSuspend", gen)
    rc, out, err = finish(proc)
    assert rc == 0, err
    assert out.splitlines() == [
        "modeldeployments.hibernate.dev/llama sleepLevel set to CudaSuspend",
        "modeldeployments.hibernate.dev/llama is Asleep at CudaSuspend",
    ]
    assert "phase Sleeping" in err


def test_wake_wait_ignores_a_status_the_operator_wrote_before_the_request(
    cluster: Cluster, namespace: str, background: list[subprocess.Popen[str]]
) -> None:
    create_md(cluster, namespace, "llama", level="L2")
    # Stale: phase Awake for generation 1, as if the operator had not caught up with anything yet.
    write_status(cluster, namespace, "llama", "Awake", "Awake", 1)
    proc = start(cluster, background, "wake", "md/llama", "--wait", "-n", namespace)
    gen = requested(cluster, namespace, "llama", "Awake")["metadata"]["generation"]
    assert still_waiting(proc)
    write_status(cluster, namespace, "llama", "Waking", "L2", gen)
    assert still_waiting(proc, 1.0)
    write_status(cluster, namespace, "llama", "Awake", "Awake", gen)
    rc, out, err = finish(proc)
    assert rc == 0, err
    assert out.splitlines()[-1] == "modeldeployments.hibernate.dev/llama is Awake"


def test_sleep_to_stop_waits_for_stopped(
    cluster: Cluster, namespace: str, background: list[subprocess.Popen[str]]
) -> None:
    create_md(cluster, namespace, "llama")
    proc = start(cluster, background, "sleep", "llama", "--level", "5", "--wait", "-n", namespace)
    gen = requested(cluster, namespace, "llama", "Stop")["metadata"]["generation"]
    write_status(cluster, namespace, "llama", "Stopped", "Stop", gen)
    rc, out, err = finish(proc)
    assert rc == 0, err
    assert out.splitlines()[-1] == "modeldeployments.hibernate.dev/llama is Stopped at Stop"


def test_a_failed_sleep_exits_1_with_the_operators_message_but_an_old_failure_does_not(
    cluster: Cluster, namespace: str, background: list[subprocess.Popen[str]]
) -> None:
    create_md(cluster, namespace, "llama")
    old = "pod llama-1: engine did not answer /sleep"
    write_status(
        cluster, namespace, "llama", "Failed", "Awake", 1, failure=old, failed_since="2026-01-01T00:00:00Z"
    )
    proc = start(cluster, background, "sleep", "md/llama", "--level", "L1", "--wait", "-n", namespace)
    gen = requested(cluster, namespace, "llama", "L1")["metadata"]["generation"]
    # The operator folds the same, older failure again for the new generation: the agent retries.
    write_status(
        cluster, namespace, "llama", "Failed", "Awake", gen, failure=old, failed_since="2026-01-01T00:00:00Z"
    )
    assert still_waiting(proc)
    new = "pod llama-1: CUDA checkpoint failed: CUDA_ERROR_NOT_SUPPORTED"
    write_status(cluster, namespace, "llama", "Failed", "Awake", gen, failure=new)
    rc, _, err = finish(proc)
    assert rc == 1
    assert err.splitlines()[-1] == f"error: modeldeployments.hibernate.dev/llama failed: {new}"


def test_wait_times_out_with_where_it_stands(cluster: Cluster, namespace: str) -> None:
    create_md(cluster, namespace, "llama")
    started = time.monotonic()
    result = hibernate(
        cluster, "sleep", "md/llama", "--level", "Checkpoint", "--wait", "--timeout", "1", "-n", namespace
    )
    assert result.returncode == 1
    assert time.monotonic() - started < 15
    assert result.stderr.splitlines()[-1] == (
        "error: timed out after 1 s waiting for modeldeployments.hibernate.dev/llama to be Asleep at Checkpoint; "
        "now phase unknown, level unknown"
    )
    assert get(cluster, namespace, "llama")["spec"]["sleepLevel"] == "Checkpoint"


def test_without_wait_it_only_sets_the_level(cluster: Cluster, namespace: str) -> None:
    create_md(cluster, namespace, "llama")
    result = hibernate(cluster, "sleep", "modeldeployment/llama", "--level", "2", "-n", namespace)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "modeldeployments.hibernate.dev/llama sleepLevel set to L2\n"
    assert get(cluster, namespace, "llama")["spec"]["sleepLevel"] == "L2"


@pytest.mark.parametrize("level", ["L9", "deep", "6", "-1", "Awake", "0"])
def test_an_invalid_level_is_refused_with_the_valid_values_and_nothing_changes(
    cluster: Cluster, namespace: str, level: str
) -> None:
    create_md(cluster, namespace, "llama")
    result = hibernate(cluster, "sleep", "md/llama", f"--level={level}", "-n", namespace)
    assert result.returncode == 2
    if level in ("Awake", "0"):
        assert result.stderr == f"error: --level {level}: that is awake; use `kubectl hibernate wake`\n"
    else:
        assert (
            result.stderr == f"error: invalid sleep level {level!r}: valid values are {valid_values_text()}\n"
        )
    md = get(cluster, namespace, "llama")
    assert md["spec"]["sleepLevel"] == "Awake"
    assert md["metadata"]["generation"] == 1


def test_a_missing_model_or_another_kind_is_an_error(cluster: Cluster, namespace: str) -> None:
    result = hibernate(cluster, "wake", "md/nope", "-n", namespace)
    assert result.returncode == 1
    assert (
        result.stderr
        == f'error: modeldeployments.hibernate.dev "nope" not found in namespace "{namespace}"\n'
    )
    result = hibernate(cluster, "wake", "deployment/llama", "-n", namespace)
    assert result.returncode == 2
    assert "only ModelDeployments can sleep" in result.stderr


# ---- status --------------------------------------------------------------------------------------


def create_pod(cluster: Cluster, ns: str, model: str, name: str, node: str, level: str) -> None:
    ensure_node(cluster, node)  # not deleted as an orphan by the pod garbage collector meanwhile
    cluster.core.create_namespaced_pod(
        ns,
        {
            "metadata": {
                "name": name,
                "labels": {c.LABEL_MODEL: model, c.LABEL_MANAGED: "true"},
                "annotations": {c.ANN_SLEEP_LEVEL: level},
            },
            "spec": {
                "nodeName": node,
                "containers": [{"name": "engine", "image": "vllm/vllm-openai:v0.33.0"}],
            },
        },
    )


def rows(text: str) -> list[list[str]]:
    """Table rows split on the column gaps (three spaces or more)."""
    return [re.split(r" {3,}", line.strip()) for line in text.strip().splitlines()]


def test_status_shows_every_pod_with_desired_and_observed_level_and_last_operation(
    cluster: Cluster, namespace: str
) -> None:
    create_md(cluster, namespace, "llama", level="CudaSuspend")
    write_status(cluster, namespace, "llama", "Sleeping", "L1", 2)
    create_pod(cluster, namespace, "llama", "llama-a", "gpu-node-1", "CudaSuspend")
    create_pod(cluster, namespace, "llama", "llama-b", "gpu-node-2", "1")  # a person's override
    create_pod(cluster, namespace, "other", "other-a", "gpu-node-1", "0")
    report(cluster, namespace, "llama-a", 3, c.STATE_ASLEEP)
    report(cluster, namespace, "llama-b", 1, c.STATE_FAILED, error="engine answered 500 on /sleep")

    result = hibernate(cluster, "status", "md/llama", "-n", namespace)
    assert result.returncode == 0, result.stderr
    header, table = result.stdout.split("\n", 1)
    assert header == (
        "modeldeployments.hibernate.dev/llama: model facebook/opt-125m, desired CudaSuspend, reached L1, phase Sleeping"
    )
    assert rows(table) == [
        ["POD", "NODE", "DESIRED", "OBSERVED", "STATE", "LAST OPERATION"],
        ["llama-a", "gpu-node-1", "CudaSuspend", "CudaSuspend", "Asleep", "sleep to CudaSuspend 0.1s"],
        [
            "llama-b",
            "gpu-node-2",
            "L1",
            "L1",
            "Failed",
            "sleep to L1 0.1s error: engine answered 500 on /sleep",
        ],
    ]

    # Without a name: every managed pod of the namespace, with its model.
    result = hibernate(cluster, "status", "-n", namespace)
    assert [r[:3] for r in rows(result.stdout)] == [
        ["MODEL", "POD", "NODE"],
        ["llama", "llama-a", "gpu-node-1"],
        ["llama", "llama-b", "gpu-node-2"],
        ["other", "other-a", "gpu-node-1"],
    ]
    assert rows(result.stdout)[3][3:] == ["Awake", "-", "-", "-"]

    result = hibernate(cluster, "status", "-A")
    assert rows(result.stdout)[0][:2] == ["NAMESPACE", "MODEL"]
    assert [namespace, "other", "other-a"] in [r[:3] for r in rows(result.stdout)]


def test_the_namespace_comes_from_the_kubeconfig_context_like_kubectl(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    create_md(cluster, namespace, "llama")
    kubeconfig = tmp_path / "kubeconfig"
    shutil.copy(cluster.kubeconfig, kubeconfig)
    subprocess.run(
        [
            str(assets_dir() / "kubectl"),
            "--kubeconfig",
            str(kubeconfig),
            "config",
            "set-context",
            "--current",
            f"--namespace={namespace}",
        ],
        check=True,
        capture_output=True,
    )
    result = hibernate(cluster, "sleep", "md/llama", "--level", "L1", kubeconfig=str(kubeconfig))
    assert result.returncode == 0, result.stderr
    assert get(cluster, namespace, "llama")["spec"]["sleepLevel"] == "L1"
    result = hibernate(cluster, "status", kubeconfig=str(kubeconfig))
    assert result.stdout == f"No pods of ModelDeployments found in namespace {namespace}.\n"


# ---- status --watch ------------------------------------------------------------------------------


def stamp(seconds_ago: float = 0.0) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(time.time() - seconds_ago))


def report_under_way(cluster: Cluster, ns: str, pod: str, state: str, level: int, started: str) -> None:
    """What the agent writes when it starts an operation: no `seconds` yet."""
    op = {"action": "sleep", "level": level, "target": SleepLevel(level).label, "started": started}
    cluster.core.patch_namespaced_pod(
        pod, ns, {"metadata": {"annotations": {c.ANN_STATE: state, c.ANN_LAST_OPERATION: json.dumps(op)}}}
    )


def write_transition(cluster: Cluster, ns: str, name: str, transition: dict[str, Any]) -> None:
    cluster.custom.patch_namespaced_custom_object_status(
        c.GROUP, c.VERSION, ns, c.PLURAL, name, {"status": {"lastTransition": transition}}
    )


def frames(text: str) -> list[list[str]]:
    """A piped --watch: one frame per header line `Every ...`, with the lines under it."""
    out: list[list[str]] = []
    for line in text.splitlines():
        if line.startswith("Every "):
            out.append([line])
        elif out and line:
            out[-1].append(line)
    return out


def test_status_watch_redraws_the_table_as_a_transition_runs_with_elapsed_times(
    cluster: Cluster, namespace: str, background: list[subprocess.Popen[str]]
) -> None:
    md = create_md(cluster, namespace, "llama", level="Checkpoint")
    gen = md["metadata"]["generation"]
    create_pod(cluster, namespace, "llama", "llama-a", "gpu-node-1", "Checkpoint")
    write_status(cluster, namespace, "llama", "Sleeping", "Awake", gen)
    write_transition(cluster, namespace, "llama", {"from": "Awake", "to": "Checkpoint", "started": stamp(40)})
    report_under_way(cluster, namespace, "llama-a", c.STATE_SLEEPING, 4, stamp(30))
    started = time.monotonic()
    proc = start(
        cluster,
        background,
        "status",
        "md/llama",
        "-n",
        namespace,
        "--watch",
        "--interval",
        "0.3",
        "--timeout",
        "8",
    )
    # The change comes once the first frame, the one under way, has been drawn (however slow the
    # plugin is to start on a loaded machine).
    head = read_until(proc, lambda line: line.startswith("llama-a "))
    report(cluster, namespace, "llama-a", 4, c.STATE_ASLEEP)
    write_status(cluster, namespace, "llama", "Asleep", "Checkpoint", gen)
    write_transition(
        cluster,
        namespace,
        "llama",
        {"from": "Awake", "to": "Checkpoint", "started": stamp(43), "finished": stamp(), "seconds": 43.2},
    )
    rc, rest, err = finish(proc)
    out = head + rest
    assert rc == 0, err
    assert 8 <= time.monotonic() - started < 30  # ran until --timeout, then exit 0
    shown = frames(out)
    # Piped, a frame is printed when something besides the clocks changed: the first, then the
    # pod's report and the status as they came in (the status in two writes here).
    assert 2 <= len(shown) <= 5, out
    first, last = shown[0], shown[-1]
    assert re.fullmatch(r"Every 0\.3s: kubectl hibernate status md/llama    watched \d+\.\ds", first[0])
    assert first[1].endswith("desired Checkpoint, reached Awake, phase Sleeping")
    m = re.fullmatch(r"  transition Awake -> Checkpoint: running (\d+\.\d)s", first[2])
    assert m and 39 <= float(m.group(1)) < 60, first[2]
    row = rows("\n".join(first[3:]))
    assert row[0] == ["POD", "NODE", "DESIRED", "OBSERVED", "STATE", "LAST OPERATION"]
    assert row[1][:5] == ["llama-a", "gpu-node-1", "Checkpoint", "-", "Sleeping"]
    m = re.fullmatch(r"sleep to Checkpoint running (\d+\.\d)s", row[1][5])
    assert m and 29 <= float(m.group(1)) < 50, row[1][5]
    assert last[1].endswith("desired Checkpoint, reached Checkpoint, phase Asleep")
    assert last[2] == "  transition Awake -> Checkpoint: took 43.2s"
    assert rows("\n".join(last[3:]))[1] == [
        "llama-a", "gpu-node-1", "Checkpoint", "Checkpoint", "Asleep", "sleep to Checkpoint 0.1s"
    ]  # fmt: skip
    watched = [float(re.findall(r"watched (\d+\.\d)s", f[0])[0]) for f in shown]
    assert watched == sorted(watched) and watched[-1] > watched[0]


def test_status_wait_watches_until_the_spec_level_is_reached(
    cluster: Cluster, namespace: str, background: list[subprocess.Popen[str]]
) -> None:
    md = create_md(cluster, namespace, "llama", level="L1")
    gen = md["metadata"]["generation"]
    create_pod(cluster, namespace, "llama", "llama-a", "gpu-node-1", "L1")
    write_status(cluster, namespace, "llama", "Sleeping", "Awake", gen)
    proc = start(cluster, background, "status", "md/llama", "-n", namespace, "--wait", "--interval", "0.3")
    # The change comes once the first frame, the one under way, has been drawn (however slow the
    # plugin is to start on a loaded machine).
    head = read_until(proc, lambda line: "phase Sleeping" in line)
    assert proc.poll() is None, "still waiting"
    report(cluster, namespace, "llama-a", 1, c.STATE_ASLEEP)
    write_status(cluster, namespace, "llama", "Asleep", "L1", gen)
    rc, rest, err = finish(proc)
    out = head + rest
    assert rc == 0, err
    assert out.splitlines()[-1] == "modeldeployments.hibernate.dev/llama is Asleep at L1"
    assert "phase Sleeping" in frames(out)[0][1]

    # Not reached in time: exit 1 with the level it waited for; a new failure: exit 1 with it.
    result = hibernate(cluster, "status", "md/llama", "-n", namespace, "--wait", "--timeout", "1")
    assert result.returncode == 0  # already there
    set_level(cluster, namespace, "llama", "L2")
    result = hibernate(cluster, "status", "md/llama", "-n", namespace, "--wait", "--timeout", "1.5")
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == "error: timed out after 1.5 s waiting for md/llama to reach L2"
    proc = start(cluster, background, "status", "md/llama", "-n", namespace, "--wait", "--interval", "0.3")
    assert still_waiting(proc)
    write_status(
        cluster, namespace, "llama", "Failed", "L1", gen + 1, failure="engine answered 500 on /sleep"
    )
    rc, _, err = finish(proc)
    assert rc == 1
    assert err.splitlines()[-1] == (
        "error: modeldeployments.hibernate.dev/llama failed: engine answered 500 on /sleep"
    )
    result = hibernate(cluster, "status", "-n", namespace, "--wait")
    assert result.returncode == 2 and "status md/NAME --wait" in result.stderr


def test_status_watch_redraws_in_place_on_a_terminal(cluster: Cluster, namespace: str) -> None:
    create_md(cluster, namespace, "llama")
    create_pod(cluster, namespace, "llama", "llama-a", "gpu-node-1", "0")
    leader, follower = pty.openpty()
    args = ["status", "md/llama", "-n", namespace, "-w", "--interval", "0.3", "--timeout", "4"]
    proc = subprocess.Popen(
        [str(assets_dir() / "kubectl"), "hibernate", *args],
        env=kubectl_env(cluster),
        stdout=follower,
        stderr=subprocess.PIPE,
    )
    os.close(follower)
    screen = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the plugin closed the terminal
            break
        if not chunk:
            break
        screen += chunk
    os.close(leader)
    assert proc.wait(15) == 0
    text = screen.decode()
    redraws = text.split("\x1b[H\x1b[2J")[1:]
    assert len(redraws) >= 3, text  # every --interval, whether or not anything changed
    for redraw in redraws:
        lines = redraw.replace("\r\n", "\n").splitlines()
        assert lines[0].startswith("Every 0.3s: kubectl hibernate status md/llama    watched ")
        assert lines[1].startswith("modeldeployments.hibernate.dev/llama: model facebook/opt-125m")
        assert lines[2].split() == ["POD", "NODE", "DESIRED", "OBSERVED", "STATE", "LAST", "OPERATION"]
        assert lines[3].split()[:3] == ["llama-a", "gpu-node-1", "Awake"]


# ---- groups --------------------------------------------------------------------------------------


def create_group(
    cluster: Cluster, ns: str, name: str, status: dict[str, Any] | None = None, **spec: Any
) -> None:
    body = {"apiVersion": c.API_VERSION, "kind": c.GPU_GROUP_KIND, "metadata": {"name": name}, "spec": spec}
    apply(cluster, ns, body)
    if status is not None:  # what the operator writes (controller/gpu_groups.py)
        cluster.custom.patch_namespaced_custom_object_status(
            c.GROUP, c.VERSION, ns, c.GPU_GROUP_PLURAL, name, {"status": status}
        )


def create_member(cluster: Cluster, ns: str, name: str, group: str, gpu: str, level: str, **ref: Any) -> None:
    body = manifest(name, "Awake")
    body["spec"]["gpuGroup"] = {"name": group, **ref}
    apply(cluster, ns, body)
    phase = "Awake" if level == "Awake" else "Asleep"
    cluster.custom.patch_namespaced_custom_object_status(
        c.GROUP, c.VERSION, ns, c.PLURAL, name, {"status": {"phase": phase, "sleepLevel": level, "gpu": gpu}}
    )


def test_groups_show_who_holds_the_gpu_the_budget_and_the_members(cluster: Cluster, namespace: str) -> None:
    install_gpu_group_crd(cluster)
    ns = namespace
    since = "2026-01-01T10:00:00.000Z"
    create_group(
        cluster,
        ns,
        "shared",
        status={
            "members": ["llama", "qwen"],
            "holders": [{"name": "llama", "since": since}],
            "awake": 1,
            "holding": "llama",
            "lastSwitch": {"from": "qwen", "to": "llama", "at": since, "seconds": 0.64, "result": "ok"},
        },
        maxAwake=1,
        gpuMemory="40Gi",
        makeRoomLevel="L1",
    )
    create_member(cluster, ns, "llama", "shared", "Holding", "Awake", gpuMemory="16Gi")
    create_member(cluster, ns, "qwen", "shared", "Released", "CudaSuspend", makeRoomLevel="CudaSuspend")
    # A group no member names yet, without a budget, which the operator has not seen: a member of
    # another group and a model of no group do not show in either.
    create_group(cluster, ns, "spare", maxAwake=2)
    create_md(cluster, ns, "alone")

    result = hibernate(cluster, "groups", "-n", ns)
    assert result.returncode == 0, result.stderr
    assert rows(result.stdout) == [
        ["GROUP", "HOLDING", "AWAKE", "GPU MEMORY", "MEMBERS", "LAST SWITCH"],
        ["shared", "llama", "1/1", "16Gi/40Gi", "llama,qwen", "qwen -> llama 0.6s"],
        ["spare", "-", "0/2", "-", "-", "-"],
    ]

    result = hibernate(cluster, "groups", "gg/shared", "-n", ns)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:3] == [
        "gpugroups.hibernate.dev/shared: awake 1/1, gpuMemory 16Gi/40Gi, makeRoomLevel L1, "
        "minAwakeSeconds 30, placement TimeSlicing",
        "  holding: llama",
        "  switch: qwen -> llama 0.6s",
    ]
    assert rows("\n".join(lines[3:])) == [
        ["MEMBER", "GPU", "LEVEL", "PHASE", "GPU MEMORY", "MAKE ROOM AT", "HOLDS SINCE"],
        ["llama", "Holding", "Awake", "Awake", "16Gi", "L1 (group)", since],
        ["qwen", "Released", "CudaSuspend", "Asleep", "-", "CudaSuspend", "-"],
    ]

    # qwen wakes: a switch under way, then qwen holds the GPU without declaring its memory, which
    # counts as the whole budget (as the gateway counts it); a stop shows in the last switch.
    switching = {"switching": {"from": "llama", "to": "qwen", "at": since}}
    create_group(cluster, ns, "shared", status=switching, maxAwake=1, gpuMemory="40Gi")
    result = hibernate(cluster, "groups", "-n", ns)
    assert rows(result.stdout)[1][-1] == "llama -> qwen running"
    stopped = {
        "switching": None,
        "holders": [{"name": "qwen", "since": since}],
        "holding": "qwen",
        "lastSwitch": {"from": "llama", "to": "qwen", "at": since, "seconds": 120.2, "result": "stopped"},
    }
    create_group(cluster, ns, "shared", status=stopped, maxAwake=1, gpuMemory="40Gi")
    result = hibernate(cluster, "groups", "-n", ns)
    assert rows(result.stdout)[1] == [
        "shared",
        "qwen",
        "1/1",
        "40Gi/40Gi",
        "llama,qwen",
        "llama -> qwen 120.2s (stopped)",
    ]

    result = hibernate(cluster, "groups", "-A")
    assert rows(result.stdout)[0][:2] == ["NAMESPACE", "GROUP"]
    assert [ns, "spare", "-"] in [r[:3] for r in rows(result.stdout)]

    result = hibernate(cluster, "groups", "gg/spare", "-n", ns)
    assert result.stdout.splitlines()[-1] == "No ModelDeployments name this group in spec.gpuGroup."
    result = hibernate(cluster, "groups", "gg/missing", "-n", ns)
    assert result.returncode == 1
    assert result.stderr.strip() == f'error: gpugroups.hibernate.dev "missing" not found in namespace "{ns}"'
    result = hibernate(cluster, "groups", "md/llama", "-n", ns)
    assert result.returncode == 2 and "`groups` shows GpuGroups; write gg/NAME" in result.stderr


def test_groups_in_a_namespace_without_any(cluster: Cluster, namespace: str) -> None:
    install_gpu_group_crd(cluster)
    result = hibernate(cluster, "groups", "-n", namespace)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"No GpuGroups found in namespace {namespace}.\n"


# ---- without a cluster ---------------------------------------------------------------------------


def test_a_bad_level_is_refused_before_connecting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sleep", "md/x", "--level", "deep", "--kubeconfig", str(tmp_path / "missing")]) == 2
    assert "valid values are 0-5 or Awake, L1, L2, CudaSuspend, Checkpoint, Stop" in capsys.readouterr().err


@pytest.mark.parametrize(
    "ref", ["md/llama", "modeldeployment/llama", "modeldeployments.hibernate.dev/llama", "MD/llama", "llama"]
)
def test_references_name_a_modeldeployment(ref: str) -> None:
    assert parse_ref(ref) == "llama"


@pytest.mark.parametrize("ref", ["gg/shared", "gpugroup/shared", "gpugroups.hibernate.dev/shared", "shared"])
def test_group_references_name_a_gpugroup(ref: str) -> None:
    assert parse_group_ref(ref) == "shared"


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (None, "-"),
        (
            json.dumps({"level": 3, "action": "sleep", "seconds": 1.234, "error": None}),
            "sleep to CudaSuspend 1.2s",
        ),
        (
            json.dumps({"level": 3, "action": "wake", "seconds": 4.7, "error": "restore: no GPU"}),
            "wake from CudaSuspend 4.7s error: restore: no GPU",
        ),
        (
            json.dumps({"level": 4, "action": "sleep", "started": "2026-11-25T10:00:00Z"}),
            "sleep to Checkpoint running",
        ),
        ("not json", "(unreadable: not json)"),
    ],
)
def test_last_operation_column(raw: str | None, text: str) -> None:
    assert last_operation_text(raw) == text


def test_wait_for_treats_a_failure_after_leaving_failed_as_new() -> None:
    """Failed (old) → Sleeping → Failed with the same message and time: a new failure all the same."""
    failed = {
        "metadata": {"name": "m"},
        "status": {
            "phase": "Failed",
            "observedGeneration": 2,
            "conditions": [{"type": "Degraded", "lastTransitionTime": "t0", "message": "boom"}],
        },
    }
    sleeping = {"metadata": {"name": "m"}, "status": {"phase": "Sleeping", "observedGeneration": 2}}
    seen = iter([failed, sleeping, failed])
    clock = iter(range(100))
    with pytest.raises(PluginError, match="failed: boom"):
        wait_for(
            lambda: next(seen),
            Target(level=SleepLevel.L1, generation=2),
            failed,
            timeout=50,
            out=sys.stderr,
            clock=lambda: float(next(clock)),
            sleep=lambda _: None,
        )
