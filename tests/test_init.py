"""lora_ext.init against PEFT 0.21's own layers: with the same torch seed, the same A, B and
(PiSSA/OLoRA) base weight, to the bit."""
import warnings

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Conv2d as PeftConv2d
from peft.tuners.lora.layer import Embedding as PeftEmbedding
from peft.tuners.lora.layer import Linear as PeftLinear
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora_ext.init import create_lora_parameters, init_lora_weights

R, ALPHA = 4, 6
SCALING = ALPHA / R
SEED = 7
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


def _peft_layer(kind, dtype, init, lora_bias=False):
    """(peft layer, its base weight before PEFT touched it), the base built before seeding."""
    torch.manual_seed(0)
    if kind == "linear":
        base = nn.Linear(24, 20, bias=True)
    elif kind == "conv1d":  # transformers Conv1D: weight [in, out], fan_in_fan_out
        base = Conv1D(20, 24)
    elif kind == "embedding":
        base = nn.Embedding(30, 16)
    else:
        base = nn.Conv2d(6, 10, 3, stride=1, padding=1)
    base = base.to(dtype)
    original = base.weight.detach().clone()
    config = LoraConfig(r=R, lora_alpha=ALPHA, init_lora_weights=init, lora_bias=lora_bias,
                        fan_in_fan_out=kind == "conv1d")
    torch.manual_seed(SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind in ("linear", "conv1d"):
            layer = PeftLinear(base, "default", config=config, r=R, lora_alpha=ALPHA,
                               is_target_conv_1d_layer=kind == "conv1d")
        elif kind == "embedding":
            layer = PeftEmbedding(base, "default", config=config, r=R, lora_alpha=ALPHA)
        else:
            layer = PeftConv2d(base, "default", config=config, r=R, lora_alpha=ALPHA)
    return layer, original


def _peft_factors(layer, kind):
    if kind == "embedding":
        return layer.lora_embedding_A["default"], layer.lora_embedding_B["default"], None
    bias = layer.lora_B["default"].bias
    return layer.lora_A["default"].weight, layer.lora_B["default"].weight, bias


def _ours(kind, dtype, init, original, lora_bias=False):
    torch.manual_seed(SEED)
    if kind == "conv2d":
        A, B, bias = create_lora_parameters("conv2d", 6, 10, R, kernel_size=3, stride=1, padding=1,
                                            lora_bias=lora_bias)
    elif kind == "embedding":
        A, B, bias = create_lora_parameters("embedding", 30, 16, R)
    else:
        A, B, bias = create_lora_parameters("linear", 24, 20, R, lora_bias=lora_bias)
    # PEFT casts the adapter to the base dtype: hold it there, as the module docs say
    A, B = A.to(dtype), B.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    layer_kind = "linear" if kind == "conv1d" else kind
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        new_weight = init_lora_weights(A, B, init, base_weight=original, r=R, scaling=SCALING,
                                       fan_in_fan_out=kind == "conv1d", layer_kind=layer_kind,
                                       lora_B_bias=bias)
    return A, B, bias, new_weight


def _assert_same_as_peft(kind, dtype, init, lora_bias=False, modifies_base=False):
    layer, original = _peft_layer(kind, dtype, init, lora_bias)
    A, B, bias, new_weight = _ours(kind, dtype, init, original, lora_bias)
    peft_A, peft_B, peft_bias = _peft_factors(layer, kind)
    assert A.dtype == peft_A.dtype == dtype
    assert torch.equal(A, peft_A), "lora_A differs from PEFT's"
    assert torch.equal(B, peft_B), "lora_B differs from PEFT's"
    if lora_bias:
        assert torch.equal(bias, peft_bias), "lora_B bias differs from PEFT's"
    base_weight = layer.get_base_layer().weight
    if modifies_base:
        assert new_weight is not None and new_weight.dtype == dtype
        assert torch.equal(new_weight, base_weight), "new base weight differs from PEFT's"
        assert not torch.equal(new_weight, original)
    else:
        assert new_weight is None and torch.equal(base_weight, original)
    return A, B, new_weight


# ================================================================ equal to PEFT


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("kind", ["linear", "conv1d", "embedding", "conv2d"])
@pytest.mark.parametrize("init", [True, "gaussian", False])
def test_plain_inits_match_peft(kind, init, dtype):
    A, B, _ = _assert_same_as_peft(kind, dtype, init)
    if init is not False:  # an initialised LoRA adapter starts as a no-op
        assert not A.any() if kind == "embedding" else not B.any()


@pytest.mark.parametrize("init", [True, False])
def test_lora_bias_init_matches_peft(init):
    _assert_same_as_peft("linear", torch.float32, init, lora_bias=True)


@pytest.mark.parametrize("init", ["gaussian", "pissa", "olora"])
def test_lora_bias_with_other_inits_is_rejected_as_peft_does(init):
    with pytest.raises(ValueError, match="only supported with init_lora_weights=True or False"):
        LoraConfig(init_lora_weights=init, lora_bias=True)
    with pytest.raises(ValueError, match="only supported with init True or False"):
        init_lora_weights(*_linear_factors(), init, base_weight=torch.randn(20, 24), r=R,
                          scaling=1.0, lora_B_bias=torch.empty(20))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4"])
def test_pissa_matches_peft(kind, init, dtype):
    A, B, new_weight = _assert_same_as_peft(kind, dtype, init, modifies_base=True)
    if dtype == torch.float32:  # W_res + s B A reconstructs W
        layer, original = _peft_layer(kind, dtype, init)
        delta = SCALING * B @ A
        rebuilt = new_weight + (delta.t() if kind == "conv1d" else delta)
        torch.testing.assert_close(rebuilt, original, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_olora_matches_peft(dtype):
    A, B, _ = _assert_same_as_peft("linear", dtype, "olora", modifies_base=True)
    if dtype == torch.float32:  # B has orthonormal columns, A is upper triangular
        torch.testing.assert_close(B.T @ B, torch.eye(R), rtol=0, atol=1e-5)
        assert torch.equal(A[:, :R], torch.triu(A[:, :R]))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_svd_inits_on_an_embedding_fall_back_like_peft_and_warn(init):
    _assert_same_as_peft("embedding", torch.float32, init)
    A, B = torch.empty(R, 30), torch.empty(16, R)
    with pytest.warns(UserWarning, match="does not apply"):
        init_lora_weights(A, B, init, base_weight=torch.randn(30, 16), r=R, scaling=SCALING,
                          layer_kind="embedding")


def test_pissa_with_the_same_seed_is_reproducible_and_another_seed_differs():
    w = torch.randn(20, 24)
    results = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        A, B = torch.empty(R, 24), torch.empty(20, R)
        init_lora_weights(A, B, "pissa_niter_1", base_weight=w, r=R, scaling=SCALING)
        results.append(A)
    assert torch.equal(results[0], results[1]) and not torch.equal(results[0], results[2])


# ================================================================ bad input


def _linear_factors():
    return torch.empty(R, 24), torch.empty(20, R)


def test_unknown_init_is_rejected():
    with pytest.raises(ValueError, match="unknown initialisation 'kaiming'"):
        init_lora_weights(*_linear_factors(), "kaiming", r=R, scaling=1.0)


def test_malformed_pissa_niter_is_rejected():
    with pytest.raises(ValueError, match="'pissa_niter_<n>'"):
        init_lora_weights(*_linear_factors(), "pissa_niter_x", base_weight=torch.randn(20, 24),
                          r=R, scaling=1.0)


def test_peft_inits_we_do_not_implement_say_so():
    with pytest.raises(NotImplementedError, match="'corda'"):
        init_lora_weights(*_linear_factors(), "corda", r=R, scaling=1.0)


def test_loftq_needs_its_config_and_a_base_weight():
    with pytest.raises(ValueError, match="needs loftq_config"):
        init_lora_weights(*_linear_factors(), "loftq", base_weight=torch.randn(20, 24), r=R, scaling=1.0)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16 base weight"):
        init_lora_weights(*_linear_factors(), "loftq", r=R, scaling=1.0,
                          loftq_config={"loftq_bits": 4, "loftq_iter": 1})


def test_non_bool_non_string_init_is_rejected():
    with pytest.raises(TypeError, match="True, False or a string"):
        init_lora_weights(*_linear_factors(), 1, r=R, scaling=1.0)


def test_pissa_without_a_base_weight_is_rejected():
    with pytest.raises(TypeError, match="needs base_weight"):
        init_lora_weights(*_linear_factors(), "pissa", r=R, scaling=1.0)


def test_pissa_on_an_integer_base_weight_is_rejected():
    with pytest.raises(TypeError, match="float32, float16 or bfloat16 base weight"):
        init_lora_weights(*_linear_factors(), "pissa", base_weight=torch.zeros(20, 24, dtype=torch.int8),
                          r=R, scaling=1.0)


def test_pissa_with_a_mismatched_base_weight_is_rejected():
    with pytest.raises(ValueError, match=r"needs lora_A \[4, 20\]"):
        init_lora_weights(*_linear_factors(), "pissa", base_weight=torch.randn(24, 20), r=R,
                          scaling=1.0)


def test_rank_above_the_base_weight_rank_is_rejected():
    A, B = torch.empty(8, 6), torch.empty(5, 8)
    with pytest.raises(ValueError, match="r <= min"):
        init_lora_weights(A, B, "olora", base_weight=torch.randn(5, 6), r=8, scaling=1.0)


def test_olora_with_fan_in_fan_out_is_rejected():
    with pytest.raises(ValueError, match="fan_in_fan_out"):
        init_lora_weights(*_linear_factors(), "olora", base_weight=torch.randn(24, 20), r=R,
                          scaling=1.0, fan_in_fan_out=True)


def test_svd_init_on_conv2d_is_rejected():
    A, B = torch.empty(R, 6, 3, 3), torch.empty(10, R, 1, 1)
    with pytest.raises(ValueError, match="not supported for conv2d"):
        init_lora_weights(A, B, "pissa", base_weight=torch.randn(10, 6, 3, 3), r=R, scaling=1.0,
                          layer_kind="conv2d")


def test_unknown_layer_kind_is_rejected():
    with pytest.raises(ValueError, match="layer_kind must be one of"):
        init_lora_weights(*_linear_factors(), True, r=R, scaling=1.0, layer_kind="conv4d")


def test_wrong_rank_rows_are_rejected():
    with pytest.raises(ValueError, match="r = 5 rows"):
        init_lora_weights(*_linear_factors(), True, r=5, scaling=1.0)


def test_wrong_factor_dimensions_are_rejected():
    with pytest.raises(ValueError, match="must be 4-D for a conv2d"):
        init_lora_weights(*_linear_factors(), True, r=R, scaling=1.0, layer_kind="conv2d")


def test_non_finite_scaling_is_rejected():
    with pytest.raises(ValueError, match="scaling must be a finite number"):
        init_lora_weights(*_linear_factors(), True, r=R, scaling=float("nan"))


def test_non_positive_rank_is_rejected():
    with pytest.raises(ValueError, match="r must be a positive int"):
        init_lora_weights(*_linear_factors(), True, r=0, scaling=1.0)


def test_integer_factors_are_rejected():
    with pytest.raises(TypeError, match="floating point"):
        init_lora_weights(torch.zeros(R, 24, dtype=torch.long), torch.empty(20, R), True, r=R,
                          scaling=1.0)


def test_create_rejects_bad_sizes_and_embedding_bias():
    with pytest.raises(ValueError, match="in_features must be a positive int"):
        create_lora_parameters("linear", 0, 4, 2)
    with pytest.raises(ValueError, match="lora_bias is not supported for embeddings"):
        create_lora_parameters("embedding", 4, 4, 2, lora_bias=True)
    with pytest.raises(ValueError, match="divisible by groups"):
        create_lora_parameters("conv2d", 4, 4, 3, groups=2)
