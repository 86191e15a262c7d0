"""The reference engine's state: weights, KV cache, sleep levels 0-2 and held requests.

Semantics follow vLLM 0.33 (shared/notes/vllm-sleep-api.md): a sleep pauses scheduling first
(requests that arrive are held, not refused), waits for the request in flight, then frees memory;
`/wake_up` with tags maps memory back; scheduling resumes once every tag is resident. Level 1
keeps the weights in pinned host memory, level 2 drops them and a wake without `reload_weights`
answers garbage. One lock serialises generation, sleep, wake and reload.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import torch  # type: ignore[import-not-found,unused-ignore]

from hibernate.api.constants import PREPARE_CHECKPOINT, PREPARE_CUDA_SUSPEND
from hibernate.engine.reference_model import ModelConfig, generate
from hibernate.engine.reference_weights import WeightStore, trim_heap

log = logging.getLogger("hibernate.engine.reference")

TAG_WEIGHTS: Final = "weights"
TAG_KV_CACHE: Final = "kv_cache"
TAG_SCHEDULING: Final = "scheduling"
MEMORY_TAGS: Final = (TAG_WEIGHTS, TAG_KV_CACHE)
WAKE_TAGS: Final = (*MEMORY_TAGS, TAG_SCHEDULING)
SLEEP_LEVELS: Final = (0, 1, 2)


class EngineFault(RuntimeError):
    """A request the engine cannot serve in its state (HTTP 500, as vLLM's worker errors)."""


class Stopping(RuntimeError):
    """The engine is shutting down; held requests end with this."""


@dataclass
class EngineOptions:
    kv_bytes: int
    weights_dir: Path | None  # None: generated from the seed, never written (reload regenerates)
    readers: int = 8
    warmup: bool = True
    # Act on the agent's hint (hibernate=checkpoint: a CRIU dump follows the level-2 sleep): free what
    # the image need not hold. False for the baseline rows of bench/wake.py.
    follow_hints: bool = True


@dataclass
class Timings:
    """Seconds of the engine's own steps, last value of each, for /debug/timings."""

    values: dict[str, float] = field(default_factory=dict)

    def record(self, name: str, started: float) -> float:
        seconds = time.monotonic() - started
        self.values[name] = round(seconds, 6)
        return seconds


class Engine:
    def __init__(self, cfg: ModelConfig, store: WeightStore, options: EngineOptions) -> None:
        self.cfg = cfg
        self.store = store
        self.options = options
        self.device = store.device
        self.kv: torch.Tensor | None = None
        self.asleep: set[str] = set()
        self.hints: list[str] = []  # the agent's hints on the sleeps so far (/debug/memory)
        self.level: int | None = None  # the level of the current sleep, None while awake
        self.paused = False
        self.weights_loaded = False  # the device weights hold the model's real bytes
        self.timings = Timings()
        self._params: dict[str, torch.Tensor] | None = None
        self._lock = threading.Lock()  # generation, sleep, wake, reload
        self._cond = threading.Condition()  # guards `paused` and `_stopping`
        self._stopping = False

    # --- start-up --------------------------------------------------------------------------------

    def start(self) -> None:
        started = time.monotonic()
        directory = self.options.weights_dir
        if directory is None:
            self.store.generate()
            self.timings.record("generate", started)
            log.info("weights generated from seed %d (no weights dir)", self.cfg.seed)
        elif self.store.files_match(directory):
            seconds = self.store.load(directory, self.options.readers)
            self.timings.record("load", started)
            log.info(
                "weights loaded from %s in %.2fs with %d readers (%.1f GB/s)",
                directory,
                seconds,
                self.options.readers,
                self.store.total_bytes / seconds / 1e9,
            )
        else:
            self.store.generate()
            self.timings.record("generate", started)
            t = time.monotonic()
            self.store.save(directory)
            self.timings.record("save", t)
            log.info("weights generated and saved to %s in %.2fs", directory, time.monotonic() - started)
        self.weights_loaded = True
        if self.store.pinned_prealloc:
            seconds = self.store.allocate_slabs()
            self.timings.values["pin_prealloc"] = round(seconds, 6)
            log.info("pinned %.2f GiB of host slabs in %.2fs", self.store.host_copy_bytes() / 2**30, seconds)
        self._allocate_kv()
        if self.options.warmup:
            self._generate([0, 1, 2], 2)  # cuBLAS handles, kernels: not part of the first answer

    def close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    # --- serving -----------------------------------------------------------------------------

    def complete(self, prompt: list[int], max_tokens: int) -> list[int]:
        """Greedy tokens; held while the engine sleeps (or scheduling is paused)."""
        while True:
            with self._cond:
                self._cond.wait_for(lambda: not self.paused or self._stopping)
                if self._stopping:
                    raise Stopping("the engine is stopping")
            with self._lock:
                if self.paused:
                    continue  # a sleep came in between: wait again
                return self._generate(prompt, max_tokens)

    def _generate(self, prompt: list[int], max_tokens: int) -> list[int]:
        if self._params is None:
            self._params = self.store.params()
        if self.kv is None:
            raise EngineFault("the KV cache is not allocated")
        return generate(self.cfg, self._params, self.kv, prompt, max_tokens)

    def sleeping(self) -> bool:
        return self.paused or bool(self.asleep)

    # --- sleep and wake ------------------------------------------------------------------------

    def sleep(self, level: int, prepare: str | None = None) -> None:
        """Sleep at `level`; `prepare` is the agent's hint of what follows (docs/levels.md, "Hints")."""
        if level not in SLEEP_LEVELS:
            raise ValueError(f"level must be one of {list(SLEEP_LEVELS)}, not {level}")
        if prepare is not None:
            self.hints.append(prepare)
        with self._cond:
            self.paused = True  # new requests are held from now on
        with self._lock:
            if self.asleep:
                log.warning("sleep level %d: already asleep at level %s, nothing to free", level, self.level)
                return
            if self.level is None or level > 0:
                self.level = level
            if level == 0:
                log.info("scheduling paused (level 0)")
                return
            started = time.monotonic()
            self._params = None
            if level == 1:
                suspend_next = prepare == PREPARE_CUDA_SUSPEND and self.options.follow_hints
                self.store.offload(pin=not suspend_next)  # unpinned slabs stay so: see WeightStore.offload
                self.timings.record("offload", started)
                if suspend_next:
                    # The driver's checkpoint follows: pinned host memory would be re-registered by
                    # its restore (~0.7 s for 16 GiB); unpinned here, it is pinned again slab by
                    # slab while the wake copies it back.
                    t = time.monotonic()
                    if self.store.unpin_slabs():
                        self.timings.record("prepare_cuda_suspend", t)
                    else:
                        log.info("cuda-suspend hint: the host copy cannot be unpinned (--host-alloc torch)")
            else:
                self.store.release()
                # Level 2 keeps nothing: the pinned level-1 slabs go too (even preallocated ones),
                # so a CRIU image of a level-2 engine holds no copy of the weights.
                self.store.release_slabs()
                self.weights_loaded = False
                if prepare == PREPARE_CHECKPOINT and self.options.follow_hints:
                    # A dump follows: the readers' pinned staging buffers and the heap's free pages
                    # would only make the image bigger (the reload allocates staging again).
                    t = time.monotonic()
                    self.store.release_staging()
                    trim_heap()
                    self.timings.record("prepare_checkpoint", t)
            self.kv = None
            t = time.monotonic()
            self._empty_cache()
            self.timings.record("empty_cache", t)
            self.asleep.update(MEMORY_TAGS)
            seconds = self.timings.record(f"sleep_{level}", started)
            log.info("asleep at level %d in %.3fs", level, seconds)

    def wake(self, tags: Iterable[str] | None) -> list[str]:
        """Map back the memory of `tags` (None: all); returns the memory tags woken."""
        wanted = list(WAKE_TAGS if tags is None else tags)
        for tag in wanted:
            if tag not in WAKE_TAGS:
                log.warning("wake_up: unknown tag %r ignored", tag)
        with self._lock:
            started = time.monotonic()
            woken: list[str] = [tag for tag in MEMORY_TAGS if tag in wanted and tag in self.asleep]
            if TAG_WEIGHTS in woken:
                if self.store.host_valid:
                    self.store.restore()
                    self.timings.record("restore", started)
                else:
                    self.store.allocate(zero=True)  # discarded at level 2: garbage until reloaded
                    self.weights_loaded = False
                self._params = None
                self.asleep.discard(TAG_WEIGHTS)
            if TAG_KV_CACHE in woken:
                self._allocate_kv()
                self.asleep.discard(TAG_KV_CACHE)
            if woken:
                self._sync()
                seconds = self.timings.record("wake", started)
                log.info(
                    "woke %s in %.3fs; still asleep: %s", woken, seconds, sorted(self.asleep) or "nothing"
                )
            if not self.asleep and (tags is None or TAG_SCHEDULING in wanted or woken):
                self.level = None
                with self._cond:
                    self.paused = False
                    self._cond.notify_all()
            return woken

    def reload_weights(self, directory: Path | None = None, readers: int | None = None) -> float:
        """`collective_rpc reload_weights`: read the shards back (or regenerate without a dir)."""
        with self._lock:
            if TAG_WEIGHTS in self.asleep:
                raise EngineFault("reload_weights: weights are not resident; wake_up?tags=weights first")
            started = time.monotonic()
            source = directory or self.options.weights_dir
            count = readers or self.options.readers
            try:
                if source is None:
                    self.store.generate()
                else:
                    self.store.load(source, count)
            except (OSError, ValueError) as exc:
                raise EngineFault(f"reload_weights: {exc}") from exc
            self._params = None
            self.weights_loaded = True
            seconds = self.timings.record("reload", started)
            self.timings.values["reload_readers"] = count
            log.info(
                "weights reloaded from %s in %.3fs with %d readers", source or "the seed", seconds, count
            )
            return seconds

    def checksum(self) -> str:
        with self._lock:
            if TAG_WEIGHTS in self.asleep:
                raise EngineFault("checksum: weights are not resident")
            return self.store.checksum()

    # --- memory ----------------------------------------------------------------------------------

    def _allocate_kv(self) -> None:
        self.kv = torch.empty(self.options.kv_bytes, dtype=torch.uint8, device=self.device)

    def _empty_cache(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
            if clear is not None:
                clear()  # cuBLAS's workspaces live in torch's allocator; they come back on the next GEMM
            torch.cuda.empty_cache()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def memory(self, query_cuda: bool = True) -> dict[str, Any]:
        """What the engine holds. `query_cuda=False` skips torch.cuda (for a driver-suspended process)."""
        weights = self.store.total_bytes if self.store.resident else 0
        kv = self.options.kv_bytes if self.kv is not None else 0
        info: dict[str, Any] = {
            "device": str(self.device),
            "device_bytes": weights + kv,  # the engine's own count of its weights and KV cache
            "weights_bytes": weights,
            "kv_bytes": kv,
            "pinned_bytes": self.store.pinned_bytes(),
            "pinned_slab_bytes": self.store.pinned_slab_bytes(),
            "host_copy_bytes": self.store.host_copy_bytes(),
            "host_copy_valid": self.store.host_valid,
            "rss_bytes": rss_bytes(),
            "sleep_level": self.level,
            "asleep_tags": sorted(self.asleep),
            "paused": self.paused,
            "weights_loaded": self.weights_loaded,
            "sleep_hints": list(self.hints),
        }
        if query_cuda and self.device.type == "cuda":
            info["gpu_allocated_bytes"] = torch.cuda.memory_allocated(self.device)
            info["gpu_reserved_bytes"] = torch.cuda.memory_reserved(self.device)
        return info


def rss_bytes(pid: int | str = "self") -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
