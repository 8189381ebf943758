"""Config loading: OmegaConf YAML + CLI dotlist, resolvers, strict override keys.

One place for everything a YAML can say: the resolvers instant-nsr-pl configs
use, dotlist overrides that must name an existing key (``+key=value`` adds a
new one, as in Hydra), and scheduled scalars (``[start_step, start, end,
end_step]``) used for loss weights.
"""
from __future__ import annotations

import copy
import difflib
import math
import os
import warnings
from typing import Any, Iterable, List, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf


class ConfigError(ValueError):
    """A config problem a user can fix; the message is one sentence."""


def _register_resolvers() -> None:
    resolvers = {
        "add": lambda a, b: a + b,
        "sub": lambda a, b: a - b,
        "mul": lambda a, b: a * b,
        "div": lambda a, b: a / b,
        "idiv": lambda a, b: a // b,
        "basename": lambda p: os.path.basename(os.path.normpath(p)),  # load/mug/ (tab-completed) -> mug
        "calc_exp_lr_decay_rate": lambda factor, n: factor ** (1.0 / n) if n > 0 else 1.0,
    }
    with warnings.catch_warnings():  # omegaconf 2.4 renamed the call; both spellings behave the same here
        warnings.simplefilter("ignore", UserWarning)
        for name, fn in resolvers.items():
            OmegaConf.register_new_resolver(name, fn, replace=True)


_register_resolvers()


def _all_keys(cfg: Any, prefix: str = "") -> List[str]:
    """Every dotted key path in a config (dict keys and list indices)."""
    keys: List[str] = []
    if isinstance(cfg, DictConfig):
        items = ((str(k), cfg._get_node(k)) for k in cfg.keys())
    elif isinstance(cfg, ListConfig):
        items = ((str(i), cfg._get_node(i)) for i in range(len(cfg)))
    else:
        return keys
    for k, node in items:
        path = f"{prefix}.{k}" if prefix else k
        keys.append(path)
        if isinstance(node, (DictConfig, ListConfig)):
            keys.extend(_all_keys(node, path))
    return keys


_MISSING = object()


def _raw_value(cfg: DictConfig, key: str) -> Any:
    """The value at a dotted key as the YAML wrote it (interpolations unresolved); ``_MISSING`` if absent."""
    node: Any = cfg
    for part in key.split("."):
        if isinstance(node, DictConfig):  # not ``part in node``: that is False for a mandatory ``???`` value
            child = node._get_node(part)
            if child is None:
                return _MISSING
            node = child
        elif isinstance(node, ListConfig):
            if not part.isdigit() or int(part) >= len(node):
                return _MISSING
            node = node._get_node(int(part))
        else:
            return _MISSING
    return node if isinstance(node, (DictConfig, ListConfig)) else node._value()


def closest_key(cfg: DictConfig, key: str) -> str | None:
    """The existing key most similar to ``key``, or None when nothing is close."""
    candidates = _all_keys(cfg)
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.8)
    return match[0] if match else None


def _words_for_numbers(cfg: DictConfig, overrides: Sequence[str]) -> List[tuple]:
    """(key, value, YAML's value) of the overrides that put a word where the YAML has a number
    (``trainer.max_steps=20k``). Not an error by itself (``trainer.precision=16-mixed`` is right); it names
    the culprit when an interpolation then fails to compute with it."""
    found = []
    for item in overrides:
        key, _, value = item.lstrip("+").partition("=")
        old = _raw_value(cfg, key)
        if isinstance(old, (int, float)) and not isinstance(old, bool) and not value.startswith("${"):
            try:
                float(value)
            except ValueError:
                found.append((key, value, old))
    return found


def apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """Merge ``key=value`` overrides into ``cfg``; unknown keys are an error.

    ``+key=value`` adds a key that the YAML does not have.
    """
    checked: List[tuple] = []  # (the override as typed, its key without the +, its text value, its YAML value)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"Override '{item}' is not of the form key=value (use +key=value to add a new key)."
            )
        key, value = item.split("=", 1)
        try:
            parsed = OmegaConf.to_container(OmegaConf.from_dotlist([f"value={value}"]), resolve=False)["value"]
        except Exception as err:  # a YAML parse error: an unclosed bracket or quote
            reason = str(err).splitlines()[0]
            raise ConfigError(f"Override '{item}' has a value that is not valid YAML ({reason}).") from None
        if not key.startswith("+") and _raw_value(cfg, key) is _MISSING:
            hint = closest_key(cfg, key)
            suggestion = f"; did you mean {hint}?" if hint else f"; use +{key}=... to add a new key."
            raise ConfigError(f"Override key '{key}' does not exist in the config{suggestion}")
        checked.append((item, key.lstrip("+"), value, parsed))
    if not checked:
        return cfg
    merged = copy.deepcopy(cfg)
    for item, key, value, parsed in checked:
        # one key at a time: a dotlist merged whole reads the 1 of schedulers.1.args.gamma as a dict key, and
        # cannot merge it into the list of schedulers
        try:
            OmegaConf.update(merged, key, parsed, merge=True, force_add=True)
        except Exception as err:  # a list where the YAML has a mapping, an index past a list's end
            raise ConfigError(f"Override '{item}' cannot be applied ({str(err).splitlines()[0]}): the "
                              f"config has {_describe_node(cfg, key)}.") from None
        if key in NAME_KEYS and isinstance(merged[key], (bool, int, float)):
            merged[key] = value  # YAML would read tag=off as false and tag=0123 as 83: a folder name is the text
    return merged


