"""The fake model: weights and KV cache in real memory, sleep levels, and answers that depend on both.

An answer is a function of the prompt and a checksum of the weights as they are in "device" memory
now, so weights that were never reloaded after a level-2 wake answer wrongly. A prompt seen before
is answered from its prefix-cache entry, which lives in the KV cache memory; a level-2 sleep
discards that memory but keeps the index, so a wake that skips `/reset_prefix_cache` answers wrongly
for cached prompts. (vLLM >= 0.20 resets its caches at sleep by itself; the design's wake sequence
resets anyway, and the fake makes a missing reset observable.)
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from hibernate.engine.memory import (
    DeviceRegion,
    HostCopy,
    ensure_weights_file,
    fill_model_weights,
    garbage_block,
    load_weights_file,
)

log = logging.getLogger("hibernate.engine")

TAG_WEIGHTS: Final = "weights"
TAG_KV_CACHE: Final = "kv_cache"
TAG_SCHEDULING: Final = "scheduling"
MEMORY_TAGS: Final = (TAG_WEIGHTS, TAG_KV_CACHE)
WAKE_TAGS: Final = (*MEMORY_TAGS, TAG_SCHEDULING)

_ENTRY: Final = 32  # bytes of KV memory per prefix-cache entry (a sha256 digest)
_VOCAB: Final = tuple(c + v for c in "bdfgklmnprst" for v in ("a", "e", "i", "o", "u", "an", "or"))


class EngineFault(RuntimeError):
    """An engine-side failure that the server reports as HTTP 500."""


class FakeModel:
    def __init__(self, name: str, weights_bytes: int, kv_bytes: int, weights_file: Path) -> None:
        self.name = name
        self.weights_file = weights_file
        self.weights = DeviceRegion("weights", weights_bytes)
        self.kv_cache = DeviceRegion("kv_cache", kv_bytes)
        self.asleep: set[str] = set()
        self.level: int | None = None  # the level of the current sleep, None while awake
        self.weights_loaded = False  # the device weights hold the model's real bytes
        self._host: HostCopy | None = None
        self._checksum: int | None = None
        self._prefix: dict[str, int] = {}  # prompt -> entry index in the KV cache
        self._owners: dict[int, str] = {}
        self._next_entry = 0

    def load(self) -> None:
        """Start-up: the weights come from the model name and are written to disk once."""
        self.weights.map(b"\0")
        fill_model_weights(self.weights, self.name)
        ensure_weights_file(self.weights_file, self.weights)
        self.weights_loaded = True
        self.kv_cache.map(b"\0")

    def close(self) -> None:
        self.weights.release()
        self.kv_cache.release()
        self._drop_host_copy()

    @property
    def resident(self) -> bool:
        return not self.asleep

    def sleep(self, level: int) -> None:
        """Free the memory of `level` (0 frees nothing). A second sleep is a no-op, as in vLLM."""
        if self.asleep:
            log.warning("sleep level %d: already asleep at level %s, nothing to free", level, self.level)
            return
        if self.level is None or level > 0:
            self.level = level
        if level == 0:
            return
        if level == 1:
            self._host = HostCopy(self.weights)
            self._clear_prefix_cache()  # its memory is dropped, and vLLM resets it at level 1
        else:
            self.weights_loaded = False
        self.weights.release()
        self.kv_cache.release()
        self._checksum = None
        self.asleep.update(MEMORY_TAGS)
        log.info("asleep at level %d: device memory released", level)

    def wake(self, tags: Iterable[str] | None) -> list[str]:
        """Map back the memory of `tags` (None: all); returns the tags that were woken."""
        wanted = list(WAKE_TAGS if tags is None else tags)
        for tag in wanted:
            if tag not in WAKE_TAGS:
                log.warning("wake_up: unknown tag %r ignored", tag)
        woken: list[str] = [tag for tag in MEMORY_TAGS if tag in wanted and tag in self.asleep]
        if TAG_WEIGHTS in woken:
            self._wake_weights()
        if TAG_KV_CACHE in woken:
            self.kv_cache.map(garbage_block())  # KV content is never kept across a sleep
        self.asleep.difference_update(woken)
        if woken:
            log.info("woke %s; still asleep: %s", woken, sorted(self.asleep) or "nothing")
        return woken

    def mark_awake(self) -> None:
        self.level = None

    def reload_weights(self, path: Path | None = None) -> None:
        """`collective_rpc reload_weights`: read the weights file back into device memory."""
        if TAG_WEIGHTS in self.asleep:
            raise EngineFault("reload_weights: weights are not resident; wake_up?tags=weights first")
        if path is None and not self.weights_file.exists():
            # Its storage is gone: a new pod (restored from a snapshot, docs/snapshots.md) has a fresh
            # temporary directory. The weights come from the model again, as vLLM fetches them again
            # into an empty cache; an explicit path that is missing stays an error.
            fill_model_weights(self.weights, self.name)
            ensure_weights_file(self.weights_file, self.weights)
            log.info("weights file %s was missing: made again from the model", self.weights_file)
        try:
            load_weights_file(path or self.weights_file, self.weights)
        except (OSError, ValueError) as exc:
            raise EngineFault(f"reload_weights: {exc}") from exc
        self._checksum = None
        self.weights_loaded = True
        log.info("weights reloaded from %s", path or self.weights_file)

    def reset_prefix_cache(self) -> None:
        self._clear_prefix_cache()

    def answer(self, prompt: str, max_tokens: int) -> list[str]:
        """The output tokens for `prompt`, from its cache entry or from the current weights."""
        return _tokens(self._prefill(prompt), max_tokens)

    def garble(self) -> None:
        """TEST ONLY (the server's `wrong_after_wake` fault): the device weights become garbage and the
        prefix cache is forgotten, as after a wake that lost the weights: every answer differs."""
        if self.weights.mapped:
            self.weights.tile(garbage_block())
        self.weights_loaded = False
        self._checksum = None
        self._clear_prefix_cache()

    def weights_checksum(self) -> int:
        # crc32 over tens of MiB costs milliseconds; cache it until the weights change.
        if self._checksum is None:
            self._checksum = self.weights.checksum()
        return self._checksum

    def device_bytes(self) -> int:
        return sum(region.size for region in (self.weights, self.kv_cache) if region.mapped)

    def host_bytes(self) -> int:
        return self._host.size if self._host else 0

    def _wake_weights(self) -> None:
        if self._host is not None:
            self.weights.map(b"\0")
            self._host.restore_into(self.weights)
            self._drop_host_copy()
        else:
            self.weights.map(garbage_block())  # discarded at level 2: undefined until reloaded
        self._checksum = None

    def _drop_host_copy(self) -> None:
        if self._host is not None:
            self._host.close()
            self._host = None

    def _prefill(self, prompt: str) -> bytes:
        entry = self._prefix.get(prompt)
        if entry is not None:
            # Whatever the KV memory holds now: stale garbage after a level-2 wake without a reset.
            return self.kv_cache.read(entry * _ENTRY, _ENTRY)
        state = hashlib.sha256(self.weights_checksum().to_bytes(4, "little") + prompt.encode()).digest()
        self._remember(prompt, state)
        return state

    def _remember(self, prompt: str, state: bytes) -> None:
        entry = self._next_entry
        self._next_entry = (entry + 1) % (self.kv_cache.size // _ENTRY)
        evicted = self._owners.pop(entry, None)
        if evicted is not None:
            del self._prefix[evicted]
        self._prefix[prompt] = entry
        self._owners[entry] = prompt
        self.kv_cache.write(entry * _ENTRY, state)

    def _clear_prefix_cache(self) -> None:
        self._prefix.clear()
        self._owners.clear()
        self._next_entry = 0


def _tokens(state: bytes, count: int) -> list[str]:
    stream = hashlib.shake_256(state).digest(2 * count)
    return [
        " " + _VOCAB[int.from_bytes(stream[i : i + 2], "little") % len(_VOCAB)]
        for i in range(0, 2 * count, 2)
    ]
