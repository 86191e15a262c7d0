"""Per-pod convergence: one operation per pod at a time, from any level 0-4 to any other.

The pods' annotations are the interface (design.md): `sleep-level` is the wish, `state`,
`observed-sleep-level` and `last-operation` are the agent's report. The report is written before
(Sleeping/Waking) and after each step, so a crash leaves a trace that the next run verifies
against the real processes before it acts.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from hibernate.agent import coldstart, criu, kube, ownership, wakecheck
from hibernate.agent.coldstart import ColdStarts
from hibernate.agent.levels import LevelError, Levels
from hibernate.agent.metrics import AgentMetrics
from hibernate.agent.ownership import Ownership, Verdict
from hibernate.agent.podref import PodRef
from hibernate.agent.wakecheck import Reference, WakeCheck
from hibernate.api import constants as c
from hibernate.api.levels import InvalidSleepLevel, SleepLevel
from hibernate.faults import fault_point

log = logging.getLogger(__name__)
Key = tuple[str, str]
SETTLED = (c.STATE_AWAKE, c.STATE_ASLEEP)
# The agent's own report on a pod: what a late watch event is read with (converge).
_REPORT_KEYS = frozenset({c.ANN_STATE, c.ANN_OBSERVED_LEVEL, c.ANN_LAST_OPERATION, c.ANN_ESCALATE_TO})


@dataclass
class Reporter:
    """How results reach the API; a seam so that the same worker serves tests and the DaemonSet."""

    node: str
    annotate: Callable[[str, str, dict[str, str]], bool] = kube.report
    post_event: Callable[[dict[str, Any], str, str, str, str], None] = kube.event
    # A Warning posted once per pod and reason, whichever agent process posts it (kube.event `once`).
    post_warning_once: Callable[[dict[str, Any], str, str, str], None] = kube.warn_once
    # The hibernate.dev/awake pod condition (the engine pods' readiness gate), through pods/status.
    put_condition: Callable[[str, str, dict[str, str]], bool] = kube.set_condition

    async def write(self, pod: dict[str, Any], annotations: dict[str, str]) -> None:
        meta = pod["metadata"]
        await asyncio.to_thread(self.annotate, meta["namespace"], meta["name"], annotations)

    async def event(self, pod: dict[str, Any], kind: str, reason: str, message: str) -> None:
        await asyncio.to_thread(self.post_event, pod, self.node, kind, reason, message)

    async def warn_once(self, pod: dict[str, Any], reason: str, message: str) -> None:
        await asyncio.to_thread(self.post_warning_once, pod, self.node, reason, message)

    async def condition(self, pod: dict[str, Any], awake: bool, reason: str, message: str) -> None:
        meta = pod["metadata"]
        condition = kube.awake_condition(awake, reason, message)
        await asyncio.to_thread(self.put_condition, meta["namespace"], meta["name"], condition)


async def _posted(event: asyncio.Future[None]) -> None:
    """Wait for an Event posted alongside an operation; a failure to post it fails nothing."""
    try:
        await event
    except Exception as e:
        log.warning("could not post an event: %s", e)


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass
class Agent:
    levels: Levels
    reporter: Reporter
    metrics: AgentMetrics = field(default_factory=AgentMetrics)
    max_wake_backoff_s: float = 60.0
    pods: dict[Key, dict[str, Any]] = field(default_factory=dict)
    workers: dict[Key, asyncio.Task[None]] = field(default_factory=dict)
    dirty: dict[Key, asyncio.Event] = field(default_factory=dict)
    verified: set[Key] = field(default_factory=set)
    wake_failures: dict[Key, int] = field(default_factory=dict)
    seen_at: dict[Key, float] = field(default_factory=dict)
    reported: dict[Key, str] = field(default_factory=dict)  # the state this process last wrote, by pod
    reported_level: dict[Key, str] = field(default_factory=dict)  # the observed level it last wrote
    # The readiness gate (hibernate.dev/awake): what this process last set, by pod; and how long a sleep
    # waits for the kubelet to take a gated pod out of Ready (and so out of its Service) first.
    gates: dict[Key, str] = field(default_factory=dict)
    unready_timeout_s: float = 10.0
    # Only pods that a ModelDeployment owns are served (ownership.py); the others wait here, unserved.
    ownership: Ownership = field(default_factory=Ownership)
    unowned: dict[Key, dict[str, Any]] = field(default_factory=dict)  # newest event of a pod not (yet) owned
    owner_checks: dict[Key, asyncio.Task[None]] = field(default_factory=dict)
    owner_changed: dict[Key, asyncio.Event] = field(default_factory=dict)
    warned: set[str] = field(default_factory=set)  # uids of pods told they are not a ModelDeployment's
    served: set[str] = field(default_factory=set)  # uids of pods this agent has acted on
    max_owner_backoff_s: float = 60.0
    owner_grace_s: float = 5.0  # an owner missing this long is worth a Warning (it may be on its way)
    # The DaemonSet's agent has both (main.py); a worker tested alone may go without.
    wake_check: WakeCheck | None = None  # a woken replica serves only once it answers as before (3-4)
    cold_starts: ColdStarts | None = None  # a checkpoint discarded, an engine restarted cold in its pod
    # Failures converge (docs/reliability.md): a sleep that failed and was undone is tried this often
    # per wish, with backoff; a pod that a failed sleep left half suspended is restored with backoff,
    # and after this many failed restores the agent asks the operator to stop its ModelDeployment.
    max_sleep_attempts: int = 3
    max_restore_attempts: int = 5
    clock: Callable[[], float] = time.monotonic  # for the backoff deadlines; tests pass a virtual one
    retry_at: dict[Key, tuple[str | None, float]] = field(default_factory=dict)  # (wish, not before)
    sleep_failures: dict[Key, tuple[str | None, int]] = field(default_factory=dict)  # (wish, failed sleeps)
    failed_sleep: dict[Key, dict[str, Any]] = field(default_factory=dict)  # last-operation of the last one
    last_error: dict[Key, str] = field(default_factory=dict)  # the message of a pod's last failed step
    own_reports: dict[Key, dict[str, str]] = field(default_factory=dict)  # what it wrote last, by key
    # Stop with a snapshot (docs/snapshots.md): the requests this process answered, by pod (a late watch
    # event without the answer must not start a second dump), and the new pods whose restore it decided.
    snapshot_answered: dict[Key, str] = field(default_factory=dict)
    snapshot_taken: set[Key] = field(default_factory=set)  # whose engine this process put in a snapshot
    restore_decided: set[str] = field(default_factory=set)  # pod uids
    restore_seen: dict[str, float] = field(default_factory=dict)  # pod uid -> first look at its restore
    restore_not_waiting_s: float = 10.0  # an init not waiting this long after its start never will
    # SIGTERM (main.py): no operation starts any more; an operation in flight finishes, and a worker that
    # only waits to retry (a backoff, a poll) ends at once instead of holding the shutdown up.
    stopping: bool = False

    # -- events from the watch -------------------------------------------------------------------

    def observe(self, kind: str, pod: dict[str, Any]) -> None:
        """Called for every watch event of a managed pod on this node (in the event loop)."""
        ref = PodRef.from_pod(pod)
        key = ref.key
        if kind == "DELETED":
            self.ownership.forget(ref.uid)
            self.warned.discard(ref.uid)
            if self.unowned.pop(key, None) is not None and key in self.owner_changed:
                self.owner_changed[key].set()  # its owner check ends now, not after its backoff
            self.pods.pop(key, None)
            self.dirty.pop(key, None)
            self.verified.discard(key)
            self.wake_failures.pop(key, None)
            self.reported.pop(key, None)
            self.reported_level.pop(key, None)
            self.gates.pop(key, None)
            self._forget_failures(key)
            self.own_reports.pop(key, None)
            self.snapshot_answered.pop(key, None)
            self.snapshot_taken.discard(key)
            self.restore_decided.discard(ref.uid)
            self.restore_seen.pop(ref.uid, None)
            if ref.uid in self.served:  # a pod never served has no images of this agent's to remove
                self.served.discard(ref.uid)
                asyncio.get_running_loop().create_task(self._forget_images(ref))
            return
        verdict = self.ownership.cached(pod)  # no API call: checked once per pod and owner
        if verdict is None or not verdict.owned:
            self.pods.pop(key, None)  # a served pod whose owners or labels changed waits for the check
            self.unowned[key] = pod
            if verdict is None:
                self._check_owner(key)
            return
        self.unowned.pop(key, None)
        self.served.add(ref.uid)
        previous = self.pods.get(key)
        self.pods[key] = pod
        wish = ref.annotations.get(c.ANN_SLEEP_LEVEL)
        before = None if previous is None else PodRef.from_pod(previous).annotations.get(c.ANN_SLEEP_LEVEL)
        if previous is None or before != wish:
            self.seen_at[key] = time.monotonic()
        if previous is not None and before != wish:
            # A changed wish (a person may set the same level again after another): a fresh budget of
            # sleep attempts, and no backoff left over from the last wish.
            self.retry_at.pop(key, None)
            self.failed_sleep.pop(key, None)
            self.sleep_failures[key] = (wish, 0)
        self.kick(key)

    def stop(self) -> None:
        """Let the operations in flight finish and end every worker that waits to retry (stopping)."""
        self.stopping = True
        for changed in self.dirty.values():
            changed.set()  # wakes a worker from its wait for a retry; it sees `stopping` and ends

    def kick(self, key: Key) -> None:
        if self.stopping:
            return
        task = self.workers.get(key)
        if task is not None and not task.done():
            self.dirty.setdefault(key, asyncio.Event()).set()  # served when the current operation ends
            return
        self.workers[key] = asyncio.get_running_loop().create_task(self._work(key), name=f"pod {key}")

    def _check_owner(self, key: Key) -> None:
        task = self.owner_checks.get(key)
        if task is not None and not task.done():
            self.owner_changed[key].set()  # wakes it from its backoff: check the newest event now
            return
        self.owner_changed[key] = asyncio.Event()
        self.owner_checks[key] = asyncio.get_running_loop().create_task(
            self._owner_check(key), name=f"owners of pod {key}"
        )

    async def _owner_check(self, key: Key) -> None:
        """Read the pod's owners (in a thread); serve it if a ModelDeployment owns it, else warn once and
        leave it alone. An owner that does not exist (yet) is looked for again with backoff."""
        changed = self.owner_changed[key]
        attempts, missing_since = 0, time.monotonic()
        try:
            while (pod := self.unowned.get(key)) is not None:
                changed.clear()
                verdict = await asyncio.to_thread(self.ownership.verify, pod)
                newest = self.unowned.get(key)
                if newest is None:
                    return  # deleted, or served, meanwhile
                if self.ownership.cached(newest) is None:
                    continue  # its owners or labels changed meanwhile: check the newest
                if verdict.owned:
                    del self.unowned[key]
                    self.observe("MODIFIED", newest)
                    return
                if not verdict.retry or time.monotonic() - missing_since >= self.owner_grace_s:
                    await self._warn_not_owned(newest, verdict)
                if not verdict.retry:
                    if changed.is_set():
                        continue  # a newer event with other owners or labels came during the warning
                    return
                attempts += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        changed.wait(), min(self.max_owner_backoff_s, 2.0 ** (attempts - 1))
                    )
        except Exception:  # never serve on an error: the pod's next event checks it again
            log.exception("checking the owners of pod %s/%s failed", *key)
            if (pod := self.unowned.get(key)) is not None:
                self.ownership.forget(PodRef.from_pod(pod).uid)
        finally:
            if self.owner_checks.get(key) is asyncio.current_task():
                del self.owner_checks[key]
                del self.owner_changed[key]

    async def _warn_not_owned(self, pod: dict[str, Any], verdict: Verdict) -> None:
        ref = PodRef.from_pod(pod)
        if not verdict.warn or ref.deleting or ref.uid in self.warned:
            return
        self.warned.add(ref.uid)
        log.warning("pod %s/%s is left alone: %s", *ref.key, verdict.reason)
        await self.reporter.warn_once(
            pod,
            ownership.REASON,
            f"hibernate-agent leaves this pod alone: no ModelDeployment owns it ({verdict.reason})",
        )

    def update_gauges(self) -> None:
        counts: dict[str, int] = dict.fromkeys((*c.POD_STATES, "Unknown"), 0)
        for pod in self.pods.values():
            state = PodRef.from_pod(pod).state or "Unknown"
            counts[state if state in counts else "Unknown"] += 1
        for state, n in counts.items():
            self.metrics.pods.labels(state).set(n)

    async def _forget_images(self, ref: PodRef) -> None:
        """A deleted pod's checkpoint images go with it (also when its ModelDeployment is deleted).

        The watch says DELETED also for a pod that only left the agent's selection (its managed label
        removed): that pod lives on, checkpointed, and its image is its engine. It stays until the pod
        is labelled again (and restored) or deleted (the image sweep, sweep.py, removes it then)."""
        try:
            pod_dir = ref.image_dir(self.levels.host.checkpoint_roots).parent
        except PermissionError:
            return
        if not pod_dir.exists():
            return
        try:
            live = await asyncio.to_thread(kube.read_pod, ref.namespace, ref.name)
        except Exception as e:  # unknown: the image sweep decides later
            log.warning("pod %s/%s: cannot tell whether it still exists (%s); its images stay", *ref.key, e)
            return
        if live is not None and (live.get("metadata") or {}).get("uid") == ref.uid:
            log.info(
                "pod %s/%s left the agent's selection (%s removed) but lives: its checkpoint images stay",
                *ref.key,
                c.LABEL_MANAGED,
            )
            return
        await self.levels.stop_shrinking(ref)
        await asyncio.to_thread(shutil.rmtree, pod_dir, True)
        log.info("removed checkpoint images of deleted pod %s/%s", ref.namespace, ref.name)

    async def _work(self, key: Key) -> None:
        changed = self.dirty.setdefault(key, asyncio.Event())
        while True:
            changed.clear()
            pod = self.pods.get(key)
            if pod is None or self.stopping:
                return
            try:
                retry = await self.converge(pod)
            except Exception:  # never let one pod kill the agent; verify it again next time
                log.exception("unexpected error on pod %s/%s", *key)
                self.verified.discard(key)
                retry = 5.0
            self.update_gauges()
            await self._align_gate(key)
            if retry is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), retry)
                continue
            if not changed.is_set():
                return

    # -- one pass --------------------------------------------------------------------------------

    async def converge(self, pod: dict[str, Any]) -> float | None:
        """Take one pod one step nearer its desired level. Returns seconds to wait before retrying."""
        ref = PodRef.from_pod(pod)
        if ref.deleting:
            return None
        own = self.own_reports.get(ref.key)
        if own is not None and any(ref.annotations.get(k) != v for k, v in own.items()):
            # An event from before this agent's own last report (the watch delivers them late under
            # load) is read with that report laid over it: taken at its word, a finished operation
            # would look interrupted, or a pod escalated deeper would look awake. The wish is the
            # event's own; the report, the agent's newest (its echo follows).
            meta = pod["metadata"]
            pod = {**pod, "metadata": {**meta, "annotations": {**(meta.get("annotations") or {}), **own}}}
            ref = PodRef.from_pod(pod)
        if self.cold_starts is not None and self.cold_starts.wanted(pod, ref):
            return await self._cold_start(pod, ref)  # asked for (discard-checkpoint), or under way
        request = snapshot_request(ref)
        if request is not None:
            answer = snapshot_answer(ref, request)
            if answer is None and self.snapshot_answered.get(ref.key) != request["id"]:
                await self._take_snapshot(pod, ref, request)
                return None
            if answer is None or "error" not in answer:
                return None  # its engine is in the snapshot: the pod is the Stop's now
        if (
            ref.annotations.get(c.ANN_RESTORE_FROM)
            and c.ANN_RESTORE not in ref.annotations
            and ref.uid not in self.restore_decided
        ):
            # A new pod of a wake from Stop: restored once its container runs and it has its IP (the
            # restored engine is woken over HTTP); the init waits meanwhile.
            return await self._restore_from_snapshot(pod, ref) if ref.ip else None
        try:
            desired = ref.desired()
        except InvalidSleepLevel as e:
            await self._refuse(pod, ref, str(e))
            return None
        if desired == SleepLevel.STOP:  # the operator's, for a whole model: said once, and left alone
            await self._refuse(pod, ref, c.STOP_ON_POD, c.REASON_STOP_ON_POD)
            return None
        if desired is None or not ref.ip:
            return None  # no wish yet; a pod without IP has no engine to talk to yet
        if ref.annotations.get(c.ANN_ESCALATE_TO):
            return None  # this agent asked the operator to stop the model: the pod is the operator's now
        observed = ref.observed()
        if ref.key not in self.verified or observed is None or ref.state not in (*SETTLED, c.STATE_FAILED):
            interrupted = self._interrupted(ref)
            if interrupted is not None and isinstance(interrupted.get("escalation"), dict):
                await self._resume_escalation(pod, ref, interrupted)
                return None  # the echo of its report decides the next step
            observed = await self._verify(pod, ref, observed)
        if observed == SleepLevel.AWAKE and self.wake_check is not None and self.wake_check.pending(ref):
            # Found awake with the answer from before a deep sleep still unchecked (an agent died
            # between the wake and the check): checked now, before the pass opens its readiness gate.
            problem = await self.wake_check.verify(ref)
            if problem is not None:
                woken = SleepLevel.parse_or_none(ref.last_operation().get("level"))
                await self._answered_wrong(
                    pod, ref, max(woken or SleepLevel.AWAKE, SleepLevel.CUDA_SUSPEND), problem
                )
                return coldstart.POLL_S if self.cold_starts is not None else None
        last = ref.last_operation()
        failed = ref.state == c.STATE_FAILED
        # A failed sleep that left the pod half suspended (some CUDA processes checkpointed, others
        # not): its observed level is the deepest one, which is not a level reached.
        half = failed and bool(last.get("partial")) and observed != SleepLevel.AWAKE
        if observed == desired and not half:
            self._forget_failures(ref.key)
            if ref.state != self._state_of(desired):
                await self._report(pod, kube.state_annotations(self._state_of(desired), int(desired)))
            return None
        escalated = SleepLevel.parse_or_none(last.get("escalated")) if failed else None
        if escalated is not None and not half and SleepLevel.AWAKE < desired < observed:
            # A failed sleep escalated deeper: never undo the deeper level to retry a shallower one.
            # A wake, or a wish deeper still, moves it on.
            return None
        attempt = self._sleep_attempt(ref, desired, last)
        if observed == SleepLevel.AWAKE and desired != SleepLevel.AWAKE and attempt > self.max_sleep_attempts:
            return None  # a failed sleep is not retried until someone asks for another level
        if (
            ref.state == c.STATE_FAILED
            and last.get("action") == "wake"
            and last.get("refused")
            and observed != SleepLevel.AWAKE
        ):
            # The image was refused for good (another GPU or driver, or not one this agent wrote): said
            # once, not retried. The way out is a cold start (hibernate.dev/discard-checkpoint).
            return None
        left = self._backoff_left(ref)
        if left is not None:
            return left
        started_at = self.seen_at.pop(ref.key, None)
        if started_at is not None:
            self.metrics.reaction_seconds.observe(time.monotonic() - started_at)
        if observed != SleepLevel.AWAKE:
            if not await self._step(
                pod, ref, "wake", observed, carry=self._half_details(last) if half else None
            ):
                failures = self.wake_failures[ref.key] = self.wake_failures.get(ref.key, 0) + 1
                if half and failures >= self.max_restore_attempts:
                    await self._ask_stop_for_half(pod, ref, observed, failures)
                    return None
                return self._back_off(ref, failures)
            self.wake_failures.pop(ref.key, None)
            latest = self.pods.get(ref.key)
            if latest is not None and PodRef.from_pod(latest).annotations.get(
                c.ANN_SLEEP_LEVEL
            ) != ref.annotations.get(c.ANN_SLEEP_LEVEL):
                return 0.0  # a change of mind during the wake: decide again on the newest wish
        if desired != SleepLevel.AWAKE:
            if attempt > self.max_sleep_attempts:
                # Restored after a failed sleep whose attempts are spent: say so, and stop here.
                op = self.failed_sleep.get(ref.key)
                if op is not None:  # restored: no longer half
                    op = {k: v for k, v in op.items() if k not in ("partial", "processes")}
                    await self._report(pod, kube.state_annotations(c.STATE_FAILED, int(SleepLevel.AWAKE), op))
                return None
            await self._step(pod, ref, "sleep", desired, attempt=attempt)
            return self._backoff_left(ref)
        return None

    # -- Stop with a snapshot (docs/snapshots.md) -----------------------------------------------

    async def _take_snapshot(self, pod: dict[str, Any], ref: PodRef, request: dict[str, Any]) -> None:
        """The operator asks for a snapshot before a Stop: level 4's steps into the ModelDeployment's
        snapshot directory, then the answer on the pod (taken, with node, size and time; or the error).
        The engine ends with a dump that succeeds; a failed one is rolled back as for Checkpoint."""
        model = ((pod.get("metadata") or {}).get("labels") or {}).get(c.LABEL_MODEL, "")
        spec_hash = str(request.get("specHash") or "")
        node = self.reporter.node
        t0 = time.monotonic()
        await self.reporter.event(
            pod, "Normal", "TakingSnapshot", "Taking a snapshot of the engine before Stop"
        )
        answer: dict[str, Any] = {"id": request["id"], "node": node}
        try:
            if not model or not spec_hash:
                raise LevelError(
                    f"the request names no spec hash, or the pod no {c.LABEL_MODEL} label", rolled_back=True
                )
            if self.wake_check is not None and ref.observed() == SleepLevel.AWAKE:
                # The canary: the engine restored from this snapshot must give this answer again.
                reference = await self.wake_check.answer(ref)
                if reference is not None:
                    answer["check"] = asdict(reference)
            await self._leave_service(pod, SleepLevel.CHECKPOINT)
            details = await self.levels.snapshot(ref, model, spec_hash)
        except LevelError as e:
            answer.pop("check", None)
            answer["error"] = str(e)
            self.metrics.snapshots.labels("failed").inc()
            await self.reporter.event(pod, "Warning", "SnapshotFailed", f"No snapshot: {e}")
            log.warning("%s/%s: snapshot failed: %s", *ref.key, e)
        else:
            seconds = round(time.monotonic() - t0, 3)
            size = int(details.get("image_bytes") or 0)
            answer.update(specHash=spec_hash, bytes=size, taken=_stamp(), seconds=seconds)
            if details.get("shared"):
                answer["shared"] = True  # on the volume every node's agent mounts: any node restores it
            self.metrics.snapshots.labels("ok").inc()
            self.metrics.snapshot_bytes.labels(ref.namespace, model).set(size)
            self.metrics.snapshot_taken.labels(ref.namespace, model).set(time.time())
            await self.reporter.event(
                pod,
                "Normal",
                "SnapshotTaken",
                f"Snapshot taken in {seconds:.2f} s ({size} bytes) on node {node}",
            )
            log.info("%s/%s: snapshot taken in %.3f s, %d bytes", *ref.key, seconds, size)
            self.snapshot_taken.add(ref.key)
        self.snapshot_answered[ref.key] = str(request["id"])
        await self.reporter.write(pod, {c.ANN_SNAPSHOT: json.dumps(answer, sort_keys=True)})

    async def _restore_from_snapshot(self, pod: dict[str, Any], ref: PodRef) -> float | None:
        """A new pod of a wake from Stop, whose init waits for a restore: restore the snapshot into it,
        wake the restored engine, and tell the init; any failure is a cold start with the reason."""
        try:
            source = json.loads(ref.annotations[c.ANN_RESTORE_FROM])
            spec_hash = str(source["specHash"])
        except (ValueError, KeyError, TypeError):
            source, spec_hash = {}, ""
        model = ((pod.get("metadata") or {}).get("labels") or {}).get(c.LABEL_MODEL, "")
        try:
            state = await asyncio.to_thread(self.levels.restore_handshake, ref)
        except OSError as e:
            log.warning("%s/%s: cannot read the restore files of the pod's init: %s", *ref.key, e)
            return 2.0
        if state is None:
            return 0.5  # its container has not started yet
        if state.claimed and state.verdict is None and not state.orphaned:
            return 1.0  # another agent process (a DaemonSet rollout's) restores it and tells the init
        taken_over = state.orphaned
        waiting = state.waiting or taken_over
        if state.verdict is not None and not state.waiting:
            # The init was told before this agent process looked: an agent that died between telling
            # it and reporting it. Reported now, as told.
            return await self._report_restore(pod, ref, source, state.verdict)
        if not waiting:
            first = self.restore_seen.setdefault(ref.uid, time.monotonic())
            if time.monotonic() - first < self.restore_not_waiting_s:
                return 0.5  # its init may not have written its wait yet
        loop = asyncio.get_running_loop()
        reference = Reference.from_dict(source.get("check")) if isinstance(source, dict) else None

        async def wake_and_compare() -> None:
            await self.levels.wake_restored(ref)
            if reference is not None and self.wake_check is not None and wakecheck.enabled(ref):
                problem = await self.wake_check.compare(ref, reference)
                if problem is not None:
                    raise LevelError(problem, rolled_back=False)

        def check(_: Any) -> None:
            # The restored engine serves only once woken and giving the snapshot's answer again.
            asyncio.run_coroutine_threadsafe(wake_and_compare(), loop).result(
                self.levels.host.engine_timeout_s + 60
            )

        if not waiting:
            outcome_restored, seconds, reason = False, 0.0, "the pod's init was not waiting for a restore"
        elif not spec_hash or not model:
            outcome_restored, seconds, reason = False, 0.0, f"{c.ANN_RESTORE_FROM} names no spec hash"
            with contextlib.suppress(OSError):  # the init is told so (the image's hash is never "-")
                await asyncio.to_thread(
                    functools.partial(
                        self.levels.restore_snapshot, ref, model or "-", "-", check, take_over=taken_over
                    )
                )
        else:
            shared = isinstance(source, dict) and source.get("shared") is True
            if taken_over:
                # An agent claimed this restore and died in it (SIGKILL, an upgrade): nobody would tell
                # the init before its claim limit. What it left is ended and the snapshot restored again.
                log.warning("%s/%s: taking over the restore an earlier agent claimed and died in", *ref.key)
            outcome = await asyncio.to_thread(
                functools.partial(
                    self.levels.restore_snapshot, ref, model, spec_hash, check, shared, take_over=taken_over
                )
            )
            outcome_restored, seconds, reason = outcome.restored, outcome.seconds, outcome.reason
            if taken_over and not outcome_restored:
                reason = f"the agent restarted during the restore into this pod, then: {reason}"
        self.restore_decided.add(ref.uid)
        self.restore_seen.pop(ref.uid, None)
        result = "restored" if outcome_restored else "cold"
        if waiting:
            self.metrics.restore_seconds.labels(result).observe(seconds)
        report: dict[str, Any] = {"restored": outcome_restored, "seconds": round(seconds, 3)}
        if taken_over:
            report["takenOver"] = True
        if outcome_restored:
            message = f"Restored from the snapshot taken on node {source.get('node')} in {seconds:.2f} s"
            if taken_over:
                message += " (the agent restarted during an earlier attempt, whose leftovers were ended)"
            await self.reporter.event(pod, "Normal", "Restored", message)
        else:
            report["reason"] = reason
            await self.reporter.event(
                pod, "Warning", "SnapshotNotUsed", f"Starting the engine cold: {reason}"
            )
        log.info("%s/%s: snapshot %s (%.3f s) %s", *ref.key, result, seconds, reason)
        await self.reporter.write(pod, {c.ANN_RESTORE: json.dumps(report, sort_keys=True)})
        self.verified.discard(ref.key)  # probed afresh: restored and awake, or starting cold
        return 0.0

    async def _report_restore(
        self, pod: dict[str, Any], ref: PodRef, source: dict[str, Any], verdict: dict[str, Any]
    ) -> float:
        """Reports what the pod's init was told by an agent that died before reporting it."""
        restored = isinstance(verdict.get("restored"), int)
        report: dict[str, Any] = {"restored": restored, "seconds": None, "reportedLate": True}
        if restored:
            message = (
                f"Restored from the snapshot taken on node {source.get('node')} (the agent restarted "
                "after telling the pod's init, before reporting it)"
            )
            await self.reporter.event(pod, "Normal", "Restored", message)
        else:
            report["reason"] = str(verdict.get("cold") or "an unreadable restore result")
            await self.reporter.event(
                pod, "Warning", "SnapshotNotUsed", f"Starting the engine cold: {report['reason']}"
            )
        self.restore_decided.add(ref.uid)
        self.restore_seen.pop(ref.uid, None)
        await self.reporter.write(pod, {c.ANN_RESTORE: json.dumps(report, sort_keys=True)})
        self.verified.discard(ref.key)
        return 0.0

    # -- failures: attempts, backoff, escalation -------------------------------------------------

    def _forget_failures(self, key: Key) -> None:
        self.retry_at.pop(key, None)
        self.sleep_failures.pop(key, None)
        self.failed_sleep.pop(key, None)
        self.last_error.pop(key, None)

    def _sleep_attempt(self, ref: PodRef, desired: SleepLevel, last: dict[str, Any]) -> int:
        """Which attempt at the current wish the next sleep is (1 for the first)."""
        wish = ref.annotations.get(c.ANN_SLEEP_LEVEL)
        known = self.sleep_failures.get(ref.key)
        if known is not None and known[0] == wish:
            return known[1] + 1
        if (
            ref.state == c.STATE_FAILED
            and last.get("action") == "sleep"
            and last.get("target") == desired.label
            and last.get("error")
        ):
            # Failed before this agent started: the record says how often (an older agent's record,
            # without the count, meant "not retried").
            done = last.get("attempt")
            return (done if isinstance(done, int) and done > 0 else self.max_sleep_attempts) + 1
        return 1

    def _back_off(self, ref: PodRef, failures: int) -> float:
        """Wait before the next attempt at the same wish: 1 s, 2 s, 4 s … up to max_wake_backoff_s.

        A deadline, not only a delay: the echo of the failure's own report wakes the worker at once,
        and must not start the next attempt early."""
        delay = float(min(self.max_wake_backoff_s, 2 ** max(0, failures - 1)))
        self.retry_at[ref.key] = (ref.annotations.get(c.ANN_SLEEP_LEVEL), self.clock() + delay)
        return delay

    def _backoff_left(self, ref: PodRef) -> float | None:
        pending = self.retry_at.get(ref.key)
        if pending is None or pending[0] != ref.annotations.get(c.ANN_SLEEP_LEVEL):
            return None  # none, or one for an earlier wish: a change of mind is served at once
        left = pending[1] - self.clock()
        if left <= 0:
            del self.retry_at[ref.key]
            return None
        return left

    @staticmethod
    def _half_details(last: dict[str, Any]) -> dict[str, Any]:
        """What a failed restore of a half-suspended pod carries on, so that it is still known as half."""
        return {k: last[k] for k in ("partial", "processes") if k in last}

    # -- the readiness gate ---------------------------------------------------------------------

    async def _gate(self, pod: dict[str, Any], awake: bool, reason: str, message: str) -> None:
        """Set the pod's hibernate.dev/awake condition unless it is already so (no write per pass)."""
        ref = PodRef.from_pod(self.pods.get(PodRef.from_pod(pod).key) or pod)  # the newest copy
        want = "True" if awake else "False"
        if self.gates.get(ref.key, ref.awake_condition) == want:
            return
        try:
            await self.reporter.condition(pod, awake, reason, message)
        except Exception as e:
            if ref.gated:
                raise  # its readiness hangs on it: the pass fails and is tried again
            # A pod without the gate (made before the operator added it): the condition is a courtesy.
            log.warning("%s/%s: cannot set condition %s: %s", *ref.key, c.CONDITION_AWAKE, e)
            return
        self.gates[ref.key] = want

    async def _align_gate(self, key: Key) -> None:
        """After each pass: the condition is True only while the pod is known to be at level 0 and not in
        an operation (Awake, or Failed at 0: a sleep undone, a wish refused), False otherwise."""
        pod = self.pods.get(key)
        if pod is None:
            return
        ref = PodRef.from_pod(pod)
        state = self.reported.get(key, ref.state)
        level = SleepLevel.parse_or_none(
            self.reported_level.get(key, ref.annotations.get(c.ANN_OBSERVED_LEVEL))
        )
        if ref.deleting or state is None or level is None:
            return  # not looked at yet: the condition stays unset (not Ready) until the agent knows
        awake = level == SleepLevel.AWAKE and state in (c.STATE_AWAKE, c.STATE_FAILED)
        why = "Awake" if awake else state if state in (c.STATE_SLEEPING, c.STATE_WAKING) else "NotAwake"
        message = f"the agent reports {state} at {level.label}"
        if awake and (key in self.snapshot_taken or _snapshotted(ref)):
            # Its engine went into a snapshot (a Stop's, perhaps cancelled meanwhile): nothing serves in
            # the pod, which stays out of its Service until the Deployment replaces it.
            awake, why, message = False, "Snapshotted", "its engine went into a snapshot: nothing serves here"
        try:
            await self._gate(pod, awake, why, message)
        except Exception:
            log.exception("%s/%s: cannot set condition %s", *key, c.CONDITION_AWAKE)

    async def _leave_service(self, pod: dict[str, Any], level: SleepLevel) -> None:
        """Before a sleep: the condition goes False, then wait (bounded) until the kubelet has taken the
        pod out of Ready, so the endpoints controller drops it from the Service before the engine sleeps."""
        key = PodRef.from_pod(pod).key
        await self._gate(pod, False, c.STATE_SLEEPING, f"going to sleep at {level.label}")
        deadline = time.monotonic() + self.unready_timeout_s
        while (latest := self.pods.get(key)) is not None:
            ref = PodRef.from_pod(latest)
            if not ref.gated or not ref.ready:
                return
            if time.monotonic() >= deadline:
                log.warning(
                    "%s/%s: still Ready %.0f s after %s went False; sleeping anyway",
                    *key,
                    self.unready_timeout_s,
                    c.CONDITION_AWAKE,
                )
                return
            await asyncio.sleep(0.05)

    async def _report(self, pod: dict[str, Any], annotations: dict[str, str]) -> None:
        await self.reporter.write(pod, annotations)
        key = PodRef.from_pod(pod).key
        mine = {k: v for k, v in annotations.items() if k in _REPORT_KEYS and v is not None}
        self.own_reports[key] = {**self.own_reports.get(key, {}), **mine}
        self.reported[PodRef.from_pod(pod).key] = annotations[c.ANN_STATE]
        if c.ANN_OBSERVED_LEVEL in annotations:
            self.reported_level[PodRef.from_pod(pod).key] = annotations[c.ANN_OBSERVED_LEVEL]

    @staticmethod
    def _state_of(level: SleepLevel) -> str:
        return c.STATE_AWAKE if level == SleepLevel.AWAKE else c.STATE_ASLEEP

    async def _verify(self, pod: dict[str, Any], ref: PodRef, claimed: SleepLevel | None) -> SleepLevel:
        """After a restart or a crash mid-operation: trust the processes, not the annotations."""
        started, t0 = _stamp(), time.monotonic()
        interrupted = self._interrupted(ref)
        truth = await self.levels.probe(ref, claimed, self._hint(interrupted))
        self.verified.add(ref.key)
        if truth != claimed or ref.state not in (*SETTLED, c.STATE_FAILED):
            log.info(
                "pod %s/%s is really at %s (annotations said %s, %s)",
                *ref.key,
                truth.label,
                claimed,
                ref.state,
            )
            op: dict[str, Any] | None = None
            if interrupted is not None:
                # The operation under way when an agent died is over: say what was found instead.
                op = {
                    "action": "verify",
                    "level": int(truth),
                    "started": started,
                    "seconds": round(time.monotonic() - t0, 3),
                    "error": None,
                    "interrupted": interrupted,
                }
            await self._report(pod, kube.state_annotations(self._state_of(truth), int(truth), op))
        return truth

    @staticmethod
    def _interrupted(ref: PodRef) -> dict[str, Any] | None:
        """The operation the annotations say is under way (written by `_step` before it starts)."""
        expected = {c.STATE_SLEEPING: "sleep", c.STATE_WAKING: "wake"}.get(ref.state or "")
        last = ref.last_operation()
        if expected is None or last.get("action") != expected or "seconds" in last:
            return None
        return {k: last[k] for k in ("action", "level", "target", "started", "escalation") if k in last}

    @staticmethod
    def _hint(interrupted: dict[str, Any] | None) -> SleepLevel | None:
        """The level an interrupted operation was moving the pod to (sleep) or from (wake)."""
        if interrupted is None:
            return None
        try:
            return SleepLevel.parse(interrupted.get("level"))
        except InvalidSleepLevel:
            return None

    async def _refuse(
        self, pod: dict[str, Any], ref: PodRef, message: str, reason: str = "InvalidSleepLevel"
    ) -> None:
        """A wish that cannot be done: reported Failed with the reason, one Warning, the engine left as is."""
        if ref.state == c.STATE_FAILED and ref.last_operation().get("error") == message:
            return
        observed = ref.observed() or SleepLevel.AWAKE
        op = {"action": "none", "level": int(observed), "started": _stamp(), "seconds": 0.0, "error": message}
        await self._report(pod, kube.state_annotations(c.STATE_FAILED, int(observed), op))
        if reason == c.REASON_STOP_ON_POD:
            # Named per pod and reason: posted once, whatever echo, resync or agent restart comes next.
            await self.reporter.warn_once(pod, reason, message)
        else:
            await self.reporter.event(pod, "Warning", reason, message)

    async def _step(
        self,
        pod: dict[str, Any],
        ref: PodRef,
        action: str,
        level: SleepLevel,
        *,
        attempt: int | None = None,
        carry: dict[str, Any] | None = None,
    ) -> bool:
        """One sleep (awake → level) or wake (level → awake), reported before and after.

        `attempt`: which attempt at the wish a sleep is; `carry`: what a failed wake reports on
        besides its error (a half-suspended pod stays known as half)."""
        going = c.STATE_SLEEPING if action == "sleep" else c.STATE_WAKING
        here = SleepLevel.AWAKE if action == "sleep" else level
        stamp, t0 = _stamp(), time.monotonic()
        op: dict[str, Any] = {"action": action, "level": int(level), "target": level.label, "started": stamp}
        if attempt is not None:
            op["attempt"] = attempt
        # Written before anything is done, without `seconds` (under way): an agent that restarts
        # mid-way learns from it which level the engine was being moved to or from.
        await self._report(pod, kube.state_annotations(going, int(here), op))
        if action == "sleep":
            await self._leave_service(pod, level)
        fault_point("agent.after-start-report")
        # The Event is for people: posted while the engine moves, not before (a switch waits for the
        # engine, not for the Event); done before any later Event of the operation is posted.
        announced = asyncio.ensure_future(
            self.reporter.event(
                pod, "Normal", going, f"{going} {'to' if action == 'sleep' else 'from'} {level.label}"
            )
        )
        deep = level >= SleepLevel.CUDA_SUSPEND and self.wake_check is not None
        failure: LevelError | None = None
        try:
            if action == "sleep" and deep and self.wake_check is not None:
                op.update(await self.wake_check.record(ref))  # the answer the woken engine must give again
            try:
                details = await (
                    self.levels.sleep(ref, level) if action == "sleep" else self.levels.wake(ref, level)
                )
            except LevelError as e:
                failure = e
        finally:
            await _posted(announced)
        if failure is not None:
            return await self._failed(pod, ref, action, level, op, t0, failure, carry)
        if action == "wake" and deep and self.wake_check is not None:
            problem = await self.wake_check.verify(ref)
            if problem is not None:
                self.metrics.operations.labels(level.label, action, "failed").inc()
                await self._answered_wrong(pod, ref, level, problem)
                return False
        seconds = time.monotonic() - t0
        op.update(details, seconds=round(seconds, 3), error=None)
        if "image_bytes" in details:
            self.metrics.checkpoint_bytes.inc(details["image_bytes"])
        self.metrics.operation_seconds.labels(level.label, action).observe(seconds)
        self.metrics.operations.labels(level.label, action, "ok").inc()
        fault_point("agent.before-report")
        now = level if action == "sleep" else SleepLevel.AWAKE
        await self._report(pod, kube.state_annotations(self._state_of(now), int(now), op))
        if action == "wake":
            await self._align_gate(ref.key)  # Ready again (requests wait for it) before the Event
        verb = f"Slept at {level.label}" if action == "sleep" else f"Woke from {level.label}"
        await self.reporter.event(pod, "Normal", self._state_of(now), f"{verb} in {seconds:.2f} s")
        log.info("%s/%s: %s in %.3f s %s", *ref.key, verb, seconds, details)
        if action == "sleep":
            self._forget_failures(ref.key)
        return True

    async def _answered_wrong(
        self, pod: dict[str, Any], ref: PodRef, level: SleepLevel, problem: str
    ) -> None:
        """The woken engine does not answer as before its sleep: a failed wake (both answers in the
        Warning), and the engine is restarted cold in its pod (coldstart.py)."""
        log.warning("%s/%s: wake %s failed: %s", *ref.key, level.label, problem)
        if self.cold_starts is not None:
            await self.cold_starts.begin(
                pod, ref, level, problem, self._report, self.reporter.event, failed=True
            )
            return
        op = {"action": "wake", "level": int(level), "target": level.label, "started": _stamp()}
        op.update(seconds=0.0, error=problem)
        await self._report(pod, kube.state_annotations(c.STATE_FAILED, int(level), op))
        await self.reporter.event(pod, "Warning", "Failed", f"wake {level.label} failed: {problem}")

    async def _cold_start(self, pod: dict[str, Any], ref: PodRef) -> float | None:
        """One look at a cold start (coldstart.py); once the new engine answers, nothing is owed to the
        old one: no wake to retry, no level to trust without a probe."""
        assert self.cold_starts is not None
        await self.levels.stop_shrinking(ref)  # the image goes: its copy need not be finished
        wait = await self.cold_starts.advance(pod, ref, self._report, self.reporter.event)
        if wait is None:
            self.verified.discard(ref.key)
            self.wake_failures.pop(ref.key, None)
        return wait

    async def _failed(
        self,
        pod: dict[str, Any],
        ref: PodRef,
        action: str,
        level: SleepLevel,
        op: dict[str, Any],
        t0: float,
        e: LevelError,
        carry: dict[str, Any] | None = None,
    ) -> bool:
        message = str(e)
        result = "failed"
        annotations: dict[str, str] = {}
        if action == "wake":
            # Retried with backoff; meanwhile say where it really is (a wake can stop half way).
            self.verified.discard(ref.key)
            try:
                where = await self.levels.probe(ref, level)
            except Exception:  # unknown: still asleep at the level, as before the wake
                log.exception("%s/%s: cannot read the level after a failed wake", *ref.key)
                where = level
            op.update(carry or {})
            if e.processes:
                op["processes"] = e.processes
            if isinstance(e.__cause__, criu.ImageRefused):
                op["refused"] = True  # for good: not retried (converge); a cold start is the way out
        elif e.rolled_back:
            where, result = SleepLevel.AWAKE, "rolled_back"
            attempt = int(op.get("attempt") or 1)
            if attempt < self.max_sleep_attempts:
                delay = self._back_off(ref, attempt)
                message += f" (attempt {attempt} of {self.max_sleep_attempts}; tried again in {delay:.0f} s)"
            else:
                message += (
                    f" (attempt {attempt} of {self.max_sleep_attempts}; "
                    "not tried again until another level is asked for)"
                )
        elif e.partial and e.level is not None:
            # Half suspended: some processes checkpointed, others not. Not a level reached: the
            # agent restores them with backoff (converge), and asks for Stop if it cannot.
            where, result = e.level, "partial"
            op.update(partial=True, processes=e.processes or {})
            self._back_off(ref, 1)
            message += "; the agent restores the processes with backoff"
        else:
            where, message, escalated = await self._escalate(pod, ref, level, message)
            op["escalated"] = escalated
            result = "escalated"
            if escalated == c.ESCALATE_TO_STOP:
                annotations[c.ANN_ESCALATE_TO] = c.ESCALATE_TO_STOP
        op.update(seconds=round(time.monotonic() - t0, 3), error=message)
        if action == "sleep":
            self.sleep_failures[ref.key] = (
                ref.annotations.get(c.ANN_SLEEP_LEVEL),
                int(op.get("attempt") or 1),
            )
            self.failed_sleep[ref.key] = op
        self.last_error[ref.key] = message
        self.metrics.operations.labels(level.label, action, result).inc()
        await self._report(pod, {**kube.state_annotations(c.STATE_FAILED, int(where), op), **annotations})
        await self.reporter.event(pod, "Warning", "Failed", f"{action} {level.label} failed: {message}")
        log.warning("%s/%s: %s %s failed: %s", *ref.key, action, level.label, message)
        return False

    async def _escalate(
        self,
        pod: dict[str, Any],
        ref: PodRef,
        level: SleepLevel,
        message: str,
        first: SleepLevel | None = None,
    ) -> tuple[SleepLevel, str, str]:
        """The pod could not be put back after a failed sleep at `level`: free the GPU at a deeper
        level rather than leave it held (design.md): CudaSuspend, then Checkpoint, then the whole
        ModelDeployment to Stop, which is the operator's (asked through the pod's escalate-to
        annotation). Each step is reported before it starts, with an Event, so that an agent that
        dies mid-way goes on with the escalation (`_resume_escalation`) instead of undoing it.

        Returns where the pod is, the message, and where the escalation ended (a level's label, or
        Stop). `first`: the step to start from (an escalation resumed after a restart)."""
        cause = message
        for deeper in (SleepLevel.CUDA_SUSPEND, SleepLevel.CHECKPOINT):
            if deeper <= level or (first is not None and deeper < first):
                continue
            await self.reporter.event(
                pod,
                "Warning",
                "Escalating",
                f"sleep {level.label} failed and could not be undone ({cause}): "
                f"escalating to {deeper.label} to free the GPU",
            )
            op = {
                "action": "sleep",
                "level": int(deeper),
                "target": deeper.label,
                "started": _stamp(),
                "escalation": {"from": level.label, "error": message},
            }
            await self._report(pod, kube.state_annotations(c.STATE_SLEEPING, int(SleepLevel.AWAKE), op))
            fault_point("agent.before-escalation-step")
            try:
                await self.levels.sleep(ref, deeper)
            except LevelError as again:
                message = f"{message}; escalation to {deeper.label} failed: {again}"
                continue
            self.verified.add(ref.key)
            return deeper, f"{message}; escalated to {deeper.label} to free the GPU", deeper.label
        self.verified.discard(ref.key)  # unknown: read the truth before anything else
        try:
            where = await self.levels.probe(ref, None)
        except Exception:  # the operator stops the model anyway
            log.exception("%s/%s: cannot read the level after a failed escalation", *ref.key)
            where = level
        await self._escalate_to_stop_event(pod, f"sleep {level.label} failed and could not be undone")
        return where, f"{message}; {_ASKED_STOP}", c.ESCALATE_TO_STOP

    async def _escalate_to_stop_event(self, pod: dict[str, Any], why: str) -> None:
        await self.reporter.event(
            pod,
            "Warning",
            "Escalating",
            f"{why}, and no level the agent performs freed the GPU: asking the operator to stop the "
            f"ModelDeployment ({c.ANN_ESCALATE_TO}={c.ESCALATE_TO_STOP})",
        )

    async def _resume_escalation(self, pod: dict[str, Any], ref: PodRef, interrupted: dict[str, Any]) -> None:
        """An agent died during an escalation step: the pod was never put back, so the escalation goes
        on from that step (or is recorded as done, where the step had finished); never a wake."""
        t0 = time.monotonic()
        escalation: dict[str, Any] = interrupted["escalation"]
        origin = SleepLevel.parse_or_none(escalation.get("from")) or SleepLevel.L1
        step = self._hint(interrupted) or SleepLevel.CUDA_SUSPEND
        cause = str(escalation.get("error") or "a sleep failed")
        truth = await self.levels.probe(ref, None, step)
        self.verified.add(ref.key)
        annotations: dict[str, str] = {}
        if truth >= step:
            where, message, escalated = (
                truth,
                f"{cause}; escalated to {truth.label} to free the GPU",
                truth.label,
            )
        else:
            log.info("%s/%s: resuming the escalation to %s of an earlier agent", *ref.key, step.label)
            where, message, escalated = await self._escalate(pod, ref, origin, cause, first=step)
            if escalated == c.ESCALATE_TO_STOP:
                annotations[c.ANN_ESCALATE_TO] = c.ESCALATE_TO_STOP
        op = {
            "action": "sleep",
            "level": int(origin),
            "target": origin.label,
            "started": interrupted.get("started") or _stamp(),
            "seconds": round(time.monotonic() - t0, 3),
            "error": message,
            "escalated": escalated,
            "interrupted": interrupted,
        }
        self.metrics.operations.labels(origin.label, "sleep", "escalated").inc()
        await self._report(pod, {**kube.state_annotations(c.STATE_FAILED, int(where), op), **annotations})
        await self.reporter.event(pod, "Warning", "Failed", f"sleep {origin.label} failed: {message}")

    async def _ask_stop_for_half(
        self, pod: dict[str, Any], ref: PodRef, observed: SleepLevel, restores: int
    ) -> None:
        """A half-suspended pod whose restore failed `restores` times: the last resort is Stop."""
        last = ref.last_operation()
        error = self.last_error.get(ref.key, "the restore failed")
        message = f"{error}; the pod stays half suspended after {restores} failed restores: {_ASKED_STOP}"
        op = {
            "action": "wake",
            "level": int(observed),
            "target": observed.label,
            "started": _stamp(),
            "seconds": 0.0,
            "error": message,
            "escalated": c.ESCALATE_TO_STOP,
            **self._half_details(last),
        }
        await self._escalate_to_stop_event(
            pod, f"the pod stays half suspended after {restores} failed restores"
        )
        self.metrics.operations.labels(observed.label, "wake", "escalated").inc()
        await self._report(
            pod,
            {
                **kube.state_annotations(c.STATE_FAILED, int(observed), op),
                c.ANN_ESCALATE_TO: c.ESCALATE_TO_STOP,
            },
        )


def snapshot_request(ref: PodRef) -> dict[str, Any] | None:
    """The operator's request for a snapshot on this pod (hibernate.dev/snapshot-request), or None."""
    try:
        request = json.loads(ref.annotations.get(c.ANN_SNAPSHOT_REQUEST) or "null")
    except ValueError:
        return None
    return request if isinstance(request, dict) and request.get("id") else None


def _snapshotted(ref: PodRef) -> bool:
    """Whether the pod's engine went into a snapshot: the agent answered its request, without error."""
    request = snapshot_request(ref)
    answer = snapshot_answer(ref, request) if request is not None else None
    return answer is not None and "error" not in answer


def snapshot_answer(ref: PodRef, request: dict[str, Any]) -> dict[str, Any] | None:
    """The agent's answer on this pod to `request`, or None."""
    try:
        answer = json.loads(ref.annotations.get(c.ANN_SNAPSHOT) or "null")
    except ValueError:
        return None
    return answer if isinstance(answer, dict) and answer.get("id") == request["id"] else None


_ASKED_STOP = "asked the operator to stop the ModelDeployment (the last level of the escalation)"
