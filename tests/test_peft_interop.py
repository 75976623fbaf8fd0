"""Adapters move between the real PEFT and lora-ext, both directions, with the same numbers.

For a tiny Llama (nn.Linear), a tiny GPT-2 (transformers' Conv1D, fan_in_fan_out) and a
model with nn.Embedding and nn.Conv2d targets: a PEFT-saved adapter loads in lora-ext and
the reverse, with identical safetensors keys and values, equal adapter_config.json fields,
equal outputs and gradients (tolerance rule, dropout 0), equal trainable-parameter counts,
and equal merged models and weighted combinations.
"""
import copy
import warnings

import peft
import pytest
import torch

import lora_ext
from lora_testing import assert_within_torch_error
from peft_twins import (BASES, DEFAULT_TARGETS, assert_same_counts, assert_same_files, assert_same_numbers,
                        assert_same_state, inputs, ours_twin, peft_twin, randomize_adapters, run)

KINDS = ["llama", "gpt2", "embconv"]


def folders(path):
    """What save_pretrained wrote (both write the model card README.md, as PEFT)."""
    return sorted(p.name for p in path.iterdir())


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out and similar notices, in both libraries
        yield


# ================================================================ both directions


@pytest.mark.parametrize("kind", KINDS)
def test_peft_saved_adapter_loads_in_lora_ext(kind, tmp_path):
    ours, theirs, path = peft_twin(kind, tmp_path)
    ours.save_pretrained(tmp_path / "resaved")
    assert_same_files(tmp_path / "resaved", path)
    assert_same_counts(ours, theirs)
    ours.eval(), theirs.eval()
    assert_same_numbers(ours, theirs, inputs(kind), what=f"{kind} eval")
    ours.train(), theirs.train()
    assert_same_numbers(ours, theirs, inputs(kind), grads=True, what=f"{kind} train")


@pytest.mark.parametrize("kind", KINDS)
def test_lora_ext_saved_adapter_loads_in_peft(kind, tmp_path):
    ours, theirs, path = ours_twin(kind, tmp_path)
    theirs.save_pretrained(tmp_path / "resaved")
    assert_same_files(path, tmp_path / "resaved")
    assert_same_counts(ours, theirs)
    ours.eval(), theirs.eval()
    assert_same_numbers(ours, theirs, inputs(kind), what=f"{kind} eval")
    ours.train(), theirs.train()
    assert_same_numbers(ours, theirs, inputs(kind), grads=True, what=f"{kind} train")


@pytest.mark.parametrize("kind", KINDS)
def test_new_adapters_have_peft_keys_values_and_counts(kind, tmp_path):
    """Same seed, same config: the freshly initialised adapters equal PEFT's to the bit."""
    cfg = dict(r=4, lora_alpha=8, target_modules=DEFAULT_TARGETS[kind])
    theirs = peft.get_peft_model(BASES[kind](), peft.LoraConfig(**cfg))
    ours = lora_ext.get_peft_model(BASES[kind](), lora_ext.LoraConfig(**cfg))
    assert_same_state(ours, theirs)
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == \
        [n for n, p in theirs.named_parameters() if p.requires_grad]
    assert_same_counts(ours, theirs)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    assert_same_files(tmp_path / "ours", tmp_path / "peft")


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_fp32_file_loaded_into_a_bf16_base(kind, tmp_path):
    """autocast_adapter_dtype: adapters stay fp32 on a bf16 base, in both libraries."""
    _, _, path = peft_twin(kind, tmp_path)
    ours = lora_ext.PeftModel.from_pretrained(BASES[kind]().to(torch.bfloat16), path)
    theirs = peft.PeftModel.from_pretrained(BASES[kind]().to(torch.bfloat16), path)
    dtypes = {n: p.dtype for n, p in ours.named_parameters()}
    assert dtypes == {n: p.dtype for n, p in theirs.named_parameters()}
    y, _ = run(ours.eval(), inputs(kind))
    y_t, _ = run(theirs.eval(), inputs(kind))
    y_o, _ = run(copy.deepcopy(theirs).double(), inputs(kind))
    assert_within_torch_error(y, y_t, y_o, what=f"{kind} bf16 base")


# ================================================================ two adapters


