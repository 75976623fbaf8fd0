"""Fused Embedding LoRA (lora_ext.ops.lora_embedding) against lora_ext.reference, the oracle
(PEFT's lora.Embedding forward), under the tolerance rule."""
import math

import pytest
import torch

from lora_ext import ops, reference
from lora_testing import DEVICES, assert_within_torch_error, random_like, relayout

# (table dtype, adapter dtype): one dtype, or PEFT's fp32 adapters over a half table
DTYPES = [(torch.float32, torch.float32), (torch.float64, torch.float64),
          (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
          (torch.bfloat16, torch.float32), (torch.float16, torch.float32)]


def dtypes_id(pair):
    return "-".join(str(d).removeprefix("torch.") for d in pair)


def make(num, dim, r, idx_shape, dtypes=(torch.float32, torch.float32), device="cpu", seed=0,
         weight_grad=False, idx=None):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return torch.randn(shape, generator=gen, dtype=torch.float64) * std

    wd, ad = dtypes
    weight = randn(num, dim).to(device, wd).requires_grad_(weight_grad)
    lora_A = randn(r, num).to(device, ad).requires_grad_()
    lora_B = randn(dim, r, std=1 / math.sqrt(r)).to(device, ad).requires_grad_()
    if idx is None:
        idx = torch.randint(0, num, idx_shape, generator=gen)
    return idx.to(device), weight, lora_A, lora_B


def _run(fn, idx, tensors, grad_y, scaling, padding_idx):
    y = fn(idx, *tensors, scaling, padding_idx)
    leaves = [t for t in tensors if t.requires_grad]
    if grad_y is None or not leaves:
        return y, []
    return y, list(torch.autograd.grad(y, leaves, grad_y))


def assert_matches_reference(idx, weight, lora_A, lora_B, scaling=1.5, padding_idx=None,
                             grad_layout=None):
    tensors = (weight, lora_A, lora_B)
    grad_y = random_like((*idx.shape, weight.shape[1]), weight.dtype, weight.device, seed=5)
    if grad_layout is not None:
        grad_y = relayout(grad_y, grad_layout)
    y, grads = _run(ops.lora_embedding, idx, tensors, grad_y, scaling, padding_idx)
    y_t, grads_t = _run(reference.lora_embedding, idx, tensors, grad_y, scaling, padding_idx)

    def cast(fn=None):
        return tuple((t.detach().double() if fn is None else fn(t.detach().double())).requires_grad_(t.requires_grad)
                     for t in tensors)
    y_o, grads_o = _run(reference.lora_embedding, idx, cast(), grad_y.double(), scaling, padding_idx)
    y_m, grads_m = _run(reference.lora_embedding, idx, cast(torch.abs), grad_y.double().abs(), abs(scaling),
                        padding_idx)
    assert_within_torch_error(y, y_t, y_o, y_m, "y")
    names = [n for n, t in zip(("weight", "lora_A", "lora_B"), tensors) if t.requires_grad]
    assert len(grads) == len(names)
    for name, g, g_t, g_o, g_m in zip(names, grads, grads_t, grads_o, grads_m):
        assert g.dtype == dict(zip(("weight", "lora_A", "lora_B"), tensors))[name].dtype
        assert_within_torch_error(g, g_t, g_o, g_m, f"grad of {name}")


# ================================================================ accuracy vs reference


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtypes", DTYPES, ids=dtypes_id)
@pytest.mark.parametrize("padding_idx", [None, 2, -1])
@pytest.mark.parametrize("weight_grad", [False, True], ids=["frozen", "trained"])
def test_matches_reference_per_dtype(device, dtypes, padding_idx, weight_grad):
    idx, *tensors = make(40, 29, 7, (3, 11), dtypes, device, weight_grad=weight_grad)
    idx[0, :4] = 2  # repeated tokens, some on the padding index
    idx[1, 0] = 39
    assert_matches_reference(idx, *tensors, padding_idx=padding_idx)


@pytest.mark.parametrize("dtypes", [DTYPES[0], DTYPES[2], DTYPES[5]], ids=dtypes_id)
@pytest.mark.parametrize("idx_shape", [(), (1,), (6,), (2, 3), (2, 2, 3)], ids=str)
@pytest.mark.parametrize("num,dim,r", [(1, 1, 1), (13, 37, 1), (7, 33, 16), (300, 65, 3),
                                       (20, 129, 64)], ids=str)
def test_odd_shapes(dtypes, idx_shape, num, dim, r):
    idx, *tensors = make(num, dim, r, idx_shape, dtypes, weight_grad=True)
    assert_matches_reference(idx, *tensors)


def test_every_token_on_one_index_sums_into_one_column():
    idx, weight, lora_A, lora_B = make(9, 16, 4, (50,), weight_grad=True, idx=torch.full((50,), 4))
    assert_matches_reference(idx, weight, lora_A, lora_B)
    y = ops.lora_embedding(idx, weight, lora_A, lora_B, 2.0)
    grad_w, grad_a = torch.autograd.grad(y.sum(), [weight, lora_A])
    others = torch.arange(9) != 4
    assert torch.equal(grad_a[:, others], torch.zeros_like(grad_a[:, others]))
    assert torch.equal(grad_w[others], torch.zeros_like(grad_w[others]))
    torch.testing.assert_close(grad_w[4], torch.full((16,), 50.0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("idx_shape", [(0,), (2, 0), (0, 3)], ids=str)
def test_empty_input(device, idx_shape):
    idx, weight, lora_A, lora_B = make(5, 6, 2, idx_shape, device=device, weight_grad=True)
    y = ops.lora_embedding(idx, weight, lora_A, lora_B, 1.0)
    assert y.shape == (*idx_shape, 6) and y.dtype == weight.dtype
    y.sum().backward()
    for t in (weight, lora_A, lora_B):
        assert t.grad is not None and torch.equal(t.grad, torch.zeros_like(t))


@pytest.mark.parametrize("padding_idx,normalised", [(3, 3), (-2, 4)])
def test_padding_idx_blocks_only_the_table_gradients(padding_idx, normalised):
    idx = torch.tensor([[normalised, 0, normalised], [1, normalised, 5]])
    _, weight, lora_A, lora_B = make(6, 8, 3, None, weight_grad=True, idx=idx)
    y = ops.lora_embedding(idx, weight, lora_A, lora_B, 0.5, padding_idx)
    # the forward reads the padding row as any other (F.embedding does too)
    torch.testing.assert_close(y, ops.lora_embedding(idx, weight, lora_A, lora_B, 0.5))
    grad_w, grad_a, grad_b = torch.autograd.grad(y.square().sum(), [weight, lora_A, lora_B])
    assert torch.equal(grad_w[normalised], torch.zeros(8))
    assert torch.equal(grad_a[:, normalised], torch.zeros(3))
    assert grad_w[0].abs().sum() > 0 and grad_a[:, 1].abs().sum() > 0
    # lora_B still learns from the padding tokens: their after-A values are nonzero
    _, _, grad_b_without = torch.autograd.grad(
        ops.lora_embedding(idx[:, 1:2], weight, lora_A, lora_B, 0.5, padding_idx).square().sum(),
        [weight, lora_A, lora_B])
    assert not torch.allclose(grad_b, grad_b_without)


@pytest.mark.parametrize("layouts", [{"weight": "strided"}, {"lora_A": "transposed"},
                                     {"lora_B": "transposed"}, {"lora_A": "strided"}], ids=str)
def test_non_contiguous_inputs(layouts):
    idx, weight, lora_A, lora_B = make(17, 12, 5, (4, 6), weight_grad=True)
    named = {"weight": weight, "lora_A": lora_A, "lora_B": lora_B}
    for name, how in layouts.items():
        named[name] = relayout(named[name].detach(), how).requires_grad_()
        assert not named[name].is_contiguous()
    assert_matches_reference(idx, *named.values())


def test_non_contiguous_incoming_gradient_and_int32_indices():
    idx, *tensors = make(17, 12, 5, (4, 6), weight_grad=True)
    assert_matches_reference(idx.to(torch.int32), *tensors, grad_layout="strided")


def test_matches_peft_embedding_layer_numbers():
    """The op reproduces PEFT's own lora.Embedding for one adapter (fp32 adapters over bf16)."""
    from peft import LoraConfig, get_peft_model

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(30, 16, padding_idx=1)

    torch.manual_seed(0)
    model = get_peft_model(Net().to(torch.bfloat16), LoraConfig(target_modules=["emb"], r=4, lora_alpha=8,
                                                              init_lora_weights=False))
    layer = model.base_model.model.emb
    assert layer.lora_embedding_A["default"].dtype == torch.float32  # autocast_adapter_dtype
    idx = torch.randint(0, 30, (3, 9))
    ours = ops.lora_embedding(idx, layer.base_layer.weight, layer.lora_embedding_A["default"],
                              layer.lora_embedding_B["default"], layer.scaling["default"], 1)
    assert_matches_reference(idx, layer.base_layer.weight, layer.lora_embedding_A["default"],
                             layer.lora_embedding_B["default"], layer.scaling["default"], 1)
    peft = layer(idx)
    assert ours.dtype == peft.dtype == torch.bfloat16
    assert (ours.float() - peft.float()).abs().max() <= 2 * torch.finfo(torch.bfloat16).eps * peft.float().abs().max()


# ================================================================ op contracts


def _forward_args(device="cpu", dtypes=(torch.float32, torch.float32), idx_shape=(3, 5), padding_idx=-1):
    idx, weight, lora_A, lora_B = make(11, 9, 3, idx_shape, dtypes, device, weight_grad=True)
    return (idx, weight, lora_A, lora_B, 0.75, padding_idx)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kwargs", [{}, {"dtypes": DTYPES[5]}, {"idx_shape": (7,)}, {"idx_shape": (0,)},
                                    {"padding_idx": 2}, {"dtypes": DTYPES[1]}], ids=str)
def test_opcheck_forward(device, kwargs):
    torch.library.opcheck(torch.ops.lora_ext.lora_embedding_forward.default, _forward_args(device, **kwargs))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("output_mask", [[True, True, True], [False, True, True], [True, False, False],
                                         [False, False, True], [False, False, False]], ids=str)
@pytest.mark.parametrize("dtypes", [DTYPES[0], DTYPES[4]], ids=dtypes_id)
def test_opcheck_backward(device, output_mask, dtypes):
    idx, weight, lora_A, lora_B, scaling, pad = _forward_args(device, dtypes, padding_idx=1)
    grad_y = random_like((*idx.shape, weight.shape[1]), weight.dtype, device)
    args = (grad_y, idx, lora_A.detach(), lora_B.detach(), scaling, pad, output_mask)
    torch.library.opcheck(torch.ops.lora_ext.lora_embedding_backward.default, args)
    grads = torch.ops.lora_ext.lora_embedding_backward(*args)
    for needed, grad, like in zip(output_mask, grads, (weight, lora_A, lora_B)):
        assert grad.shape == (like.shape if needed else (0,))
        assert grad.dtype == like.dtype


def test_compile_fullgraph_inductor_matches_eager():
    torch._dynamo.reset()

    def step(idx, weight, lora_A, lora_B):
        y = ops.lora_embedding(idx, weight, lora_A, lora_B, 0.5, 0)
        return torch.nn.functional.gelu(y).square().mean()

    idx, weight, lora_A, lora_B = make(13, 10, 4, (2, 7), weight_grad=True)
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    results = {}
    for name, fn in (("eager", step), ("compiled", compiled)):
        loss = fn(idx, weight, lora_A, lora_B)
        results[name] = [loss, *torch.autograd.grad(loss, [weight, lora_A, lora_B])]
    for got, want in zip(results["compiled"], results["eager"]):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("padding_idx", [None, 1])
@pytest.mark.parametrize("idx_shape", [(6,), (2, 3), ()], ids=str)
def test_gradcheck_fp64(padding_idx, idx_shape):
    idx, weight, lora_A, lora_B = make(5, 4, 2, idx_shape, (torch.float64,) * 2, weight_grad=True)
    assert torch.autograd.gradcheck(
        lambda w, a, b: ops.lora_embedding(idx, w, a, b, 0.7, padding_idx), (weight, lora_A, lora_B))


def test_double_backward_matches_reference():
    idx, weight, lora_A, lora_B = make(6, 5, 3, (2, 4), (torch.float64,) * 2, weight_grad=True)
    grad_y = random_like((2, 4, 5), torch.float64, "cpu")
    results = []
    for fn in (ops.lora_embedding, reference.lora_embedding):
        y = fn(idx, weight, lora_A, lora_B, 0.7, 2)
        grads = torch.autograd.grad(y, [lora_A, lora_B], grad_y, create_graph=True)
        penalty = sum(g.square().sum() for g in grads)
        results.append(torch.autograd.grad(penalty, [lora_A, lora_B]))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)
    assert torch.autograd.gradgradcheck(
        lambda a, b: ops.lora_embedding(idx, weight.detach(), a, b, 0.7), (lora_A, lora_B))


