"""LoRA on nn.MultiheadAttention against the real PEFT: adapters saved by either library load in
the other with the same files and numbers (outputs and gradients by the tolerance rule), PEFT's
double application of the out_proj delta, merging and unloading, several adapters, half-precision
bases, and the refusals PEFT has."""
import copy
import warnings

import peft
import pytest
import torch
from torch import nn

import lora_ext
from peft_twins import assert_same_files, assert_same_numbers, assert_same_state, randomize_adapters, run

EMBED, HEADS, SEQ, BATCH = 16, 4, 5, 3


class MhaNet(nn.Module):
    """Self-attention -> Linear head; batch_first with a padding mask and the attention weights
    in the output, or sequence-first as in PEFT's own ModelMha."""

    def __init__(self, batch_first=True):
        super().__init__()
        self.mha = nn.MultiheadAttention(EMBED, HEADS, batch_first=batch_first)
        self.head = nn.Linear(EMBED, 5)

    def forward(self, x, key_padding_mask=None):
        if not self.mha.batch_first:
            return self.head(self.mha(x, x, x)[0])
        y, weights = self.mha(x, x, x, key_padding_mask=key_padding_mask, need_weights=True)
        return self.head(y) + weights.mean(dim=-1, keepdim=True)


def base(seed=0, batch_first=True):
    torch.manual_seed(seed)
    return MhaNet(batch_first)


def inputs(seed=5, batch_first=True):
    gen = torch.Generator().manual_seed(seed)
    if not batch_first:
        return {"x": torch.randn(SEQ, BATCH, EMBED, generator=gen)}
    mask = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    mask[0, -2:] = True  # padding in the first sequence
    return {"x": torch.randn(BATCH, SEQ, EMBED, generator=gen), "key_padding_mask": mask}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Already unmerged" from out_proj, in both libraries
        yield