def _describe_node(cfg: DictConfig, key: str) -> str:
    """What the config holds at the deepest part of a dotted key it has, for an override's error:
    'a mapping at system.scheduler', 'a list of 2 at system.scheduler.schedulers (indices 0 to 1)'."""
    parts = key.split(".")
    while parts and _raw_value(cfg, ".".join(parts)) is _MISSING:
        parts.pop()
    value = _raw_value(cfg, ".".join(parts)) if parts else cfg
    where = f"at {'.'.join(parts)}" if parts else "at the top level"
    if isinstance(value, DictConfig):
        return f"a mapping {where}"
    if isinstance(value, ListConfig):
        return f"a list of {len(value)} {where} (indices 0 to {len(value) - 1})"
    return f"the value {value!r} {where}"


NAME_KEYS = ("tag", "name")  # top-level keys that name the trial's folders


def _require_mandatory(cfg: DictConfig, path: str) -> None:
    """A ConfigError naming the keys the YAML leaves to the command line (``scene: ???``, as instant-nsr-pl's
    Blender configs do) that the command did not give; OmegaConf would only fail later, inside an interpolation
    that uses one."""
    unset = [key for key in _all_keys(cfg) if _raw_value(cfg, key) == "???"]  # OmegaConf's mandatory marker
    if unset:
        given = " ".join(f"{key}=..." for key in unset)
        raise ConfigError(f"Config '{path}' leaves {', '.join(unset)} to the command line (???); add {given} "
                          "after the options.")


def closest_config(path: str, shipped: str) -> str | None:
    """The YAML file a ``--config`` that names none was most likely meant to name, as typed from here: the name
    with ``.yaml`` added, the shipped config of that name (``neus-demo.yaml`` given without ``configs/``), or the
    closest name in its folder or the shipped ones (``neus_demo``, ``neus-dmo``); None when nothing is close."""
    from utils.stops import typed_path

    folder, name = os.path.split(path)
    stem = name[:-5] if name.endswith(".yaml") else name[:-4] if name.endswith(".yml") else name
    for candidate in (path + ".yaml", os.path.join(shipped, stem + ".yaml")):
        if os.path.isfile(candidate):
            return typed_path(candidate)
    for where in dict.fromkeys((folder or ".", shipped)):  # the folder typed first, then the shipped configs
        names = sorted(f[:-5] for f in os.listdir(where) if f.endswith(".yaml")) if os.path.isdir(where) else []
        close = difflib.get_close_matches(stem, names, n=1, cutoff=0.75)
        if close:
            return typed_path(os.path.join(where, close[0] + ".yaml"))
    return None


def load_config(path: str, overrides: Iterable[str] = (), resolve: bool = True) -> DictConfig:
    """Load a YAML config, apply dotlist overrides, resolve interpolations (unless ``resolve`` is False)."""
    if not os.path.isfile(path):
        configs = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")
        what = "is a folder, not a YAML file" if os.path.isdir(path) else "does not exist"
        trial_config = next((os.path.join(path, *inside) for inside in (("config", "parsed.yaml"), ("parsed.yaml",))
                             if os.path.isfile(os.path.join(path, *inside))), None)
        if trial_config:  # a trial folder, or its config/: as --resume takes a trial folder, name its file
            raise ConfigError(f"Config file '{path}' {what}; the trial's config is --config {trial_config}.")
        meant = None if os.path.isdir(path) else closest_config(path, os.path.normpath(configs))
        if meant:
            raise ConfigError(f"Config file '{path}' {what}; did you mean --config {meant}?")
        raise ConfigError(f"Config file '{path}' {what}; the shipped configs are in {os.path.normpath(configs)}.")
    if path.endswith(".ckpt"):
        raise ConfigError(f"'{path}' is a checkpoint, not a config: give it to --resume, and its trial's "
                          "config/parsed.yaml to --config.")
    try:
        cfg = OmegaConf.load(path)
    except Exception as err:  # YAML syntax errors carry a line number
        raise ConfigError(f"Config file '{path}' is not valid YAML: {yaml_problem(err, path)}.") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"Config file '{path}' must hold a mapping at its top level.")
    words = _words_for_numbers(cfg, list(overrides))
    cfg = apply_overrides(cfg, list(overrides))
    _require_mandatory(cfg, path)
    expand_home(cfg)
    if not resolve:
        return cfg
    try:
        OmegaConf.resolve(cfg)
    except Exception as err:
        if words:
            key, value, old = words[0]
            raise ConfigError(f"Override {key}={value} puts a word where the config has a number ({old}), and "
                              "an interpolation computes with it; give a number.") from None
        full_key = getattr(err, "full_key", None) or unresolvable_key(cfg)
        where = f" (in {full_key})" if full_key else ""
        raise ConfigError(f"Config '{path}' has an interpolation that cannot be resolved: "
                          f"{str(err).splitlines()[0]}{where}.") from None
    return cfg


