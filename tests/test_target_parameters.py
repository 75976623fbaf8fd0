"""LoRA on raw nn.Parameters (`target_parameters`, PEFT's ParamWrapper) against the real PEFT:
the stacked expert weights of transformers' mixture-of-experts models (GptOss with
is_transposed=True, Llama4 without the attribute, Mixtral with is_transposed=False), 2-D
parameters of plain modules, nested wrappers, several adapters, half and float8 parameters,
and PEFT's refusals. Files written by either library load in the other with the same keys and
numbers (outputs and gradients by the tolerance rule)."""
import copy
import warnings

import peft
import pytest
import torch
from torch import nn
from transformers import (GptOssConfig, GptOssForCausalLM, Llama4ForCausalLM, Llama4TextConfig, MixtralConfig,
                          MixtralForCausalLM)

import lora_ext
from lora_ext.layers import ParamWrapper
from peft_twins import (assert_same_files, assert_same_numbers, assert_same_state, randomize_adapters, run,
                        saved_config)

VOCAB = 64
# hidden 32, expert intermediate 24: no expert matrix is square, so a transposed layout shows
SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
             num_local_experts=4, vocab_size=VOCAB, attn_implementation="eager",
             experts_implementation="eager")  # the fp64 oracle needs it: grouped_mm has no fp64


def tiny_gptoss():
    torch.manual_seed(0)
    return GptOssForCausalLM(GptOssConfig(intermediate_size=24, num_experts_per_tok=2,
                                          layer_types=["full_attention"] * 2, **SIZES))


def tiny_llama4():
    torch.manual_seed(0)
    return Llama4ForCausalLM(Llama4TextConfig(intermediate_size=24, intermediate_size_mlp=32, num_experts_per_tok=1,
                                              **SIZES))


def tiny_mixtral():
    torch.manual_seed(0)
    sizes = {k: v for k, v in SIZES.items() if k != "head_dim"}
    return MixtralForCausalLM(MixtralConfig(intermediate_size=24, num_experts_per_tok=2, **sizes))


MOES = {"gptoss": (tiny_gptoss, "mlp.experts"), "llama4": (tiny_llama4, "feed_forward.experts"),
        "mixtral": (tiny_mixtral, "mlp.experts")}


def moe_inputs():
    return {"input_ids": torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(5))}


