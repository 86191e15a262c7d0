"""The reference engine's model: a decoder-only transformer with random weights from a fixed seed.

It is not a sensible language model; it is a real one in every way that matters to sleeping and
waking: its parameters total the configured size (big bf16 matrices, one shard file per ~2 GiB),
every generated token reads all of them, it keeps a KV cache in a preallocated tensor, and greedy
decoding is deterministic, so an answer after a wake equals the answer before the sleep exactly
when every weight came back intact.

Per layer (pre-norm, parameter-free RMSNorm): multi-head causal self-attention (`wqkv` d x 3d,
`wo` d x d) and an MLP (`w1` d x 4d, GELU, `w2` 4d x d); an embedding and an output projection (`lm_head`).
Positions are sinusoidal, added to the input. Tokens: `t123` words are token 123, other words
their UTF-8 bytes; the output text is `t123 t456 ...`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Final

import torch  # type: ignore[import-not-found,unused-ignore]
import torch.nn.functional as F  # type: ignore[import-not-found,unused-ignore]

GIB: Final = 2**30
MIB: Final = 2**20
FORMAT: Final = "hibernate-reference-1"
BOS: Final = 0

# name -> (torch dtype, safetensors dtype, bytes per element)
DTYPES: Final[dict[str, tuple[torch.dtype, str, int]]] = {
    "bf16": (torch.bfloat16, "BF16", 2),
    "fp16": (torch.float16, "F16", 2),
    "fp32": (torch.float32, "F32", 4),
}
_HIDDEN_CHOICES: Final = (8192, 4096, 2048, 1024, 512, 256, 128, 64)
_MIN_LAYERS: Final = 4
_TOKEN: Final = re.compile(r"t(\d+)")


class CapacityError(ValueError):
    """A request that does not fit the KV cache."""


@dataclass(frozen=True)
class ModelConfig:
    hidden: int
    layers: int
    vocab: int
    heads: int
    dtype: str  # a key of DTYPES
    seed: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][0]

    @property
    def st_dtype(self) -> str:
        return DTYPES[self.dtype][1]

    @property
    def element_bytes(self) -> int:
        return DTYPES[self.dtype][2]

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def param_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every parameter in storage order (the order of the shard files)."""
        d = self.hidden
        shapes: list[tuple[str, tuple[int, ...]]] = [("embed", (self.vocab, d))]
        for i in range(self.layers):
            shapes += [
                (f"layers.{i}.wqkv", (d, 3 * d)),
                (f"layers.{i}.wo", (d, d)),
                (f"layers.{i}.w1", (d, 4 * d)),
                (f"layers.{i}.w2", (4 * d, d)),
            ]
        shapes.append(("lm_head", (d, self.vocab)))
        return shapes

    @property
    def weights_bytes(self) -> int:
        return sum(math.prod(shape) for _, shape in self.param_shapes()) * self.element_bytes

    def kv_bytes_per_position(self) -> int:
        return self.layers * 2 * self.hidden * self.element_bytes

    def metadata(self) -> dict[str, str]:
        return {"format": FORMAT, **{k: str(v) for k, v in asdict(self).items()}}

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str]) -> ModelConfig:
        return cls(
            hidden=int(meta["hidden"]),
            layers=int(meta["layers"]),
            vocab=int(meta["vocab"]),
            heads=int(meta["heads"]),
            dtype=meta["dtype"],
            seed=int(meta["seed"]),
        )

    @classmethod
    def for_size(
        cls,
        weights_bytes: int,
        dtype: str = "bf16",
        seed: int = 0,
        hidden: int | None = None,
        layers: int | None = None,
    ) -> ModelConfig:
        """A model whose parameters total about `weights_bytes` (within half a layer).

        The hidden size is 4096 for anything from ~2 GiB (8192 from 48 GiB), smaller for tiny
        test models, always with at least four layers where the size allows.
        """
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
        elt = DTYPES[dtype][2]
        if hidden is None:
            cap = 8192 if weights_bytes >= 48 * GIB else 4096
            fits = [
                h
                for h in _HIDDEN_CHOICES
                if h <= cap and (_MIN_LAYERS * _layer_params(h) + 2 * _vocab(h) * h) * elt <= weights_bytes
            ]
            hidden = fits[0] if fits else _HIDDEN_CHOICES[-1]
        if hidden < 8 or hidden % 8:
            raise ValueError(f"hidden must be a positive multiple of 8, not {hidden}")
        vocab = _vocab(hidden)
        if layers is None:
            rest = weights_bytes - 2 * vocab * hidden * elt
            layers = max(1, round(rest / (_layer_params(hidden) * elt)))
        head_dim = min(128, hidden)
        return cls(hidden, layers, vocab, hidden // head_dim, dtype, seed)


def _layer_params(hidden: int) -> int:
    return 12 * hidden * hidden


def _vocab(hidden: int) -> int:
    if hidden >= 1024:
        return 32000
    return 4096 if hidden >= 256 else 512


def kv_capacity(cfg: ModelConfig, kv_bytes: int) -> int:
    """Positions (prompt + generated tokens) that a KV cache of `kv_bytes` holds."""
    return kv_bytes // cfg.kv_bytes_per_position()


def encode(text: str, vocab: int) -> list[int]:
    ids = [BOS]
    for word in text.split():
        match = _TOKEN.fullmatch(word)
        if match:
            ids.append(int(match.group(1)) % vocab)
        else:
            ids.extend(b % vocab for b in word.encode())
    return ids


def token_text(token: int, first: bool) -> str:
    return f"t{token}" if first else f" t{token}"


def _rms(x: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)


def _positions(start: int, count: int, dim: int, like: torch.Tensor) -> torch.Tensor:
    pos = torch.arange(start, start + count, device=like.device, dtype=torch.float32)[:, None]
    freq = torch.exp(
        torch.arange(0, dim, 2, device=like.device, dtype=torch.float32) * (-math.log(10000.0) / dim)
    )
    pe = torch.zeros(count, dim, device=like.device, dtype=torch.float32)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)
    return pe.to(like.dtype)


