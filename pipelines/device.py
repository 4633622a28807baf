"""What the engine asks of its torch device: size, memory in use, a sync point, and its errors
translated into the engine's typed ones."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

from .errors import Cancelled, DeviceFailure, OutOfMemory


def is_cuda(device: str) -> bool:
    return device.startswith("cuda")


def capacity(device: str) -> int | None:
    """Total bytes of the CUDA device (None on CPU: no limit)."""
    if not is_cuda(device):
        return None
    import torch

    return torch.cuda.get_device_properties(torch.device(device)).total_memory


def host_capacity(device: str) -> int | None:
    """Total bytes of host RAM, for the plan of a CUDA engine (None on CPU: not checked there)."""
    if not is_cuda(device):
        return None
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


FP8_MIN_CAPABILITY = (8, 9)  # fp8 tensor-core matmuls: Ada, Hopper, Blackwell


def fp8_unsupported(device: str) -> str | None:
    """Why `device` cannot run fp8 compute (pipelines/fp8_compute.py), worded for the user; None when
    it can. Torch-free for the CPU, so the front end refuses a CPU worker before starting it."""
    if not is_cuda(device):
        return (
            f"fp8 compute (--fp8-compute) needs a CUDA GPU with compute capability 8.9 or newer "
            f"(Ada, Hopper, Blackwell); this worker's device is {device!r}. Leave it off, or use "
            "--fp8-weights (fp8 storage, bf16 compute), which runs anywhere"
        )
    import torch

    capability = torch.cuda.get_device_capability(torch.device(device))
    if capability < FP8_MIN_CAPABILITY:
        name = torch.cuda.get_device_name(torch.device(device))
        return (
            f"fp8 compute (--fp8-compute) needs CUDA compute capability 8.9 or newer; {device} ({name}) "
            f"is {capability[0]}.{capability[1]}. Leave it off, or use --fp8-weights (fp8 storage, bf16 compute)"
        )
    return None


def memory_in_use(device: str) -> int | None:
    """Bytes of device memory this process holds on `device`: torch's *reserved* counter.

    Reserved rather than allocated: the caching allocator keeps freed blocks for reuse, and those
    bytes are as unavailable to anything else on the GPU (and as much a cause of the next OOM) as
    live tensors; reserved is what the process takes from the device, less only the CUDA context.
    Allocated (live tensors) is never larger. None on the CPU: not measured there (not 0).
    """
    if not is_cuda(device):
        return None
    import torch

    return int(torch.cuda.memory_reserved(torch.device(device)))


def synchronize(device: str) -> None:
    """Wait for the work queued on `device`, so a timer reads the work and not its launch."""
    if is_cuda(device):
        import torch

        torch.cuda.synchronize(device)


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def device_errors(device: str, width: int, height: int, frames: int) -> Iterator[None]:
    """Turn torch's device errors into OutOfMemory / DeviceFailure, freeing memory on OOM."""
    import torch

    try:
        yield
    except Cancelled:
        raise
    except torch.OutOfMemoryError as exc:
        free_memory()
        raise OutOfMemory(
            f"out of GPU memory at {width}x{height}, {frames} frames on {device}; "
            "try a smaller size or fewer frames, or start the server with offload enabled"
        ) from exc
    except RuntimeError as exc:
        if "CUDA error" in str(exc) or "CUBLAS_STATUS" in str(exc):
            raise DeviceFailure(f"unrecoverable device error on {device}: {exc}") from exc
        raise