def test_in_place_update_before_backward_is_caught():
    idx, weight, lora_A, lora_B = make(6, 5, 3, (4,))
    y = ops.lora_embedding(idx, weight, lora_A, lora_B, 1.0)
    with torch.no_grad():
        lora_B.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


# ================================================================ bad input


def _bad(**changes):
    idx, weight, lora_A, lora_B = make(6, 5, 3, (4,))
    args = {"indices": idx, "weight": weight.detach(), "lora_A": lora_A.detach(), "lora_B": lora_B.detach(),
            "scaling": 1.0, "padding_idx": None}
    args.update({k: (v(args) if callable(v) else v) for k, v in changes.items()})
    return args


BAD = {
    "float indices": (dict(indices=lambda a: a["indices"].float()), TypeError, "indices must be int64 or int32"),
    "int weight": (dict(weight=lambda a: a["weight"].long()), TypeError, "weight has dtype torch.int64"),
    "A/B dtypes": (dict(lora_B=lambda a: a["lora_B"].double()), TypeError, "lora_B has torch.float64"),
    "bf16 adapters over fp32": (dict(lora_A=lambda a: a["lora_A"].bfloat16(), lora_B=lambda a: a["lora_B"].bfloat16()),
                                TypeError, "adapters in torch.bfloat16 over a torch.float32 table"),
    "1-D weight": (dict(weight=lambda a: a["weight"][0]), ValueError, "weight must be 2-D"),
    "A shape": (dict(lora_A=lambda a: a["lora_A"].T), ValueError, r"lora_A must have shape \[r, 6\]"),
    "B shape": (dict(lora_B=lambda a: a["lora_B"][:, :2]), ValueError, r"lora_B must have shape \[5, 3\]"),
    "nan scaling": (dict(scaling=float("nan")), ValueError, "scaling must be a finite float"),
    "padding out of range": (dict(padding_idx=6), ValueError, r"padding_idx must be None or an int in \[-6, 6\)"),
    "not a tensor": (dict(lora_A=[[1.0]]), TypeError, "lora_A must be a Tensor, got list"),
}


@pytest.mark.parametrize("changes,error,pattern", BAD.values(), ids=BAD.keys())
def test_bad_input_raises_clear_error(changes, error, pattern):
    with pytest.raises(error, match=pattern):
        ops.lora_embedding(**_bad(**changes))


@pytest.mark.parametrize("bad_index", [6, -1])
def test_index_out_of_range_raises_index_error(bad_index):
    args = _bad(indices=torch.tensor([0, bad_index, 2]))
    with pytest.raises(IndexError, match=f"index {bad_index} is out of range for a table of 6 rows"):
        ops.lora_embedding(**args)
