"""NF4 modules: a 4-bit Linear whose state dict is bitsandbytes' Linear4bit, and model quantisation.

    layer = NF4Linear.from_linear(nn.Linear(...), blocksize=64, double_quant=True)
    model = quantize_model(model)          # every Linear but the output head, as QLoRA does

State-dict layout (bitsandbytes 0.50 Linear4bit, quant_type="nf4"), under the layer prefix:

    weight                              uint8 [ceil(out*in/2), 1]   two codes a byte, element 2k high
    bias                                the bias, if any
    weight.absmax                       fp32 [nblocks], or uint8 [nblocks] codes with double quant
    weight.quant_map                    fp32 [16], the NF4 codebook
    weight.nested_absmax                fp32 [ceil(nblocks/256)]          (double quant only)
    weight.nested_quant_map             fp32 [256], bnb's dynamic map     (double quant only)
    weight.quant_state.bitsandbytes__nf4  uint8 bytes of the JSON {quant_type, blocksize, dtype,
                                        shape[, nested_blocksize, nested_dtype, nested_offset]}

so a state dict moves between NF4Linear and bnb.nn.Linear4bit (Params4bit.from_prequantized)
byte for byte, and a model of bnb Linear4bit layers converts to NF4Linear without re-quantising.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from . import ops

VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256  # bitsandbytes' blocksize for double quantisation of absmax
NESTED_BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)  # what ops.dequantize_absmax accepts
QUANT_TYPE = "nf4"
QUANT_STATE_KEY = "quant_state.bitsandbytes__nf4"
WEIGHT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_STAT_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_blocksize(blocksize, what: str = "blocksize") -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"NF4: {what} must be one of {VALID_BLOCKSIZES}, got {blocksize!r}")
    return blocksize


class NF4Linear(nn.Module):
    """y = x·dequant(W)ᵀ + b with W stored as NF4 (bitsandbytes' Linear4bit layout, quant_type="nf4").

    The weight is a frozen uint8 parameter of packed codes; the statistics are buffers, so
    .to(device) moves them, while dtype casts (model.half()) leave them in their own dtypes.
    compute_dtype: the dtype the matmul runs in (None: the input's); the output has the
    input's dtype, as in bitsandbytes.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, blocksize: int = 64,
                 double_quant: bool = True, compute_dtype: torch.dtype | None = None,
                 weight_dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"NF4Linear: {name} must be a positive int, got {value!r}")
        if weight_dtype not in WEIGHT_DTYPES.values():
            raise TypeError(f"NF4Linear: weight_dtype must be float32, float16 or bfloat16, got {weight_dtype}")
        if compute_dtype is not None and compute_dtype not in WEIGHT_DTYPES.values():
            raise TypeError(f"NF4Linear: compute_dtype must be None, float32, float16 or bfloat16, "
                            f"got {compute_dtype}")
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.weight_dtype = weight_dtype
        # an all-zero quantised weight of the right sizes; from_linear / load_state_dict fill it
        dense = torch.zeros(out_features, in_features, dtype=weight_dtype, device=device)
        self.weight = nn.Parameter(torch.empty(0, dtype=torch.uint8, device=device), requires_grad=False)
        self.set_quantized_weight(dense, blocksize=blocksize, double_quant=double_quant)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=weight_dtype, device=device)) if bias else None

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None) -> "NF4Linear":
        """Quantise an nn.Linear's weight (bias kept as is) as bnb's quantize_4bit(quant_type="nf4")."""
        if not isinstance(linear, nn.Linear) or _is_bnb_linear4bit(linear):
            raise TypeError(f"NF4Linear.from_linear expects an nn.Linear with a dense weight, got "
                            f"{type(linear).__name__} (use from_bnb for bitsandbytes Linear4bit)")
        weight = linear.weight
        if weight.dtype not in WEIGHT_DTYPES.values():
            raise TypeError(f"NF4Linear.from_linear: weight dtype {weight.dtype} cannot be quantised; "
                            "expected float32, float16 or bfloat16")
        layer = cls(linear.in_features, linear.out_features, bias=False, blocksize=check_blocksize(blocksize),
                    double_quant=double_quant, compute_dtype=compute_dtype, weight_dtype=weight.dtype,
                    device="meta")
        layer.set_quantized_weight(weight.detach(), blocksize=blocksize, double_quant=double_quant)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return layer

    @classmethod
    def from_bnb(cls, module: nn.Module, compute_dtype: torch.dtype | None = None) -> "NF4Linear":
        """The same bytes as a bitsandbytes Linear4bit (nf4), without re-quantising."""
        if not _is_bnb_linear4bit(module):
            raise TypeError(f"NF4Linear.from_bnb expects a bitsandbytes Linear4bit, got {type(module).__name__}")
        state = module.state_dict()  # bnb undoes its CPU repacking here
        if compute_dtype is None:
            compute_dtype = module.compute_dtype if getattr(module, "compute_type_is_set", False) else None
        return cls.from_state_dict(state, compute_dtype=compute_dtype)

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, Tensor], prefix: str = "",
                        compute_dtype: torch.dtype | None = None) -> "NF4Linear":
        """Build a layer from a Linear4bit-layout state dict (its sizes come from the quant state)."""
        parsed = parse_quant_state(state_dict, prefix)
        out_features, in_features = parsed["shape"]
        layer = cls(in_features, out_features, bias=prefix + "bias" in state_dict, blocksize=parsed["blocksize"],
                    double_quant=parsed["nested"], compute_dtype=compute_dtype, weight_dtype=parsed["dtype"],
                    device="meta")
        layer._install(parsed, device=state_dict[prefix + "weight"].device)
        if layer.bias is not None:
            layer.bias = nn.Parameter(state_dict[prefix + "bias"].detach().clone(), requires_grad=True)
        return layer

    @torch.no_grad()
    def set_quantized_weight(self, weight: Tensor, blocksize: int | None = None,
                             double_quant: bool | None = None) -> None:
        """Quantise a dense [out, in] weight into this layer (keeps blocksize/double quant if None)."""
        blocksize = check_blocksize(self.blocksize if blocksize is None else blocksize)
        double_quant = self.double_quant if double_quant is None else bool(double_quant)
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"NF4Linear: weight must have shape [{self.out_features}, {self.in_features}], "
                             f"got {tuple(weight.shape)}")
        if weight.device.type == "meta":  # construction on meta: sizes only
            n = weight.numel()
            nblocks = math.ceil(n / blocksize)
            packed = torch.empty((n + 1) // 2, 1, dtype=torch.uint8, device="meta")
            absmax = torch.empty(nblocks, dtype=torch.float32, device="meta")
        else:
            packed, absmax = ops.nf4_quantize(weight.contiguous(), blocksize)
        self.blocksize = blocksize
        self.double_quant = double_quant
        self.weight = nn.Parameter(packed, requires_grad=False)
        self._set_buffer("quant_map", ops.NF4_CODE.to(device=packed.device, dtype=torch.float32).clone())
        if double_quant:
            if packed.device.type == "meta":
                codes = torch.empty(absmax.shape, dtype=torch.uint8, device="meta")
                absmax2 = torch.empty(math.ceil(absmax.numel() / NESTED_BLOCKSIZE), device="meta")
                offset = torch.empty((), device="meta")
            else:
                codes, absmax2, offset = ops.quantize_absmax(absmax, NESTED_BLOCKSIZE)
            self.nested_blocksize = NESTED_BLOCKSIZE
            self._set_buffer("absmax", codes)
            self._set_buffer("nested_absmax", absmax2)
            self._set_buffer("nested_quant_map",
                             ops.DYNAMIC_CODE.to(device=packed.device, dtype=torch.float32).clone())
            self._set_buffer("nested_offset", offset.reshape(()).to(torch.float32))
        else:
            self.nested_blocksize = None
            self._set_buffer("absmax", absmax)
            for name in ("nested_absmax", "nested_quant_map", "nested_offset"):
                self._set_buffer(name, None)

    def _set_buffer(self, name: str, value: Tensor | None) -> None:
        if name in self._buffers or value is not None:
            self.register_buffer(name, value, persistent=False)  # saved by _save_to_state_dict, bnb style

    def _install(self, parsed: dict[str, Any], device) -> None:
        """Take over a parsed quant state (see parse_quant_state)."""
        self.blocksize = parsed["blocksize"]
        self.double_quant = parsed["nested"]
        self.weight_dtype = parsed["dtype"]
        self.weight = nn.Parameter(parsed["weight"].to(device), requires_grad=False)
        self._set_buffer("absmax", parsed["absmax"].to(device))
        self._set_buffer("quant_map", parsed["quant_map"].to(device, torch.float32))
        if parsed["nested"]:
            self.nested_blocksize = parsed["nested_blocksize"]
            self._set_buffer("nested_absmax", parsed["nested_absmax"].to(device, torch.float32))
            self._set_buffer("nested_quant_map", parsed["nested_quant_map"].to(device, torch.float32))
            self._set_buffer("nested_offset", torch.tensor(parsed["nested_offset"], dtype=torch.float32,
                                                           device=device))
        else:
            self.nested_blocksize = None
            for name in ("nested_absmax", "nested_quant_map", "nested_offset"):
                self._set_buffer(name, None)

    # ---------------------------------------------------------------- arithmetic

    def absmax_fp32(self) -> Tensor:
        """Per-block fp32 absmax, undoing the double quantisation if there is one."""
        if not self.double_quant:
            return self.absmax
        return ops.dequantize_absmax(self.absmax, self.nested_absmax, self.nested_offset, self.nested_blocksize)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The dense [out, in] weight (in the dtype it was quantised from, unless dtype is given)."""
        return ops.nf4_dequantize(self.weight, self.absmax_fp32(), (self.out_features, self.in_features),
                                  self.blocksize, dtype or self.weight_dtype)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"NF4Linear: x must have shape [..., {self.in_features}], got "
                             f"{tuple(getattr(x, 'shape', ())) or type(x).__name__}")
        input_dtype = x.dtype
        compute_dtype = self.compute_dtype or input_dtype
        if x.dtype != compute_dtype:
            x = x.to(compute_dtype)
        bias = None if self.bias is None else self.bias.to(compute_dtype)
        y = ops.nf4_matmul(x, self.weight, self.absmax_fp32(), self.out_features, self.blocksize, bias)
        return y.to(input_dtype)

    # ---------------------------------------------------------------- accounting

    def quantized_nbytes(self) -> int:
        """Bytes the frozen quantised weight takes: packed codes plus every statistic (bias excluded)."""
        tensors = [self.weight] + [t for t in (getattr(self, n, None) for n in
                                               (*_STAT_KEYS, "nested_offset")) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    # ---------------------------------------------------------------- dtype casts and state dicts

    def _apply(self, fn, recurse: bool = True):
        # model.half()/.to(bfloat16) cast floating buffers; the statistics must keep fp32
        # (bitsandbytes' Params4bit keeps its quant state out of such casts too).
        before = {name: buf for name, buf in self._buffers.items() if buf is not None}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self

    def quant_state_dict(self) -> dict[str, Tensor]:
        """The statistics as bnb's QuantState.as_dict(packed=True), in its key order."""
        out = {"absmax": self.absmax, "quant_map": self.quant_map}
        meta: dict[str, Any] = {"quant_type": QUANT_TYPE, "blocksize": self.blocksize,
                                "dtype": _dtype_name(self.weight_dtype),
                                "shape": [self.out_features, self.in_features]}
        if self.double_quant:
            out["nested_absmax"] = self.nested_absmax
            out["nested_quant_map"] = self.nested_quant_map.clone()
            meta.update(nested_blocksize=self.nested_blocksize, nested_dtype="float32",
                        nested_offset=float(self.nested_offset.item()))
        out[QUANT_STATE_KEY] = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
        return out

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight if keep_vars else self.weight.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        for key, value in self.quant_state_dict().items():
            destination[prefix + "weight." + key] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        for hook in self._load_state_dict_pre_hooks.values():
            hook(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        ours = [k for k in state_dict if k.startswith(prefix)]  # no child modules: every such key is ours
        known = {prefix + "weight", prefix + "bias"} | {prefix + "weight." + k for k in (*_STAT_KEYS, QUANT_STATE_KEY)}
        if strict:
            unexpected_keys.extend(k for k in ours if k not in known)
        weight_key = prefix + "weight"
        if weight_key not in state_dict:
            missing_keys.append(weight_key)
        else:
            weight = state_dict[weight_key]
            device = self.weight.device
            if weight.is_floating_point() and weight.dim() == 2 and not any(
                    k.startswith(weight_key + ".") for k in state_dict):
                # a dense checkpoint: quantise it with this layer's settings
                self.set_quantized_weight(weight.to(device))
            else:
                parsed = parse_quant_state(state_dict, prefix)
                if parsed["shape"] != (self.out_features, self.in_features):
                    raise ValueError(f"NF4Linear: {weight_key} holds a [{parsed['shape'][0]}, {parsed['shape'][1]}] "
                                     f"weight but this layer is [{self.out_features}, {self.in_features}]")
                self._install(parsed, device if device.type != "meta" else weight.device)
        bias_key = prefix + "bias"
        if self.bias is not None:
            if bias_key in state_dict:
                bias = state_dict[bias_key]
                if tuple(bias.shape) != (self.out_features,):
                    error_msgs.append(f"size mismatch for {bias_key}: copying a param with shape "
                                      f"{tuple(bias.shape)}, the shape in current model is ({self.out_features},).")
                else:
                    with torch.no_grad():
                        if self.bias.device.type == "meta" or self.bias.dtype != bias.dtype:
                            # the layer takes the checkpoint's dtypes, as it takes its quant state
                            device = self.weight.device
                            self.bias = nn.Parameter(bias.detach().to(device).clone(),
                                                     requires_grad=self.bias.requires_grad)
                        else:
                            self.bias.copy_(bias)
            else:
                missing_keys.append(bias_key)
        elif bias_key in state_dict and strict:
            unexpected_keys.append(bias_key)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}, double_quant={self.double_quant}, "
                f"dtype={_dtype_name(self.weight_dtype)}, compute_dtype={self.compute_dtype}")


