"""Helpers for the PEFT interop tests: tiny models, twin models, and comparisons.

A "twin" is the same base model (same seed, same weights) wrapped once by the real PEFT
and once by lora-ext, with the same adapter values: the adapter crosses from one library
to the other through save_pretrained / from_pretrained, the path the tests check. Every
comparison of numbers uses the tolerance rule (lora_testing): our error against an fp64
run of the PEFT model is at most 2x PEFT's own fp32 error, measured normwise as for every
whole-model comparison (lora_testing's docstring says why).
"""
from __future__ import annotations

import copy
import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import peft
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import lora_ext
from lora_testing import assert_within_torch_error_normwise

VOCAB, BATCH, SEQ = 128, 2, 8
LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# PEFT's config fields whose order is arbitrary (sets written as lists)
SET_FIELDS = ("target_modules", "exclude_modules", "modules_to_save")


class EmbConvNet(nn.Module):
    """nn.Embedding -> nn.Conv2d -> nn.Linear: the two non-linear LoRA layer types."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        e = self.emb(x).view(x.shape[0], 4, 16, 16)        # x: [B, 64] token ids
        return self.head(torch.relu(self.conv(e)).mean(dim=(2, 3)))


def tiny_llama(seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, attn_implementation="eager",
        bos_token_id=0, eos_token_id=0, pad_token_id=0))


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, attn_implementation="eager"))


def tiny_embconv(seed: int = 0) -> EmbConvNet:
    torch.manual_seed(seed)
    return EmbConvNet()


BASES = {"llama": tiny_llama, "gpt2": tiny_gpt2, "embconv": tiny_embconv}
DEFAULT_TARGETS = {"llama": LLAMA_LINEARS, "gpt2": ["c_attn", "c_proj", "c_fc"], "embconv": ["emb", "conv", "head"]}


def inputs(kind: str, seed: int = 5) -> dict:
    gen = torch.Generator().manual_seed(seed)
    if kind == "embconv":
        return {"x": torch.randint(0, 50, (BATCH, 64), generator=gen)}
    return {"input_ids": torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)}


def randomize_adapters(model: nn.Module, seed: int = 3, names: tuple[str, ...] | None = None) -> None:
    """Give every A and B random values of a trained adapter's size (PEFT starts at B = 0,
    which would hide any difference in B, in scaling or in the adapter path)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if names is not None and not any(f".{n}." in name or name.endswith(f".{n}") for n in names):
                continue
            if "lora_A" in name or "lora_embedding_A" in name:
                fan = p.shape[1] if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=gen) * fan ** -0.5)
            elif "lora_B" in name or "lora_embedding_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def output_of(result) -> torch.Tensor:
    if isinstance(result, torch.Tensor):
        return result
    if hasattr(result, "logits"):
        return result.logits
    return result.last_hidden_state


def run(model: nn.Module, kwargs: dict, grads: bool = False, seed: int = 6):
    """(output, {name: grad} of every parameter that requires grad)."""
    model.zero_grad(set_to_none=True)
    out = output_of(model(**kwargs))
    if not grads:
        return out.detach(), {}
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    (out * weight).sum().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()
                          if p.requires_grad and p.grad is not None}


def fp64_oracle(peft_model: nn.Module) -> nn.Module:
    return copy.deepcopy(peft_model).double()


def double_inputs(kwargs: dict) -> dict:
    return {k: v.double() if v.is_floating_point() else v for k, v in kwargs.items()}


def assert_same_numbers(ours: nn.Module, theirs: nn.Module, kwargs: dict, grads: bool = False,
                        what: str = "") -> None:
    """Outputs (and gradients, in training mode) of lora-ext vs PEFT, by the tolerance rule."""
    oracle = fp64_oracle(theirs)
    y, g = run(ours, kwargs, grads)
    y_t, g_t = run(theirs, kwargs, grads)
    y_o, g_o = run(oracle, double_inputs(kwargs), grads)
    assert_within_torch_error_normwise(y, y_t, y_o, what=f"{what} output")
    if grads:
        assert g.keys() == g_t.keys(), f"{what}: trainable parameters differ: {sorted(g.keys() ^ g_t.keys())}"
        assert g, f"{what}: nothing was trainable"
        for name in g:
            assert_within_torch_error_normwise(g[name], g_t[name], g_o[name], what=f"{what} grad {name}")


def saved_config(path: Path) -> dict:
    values = json.loads((Path(path) / "adapter_config.json").read_text())
    for key in SET_FIELDS:
        if isinstance(values.get(key), list):
            values[key] = set(values[key])
    return values


