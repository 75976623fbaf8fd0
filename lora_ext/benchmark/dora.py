"""The "dora" benchmark family: one DoRA linear layer, forward + backward, against LoRA.

Contestants time one training step (x requires grad, W frozen, lora_A, lora_B and the
magnitude trainable) of PEFT's LoRA and DoRA layers and of lora-ext's fused LoRA and DoRA
ops, plus the weight norm alone: ours, PEFT's way (form W + s·B·A, then its norm), and a
plain read of W (a sum), whose time over the norm's is the fraction of the memory bandwidth
the norm kernel reaches.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from ._harness import Case, Contestant, Family, Runner, Unavailable, register_family
from .lora import (_OneLinear, _build_base, _build_lora_ext, _build_peft, _forward_backward, _lora_ext_available,
                   _peft_available, _trainable, make_lora_cases, make_lora_inputs)


@dataclass
class DoraInputs:
    """Shared by every contestant of a case: the same storage, never modified."""
    x: torch.Tensor
    weight: torch.Tensor
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    magnitude: torch.Tensor   # [out], around the norm (a trained-looking g ≠ 1)
    grad_y: torch.Tensor
    scaling: float
    dropout: float
    _ref: dict = field(default_factory=dict)


def make_dora_cases(**kwargs) -> list[Case]:
    return [dataclasses.replace(case, family="dora") for case in make_lora_cases(**kwargs)]


def make_dora_inputs(case: Case, device: torch.device) -> DoraInputs:
    lora = make_lora_inputs(case, device)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        norm = torch.linalg.vector_norm(lora.weight.float() + lora.scaling * (lora.lora_B.float() @ lora.lora_A.float()),
                                        dim=1)
        magnitude = (norm * (0.5 + torch.rand(norm.shape, generator=g).to(device))).to(lora.weight.dtype)
    return DoraInputs(lora.x, lora.weight, lora.lora_A, lora.lora_B, magnitude, lora.grad_y, lora.scaling,
                      lora.dropout)


def _build_peft_dora(case: Case, inp: DoraInputs) -> Runner:
    try:
        import peft
        from peft.tuners.lora.layer import Linear as PeftLoraLinear
    except ImportError as error:
        raise Unavailable(f"peft is not importable: {error}") from error
    linear = nn.Linear(case.in_features, case.out_features, bias=False, device=inp.x.device, dtype=case.torch_dtype)
    linear.weight = nn.Parameter(inp.weight, requires_grad=False)
    config = peft.LoraConfig(r=case.r, lora_alpha=2 * case.r, lora_dropout=case.dropout, target_modules=["proj"],
                             bias="none", use_dora=True)
    model = peft.get_peft_model(_OneLinear(linear), config, autocast_adapter_dtype=False)
    model.train()
    layer = model.base_model.model.proj
    if not isinstance(layer, PeftLoraLinear) or "default" not in layer.lora_magnitude_vector:
        raise Unavailable("peft did not produce a DoRA Linear layer")
    layer.base_layer.weight = nn.Parameter(inp.weight, requires_grad=False)
    layer.lora_A["default"].weight = _trainable(inp.lora_A)
    layer.lora_B["default"].weight = _trainable(inp.lora_B)
    layer.lora_magnitude_vector["default"].weight = _trainable(inp.magnitude)
    if not math.isclose(layer.scaling["default"], inp.scaling):
        raise Unavailable(f"peft scaling {layer.scaling['default']} != {inp.scaling}")
    x = inp.x
    wrt = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight,
           layer.lora_magnitude_vector["default"].weight]
    return Runner(_forward_backward(lambda: layer(x), wrt, inp.grad_y), lambda: layer(x),
                  info={"peft_version": peft.__version__})


def _build_lora_ext_dora(case: Case, inp: DoraInputs) -> Runner:
    from lora_ext.ops import dora_linear
    x, weight = inp.x, inp.weight
    A, B, m = _trainable(inp.lora_A), _trainable(inp.lora_B), _trainable(inp.magnitude)
    seeds = itertools.count(1)
    scaling, p = inp.scaling, inp.dropout

    def forward():  # the norm is recomputed every step, as in training
        return dora_linear(x, weight, None, A, B, m, scaling, p, next(seeds), training=True)
    return Runner(_forward_backward(forward, [x, A, B, m], inp.grad_y), forward)


def _cuda_only(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "the sparse/dense choice of DoRA's dropout applies to CUDA only (CPU: always sparse up to p = 0.5)"
    return _lora_ext_available(device)


def _build_lora_ext_dora_route(setting: str):
    """Ours with LORA_EXT_DORA_CUDA_SPARSE=setting for every call (1: the sparse correction, 0: dense)."""
    def build(case: Case, inp: DoraInputs) -> Runner:
        runner = _build_lora_ext_dora(case, inp)

        def routed(fn):
            def call():
                before = os.environ.get("LORA_EXT_DORA_CUDA_SPARSE")
                os.environ["LORA_EXT_DORA_CUDA_SPARSE"] = setting
                try:
                    return fn()
                finally:
                    if before is None:
                        del os.environ["LORA_EXT_DORA_CUDA_SPARSE"]
                    else:
                        os.environ["LORA_EXT_DORA_CUDA_SPARSE"] = before
            return call
        return Runner(routed(runner.step), routed(runner.forward))
    return build


def _build_norm(case: Case, inp: DoraInputs) -> Runner:
    from lora_ext.ops import dora_weight_norm
    W, A, B, s = inp.weight, inp.lora_A, inp.lora_B, inp.scaling
    return Runner(lambda: dora_weight_norm(W, A, B, s),
                  info={"weight_bytes": W.numel() * W.element_size()})


def _build_norm_torch(case: Case, inp: DoraInputs) -> Runner:
    W, A, B, s = inp.weight, inp.lora_A, inp.lora_B, inp.scaling
    return Runner(lambda: torch.linalg.vector_norm(W + s * (B @ A), dim=1))


def _build_read_w(case: Case, inp: DoraInputs) -> Runner:
    W = inp.weight
    return Runner(lambda: W.sum(dtype=torch.float32))


def _dora_check(case: Case, inp: DoraInputs, name: str, y: torch.Tensor) -> float | None:
    """Max relative error against an fp32 reference (DoRA or LoRA); None with dropout."""
    if case.dropout > 0:
        return None
    kind = "dora" if "dora" in name else ("base" if name == "base" else "lora")
    if kind not in inp._ref:
        x, w = inp.x.detach().float(), inp.weight.float()
        A, B, s = inp.lora_A.float(), inp.lora_B.float(), inp.scaling
        ref = x @ w.T
        if kind != "base":
            ref = ref + s * (x @ A.T) @ B.T
        if kind == "dora":
            g = inp.magnitude.float() / torch.linalg.vector_norm(w + s * B @ A, dim=1)
            ref = g * ref
        inp._ref[kind] = ref
    ref = inp._ref[kind]
    return float((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _dora_tolerance(case: Case) -> float:
    return {"float64": 1e-10, "float32": 1e-4, "float16": 1e-2}.get(case.dtype, 4e-2)


register_family(Family(
    name="dora",
    description="DoRA linear y = x W^T + (g-1) drop(x) W^T + g s (drop(x) A^T) B^T, g = m / ||W + s B A||",
    measures="forward+backward (x requires grad, W frozen, lora_A/lora_B/magnitude trainable); "
             "norm contestants: the weight norm alone",
    presets={
        "quick": dict(features=(1024, 2048), tokens=512, dtypes=("float32",), ranks=16, dropouts=(0.0, 0.05)),
        "full": dict(features=(1024, 2048, 4096), tokens=2048, dtypes=("float32", "bfloat16"), ranks=16,
                     dropouts=(0.0, 0.05)),
    },
    make_cases=make_dora_cases,
    make_inputs=make_dora_inputs,
    contestants=(
        Contestant("base", "base", "the frozen nn.Linear alone (no adapter): the floor", _build_base),
        Contestant("peft_lora", "peftL", "peft LoRA Linear (use_dora=False), train mode", _build_peft,
                   _peft_available),
        Contestant("peft_dora", "peftD", "peft DoRA Linear (use_dora=True), train mode", _build_peft_dora,
                   _peft_available),
        Contestant("lora_ext", "oursL", "lora_ext.ops.lora_linear (fused LoRA)", _build_lora_ext,
                   _lora_ext_available),
        Contestant("lora_ext_dora", "oursD", "lora_ext.ops.dora_linear (norm kernel + fused DoRA, norm "
                   "recomputed each step)", _build_lora_ext_dora, _lora_ext_available),
        Contestant("lora_ext_dora_sparse", "oursDs", "ours on CUDA with the sparse dropout correction forced "
                   "(LORA_EXT_DORA_CUDA_SPARSE=1)", _build_lora_ext_dora_route("1"), _cuda_only),
        Contestant("lora_ext_dora_dense", "oursDd", "ours on CUDA with the dense dropout product forced "
                   "(LORA_EXT_DORA_CUDA_SPARSE=0)", _build_lora_ext_dora_route("0"), _cuda_only),
        Contestant("norm", "norm", "lora_ext.ops.dora_weight_norm alone (W read once)", _build_norm,
                   _lora_ext_available),
        Contestant("norm_torch", "normT", "PEFT's way: torch.linalg.vector_norm(W + s*(B @ A), dim=1)",
                   _build_norm_torch),
        Contestant("read_w", "readW", "W.sum(dtype=float32): one read of W, the bandwidth floor of the norm",
                   _build_read_w),
    ),
    default_contestants=("base", "peft_lora", "peft_dora", "lora_ext", "lora_ext_dora", "norm", "norm_torch",
                         "read_w"),
    baseline="base",
    ours="lora_ext_dora",
    ratios=(("oursD/oursL", "lora_ext_dora", "lora_ext"),
            ("peftD/oursD (speedup)", "peft_dora", "lora_ext_dora"),
            ("peftD/peftL", "peft_dora", "peft_lora"),
            ("dense/sparse (CUDA)", "lora_ext_dora_dense", "lora_ext_dora_sparse"),
            ("normT/norm", "norm_torch", "norm"),
            ("readW/norm (bw frac)", "read_w", "norm")),
    check=_dora_check,
    tolerance=_dora_tolerance,
))
