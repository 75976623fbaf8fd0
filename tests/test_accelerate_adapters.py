"""lora_ext.accelerate on a PEFT model whose adapters change afterwards (add_adapter,
load_adapter, add_weighted_adapter), and its warning, reason by reason, against the real
PEFT. Fused paths are compared with PEFT by the tolerance rule (lora_testing)."""
import copy
import pickle
import warnings

import peft
import pytest
import torch
from peft.tuners.lora.model import LoraModel as PeftLoraModel
from torch import nn

import lora_ext
from lora_ext.accelerate import accelerated_layers, fused_lora_linear_class
from test_accelerate import (assert_matches_peft, forward_backward, fused_calls, peft_model,  # noqa: F401
                             randomize_adapters, tiny_model, token_ids)

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def attention_only_model():
    return peft_model(target_modules=ATTENTION)


def compare_with_peft(accelerated, fused_calls, adapter):
    """The accelerated model against an un-accelerated copy (PEFT's forward) and fp64."""
    accelerated.set_adapter(adapter)
    theirs = lora_ext.restore(copy.deepcopy(accelerated))
    oracle = copy.deepcopy(theirs).double()
    ids = token_ids()
    fused_calls.clear()
    ours = forward_backward(accelerated, ids)
    assert fused_calls, "the new adapter did not take the fused path"
    calls = len(fused_calls)
    assert_matches_peft(ours, forward_backward(theirs, ids), forward_backward(oracle, ids), what=adapter)
    assert len(fused_calls) == calls  # the restored copies ran PEFT's forward


def test_add_adapter_on_new_modules_is_accelerated(fused_calls):
    model = lora_ext.accelerate(attention_only_model())
    assert len(accelerated_layers(model)) == 8
    model.add_adapter("mlp", peft.LoraConfig(r=4, lora_alpha=8, target_modules=MLP))
    randomize_adapters(model, seed=9)
    assert len(accelerated_layers(model)) == 14  # the 6 new MLP layers too
    assert not any(type(m).__name__ == "Linear" and hasattr(m, "lora_A") for m in model.modules())
    compare_with_peft(model, fused_calls, "mlp")


def test_load_adapter_on_new_modules_is_accelerated(fused_calls, tmp_path):
    saved = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, lora_alpha=8, target_modules=MLP))
    randomize_adapters(saved, seed=11)
    saved.save_pretrained(tmp_path)
    model = lora_ext.accelerate(attention_only_model())
    result = model.load_adapter(tmp_path, adapter_name="loaded")
    assert result.unexpected_keys == []
    assert len(accelerated_layers(model)) == 14
    compare_with_peft(model, fused_calls, "loaded")


def test_add_weighted_adapter_stays_accelerated(fused_calls):
    model = lora_ext.accelerate(peft_model(adapters=("a", "b")))
    model.add_weighted_adapter(["a", "b"], [0.7, 0.3], "mix", combination_type="cat")
    assert len(accelerated_layers(model)) == 14
    compare_with_peft(model, fused_calls, "mix")


def test_tuner_class_switch_is_undone_by_restore_and_survives_copies():
    model = lora_ext.accelerate(attention_only_model())
    assert isinstance(model.base_model, PeftLoraModel) and type(model.base_model) is not PeftLoraModel
    clone = pickle.loads(pickle.dumps(model))
    clone.add_adapter("mlp", peft.LoraConfig(r=4, target_modules=MLP))
    assert len(accelerated_layers(clone)) == 14 and len(accelerated_layers(model)) == 8
    lora_ext.restore(model)
    assert type(model.base_model) is PeftLoraModel
    model.add_adapter("mlp", peft.LoraConfig(r=4, target_modules=MLP))
    assert accelerated_layers(model) == []  # restored: nothing is swapped behind the user's back


def test_warning_names_each_reason_with_its_layers():
    torch.manual_seed(0)
    model = peft_model(target_modules=["q_proj", "v_proj", "embed_tokens"])
    model.add_adapter("dora", peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    model.base_model.set_adapter(["default", "dora"])
    hooked = model.base_model.model.model.layers[1].self_attn.v_proj
    hooked.base_layer.register_forward_hook(lambda *args: None)
    with pytest.warns(UserWarning) as record:
        warnings.simplefilter("always")
        lora_ext.accelerate(model)
    text = " ".join(str(w.message) for w in record if "lora_ext.accelerate" in str(w.message))
    prefix = "base_model.model.model"
    assert "3 of 5 LoRA layers will run PEFT's own forward" in text
    assert (f"several active adapters with DoRA among them (2 layers: {prefix}.layers.0.self_attn.q_proj, "
            f"{prefix}.layers.1.self_attn.q_proj)") in text
    assert f"hooks on the base layer (1 layer: {prefix}.layers.1.self_attn.v_proj)" in text
    assert "embed_tokens" not in text  # one plain adapter on an nn.Embedding: fused
    assert "autocast_adapter_dtype" not in text  # no dtype reason, no dtype advice


def test_adding_layers_to_an_accelerated_model_reports_the_new_reasons():
    model = lora_ext.accelerate(attention_only_model())
    with pytest.warns(UserWarning, match=r"adapter 'alora': a LoRA variant \(ALoraLinearVariant\) .*gate_proj"):
        warnings.simplefilter("always")
        model.add_adapter("alora", peft.LoraConfig(r=4, target_modules=["gate_proj"], alora_invocation_tokens=[3]))
        model.base_model.set_adapter("alora")
        lora_ext.accelerate(model)  # the active adapter changed: accelerate reports again when asked
    assert type(model.base_model.model.model.layers[0].mlp.gate_proj) is fused_lora_linear_class()


def test_model_with_nothing_to_swap_runs_as_peft():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 6)

        def forward(self, x):
            return self.lin(x)

    torch.manual_seed(0)
    model = peft.get_peft_model(Net(), peft.LoraConfig(r=2, target_modules=[], target_parameters=["lin.weight"],
                                                       init_lora_weights=False))
    x = torch.randn(5, 8)
    want = model(x)
    with pytest.warns(UserWarning, match="nothing to swap"):
        warnings.simplefilter("always")
        lora_ext.accelerate(model)
    assert torch.equal(model(x), want)


