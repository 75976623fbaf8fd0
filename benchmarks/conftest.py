"""Options and fixtures of the pytest-benchmark suites (`pytest benchmarks/ --benchmark-only`).

Cases, inputs and contestants all come from lora_ext.benchmark, the harness behind
`lora-ext bench`: this directory holds no second copy of them.
"""
import pytest
import torch


def pytest_addoption(parser):
    group = parser.getgroup("lora-ext benchmarks")
    group.addoption("--lora-device", choices=["cpu", "cuda"], default=None,
                    help="device to benchmark on (default: cuda if available, else cpu)")
    group.addoption("--lora-size", choices=["quick", "full"], default="quick",
                    help="case grid of the harness preset (default: quick)")
    group.addoption("--lora-warmup", type=int, default=2,
                    help="untimed calls of each contestant before pytest-benchmark times it")


@pytest.fixture(scope="session")
def bench_device(request) -> torch.device:
    name = request.config.getoption("--lora-device") or (
        "cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("--lora-device cuda but no CUDA device is visible")
    return torch.device(name)
