"""Which parts of `spec.engine` would give a model's pods more rights than a pod of the namespace gets
by default; refused unless the cluster's admin allows them (chart values `security.*`).

Pure: the operator checks a spec with it before it writes the Deployment (any Kubernetes version),
and the chart's ValidatingAdmissionPolicy (Kubernetes 1.30+) refuses the same at admission with the
same messages (helm/hibernate/templates/operator/admission-policy.yaml; tests/test_pod_fields.py
runs both on one table).

What the spec can carry at all is fixed by the CRD's structural schema, which prunes every unknown
field: `securityContext`, `privileged`, `hostNetwork`, `hostPID`, `hostIPC`, host ports, extra
containers never reach the Deployment. Of what remains, these widen a pod's rights, as Pod Security
"baseline" counts them: a hostPath volume, Bidirectional mount propagation, an unconfined AppArmor
or seccomp profile (the pod annotations older clusters honour); then another ServiceAccount (its
token and RBAC), and `hibernate.dev/` pod annotations (the agent's interface: a template carrying
them would forge the agent's reports).
"""

from __future__ import annotations

from dataclasses import dataclass

from hibernate.api import constants as c
from hibernate.api.v1alpha1 import EngineSpec

REASON = "ForbiddenPodField"

HOST_PATH = (
    "spec.engine.volumes: a hostPath volume is refused (it reaches the node's filesystem); "
    "the chart value security.allowHostPath=true allows it"
)
BIDIRECTIONAL = (
    "spec.engine.volumeMounts: mountPropagation Bidirectional is refused "
    "(only a privileged container may have it, and hibernate makes none)"
)
UNCONFINED = (
    "spec.engine.podAnnotations: an unconfined AppArmor or seccomp profile is refused; "
    "the chart value security.allowUnconfinedProfiles=true allows it"
)
RESERVED = (
    f"spec.engine.podAnnotations: keys under {c.GROUP}/ are refused "
    "(they are the operator's and the node agent's)"
)


def service_account_message(name: str) -> str:
    return (
        f'spec.engine.serviceAccountName: ServiceAccount "{name}" is refused (only the namespace\'s '
        "default one is allowed); the chart value security.allowServiceAccounts lists those that are"
    )


# The pod annotations that set a profile (honoured up to 1.26 for seccomp, still read for AppArmor);
# "unconfined" is the one value Pod Security baseline refuses (the API server refuses unknown ones).
PROFILE_KEY_PREFIXES = (
    "container.apparmor.security.beta.kubernetes.io/",
    "seccomp.security.alpha.kubernetes.io/pod",
    "container.seccomp.security.alpha.kubernetes.io/",
)


@dataclass(frozen=True)
class PodFieldPolicy:
    """What the cluster's admin allows beyond the defaults (the chart's `security` values)."""

    allow_host_path: bool = False
    allow_service_accounts: frozenset[str] = frozenset()
    allow_unconfined_profiles: bool = False


def _unconfined(key: str, value: str) -> bool:
    return key.startswith(PROFILE_KEY_PREFIXES) and value == "unconfined"


def refusals(engine: EngineSpec, policy: PodFieldPolicy) -> list[str]:
    """The messages, one per kind of refused field, in a fixed order; empty when the spec is fine."""
    out = []
    if not policy.allow_host_path and any("hostPath" in v for v in engine.volumes):
        out.append(HOST_PATH)
    if any(m.get("mountPropagation") == "Bidirectional" for m in engine.volume_mounts):
        out.append(BIDIRECTIONAL)
    sa = engine.service_account_name
    if sa and sa != "default" and sa not in policy.allow_service_accounts:
        out.append(service_account_message(sa))
    annotations = engine.pod_annotations
    if not policy.allow_unconfined_profiles and any(_unconfined(k, v) for k, v in annotations.items()):
        out.append(UNCONFINED)
    if any(k.startswith(f"{c.GROUP}/") for k in annotations):
        out.append(RESERVED)
    return out
