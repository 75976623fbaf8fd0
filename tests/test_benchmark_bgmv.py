"""The "bgmv" benchmark family on the CPU, at a tiny size."""
import pytest

from lora_ext import benchmark as harness
from lora_ext.benchmark.bgmv import row_adapter_names

pytest.importorskip("peft")
pytest.importorskip("transformers")


def test_presets_match_the_spec():
    family = harness.get_family("bgmv")
    quick = family.cases("quick")
    assert {c.in_features for c in quick} == {512}
    assert {dict(c.extra)["rows"] for c in quick} == {64}
    assert {dict(c.extra)["adapters"] for c in quick} == {1, 16, 64}
    assert {dict(c.extra)["seq"] for c in quick} == {1}
    full = family.cases("full")
    assert {dict(c.extra)["rows"] for c in full} == {16, 32, 64}
    assert {dict(c.extra)["seq"] for c in full} == {1, 32, 128}
    assert all(c.r == 16 and dict(c.extra)["layers"] == 4 for c in quick)
    assert len({c.id for c in quick}) == len(quick)


def test_row_names_mix_adapters_and_base_rows():
    names = row_adapter_names(64, 16)
    assert names.count("__base__") == 4 and len(set(names) - {"__base__"}) == 16
    assert row_adapter_names(64, 64) == [f"a{i}" for i in range(64)]


def test_every_contestant_runs_and_agrees_with_peft():
    family = harness.get_family("bgmv")
    cases = family.make_cases(features=64, tokens=6, adapters=3, seqs=(1, 4), layers=1, ranks=4)
    doc = harness.run_benchmark(family, cases, "cpu", repeats=2, warmup=1, progress=False)
    for res in doc["results"]:
        assert set(res["measurements"]) == {"base", "peft", "lora_ext", "single"}, res["skipped"]
        assert all(c["ok"] for c in res["check"].values()), res["check"]
        assert set(res["check"]) == {"base", "peft", "lora_ext", "single"}
        assert res["ratios"]["peft/ours (speedup)"] > 0
