"""The "qlora_train" benchmark family: one QLoRA training step of a small LlamaForCausalLM.

The llama_train step (forward, loss, backward, AdamW on the adapters; LoRA with dropout on
every linear projection) on a 4-bit NF4 base (blocksize 64, double quantisation; the output
head and embeddings stay dense, as QLoRA keeps them). Contestants:

  peft_bnb   PEFT LoRA on bitsandbytes Linear4bit layers (bnb quantises the same weights)
  lora_ext   lora_ext.quantize_model + lora_ext.get_peft_model (NF4Linear, fused adapter term)
  dense      lora_ext LoRA on the unquantised model (what 4 bits cost or save in time)

The check compares eval-mode logits against the dense fp32 model holding the dequantised
weights (every contestant starts at B = 0, and the two 4-bit contestants hold the same bytes).
"""
from __future__ import annotations

import dataclasses

import torch

from ._harness import Contestant, Family, Runner, register_family
from .llama_train import (TrainInputs, _fresh_model, _lora_kwargs, _peft_available, _training_runner,
                          make_train_cases, make_train_inputs)


def make_qlora_cases(**kwargs) -> list:
    """llama_train's grid (same keywords), under this family's name."""
    return [dataclasses.replace(case, family="qlora_train") for case in make_train_cases(**kwargs)]


def _bnb_available(device: torch.device) -> str | None:
    missing = _peft_available(device)
    if missing:
        return missing
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        return f"needs bitsandbytes: {error}"
    return None


def _quantized(inp: TrainInputs):
    import lora_ext
    return lora_ext.quantize_model(_fresh_model(inp))


def _build_lora_ext(case, inp: TrainInputs) -> Runner:
    import lora_ext
    # adapters in the model dtype, as PEFT's contestants (autocast_adapter_dtype=False)
    model = lora_ext.get_peft_model(_quantized(inp), lora_ext.LoraConfig(**_lora_kwargs(case)),
                                    autocast_adapter_dtype=False)
    footprint = lora_ext.memory_footprint(model)
    return _training_runner(model, inp, {"nf4_bytes": footprint["nf4_bytes"],
                                         "nf4_params": footprint["nf4_params"]})


def _build_peft_bnb(case, inp: TrainInputs) -> Runner:
    import bitsandbytes as bnb
    import peft
    from torch import nn
    model = _fresh_model(inp)
    head = model.get_output_embeddings()
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and module is not head:
            layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                      compress_statistics=True, quant_type="nf4", device="meta")
            layer.weight = bnb.nn.Params4bit(module.weight.detach().to("cpu"), requires_grad=False,
                                             compress_statistics=True, quant_type="nf4",
                                             module=layer).to(inp.device)
            if module.bias is not None:
                layer.bias = nn.Parameter(module.bias.detach().clone())
            # eval-mode CPU repacking re-quantises the statistics; keep the check on bnb's plain path
            layer.support_avx512bf16_for_cpu = False
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)
    model.is_loaded_in_4bit = True  # as transformers marks it: PEFT dispatches its 4-bit layers on this
    model = peft.get_peft_model(model, peft.LoraConfig(**_lora_kwargs(case)), autocast_adapter_dtype=False)
    return _training_runner(model, inp, {"peft_version": peft.__version__, "bitsandbytes_version": bnb.__version__})


def _build_dense(case, inp: TrainInputs) -> Runner:
    import lora_ext
    model = lora_ext.get_peft_model(_fresh_model(inp), lora_ext.LoraConfig(**_lora_kwargs(case)),
                                    autocast_adapter_dtype=False)
    return _training_runner(model, inp, {})


def _lora_ext_available(device: torch.device) -> str | None:
    import lora_ext
    return None if hasattr(lora_ext, "quantize_model") else "lora_ext has no quantize_model"


def _check(case, inp: TrainInputs, name: str, logits: torch.Tensor) -> float | None:
    """Relative max error of eval logits against the dense fp32 model with the dequantised weights
    (the dense contestant is checked against the unquantised model)."""
    import lora_ext
    key = "dense" if name == "dense" else "dequantised"
    if key not in inp._ref:
        if key == "dense":
            model = _fresh_model(inp, torch.float32)
        else:
            model = _quantized(inp)
            for module_name, module in list(model.named_modules()):
                if isinstance(module, lora_ext.NF4Linear):
                    dense = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                            device=inp.device)
                    dense.weight.data = module.dequantize(torch.float32)
                    if module.bias is not None:
                        dense.bias.data = module.bias.detach().float()
                    parent, _, child = module_name.rpartition(".")
                    setattr(model.get_submodule(parent), child, dense)
            model = model.float()
        with torch.no_grad():
            inp._ref[key] = model.eval()(input_ids=inp.input_ids).logits.float()
    ref = inp._ref[key]
    return float((logits.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _tolerance(case) -> float:
    return {"float32": 1e-4, "float16": 2e-2}.get(case.dtype, 5e-2)


register_family(Family(
    name="qlora_train",
    description="one QLoRA training step (NF4 base, LoRA on all linear projections) of a random-init Llama",
    measures="forward + loss + backward + AdamW step (train mode, LoRA dropout on), 4-bit frozen base",
    presets={
        "quick": dict(features=256, tokens=512, dtypes=("float32",), ranks=16, dropouts=0.05, layers=2, batch=4),
        "full": dict(features=(512, 1024), tokens=2048, dtypes=("float32", "bfloat16"), ranks=16, dropouts=0.05,
                     layers=4, batch=4),
    },
    make_cases=make_qlora_cases,
    make_inputs=make_train_inputs,
    contestants=(
        Contestant("dense", "dense", "lora_ext LoRA on the unquantised model (no 4-bit base)", _build_dense,
                   _lora_ext_available),
        Contestant("peft_bnb", "peft+bnb", "PEFT LoRA on bitsandbytes nf4 Linear4bit layers", _build_peft_bnb,
                   _bnb_available),
        Contestant("lora_ext", "ours", "lora_ext.quantize_model + get_peft_model (NF4Linear, fused adapter)",
                   _build_lora_ext, _lora_ext_available),
    ),
    default_contestants=("dense", "peft_bnb", "lora_ext"),
    baseline="dense",
    ours="lora_ext",
    ratios=(("peft+bnb/ours (speedup)", "peft_bnb", "lora_ext"), ("ours/dense", "lora_ext", "dense")),
    check=_check,
    tolerance=_tolerance,
))
