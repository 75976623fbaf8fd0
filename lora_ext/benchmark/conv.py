"""The "conv" benchmark family: one LoRA Conv2d layer, PEFT's three convolutions against
lora_ext's single convolution with the merged weight (ops.lora_conv).

A case is in -> out channels (in_features, out_features), a square input of `tokens` pixels
a side, batch and kernel size (extra), and a mode: "infer" (a no-grad forward, eval) or
"train" (forward + backward: x requires grad as inside a network, W frozen, lora_A and
lora_B trainable). Dropout is 0: only then is the merged convolution exact.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ._harness import DTYPE_ALIASES, Case, Contestant, Family, Runner, Unavailable, register_family
from .lora import _lora_ext_available, _peft_available, _trainable


@dataclass
class ConvInputs:
    """Shared by every contestant of a case: the same storage, never modified."""
    x: torch.Tensor        # [batch, in, size, size], requires grad in "train"
    weight: torch.Tensor   # [out, in, k, k], frozen
    bias: torch.Tensor     # [out], frozen
    lora_A: torch.Tensor   # [r, in, k, k]
    lora_B: torch.Tensor   # [out, r, 1, 1]
    grad_y: torch.Tensor
    scaling: float
    train: bool
    _ref: dict = field(default_factory=dict)


def _extra(case: Case) -> dict:
    return dict(case.extra)


def make_conv_cases(features=(320,), tokens=32, dtypes=("float32",), ranks=16, dropouts=0.0, batch=2, kernel=3,
                    modes=("infer", "train")) -> list[Case]:
    """Grid of conv cases: features = channels (ints, or "INxOUT"), tokens = input side in pixels."""
    def seq(v):
        return [v] if isinstance(v, (int, float, str)) else list(v)
    cases = []
    for feat in seq(features):
        parts = str(feat).lower().split("x")
        in_c, out_c = int(parts[0]), int(parts[-1])
        for dtype in seq(dtypes):
            for size in seq(tokens):
                for r in seq(ranks):
                    for mode in seq(modes):
                        cases.append(Case("conv", DTYPE_ALIASES.get(dtype, dtype), in_c, out_c, int(size), int(r), 0.0,
                                          extra=(("batch", int(batch)), ("k", int(kernel)), ("mode", str(mode)))))
    return cases


def make_conv_inputs(case: Case, device: torch.device) -> ConvInputs:
    extra = _extra(case)
    if extra["mode"] not in ("infer", "train"):
        raise ValueError(f"conv: mode must be 'infer' or 'train', got {extra['mode']!r}")
    g = torch.Generator().manual_seed(0)
    dt, k, n = case.torch_dtype, extra["k"], extra["batch"]
    fan_in = case.in_features * k * k

    def rand(*shape, std=1.0):
        return (torch.randn(shape, generator=g) * std).to(device=device, dtype=dt)
    train = extra["mode"] == "train"
    x = rand(n, case.in_features, case.tokens, case.tokens).requires_grad_(train)
    pad = k // 2
    out_size = case.tokens + 2 * pad - k + 1
    return ConvInputs(x, rand(case.out_features, case.in_features, k, k, std=1 / math.sqrt(fan_in)),
                      rand(case.out_features, std=0.1), rand(case.r, case.in_features, k, k, std=1 / math.sqrt(fan_in)),
                      rand(case.out_features, case.r, 1, 1, std=1 / math.sqrt(case.r)),
                      rand(n, case.out_features, out_size, out_size), 2.0, train)


def _runner(forward, wrt, inp: ConvInputs, info=None) -> Runner:
    if inp.train:
        def step():
            return torch.autograd.grad(forward(), wrt, inp.grad_y)
    else:
        def step():
            with torch.no_grad():
                return forward()
    return Runner(step, forward, info or {})


def _build_base(case: Case, inp: ConvInputs) -> Runner:
    pad = _extra(case)["k"] // 2
    return _runner(lambda: F.conv2d(inp.x, inp.weight, inp.bias, 1, pad), [inp.x], inp)


class _OneConv(nn.Module):
    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(x)


def _build_peft(case: Case, inp: ConvInputs) -> Runner:
    import peft
    from peft.tuners.lora.layer import Conv2d as PeftConv2d
    k = _extra(case)["k"]
    conv = nn.Conv2d(case.in_features, case.out_features, k, padding=k // 2, device=inp.x.device,
                     dtype=case.torch_dtype)
    config = peft.LoraConfig(r=case.r, lora_alpha=2 * case.r, target_modules=["conv"])
    model = peft.get_peft_model(_OneConv(conv), config, autocast_adapter_dtype=False)
    model.train(inp.train)
    layer = model.base_model.model.conv
    if not isinstance(layer, PeftConv2d) or not math.isclose(layer.scaling["default"], inp.scaling):
        raise Unavailable("peft did not produce a LoRA Conv2d layer with the case's scaling")
    layer.base_layer.weight = nn.Parameter(inp.weight, requires_grad=False)
    layer.base_layer.bias = nn.Parameter(inp.bias, requires_grad=False)
    layer.lora_A["default"].weight = _trainable(inp.lora_A)
    layer.lora_B["default"].weight = _trainable(inp.lora_B)
    wrt = [inp.x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    return _runner(lambda: layer(inp.x), wrt, inp, {"peft_version": peft.__version__})


def _build_lora_ext(case: Case, inp: ConvInputs) -> Runner:
    from lora_ext.ops import lora_conv
    A, B = _trainable(inp.lora_A), _trainable(inp.lora_B)
    pad = _extra(case)["k"] // 2
    return _runner(lambda: lora_conv(inp.x, inp.weight, inp.bias, A, B, inp.scaling, 1, pad), [inp.x, A, B], inp)


def _conv_check(case: Case, inp: ConvInputs, name: str, y: torch.Tensor) -> float | None:
    """Max relative error against an fp64 PEFT-formula reference (the base conv alone for base)."""
    key = "base" if name == "base" else "lora"
    if key not in inp._ref:
        pad = _extra(case)["k"] // 2
        x, w, b = inp.x.detach().double(), inp.weight.double(), inp.bias.double()
        ref = F.conv2d(x, w, b, 1, pad)
        if key == "lora":
            ref = ref + F.conv2d(F.conv2d(x, inp.lora_A.double(), None, 1, pad), inp.lora_B.double()) * inp.scaling
        inp._ref[key] = ref
    ref = inp._ref[key]
    return float((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _conv_tolerance(case: Case) -> float:
    return {"float64": 1e-10, "float32": 1e-4, "float16": 1e-2}.get(case.dtype, 4e-2)


def _conv_lora_ext_available(device: torch.device) -> str | None:
    reason = _peft_available(device) if device.type == "cpu" else _lora_ext_available(device)
    if reason is None and device.type != "cpu":
        key = {"cuda": "CUDA"}.get(device.type, device.type.upper())
        if not torch._C._dispatch_has_kernel_for_dispatch_key("lora_ext::lora_conv_weight", key):
            return f"lora_ext was built without {key} kernels (see `lora-ext info`)"
    return None


register_family(Family(
    name="conv",
    description="LoRA Conv2d y = conv(x, W) + b + s conv1x1(conv(x, A), B), dropout 0",
    measures="mode infer: a no-grad forward; mode train: forward+backward (x requires grad, W frozen, "
             "lora_A/lora_B trainable)",
    presets={
        "quick": dict(features=(320,), tokens=32, dtypes=("float32",), ranks=16, batch=2, kernel=3,
                      modes=("infer", "train")),
        "full": dict(features=(320, 640), tokens=(32, 64), dtypes=("float32", "bfloat16"), ranks=(8, 16, 64),
                     batch=2, kernel=3, modes=("infer", "train")),
    },
    make_cases=make_conv_cases,
    make_inputs=make_conv_inputs,
    contestants=(
        Contestant("base", "base", "the frozen nn.Conv2d alone (no adapter): the floor", _build_base),
        Contestant("peft", "peft", "peft LoRA Conv2d: three convolutions", _build_peft, _peft_available),
        Contestant("lora_ext", "ours", "lora_ext.ops.lora_conv: one convolution with the merged weight "
                   "(lora_conv_weight kernel), low-rank backward", _build_lora_ext, _conv_lora_ext_available),
    ),
    default_contestants=("base", "peft", "lora_ext"),
    baseline="base",
    ours="lora_ext",
    ratios=(("peft/ours (speedup)", "peft", "lora_ext"), ("ours/base", "lora_ext", "base")),
    check=_conv_check,
    tolerance=_conv_tolerance,
))
