"""Count the places where the host would wait for a CUDA device, on any device (a CPU included).

A training step on a GPU is fast only while Python runs ahead of the GPU,
queueing kernels. Every read of a device value on the host (``.item()``,
``float(t)``, ``if t.any():``, ``tolist()``), every operation whose output size
depends on the data (boolean-mask indexing, ``nonzero``, ``bincount``,
``unique``) and every synchronous host-to-device copy (``torch.tensor(x,
device=...)``, ``cpu_tensor.to(device)``) drains that queue. These calls are the
same whatever the device, so they can be counted on a CPU, where
``torch.cuda.set_sync_debug_mode`` does not exist.

    with HostSyncCounter() as syncs:
        ...one training step...
    print(syncs.total, syncs.report())

It also counts the device operators dispatched (``operators``: every aten
op that is not a view, so about one kernel launch each on a GPU). With small
per-step work each launch costs the host several microseconds, so a step's
operator count bounds how fast a GPU can run it whatever its speed.

Counting is exact for the operations listed in ``DATA_DEPENDENT`` and
``HOST_READS``; a copy is counted when a call names a target device without
``non_blocking=True`` (on a CPU-only run the copy is a no-op, on a GPU it is
the host-to-device transfer the code meant).

Triton kernels run under Triton's CPU interpreter (``TRITON_INTERPRET=1``)
count as what they are on a GPU: one operator per launch. The interpreter's
own copies and arithmetic inside a launch are not counted.
"""
from __future__ import annotations

import collections
import os
import sys
from typing import Dict, Tuple

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# aten ops whose output shape (or host result) depends on tensor values
DATA_DEPENDENT = {"nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive",
                  "bincount", "_local_scalar_dense", "equal", "argwhere"}
HOST_READS = {"tolist", "cpu", "numpy"}  # Python-level reads that copy device data to the host
COPY_CALLS = {"tensor", "as_tensor", "to", "cuda"}  # calls that copy host data to a named device


def _caller_frame():
    """The innermost frame outside this module and torch's own code: whoever asked torch for the work."""
    frame = sys._getframe(1)
    while frame is not None and (frame.f_code.co_filename == __file__
                                 or f"{os.sep}torch{os.sep}" in frame.f_code.co_filename):
        frame = frame.f_back
    return frame


def _caller_in_repository() -> bool:
    return _call_site() != "(outside the repository)"


def _call_site() -> str:
    """'path:line (function)' of the code that called into torch, when it is this repository's."""
    frame = _caller_frame()
    path = os.path.abspath(frame.f_code.co_filename) if frame is not None else ""
    if not path.startswith(_ROOT) or "site-packages" in path:
        return "(outside the repository)"
    return f"{os.path.relpath(path, _ROOT)}:{frame.f_lineno} ({frame.f_code.co_name})"


class _Dispatch(TorchDispatchMode):
    def __init__(self, owner: "HostSyncCounter"):
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.owner.interpreting:  # Triton's interpreter emulating a kernel: counted once, at its launch
            return func(*args, **kwargs)
        name = func._overloadpacket.__name__
        kind = None
        if name == "_local_scalar_dense" and _in_optimizer():
            pass  # torch.optim's step counters live on the host (capturable=False): reading them waits for nothing
        elif name in DATA_DEPENDENT:
            kind = name
        elif name in ("index", "index_put", "index_put_") and _has_bool_index(args):
            kind = f"{name} with a boolean mask"
        elif name == "repeat_interleave" and kwargs.get("output_size") is None and len(args) == 1:
            kind = "repeat_interleave without output_size"
        if not getattr(func, "is_view", False) and not name.startswith("_record_function"):
            self.owner.operators += 1
        if kind is None:
            self.owner.ops_since_sync += 1
        else:  # the op runs, then the host waits for it: nothing is left queued behind the wait
            self.owner._record(kind)
        return func(*args, **kwargs)


def _in_optimizer() -> bool:
    """Whether the innermost caller outside torch's own machinery is torch.optim."""
    frame = sys._getframe(1)
    while frame is not None:
        path = frame.f_code.co_filename
        if f"torch{os.sep}optim{os.sep}" in path:
            return True
        if path != __file__ and f"{os.sep}torch{os.sep}" not in path:
            return False
        frame = frame.f_back
    return False


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(torch.is_tensor(i) and i.dtype in (torch.bool, torch.uint8) for i in (indices or ()))