# -------------------------------------------------------------------- quant state parsing


def parse_quant_state(state_dict: dict[str, Tensor], prefix: str = "") -> dict[str, Any]:
    """Read and check one layer's Linear4bit-layout state (keys under `prefix`).

    Raises ValueError naming the key for a missing statistic, an fp4 (or otherwise non-nf4)
    quant state, an invalid blocksize, or tensors whose sizes do not match the shape.
    """
    wkey = prefix + "weight"

    def need(key: str) -> Tensor:
        full = f"{wkey}.{key}"
        if full not in state_dict:
            raise ValueError(f"NF4: the state dict has {wkey} but no {full}; a bitsandbytes 4-bit "
                             f"state needs weight, weight.absmax, weight.quant_map and "
                             f"weight.{QUANT_STATE_KEY} (plus the nested_* statistics with double quantisation)")
        value = state_dict[full]
        if not isinstance(value, Tensor):
            raise TypeError(f"NF4: {full} must be a Tensor, got {type(value).__name__}")
        return value

    if wkey not in state_dict:
        raise ValueError(f"NF4: the state dict has no {wkey}")
    packed_keys = [k for k in state_dict if k.startswith(f"{wkey}.quant_state.")]
    other = [k for k in packed_keys if k != f"{wkey}.{QUANT_STATE_KEY}"]
    if other:
        kinds = ", ".join(k.rsplit("bitsandbytes__", 1)[-1] for k in other)
        raise ValueError(f"NF4: {other[0]} is a quant state of type {kinds!r}; lora_ext reads "
                         f"quant_type='nf4' only (bitsandbytes fp4 weights are not NF4)")
    try:
        meta = json.loads(bytes(need(QUANT_STATE_KEY).to("cpu", torch.uint8).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"NF4: {wkey}.{QUANT_STATE_KEY} is not the JSON bitsandbytes writes: {error}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"NF4: {wkey}.{QUANT_STATE_KEY} must hold a JSON object, got {type(meta).__name__}")
    for field in ("quant_type", "blocksize", "dtype", "shape"):
        if field not in meta:
            raise ValueError(f"NF4: {wkey}.{QUANT_STATE_KEY} lacks the field {field!r}")
    if meta["quant_type"] != QUANT_TYPE:
        raise ValueError(f"NF4: {wkey} has quant_type {meta['quant_type']!r}; lora_ext reads quant_type='nf4' only")
    blocksize = check_blocksize(meta["blocksize"], f"{wkey} blocksize")
    if meta["dtype"] not in WEIGHT_DTYPES:
        raise ValueError(f"NF4: {wkey} has dtype {meta['dtype']!r}; expected one of {sorted(WEIGHT_DTYPES)}")
    shape = meta["shape"]
    if (not isinstance(shape, list) or len(shape) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)):
        raise ValueError(f"NF4: {wkey} has shape {shape!r}; a Linear weight needs [out_features, in_features]")
    n = shape[0] * shape[1]
    weight = state_dict[wkey]
    if weight.dtype != torch.uint8:  # bnb's quant_storage may be another dtype: the bytes are what count
        weight = weight.contiguous().view(torch.uint8).reshape(-1, 1)
    if weight.numel() != (n + 1) // 2:
        raise ValueError(f"NF4: {wkey} holds {weight.numel()} packed bytes but a {shape} weight needs "
                         f"ceil({n}/2) = {(n + 1) // 2}")
    nblocks = math.ceil(n / blocksize)
    absmax = need("absmax")
    quant_map = need("quant_map")
    nested = "nested_blocksize" in meta or f"{wkey}.nested_absmax" in state_dict
    if absmax.numel() != nblocks:
        raise ValueError(f"NF4: {wkey}.absmax has {absmax.numel()} entries but a {shape} weight in blocks of "
                         f"{blocksize} has {nblocks} (wrong blocksize?)")
    code = ops.NF4_CODE.to(torch.float32)
    if quant_map.shape != (16,) or not torch.equal(quant_map.to("cpu", torch.float32), code.cpu()):
        raise ValueError(f"NF4: {wkey}.quant_map is not the NF4 codebook (an fp4 or custom 4-bit map?)")
    parsed: dict[str, Any] = {"blocksize": blocksize, "dtype": WEIGHT_DTYPES[meta["dtype"]],
                              "shape": (shape[0], shape[1]), "nested": nested,
                              "weight": weight.detach().reshape(-1, 1), "quant_map": quant_map.detach()}
    if nested:
        for field in ("nested_blocksize", "nested_dtype", "nested_offset"):
            if field not in meta:
                raise ValueError(f"NF4: {wkey}.{QUANT_STATE_KEY} lacks {field!r} but the state is double-quantised")
        nested_blocksize = meta["nested_blocksize"]
        if isinstance(nested_blocksize, bool) or nested_blocksize not in NESTED_BLOCKSIZES:
            raise ValueError(f"NF4: {wkey} nested_blocksize must be one of {NESTED_BLOCKSIZES}, "
                             f"got {nested_blocksize!r}")
        nested_absmax, nested_map = need("nested_absmax"), need("nested_quant_map")
        if absmax.dtype != torch.uint8:
            raise ValueError(f"NF4: {wkey}.absmax must be uint8 codes with double quantisation, got {absmax.dtype}")
        if nested_absmax.numel() != math.ceil(nblocks / nested_blocksize):
            raise ValueError(f"NF4: {wkey}.nested_absmax has {nested_absmax.numel()} entries; {nblocks} blocks "
                             f"in nested blocks of {nested_blocksize} need {math.ceil(nblocks / nested_blocksize)}")
        if meta["nested_dtype"] != "float32" or nested_absmax.dtype != torch.float32:
            raise ValueError(f"NF4: {wkey}.nested_absmax must be float32, got {meta['nested_dtype']!r} / "
                             f"{nested_absmax.dtype}")
        dynamic = ops.DYNAMIC_CODE.to(torch.float32).cpu()
        if nested_map.shape != (256,) or not torch.equal(nested_map.to("cpu", torch.float32), dynamic):
            raise ValueError(f"NF4: {wkey}.nested_quant_map is not bitsandbytes' dynamic 8-bit map")
        offset = meta["nested_offset"]
        if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset):
            raise ValueError(f"NF4: {wkey} nested_offset must be a finite number, got {offset!r}")
        parsed.update(nested_blocksize=nested_blocksize, nested_absmax=nested_absmax.detach(),
                      nested_quant_map=nested_map.detach(), nested_offset=float(offset))
    elif absmax.dtype != torch.float32:
        raise ValueError(f"NF4: {wkey}.absmax must be float32 without double quantisation, got {absmax.dtype}")
    parsed["absmax"] = absmax.detach()
    return parsed


