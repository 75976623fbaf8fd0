"""The "llama_train" benchmark family on the CPU, at a tiny size."""
import pytest

import lora_ext
from lora_ext import benchmark as harness

pytest.importorskip("peft")
pytest.importorskip("transformers")


def test_presets_match_the_spec():
    family = harness.get_family("llama_train")
    plain, amp = family.cases("quick")
    for quick in (plain, amp):
        assert (quick.in_features, quick.tokens, quick.r, quick.dropout) == (256, 512, 16, 0.05)
    assert dict(plain.extra) == {"layers": 2, "batch": 4}
    # Trainer(bf16=True): an fp32 model trained under bf16 autocast with fp32 adapters
    assert dict(amp.extra) == {"layers": 2, "batch": 4, "autocast": "bf16"}
    assert plain.dtype == amp.dtype == "float32"
    full = family.cases("full")
    assert {c.in_features for c in full} == {512, 1024}
    assert all(dict(c.extra)["layers"] == 4 for c in full)
    assert len({c.id for c in full}) == len(full)


def test_tokens_must_split_into_the_batch():
    with pytest.raises(ValueError, match="multiple of the batch"):
        harness.get_family("llama_train").cases("quick", tokens=30)


def test_training_step_runs_for_every_available_contestant():
    family = harness.get_family("llama_train")
    cases = family.cases("quick", features=64, tokens=32)
    doc = harness.run_benchmark(family, cases, "cpu", repeats=2, warmup=1, progress=False)
    plain, amp = doc["results"]
    assert amp["info"]["peft"]["adapter_dtypes"] == amp["info"]["lora_ext"]["adapter_dtypes"] == ["float32"]
    for res in (plain, amp):
        _check_result(res)


def _check_result(res):
    measured = {"base", "peft", "peft_accelerated"}
    if hasattr(lora_ext, "get_peft_model"):
        measured.add("lora_ext")
    else:  # the hook reports why, and no timing is made up
        assert "no get_peft_model" in res["skipped"]["lora_ext"]
    assert set(res["measurements"]) == measured, res["skipped"]
    assert all(m["n"] == 2 and min(m["samples_ms"]) > 0 for m in res["measurements"].values())
    assert res["info"]["peft_accelerated"]["accelerated_layers"] == 14
    assert res["info"]["peft"]["trainable_parameters"] == \
        res["info"]["peft_accelerated"]["trainable_parameters"] > 0
    assert set(res["check"]) == measured and all(c["ok"] for c in res["check"].values())
    assert res["ratios"]["peft/accel (speedup)"] > 0