def unresolvable_key(cfg, prefix: str = "") -> str | None:
    """The first key (``a.b`` or ``a.b[0]``) of a DictConfig/ListConfig whose interpolation fails: OmegaConf
    before 2.4 does not name it in the error."""
    keys = cfg.keys() if isinstance(cfg, DictConfig) else range(len(cfg))
    for key in keys:
        path = f"{prefix}[{key}]" if isinstance(cfg, ListConfig) else f"{prefix}.{key}" if prefix else str(key)
        node = cfg._get_node(key)
        if isinstance(node, (DictConfig, ListConfig)) and not node._is_interpolation():
            found = unresolvable_key(node, path)
            if found:
                return found
            continue
        try:
            cfg[key]
        except Exception:
            return path
    return None


PATH_OPTIONS = ("dataset.root_dir", "dataset.eval_dir", "exp_dir")


def expand_home(cfg: DictConfig) -> None:
    """``~`` at the start of a path option is the home folder, as a shell has it; the shell itself leaves
    ``dataset.root_dir=~/scan24`` alone (not a variable assignment), and YAML never expands it."""
    for key in PATH_OPTIONS:
        value = _raw_value(cfg, key)
        if isinstance(value, str) and value.startswith("~"):
            OmegaConf.update(cfg, key, os.path.expanduser(value), merge=False)


def yaml_problem(err: Exception, path: str) -> str:
    """A YAML parser error in one line: what is wrong and where (PyYAML's own message spans four)."""
    mark = getattr(err, "problem_mark", None)
    if mark is None:
        return " ".join(str(err).split())
    where = f"line {mark.line + 1}, column {mark.column + 1}"
    with open(path, encoding="utf-8", errors="replace") as handle:
        lines = handle.read().splitlines()
    line = lines[mark.line] if mark.line < len(lines) else ""
    if line[mark.column:mark.column + 1] == "\t":
        return f"a tab at {where} (YAML indents with spaces)"
    return f"{getattr(err, 'problem', None) or getattr(err, 'context', None) or 'a syntax error'} at {where}"


def to_primitive(cfg: Any) -> Any:
    """DictConfig/ListConfig -> dict/list; other values unchanged."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def whole_step_counts(trainer_cfg: dict) -> dict:
    """The trainer options that count steps, as ints where the YAML wrote a float (instant-nsr-pl's
    ``max_steps: 2e5``, ``val_check_interval: 1e5``), so the progress bar reads 20/200000, not 20/200000.0.
    Lightning reads a float ``val_check_interval`` of at most 1 as a fraction of an epoch; that stays a float."""
    fixed = dict(trainer_cfg)
    for key in ("max_steps", "val_check_interval", "log_every_n_steps"):
        value = fixed.get(key)
        if isinstance(value, float) and value > 1 and value.is_integer():
            fixed[key] = int(value)
    return fixed


REQUIRED_SECTIONS = ("dataset", "model", "system")


def check_sections(config: DictConfig) -> None:
    """The top-level sections every run reads, all named at once when some are missing (a config written from
    scratch, or a fragment given to --config)."""
    missing = [key for key in REQUIRED_SECTIONS if not isinstance(config.get(key), DictConfig)]
    if missing:
        named = ", ".join(missing[:-1]) + (" and " if len(missing) > 1 else "") + missing[-1]
        raise ConfigError(f"The config has no top-level {named}, which every run needs; start from one of the "
                          "shipped configs/*.yaml, which have every section.")


def check_trainer_options(config: DictConfig) -> None:
    """The step counts in ``trainer`` and ``checkpoint``, checked at start-up: Lightning refuses some with a
    traceback (``checkpoint.save_top_k: -5``), divides by zero during training on others
    (``trainer.val_check_interval: 0``) and rounds ``max_steps: 2.5`` silently. The training stream is endless,
    so ``val_check_interval`` counts steps; Lightning's fraction of an epoch would never come."""
    trainer = whole_step_counts(dict(to_primitive(config.get("trainer")) or {}))
    checkpoint = dict(to_primitive(config.get("checkpoint")) or {})
    if isinstance(trainer.get("val_check_interval"), float) and trainer["val_check_interval"] == 1.0:
        raise ConfigError("trainer.val_check_interval=1.0 is Lightning's 'once per epoch', which never comes in "
                          "this endless training stream; give a step count (e.g. 5000), or 1 for every step.")
    for section, options, minima in (("trainer", trainer, {"max_steps": 1, "val_check_interval": 1,
                                                           "log_every_n_steps": 1}),
                                     ("checkpoint", checkpoint, {"every_n_train_steps": 0, "every_n_epochs": 0,
                                                                 "save_top_k": -1})):
        for key, minimum in minima.items():
            if options.get(key) is not None:
                number_at_least(options[key], f"{section}.{key}", minimum)


