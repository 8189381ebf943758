"""Name the YAML keys nothing reads: a misspelt setting (``n_level: 8``) is otherwise silently ignored.

OmegaConf accepts any key in a YAML file, and components read their settings with defaults
(``config.get("n_levels", 16)``), so a typo trains with the default and nobody is told. CLI
overrides are checked against the YAML (``utils.config.apply_overrides``); this module checks the
YAML itself, and keys added with ``+key=value``.

A key counts as read when its name occurs in the source of the code that reads its section (as a
string constant, an attribute or a parameter name: ``SECTION_READERS``; the whole framework for the
top-level keys) or when an interpolation refers to it (instant-nsr-pl's ``${system.constant_steps}``).
So ``dataset.near_plane`` (instant-nsr-pl's Blender configs carry it, and nothing there reads it either)
is named although the NeRF model reads a ``model.near_plane``. The dataset section is read by the loader
``dataset.name`` registers and the dataset modules it imports: ``up_est_method`` in a ``dtu`` config is
named as the colmap loader's. Likewise the model section's own keys are read by the model ``model.name``
registers and the modules it imports: ``cos_anneal_end`` in a ``nerf`` config is named as the neus model's,
and ``model.feature_dim`` as read under ``model.geometry``. NeuS imports the NeRF model (its background), so
a NeRF-only key in a NeuS config stays quiet. This still errs on the quiet side: a misspelling that happens
to be another name used in the same code is not caught. Sections that a library checks itself are skipped:
``trainer`` and ``checkpoint`` (Lightning's Trainer and ModelCheckpoint take them as keyword arguments),
any ``args`` (torch optimiser and scheduler arguments), ``system.optimizer.params`` (``systems.optim``
checks the group options against the optimiser), and ``system.loss.lambda_*`` (the system warns about
losses it does not have).
"""
from __future__ import annotations

import ast
import difflib
import functools
import glob
import os
import re
from typing import Any, FrozenSet, Iterable, List, Optional, Tuple

from omegaconf import DictConfig, ListConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE_PACKAGES = ("datasets", "models", "systems", "utils")
SKIPPED_SECTIONS = ("trainer", "checkpoint", "system.optimizer.params")
_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][\w.]*)\s*[},]")  # ${a.b} and the a.b inside ${sub:${a.b},...}


@functools.lru_cache(maxsize=None)
def _names_in_source(path: str) -> FrozenSet[str]:
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read(), filename=path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier():
            names.add(node.value)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, (ast.arg, ast.keyword)) and node.arg:
            names.add(node.arg)
    return frozenset(names)


# the code that reads each section's keys (``launch`` is launch.py), its own package first: the datasets never
# see the model's section, while the systems read the model's ray sampling options and the dataset's apply_mask
SECTION_READERS = {
    "dataset": ("datasets", "launch", "systems", "utils"),
    "model": ("models", "systems", "utils"),
    "system": ("systems", "launch", "utils"),
    "export": ("systems", "models", "utils"),
}


@functools.lru_cache(maxsize=None)
def known_names(readers: Tuple[str, ...] = ("launch",) + SOURCE_PACKAGES) -> FrozenSet[str]:
    """Every key name the ``readers`` can read, from their source (not from the shipped configs: those are
    checked against it, so a key they carry that nothing reads is found too). A reader is a package, ``launch``
    (launch.py) or a module file (``datasets/dtu.py``); all of the framework by default."""
    names = set()
    for reader in readers:
        if reader.endswith(".py"):
            paths = [os.path.join(ROOT, reader)]
        elif reader == "launch":
            paths = [os.path.join(ROOT, "launch.py")]
        else:
            paths = glob.glob(os.path.join(ROOT, reader, "*.py"))
        for path in paths:
            if os.path.abspath(path) != os.path.abspath(__file__):  # its hints name keys nothing reads
                names |= _names_in_source(path)
    return frozenset(names)


@functools.lru_cache(maxsize=None)
def registered_modules(package: str) -> Tuple[Tuple[str, str], ...]:
    """((registry name, module file relative to the root), ...) of ``@<package>.register("name")`` in a package."""
    found = []
    for path in sorted(glob.glob(os.path.join(ROOT, package, "*.py"))):
        with open(path, encoding="utf-8") as handle:
            tree = ast.parse(handle.read(), filename=path)
        for node in ast.walk(tree):
            for decorator in getattr(node, "decorator_list", []):
                if (isinstance(decorator, ast.Call) and isinstance(decorator.func, ast.Attribute)
                        and decorator.func.attr == "register" and decorator.args
                        and isinstance(decorator.args[0], ast.Constant)):
                    found.append((str(decorator.args[0].value), os.path.relpath(path, ROOT)))
    return tuple(found)


