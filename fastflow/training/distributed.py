"""The distributed side of a training run: the process group that ``torchrun`` asks for (set
up, closed with a barrier, torn down), this process's rank and device, the sums and flags the
ranks agree on, the data sharding, the DDP wrapper and rank-0 output. Single-process runs go
through the same functions, which then do nothing collective.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from fastflow.training.config import TrainError


def dist_info() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)``; ``(0, 1, 0)`` without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    return 0, 1, 0


def _init_process_group(device: str) -> bool:
    """Start the process group when launched by torchrun (``WORLD_SIZE > 1``)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if dist.is_initialized():
        return False
    wants_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    backend = "nccl" if wants_cuda else "gloo"
    if wants_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend)
    return True


@contextlib.contextmanager
def process_group(device: str) -> Iterator[None]:
    """Around a run: start the process group if torchrun asks for one (gloo on CPU, NCCL on
    GPU) and tear it down after; a group started elsewhere is left alone."""
    started = _init_process_group(device)
    try:
        yield
        if started:
            # rank 0 finishes last (it writes the files): without this, the other ranks tear
            # down the process group while it may still be in use
            dist.barrier()
    finally:
        if started:
            dist.destroy_process_group()


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """``values`` summed over the ranks (float64)."""
    _, world, _ = dist_info()
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on some rank (every rank gets the same answer)."""
    return all_sum([float(flag)], device)[0] > 0


def broadcast_from_rank0(module: nn.Module) -> None:
    """Give every rank rank 0's floating-point parameters and buffers (a no-op alone)."""
    if dist_info()[1] > 1:
        for t in module.state_dict().values():
            if t.is_floating_point():
                dist.broadcast(t, 0)


def resolve_device(name: str) -> torch.device:
    """The device of this rank for ``--device name`` (``auto``: CUDA if there is one; ``cuda``
    under torchrun: this rank's local GPU)."""
    _, world, local = dist_info()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainError(f"--device {name}: CUDA is not available in this torch build/machine")
        if world > 1 and name == "cuda":
            name = f"cuda:{local}"
    try:
        return torch.device(name)
    except RuntimeError:
        raise TrainError(f"--device: unknown device {name!r}") from None


def shard_sampler(n: int, seed: int):
    """A shuffling ``DistributedSampler`` over ``range(n)``: this rank's shard, the same number
    of batches on every rank, a new order per ``set_epoch``."""
    from torch.utils.data import DistributedSampler

    rank, world, _ = dist_info()
    return DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed)


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` in DistributedDataParallel when there are several ranks, else itself."""
    if dist_info()[1] == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None)


def rank0_print(*args, **kwargs) -> None:
    """``print`` (flushed) on rank 0 only."""
    if dist_info()[0] == 0:
        print(*args, **kwargs, flush=True)
