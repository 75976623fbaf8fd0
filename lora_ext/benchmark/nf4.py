"""The "nf4" benchmark family: NF4 dequantisation and the 4-bit matmul, inference (no grad).

Three kinds of case, told apart by extra["op"]:
  dequant  W [out, in] from packed codes + absmax to bf16/fp32, into an existing tensor (out=)
  absmax   the fp32 absmax of W from its double quantisation (codes, absmax2, offset)
  matmul   y = x @ dequant(W).T for x [tokens, in]
Contestants: lora_ext's ops, bitsandbytes' public functions on the same packed bytes
(dequantize_4bit / dequantize_blockwise / matmul_4bit), bitsandbytes' CPU inference layout
(the one Linear4bit switches to in eval mode on AVX512-BF16 CPUs, bf16 absmax) where
available, the dense matmul on an unquantised weight of the same dtype (the floor the 4-bit
matmul aims at), and a plain fill of an output of the same size (the floor of dequantising).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn.functional as F

from ._harness import DTYPE_ALIASES, Case, Contestant, Family, Runner, Unavailable, register_family

BLOCKSIZE = 64


@dataclass
class NF4Inputs:
    """Shared by every contestant of a case: one weight, its packed form and one x."""
    weight: torch.Tensor        # dense [out, in], case dtype (what the dense contestant uses)
    packed: torch.Tensor        # [out * in / 2, 1] uint8
    absmax: torch.Tensor        # fp32 [out * in / 64]
    x: torch.Tensor | None      # [tokens, in] (matmul cases)
    nested: tuple | None = None  # (codes, absmax2, offset) of absmax (absmax cases)
    _ref: dict = field(default_factory=dict)


def _features(value) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        return int(value[0]), int(value[1])
    if isinstance(value, str) and "x" in value.lower():
        i, o = value.lower().split("x")
        return int(i), int(o)
    return int(value), int(value)


def make_nf4_cases(features: Iterable = ("4096x4096",), tokens: int | Iterable[int] = (1, 16),
                   dtypes: Iterable[str] = ("bfloat16",), ops: Iterable[str] = ("dequant", "matmul"),
                   ranks=None, dropouts=None) -> list[Case]:
    """Grid of nf4 cases; features are "INxOUT" (4096x11008: in 4096, out 11008)."""
    def seq(v):
        return [v] if isinstance(v, (int, float, str)) else list(v)
    cases = []
    for feat in seq(features):
        in_f, out_f = _features(feat)
        for dtype in seq(dtypes):
            dt = DTYPE_ALIASES.get(dtype, dtype)
            for op in seq(ops):
                if op == "absmax" and dtype != seq(dtypes)[0]:
                    continue  # absmax is fp32 whatever the weight's dtype: one case
                for t in (seq(tokens) if op == "matmul" else [0]):
                    cases.append(Case("nf4", "float32" if op == "absmax" else dt, in_f, out_f, int(t), 0,
                                      0.0, extra=(("op", op), ("bs", BLOCKSIZE))))
    return cases


def _op(case: Case) -> str:
    return dict(case.extra)["op"]


def make_nf4_inputs(case: Case, device: torch.device) -> NF4Inputs:
    from lora_ext import ops
    g = torch.Generator().manual_seed(0)
    w = torch.randn(case.out_features, case.in_features, generator=g) * case.in_features ** -0.5
    w = w.to(device=device, dtype=case.torch_dtype)
    packed, absmax = ops.nf4_quantize(w, BLOCKSIZE)
    x = nested = None
    if _op(case) == "matmul":
        x = torch.randn(case.tokens, case.in_features, generator=g).to(device=device,
                                                                      dtype=case.torch_dtype)
    if _op(case) == "absmax":
        nested = ops.quantize_absmax(absmax, 256)
    return NF4Inputs(w, packed, absmax, x, nested)


def _output_like(case: Case, inp: NF4Inputs) -> torch.Tensor:
    """A fresh output of the case's op, for the contestants that write into existing memory."""
    if _op(case) == "absmax":
        return torch.empty_like(inp.absmax)
    return torch.empty(case.out_features, case.in_features, dtype=case.torch_dtype, device=inp.packed.device)


def _bnb_state(case: Case, inp: NF4Inputs):
    try:
        import bitsandbytes.functional as bnb_f
    except ImportError as error:
        raise Unavailable(f"bitsandbytes is not importable: {error}") from error
    return bnb_f, bnb_f.QuantState(
        absmax=inp.absmax, shape=torch.Size([case.out_features, case.in_features]),
        dtype=case.torch_dtype, blocksize=BLOCKSIZE, code=bnb_f.get_4bit_type("nf4", device=inp.absmax.device),
        quant_type="nf4")


def _build_lora_ext(case: Case, inp: NF4Inputs) -> Runner:
    from lora_ext import ops
    if _op(case) == "dequant":
        out = _output_like(case, inp)

        def forward():
            return ops.nf4_dequantize(inp.packed, inp.absmax, blocksize=BLOCKSIZE, out=out)
    elif _op(case) == "absmax":
        def forward():
            return ops.dequantize_absmax(*inp.nested, 256)
    else:
        def forward():
            return ops.nf4_matmul(inp.x, inp.packed, inp.absmax, case.out_features, BLOCKSIZE)
    return Runner(forward, forward)


