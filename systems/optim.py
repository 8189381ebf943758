"""Optimiser and scheduler from config, as instant-nsr-pl writes them.

``optimizer.params`` gives per-module settings (``geometry: {lr: 0.01}``);
modules it does not name are not optimised; a part the model has switched
off (``geometry_bg`` without a learned background: the model returns None)
is skipped. Optimisers that have a fused implementation (Adam, AdamW, SGD)
get it unless ``args`` says ``fused`` or ``foreach`` (or gradients are
clipped, see ``make_optimizer``): one kernel per group instead of about ten
per parameter tensor, host time saved on a GPU at every step
(benchmarks/bench_step.py counts the operators). Schedulers are any
``torch.optim.lr_scheduler`` class by name, plus ``SequentialLR`` and
``ChainedScheduler`` built from a ``schedulers`` list.
"""
from __future__ import annotations

import difflib
import inspect
import logging
from typing import Any, Dict, List

import torch
import torch.nn as nn

from utils.config import ConfigError, to_primitive

log = logging.getLogger("nsr")


def _module(model: nn.Module, path: str) -> nn.Module:
    obj: Any = model
    for part in path.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"system.optimizer.params names '{path}', which the model does not have.")
        obj = getattr(obj, part)
    return obj


def closest_class(name: str, module: Any, base: type) -> str:
    """The hint ' (did you mean X?)' naming the subclass of ``base`` in ``module`` closest to ``name``, case aside
    (adamw -> AdamW); '' when none is close."""
    import difflib

    names = [n for n, obj in vars(module).items() if isinstance(obj, type) and issubclass(obj, base) and obj is not base]
    by_lower = {n.lower(): n for n in names}
    match = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=0.6)
    return f" (did you mean {by_lower[match[0]]}?)" if match else ""


def configured_optimizer(config: Any, model: nn.Module):
    """(optimizer class, parameter groups, args, the optimiser built as configured): every option of
    ``system.optimizer`` checked (a ConfigError names a wrong one), torch's default implementation."""
    name = config.name
    if not hasattr(torch.optim, name):
        raise ConfigError(f"Unknown optimizer '{name}' (system.optimizer.name); use a torch.optim class name"
                          f"{closest_class(name, torch.optim, torch.optim.Optimizer)}.")
    args = dict(to_primitive(config.get("args", {})) or {})
    if config.get("params") is not None:
        groups = [{"params": list(module.parameters()), "name": key, **dict(to_primitive(value) or {})}
                  for key, value in config.params.items() if (module := _module(model, key)) is not None]
    else:
        groups = [{"params": list(model.parameters()), "name": "all"}]
    optimizer_class = getattr(torch.optim, name)
    check_group_options(groups, optimizer_class)
    # built from copies: torch fills its defaults (fused: None) into the group dicts it is given
    return optimizer_class, groups, args, checked_optimizer(optimizer_class, [dict(g) for g in groups], args)


def check_optimization_config(system_config: Any, model: nn.Module) -> None:
    """Build the optimiser and scheduler ``system_config`` asks for, and drop them: a misspelt option or a value
    torch refuses is one ConfigError at start-up, before the data is read, not when training starts."""
    optimizer = configured_optimizer(system_config.optimizer, model)[-1]
    if system_config.get("scheduler") is not None:
        step_each_scheduler_once(make_scheduler(system_config.scheduler, optimizer)["scheduler"],
                                 system_config.scheduler)


def step_each_scheduler_once(scheduler: Any, config: Any) -> None:
    """Step ``scheduler``, and each one a SequentialLR or ChainedScheduler holds, once on its throwaway
    optimiser: torch takes some values at construction that its first step cannot use (ExponentialLR's
    ``gamma: abc``, StepLR's ``step_size: 2.5k``), which would stop the run at step 1 with a traceback."""
    import warnings

    held = list(getattr(scheduler, "_schedulers", []))
    leaves = [(scheduler, config, "system.scheduler")] + [
        (sub, config.schedulers[i], f"system.scheduler.schedulers.{i}") for i, sub in enumerate(held)]
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": there is no training here
        warnings.simplefilter("ignore")
        for leaf, leaf_config, key in leaves:
            if isinstance(leaf, torch.optim.lr_scheduler.ReduceLROnPlateau):  # steps on a metric, not on its own
                continue
            try:
                while leaf.last_epoch < 1:  # torch < 2.2's SequentialLR sets its later schedulers back to -1
                    leaf.step()
            except (TypeError, ValueError, ZeroDivisionError) as err:
                args = to_primitive(leaf_config.get("args", {})) or {}
                raise ConfigError(f"torch.optim.lr_scheduler.{type(leaf).__name__} cannot step with {key}.args "
                                  f"{args} ({err}); check those values' types and ranges.") from None


