"""The reference engine's weights: shard files on disk, flat device buffers, pinned host copies.

Each shard is one flat uint8 buffer on the device holding its parameters back to back, in the
same order and with the same bytes as the data section of its safetensors file, so that

- loading is `preadv` of file ranges into pinned staging buffers and copies into the buffers,
  with N reader threads on disjoint ranges, each with its own pair of staging buffers and its own
  CUDA stream (shared/notes/checkpointing.md, "Loading 16 GiB of weights from a local file");
- level 1 copies the buffers to pinned host slabs (power-of-two sized, so torch's caching host
  allocator, which rounds every pinned allocation up to a power of two, wastes nothing) on a few
  streams, frees the buffers, and copies them back on wake;
- level 2 frees the buffers; a wake maps zeroed ones (vLLM's are undefined; zero makes a
  wake without reload reliably wrong) until `reload_weights` reads the files again.

Parameters are views into the buffers, made on demand and dropped with them.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import math
import mmap
import os
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import torch  # type: ignore[import-not-found,unused-ignore]

from hibernate.engine import reference_safetensors as st
from hibernate.engine.reference_model import MIB, ModelConfig

log = logging.getLogger("hibernate.engine.reference")

INDEX: Final = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES: Final = 2 * 2**30
MAX_SLAB: Final = 256 * MIB
RING_BYTES: Final = 64 * MIB  # each of a ring thread's two pinned buffers (bench/pinning.py)


@dataclass(frozen=True)
class Param:
    name: str
    shape: tuple[int, ...]
    offset: int  # within its shard's buffer
    nbytes: int


@dataclass(frozen=True)
class Shard:
    index: int
    file: str
    nbytes: int
    start: int  # offset of this shard in the concatenation of all shards
    params: tuple[Param, ...]


def plan_shards(cfg: ModelConfig, shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[Shard]:
    """Parameters packed greedily, in order, into shards of at most `shard_bytes` (one param may exceed it)."""
    groups: list[list[tuple[str, tuple[int, ...], int]]] = [[]]
    size = 0
    for name, shape in cfg.param_shapes():
        nbytes = math.prod(shape) * cfg.element_bytes
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shape, nbytes))
        size += nbytes
    shards, start = [], 0
    for index, group in enumerate(groups):
        params, offset = [], 0
        for name, shape, nbytes in group:
            params.append(Param(name, shape, offset, nbytes))
            offset += nbytes
        file = f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
        shards.append(Shard(index, file, offset, start, tuple(params)))
        start += offset
    return shards


def host_view(tensor: torch.Tensor) -> memoryview:
    """A writable memoryview of a contiguous CPU tensor's bytes (no numpy); keep the tensor alive."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError("host_view needs a contiguous CPU tensor")
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(bytearray())
    array = (ctypes.c_ubyte * nbytes).from_address(tensor.data_ptr())
    return memoryview(array).cast("B")


