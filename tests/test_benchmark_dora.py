"""The "dora" benchmark family on the CPU, at a tiny size."""
import pytest

from lora_ext import benchmark as harness

pytest.importorskip("peft")


def test_quick_preset():
    family = harness.get_family("dora")
    cases = family.cases("quick")
    assert {(c.in_features, c.tokens, c.r) for c in cases} == {(1024, 512, 16), (2048, 512, 16)}
    assert {c.dropout for c in cases} == {0.0, 0.05}
    assert all(c.family == "dora" and c.id.startswith("dora-") for c in cases)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_every_contestant_runs_and_computes_the_same_function(dropout):
    family = harness.get_family("dora")
    cases = family.cases("quick", features="48x40", tokens=24, ranks=4, dropouts=dropout)
    doc = harness.run_benchmark(family, cases, "cpu", repeats=2, warmup=1, progress=False)
    (res,) = doc["results"]
    assert set(res["measurements"]) == set(family.default_contestants), res["skipped"]
    if dropout == 0.0:  # outputs are comparable only without dropout (masks differ)
        layer_contestants = {"base", "peft_lora", "peft_dora", "lora_ext", "lora_ext_dora"}
        assert set(res["check"]) == layer_contestants
        assert all(c["ok"] for c in res["check"].values()), res["check"]
    for column in ("oursD/oursL", "peftD/oursD (speedup)", "normT/norm", "readW/norm (bw frac)"):
        assert res["ratios"][column] > 0
    assert res["info"]["norm"]["weight_bytes"] == 48 * 40 * 4
