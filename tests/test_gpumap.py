"""A snapshot's GPUs mapped onto a new pod's (agent/gpumap.py), and the driver's restore arguments
that carry the map (agent/cuda.py).

The CUDA driver (580 / CUDA 13.0 and newer) restores a checkpoint onto other GPUs of the same chip
when its restore is given (checkpointed GPU, new GPU) UUID pairs, every checkpointed GPU named. The
agent records the pod's GPUs with every image, finds the new pod's, pairs them or refuses with the
reason (a cold start), and lays the pairs out as cuda.h does. No GPU is needed here: the driver's
/proc files and a pod's /dev are built in a temporary directory; the ctypes layout is checked
field by field against the header's (cuda.h of CUDA 13.0: CUcheckpointGpuPair, CUcheckpointRestoreArgs).
"""

from __future__ import annotations

import ctypes
import os
import stat
from pathlib import Path

import pytest

from hibernate.agent import cuda, gpumap
from hibernate.agent.gpumap import Gpu, RemapRefused, plan

H100 = "NVIDIA H100 80GB HBM3"
A = "GPU-8c1e2f3a-1111-2222-3333-444455556666"
B = "GPU-0d9e8f7a-aaaa-bbbb-cccc-ddddeeeeffff"
C = "GPU-12345678-9abc-def0-1234-56789abcdef0"
D = "GPU-fedcba98-7654-3210-fedc-ba9876543210"


# -- pairing ------------------------------------------------------------------------------------------


def test_the_same_gpus_need_no_map_and_the_driver_restores_onto_them() -> None:
    assert plan([Gpu(A, H100)], [Gpu(A, H100)], "580.95.05") == ()
    assert plan([Gpu(A, H100), Gpu(B, H100)], [Gpu(B, H100), Gpu(A, H100)], "580.95.05") == ()


def test_an_image_that_recorded_no_gpu_needs_no_map() -> None:
    """Taken from an engine without a GPU, or by an agent that did not record them yet."""
    assert plan([], [Gpu(B, H100)], "580.95.05") == ()
    assert plan([], [], None) == ()


def test_another_gpu_of_the_same_model_is_paired_with_the_checkpointed_one() -> None:
    assert plan([Gpu(A, H100)], [Gpu(B, H100)], "580.95.05") == ((A, B),)


def test_several_gpus_pair_in_order_so_device_ordinals_keep_their_order() -> None:
    assert plan([Gpu(A, H100), Gpu(B, H100)], [Gpu(C, H100), Gpu(D, H100)], "580.95.05") == ((A, C), (B, D))
    # One GPU in common, one not: still a map of both (the driver needs every checkpointed GPU).
    assert plan([Gpu(A, H100), Gpu(B, H100)], [Gpu(A, H100), Gpu(C, H100)], "590.1") == ((A, A), (B, C))


def test_a_model_unknown_on_one_side_is_left_to_the_driver() -> None:
    """The test double's GPUs have no model; the driver itself refuses another chip."""
    assert plan([Gpu(A)], [Gpu(B)], None) == ((A, B),)


@pytest.mark.parametrize(
    ("dumped", "now", "driver", "says"),
    [
        ([Gpu(A, H100)], [Gpu(B, H100), Gpu(C, H100)], "580.95.05", "taken on 1 GPU(s) (" + A + ") and this pod has 2"),
        ([Gpu(A, H100), Gpu(B, H100)], [Gpu(C, H100)], "580.95.05", "taken on 2 GPU(s)"),
        ([Gpu(A, H100)], [Gpu(B, "NVIDIA A100-SXM4-80GB")], "580.95.05", "restored only onto a GPU of the same model"),
        ([Gpu(A, H100)], [Gpu(B, H100)], "570.86.15", "needs NVIDIA driver 580 or newer, this node has 570.86.15"),
        ([Gpu(A, H100)], [], "580.95.05", "this pod has no GPU the agent can see"),
    ],
    ids=["more GPUs", "fewer GPUs", "another model", "driver 570", "no GPU"],
)  # fmt: skip
def test_a_map_that_cannot_be_made_is_refused_with_the_reason(
    dumped: list[Gpu], now: list[Gpu], driver: str, says: str
) -> None:
    with pytest.raises(RemapRefused) as refused:
        plan(dumped, now, driver)
    assert says in str(refused.value)


def test_recorded_gpus_are_read_back_and_anything_else_is_dropped() -> None:
    assert Gpu.from_json(Gpu(A, H100).to_json()) == Gpu(A, H100)
    assert Gpu.from_json({"uuid": A}) == Gpu(A, None)
    assert Gpu.from_json({"uuid": "MIG-1234"}) is None and Gpu.from_json("GPU-0") is None


# -- a node's GPUs, a pod's GPUs ----------------------------------------------------------------------


def driver_files(proc: Path, gpus: dict[str, tuple[str, int]]) -> None:
    """/proc/driver/nvidia/gpus/<bus>/information as the driver writes it: bus -> (uuid, minor)."""
    for bus, (uuid, minor) in gpus.items():
        info = proc / "driver" / "nvidia" / "gpus" / bus / "information"
        info.parent.mkdir(parents=True)
        info.write_text(
            f"Model: \t\t {H100}\nIRQ:   \t\t 0\nGPU UUID: \t {uuid}\nVideo BIOS: \t 96.00.99.00.01\n"
            f"Bus Type: \t PCIe\nDMA Size: \t 52 bits\nDevice Minor: \t {minor}\n"
        )


