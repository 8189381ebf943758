import os
import sys

import pytest
import torch

# Triton kernels run under Triton's CPU interpreter when there is no GPU. Set before anything imports triton
# (it decides per kernel at decoration time); 'auto' backends never pick the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/helpers.py


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _session_demo_folder(tmp_path_factory):
    """The demo scenes the tests train on render once per session into pytest's temporary folder
    (``helpers.demo_root``), not into the checkout's load/."""
    import helpers

    helpers.DEMO_DATA = str(tmp_path_factory.mktemp("demo-data"))


# The suite writes only under pytest's temporary folder: a test that wrote into the checkout (a demo render into
# load/, a trial into exp/) fails the run, named by what it left. Watched: new entries at the checkout's top level
# and in exp/ and runs/ (not what a run of yours adds meanwhile inside an existing exp/<name>/), and new or
# rewritten ones in load/ (a demo render replaces its folder).
WATCHED = ("", "load", "exp", "runs")
LEFT_BY_PYTHON = {"__pycache__", ".pytest_cache"}


def checkout_state() -> dict:
    state = {}
    for folder in WATCHED:
        path = os.path.join(ROOT, folder)
        if os.path.isdir(path):
            for name in set(os.listdir(path)) - LEFT_BY_PYTHON:
                entry = os.path.join(folder, name)
                state[entry] = os.stat(os.path.join(ROOT, entry)).st_mtime_ns if folder == "load" else None
    return state


def pytest_sessionstart(session):
    session.config.checkout_before = checkout_state()


def pytest_sessionfinish(session, exitstatus):
    before = getattr(session.config, "checkout_before", None)
    if before is None or session.config.option.collectonly:
        return
    after = checkout_state()
    changed = sorted(name for name in after if before.get(name, "new") != after[name])
    if changed:
        print(f"\nThe tests wrote into the checkout: {', '.join(changed)}. A test's outputs belong under pytest's "
              "tmp_path (dataset.root_dir=helpers.demo_root(...), --exp_dir/--runs_dir).", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs (minutes); run in CI too")