# -------------------------------------------------------------------- bitsandbytes


def _is_bnb_linear4bit(module: nn.Module) -> bool:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(module, bnb.nn.Linear4bit)


def to_bnb(layer: NF4Linear, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """A bitsandbytes Linear4bit holding this layer's bytes (Params4bit.from_prequantized)."""
    import bitsandbytes as bnb
    state = layer.state_dict()
    device = layer.weight.device
    module = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                               compute_dtype=compute_dtype or layer.compute_dtype,
                               compress_statistics=layer.double_quant, quant_type=QUANT_TYPE, device="meta")
    stats = {k[len("weight."):]: v for k, v in state.items() if k.startswith("weight.")}
    module.weight = bnb.nn.Params4bit.from_prequantized(state["weight"], stats, device=device, module=module)
    if layer.bias is not None:
        module.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=layer.bias.requires_grad)
    return module


# -------------------------------------------------------------------- whole models


def _output_head_names(model: nn.Module) -> set[str]:
    get_output = getattr(model, "get_output_embeddings", None)
    head = None
    if callable(get_output):
        try:
            head = get_output()
        except (NotImplementedError, AttributeError):
            head = None
    if head is None:
        return {name for name, _ in model.named_modules() if name == "lm_head" or name.endswith(".lm_head")}
    return {name for name, module in model.named_modules() if module is head}


