"""The "bgmv" benchmark family: one mixed-adapter inference forward of a small LlamaForCausalLM.

A batch of `rows` sequences using the N adapters loaded in the model in turn (r = Case.r,
alpha = 2r, on q, k, v, o, gate, up, down); when there are more rows than adapters, every
16th row is "__base__" (no adapter). decode = one token per row
(a forward over [rows, 1], no KV cache); prefill = `seq` tokens per row. The model is
random-initialised from a LlamaConfig (hidden size = Case.in_features, intermediate =
2 x hidden, head dim 64, vocab 1024), eval mode, under torch.no_grad.

Contestants: lora_ext's adapter_names path (adapter pool + BGMV/SGMV kernels), PEFT's
adapter_names path (a Python loop over the adapters of the batch), lora_ext with a
single active adapter for every row (no adapter_names: the fused lora_linear path), and
the base model alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ._harness import DTYPE_ALIASES, Case, Contestant, Family, Runner, Unavailable, register_family

VOCAB = 1024
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class BgmvInputs:
    """Shared by every contestant of a case: one base state dict, one adapter set, one batch."""
    config: object                  # transformers.LlamaConfig
    state_dict: dict                # base-model weights
    adapter_state: dict             # PEFT state dict of the N adapters (same keys in lora_ext)
    input_ids: torch.Tensor         # [rows, seq]
    adapter_names: list[str]        # one per row
    case: Case
    device: torch.device
    _ref: dict = field(default_factory=dict)


def _extra(case: Case) -> dict:
    return dict(case.extra)


def make_bgmv_cases(features=512, tokens=(16, 64), dtypes=("float32",), ranks=16, dropouts=0.0,
                    adapters=(1, 16, 64), seqs=(1, 32), layers: int = 4) -> list[Case]:
    """Grid of bgmv cases: features = hidden sizes, tokens = rows (sequences) per batch,
    seqs = tokens per row (1 = decode), adapters = distinct adapters loaded and used."""
    def seq(v):
        return [v] if isinstance(v, (int, float, str)) else list(v)
    cases = []
    for hidden in seq(features):
        hidden = int(str(hidden).lower().split("x")[0])
        for dtype in seq(dtypes):
            for rows in seq(tokens):
                for length in seq(seqs):
                    for n in seq(adapters):
                        for r in seq(ranks):
                            cases.append(Case("bgmv", DTYPE_ALIASES.get(dtype, dtype), hidden, hidden,
                                              int(rows) * int(length), int(r), 0.0,
                                              extra=(("rows", int(rows)), ("seq", int(length)),
                                                     ("adapters", int(n)), ("layers", int(layers)))))
    return cases


def _llama_config(case: Case):
    from transformers import LlamaConfig
    hidden = case.in_features
    heads = max(1, hidden // 64)
    return LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=_extra(case)["layers"],
                       num_attention_heads=heads, num_key_value_heads=heads, vocab_size=VOCAB,
                       max_position_embeddings=max(128, _extra(case)["seq"]), attn_implementation="sdpa",
                       bos_token_id=0, eos_token_id=0, pad_token_id=0)


def _lora_config_kwargs(case: Case) -> dict:
    # init_lora_weights=False: B is random too, so every adapter changes the output
    return dict(r=case.r, lora_alpha=2 * case.r, lora_dropout=0.0, target_modules=TARGETS,
                init_lora_weights=False)


def row_adapter_names(rows: int, adapters: int) -> list[str]:
    """Adapters in turn; with more rows than adapters every 16th row is "__base__"."""
    names, k = [], 0
    for i in range(rows):
        if rows > adapters and i % 16 == 15:
            names.append("__base__")
        else:
            names.append(f"a{k % adapters}")
            k += 1
    return names


def make_bgmv_inputs(case: Case, device: torch.device) -> BgmvInputs:
    try:
        import peft
        from transformers import LlamaForCausalLM
    except ImportError as error:
        raise Unavailable(f"needs peft and transformers: {error}") from error
    config = _llama_config(case)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype=case.torch_dtype)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    extra = _extra(case)
    lora = peft.LoraConfig(**_lora_config_kwargs(case))
    peft_model = peft.get_peft_model(model, lora, adapter_name="a0", autocast_adapter_dtype=False)
    for i in range(1, extra["adapters"]):
        peft_model.add_adapter(f"a{i}", peft.LoraConfig(**_lora_config_kwargs(case)))
    adapter_state = {k: v.detach().clone() for k, v in peft_model.state_dict().items() if "lora_" in k}
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (extra["rows"], extra["seq"]), generator=gen).to(device)
    return BgmvInputs(config, state, adapter_state, ids, row_adapter_names(extra["rows"], extra["adapters"]),
                      case, device)


def _fresh_base(inp: BgmvInputs, dtype: torch.dtype | None = None):
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM(inp.config)
    model.load_state_dict(inp.state_dict)
    return model.to(device=inp.device, dtype=dtype or inp.case.torch_dtype).eval()


def _with_adapters(model, inp: BgmvInputs):
    """model (a PEFT or lora_ext PeftModel with adapter a0) given a1..a{N-1} and every weight."""
    n = _extra(inp.case)["adapters"]
    for i in range(1, n):
        model.add_adapter(f"a{i}", type(model.peft_config["a0"])(**_lora_config_kwargs(inp.case)))
    missing = set(inp.adapter_state) - set(model.state_dict())
    if missing:
        raise RuntimeError(f"adapter keys missing from the model: {sorted(missing)[:3]}")
    model.load_state_dict(inp.adapter_state, strict=False)
    return model.to(inp.device).eval()


def _runner(model, inp: BgmvInputs, adapter_names: list[str] | None, info: dict | None = None) -> Runner:
    ids = inp.input_ids
    kwargs = {} if adapter_names is None else {"adapter_names": adapter_names}

    def step():
        with torch.no_grad():
            return model(input_ids=ids, **kwargs).logits
    return Runner(step, step, info or {})


def _peft_available(device: torch.device) -> str | None:
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as error:
        return f"needs peft and transformers: {error}"
    return None


def _build_peft(case: Case, inp: BgmvInputs) -> Runner:
    import peft
    model = peft.get_peft_model(_fresh_base(inp), peft.LoraConfig(**_lora_config_kwargs(case)),
                                adapter_name="a0", autocast_adapter_dtype=False)
    return _runner(_with_adapters(model, inp), inp, inp.adapter_names, {"peft_version": peft.__version__})


def _lora_ext_model(inp: BgmvInputs):
    import lora_ext
    model = lora_ext.get_peft_model(_fresh_base(inp), lora_ext.LoraConfig(**_lora_config_kwargs(inp.case)),
                                    adapter_name="a0")
    return _with_adapters(model, inp)


def _build_lora_ext(case: Case, inp: BgmvInputs) -> Runner:
    return _runner(_lora_ext_model(inp), inp, inp.adapter_names)


def _build_single(case: Case, inp: BgmvInputs) -> Runner:
    """The same batch with one adapter (a0) active for every row: no adapter_names."""
    model = _lora_ext_model(inp)
    model.set_adapter("a0")
    return _runner(model, inp, None)


def _build_base(case: Case, inp: BgmvInputs) -> Runner:
    return _runner(_fresh_base(inp), inp, None)


def _bgmv_check(case: Case, inp: BgmvInputs, name: str, logits: torch.Tensor) -> float | None:
    """Max relative error of the logits against an fp64 PEFT model of the same contestant's
    meaning: the mixed batch (ours, peft), all rows on a0 (single), or the base model."""
    if name not in ("lora_ext", "peft", "single", "base"):
        return None
    key = {"lora_ext": "mixed", "peft": "mixed"}.get(name, name)
    if key not in inp._ref:
        import peft
        base = _fresh_base(inp, torch.float64)
        with torch.no_grad():
            if key == "base":
                ref = base(input_ids=inp.input_ids).logits
            else:
                model = peft.get_peft_model(base, peft.LoraConfig(**_lora_config_kwargs(case)), adapter_name="a0",
                                            autocast_adapter_dtype=False)
                model = _with_adapters(model, inp).double()
                names = inp.adapter_names if key == "mixed" else None
                ref = model(input_ids=inp.input_ids, **({"adapter_names": names} if names else {})).logits
        inp._ref[key] = ref.float()
    ref = inp._ref[key]
    return float((logits.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _bgmv_tolerance(case: Case) -> float:
    return {"float64": 1e-10, "float32": 1e-4, "float16": 2e-2}.get(case.dtype, 5e-2)


def _lora_ext_available(device: torch.device) -> str | None:
    return _peft_available(device)


register_family(Family(
    name="bgmv",
    description="mixed-adapter inference of a random-init LlamaForCausalLM (adapter_names, all projections)",
    measures="one no-grad forward (decode: 1 token per row, no KV cache; prefill: seq tokens per row)",
    presets={
        # quick: the decode step of issue 7's CPU target only (model setup with 64 PEFT
        # adapters dominates a CPU run; prefill and more sizes are in "full")
        "quick": dict(features=512, tokens=(64,), dtypes=("float32",), ranks=16, dropouts=0.0,
                      adapters=(1, 16, 64), seqs=(1,), layers=4),
        "full": dict(features=(512, 1024), tokens=(16, 32, 64), dtypes=("float32", "bfloat16"), ranks=16,
                     dropouts=0.0, adapters=(1, 4, 16, 64), seqs=(1, 32, 128), layers=4),
    },
    make_cases=make_bgmv_cases,
    make_inputs=make_bgmv_inputs,
    contestants=(
        Contestant("base", "base", "the base model without adapters (the floor)", _build_base, _peft_available),
        Contestant("peft", "peft", "peft.get_peft_model with N adapters, forward(adapter_names=...)",
                   _build_peft, _peft_available),
        Contestant("lora_ext", "ours", "lora_ext with N adapters, forward(adapter_names=...): adapter "
                   "pool + BGMV/SGMV kernels", _build_lora_ext, _lora_ext_available),
        Contestant("single", "single", "lora_ext, the same batch with one active adapter for every row "
                   "(no adapter_names)", _build_single, _lora_ext_available),
    ),
    default_contestants=("base", "peft", "lora_ext", "single"),
    baseline="base",
    ours="lora_ext",
    ratios=(("peft/ours (speedup)", "peft", "lora_ext"), ("ours/single", "lora_ext", "single"),
            ("ours/base", "lora_ext", "base")),
    check=_bgmv_check,
    tolerance=_bgmv_tolerance,
))
