"""LoRA (and DoRA) on nn.Conv1d and nn.Conv3d against the real PEFT: adapters saved by either
library load in the other with the same files and numbers (outputs and gradients by the
tolerance rule), merging, weighted adapters, mixed batches and the refusals PEFT has."""
import warnings

import peft
import pytest
import torch
from torch import nn

import lora_ext
from peft_twins import assert_same_files, assert_same_numbers, assert_same_state, randomize_adapters, run

BATCH = 3


class ConvNdNet(nn.Module):
    """Conv1d -> grouped 1x1 Conv1d -> Conv3d (3x3x3) -> Conv3d (1x1x1) -> Linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(4, 8, 3, padding=1)
        self.grouped = nn.Conv1d(8, 8, 1, groups=2)
        self.conv3 = nn.Conv3d(2, 6, 3, padding=1, bias=False)
        self.point3 = nn.Conv3d(6, 6, 1)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        h = torch.relu(self.grouped(torch.relu(self.conv1(x))))   # [B, 8, 16]
        h = h.reshape(h.shape[0], 2, 4, 4, 4)
        h = torch.relu(self.point3(torch.relu(self.conv3(h))))
        return self.head(h.mean(dim=(2, 3, 4)))


def base(seed=0):
    torch.manual_seed(seed)
    return ConvNdNet()


def inputs(seed=5):
    return {"x": torch.randn(BATCH, 4, 16, generator=torch.Generator().manual_seed(seed))}


TARGETS = ["conv1", "grouped", "conv3", "point3"]
DORA_TARGETS = ["conv1", "conv3", "point3"]  # DoRA needs groups=1, in both libraries


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "groups > 1: merging is not supported", in both libraries
        yield


def peft_saved(tmp_path, **config):
    config.setdefault("target_modules", TARGETS)
    theirs = peft.get_peft_model(base(), peft.LoraConfig(r=4, lora_alpha=8, **config))
    randomize_adapters(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    ours = lora_ext.PeftModel.from_pretrained(base(), tmp_path / "peft", is_trainable=True)
    return ours, theirs


def ours_saved(tmp_path, **config):
    config.setdefault("target_modules", TARGETS)
    ours = lora_ext.get_peft_model(base(), lora_ext.LoraConfig(r=4, lora_alpha=8, **config))
    randomize_adapters(ours)
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(base(), tmp_path / "ours", is_trainable=True)
    return ours, theirs


@pytest.mark.parametrize("saver", [peft_saved, ours_saved])
@pytest.mark.parametrize("config", [{}, {"use_dora": True, "target_modules": DORA_TARGETS},
                                    {"use_rslora": True, "rank_pattern": {"conv3": 2}, "alpha_pattern": {"conv1": 3}}],
                         ids=["lora", "dora", "patterns"])
def test_adapters_cross_over_with_the_same_numbers(saver, config, tmp_path):
    ours, theirs = saver(tmp_path, **config)
    assert type(ours.base_model.model.conv1).__name__ == "Conv1d"
    assert type(ours.base_model.model.conv3).__name__ == "Conv3d"
    assert_same_numbers(ours.eval(), theirs.eval(), inputs(), what="eval")
    assert_same_numbers(ours.train(), theirs.train(), inputs(), grads=True, what="train")
    ours.save_pretrained(tmp_path / "again_ours")
    theirs.save_pretrained(tmp_path / "again_theirs")
    assert_same_files(tmp_path / "again_ours", tmp_path / "again_theirs")


def test_fresh_adapters_have_peft_shapes_and_initial_values():
    """The same seed gives PEFT's parameters (shapes, Kaiming A, zero B, DoRA magnitudes)."""
    for config in ({}, {"use_dora": True, "target_modules": DORA_TARGETS}):
        config.setdefault("target_modules", TARGETS)
        torch.manual_seed(1)
        ours = lora_ext.get_peft_model(base(), lora_ext.LoraConfig(r=4, **config))
        torch.manual_seed(1)
        theirs = peft.get_peft_model(base(), peft.LoraConfig(r=4, **config))
        assert_same_state(ours, theirs)
        magnitude = ours.base_model.model.conv3.lora_magnitude_vector
        if magnitude:
            assert magnitude["default"].weight.shape == (1, 6, 1, 1, 1)


