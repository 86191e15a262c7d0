# mypy: disallow-untyped-calls=False
# (the official client ships no type hints; this module is the typed boundary around it)
"""kubectl hibernate: put ModelDeployments to sleep, wake them, and see where every pod stands.

    kubectl hibernate sleep md/NAME --level CudaSuspend [--wait] [--timeout 300] [-n NS]
    kubectl hibernate wake md/NAME [--wait] [--timeout 300] [-n NS]
    kubectl hibernate status [md/NAME] [-n NS | -A] [--watch [--interval 1]] [--wait] [--timeout S]
    kubectl hibernate groups [gg/NAME] [-n NS | -A]

kubectl runs this as `kubectl-hibernate` from $PATH (the console script of the hibernate package).
It talks to the cluster like kubectl: $KUBECONFIG (or ~/.kube/config), --kubeconfig, --context, and
the context's namespace unless -n says otherwise; inside a pod, the pod's ServiceAccount.

`sleep` and `wake` set spec.sleepLevel, as `kubectl patch` would, and remove the automatic level
(the idle ladder's or a wake on request's, hibernate.api.auto_level): a person's request wins, even
when the spec already says that level. With --wait they
follow the status the operator writes until every replica has reached the level (exit 0), the
operator reports Failed (exit 1, with its message) or --timeout passes (exit 1). Usage errors, an
invalid level among them, exit 2 and change nothing.

`status --watch` redraws the per-pod table in place every --interval seconds (on a terminal; piped,
it prints a new frame whenever something but the clocks changed), with the time watched, how long the
ModelDeployment's transition has run and how long each pod's operation has run, until Ctrl-C or
--timeout (exit 0). `status md/NAME --wait` watches until the ModelDeployment reaches the level in
effect (its automatic level while one is set, else its spec's) (exit 0), fails anew (exit 1) or
--timeout passes (exit 1; default 300 s).

`groups` lists the GpuGroups (docs/gpu-sharing.md): who holds the GPU, how many may, the GPU memory
the holders declare against the group's budget, the members and the last switch; `groups gg/NAME`
one group and a row per member (its GPU, level, phase, declared memory and level to make room at).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import kubernetes
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from hibernate.api import auto_level
from hibernate.api import constants as c
from hibernate.api.gpu_group import GpuGroupSpec, parse_bytes
from hibernate.api.levels import InvalidSleepLevel, SleepLevel

PROG = "kubectl hibernate"
RESOURCE = f"{c.PLURAL}.{c.GROUP}"
MD_KINDS = frozenset(
    {*c.SHORT_NAMES, c.SINGULAR, c.PLURAL, f"{c.SINGULAR}.{c.GROUP}", RESOURCE, c.KIND.lower()}
)
GG_RESOURCE = f"{c.GPU_GROUP_PLURAL}.{c.GROUP}"
GG_KINDS = frozenset(
    {
        *c.GPU_GROUP_SHORT_NAMES,
        c.GPU_GROUP_SINGULAR,
        c.GPU_GROUP_PLURAL,
        f"{c.GPU_GROUP_SINGULAR}.{c.GROUP}",
        GG_RESOURCE,
        c.GPU_GROUP_KIND.lower(),
    }
)
IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
POLL_SECONDS = 0.5
CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear the screen: `watch` redraws the same way


class UsageError(Exception):
    """Bad arguments: exit 2, nothing changed."""


class PluginError(Exception):
    """The request could not be carried out, or the wait ended badly: exit 1."""


# ---- talking to the cluster ----------------------------------------------------------------------


@dataclass
class Client:
    api: Any  # kubernetes.client.ApiClient
    namespace: str  # the namespace of the context (or the pod), for when -n is not given

    @property
    def custom(self) -> Any:
        return kubernetes.client.CustomObjectsApi(self.api)

    @property
    def core(self) -> Any:
        return kubernetes.client.CoreV1Api(self.api)


def connect(kubeconfig: str | None, context: str | None) -> Client:
    """Like kubectl: the kubeconfig ($KUBECONFIG, else ~/.kube/config), else the in-cluster config."""
    try:
        api = kubernetes.config.new_client_from_config(config_file=kubeconfig, context=context)
        _, current = kubernetes.config.list_kube_config_contexts(config_file=kubeconfig)
        if context:
            contexts, _ = kubernetes.config.list_kube_config_contexts(config_file=kubeconfig)
            current = next((x for x in contexts if x.get("name") == context), current)
        namespace = (current or {}).get("context", {}).get("namespace") or "default"
        return Client(api, namespace)
    except kubernetes.config.ConfigException as e:
        if kubeconfig or context or not IN_CLUSTER_NAMESPACE.exists():
            raise PluginError(f"no usable kubeconfig: {e}") from e
    config = kubernetes.client.Configuration()
    kubernetes.config.load_incluster_config(client_configuration=config)
    return Client(kubernetes.client.ApiClient(config), IN_CLUSTER_NAMESPACE.read_text().strip())


def _api_error(e: ApiException) -> str:
    try:
        message = json.loads(e.body).get("message") if e.body else None
    except (TypeError, ValueError, AttributeError):
        message = None
    return f"{message or e.reason} (HTTP {e.status})"


def get_md(client: Client, namespace: str, name: str) -> dict[str, Any]:
    try:
        md: dict[str, Any] = client.custom.get_namespaced_custom_object(
            c.GROUP, c.VERSION, namespace, c.PLURAL, name
        )
    except ApiException as e:
        if e.status == 404:
            raise PluginError(f'{RESOURCE} "{name}" not found in namespace "{namespace}"') from e
        raise PluginError(f"cannot read {RESOURCE}/{name}: {_api_error(e)}") from e
    return md


def set_level(client: Client, namespace: str, name: str, level: SleepLevel) -> dict[str, Any]:
    body = {
        # A person asked: whatever the idle ladder or the gateway decided no longer applies.
        "metadata": {"annotations": auto_level.cleared()},
        "spec": {"sleepLevel": level.label},
    }
    try:
        md: dict[str, Any] = client.custom.patch_namespaced_custom_object(
            c.GROUP,
            c.VERSION,
            namespace,
            c.PLURAL,
            name,
            body,
            _content_type="application/merge-patch+json",
        )
    except ApiException as e:
        if e.status == 404:
            raise PluginError(f'{RESOURCE} "{name}" not found in namespace "{namespace}"') from e
        raise PluginError(f"cannot set the sleep level of {RESOURCE}/{name}: {_api_error(e)}") from e
    return md


# ---- arguments -----------------------------------------------------------------------------------


def parse_ref(text: str) -> str:
    """`md/NAME`, `modeldeployment/NAME`, `modeldeployments.hibernate.dev/NAME` or a bare NAME."""
    return _parse_name(text, "md", MD_KINDS, "only ModelDeployments can sleep")


def parse_group_ref(text: str) -> str:
    """`gg/NAME`, `gpugroup/NAME`, `gpugroups.hibernate.dev/NAME` or a bare NAME."""
    return _parse_name(text, "gg", GG_KINDS, "`groups` shows GpuGroups")


def _parse_name(text: str, short: str, kinds: frozenset[str], wrong_kind: str) -> str:
    kind, slash, name = text.partition("/")
    if not slash:
        kind, name = short, text
    if kind.lower() not in kinds:
        raise UsageError(f"{text!r}: {wrong_kind}; write {short}/NAME")
    if not name or "/" in name:
        raise UsageError(f"{text!r}: write {short}/NAME")
    return name


def parse_level(text: str) -> SleepLevel:
    try:
        level = SleepLevel.parse(text)
    except InvalidSleepLevel as e:
        raise UsageError(str(e)) from e
    if level == SleepLevel.AWAKE:
        raise UsageError(f"--level {text}: that is awake; use `{PROG} wake`")
    return level


# ---- waiting -------------------------------------------------------------------------------------


def _condition(md: dict[str, Any], ctype: str) -> dict[str, Any]:
    conditions = (md.get("status") or {}).get("conditions") or []
    return next((x for x in conditions if x.get("type") == ctype), {})


def _failure_mark(md: dict[str, Any]) -> tuple[str, str] | None:
    """Identifies one spell of Failed: a new failure has a new transition time or message."""
    if (md.get("status") or {}).get("phase") != "Failed":
        return None
    degraded = _condition(md, "Degraded")
    return (str(degraded.get("lastTransitionTime")), str(degraded.get("message")))


def _failure_message(md: dict[str, Any]) -> str:
    for ctype in ("Degraded", "Ready"):
        if message := _condition(md, ctype).get("message"):
            return str(message)
    return "the operator reports Failed"


def _describe(md: dict[str, Any]) -> str:
    status = md.get("status") or {}
    return f"phase {status.get('phase') or 'unknown'}, level {status.get('sleepLevel') or 'unknown'}"


@dataclass
class Target:
    level: SleepLevel
    generation: int

    @property
    def phase(self) -> str:
        if self.level == SleepLevel.AWAKE:
            return "Awake"
        return "Stopped" if self.level == SleepLevel.STOP else "Asleep"

    def reached(self, md: dict[str, Any]) -> bool:
        status = md.get("status") or {}
        if int(status.get("observedGeneration") or 0) < self.generation:
            return False  # the operator has not seen the request yet: any status is an old one
        if status.get("phase") != self.phase:
            return False
        return self.level == SleepLevel.AWAKE or status.get("sleepLevel") == self.level.label


def wait_for(
    read: Callable[[], dict[str, Any]],
    target: Target,
    before: dict[str, Any],
    timeout: float,
    out: TextIO,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Follow the status until `target` is reached; PluginError on Failed or at the timeout.

    A Failed status from before the request (same condition time and message) does not count: the
    agent retries at the new level, and only a failure of this request ends the wait.
    """
    stale = _failure_mark(before)
    deadline = clock() + timeout
    last_phase = None
    while True:
        md = read()
        status = md.get("status") or {}
        phase = status.get("phase")
        if phase != last_phase and phase:
            print(f"{RESOURCE}/{md['metadata']['name']}: {_describe(md)}", file=out, flush=True)
            last_phase = phase
        if target.reached(md):
            return md
        mark = _failure_mark(md)
        if mark is None:
            stale = None  # left Failed: the next Failed is a new one
        elif mark != stale and int(status.get("observedGeneration") or 0) >= target.generation:
            raise PluginError(f"{RESOURCE}/{md['metadata']['name']} failed: {_failure_message(md)}")
        if clock() >= deadline:
            raise PluginError(
                f"timed out after {timeout:g} s waiting for {RESOURCE}/{md['metadata']['name']} to be "
                f"{target.phase}{'' if target.level == SleepLevel.AWAKE else ' at ' + target.level.label}; "
                f"now {_describe(md)}"
            )
        sleep(min(POLL_SECONDS, max(0.0, deadline - clock())))