class ParamLinear(nn.Module):
    """A Linear whose weight is stored [in, out] and used directly: only target_parameters reach it."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(in_features, out_features) / in_features ** 0.5)
        self.bias = nn.Parameter(torch.randn(out_features) * 0.1)

    def forward(self, x):
        return x @ self.weight + self.bias


class ParamNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = ParamLinear(10, 20)
        self.lin1 = nn.Linear(20, 6)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


def param_net():
    torch.manual_seed(0)
    return ParamNet()


def param_inputs():
    return {"x": torch.randn(4, 10, generator=torch.Generator().manual_seed(5))}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def saved_pair(direction, build, tmp_path, **config):
    """(ours, theirs): random adapters made by one library, saved, loaded by the other."""
    config.setdefault("r", 4)
    config.setdefault("lora_alpha", 8)
    first, second = (peft, lora_ext) if direction == "from_peft" else (lora_ext, peft)
    made = first.get_peft_model(build(), first.LoraConfig(**config))
    randomize_adapters(made)
    made.save_pretrained(tmp_path / "made")
    loaded = second.PeftModel.from_pretrained(build(), tmp_path / "made", is_trainable=True)
    return (loaded, made) if second is lora_ext else (made, loaded)


def assert_same_adapter_files(ours_dir, theirs_dir):
    """assert_same_files, with the target lists compared as the sets they mean: for Mixtral-like
    models PEFT turns both into sets while converting transformers-4 configs (its saved order then
    varies from run to run, and target_modules=None is written as [])."""
    assert_same_files(ours_dir, theirs_dir, ignore=("target_parameters", "target_modules"))
    ours, theirs = saved_config(ours_dir), saved_config(theirs_dir)
    for key in ("target_parameters", "target_modules"):
        assert set(ours[key] or ()) == set(theirs[key] or ()), key


def check_pair(ours, theirs, model_inputs, tmp_path):
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert ours.base_model.targeted_parameter_names == theirs.base_model.targeted_parameter_names
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert_same_numbers(ours.eval(), theirs.eval(), model_inputs, what="eval")
    assert_same_numbers(ours.train(), theirs.train(), model_inputs, grads=True, what="train")
    ours.save_pretrained(tmp_path / "again_ours")
    theirs.save_pretrained(tmp_path / "again_theirs")
    assert_same_adapter_files(tmp_path / "again_ours", tmp_path / "again_theirs")
    ours.eval(), theirs.eval()
    for model in (ours, theirs):
        model.merge_adapter()
    assert_same_state(ours, theirs)
    assert_same_numbers(ours, theirs, model_inputs, what="merged")
    for model in (ours, theirs):
        model.unmerge_adapter()
    assert_same_state(ours, theirs)
    merged, merged_t = ours.merge_and_unload(), theirs.merge_and_unload()
    assert not any(isinstance(m, lora_ext.layers.LoraLayer) for m in merged.modules())
    assert_same_state(merged, merged_t)


@pytest.mark.parametrize("direction", ["from_peft", "from_ours"])
@pytest.mark.parametrize("moe", list(MOES))
def test_moe_expert_stacks_cross_over_with_the_same_numbers(moe, direction, tmp_path):
    """Both expert stacks of every layer (nested wrappers) plus q_proj as a module target."""
    build, experts = MOES[moe]
    ours, theirs = saved_pair(direction, build, tmp_path, target_modules=["q_proj"],
                              target_parameters=[f"{experts}.gate_up_proj", f"{experts}.down_proj"])
    wrapper = ours.base_model.model.get_submodule(f"model.layers.0.{experts}")
    # the module's parameters in their registration order: gate_up_proj is wrapped first, down_proj's
    # wrapper goes around it (PEFT's nesting, hence PEFT's keys)
    assert type(wrapper) is ParamWrapper and wrapper.parameter_name == "down_proj"
    assert type(wrapper.base_layer) is ParamWrapper and wrapper.base_layer.parameter_name == "gate_up_proj"
    assert wrapper.num_experts == 4 and "parameter_name='down_proj'" in repr(wrapper)
    assert wrapper.get_delta_weight("default").shape == wrapper.get_param().shape
    check_pair(ours, theirs, moe_inputs(), tmp_path)


@pytest.mark.parametrize("direction", ["from_peft", "from_ours"])
def test_per_layer_expert_targets_and_patterns(direction, tmp_path):
    ours, theirs = saved_pair(direction, tiny_gptoss, tmp_path, target_modules=[], use_rslora=True,
                              target_parameters=["0.mlp.experts.gate_up_proj", "1.mlp.experts.down_proj"],
                              rank_pattern={"down_proj": 2}, alpha_pattern={"gate_up_proj": 3})
    assert ours.base_model.model.model.layers[1].mlp.experts.r["default"] == 2
    check_pair(ours, theirs, moe_inputs(), tmp_path)


@pytest.mark.parametrize("direction", ["from_peft", "from_ours"])
def test_two_dimensional_parameters_cross_over_with_the_same_numbers(direction, tmp_path):
    """A parameter used directly (ParamLinear, [in, out]) and an nn.Linear's weight ([out, in])."""
    ours, theirs = saved_pair(direction, param_net, tmp_path, target_parameters=["lin0.weight", "lin1.weight"])
    lin0 = ours.base_model.model.lin0
    assert (lin0.in_features, lin0.out_features, lin0.num_experts) == (20, 10, 1)
    check_pair(ours, theirs, param_inputs(), tmp_path)


@pytest.mark.parametrize("init", [True, "gaussian", False, "pissa", "olora"])
@pytest.mark.parametrize("build", [tiny_mixtral, param_net], ids=["moe", "2d"])
def test_fresh_adapters_have_peft_s_values(build, init):
    if build is tiny_mixtral and init in ("pissa", "olora"):
        pytest.skip("factoring initialisations apply to one 2-D weight")
    targets = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if build is tiny_mixtral else ["lin1.weight"]
    states = []
    for library in (lora_ext, peft):
        torch.manual_seed(1)
        model = library.get_peft_model(build(), library.LoraConfig(r=4, target_parameters=targets,
                                                                   init_lora_weights=init))
        states.append(model)
    assert_same_state(*states)


