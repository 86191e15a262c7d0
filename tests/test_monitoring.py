"""The chart's alerts and Grafana dashboard (monitoring.*): what they query exists, and the alerts fire.

The PrometheusRule is rendered with helm (tests/test_helm.py's helm) and its groups are run by
`promtool test rules` (Debian's prometheus package, installed by hack/setup.sh) on series written
here: every alert fires on its bad series and stays quiet on good ones. Every metric name in every
rule and dashboard query is one the code exports (read as tests/test_docs.py reads them), or one of
the few series of other exporters that docs/metrics.md names.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY, CollectorRegistry

import hibernate.controller.idle_handlers
import hibernate.controller.metrics
from hibernate.agent.metrics import AgentMetrics
from hibernate.gateway.metrics import GatewayMetrics
from tests.cluster import ROOT
from tests.test_docs import names
from tests.test_helm import CHART, helm, render  # noqa: F401 (helm is a fixture)

NS = "hibernate-system"
AGENT_JOB = "hibernate-agent-metrics"
DASHBOARD = CHART / "files" / "grafana-dashboard.json"

# Series of other exporters that the alerts and the dashboard use, with who exports them. docs/metrics.md
# names each one (test below), and the runbooks say which alert needs which.
EXTERNAL = {
    "up": "Prometheus itself, per scraped target",
    "kube_node_status_capacity": "kube-state-metrics",
    "kube_pod_labels": "kube-state-metrics (--metric-labels-allowlist=pods=[hibernate.dev/model])",
    "kube_pod_annotations": "kube-state-metrics (--metric-annotations-allowlist=pods=[...])",
    "node_filesystem_avail_bytes": "node-exporter",
    "node_filesystem_size_bytes": "node-exporter",
    "DCGM_FI_DEV_FB_USED": "NVIDIA dcgm-exporter",
    "DCGM_FI_DEV_FB_FREE": "NVIDIA dcgm-exporter",
}


# ---- what the code exports -----------------------------------------------------------------------


def exported() -> set[str]:
    """Every series name the code exports: counters with _total, histograms with their three series."""
    registries = [REGISTRY, GatewayMetrics(CollectorRegistry()).registry, AgentMetrics().registry]
    assert hibernate.controller.metrics.TRANSITIONS and hibernate.controller.idle_handlers.TRANSITIONS
    out = set().union(*(names(r) for r in registries))
    for registry in registries:
        for family in registry.collect():
            if family.name.startswith("hibernate_") and family.type == "histogram":
                out |= {f"{family.name}_{suffix}" for suffix in ("bucket", "sum", "count")}
    return out


KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
KEYWORDS |= {"and", "or", "unless", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (strings, matchers, ranges and grouping removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\boffset\s+\S+", " ", text)
    found = set()
    for m in re.finditer(r"(?<![\w$.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(\s*\()?", text):
        if not m.group(2) and m.group(1).lower() not in KEYWORDS:
            found.add(m.group(1))
    return found


def test_metric_names_are_read_from_promql() -> None:
    expr = (
        'histogram_quantile(0.9, sum by (le, level) (rate(a_bucket{level="L1", x=~"b|c"}[5m]))) > 3 '
        "or on (node) max without (pod) (up{job='x'} offset 5m) unless b_total * 1024^3"
    )
    assert metric_names(expr) == {"a_bucket", "up", "b_total"}


# ---- the PrometheusRule --------------------------------------------------------------------------


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is missing: hack/setup.sh installs Debian's prometheus package")
        pytest.skip("promtool is missing: apt-get install prometheus (hack/setup.sh does)")
    return found


def rule_groups(helm: Path, *args: str) -> list[dict[str, Any]]:  # noqa: F811
    docs = render(helm, "--set", "monitoring.prometheusRule.enabled=true", *args)
    rules = [d for d in docs if d["kind"] == "PrometheusRule"]
    assert len(rules) == 1
    groups: list[dict[str, Any]] = rules[0]["spec"]["groups"]
    return groups


def alerts(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for g in groups for r in g["rules"] if "alert" in r]


def test_rule_is_off_by_default_and_carries_its_labels(helm: Path) -> None:  # noqa: F811
    assert "PrometheusRule" not in [d["kind"] for d in render(helm)]
    docs = render(
        helm,
        "--set",
        "monitoring.prometheusRule.enabled=true",
        "--set",
        "monitoring.prometheusRule.labels.release=prom",
        "--set",
        "monitoring.prometheusRule.alertLabels.team=inference",
    )
    rule = next(d for d in docs if d["kind"] == "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "prom"
    assert rule["metadata"]["namespace"] == NS
    for alert in alerts(rule["spec"]["groups"]):
        assert alert["labels"]["team"] == "inference"
        assert alert["labels"]["severity"] in ("warning", "critical")


def test_every_alert_has_a_runbook_section_and_queries_only_known_series(helm: Path) -> None:  # noqa: F811
    text = (ROOT / "docs" / "troubleshooting.md").read_text()
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", text, re.M)
    }
    known = exported() | set(EXTERNAL)
    for alert in alerts(rule_groups(helm)):
        url = alert["annotations"]["runbook_url"]
        assert url.startswith("https://github.com/hibernate-dev/hibernate/blob/main/docs/troubleshooting.md#")
        assert url.split("#")[1] == alert["alert"].lower() and url.split("#")[1] in anchors, alert["alert"]
        assert alert["annotations"]["summary"] and alert["annotations"]["description"]
        used = metric_names(alert["expr"])
        assert used and used <= known, (alert["alert"], used - known)


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return {"series": f"{name}{{{inner}}}", "values": values}


AGENT = {"namespace": NS, "job": AGENT_JOB}
GIB = 1024**3


def wake_buckets(level: str, upto: str, node: str = "gpu-1") -> list[dict[str, str]]:
    """One wake a minute from `level`, each of them in the bucket `upto` (cumulative buckets)."""
    out = []
    for le in ("1", "30", "60", "120", "+Inf"):
        grows = float(le) >= float(upto) if le != "+Inf" else True
        out.append(
            series(
                "hibernate_agent_operation_seconds_bucket",
                "0+1x40" if grows else "0x40",
                le=le,
                level=level,
                action="wake",
                node=node,
                **AGENT,
            )
        )
    return out


def firing(**labels: str) -> dict[str, Any]:
    return {"exp_labels": labels}


# Each case: input series, then (time, alert, the alerts expected to fire then). The good series in
# a case sit beside the bad ones, so a quiet alert is one that ignores them.
CASES: list[tuple[str, list[dict[str, str]], list[tuple[str, str, list[dict[str, Any]]]]]] = [
    (
        "a wake fails: a new failed series, a growing one; an old failure and ok wakes are quiet",
        [
            series(
                "hibernate_agent_operations_total",
                "_x40 1x20",
                level="Checkpoint",
                action="wake",
                result="failed",
                node="gpu-1",
                **AGENT,
            ),
            series(
                "hibernate_agent_operations_total",
                "0x40 1 2 3 4 5 6 7 8 9 10",
                level="L2",
                action="wake",
                result="failed",
                node="gpu-2",
                **AGENT,
            ),
            series(
                "hibernate_agent_operations_total",
                "1x60",
                level="L1",
                action="wake",
                result="failed",
                node="gpu-3",
                **AGENT,
            ),
            series(
                "hibernate_agent_operations_total",
                "0+1x60",
                level="L1",
                action="wake",
                result="ok",
                node="gpu-3",
                **AGENT,
            ),
            series(
                "hibernate_agent_operations_total",
                "0+1x60",
                level="L1",
                action="sleep",
                result="rolled_back",
                node="gpu-3",
                **AGENT,
            ),
        ],
        [
            ("35m", "HibernateWakeFailing", []),
            (
                "45m",
                "HibernateWakeFailing",
                [
                    firing(severity="critical", namespace=NS, node="gpu-1", level="Checkpoint"),
                    firing(severity="critical", namespace=NS, node="gpu-2", level="L2"),
                ],
            ),
        ],
    ),
    (
        "wakes from L1 take 30-60 s (threshold 30): slow; the same from L2 (threshold 120) is not",
        [
            *wake_buckets("L1", "60"),
            *wake_buckets("L2", "60", node="gpu-2"),
            *wake_buckets("Checkpoint", "1"),
        ],
        [("20m", "HibernateWakeSlow", [firing(severity="warning", namespace=NS, level="L1")])],
    ),
    (
        "wakes under a second from every level are quiet",
        [*(s for level in ("L1", "L2", "CudaSuspend", "Checkpoint") for s in wake_buckets(level, "1"))],
        [("20m", "HibernateWakeSlow", [])],
    ),
    (
        "a pod stays Waking past stuckFor; one that passes through Sleeping, and Asleep pods, do not count",
        [
            series("hibernate_agent_pods", "1x30", state="Waking", node="gpu-1", **AGENT),
            series("hibernate_agent_pods", "1x5 0x25", state="Sleeping", node="gpu-1", **AGENT),
            series("hibernate_agent_pods", "3x30", state="Asleep", node="gpu-2", **AGENT),
        ],
        [
            ("10m", "HibernatePodStuck", []),
            (
                "20m",
                "HibernatePodStuck",
                [firing(severity="warning", namespace=NS, node="gpu-1", state="Waking")],
            ),
        ],
    ),
    (
        "a pod stays Failed past failedFor; a node without Failed pods is quiet",
        [
            series("hibernate_agent_pods", "1x20", state="Failed", node="gpu-1", **AGENT),
            series("hibernate_agent_pods", "0x20", state="Failed", node="gpu-2", **AGENT),
        ],
        [
            ("3m", "HibernatePodFailed", []),
            ("10m", "HibernatePodFailed", [firing(severity="warning", namespace=NS, node="gpu-1")]),
        ],
    ),
    (
        "an agent's scrape fails; a healthy agent and another job's failing scrape are quiet",
        [
            series("up", "0x20", node="gpu-1", pod="hibernate-agent-a", **AGENT),
            series("up", "1x20", node="gpu-2", pod="hibernate-agent-b", **AGENT),
            series("up", "0x20", namespace=NS, job="hibernate-operator-metrics", pod="hibernate-operator-x"),
        ],
        [
            ("5m", "HibernateAgentDown", []),
            (
                "15m",
                "HibernateAgentDown",
                [firing(severity="critical", namespace=NS, node="gpu-1", pod="hibernate-agent-a")],
            ),
        ],
    ),
    (
        "a GPU node without an agent target; GPU nodes with one (up or down) and CPU nodes are quiet",
        [
            series(
                "kube_node_status_capacity", "8x20", node="gpu-1", resource="nvidia_com_gpu", unit="integer"
            ),
            series(
                "kube_node_status_capacity", "8x20", node="gpu-2", resource="nvidia_com_gpu", unit="integer"
            ),
            series(
                "kube_node_status_capacity", "8x20", node="gpu-3", resource="nvidia_com_gpu", unit="integer"
            ),
            series("kube_node_status_capacity", "16x20", node="cpu-1", resource="cpu", unit="core"),
            series("up", "1x20", node="gpu-1", pod="hibernate-agent-a", **AGENT),
            series("up", "0x20", node="gpu-3", pod="hibernate-agent-c", **AGENT),
        ],
        [
            ("5m", "HibernateAgentMissingOnGPUNode", []),
            ("15m", "HibernateAgentMissingOnGPUNode", [firing(severity="warning", node="gpu-2")]),
        ],
    ),
    (
        "one node writes 100 GiB of images a minute; another writes 1 GiB",
        [
            series("hibernate_agent_checkpoint_bytes_total", f"0+{100 * GIB}x10", node="gpu-1", **AGENT),
            series("hibernate_agent_checkpoint_bytes_total", f"0+{GIB}x10", node="gpu-2", **AGENT),
        ],
        [
            ("2m", "HibernateCheckpointWritesHigh", []),
            (
                "10m",
                "HibernateCheckpointWritesHigh",
                [firing(severity="warning", namespace=NS, node="gpu-1")],
            ),
        ],
    ),
    (
        "/ at 5 % free; / at 50 %, a full /boot and a full tmpfs are not the checkpoint disk",
        [
            series("node_filesystem_avail_bytes", "5x20", instance="gpu-1", mountpoint="/", fstype="ext4"),
            series("node_filesystem_size_bytes", "100x20", instance="gpu-1", mountpoint="/", fstype="ext4"),
            series("node_filesystem_avail_bytes", "50x20", instance="gpu-2", mountpoint="/", fstype="ext4"),
            series("node_filesystem_size_bytes", "100x20", instance="gpu-2", mountpoint="/", fstype="ext4"),
            series(
                "node_filesystem_avail_bytes", "1x20", instance="gpu-2", mountpoint="/boot", fstype="ext4"
            ),
            series(
                "node_filesystem_size_bytes", "100x20", instance="gpu-2", mountpoint="/boot", fstype="ext4"
            ),
            series(
                "node_filesystem_avail_bytes",
                "1x20",
                instance="gpu-2",
                mountpoint="/var/lib/hibernate",
                fstype="tmpfs",
            ),
            series(
                "node_filesystem_size_bytes",
                "100x20",
                instance="gpu-2",
                mountpoint="/var/lib/hibernate",
                fstype="tmpfs",
            ),
        ],
        [
            ("5m", "HibernateCheckpointDiskFilling", []),
            (
                "15m",
                "HibernateCheckpointDiskFilling",
                [firing(severity="warning", instance="gpu-1", mountpoint="/", fstype="ext4")],
            ),
        ],
    ),
    (
        "a request held past the gateway's hold timeout; ok requests and an old timeout are quiet",
        [
            series(
                "hibernate_gateway_requests_total",
                "0x5 1x40",
                result="hold_timeout",
                namespace=NS,
                job="hibernate-gateway",
                pod="gw-a",
            ),
            series(
                "hibernate_gateway_requests_total",
                "0+5x45",
                result="ok",
                namespace=NS,
                job="hibernate-gateway",
                pod="gw-a",
            ),
        ],
        [
            ("3m", "HibernateGatewayHoldTimeout", []),
            ("10m", "HibernateGatewayHoldTimeout", [firing(severity="critical", namespace=NS)]),
            ("40m", "HibernateGatewayHoldTimeout", []),
        ],
    ),
]


def test_every_alert_has_a_case_that_fires_and_one_that_stays_quiet(helm: Path) -> None:  # noqa: F811
    names_ = {a["alert"] for a in alerts(rule_groups(helm))}
    fires = {alert for _, _, checks in CASES for _, alert, expected in checks if expected}
    quiet = {alert for _, _, checks in CASES for _, alert, expected in checks if not expected}
    assert fires == names_ and quiet == names_


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_promtool_alerts_fire_on_bad_series_and_not_on_good_ones(
    helm: Path,  # noqa: F811
    tmp_path: Path,
    case: tuple[str, list[dict[str, str]], list[tuple[str, str, list[dict[str, Any]]]]],
) -> None:
    tool = promtool()
    groups = rule_groups(helm)
    full = tmp_path / "full.yaml"
    full.write_text(yaml.safe_dump({"groups": groups}))
    check = subprocess.run([tool, "check", "rules", str(full)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    # promtool compares annotations too; theirs are templates over the value, checked above.
    for rule in alerts(groups):
        rule.pop("annotations", None)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    _, input_series, checks = case
    test = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": input_series,
                "alert_rule_test": [
                    {"eval_time": at, "alertname": alert, "exp_alerts": expected}
                    for at, alert, expected in checks
                ],
            }
        ],
    }
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(test))
    result = subprocess.run(
        [tool, "test", "rules", "test.yaml"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---- the Grafana dashboard -----------------------------------------------------------------------

# Grafana's variables, replaced by what they stand for so that promtool can parse the queries.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__range": "6h", "$node": ".*", "$model": ".*"}


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable (label_values' selector)."""
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["query"]["query"])
            assert m, variable["query"]
            out.append((f"variable {variable['name']}", m.group(1)))
    return out


