"""torch.compile of LoRA models with dropout: one graph, no recompiles, eager mode's masks.

The fused layers draw each Philox seed as a 0-d int64 tensor (ops.dropout_seed, an op on
torch's default CPU generator) and the ops take it as a tensor, so dynamo traces the draw
into the graph instead of breaking it for an `.item()`. Compiled with any backend the draw
runs on that generator as in eager mode, so the same torch seed gives the same masks;
torch.utils.checkpoint restores the generator before recomputing, so checkpointed runs
regenerate them.

Models: a 2-layer tiny Llama, LoRA on all linear layers (14 per model), lora_dropout=0.05,
through our layers (lora_ext.get_peft_model), through lora_ext.accelerate on a PEFT model,
with DoRA, and on an NF4 base (QLoRA).
"""
from __future__ import annotations

import collections
import copy
import warnings

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils.checkpoint import checkpoint

import lora_ext
from lora_ext import ops, reference
from lora_ext.accelerate import accelerated_layers
from lora_ext.layers.linear import fresh_dropout_seed

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

warnings.filterwarnings("ignore", message=".*kernels.*")

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
LORA_LAYERS = 14  # 2 decoder layers x 7 linear modules
FUSED_OP = {"ours": "lora_linear_forward", "accelerate": "lora_linear_forward",
            "ours_dora": "dora_linear_forward", "accelerate_dora": "dora_linear_forward",
            "qlora": "nf4_matmul"}  # QLoRA: the base; the adapter term draws ops.dropout_mask


def tiny_llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64))


def lora_model(kind: str, dropout: float = 0.05):
    config = dict(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=dropout,
                  use_dora=kind.endswith("dora"))
    if kind.startswith("accelerate"):
        model = lora_ext.accelerate(peft.get_peft_model(tiny_llama(), peft.LoraConfig(**config)))
        assert len(accelerated_layers(model)) == LORA_LAYERS
    elif kind == "qlora":
        model = lora_ext.get_peft_model(lora_ext.quantize_model(tiny_llama()), lora_ext.LoraConfig(**config))
    else:
        model = lora_ext.get_peft_model(tiny_llama(), lora_ext.LoraConfig(**config))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero B: the dropout masks reach the loss and every gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return model.train()


def lora_ext_op_counts(graphs) -> collections.Counter:
    """lora_ext ops in dynamo's graphs, subgraphs (autograd.Function bodies) included."""
    counts = collections.Counter()
    for graph in graphs:
        for module in graph.modules():
            if isinstance(module, torch.fx.GraphModule):
                for node in module.graph.nodes:
                    if node.op != "call_function":
                        continue
                    namespace, _, name = str(node.target).partition(".")  # lora_ext.<op>[.default]
                    if namespace == "lora_ext":
                        counts[name.split(".")[0]] += 1

    return counts


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def step(model):
    """A whole training step: forward, loss, backward."""
    def run(ids):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach()
    return run


def compiled_step(model, counter):
    # trace_autograd_ops lets dynamo trace loss.backward() into the same graph
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = torch.compile(step(model), backend=counter, fullgraph=True)

    def run(ids):
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            return compiled(ids)
    return run


# ---------------------------------------------------------------- one graph


@pytest.mark.parametrize("kind", list(FUSED_OP))
def test_forward_with_dropout_is_one_graph_through_the_fused_ops(kind):
    model = lora_model(kind)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda ids: model(input_ids=ids).logits)(IDS)
    reasons = [b.reason.splitlines()[0] for b in explained.break_reasons]
    assert explained.graph_break_count == 0 and explained.graph_count == 1, reasons
    counts = lora_ext_op_counts(explained.graphs)
    # every layer runs our op and draws its seed inside the graph, one per layer and call
    assert counts[FUSED_OP[kind]] == LORA_LAYERS, counts
    assert counts["dropout_seed"] == LORA_LAYERS, counts
    if kind == "qlora":  # in the adapter term's autograd.Function (forward and backward bodies)
        assert counts["dropout_mask"] >= LORA_LAYERS, counts


# ---------------------------------------------------------------- training steps


@pytest.mark.parametrize("kind", ["ours", "accelerate", "ours_dora", "qlora"])
def test_training_step_compiles_fullgraph_once_and_matches_eager(kind):
    eager = lora_model(kind)
    model = copy.deepcopy(eager)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    train_step = compiled_step(model, counter)
    losses = []
    for torch_seed in (10, 11, 12):
        for m in (eager, model):
            m.zero_grad(set_to_none=True)
        torch.manual_seed(torch_seed)
        expected = step(eager)(IDS)
        torch.manual_seed(torch_seed)
        loss = train_step(IDS)
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
        ours, theirs = grads(model), grads(eager)
        assert ours.keys() == theirs.keys() and all(g is not None for g in ours.values())
        for name in ours:
            torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-7, msg=name)
        losses.append(loss)
    assert counter.frame_count == 1  # no recompilation from step to step
    # the seeds are drawn per step, not baked into the graph: other steps, other masks
    assert not torch.equal(losses[0], losses[1]) and not torch.equal(losses[1], losses[2])


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(32, 48), torch.nn.Linear(48, 32)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.up(x)))


