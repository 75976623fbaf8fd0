"""Shared pytest configuration: markers, GPU auto-skip, fixed seeds."""
import random

import pytest
import torch

SEED = 1234


def pytest_configure(config):
    # Also declared in pyproject.toml; registered here so the suite runs from any rootdir.
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running (deselect with -m 'not slow')")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def fixed_seed():
    """Every test starts from the same global RNG state; returns the seed used."""
    random.seed(SEED)
    torch.manual_seed(SEED)
    return SEED