def _build_bnb(case: Case, inp: NF4Inputs) -> Runner:
    bnb_f, state = _bnb_state(case, inp)
    info = {"bitsandbytes": _bnb_version()}
    if _op(case) == "dequant":
        out = _output_like(case, inp)
        try:
            bnb_f.dequantize_4bit(inp.packed, state, out=out)
        except NotImplementedError:  # bitsandbytes 0.50 has no out= kernel on the CPU
            out = None
            info["note"] = "allocates its output (no out= on this device)"

        def forward():
            return bnb_f.dequantize_4bit(inp.packed, state, out=out)
    elif _op(case) == "absmax":
        codes, absmax2, offset = inp.nested
        state2 = bnb_f.QuantState(absmax=absmax2, code=bnb_f.create_dynamic_map(signed=True).to(absmax2.device),
                                  blocksize=256, dtype=torch.float32)

        def forward():
            return bnb_f.dequantize_blockwise(codes, state2) + offset
    else:
        import bitsandbytes as bnb

        def forward():
            return bnb.matmul_4bit(inp.x, inp.packed.t(), state)
    return Runner(forward, forward, info=info)


def _bnb_version() -> str:
    import bitsandbytes
    return bitsandbytes.__version__


def _bnb_cpu_layout_available(device: torch.device) -> str | None:
    if device.type != "cpu":
        return "bitsandbytes' CPU inference layout is for CPUs"
    try:
        import bitsandbytes.functional as bnb_f
    except ImportError:
        return "bitsandbytes is not installed"
    if not bnb_f.has_avx512bf16():
        return "bitsandbytes uses its CPU inference layout only on AVX512-BF16 CPUs"
    return None


def _build_bnb_cpu_layout(case: Case, inp: NF4Inputs) -> Runner:
    if _op(case) != "matmul" or case.dtype != "bfloat16":
        raise Unavailable("bitsandbytes' CPU layout serves bf16 matmuls only")
    import bitsandbytes as bnb
    bnb_f, state = _bnb_state(case, inp)
    packed, state = bnb_f._convert_weight_packed_for_cpu(inp.packed.clone(), copy.copy(state))

    def forward():
        return bnb.matmul_4bit(inp.x, packed, state)
    return Runner(forward, forward, info={"bitsandbytes": _bnb_version(),
                                          "note": "Linear4bit eval layout, bf16 absmax"})


def _build_dense(case: Case, inp: NF4Inputs) -> Runner:
    if _op(case) != "matmul":
        raise Unavailable("the dense contestant only runs matmul cases")
    w = inp.weight

    def forward():
        return F.linear(inp.x, w)
    return Runner(forward, forward)


def _build_fill(case: Case, inp: NF4Inputs) -> Runner:
    if _op(case) == "matmul":
        raise Unavailable("the fill contestant only runs dequantise cases")
    out = _output_like(case, inp)

    def forward():
        return out.fill_(1.0)
    return Runner(forward, forward)


def _nf4_check(case: Case, inp: NF4Inputs, name: str, y: torch.Tensor) -> float | None:
    """Max relative error against the fp32 reference on the dequantised weight (the dense
    contestant uses the unquantised weight and the fill writes ones: neither is compared)."""
    if name in ("dense", "fill"):
        return None
    from lora_ext import reference
    if _op(case) == "absmax":
        want = reference.dequantize_absmax(*inp.nested, 256)
        return float((y.float() - want).abs().max() / want.abs().max().clamp_min(1e-30))
    if "ref" not in inp._ref:
        w = reference.nf4_dequantize(inp.packed, inp.absmax, (case.out_features, case.in_features),
                                     BLOCKSIZE, torch.float32)
        inp._ref["ref"] = w if _op(case) == "dequant" else inp.x.float() @ w.T
    ref = inp._ref["ref"]
    y = y.reshape(ref.shape).float()
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _nf4_tolerance(case: Case) -> float:
    return {"float32": 1e-4, "float16": 1e-2}.get(case.dtype, 4e-2)


register_family(Family(
    name="nf4",
    description="NF4 4-bit weights: dequantise W and its absmax, and y = x dequant(W)^T (blocksize 64)",
    measures="one call, no grad (dequant: whole weight into existing memory; absmax: the fp32 "
             "absmax from its double quantisation; matmul: forward)",
    presets={
        "quick": dict(features=("4096x4096",), tokens=(1, 16, 256), dtypes=("bfloat16",),
                      ops=("dequant", "absmax", "matmul")),
        "full": dict(features=("4096x4096", "4096x11008"), tokens=(1, 4, 8, 16, 64, 256, 2048),
                     dtypes=("float32", "bfloat16"), ops=("dequant", "absmax", "matmul")),
    },
    make_cases=make_nf4_cases,
    make_inputs=make_nf4_inputs,
    contestants=(
        Contestant("lora_ext", "ours", "lora_ext.ops.nf4_dequantize / nf4_matmul", _build_lora_ext),
        Contestant("bnb", "bnb", "bitsandbytes.functional.dequantize_4bit / bitsandbytes.matmul_4bit "
                   "on the same packed bytes", _build_bnb),
        Contestant("bnb_cpu", "bnb-cpu", "bitsandbytes.matmul_4bit on its CPU inference layout "
                   "(what Linear4bit uses in eval on AVX512-BF16 CPUs; bf16 absmax)",
                   _build_bnb_cpu_layout, _bnb_cpu_layout_available),
        Contestant("dense", "dense", "F.linear on the unquantised weight in the same dtype",
                   _build_dense),
        Contestant("fill", "fill", "Tensor.fill_ of an existing output of the same size and dtype",
                   _build_fill),
    ),
    default_contestants=("lora_ext", "bnb", "bnb_cpu", "dense", "fill"),
    baseline="bnb",
    ours="lora_ext",
    ratios=(("ours/bnb", "lora_ext", "bnb"), ("ours/bnb-cpu", "lora_ext", "bnb_cpu"),
            ("ours/dense", "lora_ext", "dense"), ("ours/fill", "lora_ext", "fill")),
    check=_nf4_check,
    tolerance=_nf4_tolerance,
))
