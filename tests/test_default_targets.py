"""LoraConfig without target_modules: the model type's default modules, as PEFT picks them."""
import json
from unittest.mock import MagicMock

import peft
import pytest
import torch
from torch import nn

import lora_ext
from lora_ext.target_defaults import DEFAULT_TARGET_MODULES
from peft_twins import VOCAB, tiny_gpt2, tiny_llama


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 2)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


def test_the_table_is_peft_s():
    from peft.tuners.lora.model import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as theirs
    ours = {k: v if isinstance(v, str) else sorted(v) for k, v in DEFAULT_TARGET_MODULES.items()}
    assert ours == {k: v if isinstance(v, str) else sorted(v) for k, v in theirs.items()}


@pytest.mark.parametrize("base", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_same_modules_and_saved_config_as_peft(base, tmp_path):
    theirs = peft.get_peft_model(base(), peft.LoraConfig(r=4, init_lora_weights=False))
    torch.manual_seed(1)
    ours = lora_ext.get_peft_model(base(), lora_ext.LoraConfig(r=4, init_lora_weights=False))
    assert ours.targeted_module_names == theirs.targeted_module_names
    assert ours.peft_config["default"].target_modules == theirs.peft_config["default"].target_modules
    theirs.save_pretrained(tmp_path / "theirs")
    ours.save_pretrained(tmp_path / "ours")
    read = lambda d: sorted(json.loads((tmp_path / d / "adapter_config.json").read_text())["target_modules"])
    assert read("ours") == read("theirs")
    # and the adapter PEFT saved loads and runs the same here
    ids = torch.randint(0, VOCAB, (2, 8))
    loaded = lora_ext.PeftModel.from_pretrained(base(), tmp_path / "theirs").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, theirs.eval()(ids).logits, rtol=1e-5, atol=1e-5)


def test_unknown_model_type_raises_as_peft():
    for get_peft_model, config in ((peft.get_peft_model, peft.LoraConfig()),
                                   (lora_ext.get_peft_model, lora_ext.LoraConfig())):
        with pytest.raises(ValueError, match="Please specify `target_modules`"):
            get_peft_model(MLP(), config)
    model = MLP()
    model.config = MagicMock()
    model.config.to_dict.return_value = {"model_type": "foobar"}
    with pytest.raises(ValueError, match="Please specify `target_modules`.*'foobar'"):
        lora_ext.get_peft_model(model, lora_ext.LoraConfig())
    assert not any(isinstance(m, lora_ext.layers.LoraLayer) for m in model.modules())


def test_a_regex_default_stays_a_string(monkeypatch):
    monkeypatch.setitem(DEFAULT_TARGET_MODULES, "foobar", r"lin\d")
    model = MLP()
    model.config = MagicMock()
    model.config.to_dict.return_value = {"model_type": "foobar"}
    wrapped = lora_ext.get_peft_model(model, lora_ext.LoraConfig())
    assert wrapped.peft_config["default"].target_modules == r"lin\d"
    assert wrapped.targeted_module_names == ["lin0", "lin1"]


def test_target_parameters_alone_as_peft():
    # Llama: PEFT still adds the model type's default modules; Mixtral (whose checkpoints
    # transformers 5 converts): PEFT targets the parameters only.
    from test_target_parameters import tiny_mixtral
    cases = [(tiny_llama, ["layers.0.mlp.down_proj.weight"]), (tiny_mixtral, ["mlp.experts.down_proj"])]
    for build, params in cases:
        names = []
        for library in (lora_ext, peft):
            torch.manual_seed(0)
            model = library.get_peft_model(build(), library.LoraConfig(r=4, target_parameters=params))
            names.append((sorted(model.targeted_module_names), model.peft_config["default"].target_modules))
        assert names[0] == names[1], build.__name__