def assert_same_files(ours_dir: Path, peft_dir: Path, ignore: tuple[str, ...] = ()) -> None:
    """The same safetensors keys with the same shapes and values, and the same config."""
    ours = load_file(str(Path(ours_dir) / "adapter_model.safetensors"))
    theirs = load_file(str(Path(peft_dir) / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys(), f"keys differ: {sorted(ours.keys() ^ theirs.keys())}"
    for key in ours:
        assert ours[key].shape == theirs[key].shape and ours[key].dtype == theirs[key].dtype, key
        assert torch.equal(ours[key], theirs[key]), key
    c_ours, c_theirs = saved_config(ours_dir), saved_config(peft_dir)
    for key in ("peft_version", *ignore):
        c_ours.pop(key, None), c_theirs.pop(key, None)
    assert c_ours == c_theirs, {k: (c_ours.get(k), c_theirs.get(k)) for k in c_ours.keys() | c_theirs.keys()
                                if c_ours.get(k) != c_theirs.get(k)}


def trainable_text(model) -> str:
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        model.print_trainable_parameters()
    return buffer.getvalue()


def assert_same_counts(ours, theirs) -> None:
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert trainable_text(ours) == trainable_text(theirs)


def assert_same_state(ours: nn.Module, theirs: nn.Module) -> None:
    """Identical state_dict keys and values (e.g. two merged models)."""
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())
    for key in a:
        assert a[key].shape == b[key].shape, key
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def peft_twin(kind: str, tmp_path: Path, seed: int = 3, adapter_name: str = "default", base=None, **config):
    """A PEFT model with random adapters, saved, and lora-ext's model loaded from that folder."""
    base = base or BASES[kind]
    config.setdefault("target_modules", DEFAULT_TARGETS.get(kind))
    config.setdefault("r", 4)
    config.setdefault("lora_alpha", 8)
    theirs = peft.get_peft_model(base(), peft.LoraConfig(**config), adapter_name=adapter_name)
    randomize_adapters(theirs, seed)
    path = Path(tmp_path) / "peft"
    theirs.save_pretrained(path)
    sub = path if adapter_name == "default" else path / adapter_name
    ours = lora_ext.PeftModel.from_pretrained(base(), sub, adapter_name=adapter_name, is_trainable=True)
    return ours, theirs, path


def ours_twin(kind: str, tmp_path: Path, seed: int = 3, adapter_name: str = "default", base=None, **config):
    """A lora-ext model with random adapters, saved, and PEFT's model loaded from that folder."""
    base = base or BASES[kind]
    config.setdefault("target_modules", DEFAULT_TARGETS.get(kind))
    config.setdefault("r", 4)
    config.setdefault("lora_alpha", 8)
    ours = lora_ext.get_peft_model(base(), lora_ext.LoraConfig(**config), adapter_name=adapter_name)
    randomize_adapters(ours, seed)
    path = Path(tmp_path) / "ours"
    ours.save_pretrained(path)
    sub = path if adapter_name == "default" else path / adapter_name
    theirs = peft.PeftModel.from_pretrained(base(), sub, adapter_name=adapter_name, is_trainable=True)
    return ours, theirs, path


def check_both_ways(kind: str, tmp_path: Path, base=None, model_inputs: dict | None = None, grads: bool = True,
                    **config):
    """PEFT -> lora-ext and lora-ext -> PEFT: same files, counts, outputs and gradients.
    Returns the (ours, theirs) pair of the second direction."""
    model_inputs = model_inputs if model_inputs is not None else inputs(kind)
    for direction, twin in (("from_peft", peft_twin), ("from_ours", ours_twin)):
        folder = Path(tmp_path) / direction
        ours, theirs, path = twin(kind, folder, base=base, **copy.deepcopy(config))
        (ours if twin is peft_twin else theirs).save_pretrained(folder / "resaved")
        if twin is peft_twin:
            assert_same_files(folder / "resaved", path)
        else:
            assert_same_files(path, folder / "resaved")
        assert type(ours).__name__ == type(theirs).__name__
        assert_same_counts(ours, theirs)
        ours.eval(), theirs.eval()
        assert_same_numbers(ours, theirs, model_inputs, what=f"{direction} eval")
        if grads:
            ours.train(), theirs.train()
            assert_same_numbers(ours, theirs, model_inputs, grads=True, what=f"{direction} train")
    return ours, theirs
