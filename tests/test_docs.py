"""The user docs say what the code does: metric names, quoted errors, and the files they point to."""

from __future__ import annotations

import re

import pytest
import yaml
from prometheus_client import REGISTRY, CollectorRegistry

import hibernate.controller.idle_handlers
import hibernate.controller.metrics
from hibernate.agent.metrics import AgentMetrics
from hibernate.gateway.metrics import GatewayMetrics
from tests.cluster import ROOT

DOCS = ROOT / "docs"
MINE = ["install.md", "levels.md", "metrics.md", "troubleshooting.md"]
# Python source with implicitly concatenated string literals joined ("a " \n "b" reads "a b").
SOURCES = re.sub(
    r"\"\s*\n\s*[rf]?\"",
    "",
    "\n".join(p.read_text() for p in (ROOT / "operator" / "hibernate").rglob("*.py")),
)


def names(registry: CollectorRegistry, prefix: str = "hibernate_") -> set[str]:
    out = set()
    for family in registry.collect():
        if family.name.startswith(prefix):
            out.add(family.name + ("_total" if family.type == "counter" else ""))
    return out


def documented_metrics() -> dict[str, str]:
    """metric name → the section (component) of docs/metrics.md that lists it in a table."""
    section, found = "", {}
    for line in (DOCS / "metrics.md").read_text().splitlines():
        if line.startswith("## "):
            section = line[3:].split(" (")[0].strip()
        elif m := re.match(r"\| `(hibernate_[a-z_]+)` \|", line):
            found[m.group(1)] = section
    return found


def test_metrics_doc_lists_every_metric_of_each_component_and_no_other() -> None:
    documented = documented_metrics()
    gateway = names(GatewayMetrics(CollectorRegistry()).registry)
    agent = names(AgentMetrics().registry)
    operator = names(REGISTRY)  # the operator's modules register on the default registry
    assert {m for m, s in documented.items() if s == "Node agent"} == agent
    assert {m for m, s in documented.items() if s == "Gateway"} == gateway
    assert {m for m, s in documented.items() if s == "Operator"} == operator - gateway
    assert hibernate.controller.idle_handlers.TRANSITIONS  # imported for its registration


def test_metric_names_follow_prometheus_conventions() -> None:
    for name in documented_metrics():
        assert re.fullmatch(r"hibernate_(operator|agent|gateway|idle)_[a-z_]+", name), name
        assert not name.endswith("_count") and "_total_" not in name, name


# Messages docs/troubleshooting.md quotes; each must be what the code really says.
QUOTED = [
    "has no CUDA process (none holds /dev/nvidia*): CudaSuspend needs a GPU engine",
    "it needs driver 570 or newer (CUDA 12.8)",
    "are the sleep endpoints on? vLLM registers them only with VLLM_SERVER_DEV_MODE=1",
    "a CUDA checkpoint is only valid on the same GPU model and driver; refusing to restore (annotate the pod hibernate.dev/discard-checkpoint=true to discard the image and start the engine cold)",
    "to the wake check, where it answered",
    "before the sleep (",
    "greedy tokens",
    "; restarting the engine cold",
    "is outside the agent's allowed roots",
    "Checkpoint needs the hibernate pod init (run the operator with --tools-image)",
    "build one with hack/build-criu.sh or set HIBERNATE_CRIU",
    "(older releases cannot dump inet sockets on recent kernels)",
    "is not a sleep level",
    "warning: no ",
    "spec.engine.volumes: a hostPath volume is refused (it reaches the node's filesystem); the chart value security.allowHostPath=true allows it",
]


@pytest.mark.parametrize("fragment", QUOTED)
def test_troubleshooting_quotes_the_real_messages(fragment: str) -> None:
    text = (DOCS / "troubleshooting.md").read_text()
    assert fragment in text.replace("\n", " ") or fragment in text
    chart = "\n".join(p.read_text() for p in (ROOT / "helm" / "hibernate" / "templates").rglob("*.yaml"))
    assert fragment in SOURCES or fragment in chart, f"no longer in the code: {fragment!r}"


@pytest.mark.parametrize("doc", MINE)
def test_links_and_paths_in_the_docs_exist(doc: str) -> None:
    text = (DOCS / doc).read_text()
    for link in re.findall(r"\]\(([^)#]+)\)", text):
        if not link.startswith("http"):
            assert (DOCS / link).resolve().exists(), f"{doc}: broken link {link}"
    for path in re.findall(r"`((?:examples|helm/hibernate|hack|crds|bench)/[\w./-]+)`", text):
        assert (ROOT / path).exists(), f"{doc}: no such file {path}"
    for values in re.findall(r"`(ci/[\w-]+\.yaml)`", text):
        assert (ROOT / "helm" / "hibernate" / values).exists(), f"{doc}: no such values file {values}"


def test_levels_doc_labels_its_numbers_as_h100_probes() -> None:
    text = (DOCS / "levels.md").read_text()
    assert "probes on an H100 80GB HBM3, NVIDIA driver 580.159.04" in text
    # the design's headline numbers (notes/checkpointing.md), as measured
    for number in ("1.1\u20131.2 s", "1.5\u20131.6 s", "11.5 s", "4.7 s", "23.4 s", "17.8 s", "18.40 GB"):
        assert number in text, number


def test_every_chart_value_named_in_the_docs_exists() -> None:
    values = yaml.safe_load((ROOT / "helm" / "hibernate" / "values.yaml").read_text())
    for doc in MINE:
        for dotted in set(
            re.findall(
                r"`((?:agent|operator|gateway|networkPolicy|security|serviceMonitor|crds|rbac|monitoring)\.[\w.]+)",
                (DOCS / doc).read_text(),
            )
        ):
            node = values
            for key in dotted.split("."):
                assert isinstance(node, dict) and key in node, f"{doc}: no chart value {dotted}"
                node = node[key]


def test_install_doc_covers_the_prerequisites() -> None:
    text = (DOCS / "install.md").read_text()
    for needed in (
        "570",
        "CRIU 4.2",
        "hostPID",
        "privileged",
        "Host RAM",
        "helm upgrade",
        "helm uninstall",
        "kernel",
    ):
        assert needed.lower() in text.lower(), needed


def test_examples_are_named_in_the_docs() -> None:
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        assert any(f"examples/{path.name}" in (DOCS / d).read_text() for d in MINE), path.name
