"""The "lora" benchmark family: one LoRA linear layer, forward + backward."""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._harness import DTYPE_ALIASES, Case, Contestant, Family, Runner, Unavailable, register_family

@dataclass
class LoraInputs:
    """Shared by every contestant of a case: the same storage, never modified."""
    x: torch.Tensor        # [tokens, in], requires grad (as inside a transformer)
    weight: torch.Tensor   # [out, in], frozen
    lora_A: torch.Tensor   # [r, in] values (contestants wrap them as trainable leaves)
    lora_B: torch.Tensor   # [out, r]
    grad_y: torch.Tensor   # [tokens, out]
    scaling: float
    dropout: float
    _ref: dict = field(default_factory=dict)


def _as_features(value) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        i, o = value
        return int(i), int(o)
    if isinstance(value, str) and "x" in value:
        i, o = value.lower().split("x")
        return int(i), int(o)
    return int(value), int(value)


def make_lora_cases(features: Iterable = (1024, 2048), tokens: int | Iterable[int] = 2048,
                    dtypes: Iterable[str] = ("float32", "bfloat16"), ranks: int | Iterable[int] = 16,
                    dropouts: float | Iterable[float] = (0.0, 0.05)) -> list[Case]:
    """Grid of lora cases. features: ints (square in = out), (in, out) pairs or "INxOUT"."""
    def seq(v):
        return [v] if isinstance(v, (int, float, str)) else list(v)
    cases = []
    for feat in seq(features):
        in_f, out_f = _as_features(feat)
        for dtype in seq(dtypes):
            for t in seq(tokens):
                for r in seq(ranks):
                    for p in seq(dropouts):
                        cases.append(Case("lora", DTYPE_ALIASES.get(dtype, dtype), in_f, out_f,
                                          int(t), int(r), float(p)))
    return cases


def make_lora_inputs(case: Case, device: torch.device) -> LoraInputs:
    g = torch.Generator().manual_seed(0)
    dt = case.torch_dtype

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dt)
    x = rand(case.tokens, case.in_features).requires_grad_(True)
    weight = rand(case.out_features, case.in_features, std=case.in_features ** -0.5)
    lora_A = rand(case.r, case.in_features, std=case.in_features ** -0.5)
    lora_B = rand(case.out_features, case.r, std=0.1)   # nonzero (PEFT starts at 0), to compare outputs
    grad_y = rand(case.tokens, case.out_features)
    # LoraConfig(r, lora_alpha=2r): scaling = lora_alpha / r = 2
    return LoraInputs(x, weight, lora_A, lora_B, grad_y, scaling=2.0, dropout=case.dropout)


def _trainable(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach(), requires_grad=True)   # shares storage with t


def _forward_backward(forward: Callable[[], torch.Tensor], wrt: Sequence[torch.Tensor],
                      grad_y: torch.Tensor) -> Callable[[], Any]:
    """One training step of the layer: y = forward(); gradients of y w.r.t. wrt (not accumulated)."""
    wrt = tuple(wrt)

    def step():
        y = forward()
        return torch.autograd.grad(y, wrt, grad_y)
    return step


def _build_base(case: Case, inp: LoraInputs) -> Runner:
    layer = nn.Linear(case.in_features, case.out_features, bias=False, device="meta")
    layer.weight = nn.Parameter(inp.weight, requires_grad=False)
    x = inp.x

    def forward():
        return layer(x)
    return Runner(_forward_backward(forward, [x], inp.grad_y), forward)


def _peft_available(device: torch.device) -> str | None:
    try:
        import peft  # noqa: F401
    except ImportError:
        return "peft is not installed (pip install peft)"
    return None


class _OneLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.proj = linear

    def forward(self, x):
        return self.proj(x)


def _build_peft(case: Case, inp: LoraInputs) -> Runner:
    try:
        import peft
        from peft.tuners.lora.layer import Linear as PeftLoraLinear
    except ImportError as error:
        raise Unavailable(f"peft is not importable: {error}") from error
    device = inp.x.device
    linear = nn.Linear(case.in_features, case.out_features, bias=False, device=device,
                       dtype=case.torch_dtype)
    linear.weight = nn.Parameter(inp.weight, requires_grad=False)
    config = peft.LoraConfig(r=case.r, lora_alpha=2 * case.r, lora_dropout=case.dropout,
                             target_modules=["proj"], bias="none")
    # The adapters are held in the case dtype like every other contestant's (PEFT's default
    # autocast_adapter_dtype=True would keep bf16/fp16 adapters in fp32).
    model = peft.get_peft_model(_OneLinear(linear), config, autocast_adapter_dtype=False)
    model.train()
    layer = model.base_model.model.proj
    if not isinstance(layer, PeftLoraLinear):
        raise Unavailable(f"peft did not produce a LoRA Linear layer (got {type(layer).__name__})")
    layer.base_layer.weight = nn.Parameter(inp.weight, requires_grad=False)
    layer.lora_A["default"].weight = _trainable(inp.lora_A)
    layer.lora_B["default"].weight = _trainable(inp.lora_B)
    if not math.isclose(layer.scaling["default"], inp.scaling):
        raise Unavailable(f"peft scaling {layer.scaling['default']} != {inp.scaling}")
    x = inp.x

    def forward():
        return layer(x)
    wrt = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    return Runner(_forward_backward(forward, wrt, inp.grad_y), forward,
                  info={"peft_version": peft.__version__, "layer": type(layer).__module__ + "."
                        + type(layer).__qualname__})


