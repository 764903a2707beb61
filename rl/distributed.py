"""torchrun support: the process group from torchrun's environment, this rank, and sums over ranks.

Without torchrun (WORLD_SIZE unset or 1) every helper is the single-process identity, so the trainers call
them unconditionally."""

from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist


def setup(device: torch.device) -> None:
    """Join the process group torchrun describes (gloo on CPU, nccl on GPU); nothing without torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        # left to interpreter shutdown, gloo's worker threads abort the process (SIGABRT, "terminate called
        # without an active exception") after a run that succeeded: destroy the group while Python is alive
        atexit.register(teardown)


def teardown() -> None:
    """Leave the process group (a no-op when there is none or it is already gone)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks (float64)."""
    if world() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def per_rank_mean(count: float) -> float:
    """The mean of `count` over ranks: the normaliser that makes a token-level mean over the global batch out of
    each rank's sum once DistributedDataParallel averages the ranks' gradients (ranks hold unequal token counts)."""
    return all_sum([float(count)])[0] / world() if world() > 1 else float(count)


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any (so all ranks stop at the same step)."""
    return bool(all_sum([float(flag)])[0]) if world() > 1 else flag


def gather(obj: object) -> list:
    """Every rank's `obj`, in rank order (on every rank)."""
    if world() == 1:
        return [obj]
    out: list = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def from_rank0(obj: object) -> object:
    """Rank 0's `obj` on every rank."""
    if world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if world() > 1:
        dist.barrier()
