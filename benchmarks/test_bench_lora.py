"""pytest-benchmark suite of the "lora" family: every case of the preset x every contestant.

    pytest benchmarks/ --benchmark-only                      # quick grid, cuda if available
    pytest benchmarks/ --benchmark-only --lora-device cpu --lora-size full

Each test times one contestant's step (forward + backward) on one case; tests of a case
share one benchmark group, so pytest-benchmark prints the contestants side by side.
"""
import pytest

from lora_ext import benchmark as harness

FAMILY = harness.get_family("lora")


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = FAMILY.cases(metafunc.config.getoption("--lora-size"))
        # module scope: the inputs of a case are built once and shared by its contestants
        metafunc.parametrize("case", cases, ids=[c.id for c in cases], indirect=True,
                             scope="module")
    if "contestant" in metafunc.fixturenames:
        names = list(FAMILY.default_contestants)
        metafunc.parametrize("contestant", names, ids=names)


@pytest.fixture(scope="module")
def case(request):
    return request.param


@pytest.fixture(scope="module")
def inputs(case, bench_device):
    return FAMILY.make_inputs(case, bench_device)


def test_lora(benchmark, case, contestant, inputs, bench_device, request):
    try:
        runner = harness.build_runner(FAMILY, contestant, case, inputs, bench_device)
    except harness.Unavailable as why:
        pytest.skip(str(why))
    step = harness.synchronized(runner.step, bench_device)
    for _ in range(request.config.getoption("--lora-warmup")):
        step()
    benchmark.group = case.id
    benchmark.name = contestant
    benchmark.extra_info.update(case.as_dict(), contestant=contestant, device=str(bench_device))
    benchmark(step)