def _lora_ext_available(device: torch.device) -> str | None:
    if device.type == "cpu":
        return None
    key = {"cuda": "CUDA"}.get(device.type, device.type.upper())
    if not torch._C._dispatch_has_kernel_for_dispatch_key("lora_ext::lora_linear_forward", key):
        return f"lora_ext was built without {key} kernels (see `lora-ext info`)"
    return None


def _build_lora_ext(case: Case, inp: LoraInputs) -> Runner:
    from lora_ext.ops import lora_linear
    x, weight = inp.x, inp.weight
    A, B = _trainable(inp.lora_A), _trainable(inp.lora_B)
    seeds = itertools.count(1)
    scaling, p = inp.scaling, inp.dropout

    def forward():  # a fresh dropout seed per call, as in training
        return lora_linear(x, weight, None, A, B, scaling, p, next(seeds), training=True)
    return Runner(_forward_backward(forward, [x, A, B], inp.grad_y), forward)


def _build_torch(case: Case, inp: LoraInputs) -> Runner:
    x, weight = inp.x, inp.weight
    A, B = _trainable(inp.lora_A), _trainable(inp.lora_B)
    s, p = inp.scaling, inp.dropout

    def forward():
        xd = F.dropout(x, p, training=True) if p > 0 else x
        return F.linear(x, weight) + s * (xd @ A.T) @ B.T
    return Runner(_forward_backward(forward, [x, A, B], inp.grad_y), forward)


def _lora_check(case: Case, inp: LoraInputs, name: str, y: torch.Tensor) -> float | None:
    """Max relative error of a contestant's output against an fp32 reference; None when the
    outputs are not comparable (dropout masks differ between contestants)."""
    with_lora = name != "base"
    if with_lora and case.dropout > 0:
        return None
    if with_lora not in inp._ref:
        x, w = inp.x.detach().float(), inp.weight.float()
        ref = x @ w.T
        if with_lora:
            ref = ref + inp.scaling * (x @ inp.lora_A.float().T) @ inp.lora_B.float().T
        inp._ref[with_lora] = ref
    ref = inp._ref[with_lora]
    return float((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def lora_work(case: Case) -> dict:
    """FLOPs and least bytes of one step (forward, and backward to x, A and B; W frozen).

    forward  x W^T, x A^T, z B^T                         2T(io + ir + ro)
    backward gx = gy W + s (gy B) A, gA, gB              2T(oi + 2or + 2ri)
    bytes: forward reads x, W, A, B and writes y; backward reads gy, x, W, A, B and writes
    gx, gA, gB (z = x A^T and the dropout mask are r-wide or regenerated: not counted).
    """
    t, i, o, r = case.tokens, case.in_features, case.out_features, case.r
    size = torch.empty((), dtype=case.torch_dtype).element_size()
    flops = 4 * t * i * o + 6 * t * r * (i + o)
    elements = 3 * t * i + 2 * o * i + 2 * t * o + 3 * r * i + 3 * o * r
    return {"flops": flops, "bytes": elements * size}


def _lora_tolerance(case: Case) -> float:
    return {"float64": 1e-10, "float32": 1e-4, "float16": 1e-2}.get(case.dtype, 4e-2)


register_family(Family(
    name="lora",
    description="LoRA linear y = x W^T + s (dropout(x) A^T) B^T",
    measures="forward+backward (x requires grad, W frozen, lora_A/lora_B trainable)",
    presets={
        "quick": dict(features=(1024, 2048), tokens=2048, dtypes=("float32", "bfloat16"), ranks=16,
                      dropouts=(0.0, 0.05)),
        "full": dict(features=(1024, 2048, 4096), tokens=2048, dtypes=("float32", "bfloat16"),
                     ranks=16, dropouts=(0.0, 0.05)),
    },
    make_cases=make_lora_cases,
    make_inputs=make_lora_inputs,
    contestants=(
        Contestant("base", "base", "the frozen nn.Linear alone (no adapter): the floor",
                   _build_base),
        Contestant("peft", "peft", "peft.tuners.lora.layer.Linear from peft.get_peft_model, train mode",
                   _build_peft, _peft_available),
        Contestant("lora_ext", "ours", "lora_ext.ops.lora_linear (fused, Philox dropout, fresh seed "
                   "per call)", _build_lora_ext, _lora_ext_available),
        Contestant("torch", "torch", "plain PyTorch, unfused: F.linear(x,W) + s*(F.dropout(x,p) @ A.T) @ B.T",
                   _build_torch),
    ),
    default_contestants=("base", "peft", "lora_ext", "torch"),
    baseline="base",
    ours="lora_ext",
    ratios=(("ours/base", "lora_ext", "base"), ("peft/base", "peft", "base"),
            ("peft/ours (speedup)", "peft", "lora_ext")),
    check=_lora_check,
    tolerance=_lora_tolerance,
    work=lora_work,
))