def make_optimizer(config: Any, model: nn.Module, fused_default: bool = True) -> torch.optim.Optimizer:
    """``fused_default=False`` keeps torch's default implementation unless the config asks for fused: for
    gradient clipping, which needs unscaled gradients before the step, and a fused optimiser under mixed
    precision unscales inside its step (Lightning refuses the combination)."""
    optimizer_class, groups, args, as_configured = configured_optimizer(config, model)
    name = config.name
    if "fused" not in inspect.signature(optimizer_class).parameters or {"fused", "foreach"} & args.keys():
        return as_configured
    if not fused_default:
        log.info(f"Optimizer: {name}, torch's default implementation (gradients are clipped)")
        return as_configured
    try:
        fused = optimizer_class(groups, **args, fused=True)
    except (RuntimeError, ValueError) as error:  # a device or dtype without the fused kernel (CPU before torch 2.4)
        log.info(f"Optimizer: {name}, torch's default implementation (no fused one here: {error})")
        return as_configured
    log.info(f"Optimizer: {name}, fused")
    return fused


def checked_optimizer(optimizer_class: type, groups: list, args: dict) -> torch.optim.Optimizer:
    """``optimizer_class(groups, **args)`` (it allocates no state yet), with torch's refusal of a value
    (``lr: -1``, ``betas: [0.9, 1.5]``) or of an ``args`` key as one sentence instead of a traceback."""
    try:
        return optimizer_class(groups, **args)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"torch.optim.{optimizer_class.__name__} refuses the config's system.optimizer: "
                          f"{str(err).rstrip('.')}.") from None


def check_group_options(groups: list, optimizer_class: type) -> None:
    """torch keeps any key of a parameter group without a word, so a misspelt ``lr`` in
    ``optimizer.params`` would train at the default rate; a key the optimiser does not take is an error."""
    options = set(inspect.signature(optimizer_class).parameters) - {"params"}
    for group in groups:
        for key in set(group) - options - {"params", "name"}:
            close = difflib.get_close_matches(key, options, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}?" if close else f"{optimizer_class.__name__} takes {', '.join(sorted(options))}."
            raise ConfigError(f"system.optimizer.params.{group['name']}.{key} is not an option of "
                              f"{optimizer_class.__name__}; {hint}")


def _scheduler(config: Any, optimizer: torch.optim.Optimizer):
    name = config.name
    sched = torch.optim.lr_scheduler
    if name in ("SequentialLR", "ChainedScheduler"):
        subs = [_scheduler(c, optimizer) for c in config.schedulers]
        if name == "SequentialLR":
            return sched.SequentialLR(optimizer, subs, milestones=list(config.milestones))
        return sched.ChainedScheduler(subs)
    if not hasattr(sched, name):
        raise ConfigError(f"Unknown scheduler '{name}' (system.scheduler); use a torch.optim.lr_scheduler class name"
                          f"{closest_class(name, sched, sched.LRScheduler)}.")
    try:
        return getattr(sched, name)(optimizer, **dict(to_primitive(config.get("args", {})) or {}))
    except (TypeError, ValueError) as err:  # an argument it does not take, or a value it refuses
        raise ConfigError(f"torch.optim.lr_scheduler.{name} refuses the config's system.scheduler: {err}.") from None