@functools.lru_cache(maxsize=None)
def _package_imports(module: str) -> FrozenSet[str]:
    """The modules of ``module``'s own package that it imports (files relative to the root)."""
    package = os.path.dirname(module)
    with open(os.path.join(ROOT, module), encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == package:  # from datasets import dtu
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(package + "."):
            names.add(node.module.split(".", 1)[1])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".", 1)[1] for a in node.names if a.name.startswith(package + "."))
    paths = {os.path.join(package, name + ".py") for name in names}
    return frozenset(p for p in paths if os.path.isfile(os.path.join(ROOT, p)))


def _import_closure(module: str) -> set:
    """``module`` and the modules of its package it imports, transitively."""
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(_package_imports(current))
    return seen


# the sections whose code is chosen by their ``name`` key: the registry package that holds it
REGISTRY_OF_SECTION = {"dataset": "datasets", "model": "models"}


@functools.lru_cache(maxsize=None)
def registered_readers(section: str, name: str) -> Optional[Tuple[str, ...]]:
    """The code that reads ``section`` (dataset or model) when its ``name`` is ``name``: the module registering
    that name and the modules of its package it imports (transitively), then the section's other readers
    (launch.py, the systems, utils); None for a name nothing registers."""
    module = dict(registered_modules(REGISTRY_OF_SECTION[section])).get(name)
    if module is None:
        return None
    return tuple(sorted(_import_closure(module))) + SECTION_READERS[section][1:]


def _registered_owners(section: str, key: str) -> List[str]:
    """The registered names (loaders, models) whose own code reads a key called ``key``: their modules, less what
    they borrow from another registered module (the blender loader imports the colmap loader's pose helpers, not
    its options; NeuS imports the NeRF model for its background)."""
    modules = dict(registered_modules(REGISTRY_OF_SECTION[section]))
    owners = []
    for name, module in modules.items():
        own = _import_closure(module)
        for other in own & (set(modules.values()) - {module}):
            own -= _import_closure(other)
        if key in known_names(tuple(sorted(own))):
            owners.append(name)
    return owners


def _read_elsewhere(name: str, section: str) -> List[str]:
    """The other sections whose own package (``datasets`` for ``dataset``, ...) reads a key called ``name``."""
    return [other for other, readers in SECTION_READERS.items()
            if other != section and name in known_names(readers[:1])]


def _referenced_keys(cfg: Any) -> set:
    """Dotted keys that an interpolation anywhere in the raw (unresolved) config refers to."""
    found = set()
    if isinstance(cfg, (DictConfig, ListConfig)):
        keys = cfg.keys() if isinstance(cfg, DictConfig) else range(len(cfg))
        for key in keys:
            found |= _referenced_keys(cfg._get_node(key))
    else:
        value = cfg._value()
        if isinstance(value, str):
            found.update(_INTERPOLATION.findall(value))
    return found


def _plain_value(cfg: DictConfig, *keys: str) -> Optional[str]:
    """The string at ``keys`` in the raw config when it is written out (not an interpolation); else None."""
    node = cfg
    for key in keys:
        if not isinstance(node, DictConfig) or key not in node:
            return None
        node = node._get_node(key)
    value = node._value() if not isinstance(node, (DictConfig, ListConfig)) else None
    return value if isinstance(value, str) and "${" not in value else None


def _skipped(path: str) -> bool:
    parts = path.split(".")
    return ("args" in parts or parts[-1].startswith("lambda_") and path.startswith("system.loss.")
            or any(path == s or path.startswith(s + ".") for s in SKIPPED_SECTIONS))


def keys_interpolated_in(path: str) -> set:
    """Dotted keys that an interpolation in the YAML file at ``path`` refers to (a trial's raw.yaml: its
    parsed.yaml has them resolved, so a key read only through them would look unread there). A file that cannot
    be read adds none: the check then names such keys, as it did before raw.yaml was consulted."""
    from omegaconf import OmegaConf

    try:
        return _referenced_keys(OmegaConf.load(path))
    except Exception:  # a hand-edited raw.yaml that is no longer YAML: the run itself reads parsed.yaml only
        return set()