def peft_saved(tmp_path, batch_first=True, **config):
    config.setdefault("target_modules", ["mha"])
    theirs = peft.get_peft_model(base(batch_first=batch_first), peft.LoraConfig(r=4, lora_alpha=8, **config))
    randomize_adapters(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    ours = lora_ext.PeftModel.from_pretrained(base(batch_first=batch_first), tmp_path / "peft", is_trainable=True)
    return ours, theirs


def ours_saved(tmp_path, batch_first=True, **config):
    config.setdefault("target_modules", ["mha"])
    ours = lora_ext.get_peft_model(base(batch_first=batch_first), lora_ext.LoraConfig(r=4, lora_alpha=8, **config))
    randomize_adapters(ours)
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(base(batch_first=batch_first), tmp_path / "ours", is_trainable=True)
    return ours, theirs


@pytest.mark.parametrize("saver", [peft_saved, ours_saved])
@pytest.mark.parametrize("config", [{}, {"target_modules": ["mha", "head"], "use_rslora": True},
                                    {"batch_first": False, "rank_pattern": {"mha": 2}, "alpha_pattern": {"mha": 3}}],
                         ids=["mha", "mha+head", "seq_first-patterns"])
def test_adapters_cross_over_with_the_same_numbers(saver, config, tmp_path):
    batch_first = config.get("batch_first", True)
    ours, theirs = saver(tmp_path, **config)
    layer = ours.base_model.model.mha
    assert type(layer) is lora_ext.layers.MultiheadAttention
    assert type(layer.base_layer.out_proj) is lora_ext.layers.Linear  # one adapter covers both projections
    assert (layer.in_features, layer.out_features) == (EMBED, 3 * EMBED)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = inputs(batch_first=batch_first)
    assert_same_numbers(ours.eval(), theirs.eval(), x, what="eval")
    assert_same_numbers(ours.train(), theirs.train(), x, grads=True, what="train")
    ours.save_pretrained(tmp_path / "again_ours")
    theirs.save_pretrained(tmp_path / "again_theirs")
    assert_same_files(tmp_path / "again_ours", tmp_path / "again_theirs")


@pytest.mark.parametrize("init", [True, "gaussian", False])
def test_fresh_adapters_have_peft_s_values(init):
    """The same seed gives PEFT's parameters: PEFT builds out_proj's adapter, then the in-projection's,
    then out_proj's again, and the draws follow that order."""
    torch.manual_seed(1)
    ours = lora_ext.get_peft_model(base(), lora_ext.LoraConfig(target_modules=["mha"], init_lora_weights=init))
    torch.manual_seed(1)
    theirs = peft.get_peft_model(base(), peft.LoraConfig(target_modules=["mha"], init_lora_weights=init))
    assert_same_state(ours, theirs)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_forward_is_the_base_module_with_peft_s_adapted_weights(tmp_path):
    """What PEFT computes, written out: in_proj_weight + s·B·A and out_proj.weight + 2·s·B_o·A_o
    (PEFT's merge adds out_proj's delta and then calls out_proj's own merge, which adds it again).
    Adapters trained with PEFT depend on it; if PEFT ever changes it, this test says so."""
    ours, theirs = peft_saved(tmp_path)
    layer = ours.base_model.model.mha
    plain = copy.deepcopy(layer.base_layer)
    plain.out_proj = plain.out_proj.base_layer
    with torch.no_grad():
        plain.in_proj_weight += layer.get_delta_weight("default")
        plain.out_proj.weight += 2 * layer.base_layer.out_proj.get_delta_weight("default")
    x = inputs()["x"]
    expected = plain(x, x, x)
    for model in (ours, theirs):
        got = model.base_model.model.mha(x, x, x)
        torch.testing.assert_close(got[0], expected[0])
        torch.testing.assert_close(got[1], expected[1])


def test_gradients_are_peft_s_and_the_base_weights_stay_registered(tmp_path):
    """PEFT's gradient for out_proj's adapter is that of one delta (its second addition is made outside
    autograd); ours equals it. Our forward never re-registers the base weights: the same Parameter
    objects, with the same requires_grad, before and after."""
    ours, theirs = peft_saved(tmp_path)
    layer = ours.base_model.model.mha
    in_proj, out_proj = layer.base_layer.in_proj_weight, layer.base_layer.out_proj.base_layer.weight
    in_proj.requires_grad_(True)
    _, grads = run(ours.train(), inputs(), grads=True)
    assert layer.base_layer.in_proj_weight is in_proj and layer.base_layer.out_proj.base_layer.weight is out_proj
    assert in_proj.requires_grad and not out_proj.requires_grad
    # PEFT detaches W in its forward: a trainable in_proj_weight gets no gradient there either
    assert "base_model.model.mha.base_layer.in_proj_weight" not in grads
    in_proj.requires_grad_(False)
    assert_same_numbers(ours, theirs.train(), inputs(), grads=True, what="train")


@pytest.mark.parametrize("safe_merge", [False, True])
def test_merge_unmerge_and_unload_as_peft(safe_merge, tmp_path):
    ours, theirs = peft_saved(tmp_path, target_modules=["mha", "head"])
    ours.eval(), theirs.eval()
    expected, _ = run(theirs, inputs())
    for model in (ours, theirs):
        model.merge_adapter(safe_merge=safe_merge)
    assert ours.base_model.model.mha.merged and ours.base_model.model.mha.base_layer.out_proj.merged
    assert_same_state(ours, theirs)
    assert_same_numbers(ours, theirs, inputs(), what="merged")
    torch.testing.assert_close(run(ours, inputs())[0], expected, rtol=1e-4, atol=1e-5)
    with ours.disable_adapter():  # unmerges, as PEFT
        torch.testing.assert_close(run(ours, inputs())[0], run(base(), inputs())[0], rtol=1e-5, atol=1e-6)
    for model in (ours, theirs):
        model.merge_adapter()
        model.unmerge_adapter()
    assert_same_state(ours, theirs)
    merged, merged_t = ours.merge_and_unload(), theirs.merge_and_unload()
    assert type(merged.mha) is nn.MultiheadAttention
    assert type(merged.mha.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert_same_state(merged, merged_t)
    torch.testing.assert_close(run(merged, inputs())[0], expected, rtol=1e-4, atol=1e-5)


def test_unload_gives_back_the_untouched_base(tmp_path):
    ours, _ = peft_saved(tmp_path)
    plain = ours.unload()
    assert type(plain.mha) is nn.MultiheadAttention and type(plain.mha.out_proj) is not lora_ext.layers.Linear
    assert_same_state(plain, base())


def test_safe_merge_of_a_broken_adapter_raises_and_changes_nothing(tmp_path):
    ours, theirs = peft_saved(tmp_path)
    for model in (ours, theirs):
        with torch.no_grad():
            model.base_model.model.mha.lora_B["default"].weight[0, 0] = float("nan")
        before = copy.deepcopy(model.state_dict())
        with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
            model.merge_adapter(safe_merge=True)
        assert not model.base_model.model.mha.merged
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[key]) or torch.isnan(value).any(), key


def test_several_active_adapters_as_peft(tmp_path):
    """Two adapters active at once: outputs and gradients equal PEFT's (whose forward detaches the
    first adapter's delta, so only the last one is trained: the same here)."""
    models = []
    for library in (lora_ext, peft):
        torch.manual_seed(2)
        model = library.get_peft_model(base(), library.LoraConfig(target_modules=["mha"], init_lora_weights=False))
        model.add_adapter("other", library.LoraConfig(target_modules=["mha"], r=2, lora_alpha=5,
                                                       init_lora_weights=False))
        model.base_model.set_adapter(["default", "other"])
        models.append(model)
    ours, theirs = models
    assert_same_state(ours, theirs)
    assert_same_numbers(ours.train(), theirs.train(), inputs(), grads=True, what="two adapters")
    _, grads = run(ours, inputs(), grads=True)
    assert not any(grad.abs().sum() for name, grad in grads.items() if ".default." in name)
    ours.merge_adapter(["default", "other"])
    theirs.merge_adapter(["default", "other"])
    assert_same_state(ours, theirs)
    ours.unmerge_adapter()
    ours.delete_adapter("other")
    theirs.unmerge_adapter()
    theirs.delete_adapter("other")
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert_same_numbers(ours.eval(), theirs.eval(), inputs(), what="after delete")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_base_with_fp32_adapters_as_peft(dtype, tmp_path):
    """autocast_adapter_dtype keeps the adapters in fp32; the deltas are cast to the base dtype
    before they are added, and the output has the query's dtype: PEFT's numbers exactly."""
    ours, theirs = peft_saved(tmp_path)
    x = inputs()
    x["x"] = x["x"].to(dtype)
    for model in (ours, theirs):
        model.base_model.model.to(dtype)
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = param.data.float()
    y, y_t = run(ours.eval(), x)[0], run(theirs.eval(), x)[0]
    assert y.dtype == y_t.dtype == dtype
    torch.testing.assert_close(y, y_t, rtol=0, atol=0)


def test_refusals_as_peft():
    kdim = nn.Module()
    kdim.mha = nn.MultiheadAttention(EMBED, HEADS, kdim=8, vdim=8)
    for library in (lora_ext, peft):
        with pytest.raises(ValueError, match="does not support DoRA"):
            library.get_peft_model(base(), library.LoraConfig(target_modules=["mha"], use_dora=True))
        with pytest.raises(ValueError, match="Only same embed for query/key/value is supported"):
            library.get_peft_model(copy.deepcopy(kdim), library.LoraConfig(target_modules=["mha"]))
    # PEFT builds a lora_B bias it never trains here (it enters only through out_proj's in-place merge)
    with pytest.raises(ValueError, match="lora_bias=True is not supported for MultiheadAttention"):
        lora_ext.layers.MultiheadAttention(nn.MultiheadAttention(EMBED, HEADS), "default", r=2, lora_bias=True)
    for init in ("pissa", "olora"):  # they factor one base weight; PEFT fails with an AttributeError
        with pytest.raises(ValueError, match="not supported for MultiheadAttention"):
            lora_ext.get_peft_model(base(), lora_ext.LoraConfig(target_modules=["mha"], init_lora_weights=init))


def test_mixed_adapter_batches_are_refused_as_in_peft():
    for library in (lora_ext, peft):
        model = library.get_peft_model(base(), library.LoraConfig(target_modules=["mha"]), adapter_name="a").eval()
        model.add_adapter("b", library.LoraConfig(target_modules=["mha"]))
        with pytest.raises(TypeError, match="lora.MultiheadAttention does not support mixed adapter batches"):
            model(**inputs(), adapter_names=["a", "b", "__base__"])


def test_disabled_adapters_give_the_base_output(tmp_path):
    ours, _ = peft_saved(tmp_path)
    with ours.disable_adapter():
        torch.testing.assert_close(run(ours.eval(), inputs())[0], run(base(), inputs())[0])
    assert not torch.allclose(run(ours, inputs())[0], run(base(), inputs())[0])