def grafana_expanded(expr: str) -> str:
    for name, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(name, value)
    assert "$" not in expr, expr
    return expr


def test_dashboard_is_a_configmap_for_the_sidecar_off_by_default(helm: Path) -> None:  # noqa: F811
    assert "hibernate-dashboard" not in [d["metadata"]["name"] for d in render(helm)]
    docs = render(
        helm,
        "--set",
        "monitoring.grafanaDashboard.enabled=true",
        "--set",
        "monitoring.grafanaDashboard.annotations.grafana_folder=GPU",
    )
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "hibernate-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "GPU"}
    assert cm["metadata"]["namespace"] == NS
    assert json.loads(cm["data"]["hibernate.json"]) == json.loads(DASHBOARD.read_text())


def test_dashboard_covers_the_issue_and_queries_only_series_the_code_exports() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "hibernate-overview"
    queries = dashboard_queries(dashboard)
    known = exported() | set(EXTERNAL)
    used: set[str] = set()
    for where, expr in queries:
        found = metric_names(expr)
        assert found, where
        assert found <= known, f"{where}: not exported by the code: {sorted(found - known)}"
        used |= found
    # Per model level, wake and sleep seconds per level, GPU memory, held requests and their wait,
    # the idle ladder: each has its series on the dashboard.
    for needed in (
        "kube_pod_annotations",
        "hibernate_agent_operation_seconds_bucket",
        "DCGM_FI_DEV_FB_FREE",
        "hibernate_gateway_requests_held",
        "hibernate_gateway_hold_seconds_bucket",
        "hibernate_idle_transitions_total",
    ):
        assert needed in used, needed
    actions = " ".join(expr for _, expr in queries)
    assert 'action="wake"' in actions and 'action="sleep"' in actions
    # Every panel reads the data source variable, not a data source of the author's Grafana.
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    tool = promtool()
    queries = dashboard_queries(json.loads(DASHBOARD.read_text()))
    rules = [
        {"record": f"dashboard:query_{i}:check", "expr": grafana_expanded(e)}
        for i, (_, e) in enumerate(queries)
    ]
    (tmp_path / "dashboard.yaml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]})
    )
    result = subprocess.run(
        [tool, "check", "rules", str(tmp_path / "dashboard.yaml")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_metrics_doc_names_the_other_exporters_series() -> None:
    text = (ROOT / "docs" / "metrics.md").read_text()
    for name in EXTERNAL:
        assert f"`{name}" in text, name


def test_helm_lint_is_clean_with_alerts_and_dashboard_on(helm: Path, tmp_path: Path) -> None:  # noqa: F811
    values = tmp_path / "monitoring-values.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "monitoring": {
                    "prometheusRule": {"enabled": True, "labels": {"release": "prometheus"}},
                    "grafanaDashboard": {"enabled": True, "annotations": {"grafana_folder": "GPU"}},
                }
            }
        )
    )
    out = subprocess.run(
        [str(helm), "lint", "--strict", str(CHART), "-f", str(values)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and "[WARNING]" not in out.stdout and "[ERROR]" not in out.stdout, out.stdout
