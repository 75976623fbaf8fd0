"""The "nf4" benchmark family on the CPU, at a tiny size."""
import pytest

from lora_ext import benchmark as harness

pytest.importorskip("bitsandbytes")


def test_presets_match_the_spec():
    family = harness.get_family("nf4")
    full = family.cases("full")
    matmuls = [c for c in full if dict(c.extra)["op"] == "matmul"]
    assert {(c.in_features, c.out_features) for c in full} == {(4096, 4096), (4096, 11008)}
    assert {c.tokens for c in matmuls} == {1, 4, 8, 16, 64, 256, 2048}
    assert {c.dtype for c in matmuls} == {"float32", "bfloat16"}
    assert sum(dict(c.extra)["op"] == "dequant" for c in full) == 4
    assert sum(dict(c.extra)["op"] == "absmax" for c in full) == 2
    assert len({c.id for c in full}) == len(full)
    assert len(family.cases("quick")) < len(full)


def test_every_contestant_runs_and_agrees():
    family = harness.get_family("nf4")
    cases = family.cases("quick", features=("128x96",), tokens=(1, 20))
    doc = harness.run_benchmark(family, cases, "cpu", repeats=2, warmup=1, progress=False)
    assert len(doc["results"]) == 4
    for res in doc["results"]:
        op = res["case"]["extra"]["op"]
        assert {"lora_ext", "bnb"} <= set(res["measurements"]), res["skipped"]
        if op == "matmul":
            assert "dense" in res["measurements"] and "fill" in res["skipped"]
        else:
            assert "dense" in res["skipped"] and "fill" in res["measurements"]
            assert res["ratios"]["ours/fill"] > 0
        assert all(c["ok"] for c in res["check"].values()), res["check"]
        assert {"lora_ext", "bnb"} <= set(res["check"])
        assert res["ratios"]["ours/bnb"] > 0
