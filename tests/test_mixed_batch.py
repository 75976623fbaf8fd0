"""Mixed-batch inference (adapter_names=...) through the adapter pool and BGMV/SGMV kernels:
equal to PEFT's adapter_names output and to running each row alone; adapters saved by PEFT;
generate; PEFT's errors; the pool following adapter loads, edits and deletions."""
from __future__ import annotations

import peft
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import lora_ext

VOCAB = 128


def tiny_model(kind: str, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    if kind == "llama":
        cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                          attn_implementation="eager", pad_token_id=0, bos_token_id=1, eos_token_id=2)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2,
                         attn_implementation="eager")
        model = GPT2LMHeadModel(cfg)
    return model.to(dtype).eval()


TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"],
           "gpt2": ["c_attn", "c_proj", "c_fc", "wte"]}


def adapter_config(kind: str, i: int, embedding: bool = True) -> dict:
    """Adapters differ in rank, alpha, rslora and targets, so padding and per-layer absence are exercised."""
    targets = TARGETS[kind] if i % 3 and embedding else TARGETS[kind][:-1]  # some leave the embedding alone
    if i % 4 == 3:
        targets = targets[:2]  # and some only touch attention
    return dict(r=[4, 8, 2, 6][i % 4], lora_alpha=[8, 16, 3, 6][i % 4], use_rslora=(i % 5 == 4),
                target_modules=targets, init_lora_weights=False, fan_in_fan_out=(kind == "gpt2"))


def peft_model_with_adapters(kind: str, count: int, dtype=torch.float32, embedding: bool = True):
    base = tiny_model(kind, dtype=dtype)
    torch.manual_seed(100)
    model = peft.get_peft_model(base, peft.LoraConfig(**adapter_config(kind, 0, embedding)), adapter_name="a0")
    for i in range(1, count):
        model.add_adapter(f"a{i}", peft.LoraConfig(**adapter_config(kind, i, embedding)))
    return model.eval()


def ours_like(kind: str, theirs, dtype=torch.float32, dtype_adapters=None):
    """lora_ext with the same adapters as a PEFT model, through the state dict (same keys)."""
    base = tiny_model(kind, dtype=dtype)
    configs = {name: cfg.to_dict() for name, cfg in theirs.peft_config.items()}
    fields = ("r", "lora_alpha", "use_rslora", "target_modules", "fan_in_fan_out")
    def config(name):
        return lora_ext.LoraConfig(init_lora_weights=False, **{k: configs[name][k] for k in fields})
    names = list(theirs.peft_config)
    ours = lora_ext.get_peft_model(base, config(names[0]), adapter_name=names[0])
    for name in names[1:]:
        ours.add_adapter(name, config(name))
    state = theirs.state_dict()
    if dtype_adapters is not None:
        state = {k: v.to(dtype_adapters) if "lora_" in k else v for k, v in state.items()}
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if "lora_" in k], (missing, unexpected)
    return ours.eval()


def save_all(peft_model, directory) -> list:
    """PEFT writes each adapter not named "default" in a subfolder of its name."""
    peft_model.save_pretrained(directory)
    return [(name, directory / name) for name in peft_model.peft_config]


def load_ours(kind: str, saved, dtype=torch.float32):
    base = tiny_model(kind, dtype=dtype)
    (first, first_dir), *rest = saved
    model = lora_ext.PeftModel.from_pretrained(base, first_dir, adapter_name=first)
    for name, directory in rest:
        model.load_adapter(directory, adapter_name=name)
    return model.eval()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def pair(request, tmp_path_factory):
    kind = request.param
    theirs = peft_model_with_adapters(kind, 5)
    return kind, theirs, ours_like(kind, theirs)


def batch(rows: int, seq: int, seed: int = 7):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (rows, seq), generator=gen)


NAMES = ["a1", "__base__", "a0", "a3", "a1", "a4", "a2", "__base__", "a3"]


@pytest.mark.parametrize("seq", [1, 6])
def test_matches_peft_adapter_names(pair, seq):
    kind, theirs, ours = pair
    ids = batch(len(NAMES), seq)
    with torch.no_grad():
        want = theirs(ids, adapter_names=NAMES).logits
        got = ours(ids, adapter_names=NAMES).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and the adapters matter: the base model alone differs
    with torch.no_grad(), ours.disable_adapter():
        base = ours(ids).logits
    assert (got - base).abs().amax() > 1e-2


