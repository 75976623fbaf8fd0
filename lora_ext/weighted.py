"""add_weighted_adapter: combine existing adapters into a new one ("linear", "cat", "svd").

The arithmetic is PEFT's: "linear" mixes A and B with sqrt(|w·s|) (the sign on A),
"cat" stacks ranks with w·s folded into A, "svd" truncates the SVD of Σ w·ΔW.
"""
from __future__ import annotations

import math
import operator
from dataclasses import replace
from functools import reduce

import torch

from .layers import LoraLayer, ModulesToSaveWrapper
from .layers.conv import _ConvNd

COMBINATION_TYPES = ("linear", "cat", "svd")


def _new_rank_and_targets(model, adapters, combination_type, svd_rank):
    configs = model.peft_config
    for adapter in adapters:
        if adapter not in configs:
            raise ValueError(f"Adapter {adapter} does not exist")
    for adapter in adapters:
        if configs[adapter].target_parameters:
            raise ValueError(f"add_weighted_adapter does not support targeting nn.Parameter (problematic adapter "
                             f"'{adapter}')")
    wrappers = [m for m in model.model.modules() if isinstance(m, ModulesToSaveWrapper)]
    shared = sum(sum(a in w.modules_to_save for a in adapters) > 1 for w in wrappers)
    if shared:
        raise ValueError("Cannot add weighted adapters if they target the same module with modules_to_save, but "
                         f"found {shared} such instance(s).")
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"Invalid combination_type: {combination_type!r}; lora-ext supports "
                         f"{', '.join(COMBINATION_TYPES)}")
    combination_type = "linear" if len(adapters) == 1 else combination_type
    ranks = [c.r if not c.rank_pattern else max(c.r, *c.rank_pattern.values())
             for c in (configs[a] for a in adapters)]
    if combination_type == "linear":
        if len(set(ranks)) != 1:
            raise ValueError("All adapters must have the same r value when using combination_type linear, ties, "
                             "dare_ties or dare_linear.")
        new_rank = ranks[0]
    elif combination_type == "cat":
        new_rank = sum(ranks)
    else:
        new_rank = svd_rank or max(ranks)
    kinds = {type(configs[a].target_modules) for a in adapters}
    if len(kinds) > 1:
        raise ValueError("all adapter configs should follow the same target modules type. Combining adapters "
                         "with `target_modules` type being a mix of list/set and string is not supported.")
    if kinds == {str}:
        targets = "|".join(f"({configs[a].target_modules})" for a in adapters)
    else:
        targets = reduce(operator.or_, (set(configs[a].target_modules) for a in adapters))
    return combination_type, new_rank, targets


def _adapter_tensors(layer: LoraLayer, adapter: str):
    if adapter in layer.lora_A:
        return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    if adapter in layer.lora_embedding_A:
        return layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]
    return None


def _weighted_sum(tensors, weights):
    stacked = torch.stack(tensors, dim=0)
    weights = weights.view(-1, *([1] * (stacked.dim() - 1))).to(stacked.dtype)
    return (stacked * weights).sum(dim=0)


def _linear(layer, adapters, weights):
    parts_A, parts_B, weights_A, weights_B = [], [], [], []
    for adapter, weight in zip(adapters, weights):
        pair = _adapter_tensors(layer, adapter)
        if pair is None:
            continue
        w = weight * layer.scaling[adapter]
        root = math.sqrt(abs(w))
        weights_A.append(root if w >= 0 else -root)
        weights_B.append(root)
        parts_A.append(pair[0].data)
        parts_B.append(pair[1].data)
    dtype = parts_A[0].dtype
    new_A = _weighted_sum(parts_A, torch.tensor(weights_A, device=parts_A[0].device))
    new_B = _weighted_sum(parts_B, torch.tensor(weights_B, device=parts_B[0].device))
    return new_A.to(dtype), new_B.to(dtype)


def _cat(layer, adapters, weights, target_A, target_B):
    parts_A, parts_B = [], []
    for adapter, weight in zip(adapters, weights):
        pair = _adapter_tensors(layer, adapter)
        if pair is not None:
            parts_A.append(pair[0].data * weight * layer.scaling[adapter])
            parts_B.append(pair[1].data)
    if not parts_A:
        raise ValueError("add_weighted_adapter: no adapter to combine in this layer")
    new_A, new_B = torch.zeros_like(target_A), torch.zeros_like(target_B)
    cat_A, cat_B = torch.cat(parts_A, 0), torch.cat(parts_B, 1)
    new_A[: cat_A.shape[0]] = cat_A
    new_B[:, : cat_B.shape[1]] = cat_B
    return new_A, new_B


def _svd(layer, adapters, weights, new_rank, target_A, target_B, clamp, full_matrices, driver):
    valid = [(a, w) for a, w in zip(adapters, weights) if _adapter_tensors(layer, a) is not None]
    if not valid:
        raise ValueError("add_weighted_adapter: no adapter to combine in this layer")
    is_embedding = any(a in layer.lora_embedding_A for a, _ in valid)
    deltas = [layer.get_delta_weight(a) for a, _ in valid]
    delta = _weighted_sum(deltas, torch.tensor([w for _, w in valid], device=deltas[0].device))
    conv = isinstance(layer, _ConvNd)
    if conv:  # PEFT squeezes a 1x1 Conv2d kernel; flattening [out, in, k...] is the general case
        delta = delta.squeeze() if layer.weight.shape[2:] == (1, 1) else delta.flatten(start_dim=1)
    if getattr(layer, "fan_in_fan_out", False) or is_embedding:
        delta = delta.T
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    U = U[:, :new_rank] @ torch.diag(S[:new_rank])
    Vh = Vh[:new_rank, :]
    if clamp is not None:
        hi = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), clamp)
        U, Vh = U.clamp(-hi, hi), Vh.clamp(-hi, hi)
    if conv:
        U, Vh = U.reshape(target_B.shape), Vh.reshape(target_A.shape)
    return Vh, U


def add_weighted_adapter(model, adapters: list[str], weights: list[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None, svd_clamp=None,
                         svd_full_matrices: bool = True, svd_driver: str | None = None) -> None:
    """Add `adapter_name` = the weighted combination of `adapters` (model: a LoraModel)."""
    if adapter_name in model.peft_config:
        return  # PEFT's behaviour: an existing name is left as it is
    if len(adapters) != len(weights):
        raise ValueError(f"adapters and weights must have the same length, got {len(adapters)} and {len(weights)}")
    combination_type, new_rank, targets = _new_rank_and_targets(model, adapters, combination_type, svd_rank)
    config = replace(model.peft_config[adapters[0]], r=new_rank, lora_alpha=new_rank, target_modules=targets,
                     alpha_pattern={}, rank_pattern={}, layer_replication=None)
    model.inject_adapter(config, adapter_name)
    for _, layer in model.lora_layers():
        target = _adapter_tensors(layer, adapter_name)
        if target is None:
            continue
        target_A, target_B = target
        target_A.requires_grad_(False)
        target_B.requires_grad_(False)
        if combination_type == "cat":
            new_A, new_B = _cat(layer, adapters, weights, target_A, target_B)
        elif combination_type == "svd":
            new_A, new_B = _svd(layer, adapters, weights, new_rank, target_A, target_B, svd_clamp,
                                svd_full_matrices, svd_driver)
        else:
            new_A, new_B = _linear(layer, adapters, weights)
        target_A.data, target_B.data = new_A.to(target_A.dtype), new_B.to(target_B.dtype)
