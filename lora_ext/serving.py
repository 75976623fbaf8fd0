"""Mixed-batch multi-adapter inference: row i of a batch uses adapter adapter_names[i].

Each LoRA layer keeps an AdapterPool: its adapters stacked once in device memory
(lora_A [N, r_max, in], lora_B [N, out, r_max], scale [N]), a name -> slot map, and a free
list. Loading, refreshing or deleting one adapter touches its slot only; the stack grows
geometrically (capacity doubles; a larger rank re-pads once). A forward with
adapter_names then costs the base layer plus one shrink and one expand kernel
(lora_ext.ops.lora_shrink / lora_expand for one token per row, the SGMV variants for
prefill), however many adapters the batch mixes.

The layer's own parameters stay the source of truth: the pool re-copies an adapter when
its parameters or scaling changed (detected by storage and version counter), once per
forward or once per generate call.
"""
from __future__ import annotations

import math

import torch

from . import ops

BASE_NAME = "__base__"  # the row uses the base model alone

_MAX_CACHED_BATCHES = 16


def _adapter_tensors(layer, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A as [r, in], B as [out, r]) of one adapter of a Linear/Conv1D or Embedding layer.

    Reads the containers' dicts directly: this runs for every adapter of every layer once
    per call, where nn.Module attribute lookups would cost more than the kernels.
    """
    module_A = layer.lora_A._modules.get(name)
    if module_A is not None:
        return module_A._parameters["weight"], layer.lora_B._modules[name]._parameters["weight"]
    if name in layer.lora_embedding_A:
        # Embedding keeps A as [r, num_embeddings]; a lookup of a token id is a column of it.
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    return None


def _fingerprint(layer) -> tuple:
    """What a pool must follow of a layer's adapters, in a form that compares in C: names,
    tensor ids, storage pointers, in-place versions and scales; and the tensors themselves
    (to be kept alive with the key, so that no new tensor can take an old one's id)."""
    modules_A, modules_B = layer._modules["lora_A"]._modules, layer._modules["lora_B"]._modules
    tensors = [m._parameters["weight"] for m in modules_A.values()]
    tensors += [m._parameters["weight"] for m in modules_B.values()]
    embedding_A = layer._modules["lora_embedding_A"]._parameters
    tensors += embedding_A.values()
    tensors += layer._modules["lora_embedding_B"]._parameters.values()
    key = (tuple(modules_A), tuple(embedding_A), tuple(map(id, tensors)), tuple([t._version for t in tensors]),
           tuple([t.data_ptr() for t in tensors]), tuple(layer.scaling.items()))
    return key, tensors


class AdapterPool:
    """The adapters of one layer, stacked for BGMV/SGMV."""

    def __init__(self, in_features: int, out_features: int, device: torch.device, dtype: torch.dtype) -> None:
        self.in_features, self.out_features = in_features, out_features
        self.device, self.dtype = device, dtype
        self.rank = 0
        self.lora_A = torch.zeros((0, 0, in_features), device=device, dtype=dtype)
        self.lora_B = torch.zeros((0, out_features, 0), device=device, dtype=dtype)
        self.scale = torch.zeros((0,), device=device, dtype=torch.float32)
        self.slots: dict[str, int] = {}
        self._free: list[int] = []
        self._keys: dict[str, tuple] = {}
        self._fingerprint: tuple | None = None
        self._fingerprint_tensors: list[torch.Tensor] = []
        self._synced_names: set[str] = set()
        self._index_cache: dict[tuple, tuple[torch.Tensor, bool]] = {}
        self._segment_cache: dict[tuple[int, int], torch.Tensor] = {}

    @property
    def capacity(self) -> int:
        return self.lora_A.shape[0]

    def _reserve(self, slots: int, rank: int) -> None:
        """Grow to at least `slots` slots of rank `rank` (doubling), keeping the contents."""
        capacity = self.capacity
        if slots <= capacity and rank <= self.rank:
            return
        new_capacity = max(capacity, 1)
        while new_capacity < slots:
            new_capacity *= 2
        new_rank = max(self.rank, rank)
        lora_A = torch.zeros((new_capacity, new_rank, self.in_features), device=self.device, dtype=self.dtype)
        lora_B = torch.zeros((new_capacity, self.out_features, new_rank), device=self.device, dtype=self.dtype)
        scale = torch.zeros((new_capacity,), device=self.device, dtype=torch.float32)
        lora_A[:capacity, :self.rank] = self.lora_A
        lora_B[:capacity, :, :self.rank] = self.lora_B
        scale[:capacity] = self.scale
        self.lora_A, self.lora_B, self.scale, self.rank = lora_A, lora_B, scale, new_rank

    def load(self, name: str, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> int:
        """Write one adapter (A [r, in], B [out, r]) into its slot (a new one if needed)."""
        r = lora_A.shape[0] if lora_A.dim() == 2 else -1
        if r == 0:
            raise ValueError(f"adapter {name!r}: rank must be >= 1, got lora_A {tuple(lora_A.shape)}")
        if r < 0 or tuple(lora_B.shape) != (self.out_features, r) or lora_A.shape[1] != self.in_features:
            raise ValueError(f"adapter {name!r}: expected lora_A [r, {self.in_features}] and lora_B "
                             f"[{self.out_features}, r], got {tuple(lora_A.shape)} and {tuple(lora_B.shape)}")
        try:
            finite = not isinstance(scale, (bool, str)) and math.isfinite(float(scale))
        except (TypeError, ValueError, RuntimeError):
            finite = False
        if not finite:
            raise ValueError(f"adapter {name!r}: scale must be a finite float, got {scale!r}")
        slot = self.slots.get(name)
        if slot is None:
            slot = self._free.pop() if self._free else len(self.slots)
            self._reserve(slot + 1, r)
            self.slots[name] = slot
            self._index_cache.clear()
        else:
            self._reserve(self.capacity, r)
        with torch.no_grad():
            self.lora_A[slot].zero_()
            self.lora_A[slot, :r].copy_(lora_A)
            self.lora_B[slot].zero_()
            self.lora_B[slot, :, :r].copy_(lora_B)
            self.scale[slot] = float(scale)
        return slot

    def remove(self, name: str) -> None:
        """Free the adapter's slot (its scale becomes 0; the slot is reused by the next load)."""
        slot = self.slots.pop(name, None)
        if slot is None:
            return
        self._keys.pop(name, None)
        with torch.no_grad():
            self.scale[slot] = 0.0
        self._free.append(slot)
        self._index_cache.clear()

    # ---------------------------------------------------------------- following the layer

    def sync(self, layer, names) -> None:
        """Bring the named adapters (and deletions) in line with the layer's parameters."""
        # Fast path: nothing about the layer's adapters changed since the last sync (same
        # names, tensor objects, storage, in-place versions and scales) and these names were
        # synced then.
        fingerprint, tensors = _fingerprint(layer)
        if fingerprint == self._fingerprint and self._synced_names.issuperset(names):
            return
        self._sync_each(layer, names)
        if fingerprint != self._fingerprint:
            self._synced_names = set()
        self._fingerprint, self._fingerprint_tensors = fingerprint, tensors
        self._synced_names.update(names)

    def _sync_each(self, layer, names) -> None:
        stale = self.slots.keys() - layer.lora_A._modules.keys() - set(layer.lora_embedding_A.keys())
        for name in stale:
            self.remove(name)
        # This runs for every adapter of every layer once per forward/generate call, so the
        # check that an adapter is unchanged (same tensors, storage, versions and scale) is kept
        # to a few attribute reads: with 64 adapters it used to cost a quarter of a decode step.
        keys, scaling = self._keys, layer.scaling
        modules_A, modules_B = layer._modules["lora_A"]._modules, layer._modules["lora_B"]._modules
        for name in names:
            module_A = modules_A.get(name)
            if module_A is not None:  # Linear / Conv1D, read without nn.Module.__getattr__
                lora_A, lora_B = module_A._parameters["weight"], modules_B[name]._parameters["weight"]
            else:
                tensors = _adapter_tensors(layer, name)
                if tensors is None:
                    continue
                lora_A, lora_B = tensors
            key = keys.get(name)
            if (key is not None and key[0] is lora_A and key[1] is lora_B and key[2] == lora_A._version
                    and key[3] == lora_B._version and key[4] == scaling[name]
                    and key[5] == lora_A.data_ptr() and key[6] == lora_B.data_ptr()):
                continue
            self.load(name, lora_A, lora_B, scaling[name])
            keys[name] = (lora_A, lora_B, lora_A._version, lora_B._version, scaling[name],
                          lora_A.data_ptr(), lora_B.data_ptr())

    # ---------------------------------------------------------------- per-batch indices

    def indices(self, adapter_names) -> tuple[torch.Tensor, bool]:
        """(idx [len(adapter_names)] int64 on the pool's device, whether any row has an adapter)."""
        key = tuple(adapter_names)
        cached = self._index_cache.get(key)
        if cached is None:
            slots = [self.slots.get(name, -1) for name in key]
            cached = (torch.tensor(slots, dtype=torch.int64, device=self.device), any(s >= 0 for s in slots))
            if len(self._index_cache) >= _MAX_CACHED_BATCHES:
                self._index_cache.clear()
            self._index_cache[key] = cached
        return cached

    def segment_starts(self, batch: int, tokens: int) -> torch.Tensor:
        """[batch + 1] starts of batch segments of `tokens` rows each (SGMV)."""
        starts = self._segment_cache.get((batch, tokens))
        if starts is None:
            if len(self._segment_cache) >= _MAX_CACHED_BATCHES:
                self._segment_cache.clear()
            starts = torch.arange(batch + 1, dtype=torch.int64, device=self.device) * tokens
            self._segment_cache[(batch, tokens)] = starts
        return starts


def layer_pool(layer, adapter_names=None) -> AdapterPool:
    """The layer's pool (created on first use, rebuilt if the layer moved device or dtype),
    with the adapters of adapter_names (default: all) brought up to date."""
    pool = getattr(layer, "_adapter_pool", None)
    if pool is not None and getattr(layer, "_adapter_pool_synced", False):
        return pool  # brought up to date for this forward/generate call already
    names = list(layer.lora_A) + list(layer.lora_embedding_A)
    if names:
        reference = _adapter_tensors(layer, names[0])[0]
        device, dtype = reference.device, reference.dtype
    else:
        weight = layer.base_layer.weight
        device = weight.device
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    if pool is None or pool.device != device or pool.dtype != dtype:
        pool = AdapterPool(layer.in_features, layer.out_features, device, dtype)
        layer._adapter_pool = pool
    wanted = names if adapter_names is None else [n for n in dict.fromkeys(adapter_names) if n != BASE_NAME]
    pool.sync(layer, wanted)
    return pool


def _rows(batch: int, x: torch.Tensor, features: int) -> tuple[int, int]:
    tokens = x.numel() // (batch * features) if batch and features else 0
    return batch, tokens


def mixed_batch_linear(layer, x: torch.Tensor, result: torch.Tensor, adapter_names) -> torch.Tensor:
    """result (the base layer's output) plus, for row i, adapter adapter_names[i]'s LoRA term."""
    pool = layer_pool(layer, adapter_names)
    idx, any_adapter = pool.indices(adapter_names)
    if not any_adapter or x.numel() == 0:
        return result
    batch, tokens = _rows(len(adapter_names), x, layer.in_features)
    x2d = x.reshape(batch * tokens, layer.in_features).to(pool.dtype)
    y2d = result.reshape(batch * tokens, layer.out_features)
    y_in = y2d.to(pool.dtype)
    if tokens == 1:
        z = ops.lora_shrink(x2d, pool.lora_A, idx)
        out = ops.lora_expand(y_in, z, pool.lora_B, idx, pool.scale)
    else:  # prefill: each batch row is one segment of `tokens` consecutive rows
        starts = pool.segment_starts(batch, tokens)
        z = ops.lora_shrink_sgmv(x2d, pool.lora_A, starts, idx)
        out = ops.lora_expand_sgmv(y_in, z, pool.lora_B, starts, idx, pool.scale)
    out = _add_lora_biases(layer, out, adapter_names, tokens)
    return out.to(result.dtype).view(result.shape)


def _add_lora_biases(layer, out: torch.Tensor, adapter_names, tokens: int) -> torch.Tensor:
    """Adapters with lora_bias=True add scaling·(lora_B bias) to their rows (in the pool's
    dtype, before the result is rounded to the base dtype, as PEFT's lora_B adds it)."""
    lora_bias = getattr(layer, "lora_bias", {})
    biased = {name: layer.lora_B[name].bias * layer.scaling[name]
              for name in dict.fromkeys(adapter_names) if lora_bias.get(name, False)}
    if not biased:
        return out
    zero = out.new_zeros(out.shape[-1])
    per_row = torch.stack([biased[name].to(out.dtype) if name in biased else zero for name in adapter_names])
    return out + per_row.repeat_interleave(tokens, dim=0)


def mixed_batch_embedding(layer, ids: torch.Tensor, result: torch.Tensor, adapter_names) -> torch.Tensor:
    """result (the base embedding) plus, for row i, adapter adapter_names[i]'s LoRA term:
    a lookup of A per token, then the expand kernel."""
    pool = layer_pool(layer, adapter_names)
    idx, any_adapter = pool.indices(adapter_names)
    if not any_adapter or ids.numel() == 0:
        return result
    batch, tokens = len(adapter_names), ids.numel() // len(adapter_names)
    token_slots = idx.repeat_interleave(tokens)
    flat_ids = ids.reshape(-1)
    # pool.lora_A is [N, r, num_embeddings] (Embedding's A layout): token t takes column
    # ids[t] of its adapter's A, which is what PEFT's F.embedding(ids, A.T) looks up
    # (padding_idx only stops gradients there; the lookup itself is not zeroed).
    z = pool.lora_A[token_slots.clamp(min=0), :, flat_ids]  # [T, r]
    z = torch.where((token_slots >= 0).unsqueeze(-1), z, torch.zeros_like(z))
    y2d = result.reshape(batch * tokens, layer.out_features)
    embed_scale = getattr(layer.base_layer, "embed_scale", None)
    if isinstance(embed_scale, torch.Tensor):  # scaled embeddings (Gemma) scale the adapter term too
        delta = ops.lora_expand(torch.zeros_like(y2d, dtype=pool.dtype), z, pool.lora_B, token_slots, pool.scale)
        out = y2d + (delta * embed_scale.to(delta.dtype)).to(y2d.dtype)
    else:
        out = ops.lora_expand(y2d.to(pool.dtype), z, pool.lora_B, token_slots, pool.scale)
    return out.to(result.dtype).view(result.shape)
