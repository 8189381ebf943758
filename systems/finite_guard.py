"""Stop training at a non-finite loss before it reaches the weights, without reading the loss every step.

Reading the loss on the host (``if not torch.isfinite(loss)``) makes the host
wait for the whole forward and backward pass at every step: the GPU then idles
while Python runs the optimiser call, Lightning's bookkeeping and the next
step's ray sampling. torch's fused optimisers (Adam, AdamW, SGD, Adagrad with
``fused=True``) take a device flag, ``found_inf``, and skip their update when it
is set: the flag GradScaler uses for overflowing fp16 gradients. With such an
optimiser the guard keeps a sticky device flag, set by the first non-finite
loss, and hands it to every step (combined with GradScaler's own flag under
16-mixed). The weights stay exactly as they were before that step, and the
host reads the flag only every few steps, with the progress-bar values it
reads anyway. Other optimisers cannot skip on a device flag: for them the loss
is read at every step, as before.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from utils.distributed import largest_across_devices, on_several_devices


class NonFiniteLossError(RuntimeError):
    """``losses``: this process's loss terms at ``step``; None when the loss was not finite on another device of
    a run on several (whose own error names its terms). ``weights``: the terms' weights at that step, named too:
    a finite term times an overflowing weight (1e39 in fp32) is what made the loss infinite."""

    def __init__(self, step: int, losses: Optional[Dict[str, float]], weights: Optional[Dict[str, float]] = None):
        self.step = step
        weights = weights or {}
        bad = "on another device" if losses is None else ", ".join(
            f"{k}={v:.4g}" + (f" (weight {weights[k]:.4g})" if k in weights else "") for k, v in losses.items())
        super().__init__(f"The training loss is not finite at step {step} ({bad}).")


def skips_on_device_flag(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimiser honours ``optimizer.found_inf`` (torch's fused implementations do)."""
    return bool(optimizer.defaults.get("fused")) and bool(getattr(optimizer, "_step_supports_amp_scaling", False))


NEVER = 2 ** 62  # a step no run reaches


class FiniteLossGuard:
    """``record`` each step's loss; ``check`` raises NonFiniteLossError for the first non-finite one.

    Deferred (``attach`` found an optimiser that skips on a device flag): ``record`` costs three device
    operators and no host read; ``check`` runs every few steps, given the flag as the caller read it.
    Immediate (any other optimiser): ``check_now`` reads the loss before each optimiser step.
    """

    def __init__(self):
        self.flag: Optional[torch.Tensor] = None  # 0-d float32 on the device: 1 once a loss was not finite
        self.recorded: List[Tuple[int, torch.Tensor, Dict[str, torch.Tensor], Dict[str, float]]] = []  # since the
        # last check: (step, loss, terms, their weights)
        self._scaler_flag: Optional[torch.Tensor] = None
        # the step the first non-finite loss was found at, once it was: the weights had their last update before
        # it (the deferred check finds it up to PROGRESS_EVERY steps later, the optimiser skipping in between)
        self.weights_step: Optional[int] = None

    @property
    def deferred(self) -> bool:
        return self.flag is not None

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Defer the check when the optimiser skips on a device flag (one flag on its parameters' device)."""
        if not skips_on_device_flag(optimizer):
            return
        self.flag = torch.zeros((), dtype=torch.float32, device=optimizer.param_groups[0]["params"][0].device)
        optimizer.register_step_pre_hook(self._before_step)
        optimizer.register_step_post_hook(self._after_step)

    def _before_step(self, optimizer, args, kwargs) -> None:
        # GradScaler (16-mixed) has set its own flag for non-finite gradients by now: skip on either
        self._scaler_flag = getattr(optimizer, "found_inf", None)
        optimizer.found_inf = self.flag if self._scaler_flag is None else torch.maximum(self._scaler_flag, self.flag)

    def _after_step(self, optimizer, args, kwargs) -> None:
        if self._scaler_flag is None:
            del optimizer.found_inf
        else:  # GradScaler deletes its own after the step
            optimizer.found_inf = self._scaler_flag
        self._scaler_flag = None

    def record(self, step: int, loss: torch.Tensor, terms: Dict[str, torch.Tensor],
               weights: Optional[Dict[str, float]] = None) -> None:
        """This step's loss and its terms (kept as device tensors; read only if something went wrong), with the
        terms' weights (host floats)."""
        weights = dict(weights or {})
        loss = loss.detach()
        terms = {k: v.detach() for k, v in terms.items()}
        if self.deferred:
            self.flag.masked_fill_(torch.isfinite(loss).logical_not_(), 1.0)
            # on several devices a non-finite loss on one reaches every device's weights through the averaged
            # gradients: every device's optimiser skips (the weights stay the same everywhere), every check finds it.
            # Here, inside the step's closure: the optimiser reads the flag after it, the pre-step hook before it
            largest_across_devices(self.flag)
            self.recorded.append((step, loss, terms, weights))
        else:
            self.recorded = [(step, loss, terms, weights)]

    def check_now(self) -> None:
        """Immediate mode, before the optimiser step (after the backward is queued): read this step's loss."""
        if not self.deferred and self.recorded:
            step, loss, terms, weights = self.recorded.pop()
            here = torch.isfinite(loss).logical_not().float()
            if float(largest_across_devices(here.clone())):  # every device stops at the same step
                self._stop(step, {k: float(v) for k, v in terms.items()} if here else None, weights)

    def check(self, flag_value: Optional[float] = None) -> None:
        """Deferred mode: raise for the first non-finite loss recorded since the last check. ``flag_value``
        is the flag as the caller read it (with other values, in one read); None reads it here."""
        if not self.deferred:
            return
        if flag_value is None:
            flag_value = float(self.flag)
        recorded, self.recorded = self.recorded, []
        if not flag_value:
            return
        first = next(((step, terms, weights) for step, loss, terms, weights in recorded
                      if not torch.isfinite(loss)), None)
        step = first[0] if first else NEVER
        if on_several_devices():  # the flag is every device's: the first step any device's loss was not finite
            step = -int(largest_across_devices(torch.tensor(-step, device=self.flag.device)))
        if step == NEVER:  # the flag is sticky and every step since the last clean check is recorded: not reached
            step = recorded[0][0] if recorded else -1
        here = first is not None and first[0] == step
        self._stop(step, {k: float(v) for k, v in first[1].items()} if here else None, first[2] if here else None)

    def _stop(self, step: int, losses: Optional[Dict[str, float]], weights: Optional[Dict[str, float]]) -> None:
        self.weights_step = step
        raise NonFiniteLossError(step, losses, weights)
