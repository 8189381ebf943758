"""Which process of a run on several devices (DDP, ``--gpu 0,1``) this is, and what the processes agree on
together, with one call that is a no-op on one device. Imports torch only when called (launch.py reads the rank
before the device choice)."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def launched_rank() -> int:
    """This process's rank among the processes of a run on several devices, from the environment the launcher
    (Lightning's for ``--gpu 0,1``, torchrun, SLURM's srun) gives each one before anything runs; 0 alone."""
    for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


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
