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


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs (minutes); run in CI too")
