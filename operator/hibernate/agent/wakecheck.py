"""A woken replica serves only once it answers right (issue 15): the wake check.

A restore can bring an engine back that runs but computes garbage: device memory restored wrongly by a
driver, weights not reloaded, a CUDA context that lost something. Levels 3 and 4 are where the agent
itself moves the engine's memory, so before a sleep at CudaSuspend or Checkpoint it asks the engine a
short greedy completion (a fixed prompt, a few tokens, temperature 0, the first model of
`GET /v1/models`) and records the answer on the pod (`hibernate.dev/wake-check`, JSON). After the wake,
before the pod is reported Awake (and so before its readiness gate lets requests in), the same prompt
must give the same text. A different answer, or none, is a failed wake: the agent posts both answers
and cold-starts the engine in its pod (agent/coldstart.py). The record is removed once the answer
matched, so an agent that dies between the wake and the check checks after its restart.

On by default; off for a ModelDeployment with `spec.verifyWake: false` (the operator writes
`hibernate.dev/verify-wake: "false"` into its pod template). Greedy decoding is deterministic for one
engine on one GPU; batching with other requests can change the last bits of a logit, so a first
mismatch is asked again once before it counts.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from hibernate.agent import kube
from hibernate.agent.engine_client import EngineClient, EngineError
from hibernate.agent.podref import PodRef
from hibernate.api import constants as c
from hibernate.faults import fault_point

log = logging.getLogger(__name__)

PROMPT = "Hibernate wake check. Count on: one, two, three,"
MAX_TOKENS = 8
_SHOWN = 120  # characters of each answer in an event or error


@dataclass(frozen=True)
class Reference:
    """The answer the engine gave before the sleep."""

    model: str
    prompt: str
    max_tokens: int
    text: str
    taken: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_pod(cls, ref: PodRef) -> Reference | None:
        """The record on the pod, or None (none, or not one the agent wrote)."""
        raw = ref.annotations.get(c.ANN_WAKE_CHECK)
        if not raw:
            return None
        try:
            data = json.loads(raw)
        except ValueError:
            return None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Any) -> Reference | None:
        """A record as JSON decoded (the pod's, or a snapshot's), or None where it is not one."""
        try:
            found = cls(**{k: data[k] for k in cls.__dataclass_fields__})
        except (ValueError, TypeError, KeyError):
            return None
        if not all(isinstance(getattr(found, k), str) for k in ("model", "prompt", "text", "taken")):
            return None
        if not isinstance(found.max_tokens, int) or not 0 < found.max_tokens <= 64:
            return None
        return found


def enabled(ref: PodRef) -> bool:
    return ref.annotations.get(c.ANN_VERIFY_WAKE, "true").strip().lower() != "false"


def _shown(text: str) -> str:
    return repr(text if len(text) <= _SHOWN else text[:_SHOWN] + "...")


@dataclass
class WakeCheck:
    """Records the answer before a deep sleep and compares after the wake; one per agent."""

    timeout_s: float = 60.0
    annotate: Callable[[str, str, dict[str, str]], bool] = kube.report
    remove: Callable[[str, str, str], bool] = kube.remove_annotation
    client: Callable[[str, float], EngineClient] = field(
        default=lambda url, timeout: EngineClient(url, timeout=timeout, retries=2)
    )
    # What this process recorded, by pod uid: the watch may deliver the record's echo late.
    recorded: dict[str, Reference | None] = field(default_factory=dict)

    def pending(self, ref: PodRef) -> Reference | None:
        if ref.uid in self.recorded:
            return self.recorded[ref.uid]
        return Reference.from_pod(ref)

    async def _ask(self, ref: PodRef, model: str | None, prompt: str, max_tokens: int) -> tuple[str, str]:
        async with self.client(ref.engine_url, self.timeout_s) as engine:
            if model is None:
                model = (await engine.models())[0]
            return model, await engine.complete(model, prompt, max_tokens)

    async def record(self, ref: PodRef) -> dict[str, Any]:
        """Before a sleep at CudaSuspend or Checkpoint: the engine's answer, kept on the pod. Returns
        details for last-operation. Never fails the sleep: an engine that does not answer is slept
        unchecked (the details say why)."""
        if not enabled(ref):
            await self._forget(ref)
            return {}
        try:
            model, text = await self._ask(ref, None, PROMPT, MAX_TOKENS)
        except (EngineError, LookupError) as e:
            log.warning("%s/%s: no wake check for this sleep: %s", *ref.key, e)
            await self._forget(ref)
            return {"wake_check": f"not recorded: {str(e)[:200]}"}
        stamp = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        reference = Reference(model, PROMPT, MAX_TOKENS, text, stamp)
        await asyncio.to_thread(
            self.annotate, ref.namespace, ref.name, {c.ANN_WAKE_CHECK: reference.to_json()}
        )
        self.recorded[ref.uid] = reference
        fault_point("agent.after-wake-reference")
        return {"wake_check": "recorded"}

    async def answer(self, ref: PodRef) -> Reference | None:
        """The engine's answer now, not recorded on the pod: what a snapshot carries, so that the engine
        restored from it into a new pod must give it again (docs/snapshots.md). None where the pod is
        not checked or the engine does not answer (the snapshot is then taken unchecked)."""
        if not enabled(ref):
            return None
        try:
            model, text = await self._ask(ref, None, PROMPT, MAX_TOKENS)
        except (EngineError, LookupError) as e:
            log.warning("%s/%s: no wake check for this snapshot: %s", *ref.key, e)
            return None
        stamp = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        return Reference(model, PROMPT, MAX_TOKENS, text, stamp)

    async def compare(self, ref: PodRef, reference: Reference) -> str | None:
        """None when the engine gives `reference`'s answer again, else why not, with both answers."""
        problem: str | None = None
        for attempt in range(2):
            try:
                _, text = await self._ask(ref, reference.model, reference.prompt, reference.max_tokens)
            except (EngineError, LookupError) as e:
                return f"the woken engine does not answer the wake check: {e}"
            if text == reference.text:
                return None
            problem = (
                f"the woken engine answers {_shown(text)} to the wake check, where it answered "
                f"{_shown(reference.text)} before the sleep ({reference.model}, {reference.max_tokens} "
                "greedy tokens)"
            )
            if attempt == 0:
                await asyncio.sleep(0.5)  # once more: a batch with other requests can tip a logit
        return problem

    async def verify(self, ref: PodRef) -> str | None:
        """After a wake: None when the engine gives the recorded answer again (or nothing is to be
        checked), else why not, with both answers. The record goes either way."""
        reference = self.pending(ref)
        if reference is None:
            return None
        if not enabled(ref):
            await self._forget(ref)
            return None
        fault_point("agent.before-wake-check")
        problem = await self.compare(ref, reference)
        await self._forget(ref)
        if problem is None:
            log.info("%s/%s: the woken engine answers as before the sleep", *ref.key)
        return problem

    async def _forget(self, ref: PodRef) -> None:
        had = self.recorded.get(ref.uid) is not None or c.ANN_WAKE_CHECK in ref.annotations
        self.recorded[ref.uid] = None
        if had:
            await asyncio.to_thread(self.remove, ref.namespace, ref.name, c.ANN_WAKE_CHECK)