# PEFT's merge of a 1x1x1 Conv3d fails (its 1x1 shortcut squeezes only two kernel dimensions),
# so point3 is merged by lora-ext alone, below
@pytest.mark.parametrize("config", [{"target_modules": ["conv1", "conv3"]},
                                    {"use_dora": True, "target_modules": ["conv1", "conv3"]}], ids=["lora", "dora"])
def test_merge_unmerge_and_unload_as_peft(config, tmp_path):
    ours, theirs = peft_saved(tmp_path, **config)
    ours.eval(), theirs.eval()
    for model in (ours, theirs):
        model.merge_adapter()
    assert_same_numbers(ours, theirs, inputs(), what="merged")
    for model in (ours, theirs):
        model.unmerge_adapter()
    assert_same_state(ours, theirs)
    merged, merged_t = ours.merge_and_unload(), theirs.merge_and_unload()
    assert type(merged.conv3) is nn.Conv3d and type(merged.conv1) is nn.Conv1d
    assert_same_state(merged, merged_t)


@pytest.mark.parametrize("use_dora", [False, True])
def test_merging_a_pointwise_conv3d_keeps_peft_s_outputs(use_dora, tmp_path):
    ours, theirs = peft_saved(tmp_path, target_modules=["point3"], use_dora=use_dora)
    ours.eval(), theirs.eval()
    ours.merge_adapter()
    assert_same_numbers(ours, theirs, inputs(), what="merged 1x1x1")
    ours.unmerge_adapter()
    assert_same_state(ours, theirs)


def test_merging_a_grouped_conv_is_refused_as_in_peft(tmp_path):
    ours, theirs = peft_saved(tmp_path)
    for model in (ours, theirs):
        with pytest.raises(NotImplementedError, match="Merging is not supported for _ConvNd layers with groups > 1"):
            model.merge_adapter()


@pytest.mark.parametrize("saver", [peft_saved, ours_saved])
def test_dora_on_a_grouped_conv_as_peft(saver, tmp_path):
    """PEFT's DoRA norm on a grouped conv (its reshaped B·A) and its outputs and gradients."""
    ours, theirs = saver(tmp_path, target_modules=["grouped", "conv1"], use_dora=True)
    magnitude = ours.base_model.model.grouped.lora_magnitude_vector["default"].weight
    assert magnitude.shape == (1, 8, 1)
    assert_same_numbers(ours.eval(), theirs.eval(), inputs(), what="eval")
    assert_same_numbers(ours.train(), theirs.train(), inputs(), grads=True, what="train")


class GroupedConv2d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("make, target", [(base, "grouped"), (GroupedConv2d, "conv")], ids=["conv1d", "conv2d"])
def test_dora_norm_of_a_grouped_conv_is_peft_s(make, target):
    """With random factors (where the layout of B·A shows), our norm is PEFT's."""
    models = []
    for lib in (peft, lora_ext):
        torch.manual_seed(0)
        model = lib.get_peft_model(make(), lib.LoraConfig(r=4, target_modules=[target], use_dora=True))
        randomize_adapters(model)
        models.append(getattr(model.base_model.model, target))
    theirs, ours = models
    weight = theirs.base_layer.weight
    dora = theirs.lora_magnitude_vector["default"]
    lora_weight = dora.get_lora_weight(theirs.lora_A["default"], theirs.lora_B["default"]).reshape(weight.shape)
    want = dora.get_weight_norm(weight, lora_weight, theirs.scaling["default"]).reshape(-1)
    torch.testing.assert_close(lora_ext.layers.dora.layer_weight_norm(ours, "default"), want)
    x = torch.randn(2, *((4, 5, 5) if make is GroupedConv2d else (8, 16)))
    torch.testing.assert_close(ours.eval()(x), theirs.eval()(x), rtol=1e-5, atol=1e-6)