def _selected(name: str, target_modules) -> bool:
    if isinstance(target_modules, str):
        return target_modules.lower() == "all-linear" or re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def quantize_model(model: nn.Module, target_modules: str | Iterable[str] = "all-linear", blocksize: int = 64,
                   double_quant: bool = True, compute_dtype: torch.dtype | None = None,
                   skip_modules: Iterable[str] | None = None) -> nn.Module:
    """Replace Linear layers by NF4Linear in place and return the model.

    target_modules: "all-linear", a regex matched against the full module name, or a list of
    names (a name matches itself and any module whose name ends in ".<name>"). The output head
    (get_output_embeddings(), else modules named lm_head) and skip_modules stay in full
    precision, as QLoRA/transformers keep them. bitsandbytes Linear4bit layers (nf4) become
    NF4Linear with the same bytes, whatever target_modules says.
    """
    check_blocksize(blocksize)
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
        if not all(isinstance(t, str) for t in target_modules):
            raise TypeError(f"quantize_model: target_modules must be a string or a list of strings, "
                            f"got {target_modules!r}")
    if any(hasattr(m, "lora_A") and hasattr(m, "base_layer") for m in model.modules()):
        raise ValueError("quantize_model: the model already holds LoRA layers; quantise the base model first, "
                         "then add adapters (get_peft_model)")
    keep = _output_head_names(model) | set(skip_modules or ())
    replaced = 0
    for name, module in list(model.named_modules()):
        if not name:
            continue
        if _is_bnb_linear4bit(module):
            if getattr(module.weight, "quant_type", QUANT_TYPE) != QUANT_TYPE:
                raise ValueError(f"quantize_model: {name} is a bitsandbytes Linear4bit with quant_type "
                                 f"{module.weight.quant_type!r}; only nf4 converts to NF4Linear")
            new = NF4Linear.from_bnb(module, compute_dtype=compute_dtype)
        elif type(module) is nn.Linear and _selected(name, target_modules) and not (
                name in keep or any(name.endswith("." + k) or name == k for k in keep)):
            new = NF4Linear.from_linear(module, blocksize, double_quant, compute_dtype)
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        replaced += 1
    if replaced == 0:
        raise ValueError(f"quantize_model: no Linear layer matched target_modules={target_modules!r} "
                         f"(kept in full precision: {sorted(keep)})")
    return model


def memory_footprint(model: nn.Module) -> dict[str, int]:
    """Bytes of the model: NF4 weights with their statistics, and everything else.

    nf4_params counts the weights the NF4 layers stand for (out·in each); nf4_bytes what they
    take (packed codes, absmax, nested statistics and codebooks); other_bytes every other
    parameter and buffer (biases, norms, embeddings, the output head, adapters).
    """
    nf4_bytes = nf4_params = 0
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, NF4Linear):
            nf4_bytes += module.quantized_nbytes()
            nf4_params += module.in_features * module.out_features
            seen.add(id(module.weight))
            seen |= {id(b) for b in module.buffers(recurse=False)}
    other = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            other += tensor.numel() * tensor.element_size()
    return {"nf4_params": nf4_params, "nf4_bytes": nf4_bytes, "other_bytes": other}
