"""End to end: tiny random-init Llama and GPT-2 trained 20 steps with lora-ext and with PEFT.

Same seed, same data, dropout 0: the loss curves agree by the tolerance rule (our distance
to an fp64 PEFT run is at most twice PEFT's own fp32 distance, plus a rounding floor),
in a plain training loop and under transformers' Trainer; the adapter lora-ext saves
loads in PEFT and gives the trained model's logits.
"""
import copy
import warnings

import peft
import pytest
import torch
from transformers import Trainer, TrainingArguments

import lora_ext
from lora_testing import assert_within_torch_error
from peft_twins import BASES, VOCAB, run

STEPS, BATCH, SEQ, LR = 20, 4, 16, 5e-3
CONFIG = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def dataset(n=BATCH * 4):
    """A tiny in-memory language-modelling set: a few repeated patterns, learnable in 20 steps."""
    gen = torch.Generator().manual_seed(7)
    patterns = torch.randint(1, VOCAB, (4, SEQ), generator=gen)
    rows = patterns[torch.arange(n) % 4]
    return [{"input_ids": r, "labels": r.clone(), "attention_mask": torch.ones_like(r)} for r in rows]


def model_for(lib, kind, dtype=torch.float32):
    base = BASES[kind]().to(dtype)
    return lib.get_peft_model(base, lib.LoraConfig(task_type="CAUSAL_LM", **CONFIG))


def plain_loop(model):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    data = dataset()
    losses = []
    for step in range(STEPS):
        rows = [data[(step * BATCH + i) % len(data)] for i in range(BATCH)]
        batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return torch.tensor(losses, dtype=torch.float64)


def trainer_loop(model, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=STEPS,
                             per_device_train_batch_size=BATCH, learning_rate=LR, lr_scheduler_type="constant",
                             warmup_steps=0, weight_decay=0.0, logging_steps=1, save_strategy="no", seed=0,
                             data_seed=0, disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=dataset())
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == STEPS
    return torch.tensor(losses, dtype=torch.float64)


def train(lib, kind, loop, tmp_path, dtype=torch.float32):
    torch.manual_seed(0)
    model = model_for(lib, kind, dtype)
    losses = plain_loop(model) if loop == "plain" else trainer_loop(model, tmp_path / f"{lib.__name__}{dtype}")
    return model, losses


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("loop", ["plain", "trainer"])
def test_loss_curve_equals_peft_and_the_adapter_loads_in_peft(kind, loop, tmp_path):
    ours, losses = train(lora_ext, kind, loop, tmp_path)
    theirs, losses_peft = train(peft, kind, loop, tmp_path)
    _, losses_fp64 = train(peft, kind, loop, tmp_path, torch.float64)
    assert losses[-1] < 0.9 * losses[0], f"no learning: {losses.tolist()}"
    # floor: one fp32 rounding unit per step of the loss scale, times the steps taken
    floor = torch.finfo(torch.float32).eps * losses_fp64.abs().max().item() * STEPS
    ours_err = (losses - losses_fp64).abs().max().item()
    peft_err = (losses_peft - losses_fp64).abs().max().item()
    assert ours_err <= 2 * peft_err + floor, (
        f"loss curve: our distance to fp64 {ours_err:.3e} > 2 x PEFT's {peft_err:.3e} + {floor:.1e}\n"
        f"ours {losses.tolist()}\npeft {losses_peft.tolist()}")

    ours.save_pretrained(tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(BASES[kind](), tmp_path / "adapter").eval()
    assert type(loaded).__name__ == "PeftModelForCausalLM"
    ids = torch.stack([r["input_ids"] for r in dataset()[:BATCH]])
    ours.eval(), theirs.eval()
    y, _ = run(ours, {"input_ids": ids})
    y_loaded, _ = run(loaded, {"input_ids": ids})
    oracle, _ = run(copy.deepcopy(ours).double(), {"input_ids": ids})
    # the file reproduces our trained model in PEFT (PEFT's unfused layers, the same weights)
    assert_within_torch_error(y, y_loaded, oracle, what="trained model vs its adapter loaded in PEFT")