# ---- commands ------------------------------------------------------------------------------------


def _change(client: Client, args: argparse.Namespace, level: SleepLevel) -> int:
    name = parse_ref(args.ref)
    namespace = args.namespace or client.namespace
    before = get_md(client, namespace, name)
    md = set_level(client, namespace, name, level)
    print(f"{RESOURCE}/{name} sleepLevel set to {level.label}", flush=True)
    if not args.wait:
        return 0
    target = Target(level, int(md["metadata"].get("generation") or 0))
    done = wait_for(lambda: get_md(client, namespace, name), target, before, args.timeout, sys.stderr)
    print(
        f"{RESOURCE}/{name} is {target.phase}"
        + ("" if target.phase == "Awake" else f" at {done['status']['sleepLevel']}")
    )
    return 0


def cmd_sleep(client: Client, args: argparse.Namespace) -> int:
    return _change(client, args, parse_level(args.level))


def cmd_wake(client: Client, args: argparse.Namespace) -> int:
    return _change(client, args, SleepLevel.AWAKE)


def _level_text(raw: object) -> str:
    if raw is None or raw == "":
        return "-"
    try:
        return SleepLevel.parse(raw).label
    except InvalidSleepLevel:
        return f"{raw}(invalid)"


def _parse_time(text: object) -> datetime | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _since(started: object, now: datetime | None) -> str:
    """`12.3s` from `started` (an RFC 3339 time) to `now`; empty without either."""
    when = _parse_time(started)
    if when is None or now is None:
        return ""
    return f"{max(0.0, (now - when).total_seconds()):.1f}s"