def test_matches_each_row_alone(pair):
    kind, _, ours = pair
    ids = batch(len(NAMES), 5, seed=8)
    with torch.no_grad():
        mixed = ours(ids, adapter_names=NAMES).logits
        for row, name in enumerate(NAMES):
            if name == "__base__":
                with ours.disable_adapter():
                    alone = ours(ids[row:row + 1]).logits
            else:
                ours.set_adapter(name)
                alone = ours(ids[row:row + 1]).logits
            torch.testing.assert_close(mixed[row:row + 1], alone, rtol=1e-5, atol=1e-5)
    ours.set_adapter("a0")


def test_generate_matches_peft(pair):
    kind, theirs, ours = pair
    ids = batch(len(NAMES), 4, seed=9)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        want = theirs.generate(input_ids=ids, adapter_names=NAMES, **kwargs)
        got = ours.generate(input_ids=ids, adapter_names=NAMES, **kwargs)
    assert torch.equal(got, want)
    # row by row with the adapter active gives the same tokens
    with torch.no_grad():
        for row in (0, 1, 5):
            name = NAMES[row]
            one = dict(kwargs, attention_mask=torch.ones_like(ids[row:row + 1]))
            if name == "__base__":
                with ours.disable_adapter():
                    alone = ours.generate(input_ids=ids[row:row + 1], **one)
            else:
                ours.set_adapter(name)
                alone = ours.generate(input_ids=ids[row:row + 1], **one)
            assert torch.equal(got[row:row + 1], alone)
    ours.set_adapter("a0")


def test_beam_search_matches_peft(pair):
    kind, theirs, ours = pair
    ids = batch(3, 4, seed=10)
    names = ["a2", "__base__", "a1"]
    kwargs = dict(max_new_tokens=4, do_sample=False, num_beams=2, pad_token_id=0,
                  attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        want = theirs.generate(input_ids=ids, adapter_names=names, **kwargs)
        got = ours.generate(input_ids=ids, adapter_names=names, **kwargs)
    assert torch.equal(got, want)


def test_thirty_two_peft_adapters(tmp_path):
    theirs = peft_model_with_adapters("llama", 32, embedding=False)
    saved = save_all(theirs, tmp_path)
    ours = load_ours("llama", saved)
    names = [f"a{i}" for i in range(32)] + ["__base__"] * 4 + ["a5", "a31", "a0", "a17"]
    ids = batch(len(names), 3, seed=11)
    with torch.no_grad():
        want = theirs(ids, adapter_names=names).logits
        got = ours(ids, adapter_names=names).logits
        got_decode = ours(ids[:, :1], adapter_names=names).logits
        want_decode = theirs(ids[:, :1], adapter_names=names).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_decode, want_decode, rtol=1e-5, atol=1e-5)
    q_proj = ours.base_model.model.model.layers[0].self_attn.q_proj
    pool = q_proj._adapter_pool
    assert len(pool.slots) == 32 and pool.capacity == 32 and pool.rank == 8


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_peft(dtype):
    theirs = peft_model_with_adapters("llama", 4, dtype=dtype)
    ours = ours_like("llama", theirs, dtype=dtype)
    names = ["a0", "a3", "__base__", "a1", "a2"]
    ids = batch(len(names), 4, seed=12)
    with torch.no_grad():
        want = theirs(ids, adapter_names=names).logits.double()
        got = ours(ids, adapter_names=names).logits.double()
        ours_fp64 = ours_like("llama", theirs, dtype=torch.float64, dtype_adapters=torch.float64)
        exact = ours_fp64(ids, adapter_names=names).logits
    # our rounding error is of PEFT's size (the kernel rounds each output once)
    assert (got - exact).abs().max() <= 2 * (want - exact).abs().max() + 1e-6


