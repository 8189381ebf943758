"""What the processes of a run on several devices (DDP, ``--gpu 0,1``) agree on together, with one call that is
a no-op on one device."""
from __future__ import annotations

import torch


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
