"""A reference engine: a real (small, random) transformer on a GPU behind vLLM's sleep API.

    python -m hibernate.engine.reference --model NAME --port 8000 --weights-gib 16 [--kv-gib 4]
        [--weights-dir DIR] [--device cuda:0|cpu] [--readers 8] [--pinned-prealloc]

It exists to measure sleeping and waking on real hardware with nothing but torch and the
standard library (the GPU machine has no vLLM and no network): the weights are generated once
from a fixed seed, written as safetensors shards to `--weights-dir` and loaded from there at
every start (reused while they match the configuration); `--kv-gib` of KV cache is allocated as
one tensor. `--weights-dir none` generates the weights in place and writes nothing (for sizes
that do not fit the disk); `reload_weights` then regenerates them.

HTTP (vLLM 0.33's shapes, shared/notes/vllm-sleep-api.md): `POST /sleep?level=0|1|2`,
`POST /wake_up[?tags=weights|kv_cache|scheduling]`, `GET /is_sleeping`, `POST /collective_rpc`
(`reload_weights` with optional kwargs `weights_path` and `readers`; `checksum`),
`POST /reset_prefix_cache`, `GET /health`, `GET /v1/models`, `POST /v1/completions` and
`/v1/chat/completions` (greedy; the text is token ids, `t123 t456`), `GET /metrics`.
Not vLLM's: `GET /debug/memory[?cuda=0]` (GPU bytes allocated/reserved, host RSS, pinned bytes;
`cuda=0` for a process the driver has suspended, whose CUDA calls would block),
`GET /debug/timings` (seconds of the engine's last load, offload, restore, reload, ...) and
`GET|POST /debug/config` (`readers`, `keep_staging` at run time).

Requests that arrive while the engine sleeps are held until it is awake. The server speaks
HTTP/1.0 (one request per connection), so no connection stays open across a CRIU dump.
Unknown arguments (vLLM's) are ignored; `--enable-sleep-mode` is accepted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qs, urlsplit

from hibernate.api.constants import SLEEP_HINT_PARAM, SLEEP_HINTS
from hibernate.engine import openai

if TYPE_CHECKING:
    from hibernate.engine.reference_engine import Engine

log = logging.getLogger("hibernate.engine.reference")

GIB: Final = 2**30
MIB: Final = 2**20
SLEEP_MODES: Final = ("abort", "wait", "keep")
DEFAULT_WEIGHTS_ROOT: Final = Path("/var/tmp/hibernate-reference")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hibernate.engine.reference", allow_abbrev=False)
    p.add_argument("--model", required=True)
    p.add_argument("--served-model-name", nargs="+", default=None)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (logged as READY)")
    p.add_argument("--weights-gib", type=float, default=16.0, help="total size of the parameters")
    p.add_argument("--kv-gib", type=float, default=4.0, help="size of the KV cache tensor")
    p.add_argument(
        "--weights-dir",
        default=None,
        help=f"where the safetensors shards live (default {DEFAULT_WEIGHTS_ROOT}/<model>-<size>); "
        "'none': generate in place, write nothing",
    )
    p.add_argument("--device", default=None, help="cuda:0 (default where CUDA is available) or cpu")
    p.add_argument("--readers", type=int, default=8, help="parallel reader threads for loading weights")
    p.add_argument(
        "--pinned-prealloc",
        action="store_true",
        help="pin the level-1 host copy once at start (pinning 16 GiB takes ~10 s) instead of at each sleep",
    )
    p.add_argument(
        "--host-alloc",
        choices=("torch", "register"),
        default="register",
        help="level-1 host copy: mmap + huge pages + cudaHostRegister (can be unpinned before a CUDA "
        "suspend: docs/levels.md, Hints), or torch's pinned allocator",
    )
    p.add_argument(
        "--register-threads",
        type=int,
        default=1,
        help="--host-alloc register: threads that pin (and, before a CUDA suspend, unpin) the host slabs; "
        "the driver serializes cudaHostRegister, so more threads only contend (bench/RESULTS.md)",
    )
    p.add_argument(
        "--ring-threads",
        type=int,
        default=2,
        help="--host-alloc register: after a CUDA suspend, threads that copy unpinned slabs back through "
        "small pinned buffers of their own, from the other end while the register threads pin (0: none; "
        "2 was fastest on an H100: bench/RESULTS.md, issue 17)",
    )
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden", type=int, default=None, help="override the hidden size")
    p.add_argument("--layers", type=int, default=None, help="override the layer count")
    p.add_argument("--shard-mib", type=int, default=2048, help="largest shard file")
    p.add_argument(
        "--staging-mib", type=int, default=32, help="each reader's two pinned buffers (power of 2)"
    )
    p.add_argument(
        "--release-staging",
        action="store_true",
        help="free the readers' pinned staging buffers after each load (less pinned memory, slower reload)",
    )
    p.add_argument("--copy-streams", type=int, default=4, help="CUDA streams for level-1 copies")
    p.add_argument(
        "--pin-threads",
        type=int,
        default=0,
        help="pin host memory with cudaHostRegister on N threads (PYTORCH_CUDA_ALLOC_CONF); 0: torch default",
    )
    p.add_argument(
        "--ignore-hints",
        action="store_true",
        help="do not act on the agent's sleep hints (the baseline for bench/wake.py)",
    )
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--enable-sleep-mode", action="store_true", help="accepted; sleep is always on")
    p.add_argument("--log-level", default="INFO")
    return p


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    return build_parser().parse_known_args(argv)


def weights_dir(args: argparse.Namespace) -> Path | None:
    if args.weights_dir is not None:
        return None if args.weights_dir.lower() == "none" else Path(args.weights_dir).absolute()
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in args.model)
    return DEFAULT_WEIGHTS_ROOT / f"{safe}-{args.weights_gib:g}g-{args.dtype}-s{args.seed}"


# --- HTTP ----------------------------------------------------------------------------------------


class ReferenceServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], engine: Engine, served_names: tuple[str, ...]) -> None:
        self.engine = engine
        self.served_names = served_names
        super().__init__(address, Handler)


class Handler(BaseHTTPRequestHandler):
    server: ReferenceServer
    protocol_version = "HTTP/1.0"
    query: dict[str, list[str]]

    # --- plumbing --------------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._dispatch(
            {
                "/health": self._health,
                "/ping": self._health,
                "/v1/models": self._models,
                "/is_sleeping": self._is_sleeping,
                "/metrics": self._metrics,
                "/debug/memory": self._debug_memory,
                "/debug/timings": self._debug_timings,
                "/debug/config": self._debug_config,
            }
        )

    def do_POST(self) -> None:
        self._dispatch(
            {
                "/ping": self._health,
                "/sleep": self._sleep,
                "/wake_up": self._wake_up,
                "/collective_rpc": self._collective_rpc,
                "/reset_prefix_cache": self._reset_prefix_cache,
                "/v1/completions": lambda: self._complete(chat=False),
                "/v1/chat/completions": lambda: self._complete(chat=True),
                "/debug/config": self._debug_config,
            }
        )

    def _dispatch(self, routes: dict[str, Callable[[], None]]) -> None:
        parts = urlsplit(self.path)
        self.query = parse_qs(parts.query)
        handler = routes.get(parts.path)
        if handler is None:
            self._error(f"Not Found: {self.command} {parts.path}", 404)
            return
        try:
            handler()
        except BrokenPipeError:
            log.debug("client went away: %s %s", self.command, parts.path)
        except Exception as exc:  # an answer, never a dead handler thread
            log.exception("%s %s failed", self.command, parts.path)
            self._error(f"{type(exc).__name__}: {exc}", 500)

    def _body(self) -> object:
        length = int(self.headers.get("Content-Length") or 0)
        if length <= 0:
            return None
        raw = self.rfile.read(length)
        try:
            return json.loads(raw)
        except ValueError:
            return None

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, payload: object, status: int = 200) -> None:
        self._send(status, json.dumps(payload).encode())

    def _error(self, message: str, status: int) -> None:
        self._json(openai.error_body(message, status), status)

    def _q(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else default

    # --- always there --------------------------------------------------------------------------

    def _health(self) -> None:
        self._send(200, b"", "text/plain")  # 200 while asleep too, as vLLM's

    def _models(self) -> None:
        data = [
            {
                "id": name,
                "object": "model",
                "owned_by": "vllm",
                "root": self.server.served_names[0],
                "parent": None,
            }
            for name in self.server.served_names
        ]
        self._json({"object": "list", "data": data})

    def _metrics(self) -> None:
        engine = self.server.engine
        labels = f'engine="0",model_name="{self.server.served_names[0]}"'
        asleep = bool(engine.asleep)
        states = {
            "awake": int(not engine.sleeping()),
            "weights_offloaded": int(engine.level == 1 and asleep),
            "discard_all": int(engine.level == 2 and asleep),
        }
        lines = ["# TYPE vllm:engine_sleep_state gauge"]
        lines += [f'vllm:engine_sleep_state{{{labels},sleep_state="{k}"}} {v}' for k, v in states.items()]
        self._send(200, ("\n".join(lines) + "\n").encode(), "text/plain")

    def _complete(self, chat: bool) -> None:
        from hibernate.engine.reference_engine import EngineFault, Stopping
        from hibernate.engine.reference_model import CapacityError, encode, token_text

        engine = self.server.engine
        try:
            req = openai.parse_request(self._body(), chat, self.server.served_names)
        except openai.BadRequest as exc:
            self._error(str(exc), exc.status)
            return
        outputs: list[list[str]] = []
        prompt_tokens = 0
        try:
            for prompt in req.prompts:
                ids = encode(prompt, engine.cfg.vocab)
                prompt_tokens += len(ids)
                tokens = engine.complete(ids, req.max_tokens)
                outputs.append([token_text(t, i == 0) for i, t in enumerate(tokens)])
        except CapacityError as exc:
            self._error(str(exc), 400)
            return
        except EngineFault as exc:
            self._error(str(exc), 500)
            return
        except Stopping as exc:
            self._error(str(exc), 503)
            return
        name = self.server.served_names[0]
        if not req.stream:
            self._json(openai.full_response(req, name, outputs, "length", prompt_tokens))
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        for index, texts in enumerate(outputs):
            if req.chat:
                self._event(openai.role_chunk(req, name, index))
            for text in texts:
                self._event(openai.chunk(req, name, index, text, None))
            self._event(openai.chunk(req, name, index, None, "length"))
        self.wfile.write(b"data: [DONE]\n\n")

    def _event(self, payload: dict[str, Any]) -> None:
        self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())

    # --- the sleep API -------------------------------------------------------------------------

    def _sleep(self) -> None:
        level_text = self._q("level", "1") or "1"
        mode = self._q("mode", "abort") or "abort"
        if not level_text.isdigit() or int(level_text) not in (0, 1, 2):
            self._error(f"level must be one of [0, 1, 2], got {level_text!r}", 400)
            return
        if mode not in SLEEP_MODES:
            self._error(f"mode must be one of {list(SLEEP_MODES)}, got {mode!r}", 400)
            return
        hint = self._q(SLEEP_HINT_PARAM)
        if hint is not None and hint not in SLEEP_HINTS:
            self._error(f"{SLEEP_HINT_PARAM} must be one of {list(SLEEP_HINTS)}, got {hint!r}", 400)
            return
        # Every mode lets the request in flight finish and holds the ones that arrive.
        self.server.engine.sleep(int(level_text), hint)
        self._json({"status": "sleeping", "level": int(level_text)})

    def _wake_up(self) -> None:
        tags = self.query.get("tags") or None
        engine = self.server.engine
        engine.wake(tags)
        self._json({"status": "sleeping" if engine.sleeping() else "awake", "tags": tags})

    def _is_sleeping(self) -> None:
        self._json({"is_sleeping": self.server.engine.sleeping()})

    def _collective_rpc(self) -> None:
        from hibernate.engine.reference_engine import EngineFault

        body = self._body()
        if not isinstance(body, dict) or not isinstance(body.get("method"), str):
            self._error("the body must be a JSON object with a string 'method'", 400)
            return
        kwargs = body.get("kwargs") or {}
        if not isinstance(body.get("args") or [], list) or not isinstance(kwargs, dict):
            self._error("'args' must be a list and 'kwargs' an object", 400)
            return
        engine = self.server.engine
        method = body["method"]
        try:
            if method == "reload_weights":
                path = kwargs.get("weights_path")
                readers = kwargs.get("readers")
                engine.reload_weights(
                    Path(path) if isinstance(path, str) else None,
                    int(readers) if isinstance(readers, int | str) and str(readers).isdigit() else None,
                )
                self._json({"results": [None]})
            elif method == "checksum":
                self._json({"results": [engine.checksum()]})
            else:
                self._error(f"worker has no method {method!r}", 500)
        except EngineFault as exc:
            self._error(str(exc), 500)

    def _reset_prefix_cache(self) -> None:
        self._json({"success": True})  # no prefix cache: every request prefills anew

    # --- not vLLM's -----------------------------------------------------------------------------

    def _debug_memory(self) -> None:
        query_cuda = self._q("cuda", "1") not in ("0", "false", "no")
        self._json(self.server.engine.memory(query_cuda))

    def _debug_timings(self) -> None:
        self._json(self.server.engine.timings.values)

    def _debug_config(self) -> None:
        engine = self.server.engine
        if self.command == "POST":
            body = self._body()
            keys = {"readers", "keep_staging", "follow_hints"}
            if not isinstance(body, dict) or not set(body) <= keys:
                self._error(f"config must be a JSON object with keys among {sorted(keys)}", 400)
                return
            if "follow_hints" in body:
                engine.options.follow_hints = bool(body["follow_hints"])
            if "readers" in body:
                engine.options.readers = max(1, int(body["readers"]))
            if "keep_staging" in body:
                engine.store.keep_staging = bool(body["keep_staging"])
                if not engine.store.keep_staging:
                    engine.store.release_staging()
        self._json(
            {
                "readers": engine.options.readers,
                "keep_staging": engine.store.keep_staging,
                "follow_hints": engine.options.follow_hints,
            }
        )


# --- main ----------------------------------------------------------------------------------------


def _prepare_environment(args: argparse.Namespace) -> None:
    # Before torch is imported: cuBLAS reads this when it creates a handle (deterministic GEMMs on
    # any stream), the CUDA allocators read their config once.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if args.pin_threads > 0:
        extra = f"pinned_use_cuda_host_register:True,pinned_num_register_threads:{args.pin_threads}"
        current = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = f"{current},{extra}" if current else extra


def main(argv: Sequence[str] | None = None) -> int:
    args, unknown = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if unknown:
        log.info("ignoring arguments: %s", " ".join(unknown))
    _prepare_environment(args)

    import torch  # type: ignore[import-not-found,unused-ignore]

    from hibernate.engine.reference_engine import Engine, EngineOptions
    from hibernate.engine.reference_model import ModelConfig
    from hibernate.engine.reference_weights import WeightStore

    device = torch.device(args.device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    cfg = ModelConfig.for_size(int(args.weights_gib * GIB), args.dtype, args.seed, args.hidden, args.layers)
    staging = args.staging_mib * MIB
    store = WeightStore(
        cfg,
        device,
        shard_bytes=args.shard_mib * MIB,
        staging_bytes=staging,
        copy_streams=args.copy_streams,
        keep_staging=not args.release_staging,
        pinned_prealloc=args.pinned_prealloc,
        host_alloc=args.host_alloc,
        pin_threads=args.register_threads,
        ring_threads=args.ring_threads,
    )
    engine = Engine(
        cfg,
        store,
        EngineOptions(
            kv_bytes=max(1, int(args.kv_gib * GIB)),
            weights_dir=weights_dir(args),
            readers=args.readers,
            warmup=not args.no_warmup,
            follow_hints=not args.ignore_hints,
        ),
    )
    log.info(
        "model %s: hidden %d, %d layers, vocab %d, %s, %.3f GiB in %d shards on %s; KV %.3f GiB",
        args.model,
        cfg.hidden,
        cfg.layers,
        cfg.vocab,
        cfg.dtype,
        store.total_bytes / GIB,
        len(store.shards),
        device,
        args.kv_gib,
    )
    started = time.monotonic()
    engine.start()
    served = tuple(args.served_model_name or [args.model])
    server = ReferenceServer((args.host, args.port), engine, served)

    def stop(signum: int, frame: object) -> None:
        engine.close()
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    host, port = server.server_address[:2]
    log.info("READY http://%s:%d (started in %.2fs)", host, port, time.monotonic() - started)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