def test_the_nodes_gpus_come_from_the_drivers_files_in_bus_order(tmp_path: Path) -> None:
    driver_files(tmp_path, {"0000:c1:00.0": (B, 1), "0000:41:00.0": (A, 0)})
    assert [(n.gpu, n.minor, n.bus) for n in gpumap.node_gpus(tmp_path)] == [
        (Gpu(A, H100), 0, "0000:41:00.0"),
        (Gpu(B, H100), 1, "0000:c1:00.0"),
    ]
    assert gpumap.node_gpus(tmp_path / "no-driver") == []


def test_a_pods_gpus_are_the_nvidia_devices_in_its_container(tmp_path: Path) -> None:
    """The runtime makes only the pod's GPUs in its /dev; each is named by its minor."""
    if os.geteuid() != 0:
        pytest.skip("making device nodes needs root")
    proc = tmp_path / "proc"
    driver_files(proc, {"0000:41:00.0": (A, 0), "0000:c1:00.0": (B, 1), "0000:e1:00.0": (C, 2)})
    dev = proc / "4242" / "root" / "dev"
    dev.mkdir(parents=True)
    os.mknod(dev / "nvidia2", stat.S_IFCHR | 0o666, os.makedev(gpumap.NVIDIA_MAJOR, 2))
    os.mknod(dev / "nvidiactl", stat.S_IFCHR | 0o666, os.makedev(gpumap.NVIDIA_MAJOR, 255))
    os.mknod(dev / "nvidia7", stat.S_IFCHR | 0o666, os.makedev(1, 3))  # not the driver's: /dev/null's
    (dev / "nvidia1").symlink_to("/dev/nvidia1")  # a link the pod planted is not a device of its own
    assert gpumap.pod_gpus(4242, proc) == [Gpu(C, H100)]
    # Where the driver's files are, the environment does not count (the pod writes it).
    (proc / "4242" / "environ").write_bytes(f"NVIDIA_VISIBLE_DEVICES={A}\0".encode())
    assert gpumap.pod_gpus(4242, proc) == [Gpu(C, H100)]


def test_without_the_drivers_files_the_visible_devices_stand_in(tmp_path: Path) -> None:
    """The CUDA test double's nodes have no NVIDIA driver: NVIDIA_VISIBLE_DEVICES of the container's
    init names its GPUs (what the device plugin sets), UUIDs only."""
    (tmp_path / "77").mkdir()
    (tmp_path / "77" / "environ").write_bytes(
        f"PATH=/bin\0NVIDIA_VISIBLE_DEVICES={B},{A},3,MIG-abc\0HOME=/\0".encode()
    )
    assert gpumap.pod_gpus(77, tmp_path) == [Gpu(B), Gpu(A)]
    (tmp_path / "77" / "environ").write_bytes(b"NVIDIA_VISIBLE_DEVICES=all\0")
    assert gpumap.pod_gpus(77, tmp_path) == []
    assert gpumap.pod_gpus(78, tmp_path) == []


# -- the driver's arguments -------------------------------------------------------------------------------


def test_the_restore_arguments_are_laid_out_as_cuda_h_declares_them() -> None:
    """CUcheckpointGpuPair: two CUuuid (16 bytes each). CUcheckpointRestoreArgs (64 bytes): the pairs'
    pointer at 0, their count (unsigned int) at 8, then reserved bytes up to 64, all zero."""
    assert ctypes.sizeof(cuda._GpuPair) == 32
    assert (cuda._GpuPair.oldUuid.offset, cuda._GpuPair.newUuid.offset) == (0, 16)
    assert ctypes.sizeof(cuda._RestoreArgs) == 64
    assert cuda._RestoreArgs.gpuPairs.offset == 0
    assert cuda._RestoreArgs.gpuPairsCount.offset == ctypes.sizeof(ctypes.c_void_p) == 8
    assert (cuda._RestoreArgs.reserved.offset, cuda._RestoreArgs.reserved.size) == (12, 44)
    assert (cuda._RestoreArgs.reserved1.offset, cuda._RestoreArgs.reserved1.size) == (56, 8)


def test_the_restore_arguments_carry_each_pair_as_uuid_bytes() -> None:
    args, array = cuda.restore_args([(A, B), (C, D)])
    raw = ctypes.string_at(ctypes.addressof(args), ctypes.sizeof(args))
    assert int.from_bytes(raw[0:8], "little") == ctypes.addressof(array)
    assert int.from_bytes(raw[8:12], "little") == 2
    assert raw[12:] == bytes(52), "reserved: zero"
    pairs = ctypes.string_at(ctypes.addressof(array), 64)
    assert pairs == bytes.fromhex(
        "8c1e2f3a111122223333444455556666" + "0d9e8f7aaaaabbbbccccddddeeeeffff"
        "123456789abcdef0123456789abcdef0" + "fedcba9876543210fedcba9876543210"
    )
    with pytest.raises(ValueError, match="not a GPU UUID"):
        cuda.restore_args([(A, "GPU-0")])
    assert cuda.gpu_uuid_bytes(A) == bytes.fromhex(A[4:].replace("-", ""))