def number_at_least(value: Any, name: str, minimum: float, kind: type = int, exclusive: bool = False):
    """``value`` as ``kind`` (int or float); a ConfigError naming ``name`` when it is not a number
    >= ``minimum`` (> with ``exclusive``), so a zero or negative size fails at start-up in one
    sentence instead of as a division by zero deep in a training step."""
    try:
        number = kind(value)
        fits = number > minimum if exclusive else number >= minimum
        whole = kind is not int or float(value) == number
    except (TypeError, ValueError):
        fits = whole = False
    if not (fits and whole) or isinstance(value, bool):
        what = "a whole number" if kind is int else "a number"
        raise ConfigError(f"{name} must be {what} {'>' if exclusive else '>='} {minimum}, not {value!r}.")
    return number


def finite_number(value: Any, name: str) -> float:
    """``value`` as a float; a ConfigError naming ``name`` when it is not a finite number (a word, a list, nan)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or isinstance(value, bool):
        raise ConfigError(f"{name} must be a finite number, not {value!r}.")
    return number


def script_parser(doc: str):
    """A script's argparse parser whose ``--help`` is the script's docstring (its commands, inputs and outputs,
    as written, without the reST ``double backquotes``), then its options."""
    import argparse

    return argparse.ArgumentParser(description=doc.replace("``", ""),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def argument_at_least(minimum: float, kind: type = float, exclusive: bool = False):
    """An argparse ``type`` for a script's numeric option: ``number_at_least``'s rule, said as argparse says it
    (``argument --threshold: must be a number > 0, not -1``)."""
    import argparse

    def parse(text: str):
        try:
            value = float(text)  # 1e5 is a whole number too
        except ValueError:
            value = text
        try:
            return number_at_least(value, "it", minimum, kind, exclusive)
        except ConfigError as err:
            rule = str(err)[len("it "):].rsplit(", not ", 1)[0]
            raise argparse.ArgumentTypeError(f"{rule}, not {text}") from None

    parse.__name__ = f"{kind.__name__} {'>' if exclusive else '>='} {minimum}"
    return parse


def scheduled(value: Any, global_step: int) -> float:
    """Value of a possibly scheduled scalar at ``global_step``.

    A scalar is returned as is; ``[start_step, start_value, end_value, end_step]``
    (or ``[start_value, end_value, end_step]``, starting at step 0) is linearly
    interpolated and held constant outside the step range.
    """
    value = to_primitive(value)
    if isinstance(value, (int, float)):
        return float(value)
    if (not isinstance(value, (list, tuple)) or len(value) not in (3, 4)
            or not all(isinstance(v, (int, float)) for v in value)):
        raise ConfigError(
            f"Scheduled value {value!r} must be a number or [start_step, start_value, end_value, end_step]."
        )
    if len(value) == 3:
        value = [0, *value]
    start_step, start_value, end_value, end_step = value
    if end_step <= start_step:
        return float(end_value if global_step >= end_step else start_value)
    if global_step <= start_step:  # not interpolated: an end value of inf or nan must not leak in before its time
        return float(start_value)
    if global_step >= end_step:
        return float(end_value)
    t = (global_step - start_step) / (end_step - start_step)
    return float(start_value + (end_value - start_value) * t)


def schedule_values(value: Any) -> tuple:
    """The values a possibly scheduled scalar goes between: (value,) for a number, (start_value, end_value)
    for a schedule; a ConfigError for anything else."""
    scheduled(value, 0)  # checks the form
    value = to_primitive(value)
    if isinstance(value, (list, tuple)):
        return (float(value[1]), float(value[2])) if len(value) == 4 else (float(value[0]), float(value[1]))
    return (float(value),)


def peak(value: Any) -> float:
    """Largest value a possibly scheduled scalar takes (0 for a weight that is never on)."""
    return max(schedule_values(value))