def two_adapter_models(kind, tmp_path, r_b=4, **config):
    """PEFT and lora-ext models holding the same adapters "a" and "b" (b loaded through files)."""
    cfg = dict(r=4, lora_alpha=8, target_modules=DEFAULT_TARGETS[kind], **config)
    theirs = peft.get_peft_model(BASES[kind](), peft.LoraConfig(**cfg), adapter_name="a")
    theirs.add_adapter("b", peft.LoraConfig(**{**cfg, "r": r_b, "lora_alpha": 6}))
    randomize_adapters(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    assert folders(tmp_path / "peft") == ["README.md", "a", "b"]  # both in subfolders
    ours = lora_ext.PeftModel.from_pretrained(BASES[kind](), tmp_path / "peft" / "a", adapter_name="a",
                                              is_trainable=True)
    ours.load_adapter(tmp_path / "peft", adapter_name="b", subfolder="b", is_trainable=True)
    return ours, theirs


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("names", [None, ["a"], ["b", "a"]])
def test_merge_and_unload_equals_peft(kind, names, tmp_path):
    ours, theirs = two_adapter_models(kind, tmp_path)
    for model in (ours, theirs):
        model.set_adapter("b")
    merged_ours = ours.merge_and_unload(safe_merge=True, adapter_names=names)
    merged_theirs = theirs.merge_and_unload(safe_merge=True, adapter_names=names)
    assert type(merged_ours) is type(merged_theirs)
    assert_same_state(merged_ours, merged_theirs)
    y, _ = run(merged_ours.eval(), inputs(kind))
    y_t, _ = run(merged_theirs.eval(), inputs(kind))
    torch.testing.assert_close(y, y_t, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_adapter_and_unmerge_match_peft(kind, tmp_path):
    ours, theirs = two_adapter_models(kind, tmp_path)
    ours.eval(), theirs.eval()
    for model in (ours, theirs):
        model.base_model.set_adapter(["a", "b"])
    assert_same_numbers(ours, theirs, inputs(kind), what="two active adapters")
    ours.merge_adapter(), theirs.merge_adapter()
    assert_same_state(ours, theirs)
    assert_same_numbers(ours, theirs, inputs(kind), what="merged")
    ours.unmerge_adapter(), theirs.unmerge_adapter()
    assert_same_state(ours, theirs)
    assert_same_numbers(ours, theirs, inputs(kind), what="unmerged")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("combination", ["linear", "cat", "svd"])
def test_add_weighted_adapter_equals_peft(kind, combination, tmp_path):
    r_b = 4 if combination == "linear" else 2  # linear needs equal ranks
    ours, theirs = two_adapter_models(kind, tmp_path, r_b=r_b)
    kwargs = dict(combination_type=combination)
    for model in (ours, theirs):
        model.add_weighted_adapter(["a", "b"], [0.7, -0.4], "mix", **kwargs)
        model.set_adapter("mix")
    assert ours.peft_config["mix"].r == theirs.peft_config["mix"].r
    assert ours.peft_config["mix"].lora_alpha == theirs.peft_config["mix"].lora_alpha
    assert set(ours.peft_config["mix"].target_modules) == set(theirs.peft_config["mix"].target_modules)
    mix = {k: v for k, v in theirs.state_dict().items() if ".mix" in k}
    ours_mix = {k: v for k, v in ours.state_dict().items() if ".mix" in k}
    assert mix.keys() == ours_mix.keys() and mix
    for key in mix:
        if combination == "svd":  # singular vectors are unique up to sign: compare the products
            continue
        torch.testing.assert_close(ours_mix[key], mix[key], rtol=1e-5, atol=1e-6, msg=key)
    ours.eval(), theirs.eval()
    assert_same_numbers(ours, theirs, inputs(kind), what=f"{combination} mix")
    ours.save_pretrained(tmp_path / "o", selected_adapters=["mix"])
    theirs.save_pretrained(tmp_path / "t", selected_adapters=["mix"])
    if combination != "svd":
        assert_same_files(tmp_path / "o" / "mix", tmp_path / "t" / "mix")


def test_add_weighted_adapter_svd_rank_and_clamp_equal_peft(tmp_path):
    ours, theirs = two_adapter_models("llama", tmp_path, r_b=2)
    for model in (ours, theirs):
        model.add_weighted_adapter(["a", "b"], [1.0, 0.5], "mix", combination_type="svd", svd_rank=3,
                                   svd_clamp=0.9)
        model.set_adapter("mix")
    assert ours.peft_config["mix"].r == theirs.peft_config["mix"].r == 3
    ours.eval(), theirs.eval()
    assert_same_numbers(ours, theirs, inputs("llama"), what="svd rank 3, clamp")


def test_add_weighted_adapter_errors_match_peft(tmp_path):
    ours, theirs = two_adapter_models("llama", tmp_path, r_b=2)
    for model in (ours, theirs):
        with pytest.raises(ValueError, match="same r value"):
            model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "x", combination_type="linear")
        with pytest.raises(ValueError, match="does not exist"):
            model.add_weighted_adapter(["a", "zzz"], [1.0, 1.0], "x", combination_type="cat")
        assert "x" not in model.peft_config


# ================================================================ adapter management


@pytest.mark.parametrize("kind", ["llama", "embconv"])
def test_set_adapter_switches_like_peft(kind, tmp_path):
    ours, theirs = two_adapter_models(kind, tmp_path)
    ours.eval(), theirs.eval()
    for name in ("a", "b", "a"):
        ours.set_adapter(name), theirs.set_adapter(name)
        assert ours.active_adapter == theirs.active_adapter == name
        assert ours.active_adapters == theirs.active_adapters
        assert_same_counts(ours, theirs)
        assert [n for n, p in ours.named_parameters() if p.requires_grad] == \
            [n for n, p in theirs.named_parameters() if p.requires_grad]
        assert_same_numbers(ours, theirs, inputs(kind), what=f"adapter {name}")


@pytest.mark.parametrize("kind", KINDS)
def test_disable_adapter_context_matches_peft_and_the_base(kind, tmp_path):
    ours, theirs = two_adapter_models(kind, tmp_path)
    ours.eval(), theirs.eval()
    base, _ = run(BASES[kind]().eval(), inputs(kind))
    with ours.disable_adapter(), theirs.disable_adapter():
        y, _ = run(ours, inputs(kind))
        y_t, _ = run(theirs, inputs(kind))
        assert torch.equal(y, base) and torch.equal(y_t, base)
        assert_same_counts(ours, theirs)
    assert_same_numbers(ours, theirs, inputs(kind), what="after the block")
    assert not torch.equal(run(ours, inputs(kind))[0], base)
    # merged adapters are taken out for the block and the output is the base's
    ours.merge_adapter(), theirs.merge_adapter()
    with ours.disable_adapter(), theirs.disable_adapter():
        torch.testing.assert_close(run(ours, inputs(kind))[0], base, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(run(theirs, inputs(kind))[0], base, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "embconv"])
def test_delete_adapter_matches_peft(kind, tmp_path):
    ours, theirs = two_adapter_models(kind, tmp_path)
    for model in (ours, theirs):
        model.set_adapter("b")
        model.delete_adapter("b")
    assert list(ours.peft_config) == list(theirs.peft_config) == ["a"]
    assert ours.active_adapters == theirs.active_adapters == ["a"]
    assert_same_state(ours, theirs)
    assert_same_counts(ours, theirs)
    ours.eval(), theirs.eval()
    assert_same_numbers(ours, theirs, inputs(kind), what="after delete")
    for model in (ours, theirs):
        model.delete_adapter("a")
        assert not model.peft_config
    assert ours.active_adapters == theirs.active_adapters == []   # none left, none active
    assert_same_state(ours, theirs)


def test_selected_adapters_and_subfolders_as_peft(tmp_path):
    ours, theirs = two_adapter_models("llama", tmp_path)
    ours.save_pretrained(tmp_path / "o_b", selected_adapters=["b"])
    theirs.save_pretrained(tmp_path / "t_b", selected_adapters=["b"])
    assert folders(tmp_path / "o_b") == folders(tmp_path / "t_b") == ["README.md", "b"]
    assert_same_files(tmp_path / "o_b" / "b", tmp_path / "t_b" / "b")
    ours.save_pretrained(tmp_path / "o_all")
    theirs.save_pretrained(tmp_path / "t_all")
    for name in ("a", "b"):
        assert_same_files(tmp_path / "o_all" / name, tmp_path / "t_all" / name)
    # "default" goes to the top folder in both
    ours_d, theirs_d, path = peft_twin("llama", tmp_path)
    ours_d.save_pretrained(tmp_path / "o_d")
    assert (tmp_path / "o_d" / "adapter_model.safetensors").is_file()
    # PEFT's load_adapter with subfolder= reads our non-default subfolder
    theirs.load_adapter(tmp_path / "o_all", adapter_name="b2", subfolder="b")
    ours.load_adapter(tmp_path / "t_all", adapter_name="b2", subfolder="b")
    ours.eval(), theirs.eval()
    ours.set_adapter("b2"), theirs.set_adapter("b2")
    assert_same_numbers(ours, theirs, inputs("llama"), what="b2")


def test_peft_from_pretrained_of_lora_ext_non_default_adapter(tmp_path):
    ours, theirs, path = ours_twin("gpt2", tmp_path, adapter_name="mine")
    assert (path / "mine" / "adapter_config.json").is_file() and not (path / "adapter_config.json").exists()
    assert theirs.active_adapter == "mine"
    ours.eval(), theirs.eval()
    assert_same_numbers(ours, theirs, inputs("gpt2"), what="non-default adapter")


@pytest.mark.parametrize("writer", ["peft", "ours"])
def test_bin_adapters_cross_over(writer, tmp_path):
    """safe_serialization=False: adapter_model.bin, read back with weights_only in lora-ext."""
    lib = peft if writer == "peft" else lora_ext
    model = lib.get_peft_model(BASES["gpt2"](), lib.LoraConfig(r=4, target_modules=["c_attn", "c_fc"]))
    randomize_adapters(model)
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file() and not (tmp_path / "adapter_model.safetensors").exists()
    ours = lora_ext.PeftModel.from_pretrained(BASES["gpt2"](), tmp_path)
    theirs = peft.PeftModel.from_pretrained(BASES["gpt2"](), tmp_path)
    assert_same_numbers(ours, theirs, inputs("gpt2"), what="bin")
    if writer == "peft":
        assert_same_numbers(ours, model.eval(), inputs("gpt2"), what="bin vs writer")
