"""Preference tuning (DPO / IPO / cDPO / ORPO) on a tiny random Llama, checked against hand-computed values and
plain HF transformers: record formats, response-only log-probs, losses, packing, the LoRA reference, accumulation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from loom.finetune.config import FinetuneConfig
from loom.finetune.formats import DataError
from loom.finetune.lora import apply_lora
from loom.finetune.preference import (
    PreferenceTrainer,
    collate_pairs,
    dpo_loss,
    encode_pair,
    encode_pairs,
    orpo_loss,
    pair_conversations,
    sequence_logps,
    simpo_loss,
)
from loom.finetune.template import IGNORE_INDEX, encode_example

from .conftest import make_tiny_llama

PAIRS = [
    {"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "6, I think, but maybe it is seven."},
    {"prompt": [{"role": "user", "content": "Sort: c a b"}], "chosen": [{"role": "assistant", "content": "a b c"}],
     "rejected": [{"role": "assistant", "content": "a c b"}]},
    {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Well, there are many colours, for example green."},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                  {"role": "assistant", "content": "hello"}, {"role": "user", "content": "Capital of France?"}],
     "chosen": "Paris.", "rejected": "It is probably Lyon."},
]


def config(tmp_path, **kw) -> FinetuneConfig:
    base = dict(model="unused", data="unused", output=str(tmp_path / "out"), method="dpo", batch_size=2,
                max_length=128, lr=1e-3, max_steps=4, warmup_steps=1, progress=False, reference="precompute")
    return FinetuneConfig(**{**base, **kw})


def hf_response_logp(model, example: dict) -> float:
    """Reference: plain HF forward of one sequence, log_softmax, summed over the supervised targets."""
    ids = torch.tensor([example["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0]
    keep = torch.tensor(example["labels"][1:]) != IGNORE_INDEX
    return float(logp[keep].sum())


# ---------------------------------------------------------------- records


def test_plain_conversational_and_implicit_prompts_encode_alike(tokenizer):
    plain = encode_pair({"prompt": "2+2?", "chosen": "4", "rejected": "5"}, tokenizer)
    conversational = encode_pair({"prompt": [{"role": "user", "content": "2+2?"}],
                                  "chosen": [{"role": "assistant", "content": "4"}],
                                  "rejected": [{"role": "assistant", "content": "5"}]}, tokenizer)
    implicit = encode_pair({"chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
                            "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}]},
                           tokenizer)
    assert plain == conversational == implicit
    sft = encode_example({"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
                         tokenizer)
    assert plain["chosen"]["input_ids"] == sft["input_ids"] and plain["chosen"]["labels"] == sft["labels"]


def test_only_the_final_assistant_turn_is_supervised(tokenizer):
    pair = encode_pair(PAIRS[3], tokenizer)
    for side, text in (("chosen", "Paris."), ("rejected", "It is probably Lyon.")):
        labels = pair[side]["labels"]
        supervised = [t for t in labels if t != IGNORE_INDEX]
        assert tokenizer.decode(supervised).strip() == text + tokenizer.eos_token
        assert "hello" not in tokenizer.decode(supervised)  # the earlier assistant turn is context only
        # one contiguous run at the end of the response
        idx = [i for i, t in enumerate(labels) if t != IGNORE_INDEX]
        assert idx == list(range(idx[0], idx[-1] + 1))
    # the prompt tokens of both sides are identical
    c, r = pair["chosen"], pair["rejected"]
    first = min(i for i, t in enumerate(c["labels"]) if t != IGNORE_INDEX)
    assert c["input_ids"][:first] == r["input_ids"][:first]


@pytest.mark.parametrize("record, message", [
    ({"prompt": "x", "chosen": "y"}, "needs 'chosen' and 'rejected'"),
    ({"prompt": "x", "chosen": 3, "rejected": "z"}, "'chosen' must be a string"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
      "rejected": [{"role": "user", "content": "OTHER"}, {"role": "assistant", "content": "c"}]}, "differ only"),
    ({"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "chosen": "c",
      "rejected": "d"}, "prompt ends with an assistant turn"),
])
def test_bad_records_say_what_to_fix(record, message):
    with pytest.raises(DataError, match=message):
        pair_conversations({**record, "_where": "prefs.jsonl:3"})


def test_truncated_pairs_are_skipped(tokenizer):
    long_prompt = {"prompt": "word " * 200, "chosen": "a", "rejected": "b"}
    pairs, skipped = encode_pairs([PAIRS[0], long_prompt], tokenizer, max_length=64)
    assert (len(pairs), skipped) == (1, 1)


# ---------------------------------------------------------------- log-probs and losses


@pytest.mark.parametrize("packing", [False, True])
def test_sequence_logps_equal_hf_log_softmax_summed_over_the_response(tokenizer, packing):
    model = make_tiny_llama(len(tokenizer))
    pairs, _ = encode_pairs(PAIRS, tokenizer)
    rows = [[0, 1], [2, 3]] if packing else None
    pb = collate_pairs(pairs, [0, 1, 2, 3], tokenizer.pad_token_id, packing, rows)
    with torch.no_grad():
        sums, counts = sequence_logps(model, pb)
    expected = [hf_response_logp(model, pairs[k][side]) for k in range(4) for side in ("chosen", "rejected")]
    assert sums.tolist() == pytest.approx(expected, abs=1e-4)
    assert counts.tolist() == [sum(1 for t in pairs[k][side]["labels"][1:] if t != IGNORE_INDEX)
                               for k in range(4) for side in ("chosen", "rejected")]


def test_dpo_ipo_cdpo_orpo_losses_equal_hand_computed_values():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-1.0, -2.0, -1.5, -1.8))
    beta = 0.1
    z = (-1.0 + 1.5) - (-2.0 + 1.8)  # 0.7
    out = dpo_loss(pc, pr, rc, rr, beta=beta)
    assert float(out.losses) == pytest.approx(math.log1p(math.exp(-beta * z)), rel=1e-6)
    assert float(out.chosen_rewards) == pytest.approx(0.05) and float(out.rejected_rewards) == pytest.approx(-0.02)
    smooth = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=0.1)
    assert float(smooth.losses) == pytest.approx(0.9 * math.log1p(math.exp(-beta * z))
                                                 + 0.1 * math.log1p(math.exp(beta * z)), rel=1e-6)
    ipo = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo")
    assert float(ipo.losses) == pytest.approx((z - 1 / (2 * beta)) ** 2, rel=1e-6)
    mc, mr = torch.tensor([-0.5]), torch.tensor([-1.2])
    log_odds = (-0.5 - math.log(1 - math.exp(-0.5))) - (-1.2 - math.log(1 - math.exp(-1.2)))
    expected = 0.5 - beta * math.log(1 / (1 + math.exp(-log_odds)))
    assert float(orpo_loss(mc, mr, beta=beta).losses) == pytest.approx(expected, rel=1e-6)
    simpo = simpo_loss(mc, mr, beta=2.0, gamma=0.5)  # 2.0 x 0.7 - 0.5 = 0.9 past the margin
    assert float(simpo.losses) == pytest.approx(math.log1p(math.exp(-0.9)), rel=1e-6)
    assert float(simpo.chosen_rewards) == pytest.approx(-1.0) and float(simpo.rejected_rewards) == pytest.approx(-2.4)


def test_dpo_loss_on_a_tiny_model_equals_the_hand_computed_value(tmp_path, tokenizer):
    """Policy and a different reference model; the loss from the trainer equals the formula on HF log-probs."""
    policy, reference = make_tiny_llama(len(tokenizer), seed=0), make_tiny_llama(len(tokenizer), seed=1)
    pairs, _ = encode_pairs(PAIRS[:2], tokenizer)
    trainer = PreferenceTrainer(config(tmp_path, beta=0.5), policy, tokenizer, pairs)
    trainer.reference = torch.tensor([[hf_response_logp(reference, p[s]) for s in ("chosen", "rejected")]
                                      for p in pairs])
    out, _, _ = trainer.pair_losses(collate_pairs(pairs, [0, 1], tokenizer.pad_token_id, packing=False))
    for k, pair in enumerate(pairs):
        c = hf_response_logp(policy, pair["chosen"]) - hf_response_logp(reference, pair["chosen"])
        r = hf_response_logp(policy, pair["rejected"]) - hf_response_logp(reference, pair["rejected"])
        assert float(out.losses[k].detach()) == pytest.approx(-math.log(1 / (1 + math.exp(-0.5 * (c - r)))), abs=1e-5)


def lora_policy(tokenizer, seed=0):
    model = apply_lora(make_tiny_llama(len(tokenizer), seed=seed), r=4, alpha=8, dropout=0.0, targets="all-linear")
    torch.manual_seed(seed + 7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)  # non-zero B: the adapters change the outputs
    return model


def test_lora_reference_with_adapters_off_equals_a_frozen_copy(tmp_path, tokenizer):
    frozen = make_tiny_llama(len(tokenizer), seed=0)
    policy = lora_policy(tokenizer)
    pairs, _ = encode_pairs(PAIRS, tokenizer)
    trainer = PreferenceTrainer(config(tmp_path, lora=True, reference="adapters"), policy, tokenizer, pairs)
    pb = collate_pairs(pairs, [0, 1, 2, 3], tokenizer.pad_token_id, packing=False)
    with torch.no_grad():
        expected, _ = sequence_logps(frozen, pb)
        with_adapters, _ = sequence_logps(policy, pb)
    ref = trainer.reference_logps(pb)
    assert torch.allclose(ref, expected, atol=1e-5)
    assert not torch.allclose(with_adapters, expected, atol=1e-3)  # the adapters matter, so the check can fail


@pytest.mark.parametrize("method, extra", [("dpo", {}), ("dpo", {"dpo_loss": "ipo"}), ("orpo", {}), ("simpo", {})])
def test_packed_and_padded_pairs_give_the_same_loss_and_gradient(tmp_path, tokenizer, method, extra):
    pairs, _ = encode_pairs(PAIRS, tokenizer)
    results = []
    for packing in (False, True):
        model = lora_policy(tokenizer)
        trainer = PreferenceTrainer(config(tmp_path, lora=True, reference="adapters", method=method, **extra),
                                    model, tokenizer, pairs)
        rows = [[0, 1, 2], [3]] if packing else None
        out, _, _ = trainer.pair_losses(collate_pairs(pairs, [0, 1, 2, 3], tokenizer.pad_token_id, packing, rows))
        out.losses.sum().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((out.losses.detach(), grads))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-5)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-5)


def test_accumulation_gives_the_full_batch_gradient(tmp_path, tokenizer):
    pairs, _ = encode_pairs(PAIRS, tokenizer)
    grads = []
    for splits in ([[0, 1, 2, 3]], [[0, 1], [2, 3]], [[0], [1, 2, 3]]):
        model = lora_policy(tokenizer)
        trainer = PreferenceTrainer(config(tmp_path, lora=True, reference="adapters"), model, tokenizer, pairs)
        batches = [collate_pairs(pairs, s, tokenizer.pad_token_id, packing=False) for s in splits]
        total = sum(b.num_pairs for b in batches)
        for b in batches:
            out, _, _ = trainer.pair_losses(b)
            (out.losses.sum() / total).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and torch.allclose(grads[0], grads[2], atol=1e-6)


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("lora, packing", [(True, False), (False, True)])
def test_dpo_training_raises_the_reward_margin_and_accuracy(tmp_path, tokenizer, lora, packing):
    pairs, _ = encode_pairs(PAIRS, tokenizer)
    model = make_tiny_llama(len(tokenizer))
    if lora:
        model = apply_lora(model, r=8, alpha=16, dropout=0.0, targets="all-linear")
    cfg = config(tmp_path, lora=lora, packing=packing, reference="auto", batch_size=4, max_steps=16, lr=1e-2)
    trainer = PreferenceTrainer(cfg, model, tokenizer, pairs)
    assert trainer.reference_mode == ("adapters" if lora else "precompute")
    held_ref = trainer.precompute_reference(pairs)
    before = trainer.evaluate(pairs, held_ref)
    assert before["rewards/margins"] == pytest.approx(0.0, abs=1e-5)  # policy == reference at the start
    assert before["rewards/accuracy_ties_half"] == 0.5  # every pair a tie
    result = trainer.fit()
    after = trainer.evaluate(pairs, held_ref)
    assert result.num_pairs == 16 * 4 and result.losses[-1] < result.losses[0]
    assert after["rewards/margins"] > 0.2 and after["rewards/accuracy"] == 1.0
    assert after["loss"] < math.log(2) - 0.05


def test_simpo_training_opens_the_length_averaged_margin(tmp_path, tokenizer):
    pairs, _ = encode_pairs(PAIRS, tokenizer)
    cfg = config(tmp_path, method="simpo", beta=2.0, simpo_gamma=0.5, batch_size=4, max_steps=16, lr=1e-2)
    trainer = PreferenceTrainer(cfg, make_tiny_llama(len(tokenizer)), tokenizer, pairs)
    assert trainer.reference_mode is None  # no reference model
    before = trainer.evaluate(pairs)
    result = trainer.fit()
    after = trainer.evaluate(pairs)
    assert result.losses[-1] < result.losses[0] and after["rewards/accuracy"] == 1.0
    assert after["rewards/margins"] > before["rewards/margins"] + 0.5


def test_reference_adapters_needs_lora(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="needs lora=True"):
        config(tmp_path, reference="adapters")
    with pytest.raises(ValueError, match="train_on_inputs applies to method 'sft' only"):
        config(tmp_path, train_on_inputs=True)
    with pytest.raises(ValueError, match="applies to dpo_loss='sigmoid' only"):
        config(tmp_path, dpo_loss="ipo", label_smoothing=0.1)


@pytest.mark.slow
def test_cli_dpo_run_logs_rewards_and_exports_adapter_and_merged_model(tmp_path, tiny_model_dir, capsys):
    from transformers import AutoModelForCausalLM

    from loom.cli import main
    from scripts.finetune_demo_data import write_jsonl

    write_jsonl(PAIRS * 2, tmp_path / "prefs.jsonl")
    write_jsonl(PAIRS, tmp_path / "held.jsonl")
    write_jsonl([{"question": "What is 2 + 3?", "choices": ["5", "6", "seven"], "answer": 0},
                 {"question": "Name a colour.", "choices": ["Blue.", "Table."], "answer": "Blue."}],
                tmp_path / "mc.jsonl")
    out = tmp_path / "out"
    code = main(["finetune", "--method", "dpo", "--beta", "0.1", "--model", str(tiny_model_dir),
                 "--data", str(tmp_path / "prefs.jsonl"), "--eval-data", str(tmp_path / "held.jsonl"),
                 "--output", str(out), "--lora", "--lora-r", "8", "--lr", "1e-2", "--max-steps", "8",
                 "--batch-size", "4", "--no-progress", "--warmup-steps", "1", "--mc-eval-data",
                 str(tmp_path / "mc.jsonl")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "reward accuracy" in printed and "mc acc" in printed
    assert json.loads(printed.strip().splitlines()[-1])["mc_eval"]["tuned"]["num_questions"] == 2
    summary = json.loads((out / "loom_finetune.json").read_text())
    base, tuned = summary["preference_eval"]["base"], summary["preference_eval"]["tuned"]
    assert base["rewards/accuracy_ties_half"] == 0.5 and base["pairs"] == len(PAIRS)
    assert tuned["rewards/margins"] > base["rewards/margins"] + 0.05
    assert summary["train_pairs_per_s"] > 0 and summary["steps"] == 8
    logged = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logged] == list(range(1, 9))
    assert {"rewards/margins", "rewards/accuracy", "logps/chosen", "logps/rejected", "loss", "lr"} <= set(logged[0])
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert "lora" not in " ".join(n for n, _ in model.named_parameters())
