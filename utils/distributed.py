"""Which process of a run on several devices (DDP, ``--gpu 0,1``) this is, and what the processes agree on
together, with one call that is a no-op on one device. Imports torch only when called (launch.py reads the rank
before the device choice)."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def launched_rank(devices_per_node: int = 1) -> int:
    """This process's rank among the processes of a run on several devices, from the environment the launcher
    gives each one before anything runs: torchrun's RANK; Lightning's NODE_RANK and LOCAL_RANK (``--gpu 0,1``;
    a run on several machines launched by hand with NODE_RANK on each), ranked ``devices_per_node`` to a
    machine; the task number srun gives (SLURM_PROCID). 0 alone."""
    def number(name: str) -> int | None:
        value = os.environ.get(name, "")
        return int(value) if value.isdigit() else None

    if number("RANK") is not None:
        return number("RANK")
    if number("NODE_RANK") is not None or number("LOCAL_RANK") is not None:
        return (number("NODE_RANK") or 0) * devices_per_node + (number("LOCAL_RANK") or 0)
    return number("SLURM_PROCID") or 0


def on_several_devices() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def largest_across_devices(value: torch.Tensor) -> torch.Tensor:
    """``value`` made, in place, the largest of its values on the devices of a run on several (a collective that
    every rank calls at the same point; it reads nothing to the host); as it is on one device."""
    if on_several_devices():
        import torch.distributed as dist

        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value
