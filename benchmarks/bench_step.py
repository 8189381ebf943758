"""Where a training step's time goes: steps/s, host syncs per step and the top operators (printed only).

    python benchmarks/bench_step.py                                    # nerf-demo and neus-demo on this machine
    python benchmarks/bench_step.py --configs configs/neus-blender.yaml --demo-resolution 800   # a GPU
    python benchmarks/bench_step.py --configs configs/neus-demo.yaml -- model.geometry.grad_type=finite_difference
    python benchmarks/bench_step.py -- model.train_num_rays=4 model.max_train_num_rays=4 \
        model.dynamic_ray_sampling=false         # host-bound: what Python and dispatch cost per step

Each config trains through Lightning (the real step: sampling, rendering,
losses, backward, optimiser, logging) past the occupancy grid's warm-up, then:

- steps/s over ``--steps`` steady steps (device synchronised only at the ends), and the median
  step (occupancy-grid updates, every 16 steps, fall outside it); over the same steps, the process's minor
  page faults and kernel (system) time per step: memory the allocator hands back to the OS and faults in
  again shows there, not in the operator table (``utils/host_memory.py``);
- host syncs and device operators (~kernel launches) per step over the next 20 steps (``utils.host_sync``: device
  reads, data-dependent shapes, synchronous copies), with the lines that cause them. ``drains`` are
  the syncs with device work queued behind them: each leaves the GPU idle
  while Python catches up, so on a GPU they bound how far the host can run ahead;
- a ``torch.profiler`` table of the operators with the most self time over
  ``--profile-steps`` steps (CUDA time on a GPU, CPU time otherwise).
"""
from __future__ import annotations

import argparse
import collections
import os
import resource
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import demo_scene_overrides, describe_device, sync  # noqa: E402


def run(config: str, overrides: list, steps: int, profile_steps: int, save_dir: str) -> None:
    import pytorch_lightning as pl
    from omegaconf import open_dict

    import datasets
    import systems
    from launch import seed_quietly
    from utils.config import load_config
    from utils.callbacks import ProgressBar
    from utils.host_sync import step_sync_callback

    cfg = load_config(config, overrides)
    with open_dict(cfg):
        cfg.save_dir = save_dir
    warmup = int(cfg.model.get("grid_warmup_steps", 256)) + 20
    count_steps = 20  # counting runs Python for every operator: kept out of the timed steps
    total = warmup + steps + count_steps + profile_steps
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    class Probe(pl.Callback):
        """Times ``steps`` steps after the warm-up; the sync counter then takes ``count_steps``, and the
        profiler the ``profile_steps`` after those: each window free of the others' overhead."""

        def __init__(self):
            self.t0 = self.t1 = self.profiler = None
            self.usage = []  # getrusage at the timed window's two ends: page faults and kernel time
            self.starts = []  # host clock at each timed step's start: the median interval skips grid updates

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            step = trainer.global_step
            if warmup <= step <= warmup + steps:
                self.starts.append(time.perf_counter())
            if step in (warmup, warmup + steps):
                sync(device)
                self.usage.append(resource.getrusage(resource.RUSAGE_SELF))
                if step == warmup:
                    self.t0 = time.perf_counter()
                else:
                    self.t1 = time.perf_counter()
            if step == warmup + steps + count_steps:
                activities = [torch.profiler.ProfilerActivity.CPU]
                if device.type == "cuda":
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                self.profiler = torch.profiler.profile(activities=activities)
                self.profiler.__enter__()

        def on_train_end(self, trainer, module):
            if self.profiler is not None:
                sync(device)
                self.profiler.__exit__(None, None, None)

    # the config's seed, as launch.py: the dynamic ray count (and with it a step's work) then follows the same
    # path from run to run, so two runs of this benchmark compare the code, not the random draws
    seed_quietly(int(cfg.get("seed", 42)))
    dm = datasets.make(cfg.dataset.name, cfg.dataset)
    dm.setup("fit")
    system = systems.make(cfg.system.name, cfg, mode="train")
    probe = Probe()
    counter = step_sync_callback(first=warmup + steps, stop=warmup + steps + count_steps)
    trainer = pl.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_steps=total,
                         callbacks=[probe, counter, ProgressBar()], logger=False, enable_checkpointing=False,
                         limit_val_batches=0, num_sanity_val_steps=0, enable_model_summary=False,
                         log_every_n_steps=int(cfg.trainer.get("log_every_n_steps", 50)))
    trainer.fit(system, datamodule=dm)

    per_step = [c for _, c in counter.steps]
    counts = [c.total for c in per_step]
    drains = [c.drains for c in per_step]
    sites = collections.Counter()
    for c in per_step:
        sites.update(c.by_site)
    print(f"\n== {os.path.basename(config)} {' '.join(overrides)}")
    intervals = sorted(b - a for a, b in zip(probe.starts, probe.starts[1:]))
    print(f"steps/s {steps / (probe.t1 - probe.t0):.2f} over {steps} steps after {warmup}, median step "
          f"{1e3 * intervals[len(intervals) // 2]:.2f} ms (rays per step at the end: {system.train_num_rays})")
    start, end = probe.usage
    print(f"per step: {(end.ru_minflt - start.ru_minflt) / steps:.0f} minor page faults, "
          f"{1e3 * (end.ru_stime - start.ru_stime) / steps:.2f} ms kernel time "
          f"({100 * (end.ru_stime - start.ru_stime) / (probe.t1 - probe.t0):.0f} % of the wall time)")
    print(f"host syncs per step: mean {sum(counts) / len(counts):.1f}, max {max(counts)}; "
          f"drains mean {sum(drains) / len(drains):.1f}; device operators per step "
          f"(non-view aten ops, ~kernel launches): mean {sum(c.operators for c in per_step) / len(per_step):.0f}")
    for (kind, site), n in sites.most_common(12):
        print(f"  {n / len(counts):6.2f}/step  {kind:36s} {site}")
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"top operators over {profile_steps} steps by {key}:")
    print(probe.profiler.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=50))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["configs/nerf-demo.yaml", "configs/neus-demo.yaml"])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument("--demo-resolution", type=int,
                        help="train on the demo scene in the Blender layout at this size (for *-blender configs)")
    args, rest = parser.parse_known_args()
    overrides = [a for a in rest if a != "--"]
    if args.demo_resolution:
        overrides = demo_scene_overrides(args.demo_resolution) + overrides
    print(describe_device(torch.device("cuda" if torch.cuda.is_available() else "cpu")))
    with tempfile.TemporaryDirectory(prefix="nsr-bench-step-") as save_dir:
        for config in args.configs:
            run(config, overrides, args.steps, args.profile_steps, save_dir)


if __name__ == "__main__":
    main()