def pread_into(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise OSError(f"file ended at byte {offset + done}, {len(view) - done} bytes early")
        done += got


@dataclass(frozen=True)
class _Piece:
    shard: int
    file_offset: int
    buffer_offset: int
    length: int


@dataclass(frozen=True)
class _Segment:
    """A piece of a shard buffer that lies in one host slab (level-1 offload)."""

    shard: int
    buffer_offset: int
    slab: int
    slab_offset: int
    length: int


def empty_host_cache() -> None:
    """Unpin and free pinned blocks torch's caching host allocator keeps for reuse."""
    fn = getattr(torch._C, "_host_emptyCache", None)
    if fn is not None and torch.cuda.is_available():
        fn()


def trim_heap() -> None:
    """Give the C heap's free pages back to the kernel (glibc's malloc_trim), so a process image
    dumped next holds only what is in use. A no-op where the C library has no malloc_trim."""
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return
    trim.argtypes = [ctypes.c_size_t]
    trim(0)


class RegisteredHost:
    """Host memory from an anonymous mmap (transparent huge pages asked for), page-locked with
    cudaHostRegister: `--host-alloc register`, an alternative to torch's cudaHostAlloc pinning.

    Unlike cudaHostAlloc memory it can be unpinned and pinned again with its bytes kept: before a
    CUDA suspend the engine unpins its level-1 copy, so the driver's checkpoint holds no page-locked
    host memory and its restore skips re-registering it (shared/notes/checkpointing.md: 16 GiB of
    pinned memory add ~0.7 s to a restore); the wake pins the slabs again while copying them back.
    """

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.map = mmap.mmap(-1, nbytes, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        advice = getattr(mmap, "MADV_HUGEPAGE", None)
        if advice is not None:
            with contextlib.suppress(OSError):
                self.map.madvise(advice)
        self.tensor: torch.Tensor | None = torch.frombuffer(self.map, dtype=torch.uint8)
        self.ptr = self.tensor.data_ptr()
        self.pinned = False
        try:
            self.pin()
        except RuntimeError:
            self.tensor = None
            self.map.close()
            raise

    def pin(self) -> None:
        if self.pinned:
            return
        rc = torch.cuda.cudart().cudaHostRegister(self.ptr, self.nbytes, 0)  # type: ignore[no-untyped-call,unused-ignore]
        if int(rc) != 0:
            raise RuntimeError(f"cudaHostRegister of {self.nbytes} bytes failed: {rc}")
        self.pinned = True

    def unpin(self) -> None:
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.ptr)  # type: ignore[no-untyped-call,unused-ignore]
            self.pinned = False

    def close(self) -> None:
        if self.tensor is None:
            return
        self.unpin()
        self.tensor = None
        with contextlib.suppress(BufferError):
            self.map.close()  # else freed with the last view


class _Ring:
    """Two pinned buffers of RING_BYTES and a stream: copies between pageable host memory and the
    device, the CPU copy of one piece overlapping the DMA of the other."""

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call,unused-ignore]
        self.stream.wait_stream(torch.cuda.default_stream(device))
        self.pair = [torch.empty(RING_BYTES, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        self.done = [torch.cuda.Event(), torch.cuda.Event()]
        self.turn = 0
        self.unread: tuple[int, torch.Tensor] | None = None  # to the host: a buffer filled, not yet read

    def copy(self, host: torch.Tensor, device: torch.Tensor, to_host: bool) -> None:
        for start in range(0, host.numel(), RING_BYTES):
            length = min(RING_BYTES, host.numel() - start)
            buffer = self.pair[self.turn][:length]
            if to_host:
                with torch.cuda.stream(self.stream):
                    buffer.copy_(device[start : start + length], non_blocking=True)
                    self.done[self.turn].record(self.stream)
                self._read_back()
                self.unread = (self.turn, host[start : start + length])
            else:
                self.done[self.turn].synchronize()  # its last DMA out of this buffer is done
                buffer.copy_(host[start : start + length])
                with torch.cuda.stream(self.stream):
                    device[start : start + length].copy_(buffer, non_blocking=True)
                    self.done[self.turn].record(self.stream)
            self.turn ^= 1

    def _read_back(self) -> None:
        if self.unread is not None:
            turn, host = self.unread
            self.done[turn].synchronize()
            host.copy_(self.pair[turn][: host.numel()])
            self.unread = None

    def finish(self) -> None:
        self._read_back()
        self.stream.synchronize()


class WeightStore:
    def __init__(
        self,
        cfg: ModelConfig,
        device: torch.device,
        *,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        staging_bytes: int = 32 * MIB,
        copy_streams: int = 4,
        keep_staging: bool = True,
        pinned_prealloc: bool = False,
        host_alloc: str = "torch",
        pin_threads: int = 1,
        ring_threads: int = 0,
    ) -> None:
        if host_alloc not in ("torch", "register"):
            raise ValueError(f"host_alloc must be torch or register, not {host_alloc!r}")
        if staging_bytes <= 0 or staging_bytes & (staging_bytes - 1):
            raise ValueError(f"staging buffers must be a power of two bytes, not {staging_bytes}")
        self.cfg = cfg
        self.device = device
        self.cuda = device.type == "cuda"
        self.shards = plan_shards(cfg, shard_bytes)
        self.total_bytes = sum(s.nbytes for s in self.shards)
        self.staging_bytes = staging_bytes
        self.keep_staging = keep_staging
        self.pinned_prealloc = pinned_prealloc
        self.host_alloc = host_alloc
        self.pin_threads = max(1, pin_threads)
        self.ring_threads = max(0, ring_threads)
        self._registered: list[RegisteredHost] = []
        self.buffers: list[torch.Tensor] | None = None
        self.slab_bytes = min(MAX_SLAB, 1 << max(0, (self.total_bytes - 1).bit_length()))
        self.slabs: list[torch.Tensor] | None = None
        self.host_valid = False  # the slabs hold the weights (after a level-1 offload)
        self._staging: dict[int, list[torch.Tensor]] = {}
        self._reader_streams: dict[int, torch.cuda.Stream] = {}
        self._copy_streams: list[torch.cuda.Stream] = []
        self._copy_stream_count = max(1, copy_streams)
        self._lock = threading.Lock()  # staging and streams are shared by reader threads

    # --- residency ------------------------------------------------------------------------------

    @property
    def resident(self) -> bool:
        return self.buffers is not None

    def allocate(self, zero: bool = False) -> None:
        make = torch.zeros if zero else torch.empty
        self.buffers = [make(s.nbytes, dtype=torch.uint8, device=self.device) for s in self.shards]

    def release(self) -> None:
        self.buffers = None
        self.host_valid = False

    def params(self) -> dict[str, torch.Tensor]:
        buffers = self._require()
        dtype = self.cfg.torch_dtype
        views = {}
        for shard in self.shards:
            for p in shard.params:
                views[p.name] = buffers[shard.index][p.offset : p.offset + p.nbytes].view(dtype).view(p.shape)
        return views

    def pinned_bytes(self) -> int:
        """Bytes of pinned host memory: the slabs pinned now and the readers' staging."""
        if not self.cuda:
            return 0
        return self.pinned_slab_bytes() + sum(
            len(pair) * self.staging_bytes for pair in self._staging.values()
        )

    def pinned_slab_bytes(self) -> int:
        """Bytes of the level-1 host slabs that are pinned now (the readers' staging not counted)."""
        if not self.cuda or self.slabs is None:
            return 0
        if self._registered:
            return sum(r.nbytes for r in self._registered if r.pinned)
        return len(self.slabs) * self.slab_bytes

    def host_copy_bytes(self) -> int:
        """Bytes of host slabs (pinned on CUDA) that hold or can hold an offloaded copy."""
        return len(self.slabs) * self.slab_bytes if self.slabs is not None else 0

    def _require(self) -> list[torch.Tensor]:
        if self.buffers is None:
            raise RuntimeError("the weights are not resident")
        return self.buffers

    # --- random weights from the seed ------------------------------------------------------------

    def generate(self) -> None:
        """Fill freshly allocated buffers from the config's seed (same seed, same device: same bytes)."""
        self.allocate()
        generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        with torch.no_grad():
            for name, view in self.params().items():
                fan_in = view.shape[0] if name != "embed" else 1
                view.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=generator)
        self._sync()

    # --- files ---------------------------------------------------------------------------------

    def files_match(self, directory: Path) -> bool:
        """Whether `directory` holds this model's shards, complete (index written last)."""
        try:
            index = json.loads((directory / INDEX).read_text())
            if index.get("metadata", {}).get("config") != self.cfg.metadata():
                return False
            for shard in self.shards:
                header = st.read_header(directory / shard.file)
                names = [(e.name, e.shape, e.begin, e.end) for e in header.entries]
                want = [(p.name, p.shape, p.offset, p.offset + p.nbytes) for p in shard.params]
                if names != want or header.metadata != self.cfg.metadata():
                    return False
        except (OSError, ValueError, KeyError, AttributeError):
            return False
        return True

    def save(self, directory: Path) -> None:
        """Write every shard and then the index, replacing whatever was there."""
        buffers = self._require()
        directory.mkdir(parents=True, exist_ok=True)
        (directory / INDEX).unlink(missing_ok=True)
        meta = self.cfg.metadata()
        staging = self._staging_pair(0)[0] if self.cuda else None
        for shard in self.shards:
            entries = st.layout((p.name, self.cfg.st_dtype, p.shape) for p in shard.params)
            st.write_file(directory / shard.file, entries, self._chunks(buffers[shard.index], staging), meta)
        weight_map = {p.name: s.file for s in self.shards for p in s.params}
        index = {"metadata": {"total_size": self.total_bytes, "config": meta}, "weight_map": weight_map}
        partial = directory / f".{INDEX}.{os.getpid()}.partial"
        partial.write_text(json.dumps(index, indent=1) + "\n")
        os.replace(partial, directory / INDEX)
        if not self.keep_staging:
            self.release_staging()

    def _chunks(self, buffer: torch.Tensor, staging: torch.Tensor | None) -> Iterator[memoryview]:
        if staging is None:
            yield host_view(buffer)
            return
        view = host_view(staging)
        for start in range(0, buffer.numel(), self.staging_bytes):
            length = min(self.staging_bytes, buffer.numel() - start)
            staging[:length].copy_(buffer[start : start + length])
            yield view[:length]

    def load(self, directory: Path, readers: int) -> float:
        """Read every shard into (newly allocated, unless resident) buffers; returns the seconds."""
        started = time.monotonic()
        if self.buffers is None:
            self.allocate()
        buffers = self._require()
        readers = max(1, readers)
        fds = []
        try:
            pieces = []
            for shard in self.shards:
                path = directory / shard.file
                header = st.read_header(path)
                if header.data_bytes != shard.nbytes:
                    raise st.SafetensorsError(
                        f"{path}: {header.data_bytes} data bytes, expected {shard.nbytes}"
                    )
                fds.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
                for start in range(0, shard.nbytes, self.staging_bytes):
                    length = min(self.staging_bytes, shard.nbytes - start)
                    pieces.append(_Piece(shard.index, header.data_offset + start, start, length))
            self._sync()
            groups = self._groups(pieces, readers)
            with ThreadPoolExecutor(max_workers=len(groups), thread_name_prefix="weights-reader") as pool:
                futures = [
                    pool.submit(self._read_group, reader, group, fds, buffers)
                    for reader, group in enumerate(groups)
                ]
                for future in futures:
                    future.result()
        finally:
            for fd in fds:
                os.close(fd)
            if not self.keep_staging:
                self.release_staging()
        return time.monotonic() - started

    def _groups(self, pieces: Sequence[_Piece], readers: int) -> list[list[_Piece]]:
        """Contiguous runs of pieces with about equal bytes, one per reader (disjoint file ranges)."""
        total = sum(p.length for p in pieces)
        groups: list[list[_Piece]] = [[]]
        done = 0
        for piece in pieces:
            if groups[-1] and done >= total * len(groups) / readers and len(groups) < readers:
                groups.append([])
            groups[-1].append(piece)
            done += piece.length
        return groups

    def _read_group(
        self, reader: int, pieces: Sequence[_Piece], fds: Sequence[int], buffers: Sequence[torch.Tensor]
    ) -> None:
        pair = self._staging_pair(reader)
        views = [host_view(b) for b in pair]
        if not self.cuda:
            for piece in pieces:
                view = views[0][: piece.length]
                pread_into(fds[piece.shard], view, piece.file_offset)
                target = buffers[piece.shard][piece.buffer_offset : piece.buffer_offset + piece.length]
                target.copy_(pair[0][: piece.length])
            return
        stream = self._reader_stream(reader)
        stream.wait_stream(torch.cuda.default_stream(self.device))
        events: list[torch.cuda.Event | None] = [None, None]
        for i, piece in enumerate(pieces):
            slot = i % 2
            event = events[slot]
            if event is not None:
                event.synchronize()  # the copy out of this staging buffer is done
            pread_into(fds[piece.shard], views[slot][: piece.length], piece.file_offset)
            with torch.cuda.stream(stream):
                target = buffers[piece.shard][piece.buffer_offset : piece.buffer_offset + piece.length]
                target.copy_(pair[slot][: piece.length], non_blocking=True)
                event = torch.cuda.Event()  # type: ignore[no-untyped-call,unused-ignore]
                event.record(stream)
                events[slot] = event
        stream.synchronize()

    def _staging_pair(self, reader: int) -> list[torch.Tensor]:
        with self._lock:
            pair = self._staging.get(reader)
        if pair is None:
            # Pinned outside the lock: after a Checkpoint restore (staging released before the dump)
            # every reader pins its pair at once instead of waiting for the readers before it.
            fresh = [
                torch.empty(self.staging_bytes, dtype=torch.uint8, pin_memory=self.cuda) for _ in range(2)
            ]
            with self._lock:
                pair = self._staging.setdefault(reader, fresh)
        return pair

    def release_staging(self) -> None:
        with self._lock:
            had = bool(self._staging)
            self._staging.clear()
        if had:
            empty_host_cache()

    def _reader_stream(self, reader: int) -> torch.cuda.Stream:
        with self._lock:
            stream = self._reader_streams.get(reader)
            if stream is None:
                stream = torch.cuda.Stream(device=self.device)  # type: ignore[no-untyped-call,unused-ignore]
                self._reader_streams[reader] = stream
            return stream

    # --- level 1: pinned host copy --------------------------------------------------------------

    def allocate_slabs(self) -> float:
        """The host slabs for a level-1 copy (pinned on CUDA); returns the seconds it took."""
        started = time.monotonic()
        if self.slabs is None:
            count = -(-self.total_bytes // self.slab_bytes)
            if self.cuda and self.host_alloc == "register":
                with ThreadPoolExecutor(max_workers=self.pin_threads, thread_name_prefix="pin") as pool:
                    self._registered = list(pool.map(lambda _: RegisteredHost(self.slab_bytes), range(count)))
                self.slabs = [r.tensor for r in self._registered if r.tensor is not None]
            else:
                self.slabs = [
                    torch.empty(self.slab_bytes, dtype=torch.uint8, pin_memory=self.cuda)
                    for _ in range(count)
                ]
        return time.monotonic() - started

    def _free_slabs(self) -> None:
        self.slabs = None
        for registered in self._registered:
            registered.close()
        self._registered = []
        empty_host_cache()

    def _segments(self) -> list[_Segment]:
        segments = []
        for shard in self.shards:
            offset = 0
            while offset < shard.nbytes:
                position = shard.start + offset
                slab, slab_offset = divmod(position, self.slab_bytes)
                length = min(shard.nbytes - offset, self.slab_bytes - slab_offset)
                segments.append(_Segment(shard.index, offset, slab, slab_offset, length))
                offset += length
        return segments

    def release_slabs(self) -> None:
        """Free the host slabs (level 2: nothing is kept, and a CRIU image must not carry them)."""
        had = self.slabs is not None
        self.host_valid = False
        if had:
            self._free_slabs()

    def offload(self, pin: bool = True) -> None:
        """Copy the buffers into the host slabs, then free the buffers. Slabs a copy back left
        unpinned are pinned first, unless `pin` is False and ring threads are set: then they are
        copied through the rings unpinned (before a CUDA suspend, which wants them unpinned anyway)."""
        buffers = self._require()
        self.allocate_slabs()
        assert self.slabs is not None
        unpinned = [i for i, r in enumerate(self._registered) if not r.pinned]
        if unpinned and not pin and self.ring_threads:
            self._copy_from_both_ends(buffers, self.slabs, unpinned, to_host=True)
        else:
            self._pin_slabs()
            self._copy(buffers, self.slabs, to_host=True)
        self.buffers = None
        self.host_valid = True

    def unpin_slabs(self) -> bool:
        """Unpin the level-1 copy, bytes kept (before a CUDA suspend: see RegisteredHost); False where
        the slabs cannot be unpinned (torch's cudaHostAlloc memory, or none on the host)."""
        if not self._registered or not self.host_valid:
            return False
        with ThreadPoolExecutor(max_workers=self.pin_threads, thread_name_prefix="unpin") as pool:
            list(pool.map(RegisteredHost.unpin, self._registered))
        return True

    def restore(self) -> None:
        """Copy the host slabs back into new buffers; without prealloc the slabs are freed. Unpinned
        slabs are pinned again on `pin_threads` threads, each slab's copy issued as soon as it is;
        with `ring_threads`, those threads copy slabs from the other end at the same time, unpinned
        (`_copy_from_both_ends`)."""
        if self.slabs is None or not self.host_valid:
            raise RuntimeError("no host copy of the weights to restore")
        self.allocate()
        buffers = self._require()
        unpinned = [i for i, r in enumerate(self._registered) if not r.pinned]
        if unpinned and self.ring_threads:
            self._copy_from_both_ends(buffers, self.slabs, unpinned, to_host=False)
        elif unpinned:
            with ThreadPoolExecutor(max_workers=self.pin_threads, thread_name_prefix="pin") as pool:
                ready = {i: pool.submit(self._registered[i].pin) for i in unpinned}
                self._copy(buffers, self.slabs, to_host=False, ready=ready)
        else:
            self._copy(buffers, self.slabs, to_host=False)
        self.host_valid = False
        if not self.pinned_prealloc:
            self._free_slabs()

    def _copy_from_both_ends(
        self,
        buffers: Sequence[torch.Tensor],
        slabs: Sequence[torch.Tensor],
        unpinned: Sequence[int],
        to_host: bool,
    ) -> None:
        """Copy the slabs two ways at once, meeting in the middle. `ring_threads` threads take
        unpinned slabs from the back and copy them through two small pinned buffers of their own:
        CPU copies, but no pinning. Meanwhile this thread queues the pinned slabs' copies, then takes
        unpinned slabs from the front: back to the device it pins each and queues its copy (the
        driver serializes pinning, so one thread pins as fast as many); to the host, where the slabs
        are about to be unpinned for a CUDA suspend, it copies through a ring as well. The slabs the
        rings copied stay unpinned; a later `offload()` with `pin` pins them."""
        by_slab: dict[int, list[_Segment]] = {}
        for seg in self._segments():
            by_slab.setdefault(seg.slab, []).append(seg)
        pinned = [seg for i, r in enumerate(self._registered) if r.pinned for seg in by_slab.get(i, [])]
        pending = deque(unpinned)
        lock = threading.Lock()
        errors: list[BaseException] = []

        def take(front: bool) -> int | None:
            with lock:
                if not pending or errors:
                    return None
                return pending.popleft() if front else pending.pop()

        def through_ring(front: bool) -> None:
            try:
                torch.cuda.set_device(self.device)  # a new thread's current device is the first
                slab = take(front)  # claimed first: allocating the ring takes longer than a pin
                ring = _Ring(self.device)
                while slab is not None:
                    for seg in by_slab.get(slab, []):
                        ring.copy(
                            slabs[seg.slab][seg.slab_offset : seg.slab_offset + seg.length],
                            buffers[seg.shard][seg.buffer_offset : seg.buffer_offset + seg.length],
                            to_host,
                        )
                    slab = take(front)
                ring.finish()
            except BaseException as exc:  # raised on the calling thread below
                with lock:
                    errors.append(exc)

        workers = [
            threading.Thread(target=through_ring, args=(False,), name=f"ring-{n}", daemon=True)
            for n in range(self.ring_threads)
        ]
        for worker in workers:
            worker.start()
        streams = self._streams_after_default()
        try:
            turn = self._issue(buffers, slabs, pinned, to_host)
            if to_host:
                through_ring(front=True)
            while (slab := take(front=True)) is not None:
                self._registered[slab].pin()
                turn = self._issue(buffers, slabs, by_slab.get(slab, []), to_host, turn)
        except BaseException as exc:
            with lock:
                errors.append(exc)
        finally:
            for worker in workers:
                worker.join()
            for stream in streams:
                stream.synchronize()
        if errors:
            raise errors[0]

    def _pin_slabs(self) -> None:
        """Pin the registered slabs a copy back left unpinned, before the next offload copies into them."""
        unpinned = [r for r in self._registered if not r.pinned]
        if unpinned:
            with ThreadPoolExecutor(max_workers=self.pin_threads, thread_name_prefix="pin") as pool:
                list(pool.map(RegisteredHost.pin, unpinned))

    def _copy(
        self,
        buffers: Sequence[torch.Tensor],
        slabs: Sequence[torch.Tensor],
        to_host: bool,
        ready: Mapping[int, Future[None]] | None = None,
    ) -> None:
        """Copy every segment between device buffers and host slabs on the copy streams; a slab in
        `ready` is copied only once its future (its pinning) is done."""
        segments = self._segments()
        if not self.cuda:
            for seg in segments:
                device = buffers[seg.shard][seg.buffer_offset : seg.buffer_offset + seg.length]
                host = slabs[seg.slab][seg.slab_offset : seg.slab_offset + seg.length]
                (host if to_host else device).copy_(device if to_host else host)
            return
        streams = self._streams_after_default()
        turn = 0
        for seg in segments:
            if ready is not None and seg.slab in ready:
                ready[seg.slab].result()
            turn = self._issue(buffers, slabs, [seg], to_host, turn)
        for stream in streams:
            stream.synchronize()

    def _streams_after_default(self) -> list[torch.cuda.Stream]:
        """The copy streams, each made to wait for what the default stream queued so far (the buffers)."""
        if not self._copy_streams:
            self._copy_streams = [
                torch.cuda.Stream(device=self.device)  # type: ignore[no-untyped-call,unused-ignore]
                for _ in range(self._copy_stream_count)
            ]
        default = torch.cuda.default_stream(self.device)
        for stream in self._copy_streams:
            stream.wait_stream(default)
        return self._copy_streams

    def _issue(
        self,
        buffers: Sequence[torch.Tensor],
        slabs: Sequence[torch.Tensor],
        segments: Sequence[_Segment],
        to_host: bool,
        turn: int = 0,
    ) -> int:
        """Queue the copies of `segments` on the copy streams, round robin from `turn`, without
        waiting for them; returns the turn after the last."""
        for seg in segments:
            stream = self._copy_streams[turn % len(self._copy_streams)]
            turn += 1
            with torch.cuda.stream(stream):
                device = buffers[seg.shard][seg.buffer_offset : seg.buffer_offset + seg.length]
                host = slabs[seg.slab][seg.slab_offset : seg.slab_offset + seg.length]
                (host if to_host else device).copy_(device if to_host else host, non_blocking=True)
        return turn

    # --- checks --------------------------------------------------------------------------------

    def checksum(self) -> str:
        """A digest of every weight byte as it is on the device now (sums and position-weighted samples)."""
        buffers = self._require()
        digest = hashlib.sha256()
        with torch.no_grad():
            for buffer in buffers:
                words = buffer.view(torch.int32) if buffer.numel() % 4 == 0 else buffer
                total = int(words.sum(dtype=torch.int64).item())
                sample = words[:: max(1, words.numel() // 65521)].to(torch.int64)
                positions = torch.arange(sample.numel(), device=buffer.device, dtype=torch.int64)
                weighted = int(((sample % 65521) * (positions % 65521 + 1)).sum().item())
                digest.update(f"{buffer.numel()}:{total}:{weighted};".encode())
        return digest.hexdigest()[:32]

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