def test_pool_follows_loads_edits_and_deletions(tmp_path):
    theirs = peft_model_with_adapters("llama", 3, embedding=False)
    saved = save_all(theirs, tmp_path)
    ours = load_ours("llama", saved)
    ids = batch(3, 2, seed=13)
    names = ["a0", "a1", "a2"]

    def expected():
        rows = []
        for row, name in enumerate(names):
            ours.set_adapter(name)
            rows.append(ours(ids[row:row + 1]).logits)
        return torch.cat(rows)

    with torch.no_grad():
        ours(ids, adapter_names=names)
        q_proj = ours.base_model.model.model.layers[0].self_attn.q_proj
        pool = q_proj._adapter_pool
        storage = pool.lora_A.data_ptr()
        q_proj.lora_B["a1"].weight.mul_(3.0)  # an in-place edit of one adapter
        ours.base_model.model.model.layers[1].mlp.down_proj.set_scale("a2", 0.5)
        torch.testing.assert_close(ours(ids, adapter_names=names).logits, expected(), rtol=1e-5, atol=1e-5)
        assert pool.lora_A.data_ptr() == storage  # refreshed in its slot, not re-stacked
        ours.delete_adapter("a1")
        assert "a1" not in ours.peft_config
        ours(ids[:1], adapter_names=["a0"])
        assert "a1" not in pool.slots
        ours.load_adapter(saved[1][1], adapter_name="b")
        names[1] = "b"
        torch.testing.assert_close(ours(ids, adapter_names=names).logits, expected(), rtol=1e-5, atol=1e-5)
        assert pool.slots["b"] == 1  # the freed slot is reused
        # a parameter replaced by a new object, and new storage assigned through .data
        q_proj.lora_A["a0"].weight = torch.nn.Parameter(q_proj.lora_A["a0"].weight * -2.0)
        ours.base_model.model.model.layers[1].mlp.down_proj.lora_B["b"].weight.data = (
            torch.randn_like(ours.base_model.model.model.layers[1].mlp.down_proj.lora_B["b"].weight))
        torch.testing.assert_close(ours(ids, adapter_names=names).logits, expected(), rtol=1e-5, atol=1e-5)


def test_peft_errors(pair, tmp_path):
    kind, _, ours = pair
    ids = batch(2, 3)
    with pytest.raises(ValueError, match="Trying to infer with non-existing adapter"):
        ours(ids, adapter_names=["a0", "nope"])
    with pytest.raises(ValueError, match="Length of `adapter_names` should be the same as the number of inputs"):
        ours(ids, adapter_names=["a0"])
    ours.train()
    try:
        with pytest.raises(ValueError, match="Cannot pass `adapter_names` when the model is in training mode"):
            ours(ids, adapter_names=["a0", "a1"])
    finally:
        ours.eval()
    ours.merge_adapter(["a0"])
    try:
        with pytest.raises(ValueError, match="Cannot pass `adapter_names` when there are merged adapters"):
            ours(ids, adapter_names=["a0", "a1"])
    finally:
        ours.unmerge_adapter()


def test_dora_adapter_refused():
    base = tiny_model("llama")
    model = lora_ext.get_peft_model(base, lora_ext.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    model.add_adapter("plain", lora_ext.LoraConfig(r=4, target_modules=["q_proj"]))
    model.eval()
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when DoRA is enabled"):
        model(batch(2, 2), adapter_names=["default", "plain"])
    model(batch(2, 2), adapter_names=["plain", "__base__"])  # no DoRA adapter named: fine


def test_layer_called_directly_with_adapter_names():
    """A LoRA layer used outside the model wrapper syncs its own pool."""
    layer = lora_ext.layers.Linear(torch.nn.Linear(16, 12), "x", r=4, lora_alpha=8, init_lora_weights=False)
    layer.update_layer("y", r=2, lora_alpha=2, lora_dropout=0.0, init_lora_weights=False)
    layer.eval()
    x = torch.randn(3, 5, 16)
    got = layer(x, adapter_names=["y", "__base__", "x"])
    want = torch.stack([
        layer.base_layer(x[0]) + layer._adapter_output(x[0], "y"),
        layer.base_layer(x[1]),
        layer.base_layer(x[2]) + layer._adapter_output(x[2], "x")])
    torch.testing.assert_close(got, want)
