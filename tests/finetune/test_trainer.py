"""Trainer on a tiny random Llama: schedule, seeded runs, atomic checkpoints and exact resume, LoRA merge + export."""

from __future__ import annotations

import json

import pytest
import torch

from loom.finetune.checkpoint import latest_checkpoint
from loom.finetune.config import FinetuneConfig
from loom.finetune.export import export_adapter, export_model
from loom.finetune.lora import apply_lora, merge_lora
from loom.finetune.template import encode_example
from loom.finetune.trainer import Trainer, lr_lambda

from .conftest import make_tiny_llama
from .test_loss import RECORDS


def cfg(tmp_path, **kw) -> FinetuneConfig:
    base = dict(model="unused", data="unused", output=str(tmp_path / "out"), batch_size=2, max_length=128,
                lr=1e-3, max_steps=4, warmup_steps=1, progress=False)
    return FinetuneConfig(**{**base, **kw})


def test_warmup_then_cosine():
    f = lr_lambda(warmup=2, total=10, min_ratio=0.1)
    assert [round(f(s), 4) for s in (0, 1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0) and f(10) == pytest.approx(0.1)
    assert f(6) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert all(f(s) >= f(s + 1) for s in range(2, 10))


def test_config_validates_itself():
    with pytest.raises(ValueError, match="template must be one of"):
        FinetuneConfig(model="m", data="d", output="o", template="vicuna")
    with pytest.raises(ValueError, match="batch_size must be positive"):
        FinetuneConfig(model="m", data="d", output="o", batch_size=0)


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("packing", [True, False])
def test_training_lowers_loss_and_is_seeded(tmp_path, tokenizer, packing):
    exs = [encode_example(r, tokenizer) for r in RECORDS]
    runs = []
    for _ in range(2):
        model = make_tiny_llama(len(tokenizer))
        result = Trainer(cfg(tmp_path, packing=packing, max_steps=4), model, tokenizer, exs).fit()
        runs.append((result.losses, params(model)))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])
    losses = runs[0][0]
    assert len(losses) == 4 and all(x == x for x in losses) and losses[-1] < losses[0]


def test_resume_continues_exactly(tmp_path, tokenizer):
    exs = [encode_example(r, tokenizer) for r in RECORDS]
    straight = make_tiny_llama(len(tokenizer))
    Trainer(cfg(tmp_path / "a", grad_accum=2), straight, tokenizer, exs).fit()

    first = make_tiny_llama(len(tokenizer))
    Trainer(cfg(tmp_path / "b", grad_accum=2, save_every=2), first, tokenizer, exs).fit(stop_at=2)  # "killed" at 2
    ckpt_dir = tmp_path / "b" / "out" / "checkpoints"
    assert latest_checkpoint(ckpt_dir).name == "step-000002"
    assert not [p for p in ckpt_dir.iterdir() if p.name.startswith(".tmp")]  # atomic: no temp folder left
    resumed = make_tiny_llama(len(tokenizer), seed=123)  # different init: everything must come from the checkpoint
    trainer = Trainer(cfg(tmp_path / "b", grad_accum=2, resume=True, save_every=2), resumed, tokenizer, exs)
    result = trainer.fit()
    assert result.steps == 4 and len(result.losses) == 2
    for name, value in params(straight).items():
        torch.testing.assert_close(params(resumed)[name], value, atol=1e-6, rtol=1e-6, msg=name)
    assert latest_checkpoint(ckpt_dir).name == "step-000004" and len(list(ckpt_dir.glob("step-*"))) == 1


def test_lora_trains_only_adapters_then_merges_and_exports(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    exs = [encode_example(r, tokenizer) for r in RECORDS]
    base = make_tiny_llama(len(tokenizer))
    frozen = params(base)
    model = apply_lora(base, r=4, alpha=8, dropout=0.0, targets="all-linear")
    Trainer(cfg(tmp_path, lora=True, lr=1e-2), model, tokenizer, exs).fit()
    lora_names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert lora_names and all("lora_" in n for n in lora_names)
    probe = torch.tensor([exs[0]["input_ids"]])
    with torch.no_grad():
        tuned_logits = model(input_ids=probe).logits
    out = tmp_path / "out"
    adapter = export_adapter(model, out)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}
    merged = merge_lora(model)
    changed = [n for n, p in merged.named_parameters() if not torch.equal(p, frozen[n])]
    assert changed and all("proj" in n for n in changed)  # only adapted linear layers moved
    export_model(merged, tokenizer, out, tokenizer.chat_template, {"note": "test"})
    names = {p.name for p in out.iterdir()}
    expected = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    assert expected <= names
    assert not [n for n in names if n.startswith(".tmp")]
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    reloaded_tok = AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=probe).logits, tuned_logits, atol=1e-4, rtol=1e-4)
    assert reloaded_tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                            tokenize=False) == tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)


def test_gradient_checkpointing_gives_the_same_gradient(tokenizer):
    from loom.finetune.collate import pack_collate
    from loom.finetune.modeling import enable_checkpointing
    from loom.finetune.trainer import accumulate

    exs = [encode_example(r, tokenizer) for r in RECORDS[:4]]
    batch = pack_collate([exs], pad_id=2)
    grads = []
    for checkpointing in (False, True):
        model = make_tiny_llama(len(tokenizer)).train()
        if checkpointing:
            enable_checkpointing(model)
        accumulate(model, [batch], torch.autocast("cpu", enabled=False))
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-5, msg=name)
