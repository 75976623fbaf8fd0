"""The "llama_train" benchmark family: one full LoRA training step of a small LlamaForCausalLM.

A step is forward, cross-entropy loss, backward and an AdamW step on the adapters, with
LoRA (r, alpha = 2r, dropout) on every linear projection (q, k, v, o, gate, up, down) and
the model in train mode. The model is random-initialised from a LlamaConfig (no download):
hidden size = Case.in_features, intermediate = 2 x hidden (rounded to a multiple of 64),
head dim 64, Case.tokens = batch x sequence length.

Autocast cases (extra "autocast": "bf16") train as transformers' Trainer does with bf16=True:
forward and loss under torch.autocast(bfloat16), backward after it, the base model in the
case's dtype and the adapters in fp32 (PEFT's default autocast_adapter_dtype=True; lora_ext
keeps them in fp32 the same way).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ._harness import DTYPE_ALIASES, Case, Contestant, Family, Runner, Unavailable, register_family

VOCAB = 1024


@dataclass
class TrainInputs:
    """Shared by every contestant of a case: one base state dict and one batch."""
    config: object                  # transformers.LlamaConfig
    state_dict: dict                # initial base-model weights (every contestant starts here)
    input_ids: torch.Tensor         # [batch, seq]
    labels: torch.Tensor            # [batch, seq]
    case: Case
    device: torch.device
    _ref: dict = field(default_factory=dict)


def make_train_cases(features=(256,), tokens=512, dtypes=("float32",), ranks=16, dropouts=0.05,
                     layers: int = 2, batch: int = 4, autocasts=("off",)) -> list[Case]:
    """Grid of llama_train cases: features = hidden sizes, tokens = batch x seq, autocasts =
    "off" or an autocast dtype (bf16, fp16)."""
    def seq(v):
        return [v] if isinstance(v, (int, float, str)) else list(v)
    cases = []
    for hidden in seq(features):
        hidden = int(str(hidden).lower().split("x")[0])
        for dtype in seq(dtypes):
            for t in seq(tokens):
                if int(t) % batch:
                    raise ValueError(f"llama_train: tokens ({t}) must be a multiple of the batch ({batch})")
                for r in seq(ranks):
                    for p in seq(dropouts):
                        for amp in seq(autocasts):
                            extra = (("layers", int(layers)), ("batch", int(batch)))
                            if amp != "off":
                                _AUTOCAST_DTYPES[amp]  # KeyError: not a known autocast dtype
                                extra += (("autocast", amp),)
                            cases.append(Case("llama_train", DTYPE_ALIASES.get(dtype, dtype), hidden,
                                              hidden, int(t), int(r), float(p), extra=extra))
    return cases


_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _autocast_dtype(case: Case) -> torch.dtype | None:
    amp = dict(case.extra).get("autocast")
    return None if amp is None else _AUTOCAST_DTYPES[amp]


def _autocast(case: Case, device: torch.device):
    """The autocast region of a training step (forward and loss), off for plain cases."""
    dtype = _autocast_dtype(case)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def _llama_config(case: Case):
    from transformers import LlamaConfig
    hidden = case.in_features
    extra = dict(case.extra)
    heads = max(1, hidden // 64)
    return LlamaConfig(hidden_size=hidden, intermediate_size=max(64, (2 * hidden) // 64 * 64),
                       num_hidden_layers=extra["layers"], num_attention_heads=heads,
                       num_key_value_heads=heads, vocab_size=VOCAB,
                       max_position_embeddings=max(128, case.tokens // extra["batch"]),
                       attn_implementation="sdpa", bos_token_id=0, eos_token_id=0,
                       pad_token_id=0)


def make_train_inputs(case: Case, device: torch.device) -> TrainInputs:
    try:
        from transformers import LlamaForCausalLM
    except ImportError as error:
        raise Unavailable(f"transformers is not installed: {error}") from error
    config = _llama_config(case)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype=case.torch_dtype)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    batch = dict(case.extra)["batch"]
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (batch, case.tokens // batch), generator=gen).to(device)
    return TrainInputs(config, state, ids, ids.clone(), case, device)


def _fresh_model(inp: TrainInputs, dtype: torch.dtype | None = None):
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM(inp.config)
    model.load_state_dict(inp.state_dict)
    return model.to(device=inp.device, dtype=dtype or inp.case.torch_dtype).train()


def _lora_kwargs(case: Case) -> dict:
    return dict(r=case.r, lora_alpha=2 * case.r, lora_dropout=case.dropout,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                "down_proj"], bias="none")


def _training_runner(model, inp: TrainInputs, info: dict) -> Runner:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids, labels = inp.input_ids, inp.labels

    def step():
        with _autocast(inp.case, inp.device):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def forward():  # eval mode: no dropout, so every contestant computes the same logits
        model.eval()
        try:
            with _autocast(inp.case, inp.device):
                return model(input_ids=ids).logits
        finally:
            model.train()
    info = dict(info, trainable_parameters=sum(p.numel() for p in params),
                adapter_dtypes=sorted({str(p.dtype).replace("torch.", "") for p in params}))
    return Runner(step, forward, info)


def _peft_available(device: torch.device) -> str | None:
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as error:
        return f"needs peft and transformers: {error}"
    return None


def _peft_model(inp: TrainInputs):
    import peft
    # Plain cases: adapters in the model dtype, as for every contestant. Autocast cases: PEFT's
    # default autocast_adapter_dtype=True (fp32 adapters), what a Trainer user runs.
    return peft.get_peft_model(_fresh_model(inp), peft.LoraConfig(**_lora_kwargs(inp.case)),
                               autocast_adapter_dtype=_autocast_dtype(inp.case) is not None)


def _build_peft(case: Case, inp: TrainInputs) -> Runner:
    import peft
    return _training_runner(_peft_model(inp), inp, {"peft_version": peft.__version__})


def _build_peft_accelerated(case: Case, inp: TrainInputs) -> Runner:
    import peft

    import lora_ext
    from lora_ext.accelerate import accelerated_layers
    model = lora_ext.accelerate(_peft_model(inp))
    return _training_runner(model, inp, {"peft_version": peft.__version__,
                                         "accelerated_layers": len(accelerated_layers(model))})


def _build_base(case: Case, inp: TrainInputs) -> Runner:
    """The frozen model, forward + backward to its input embeddings: the activation
    gradients LoRA training must compute anyway, without adapters or an optimizer."""
    model = _fresh_model(inp)
    model.requires_grad_(False)
    embed = model.get_input_embeddings()
    ids, labels = inp.input_ids, inp.labels

    def step():
        x = embed(ids).detach().requires_grad_(True)
        with _autocast(case, inp.device):
            loss = model(inputs_embeds=x, labels=labels).loss
        loss.backward()
        return loss

    def forward():
        model.eval()
        try:
            with _autocast(case, inp.device):
                return model(input_ids=ids).logits
        finally:
            model.train()
    return Runner(step, forward)


def _lora_ext_available(device: torch.device) -> str | None:
    import lora_ext
    if not hasattr(lora_ext, "get_peft_model") or not hasattr(lora_ext, "LoraConfig"):
        return "lora_ext has no get_peft_model/LoraConfig yet (lora_ext/model.py)"
    return None


def _build_lora_ext(case: Case, inp: TrainInputs) -> Runner:
    """Hook for lora_ext's own PEFT-style API: its get_peft_model on the same base model
    and the same LoRA settings (field names as PEFT's LoraConfig)."""
    import lora_ext
    config = lora_ext.LoraConfig(**_lora_kwargs(case))
    model = lora_ext.get_peft_model(_fresh_model(inp), config,
                                    autocast_adapter_dtype=_autocast_dtype(case) is not None)
    return _training_runner(model, inp, {})


def _train_check(case: Case, inp: TrainInputs, name: str, logits: torch.Tensor) -> float | None:
    """Max relative error of a contestant's eval-mode logits against the fp32 base model
    (PEFT starts every adapter at B = 0, so all contestants compute the base model)."""
    if "ref" not in inp._ref:
        ref_model = _fresh_model(inp, torch.float32).eval()
        with torch.no_grad():
            inp._ref["ref"] = ref_model(input_ids=inp.input_ids).logits.float()
    ref = inp._ref["ref"]
    return float((logits.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _train_tolerance(case: Case) -> float:
    amp = _autocast_dtype(case)
    dtype = case.dtype if amp is None else str(amp).replace("torch.", "")
    return {"float64": 1e-10, "float32": 1e-4, "float16": 2e-2}.get(dtype, 5e-2)


register_family(Family(
    name="llama_train",
    description="one LoRA training step of a random-init LlamaForCausalLM (all linear projections)",
    measures="forward + loss + backward + AdamW step (train mode, LoRA dropout on)",
    presets={
        "quick": dict(features=256, tokens=512, dtypes=("float32",), ranks=16, dropouts=0.05,
                      layers=2, batch=4, autocasts=("off", "bf16")),
        "full": dict(features=(512, 1024), tokens=2048, dtypes=("float32", "bfloat16"), ranks=16,
                     dropouts=0.05, layers=4, batch=4, autocasts=("off", "bf16")),
    },
    make_cases=make_train_cases,
    make_inputs=make_train_inputs,
    contestants=(
        Contestant("base", "base", "the frozen model without adapters: forward + backward to the "
                   "input embeddings, no optimizer (the floor)", _build_base, _peft_available),
        Contestant("peft", "peft", "peft.get_peft_model, plain PEFT LoRA layers", _build_peft,
                   _peft_available),
        Contestant("peft_accelerated", "peft+accel", "the same PEFT model after "
                   "lora_ext.accelerate (fused lora_linear op)", _build_peft_accelerated,
                   _peft_available),
        Contestant("lora_ext", "ours", "lora_ext.get_peft_model (lora_ext's own layers)",
                   _build_lora_ext, _lora_ext_available),
    ),
    default_contestants=("base", "peft", "peft_accelerated", "lora_ext"),
    baseline="base",
    ours="peft_accelerated",
    ratios=(("peft/accel (speedup)", "peft", "peft_accelerated"),
            ("accel/base", "peft_accelerated", "base"), ("peft/ours", "peft", "lora_ext")),
    check=_train_check,
    tolerance=_train_tolerance,
))
