"""PiSSA / OLoRA adapters saved as plain LoRA adapters for the original base, as PEFT documents:

    model = get_peft_model(base, LoraConfig(init_lora_weights="pissa", ...))
    model.peft_config["default"].init_lora_weights = True
    model.save_pretrained("init")                                    # before training
    ...train...
    model.save_pretrained("out", path_initial_model_for_weight_conversion="init")

"out" holds A' = cat[A, A0], B' = cat[B, -B0], r' = 2r, alpha' = 2 alpha, which on the
unmodified base computes what the trained PiSSA model computes. Checked against PEFT's own
conversion of the same weights, and against the PiSSA model's outputs.
"""
import copy
import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file

import lora_ext
from lora_testing import assert_within_torch_error
from peft_twins import BASES, DEFAULT_TARGETS, double_inputs, inputs, run, saved_config


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def train_a_little(model, seed=11):
    """Stand-in for training: the same deterministic change of every A and B in both libraries."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05 * p.abs().mean())


def pissa_pair(kind, init, tmp_path, **config):
    """(ours, theirs) PiSSA/OLoRA models, initial folders saved, then "trained" identically."""
    config = dict(r=4, lora_alpha=8, target_modules=DEFAULT_TARGETS[kind], init_lora_weights=init, **config)
    models = []
    for lib, name in ((lora_ext, "ours"), (peft, "peft")):
        model = lib.get_peft_model(BASES[kind](), lib.LoraConfig(**copy.deepcopy(config)))
        model.peft_config["default"].init_lora_weights = True
        model.save_pretrained(tmp_path / name / "init")
        train_a_little(model)
        models.append(model)
    return models


def save_converted(model, folder):
    model.save_pretrained(folder / "converted", path_initial_model_for_weight_conversion=str(folder / "init"))
    return folder / "converted"


CASES = [("llama", "pissa", {}), ("llama", "olora", {}), ("gpt2", "pissa", {}), ("llama", "pissa_niter_4", {}),
         ("llama", "pissa", {"use_rslora": True}),
         ("llama", "pissa", {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 3}})]


@pytest.mark.parametrize("kind,init,extra", CASES)
def test_converted_adapter_equals_peft_conversion(kind, init, extra, tmp_path):
    ours, theirs = pissa_pair(kind, init, tmp_path, **extra)
    # the initialisations agree first (else nothing below could)
    for (n, p), (n_t, p_t) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert n == n_t
        torch.testing.assert_close(p, p_t, rtol=1e-5, atol=1e-5, msg=n)
    mine, peft_dir = save_converted(ours, tmp_path / "ours"), save_converted(theirs, tmp_path / "peft")
    a, b = load_file(mine / "adapter_model.safetensors"), load_file(peft_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape, key
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5, msg=key)
    c_ours, c_peft = saved_config(mine), saved_config(peft_dir)
    c_ours.pop("peft_version"), c_peft.pop("peft_version")
    assert c_ours == c_peft
    assert c_ours["r"] == 8 and c_ours["init_lora_weights"] is True
    assert c_ours["lora_alpha"] == pytest.approx(8 * 2 ** 0.5 if extra.get("use_rslora") else 16)
    assert c_ours["rank_pattern"] == {k: 2 * v for k, v in extra.get("rank_pattern", {}).items()}
    assert c_ours["alpha_pattern"] == {k: 2 * v for k, v in extra.get("alpha_pattern", {}).items()}
    # as PEFT, the initial folder's config now says init_lora_weights=True; the model's config is untouched
    init_configs = [json.loads((tmp_path / n / "init" / "adapter_config.json").read_text()) for n in ("ours", "peft")]
    assert init_configs[0]["init_lora_weights"] is init_configs[1]["init_lora_weights"] is True
    assert ours.peft_config["default"].r == 4 and list(ours.peft_config) == ["default"]


@pytest.mark.parametrize("kind,init,extra", CASES)
def test_converted_adapter_on_the_original_base_equals_the_trained_model(kind, init, extra, tmp_path):
    ours, theirs = pissa_pair(kind, init, tmp_path, **extra)
    mine, peft_dir = save_converted(ours, tmp_path / "ours"), save_converted(theirs, tmp_path / "peft")
    ours.eval()
    x = inputs(kind)
    oracle, _ = run(copy.deepcopy(ours).double(), double_inputs(x))
    plain_ours = lora_ext.PeftModel.from_pretrained(BASES[kind](), mine).eval()
    plain_peft = peft.PeftModel.from_pretrained(BASES[kind](), peft_dir).eval()
    assert_within_torch_error(run(plain_ours, x)[0], run(plain_peft, x)[0], oracle, what="converted")
    # the file we wrote works in PEFT too, and PEFT's in lora-ext
    peft_reads_ours = peft.PeftModel.from_pretrained(BASES[kind](), mine).eval()
    ours_reads_peft = lora_ext.PeftModel.from_pretrained(BASES[kind](), peft_dir).eval()
    assert_within_torch_error(run(peft_reads_ours, x)[0], run(plain_peft, x)[0], oracle, what="PEFT reads ours")
    assert_within_torch_error(run(ours_reads_peft, x)[0], run(plain_peft, x)[0], oracle, what="ours reads PEFT")
    # and the base model is the original one (the conversion put nothing into it)
    with plain_ours.disable_adapter():
        assert torch.equal(run(plain_ours, x)[0], run(BASES[kind]().eval(), x)[0])


def test_legacy_convert_pissa_to_lora_argument(tmp_path):
    ours, _ = pissa_pair("llama", "pissa", tmp_path)
    with pytest.warns(FutureWarning, match="path_initial_model_for_weight_conversion"):
        warnings.simplefilter("always")
        ours.save_pretrained(tmp_path / "legacy", convert_pissa_to_lora=str(tmp_path / "ours" / "init"))
    modern = save_converted(ours, tmp_path / "ours")
    a, b = load_file(tmp_path / "legacy" / "adapter_model.safetensors"), load_file(modern / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rslora_with_patterns_is_refused_as_peft(tmp_path):
    extra = dict(use_rslora=True, rank_pattern={"q_proj": 2})
    ours, theirs = pissa_pair("llama", "pissa", tmp_path, **extra)
    for model, name in ((ours, "ours"), (theirs, "peft")):
        with pytest.raises(ValueError, match="not supported when using `rank_pattern` or `alpha_pattern`"):
            save_converted(model, tmp_path / name)


def test_initial_folder_that_is_not_an_adapter(tmp_path):
    ours, _ = pissa_pair("llama", "pissa", tmp_path)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="not a LoRA adapter"):
        ours.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=str(tmp_path / "nothing"))
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_initial_folder_of_another_rank(tmp_path):
    ours, _ = pissa_pair("llama", "pissa", tmp_path)
    other = lora_ext.get_peft_model(BASES["llama"](), lora_ext.LoraConfig(r=2, target_modules=DEFAULT_TARGETS["llama"]))
    other.save_pretrained(tmp_path / "r2")
    with pytest.raises(ValueError, match=r"shape \(2, 64\).*\(4, 64\)"):
        ours.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=str(tmp_path / "r2"))