class CheckpointedBlocks(torch.nn.Module):
    """Residual MLP blocks, each run under torch.utils.checkpoint (use_reentrant=False) when
    `checkpointing` is set. (transformers' gradient_checkpointing_enable does not compile
    with fullgraph for reasons of its own: a requires_grad_() input hook, a context variable
    set inside each layer.)"""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(Block() for _ in range(3))
        self.checkpointing = False

    def forward(self, x):
        for block in self.blocks:
            run = block(x) if not self.checkpointing else checkpoint(block, x, use_reentrant=False)
            x = x + run
        return x.square().mean()


@pytest.mark.parametrize("kind", ["ours", "ours_dora", "accelerate", "accelerate_dora"])
def test_compiled_forward_with_activation_checkpointing_regenerates_the_masks(kind):
    """Forward and loss compiled into one graph (fullgraph), backward through AOTAutograd's
    compiled backward, every block checkpointed: the gradients equal a plain eager run's.
    (Tracing loss.backward() into the graph as well is refused by torch for any RNG op under
    checkpointing, nn.Dropout's included: "does not support RNG ops in recompute regions".)"""
    torch.manual_seed(0)
    config = dict(r=4, lora_alpha=8, target_modules=["up", "down"], lora_dropout=0.2,
                  use_dora=kind.endswith("dora"))
    if kind.startswith("accelerate"):
        plain = lora_ext.accelerate(peft.get_peft_model(CheckpointedBlocks(), peft.LoraConfig(**config)))
        assert len(accelerated_layers(plain)) == 6
    else:
        plain = lora_ext.get_peft_model(CheckpointedBlocks(), lora_ext.LoraConfig(**config))
    with torch.no_grad():
        for name, param in plain.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    plain.train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.get_base_model().checkpointing = True
    x = torch.randn(2, 5, 32)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    forward = torch.compile(checkpointed, backend=counter, fullgraph=True)
    for torch_seed in (3, 4):
        for m in (plain, checkpointed):
            m.zero_grad(set_to_none=True)
        torch.manual_seed(torch_seed)
        expected = plain(x)
        expected.backward()
        torch.manual_seed(torch_seed)
        loss = forward(x)
        loss.backward()
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
        ours, theirs = grads(checkpointed), grads(plain)
        assert len(theirs) == (18 if kind.endswith("dora") else 12)
        for name in theirs:
            torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-7, msg=name)
    assert counter.frame_count == 1


@pytest.mark.parametrize("kind", ["ours_dora", "accelerate"])
def test_eager_activation_checkpointing_regenerates_the_masks(kind):
    """Eager mode, the layers the existing checkpointing tests do not cover (LoRA through our
    layers and QLoRA are covered in test_training_at_scale.py and test_qlora.py)."""
    plain = lora_model(kind, dropout=0.3)
    checkpointed = copy.deepcopy(plain)
    inner = checkpointed.get_base_model() if kind.startswith("ours") else checkpointed.base_model.model
    inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for m in (plain, checkpointed):
        torch.manual_seed(8)
        step(m)(IDS)
    ours, theirs = grads(checkpointed), grads(plain)
    assert len(theirs) == (3 if kind.endswith("dora") else 2) * LORA_LAYERS
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-6, atol=1e-7, msg=name)


# ---------------------------------------------------------------- masks


def _masked_layer(p: float = 0.5):
    torch.manual_seed(0)
    layer = lora_ext.get_peft_model(torch.nn.Sequential(torch.nn.Linear(32, 16)), lora_ext.LoraConfig(
        r=4, lora_alpha=4, target_modules=["0"], lora_dropout=p))
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if "lora_B" in name:
                param.normal_()
    return layer.train()


def _draws(fn, x, torch_seed: int, calls: int = 3) -> list[torch.Tensor]:
    torch.manual_seed(torch_seed)
    return [fn(x) for _ in range(calls)]


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_layer_draws_the_eager_masks(backend):
    """Same torch seed, same masks: the layer's outputs under compile equal eager mode's, call
    after call, with inductor too (which would move a torch.randint onto its own RNG stream)."""
    layer = _masked_layer()
    x = torch.randn(8, 32)
    eager = _draws(layer, x, 4)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    compiled = _draws(torch.compile(layer, backend=counter, fullgraph=True), x, 4)
    assert counter.frame_count == 1
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(eager[0], eager[1])  # fresh masks per call


