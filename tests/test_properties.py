"""Property tests (hypothesis): every op against its reference over random shapes, dtypes,
strides, dropout rates and seeds. Each family adds its strategies here."""
import pytest
import torch

from lora_ext import ops, reference
from lora_testing import assert_matches_reference, make_lora_inputs

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)
DTYPES = st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16])
LAYOUTS = st.sampled_from([None, "transposed", "strided"])
SEEDS = st.integers(min_value=-(2**63), max_value=2**64 - 1)


@SETTINGS
@given(rows=st.integers(0, 9), lead=st.integers(1, 3), in_features=st.integers(1, 70),
       out_features=st.integers(1, 50), r=st.integers(1, 17), dtype=DTYPES, bias=st.booleans(),
       x_layout=LAYOUTS, weight_layout=LAYOUTS, dropout_p=st.sampled_from([0.0, 0.1, 0.5, 0.9]),
       seed=SEEDS, offset=st.integers(0, 2**40), scaling=st.floats(-4, 4, allow_nan=False))
def test_lora_linear_matches_its_reference(rows, lead, in_features, out_features, r, dtype, bias, x_layout,
                                           weight_layout, dropout_p, seed, offset, scaling):
    layouts = {k: v for k, v in (("x", x_layout), ("weight", weight_layout)) if v}
    inputs = make_lora_inputs((lead, rows, in_features), out_features, r, dtype=dtype, bias=bias,
                              layouts=layouts)
    assert_matches_reference(inputs, scaling=scaling, dropout_p=dropout_p, seed=seed, offset=offset)


@SETTINGS
@given(shape=st.lists(st.integers(0, 13), min_size=1, max_size=3), dropout_p=st.floats(0, 0.99),
       seed=SEEDS, offset=st.integers(-(2**63), 2**64 - 1))
def test_dropout_mask_matches_its_reference_bit_for_bit(shape, dropout_p, seed, offset):
    like = torch.empty(shape)
    assert torch.equal(ops.dropout_mask(like, dropout_p, seed, offset),
                       reference.dropout_mask(like, dropout_p, seed, offset))