def unread_keys(raw_config: DictConfig, also_referenced: Iterable[str] = ()) -> List[Tuple[str, Optional[str]]]:
    """``(dotted key, hint or None)`` for each key of ``raw_config`` (the config before interpolations are
    resolved) that nothing reads; the hint names the closest known name ("did you mean n_levels?") or the
    sections that read that name. A key whose name is unknown is reported, and its contents are not
    looked into. Keys in ``also_referenced`` count as read (interpolations of the config it was resolved from)."""
    referenced = _referenced_keys(raw_config) | set(also_referenced)
    found: List[Tuple[str, Optional[str]]] = []
    # the dataset section, and the model section's own keys (not its geometry's or texture's), are read by the
    # code their ``name`` registers
    chosen = {section: _plain_value(raw_config, section, "name") for section in REGISTRY_OF_SECTION}
    own_readers = {section: registered_readers(section, name) for section, name in chosen.items()
                   if name is not None and registered_readers(section, name) is not None}

    def readers_of(prefix: str, section: str) -> Optional[Tuple[str, ...]]:
        if section in own_readers and (section == "dataset" or prefix == section):
            return own_readers[section]
        return SECTION_READERS.get(section)

    # the subsections naming a registered class (model.geometry: volume-sdf), for keys written a level too high
    named_in = {}  # registered name -> the model subsections naming it
    if isinstance(raw_config.get("model"), DictConfig):
        for key in raw_config.model.keys():
            name = _plain_value(raw_config, "model", key, "name")
            if name is not None:
                named_in.setdefault(name, []).append(f"model.{key}")

    def hint_for(key: str, section: str, known: FrozenSet[str], by_name: bool) -> Optional[str]:
        """``by_name``: ``known`` is what the code that ``section.name`` registers reads."""
        owners = _registered_owners(section, key) if by_name else []
        elsewhere = _read_elsewhere(key, section)
        # loaders are never named under model, so only a model section's owners can be found here
        subsections = [path for name, paths in named_in.items() if name in owners for path in paths]
        if subsections:
            return f"read under {' or '.join(subsections)}, not model"
        if owners and (section == "model" or not elsewhere):  # a model's option may share a name with a system's
            kind = {"dataset": "loader", "model": "model"}[section]
            return f"an option of the {' and '.join(owners)} {kind}, not {chosen[section]}"
        if elsewhere:
            return f"read under {' or '.join(elsewhere)}, not {section}"
        if key in UPSTREAM_OPTIONS:
            return None
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.8)
        return f"did you mean {close[0]}?" if close else None

    def visit(node: DictConfig, prefix: str) -> None:
        section = prefix.split(".", 1)[0]
        readers = readers_of(prefix, section)
        known = known_names(readers) if readers is not None else known_names()
        by_name = section in own_readers and readers is own_readers[section]
        for key in node.keys():
            path = f"{prefix}.{key}" if prefix else str(key)
            if _skipped(path):
                continue
            if str(key) not in known and path not in referenced:
                found.append((path, hint_for(str(key), section, known, by_name)))
                continue
            child = node._get_node(key)
            if isinstance(child, DictConfig):
                visit(child, path)
            elif isinstance(child, ListConfig):  # e.g. the scheduler list of SequentialLR
                for i in range(len(child)):
                    if isinstance(child._get_node(i), DictConfig):
                        visit(child._get_node(i), f"{path}.{i}")

    visit(raw_config, "")
    return found


# instant-nsr-pl options this framework does not implement: named as such, never "did you mean" another key
UPSTREAM_OPTIONS = frozenset({
    "sdf2weight", "geometric_bias_remove", "max_imgs", "use_distortion", "unwarp_rays", "use_appearance_embedding",
    "use_average_appearance_embedding", "appearance_embedding_dim", "use_pixel_centers", "load_data_on_gpu",
    "curvature_warmup_steps",
})
# those whose effect a user should carry over by other means
APPEARANCE_HINT = "for images of changing exposure: model.exposure_correction: true, a gain and offset per image"
UPSTREAM_HINTS = {
    "curvature_warmup_steps": "write the warm-up into the weight: lambda_curvature: [0, 0.0, weight, steps]",
    "use_appearance_embedding": APPEARANCE_HINT,
    "use_average_appearance_embedding": APPEARANCE_HINT,
    "appearance_embedding_dim": APPEARANCE_HINT,
}


def describe(unread: List[Tuple[str, Optional[str]]]) -> str:
    """Names the keys nothing reads, each with its likely intended name or a hint: one sentence for unknown keys
    (typos, most likely) and one for instant-nsr-pl's options this framework does not implement."""
    unknown, upstream = [], []
    for path, hint in unread:
        name = path.rsplit(".", 1)[-1]
        hint = UPSTREAM_HINTS.get(name) or hint
        (upstream if name in UPSTREAM_OPTIONS else unknown).append(f"{path} ({hint})" if hint else path)
    sentences = []
    if unknown:
        sentences.append(f"Config keys that nothing in this framework reads, so they have no effect: "
                         f"{', '.join(unknown)}.")
    if upstream:
        sentences.append(f"instant-nsr-pl options this framework does not implement, {'also ' if unknown else ''}"
                         f"without effect: {', '.join(upstream)}.")
    return " ".join(sentences)
