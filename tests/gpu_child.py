"""A CUDA process for the GPU tests: holds N GiB of seeded random data on cuda:0.

    python gpu_child.py --gib 4 --seed 1

Prints one line when ready: `READY <checksum>` (or `NOCUDA <reason>` and exits 3 when torch
has no GPU). Then answers lines on stdin: `checksum` -> `CHECKSUM <checksum>`, `quit` (or end
of input) -> exit. The checksum is computed on the GPU each time, so a matching answer after a
restore proves both the data and a working CUDA context. While the process is checkpointed
its CUDA calls block, so ask only after a resume.

Only torch and the standard library: it runs on the GPU machine as a plain script.
"""

from __future__ import annotations

import argparse
import sys


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    try:
        import torch  # type: ignore[import-not-found,unused-ignore]
    except ImportError as exc:
        print(f"NOCUDA torch is not importable: {exc}", flush=True)
        return 3
    if not torch.cuda.is_available():
        print("NOCUDA torch.cuda.is_available() is False", flush=True)
        return 3

    device = torch.device("cuda:0")
    count = int(args.gib * 2**30) // 8
    generator = torch.Generator(device=device).manual_seed(args.seed)
    # Values below 2**31 keep the int64 sum exact for any size that fits on one GPU.
    data = torch.randint(0, 2**31, (count,), dtype=torch.int64, device=device, generator=generator)

    def checksum() -> str:
        total = int(data.sum().item())
        # A sum misses swapped values; a strided sample with its positions does not.
        sample = data[:: max(1, count // 4099)]
        positions = torch.arange(sample.numel(), dtype=torch.int64, device=device)
        weighted = int(((sample % 65521) * (positions % 65521 + 1)).sum().item())
        return f"{count}:{total}:{weighted}"

    torch.cuda.synchronize()
    print(f"READY {checksum()}", flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "checksum":
            print(f"CHECKSUM {checksum()}", flush=True)
        elif command == "quit":
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