def test_rank_not_divisible_by_groups_is_refused_as_in_peft():
    for lib in (peft, lora_ext):
        with pytest.raises(ValueError, match="Targeting a Conv1d with groups=2 and rank 3"):
            lib.get_peft_model(base(), lib.LoraConfig(r=3, target_modules=["grouped"]))


@pytest.mark.parametrize("combination_type", ["linear", "cat"])
def test_weighted_adapters_as_peft(combination_type, tmp_path):
    models = []
    for lib in (peft, lora_ext):
        model = lib.get_peft_model(base(), lib.LoraConfig(r=4, target_modules=["conv1", "conv3"]), adapter_name="a")
        model.add_adapter("b", lib.LoraConfig(r=4, lora_alpha=6, target_modules=["conv1", "conv3"]))
        randomize_adapters(model)
        model.add_weighted_adapter(["a", "b"], [0.6, 0.4], "mix", combination_type=combination_type)
        model.set_adapter("mix")
        models.append(model.eval())
    theirs, ours = models
    assert_same_state(ours, theirs)
    assert_same_numbers(ours, theirs, inputs(), what=combination_type)


def test_svd_weighted_adapter_reproduces_the_combined_delta():
    """PEFT's svd combination flattens only 2-D kernels; ours flattens every conv kernel,
    so at full rank the combined update is exactly the weighted sum of the deltas."""
    model = lora_ext.get_peft_model(base(), lora_ext.LoraConfig(r=2, target_modules=["conv1", "conv3"]),
                                    adapter_name="a")
    model.add_adapter("b", lora_ext.LoraConfig(r=2, target_modules=["conv1", "conv3"]))
    randomize_adapters(model)
    model.add_weighted_adapter(["a", "b"], [0.6, 0.4], "mix", combination_type="svd", svd_rank=4)
    for layer in (model.base_model.model.conv1, model.base_model.model.conv3):
        want = 0.6 * layer.get_delta_weight("a") + 0.4 * layer.get_delta_weight("b")
        assert layer.lora_A["mix"].weight.dim() == layer.weight.dim()
        torch.testing.assert_close(layer.get_delta_weight("mix"), want, rtol=1e-4, atol=1e-5)


def test_mixed_batch_adapter_names_as_peft():
    models = []
    for lib in (peft, lora_ext):
        model = lib.get_peft_model(base(), lib.LoraConfig(r=4, target_modules=TARGETS), adapter_name="a")
        model.add_adapter("b", lib.LoraConfig(r=4, lora_alpha=6, target_modules=["conv1", "point3"]))
        randomize_adapters(model)
        models.append(model.eval())
    theirs, ours = models
    names = ["a", "__base__", "b"]
    y, y_t = ours(**inputs(), adapter_names=names), theirs(**inputs(), adapter_names=names)
    torch.testing.assert_close(y, y_t, rtol=1e-5, atol=1e-6)


def test_half_base_with_fp32_adapters_returns_the_base_dtype():
    models = []
    for lib in (peft, lora_ext):
        model = lib.get_peft_model(base().to(torch.bfloat16), lib.LoraConfig(r=4, target_modules=["conv1", "conv3"]))
        randomize_adapters(model)
        models.append(model.eval())
    theirs, ours = models
    x = inputs()["x"].to(torch.bfloat16)
    assert ours.base_model.model.conv3.lora_A["default"].weight.dtype == torch.float32
    y, y_t = run(ours, {"x": x})[0], run(theirs, {"x": x})[0]
    assert y.dtype == y_t.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_t)