class HostSyncCounter(TorchFunctionMode):
    """Context manager counting would-be host syncs: ``total``, ``drains``, ``by_kind``, ``by_site``, ``report()``;
    and ``operators``, the device operators (non-view aten ops) dispatched.

    ``drains`` counts only the syncs with device work queued since the previous one: several reads in a
    row wait once; a read between kernel launches makes the device idle while Python catches up.
    """

    def __init__(self, record_sites: bool = True):
        super().__init__()
        self.record_sites = record_sites
        self.by_kind: Dict[str, int] = collections.Counter()
        self.by_site: Dict[Tuple[str, str], int] = collections.Counter()
        self.drains = 0  # syncs with device work queued since the previous one: the waits that cost time
        self.ops_since_sync = 0
        self.operators = 0  # non-view aten ops: about one kernel launch each on a GPU
        self.interpreting = False  # inside a Triton kernel run by the interpreter
        self._dispatch = _Dispatch(self)
        self._unpatch = None

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    def _record(self, kind: str) -> None:
        if self.ops_since_sync > 0:  # work was queued since the last wait: this one idles the device
            self.drains += 1
        self.ops_since_sync = 0
        self.by_kind[kind] += 1
        if self.record_sites:
            self.by_site[(kind, _call_site())] += 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.interpreting:
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name in HOST_READS and args and torch.is_tensor(args[0]):
            self._record(f"Tensor.{name}()")
        elif name in COPY_CALLS and not kwargs.get("non_blocking", False) and _names_device(name, args, kwargs):
            # torch.tensor(data, device=...) always copies host data; .to(device) only when the tensor lives on
            # the host, which a CPU run cannot tell: count the moves our own code asks for, not the libraries'
            # (Lightning moves its metric tensors to the device they are already on)
            if name in ("tensor", "as_tensor") or _caller_in_repository():
                self._record("host-to-device copy")
                result = func(*args, **kwargs)
                self.ops_since_sync = 0  # the copy itself completed before the host went on
                return result
        return func(*args, **kwargs)

    def __enter__(self):
        super().__enter__()
        self._dispatch.__enter__()
        self._unpatch = self._count_interpreted_launches()
        return self

    def __exit__(self, *exc):
        if self._unpatch is not None:
            self._unpatch()
            self._unpatch = None
        self._dispatch.__exit__(*exc)
        return super().__exit__(*exc)

    def _count_interpreted_launches(self):
        """Wraps the Triton interpreter's launch (when it is loaded) so a launch counts as one operator and
        nothing inside it counts. Returns the function that undoes the wrap, or None."""
        interpreter = sys.modules.get("triton.runtime.interpreter")
        executor = getattr(interpreter, "GridExecutor", None)
        if executor is None:
            return None
        launch = executor.__call__
        counter = self

        def counted_launch(executor_self, *args, **kwargs):
            if counter.interpreting:
                return launch(executor_self, *args, **kwargs)
            counter.operators += 1
            counter.ops_since_sync += 1
            counter.interpreting = True
            try:
                return launch(executor_self, *args, **kwargs)
            finally:
                counter.interpreting = False

        executor.__call__ = counted_launch
        return lambda: setattr(executor, "__call__", launch)

    def report(self, top: int = 20) -> str:
        """Lines 'count  kind  where', most frequent first."""
        rows = sorted(self.by_site.items(), key=lambda kv: -kv[1])[:top]
        return "\n".join(f"{n:5d}  {kind:40s} {site}" for (kind, site), n in rows)


def _names_device(name: str, args, kwargs) -> bool:
    """True when a tensor/as_tensor/to/cuda call names a target device (a dtype-only .to() copies nothing)."""
    if name == "cuda":
        return True
    if "device" in kwargs and kwargs["device"] is not None:
        return True
    if name == "to":
        return any(isinstance(a, (str, torch.device)) for a in args[1:2])
    return False


def step_sync_callback(record_sites: bool = True, first: int = 0, stop: int | None = None):
    """A Lightning callback that counts would-be host syncs per training step, from one batch start to the
    next (the step, backward, optimiser, logging and progress bar included), for the steps
    ``first <= step < stop`` (all when ``stop`` is None). ``.steps``: [(step, counter)]."""
    import pytorch_lightning as pl

    class StepSyncCounter(pl.Callback):
        def __init__(self):
            self.steps = []
            self._open = None

        def _close(self):
            if self._open is not None:
                self._open[1].__exit__(None, None, None)
                self.steps.append(self._open)
                self._open = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self._close()
            step = trainer.global_step
            if step >= first and (stop is None or step < stop):
                self._open = (step, HostSyncCounter(record_sites).__enter__())

        def on_train_end(self, trainer, pl_module):
            self._close()

    return StepSyncCounter()