def test_compiled_mask_is_the_reference_mask_of_the_drawn_seed():
    def draw(like):
        seed = fresh_dropout_seed()
        return seed, ops.dropout_mask(like, 0.3, seed)

    torch._dynamo.reset()
    compiled = torch.compile(draw, backend="aot_eager", fullgraph=True)
    like = torch.empty(5, 7)
    torch.manual_seed(2)
    seeds = [draw(like)[0] for _ in range(2)]
    torch.manual_seed(2)
    for expected_seed in seeds:
        seed, mask = compiled(like)
        assert torch.equal(seed, expected_seed)
        assert torch.equal(mask, reference.dropout_mask(like, 0.3, int(seed)))


# ---------------------------------------------------------------- the public seed argument


def test_dropout_seed_is_its_reference_on_the_cpu_whatever_the_default_device():
    with torch.device("meta"):
        seed = fresh_dropout_seed()
    assert seed.device.type == "cpu" and seed.dtype == torch.int64 and seed.dim() == 0
    torch.manual_seed(6)
    drawn = [ops.dropout_seed() for _ in range(3)]
    torch.manual_seed(6)
    assert drawn == [reference.dropout_seed() for _ in range(3)]
    assert len(set(int(s) for s in drawn)) == 3 and all(0 <= int(s) < 2**62 for s in drawn)
    torch.library.opcheck(torch.ops.lora_ext.dropout_seed.default, (torch.device("cpu"),))


def _lora_args():
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(3, 4, 6, generator=gen), torch.randn(5, 6, generator=gen), torch.randn(5, generator=gen),
            torch.randn(2, 6, generator=gen), torch.randn(5, 2, generator=gen))


@pytest.mark.parametrize("int_seed,tensor_seed", [(7, torch.tensor(7)), (2**64 - 1, torch.tensor(-1)),
                                                  (-3, torch.tensor([-3]))], ids=["7", "2^64-1", "-3"])
def test_ops_take_an_int_or_a_one_element_int64_tensor_seed(int_seed, tensor_seed):
    x, weight, bias, lora_A, lora_B = _lora_args()
    magnitude = torch.rand(5) + 0.5
    torch.testing.assert_close(ops.lora_linear(x, weight, bias, lora_A, lora_B, 1.5, 0.4, tensor_seed),
                               ops.lora_linear(x, weight, bias, lora_A, lora_B, 1.5, 0.4, int_seed), rtol=0, atol=0)
    torch.testing.assert_close(ops.lora_linear(x, weight, bias, lora_A, lora_B, 1.5, 0.4, tensor_seed),
                               reference.lora_linear(x, weight, bias, lora_A, lora_B, 1.5, 0.4, int_seed))
    torch.testing.assert_close(
        ops.dora_linear(x, weight, bias, lora_A, lora_B, magnitude, 1.5, 0.4, tensor_seed, offset=9),
        ops.dora_linear(x, weight, bias, lora_A, lora_B, magnitude, 1.5, 0.4, int_seed, offset=9), rtol=0, atol=0)
    assert torch.equal(ops.dropout_mask(x, 0.4, tensor_seed, 2), ops.dropout_mask(x, 0.4, int_seed, 2))
    assert torch.equal(ops.dropout_mask(x, 0.4, tensor_seed, 2), reference.dropout_mask(x, 0.4, int_seed, 2))


BAD_SEEDS = {
    "float": (1.5, "seed must be an int, got float"),
    "bool": (True, "seed must be an int, got bool"),
    "float_tensor": (torch.tensor(1.0), r"seed must be an int or a one-element torch.int64 tensor, got a "
                                        r"torch.float32 tensor of shape \(\)"),
    "int32_tensor": (torch.tensor(1, dtype=torch.int32), "got a torch.int32 tensor"),
    "two_elements": (torch.tensor([1, 2]), r"got a torch.int64 tensor of shape \(2,\)"),
    "empty": (torch.tensor([], dtype=torch.int64), r"of shape \(0,\)"),
}


@pytest.mark.parametrize("seed,pattern", BAD_SEEDS.values(), ids=BAD_SEEDS.keys())
def test_bad_seeds_are_refused_by_every_op(seed, pattern):
    x, weight, bias, lora_A, lora_B = _lora_args()
    with pytest.raises(TypeError, match=pattern):
        ops.lora_linear(x, weight, bias, lora_A, lora_B, 1.5, 0.4, seed)
    with pytest.raises(TypeError, match=pattern):
        ops.dora_linear(x, weight, bias, lora_A, lora_B, torch.ones(5), 1.5, 0.4, seed)
    with pytest.raises(TypeError, match=pattern):
        ops.dropout_mask(x, 0.4, seed)


def test_the_kernels_refuse_a_seed_that_is_no_int64_scalar():
    x, weight, bias, lora_A, lora_B = _lora_args()
    with pytest.raises(RuntimeError, match="seed must be a one-element int64 tensor"):
        torch.ops.lora_ext.lora_linear_forward(x, weight, bias, lora_A, lora_B, 1.0, 0.1, torch.tensor([1, 2]), 0)
    with pytest.raises(RuntimeError, match="seed must be a one-element int64 tensor"):
        torch.ops.lora_ext.dropout_mask(x, 0.1, torch.tensor(1.0), 0)