def test_factoring_initialisations_of_an_expert_stack_are_refused():
    with pytest.raises(ValueError, match="not supported for a stacked parameter of 4 experts"):
        lora_ext.get_peft_model(tiny_mixtral(), lora_ext.LoraConfig(target_parameters=["mlp.experts.down_proj"],
                                                                     init_lora_weights="pissa"))


def test_several_adapters_on_the_same_parameters_as_peft(tmp_path):
    targets = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    models = []
    for library in (lora_ext, peft):
        torch.manual_seed(2)
        model = library.get_peft_model(tiny_mixtral(), library.LoraConfig(target_parameters=targets,
                                                                           init_lora_weights=False))
        model.add_adapter("other", library.LoraConfig(target_parameters=targets, r=2, lora_alpha=5,
                                                       init_lora_weights=False))
        models.append(model)
    ours, theirs = models
    # the second adapter joins the wrappers of the first: no further nesting
    wrapper = ours.base_model.model.model.layers[0].mlp.experts
    assert set(wrapper.lora_A) == set(wrapper.base_layer.lora_A) == {"default", "other"}
    assert_same_state(ours, theirs)
    for model in (ours, theirs):
        model.base_model.set_adapter(["default", "other"])
    assert_same_numbers(ours.train(), theirs.train(), moe_inputs(), grads=True, what="two adapters")
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    for name in ("", "other"):
        assert_same_adapter_files(tmp_path / "ours" / name, tmp_path / "theirs" / name)
    for model in (ours, theirs):
        model.delete_adapter("default")
    assert_same_state(ours, theirs)
    assert_same_numbers(ours.eval(), theirs.eval(), moe_inputs(), what="after delete")


