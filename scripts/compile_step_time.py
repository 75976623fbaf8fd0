"""torch.compile of a training step of the tiny Llama with LoRA (all-linear, r=8, dropout 0.05).

Prints one JSON line: graph breaks under torch._dynamo.explain, the first compiled step's wall
and process CPU time (inductor compiles in worker processes, not counted in CPU time), the
median of the next 5 steps, the graphs compiled and whether the recompile limit was hit.

    python scripts/compile_step_time.py KIND BACKEND MODE
    KIND: ours | ours_dora | accelerate | accelerate_dora | qlora | peft | peft_dora
    BACKEND: aot_eager | inductor
    MODE: fwd (forward+loss compiled, backward through AOTAutograd) | whole (loss.backward()
          traced too, fullgraph=True, torch._dynamo.config.trace_autograd_ops)

NO_EXPLAIN=1 skips the explain pass (it leaves dynamo state behind that slows later steps).
"""
import json, sys, time, warnings
warnings.filterwarnings("ignore")
import logging
logging.disable(logging.WARNING)
import torch, transformers
import lora_ext
from torch._dynamo.utils import counters

kind, backend, mode = sys.argv[1:4]
torch.manual_seed(0)
base = transformers.LlamaForCausalLM(transformers.LlamaConfig(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
cfg = dict(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.05, use_dora=kind.endswith("dora"))
if kind.startswith("peft") or kind.startswith("accelerate"):
    import peft
    m = peft.get_peft_model(base, peft.LoraConfig(**cfg))
    if kind.startswith("accelerate"):
        lora_ext.accelerate(m)
elif kind.startswith("qlora"):
    m = lora_ext.get_peft_model(lora_ext.quantize_model(base), lora_ext.LoraConfig(**cfg))
else:
    m = lora_ext.get_peft_model(base, lora_ext.LoraConfig(**cfg))
m.train()
ids = torch.randint(0, 128, (2, 16))
import os
if os.environ.get('NO_EXPLAIN'):
    breaks = None
else:
    ex = torch._dynamo.explain(lambda i: m(input_ids=i).logits)(ids)
    breaks = ex.graph_break_count
torch._dynamo.reset(); counters.clear()
if mode == "whole":
    torch._dynamo.config.trace_autograd_ops = True
    def whole(i):
        loss = m(input_ids=i, labels=i).loss
        loss.backward()
        return loss.detach()
    c = torch.compile(whole, backend=backend, fullgraph=True)
    run = c
else:
    c = torch.compile(lambda i: m(input_ids=i, labels=i).loss, backend=backend)
    run = lambda i: c(i).backward()
def timed():
    m.zero_grad(set_to_none=True)
    w, p = time.perf_counter(), time.process_time()
    run(ids)
    return time.perf_counter() - w, time.process_time() - p
first = timed()
later = [timed() for _ in range(5)]
print(json.dumps(dict(kind=kind, backend=backend, mode=mode, lora_ext=lora_ext.__file__.split("/lora_ext")[0],
                      graph_breaks=breaks, first_wall_s=round(first[0], 2), first_cpu_s=round(first[1], 2),
                      later_wall_ms=round(1000 * sorted(w for w, _ in later)[2], 1),
                      later_cpu_ms=round(1000 * sorted(p for _, p in later)[2], 1),
                      unique_graphs=counters["stats"]["unique_graphs"],
                      recompile_limit_hit=any("recompile_limit" in k for k in counters))))
