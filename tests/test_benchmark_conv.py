"""The "conv" benchmark family on the CPU, at a tiny size."""
import pytest

from lora_ext import benchmark as harness

pytest.importorskip("peft")


def test_quick_preset():
    cases = harness.get_family("conv").cases("quick")
    assert {(c.in_features, c.out_features, c.tokens, c.r, dict(c.extra)["mode"]) for c in cases} == {
        (320, 320, 32, 16, "infer"), (320, 320, 32, 16, "train")}
    assert all(c.family == "conv" and c.dropout == 0.0 for c in cases)


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_every_contestant_runs_and_computes_the_same_function(mode):
    family = harness.get_family("conv")
    cases = family.cases("quick", features="6x5", tokens=7, ranks=2, modes=mode)
    doc = harness.run_benchmark(family, cases, "cpu", repeats=2, warmup=1, progress=False)
    (res,) = doc["results"]
    assert set(res["measurements"]) == set(family.default_contestants), res["skipped"]
    assert set(res["check"]) == {"base", "peft", "lora_ext"}
    assert all(c["ok"] for c in res["check"].values()), res["check"]
    assert res["ratios"]["peft/ours (speedup)"] > 0