def last_operation_text(raw: str | None, now: datetime | None = None) -> str:
    """`sleep to CudaSuspend 1.2s`, `wake from L2 0.4s`, then `error: ...` when it failed; `-` if none.

    An operation under way reads `running`, and with `now` how long it has run: `running 12.3s`.
    """
    if not raw:
        return "-"
    try:
        op = json.loads(raw)
    except json.JSONDecodeError:
        return f"(unreadable: {raw[:40]})"
    if not isinstance(op, dict):
        return f"(unreadable: {raw[:40]})"
    action = str(op.get("action") or "?")
    # A sleep goes to its level; a wake comes from it (agent/worker.py records it so).
    direction = {"sleep": "to", "wake": "from"}.get(action)
    parts = [action, *([direction] if direction else []), _level_text(op.get("level"))]
    seconds = op.get("seconds")
    if isinstance(seconds, int | float):
        parts.append(f"{seconds:.1f}s")
    elif op.get("started"):
        parts.append("running")
        if elapsed := _since(op["started"], now):
            parts.append(elapsed)
    if op.get("error"):
        parts.append(f"error: {op['error']}")
    return " ".join(parts)


def pod_row(pod: dict[str, Any], now: datetime | None = None) -> dict[str, str]:
    meta = pod.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    state = annotations.get(c.ANN_STATE) or "-"
    if meta.get("deletionTimestamp"):
        state += " (terminating)"
    return {
        "NAMESPACE": meta.get("namespace", ""),
        "MODEL": (meta.get("labels") or {}).get(c.LABEL_MODEL, "-"),
        "POD": meta.get("name", ""),
        "NODE": (pod.get("spec") or {}).get("nodeName") or "<none>",
        "DESIRED": _level_text(annotations.get(c.ANN_SLEEP_LEVEL)),
        "OBSERVED": _level_text(annotations.get(c.ANN_OBSERVED_LEVEL)),
        "STATE": state,
        "LAST OPERATION": last_operation_text(annotations.get(c.ANN_LAST_OPERATION), now),
    }