def make_scheduler(config: Any, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    """Lightning's lr_scheduler dict: scheduler plus interval ('step' or 'epoch')."""
    return {"scheduler": _scheduler(config, optimizer), "interval": config.get("interval", "step")}


NOT_OPTIONS = {"params", "name", "lr", "fused", "foreach", "capturable", "differentiable"}  # lr: where it is now
SCHEDULE_POSITION = {"last_epoch", "_step_count", "_last_lr", "_is_initial", "_get_lr_called_within_step",
                     "verbose", "base_lrs", "_schedulers"}  # base_lrs: the optimiser's lr


def _scheduler_options(state: dict, where: str) -> Dict[str, Any]:
    """{'<config key>': value} of a scheduler's state_dict without its position (SequentialLR's and
    ChainedScheduler's own under ``<where>``, their schedulers' under ``<where>.schedulers.<i>``)."""
    composite = "_schedulers" in state
    options = {f"{where}.{key.lstrip('_')}" if composite else f"{where}.args.{key}": value
               for key, value in state.items() if key not in SCHEDULE_POSITION}
    for i, sub in enumerate(state.get("_schedulers") or []):
        options.update(_scheduler_options(sub, f"{where}.schedulers.{i}"))
    return options


def _optimization_options(optimizer_state: dict, scheduler_state: dict | None, params: Any = None) -> Dict[str, Any]:
    """{'<config key>': value} of the options an optimiser and its scheduler were built with: a group's option under
    its own ``system.optimizer.params.<part>`` where ``params`` (that config section) sets it there, else under
    ``system.optimizer.args``, where the group took it from."""
    options = {}
    for group in optimizer_state["param_groups"]:
        own = (params or {}).get(group.get("name", "all")) or {}
        for key, value in group.items():
            if key in NOT_OPTIONS:
                continue
            option = "lr" if key == "initial_lr" else key
            where = f"system.optimizer.params.{group['name']}" if option in own else "system.optimizer.args"
            options[f"{where}.{option}"] = value
    if scheduler_state is not None:
        options.update(_scheduler_options(scheduler_state, "system.scheduler"))
    return options


def options_a_continued_run_ignores(system_config: Any, model: nn.Module, ckpt: dict) -> list:
    """[(config key, this config's value, the checkpoint's), ...]: the optimiser and scheduler options this
    config sets otherwise (to 6 significant digits) than the run the checkpoint continues, values as a config
    writes them (``option_value``). ``--train --resume`` restores the optimiser and the scheduler whole
    (Lightning), so these have no effect; a new learning rate, or a schedule stretched to a larger
    ``trainer.max_steps`` (neus-demo's decay rate follows it), was dropped without a word. A ConfigError when the
    two optimisers' parameter groups differ (Lightning fails on it with a traceback)."""
    saved_optimizers, saved_schedulers = ckpt.get("optimizer_states") or [], ckpt.get("lr_schedulers") or []
    if len(saved_optimizers) != 1:
        return []
    import warnings

    optimizer = configured_optimizer(system_config.optimizer, model)[-1]
    scheduler = None
    if system_config.get("scheduler") is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scheduler = make_scheduler(system_config.scheduler, optimizer)["scheduler"]
    ours, saved = optimizer.state_dict()["param_groups"], saved_optimizers[0]["param_groups"]
    if [len(g["params"]) for g in ours] != [len(g["params"]) for g in saved]:
        raise ConfigError(
            f"The checkpoint's optimiser has the parameter groups {[g.get('name', '?') for g in saved]}, this "
            f"config's system.optimizer.params gives {[g.get('name', '?') for g in ours]}: continue the run with "
            "its trial's config/parsed.yaml, or start afresh from its weights with --resume_weights_only.")
    params = system_config.optimizer.get("params")
    now = _optimization_options(optimizer.state_dict(), None if scheduler is None else scheduler.state_dict(), params)
    then = _optimization_options(saved_optimizers[0], saved_schedulers[0] if saved_schedulers else None, params)
    return [(key, option_value(now[key]), option_value(then[key])) for key in now
            if key in then and shown_option(now[key]) != shown_option(then[key])]


def learning_rate_overrides(optimizer: torch.optim.Optimizer, config: Any, factor: float) -> List[str]:
    """Command-line overrides (``system.optimizer.args.lr=0.005``) that give each of ``optimizer``'s parameter
    groups ``factor`` times the learning rate it was configured with (a scheduler's ``initial_lr``, not where
    the schedule has taken it), each under the key it came from: a group's own ``system.optimizer.params.<part>.lr``,
    else ``system.optimizer.args.lr`` (``+`` added where the config leaves it to torch's default)."""
    from omegaconf import OmegaConf

    overrides = {}
    for group in optimizer.param_groups:
        key = f"system.optimizer.params.{group.get('name')}.lr"
        if group.get("name", "all") == "all" or OmegaConf.select(config, key, default=None) is None:
            key = "system.optimizer.args.lr"
        given = OmegaConf.select(config, key, default=None) is not None
        overrides[key] = f"{'' if given else '+'}{key}={factor * group.get('initial_lr', group['lr']):.6g}"
    return list(overrides.values())


def option_value(value: Any) -> Any:
    """A scheduler's or optimiser's state value as a config writes it: a Counter (MultiStepLR's milestones) as
    its sorted elements, tuples as lists."""
    from collections import Counter

    if isinstance(value, Counter):
        return sorted(value.elements())
    if isinstance(value, (list, tuple)):
        return [option_value(v) for v in value]
    return value


def shown_option(value: Any) -> str:
    """A value as a message shows it, and as two are compared: numbers to 6 significant digits."""
    value = option_value(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return "[" + ", ".join(shown_option(v) for v in value) + "]"
    return str(value)