def generate(
    cfg: ModelConfig, params: Mapping[str, torch.Tensor], kv: torch.Tensor, prompt: list[int], max_tokens: int
) -> list[int]:
    """Greedy decoding of `max_tokens` tokens after `prompt`; `kv` is the raw KV cache (uint8)."""
    capacity = kv_capacity(cfg, kv.numel())
    if len(prompt) + max_tokens > capacity:
        raise CapacityError(
            f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds the KV cache's "
            f"{capacity} positions"
        )
    layers, d, heads, hd = cfg.layers, cfg.hidden, cfg.heads, cfg.head_dim
    used = layers * 2 * capacity * d * cfg.element_bytes
    cache = kv[:used].view(cfg.torch_dtype).view(layers, 2, capacity, heads, hd)
    embed = params["embed"]
    out: list[int] = []
    with torch.inference_mode():
        ids = torch.tensor(prompt, device=kv.device, dtype=torch.long)
        pos = 0
        for _ in range(max_tokens):
            count = ids.numel()
            x = embed[ids] + _positions(pos, count, d, embed)
            for i in range(layers):
                h = _rms(x)
                qkv = (h @ params[f"layers.{i}.wqkv"]).view(count, 3, heads, hd)
                cache[i, 0, pos : pos + count] = qkv[:, 1]
                cache[i, 1, pos : pos + count] = qkv[:, 2]
                q = qkv[:, 0].transpose(0, 1)
                k = cache[i, 0, : pos + count].transpose(0, 1)
                v = cache[i, 1, : pos + count].transpose(0, 1)
                # Prefill starts at position 0, so its causal mask is the square one; a decode step
                # (one query) sees every cached position.
                a = F.scaled_dot_product_attention(q, k, v, is_causal=count > 1)
                x = x + a.transpose(0, 1).reshape(count, d) @ params[f"layers.{i}.wo"]
                h = _rms(x)
                x = x + F.gelu(h @ params[f"layers.{i}.w1"]) @ params[f"layers.{i}.w2"]
            logits = _rms(x[-1:]) @ params["lm_head"]
            token = int(torch.argmax(logits.float(), dim=-1).item())
            out.append(token)
            pos += count
            ids = torch.tensor([token], device=kv.device, dtype=torch.long)
    return out