def test_adapters_on_other_parameters_are_refused_as_in_peft():
    for library in (lora_ext, peft):
        model = library.get_peft_model(tiny_mixtral(), library.LoraConfig(target_parameters=["mlp.experts.down_proj"]))
        with pytest.raises(ValueError, match="all adapters must target the same set of parameters"):
            model.add_adapter("other", library.LoraConfig(target_parameters=["mlp.experts.gate_up_proj"]))
        assert list(model.peft_config) == ["default"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_parameters_with_fp32_adapters_as_peft(dtype, tmp_path):
    ours, theirs = saved_pair("from_peft", param_net, tmp_path, target_parameters=["lin0.weight"])
    for model in (ours, theirs):
        model.base_model.model.to(dtype)
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = param.data.float()
    x = {"x": param_inputs()["x"].to(dtype)}
    y, y_t = run(ours.eval(), x)[0], run(theirs.eval(), x)[0]
    assert y.dtype == dtype
    torch.testing.assert_close(y, y_t, rtol=0, atol=0)


class Float8Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Module()
        self.proj.weight = nn.Parameter(torch.randn(8, 6).to(torch.float8_e4m3fn), requires_grad=False)

    def forward(self, x):
        return x @ self.proj.weight.to(x.dtype).T


def test_float8_parameters_take_the_delta_upcast_and_clamped_as_peft():
    outputs = []
    for library in (lora_ext, peft):
        torch.manual_seed(3)
        base = Float8Net()
        model = library.get_peft_model(base, library.LoraConfig(r=2, lora_alpha=400, target_parameters=["proj.weight"],
                                                                init_lora_weights=False))
        outputs.append(model(torch.randn(3, 6, generator=torch.Generator().manual_seed(1))))
    assert not outputs[0].isnan().any()
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


def test_a_parameter_under_a_user_parametrization_as_peft():
    """PEFT adds its delta after the user's own parametrization of the parameter: the same here."""
    class Double(nn.Module):
        def forward(self, weight):
            return 2 * weight

    outputs = []
    for library in (lora_ext, peft):
        base = param_net()
        lin1 = base.lin1
        nn.utils.parametrize.register_parametrization(lin1, "weight", Double())
        torch.manual_seed(3)
        model = library.get_peft_model(base, library.LoraConfig(target_parameters=["lin1.weight"],
                                                                init_lora_weights=False))
        outputs.append(run(model, param_inputs())[0])
        assert len(lin1.parametrizations["weight"]) == 1  # ours is gone after the forward
    torch.testing.assert_close(outputs[0], outputs[1])


REFUSALS = [
    ({"target_parameters": ["lin0.weight"], "lora_dropout": 0.1}, ValueError, "does not work with lora_dropout"),
    ({"target_parameters": ["lin0.weight"], "use_dora": True}, ValueError, "does not work with use_dora"),
    ({"target_parameters": ["lin0.weight"], "fan_in_fan_out": True}, ValueError, "does not work with fan_in_fan_out"),
    ({"target_parameters": ["lin0.bias"]}, ValueError, "1 dimensional Parameter, but only 2d and 3d"),
    ({"target_parameters": ["top"]}, ValueError, "Targeting an nn.Parameter on the top-level module"),
    ({"target_modules": ["lin1"], "target_parameters": ["lin1.weight"]}, ValueError,
     "Trying to wrap an `nn.Parameter` of layer 'lin1' of type Linear"),
    ({"target_parameters": "lin0.weight"}, TypeError, "`target_parameters` must be a list of strings or None"),
    ({"target_modules": [], "target_parameters": ["nothing"]}, ValueError,
     "No `target_modules` passed but also no `target_parameters` found"),
]


@pytest.mark.parametrize("config, error, message", REFUSALS, ids=[str(i) for i in range(len(REFUSALS))])
def test_refusals_as_peft(config, error, message):
    for library in (lora_ext, peft):
        base = param_net()
        base.top = nn.Parameter(torch.zeros(2, 2))
        with pytest.raises(error, match=message.replace("(", r"\(").replace("[", r"\[")):
            library.get_peft_model(base, library.LoraConfig(**config))


def test_unmatched_targets_warn_as_peft():
    for library in (lora_ext, peft):
        with pytest.warns(RuntimeWarning, match=r"target_parameters=\['nothing'\] were set but no parameter"):
            library.get_peft_model(param_net(), library.LoraConfig(target_modules=["lin1"],
                                                                   target_parameters=["nothing"]))
        with pytest.warns(RuntimeWarning, match="were set but no module was matched"):
            library.get_peft_model(param_net(), library.LoraConfig(target_modules=["zzz"],
                                                                   target_parameters=["lin0.weight"]))


def test_mixed_batches_and_weighted_adapters_are_refused_as_in_peft():
    for library in (lora_ext, peft):
        model = library.get_peft_model(param_net(), library.LoraConfig(target_parameters=["lin0.weight"])).eval()
        model.add_adapter("b", library.LoraConfig(target_parameters=["lin0.weight"]))
        with pytest.raises(ValueError, match="does not support mixed adapter batches"):
            model(**param_inputs(), adapter_names=["default", "b", "__base__", "b"])
        with pytest.raises(ValueError, match="add_weighted_adapter does not support targeting nn.Parameter"):
            model.add_weighted_adapter(["default", "b"], [0.5, 0.5], "mix", combination_type="linear")


def test_unload_and_disable_give_back_the_base(tmp_path):
    ours, _ = saved_pair("from_peft", param_net, tmp_path, target_parameters=["lin0.weight", "lin1.weight"])
    expected = run(param_net(), param_inputs())[0]
    with ours.disable_adapter():
        torch.testing.assert_close(run(ours, param_inputs())[0], expected)
    assert not torch.allclose(run(ours, param_inputs())[0], expected)
    plain = copy.deepcopy(ours).unload()
    assert type(plain.lin0) is ParamLinear and type(plain.lin1) is nn.Linear
    assert_same_state(plain, param_net())


def test_a_refused_target_leaves_the_model_as_it_was():
    """Everything is undone when a later target is refused: no half-wrapped modules, no adapter."""
    base = param_net()
    base.lin0.extra = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="1 dimensional Parameter"):
        lora_ext.get_peft_model(base, lora_ext.LoraConfig(target_modules=["lin1"],
                                                          target_parameters=["lin0.weight", "lin0.extra"]))
    assert type(base.lin0) is ParamLinear and type(base.lin1) is nn.Linear
    model = lora_ext.get_peft_model(param_net(), lora_ext.LoraConfig(target_parameters=["lin0.weight"]))
    with pytest.raises(ValueError, match="does not work with lora_dropout"):
        model.add_adapter("other", lora_ext.LoraConfig(target_parameters=["lin0.weight"], lora_dropout=0.1))
    assert list(model.peft_config) == ["default"] and list(model.base_model.model.lin0.lora_A) == ["default"]
