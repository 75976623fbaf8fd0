"""Argument checks shared by the op wrappers: one message per kind of mistake."""
import torch

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_dropout(dropout_p) -> float:
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    return float(dropout_p)


def check_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not -(2**63) <= value < 2**64:
        raise ValueError(f"{name} must fit in 64 bits, got {value}")
    return value if value < 2**63 else value - 2**64  # the kernels read it as uint64


def check_seed(seed) -> torch.Tensor:
    """A dropout seed as the ops take it: a one-element int64 CPU tensor.

    A tensor rather than an int so that torch.compile keeps a per-call draw (dropout_seed)
    inside its graph; an int would have to be read out with .item(), a graph break. Python
    ints are wrapped (the same 64-bit range as check_int); a seed on another device is copied
    to the host, where the kernels read it.
    """
    if not isinstance(seed, torch.Tensor):
        return torch.tensor(check_int("seed", seed), dtype=torch.int64, device="cpu")
    if seed.dtype != torch.int64 or seed.numel() != 1:
        raise TypeError(f"seed must be an int or a one-element torch.int64 tensor, got a "
                        f"{seed.dtype} tensor of shape {tuple(seed.shape)}")
    return seed if seed.device.type == "cpu" else seed.cpu()


# ---------------------------------------------------------------- autocast

_autocast_lib = torch.library.Library("lora_ext", "IMPL")
_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}


def autocast_active(t: torch.Tensor) -> bool:
    """Whether torch.autocast is on for t's device type (the region an autocast rule serves)."""
    return t.device.type in _AUTOCAST_KEYS and torch.is_autocast_enabled(t.device.type)


def autocast_eligible(t) -> bool:
    """The tensors autocast itself casts: floating, not fp64 (autocast leaves fp64 alone)."""
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64


def register_autocast_rule(name: str, cast_args: tuple[int, ...]) -> None:
    """Under torch.autocast, op `name` runs in the autocast dtype, as F.linear does there.

    The arguments at positions cast_args that autocast would cast (autocast_eligible, on the
    autocast device) become torch.get_autocast_dtype(device); the others (NF4 codes, fp32
    statistics, DoRA's fp32 norm) pass unchanged; the op then runs with autocast off beneath
    it. torch.library.register_autocast casts every floating argument to one fixed dtype,
    which would break the fp32 statistics and ignore the dtype the user chose. The casts are
    ordinary autograd ops, so fp32 parameters (PEFT's adapters) get fp32 gradients.
    """
    op = getattr(torch.ops.lora_ext, name).default

    for device_type, key in _AUTOCAST_KEYS.items():
        def kernel(*args, _device_type=device_type):
            dtype = torch.get_autocast_dtype(_device_type)
            args = tuple(a.to(dtype) if i in cast_args and autocast_eligible(a)
                         and a.device.type == _device_type else a for i, a in enumerate(args))
            with torch.autocast(_device_type, enabled=False):
                return op(*args)
        _autocast_lib.impl(name, kernel, key)