def table(rows: list[dict[str, str]], columns: Sequence[str]) -> str:
    widths = {col: max([len(col), *(len(r[col]) for r in rows)]) for col in columns}
    lines = ["   ".join(col.ljust(widths[col]) for col in columns)]
    lines += ["   ".join(r[col].ljust(widths[col]) for col in columns) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def _transition_text(md: dict[str, Any], now: datetime | None) -> str:
    """`  transition L1 -> Checkpoint: running 12.3s` (or `took 3.2s`); empty when there is none."""
    transition = (md.get("status") or {}).get("lastTransition") or {}
    if not transition.get("to"):
        return ""
    text = f"  transition {transition.get('from') or '-'} -> {transition['to']}: "
    if isinstance(transition.get("seconds"), int | float):
        return text + f"took {transition['seconds']:.1f}s"
    return text + " ".join(["running", _since(transition.get("started"), now)]).rstrip()


@dataclass
class Frame:
    text: str
    key: str  # the text without the clocks: what a piped --watch compares
    md: dict[str, Any] | None


def status_frame(client: Client, args: argparse.Namespace, now: datetime | None) -> Frame:
    """What `status` prints: the ModelDeployment's line (with md/NAME) and the table of its pods."""
    columns = ["POD", "NODE", "DESIRED", "OBSERVED", "STATE", "LAST OPERATION"]
    head: list[tuple[str, str]] = []  # (text, text without clocks)
    md = None
    if args.ref:
        name = parse_ref(args.ref)
        namespace = args.namespace or client.namespace
        md = get_md(client, namespace, name)
        status = md.get("status") or {}
        line = (
            f"{RESOURCE}/{name}: model {md['spec'].get('model')}, desired {_level_text(md['spec'].get('sleepLevel'))}, "
            f"reached {status.get('sleepLevel') or '-'}, phase {status.get('phase') or '-'}"
        )
        head.append((line, line))
        if args.watch and (transition := _transition_text(md, now)):
            head.append((transition, _transition_text(md, None)))
        if status.get("phase") == "Failed":
            line = f"  failed: {_failure_message(md)}"
            head.append((line, line))
        selector = f"{c.LABEL_MODEL}={name}"
    else:
        selector = f"{c.LABEL_MANAGED}=true"
        columns.insert(0, "MODEL")
        namespace = None if args.all_namespaces else (args.namespace or client.namespace)
        if namespace is None:
            columns.insert(0, "NAMESPACE")
    try:
        if namespace is None:
            found = client.core.list_pod_for_all_namespaces(label_selector=selector)
        else:
            found = client.core.list_namespaced_pod(namespace, label_selector=selector)
    except ApiException as e:
        raise PluginError(f"cannot list pods: {_api_error(e)}") from e
    pods = client.api.sanitize_for_serialization(found).get("items") or []

    def body(clock: datetime | None) -> str:
        rows = sorted((pod_row(p, clock) for p in pods), key=lambda r: (r["NAMESPACE"], r["MODEL"], r["POD"]))
        if not rows:
            where = "any namespace" if namespace is None else f"namespace {namespace}"
            return f"No pods of ModelDeployments found in {where}."
        return table(rows, columns)

    text = "\n".join([*(h for h, _ in head), body(now)])
    key = "\n".join([*(k for _, k in head), body(None)])
    return Frame(text, key, md)


def cmd_status(client: Client, args: argparse.Namespace) -> int:
    if args.ref and args.all_namespaces:
        raise UsageError("-A lists every namespace; with md/NAME use -n")
    if args.wait and not args.ref:
        raise UsageError("--wait follows one ModelDeployment: status md/NAME --wait")
    if args.watch or args.wait:
        args.watch = True
        return watch(client, args)
    print(status_frame(client, args, datetime.now(UTC)).text)
    return 0


def watch(
    client: Client,
    args: argparse.Namespace,
    out: TextIO | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Redraw the status every --interval until Ctrl-C, --timeout, or (--wait) the level in effect."""
    out = out or sys.stdout
    tty = out.isatty()
    started = clock()
    target = stale = None
    if args.wait:
        md = get_md(client, args.namespace or client.namespace, parse_ref(args.ref))
        try:
            level = SleepLevel.parse(md["spec"].get("sleepLevel", "Awake"))
        except InvalidSleepLevel as e:
            raise PluginError(f"{RESOURCE}/{md['metadata']['name']}: {e}") from e
        # The level in effect: an automatic level (idle ladder, wake on request) wins over the spec's.
        level = auto_level.effective_level(md, level)
        target = Target(level, int(md["metadata"].get("generation") or 0))
        stale = _failure_mark(md)
    timeout = args.timeout if args.timeout is not None else (300.0 if args.wait else None)
    command = " ".join(["kubectl hibernate status", *([args.ref] if args.ref else [])])
    last_key = None
    try:
        while True:
            elapsed = clock() - started
            frame = status_frame(client, args, datetime.now(UTC))
            header = f"Every {args.interval:g}s: {command}    watched {elapsed:.1f}s"
            if tty:
                out.write(f"{CLEAR}{header}\n{frame.text}\n")
            elif frame.key != last_key:
                out.write(f"{'' if last_key is None else chr(10)}{header}\n{frame.text}\n")
            out.flush()
            last_key = frame.key
            if target is not None and frame.md is not None:
                if target.reached(frame.md):
                    name = frame.md["metadata"]["name"]
                    suffix = "" if target.phase == "Awake" else f" at {target.level.label}"
                    print(f"{RESOURCE}/{name} is {target.phase}{suffix}", file=out, flush=True)
                    return 0
                mark = _failure_mark(frame.md)
                if mark is None:
                    stale = None
                elif mark != stale:
                    raise PluginError(
                        f"{RESOURCE}/{frame.md['metadata']['name']} failed: {_failure_message(frame.md)}"
                    )
            if timeout is not None and clock() - started >= timeout:
                if target is not None:
                    raise PluginError(
                        f"timed out after {timeout:g} s waiting for {args.ref} to reach {target.level.label}"
                    )
                return 0
            left = args.interval if timeout is None else min(args.interval, timeout - (clock() - started))
            sleep(max(0.0, left))
    except KeyboardInterrupt:
        out.write("\n")
        out.flush()
        return 130 if target is not None else 0


# ---- GpuGroups -----------------------------------------------------------------------------------


def _list(client: Client, plural: str, namespace: str | None) -> list[dict[str, Any]]:
    """Every object of a hibernate.dev kind in `namespace` (None: every namespace)."""
    try:
        if namespace is None:
            found = client.custom.list_cluster_custom_object(c.GROUP, c.VERSION, plural)
        else:
            found = client.custom.list_namespaced_custom_object(c.GROUP, c.VERSION, namespace, plural)
    except ApiException as e:
        raise PluginError(f"cannot list {plural}.{c.GROUP}: {_api_error(e)}") from e
    items: list[dict[str, Any]] = found.get("items") or []
    return items


def _gib(size: int) -> str:
    return f"{round(size / 2**30, 1):g}Gi"


def _declared_memory(md: dict[str, Any]) -> int | None:
    raw = ((md.get("spec") or {}).get("gpuGroup") or {}).get("gpuMemory")
    try:
        return None if raw is None else parse_bytes(raw)
    except ValueError:
        return None


@dataclass
class GroupView:
    """A GpuGroup as `groups` shows it: its spec (defaults filled in), status and live members."""

    group: dict[str, Any]
    members: list[dict[str, Any]]  # the ModelDeployments whose spec.gpuGroup.name names it

    @property
    def name(self) -> str:
        return str(self.group["metadata"]["name"])

    @property
    def status(self) -> dict[str, Any]:
        return self.group.get("status") or {}

    @property
    def spec(self) -> GpuGroupSpec | None:
        try:
            return GpuGroupSpec.model_validate(self.group.get("spec") or {})
        except ValidationError:
            return None

    def holders(self) -> list[str]:
        """Who holds the GPU, as the operator's status says (`kubectl get gg`'s HOLDERS)."""
        return [str(h.get("name")) for h in self.status.get("holders") or []]

    def awake_text(self) -> str:
        spec = self.spec
        return f"{len(self.holders())}/{spec.max_awake if spec else '?'}"

    def memory_text(self) -> str:
        """`32Gi/80Gi`: what the holders declare (one that declares nothing counts as the whole
        budget, as the gateway counts it) against the budget; `-` without a budget."""
        spec = self.spec
        if spec is None or spec.gpu_memory is None:
            return "-"
        budget = parse_bytes(spec.gpu_memory)
        declared = {md["metadata"]["name"]: _declared_memory(md) for md in self.members}
        used = sum(budget if declared.get(h) is None else int(declared[h] or 0) for h in self.holders())
        return f"{_gib(used)}/{_gib(budget)}"

    def switch_text(self) -> str:
        """The switch under way (`a -> b running`), else the last one (`a -> b 0.6s`, with its result
        when not ok); `-` when none."""
        if switching := self.status.get("switching"):
            return f"{switching.get('from') or '-'} -> {switching.get('to')} running"
        last = self.status.get("lastSwitch") or {}
        if not last.get("to"):
            return "-"
        text = f"{last.get('from') or '-'} -> {last['to']}"
        if isinstance(last.get("seconds"), int | float):
            text += f" {last['seconds']:.1f}s"
        if last.get("result") and last["result"] != "ok":
            text += f" ({last['result']})"
        return text

    def row(self) -> dict[str, str]:
        return {
            "NAMESPACE": str(self.group["metadata"].get("namespace", "")),
            "GROUP": self.name,
            "HOLDING": ",".join(self.holders()) or "-",
            "AWAKE": self.awake_text(),
            "GPU MEMORY": self.memory_text(),
            "MEMBERS": ",".join(md["metadata"]["name"] for md in self.members) or "-",
            "LAST SWITCH": self.switch_text(),
        }


def _group_views(client: Client, namespace: str | None, name: str | None = None) -> list[GroupView]:
    groups = _list(client, c.GPU_GROUP_PLURAL, namespace)
    if name is not None:
        groups = [g for g in groups if g["metadata"]["name"] == name]
        if not groups:
            raise PluginError(f'{GG_RESOURCE} "{name}" not found in namespace "{namespace}"')
    models = _list(client, c.PLURAL, namespace)
    views = []
    for group in groups:
        where = (group["metadata"].get("namespace"), group["metadata"]["name"])
        members = [
            md
            for md in models
            if (md["metadata"].get("namespace"), ((md.get("spec") or {}).get("gpuGroup") or {}).get("name"))
            == where
        ]
        views.append(GroupView(group, sorted(members, key=lambda md: str(md["metadata"]["name"]))))
    return sorted(views, key=lambda v: (str(v.group["metadata"].get("namespace")), v.name))


def member_row(view: GroupView, md: dict[str, Any]) -> dict[str, str]:
    status = md.get("status") or {}
    ref = (md.get("spec") or {}).get("gpuGroup") or {}
    spec = view.spec
    if ref.get("makeRoomLevel") is not None:
        make_room = _level_text(ref["makeRoomLevel"])
    else:
        make_room = f"{_level_text(spec.make_room_level) if spec else '-'} (group)"
    memory = _declared_memory(md)
    since = next(
        (h.get("since") for h in view.status.get("holders") or [] if h.get("name") == md["metadata"]["name"]),
        None,
    )
    return {
        "MEMBER": str(md["metadata"]["name"]),
        "GPU": str(status.get("gpu") or "-"),
        "LEVEL": str(status.get("sleepLevel") or "-"),
        "PHASE": str(status.get("phase") or "-"),
        "GPU MEMORY": "-" if memory is None else _gib(memory),
        "MAKE ROOM AT": make_room,
        "HOLDS SINCE": str(since or "-"),
    }


def groups_text(client: Client, args: argparse.Namespace) -> str:
    """What `groups` prints: a row per group, or (gg/NAME) the group's lines and a row per member."""
    if args.ref:
        namespace = args.namespace or client.namespace
        [view] = _group_views(client, namespace, parse_group_ref(args.ref))
        spec = view.spec
        if spec is None:
            head = f"{GG_RESOURCE}/{view.name}: invalid spec"
        else:
            budget = "" if spec.gpu_memory is None else f", gpuMemory {view.memory_text()}"
            head = (
                f"{GG_RESOURCE}/{view.name}: awake {view.awake_text()}{budget}, makeRoomLevel "
                f"{_level_text(spec.make_room_level)}, minAwakeSeconds {spec.min_awake_seconds}, "
                f"placement {spec.placement.mode}"
            )
        lines = [head, f"  holding: {', '.join(view.holders()) or '-'}", f"  switch: {view.switch_text()}"]
        for cond in view.status.get("conditions") or []:
            if cond.get("status") == "False":
                lines.append(f"  {cond.get('type')} False: {cond.get('message') or cond.get('reason')}")
        if not view.members:
            return "\n".join([*lines, "No ModelDeployments name this group in spec.gpuGroup."])
        columns = ["MEMBER", "GPU", "LEVEL", "PHASE", "GPU MEMORY", "MAKE ROOM AT", "HOLDS SINCE"]
        return "\n".join([*lines, table([member_row(view, md) for md in view.members], columns)])
    namespace = None if args.all_namespaces else (args.namespace or client.namespace)
    views = _group_views(client, namespace)
    if not views:
        return f"No GpuGroups found in {'any namespace' if namespace is None else f'namespace {namespace}'}."
    columns = ["GROUP", "HOLDING", "AWAKE", "GPU MEMORY", "MEMBERS", "LAST SWITCH"]
    if namespace is None:
        columns.insert(0, "NAMESPACE")
    return table([v.row() for v in views], columns)


def cmd_groups(client: Client, args: argparse.Namespace) -> int:
    if args.ref and args.all_namespaces:
        raise UsageError("-A lists every namespace; with gg/NAME use -n")
    print(groups_text(client, args))
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-n", "--namespace", help="namespace (default: the context's)")
    common.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
    common.add_argument("--context", help="kubeconfig context (default: the current one)")

    waiting = argparse.ArgumentParser(add_help=False)
    waiting.add_argument("--wait", action="store_true", help="wait until every replica has reached the level")
    waiting.add_argument("--timeout", type=float, default=300.0, help="seconds --wait waits (default 300)")

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("sleep", parents=[common, waiting], help="put a ModelDeployment to sleep at a level")
    p.add_argument("ref", metavar="md/NAME")
    p.add_argument(
        "--level",
        required=True,
        help="L1, L2, CudaSuspend, Checkpoint, Stop, or 1-5 (names are case-insensitive)",
    )
    p.set_defaults(func=cmd_sleep)
    p = sub.add_parser("wake", parents=[common, waiting], help="wake a ModelDeployment")
    p.add_argument("ref", metavar="md/NAME")
    p.set_defaults(func=cmd_wake)
    p = sub.add_parser("status", parents=[common], help="every pod's desired and observed level")
    p.add_argument("ref", metavar="md/NAME", nargs="?")
    p.add_argument("-A", "--all-namespaces", action="store_true", help="pods of every namespace")
    p.add_argument("-w", "--watch", action="store_true", help="redraw the table until Ctrl-C or --timeout")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between redraws (default 1)")
    p.add_argument(
        "--wait",
        action="store_true",
        help="with md/NAME: watch until it reaches its level in effect (implies --watch)",
    )
    p.add_argument("--timeout", type=float, help="seconds to watch (default: until Ctrl-C; 300 with --wait)")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser(
        "groups", parents=[common], help="GpuGroups: who holds the GPU, the budget, the members"
    )
    p.add_argument("ref", metavar="gg/NAME", nargs="?")
    p.add_argument("-A", "--all-namespaces", action="store_true", help="groups of every namespace")
    p.set_defaults(func=cmd_groups)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    timeout = getattr(args, "timeout", None)
    if timeout is not None and timeout <= 0:
        parser.error("--timeout must be positive")
    if getattr(args, "interval", 1.0) <= 0:
        parser.error("--interval must be positive")
    func: Callable[[Client, argparse.Namespace], int] = args.func
    try:
        if args.command == "sleep":
            parse_level(args.level)  # refuse a bad level before connecting
        if args.ref is not None:
            (parse_group_ref if args.command == "groups" else parse_ref)(args.ref)
        client = connect(args.kubeconfig, args.context)
        return func(client, args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except PluginError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
