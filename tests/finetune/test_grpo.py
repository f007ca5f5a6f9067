"""GRPO: advantages and losses against hand-computed values (TRL's definitions), the rollout engine following the
policy (LoRA merged on the fly), prompts from every record format, reward functions, and a run that learns a reward
end to end through ``loom finetune --method grpo``."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loom.finetune.config import FinetuneConfig
from loom.finetune.formats import DataError
from loom.finetune.grpo import (
    GRPOTrainer,
    Rollouts,
    clip_active,
    collate_groups,
    completion_logps,
    encode_prompts,
    group_advantages,
    grpo_token_loss,
    policy_weights,
    reduce_loss,
)
from loom.finetune.lora import apply_lora
from loom.finetune.rewards import RewardModel, RewardSet, contains_reference, exact_match, think_format
from tests.conftest import save_tiny_model

FIRST_TOKEN_ODD = "def first_token_odd(prompts, completions, completion_ids, **columns):\n" \
                  "    return [float(ids[0] % 2 == 1) if ids else 0.0 for ids in completion_ids]\n"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_path):
    return save_tiny_model(tmp_path_factory.mktemp("grpo-tiny"), smollm2_path)


def test_group_advantages_equal_hand_computed_values():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv, std = group_advantages(rewards, 4, "group")
    s = math.sqrt(4 * 0.25 / 3)  # the unbiased std of (1, 0, 0, 1)
    expected = [0.5 / (s + 1e-4), -0.5 / (s + 1e-4), -0.5 / (s + 1e-4), 0.5 / (s + 1e-4), 0, 0, 0, 0]
    torch.testing.assert_close(adv, torch.tensor(expected))
    torch.testing.assert_close(std, torch.tensor([s] * 4 + [0.0] * 4))
    adv, _ = group_advantages(rewards, 4, "none")  # Dr. GRPO: the group mean only
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    adv, _ = group_advantages(rewards, 4, "batch")
    batch_std = float(rewards.std())
    means = torch.tensor([0.5] * 4 + [2.0] * 4)
    torch.testing.assert_close(adv, (rewards - means) / (batch_std + 1e-4))
    # a completion every reward function abstained on: out of its group's mean and std, advantage 0
    adv, _ = group_advantages(torch.tensor([1.0, math.nan, 0.0, 1.0]), 4)
    s = math.sqrt(((1 / 3) ** 2 * 2 + (2 / 3) ** 2) / 2)
    torch.testing.assert_close(adv, torch.tensor([(1 / 3) / (s + 1e-4), 0.0, -(2 / 3) / (s + 1e-4),
                                                  (1 / 3) / (s + 1e-4)]))


def test_one_step_loss_gradient_is_the_advantage_weighted_log_likelihood():
    torch.manual_seed(0)
    logits = torch.randn(5, 11, requires_grad=True)
    targets = torch.tensor([3, 1, 4, 1, 5])
    rows = torch.tensor([0, 0, 1, 1, 1])
    adv = torch.tensor([0.7, -1.3])[rows]
    logps = torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
    token_loss, kl = grpo_token_loss(logps, logps.detach(), adv)
    assert kl is None
    reduce_loss(token_loss, rows, 2, "dapo", step_tokens=5, num_micro=1, max_completion_length=8).backward()
    ours = logits.grad.clone()
    logits.grad = None
    logps = torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
    (-(adv * logps).sum() / 5).backward()  # REINFORCE with the group baseline: what the clipped ratio reduces to
    torch.testing.assert_close(ours, logits.grad)


def test_clipping_kl_and_the_four_normalisations_equal_hand_computed_values():
    logps = torch.tensor([-1.0, -2.0, -0.5, -1.5, -3.0])
    old = torch.tensor([-1.5, -2.0, -0.1, -1.5, -2.0])
    ref = torch.tensor([-1.2, -1.0, -0.5, -2.0, -3.5])
    rows = torch.tensor([0, 0, 1, 1, 1])
    adv = torch.tensor([1.0, 1.0, -2.0, -2.0, -2.0])
    loss, kl = grpo_token_loss(logps, old, adv, ref_logps=ref, beta=0.04)
    ratio = [math.exp(a - b) for a, b in zip(logps.tolist(), old.tolist())]
    expected_kl = [math.exp(r - p) - (r - p) - 1 for r, p in zip(ref.tolist(), logps.tolist())]
    expected = []
    for r, a, k in zip(ratio, adv.tolist(), expected_kl):
        clipped = min(max(r, 0.8), 1.2)
        expected.append(-min(r * a, clipped * a) + 0.04 * k)
    torch.testing.assert_close(kl, torch.tensor(expected_kl))
    torch.testing.assert_close(loss, torch.tensor(expected))
    e = expected
    cases = {
        "dapo": sum(e) / 20,  # the step's 20 completion tokens (this micro-batch holds 5 of them)
        "bnpo": sum(e) / 5 / 2,  # this micro-batch's tokens, then the 2 micro-batches
        "dr_grpo": sum(e) / (2 * 16) / 2,  # rows x max_completion_length
        "grpo": ((e[0] + e[1]) / 2 + (e[2] + e[3] + e[4]) / 3) / 2 / 2,  # per completion, then averaged
    }
    for loss_type, value in cases.items():
        got = reduce_loss(loss, rows, 2, loss_type, step_tokens=20, num_micro=2, max_completion_length=16)
        assert got.item() == pytest.approx(value, rel=1e-6), loss_type


def lora_model(folder, seed: int, std: float):
    """The folder's model with LoRA adapters whose B is random (peft starts it at zero: nothing to add)."""
    model = apply_lora(AutoModelForCausalLM.from_pretrained(str(folder)), r=4, alpha=8, dropout=0.0,
                       targets="all-linear")
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)
    return model


@pytest.mark.parametrize("share_prompt,max_row_tokens", [(True, 512), (True, 24), (False, 512)])
def test_completion_logps_equal_plain_forwards_and_share_prompts_exactly(tiny_dir, share_prompt, max_row_tokens):
    model = lora_model(tiny_dir, seed=3, std=0.05)
    groups = [([1, 520, 3042, 88, 17], [[5, 6, 7], None, [9, 2], [11, 12, 13, 14]]),
              ([1, 77, 901], [[40, 41], [42], [43, 44, 45], None])]
    cb = collate_groups(groups, pad_id=2, share_prompt=share_prompt, max_row_tokens=max_row_tokens)
    assert cb.num_sequences == 8 and cb.sequence.tolist() == [0] * 3 + [2] * 2 + [3] * 4 + [4] * 2 + [5] + [6] * 3
    if share_prompt and max_row_tokens == 512:
        assert cb.batch.input_ids.shape[0] == 2  # each prompt once, its completions after it
    logps, _ = completion_logps(model, cb, temperature=0.7)
    weights = torch.linspace(-1, 1, logps.numel())
    (weights * logps).sum().backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    expected = []  # every completion on its own, after its prompt: log_softmax(logits / T) at its tokens
    for prompt, completions in groups:
        for ids in completions:
            if ids is not None:
                logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1] / 0.7
                expected.append(torch.log_softmax(logits, -1).gather(1, torch.tensor(ids)[:, None]).squeeze(1))
    expected = torch.cat(expected)
    (weights * expected).sum().backward()
    torch.testing.assert_close(logps, expected, atol=2e-5, rtol=1e-5)
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(ours[name], p.grad, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("arch,overrides", [("granite", {}), ("gemma3", {"final_logit_softcapping": 3.0})])
def test_completion_logps_take_the_heads_scaling_and_soft_cap(tmp_path, smollm2_path, arch, overrides):
    folder = save_tiny_model(tmp_path / arch, smollm2_path, arch=arch, **overrides)
    model = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="sdpa").eval()  # as training loads
    prompt, ids = [1, 520, 3042, 88], [5, 6, 7]
    cb = collate_groups([(prompt, [ids])], pad_id=2)
    with torch.no_grad():
        logps, _ = completion_logps(model, cb, temperature=1.0)
        logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1]
    expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids)[:, None]).squeeze(1)
    torch.testing.assert_close(logps, expected, atol=2e-5, rtol=1e-5)


def test_clip_higher_and_the_clipped_tokens():
    logps = torch.tensor([0.5, 0.5, -0.5, -0.5, 0.1])
    old = torch.zeros(5)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0])
    loss, _ = grpo_token_loss(logps, old, adv, epsilon=0.2, epsilon_high=0.28)
    r = [math.exp(x) for x in logps.tolist()]  # 1.65, 1.65, 0.61, 0.61, 1.105
    expected = [-1.28, r[1], -r[2], 0.8, -r[4]]  # -min(r A, clip(r) A), the ratio clipped to [0.8, 1.28]
    torch.testing.assert_close(loss, torch.tensor(expected))
    assert clip_active(logps, old, adv, 0.2, 0.28).tolist() == [True, False, False, True, False]


def test_num_iterations_reuse_each_generation_batch(tiny_dir, tmp_path):
    from loom.finetune.modeling import load_model

    cfg = FinetuneConfig(model=str(tiny_dir), data="-", output=str(tmp_path / "out"), method="grpo",
                         reward_funcs=[str(tmp_path / "mine.py:first_token_odd")], num_generations=4,
                         max_completion_length=6, max_length=128, batch_size=2, grad_accum=2, num_iterations=2,
                         max_steps=4, lr=3e-2, temperature=0.5, progress=False)
    (tmp_path / "mine.py").write_text(FIRST_TOKEN_ODD)
    model, tok = load_model(tiny_dir, torch.device("cpu"))
    prompts, _ = encode_prompts([{"prompt": f"Count to {i}"} for i in range(8)], tok)
    rollouts = Rollouts(tiny_dir, cfg, torch.device("cpu"))
    trainer = GRPOTrainer(cfg, model, tok, prompts, RewardSet(cfg.reward_funcs), rollouts)
    assert trainer.total_steps == 4  # max_steps; by epochs, each generation batch counts num_iterations steps:
    by_epoch = GRPOTrainer(FinetuneConfig(**{**cfg.to_dict(), "max_steps": None, "epochs": 1.0}), model, tok, prompts,
                           RewardSet(cfg.reward_funcs), rollouts)
    assert by_epoch.total_steps == 2 * 2  # 8 prompts = 4 micro-batches of 2 = 2 generation batches, 2 steps each
    stream = trainer.micro_batches()
    taken = [next(stream) for _ in range(8)]
    assert taken[:2] == taken[2:4] and taken[4:6] == taken[6:8] and taken[:2] != taken[4:6]
    sampled = []
    generate = rollouts.generate
    rollouts.generate = lambda prompts, *a, **k: sampled.append(prompts) or generate(prompts, *a, **k)
    stats = [trainer.train_step(taken[2 * k : 2 * k + 2]) for k in range(4)]
    assert len(sampled) == 2  # one generation batch per two optimizer steps
    assert [s.extra["iteration"] for s in stats] == [1, 2, 1, 2]
    assert stats[0].extra["clip_ratio"] == 0.0  # the first step's policy is the sampling one: ratio 1
    assert stats[1].extra["clip_ratio"] > 0.0  # after one step at lr 3e-2 some ratios left [0.8, 1.2]
    assert stats[1].extra["reward"] == stats[0].extra["reward"]  # the same completions, scored once


def test_policy_weights_of_a_lora_model_equal_its_merge(tiny_dir):
    model = lora_model(tiny_dir, seed=1, std=0.05)
    ours = dict(policy_weights(model))
    merged = copy.deepcopy(model).merge_and_unload().state_dict()
    assert sorted(ours) == sorted(merged)
    for name, tensor in merged.items():
        torch.testing.assert_close(ours[name], tensor, atol=1e-6, rtol=0)
    assert not torch.equal(ours["model.layers.0.mlp.down_proj.weight"],
                           model.get_base_model().model.layers[0].mlp.down_proj.base_layer.weight)


def test_rollout_engine_follows_the_policy_after_sync(tiny_dir):
    cfg = FinetuneConfig(model=str(tiny_dir), data="-", output="-", method="grpo", reward_funcs=["exact_match"],
                         max_completion_length=10, max_length=128, num_generations=2, batch_size=2)
    rollouts = Rollouts(tiny_dir, cfg, torch.device("cpu"))
    model = lora_model(tiny_dir, seed=2, std=0.2)
    prompts = [[1, 520, 3042, 88], [1, 77, 901]]
    before = rollouts.generate(prompts, 1, seed=0, greedy=True)
    rollouts.sync(model)
    after = rollouts.generate(prompts, 1, seed=0, greedy=True)
    merged = copy.deepcopy(model).merge_and_unload().eval()
    for prompt, group, old in zip(prompts, after, before):
        hf = merged.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, pad_token_id=2)
        assert group[0].ids == hf[0, len(prompt):].tolist()
        assert group[0].ids != old[0].ids
    sampled = rollouts.generate(prompts, 4, seed=7)
    assert [len(g) for g in sampled] == [4, 4]
    assert sampled == rollouts.generate(prompts, 4, seed=7)  # seeded: the same completions again
    twins = rollouts.generate([prompts[0], prompts[0]], 4, seed=7)  # one prompt twice: no seed shared
    first, second = ([c.ids for c in g] for g in twins)
    assert not set(map(tuple, first)) & set(map(tuple, second))
    assert not rollouts.engine.has_unfinished_requests()


def test_prompts_from_every_record_format(tiny_dir):
    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    records = [
        {"prompt": "What is 2+2?", "answer": "4"},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]},
        {"instruction": "Sort these numbers.", "input": "3 1 2", "output": "1 2 3"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    ]
    prompts, skipped = encode_prompts(records, tok)
    assert skipped == 0
    user = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True,
                                   tokenize=False)
    assert prompts[0].ids == tok.encode(user, add_special_tokens=False)
    assert (prompts[0].prompt, prompts[0].conversational, prompts[0].columns) == ("What is 2+2?", False,
                                                                                   {"answer": "4"})
    assert prompts[1].conversational and prompts[1].prompt[0]["role"] == "system"
    assert prompts[2].columns["reference"] == "1 2 3"  # an SFT record's answer: the reference, not a target
    assert prompts[3].columns["reference"] == "hello"
    assert tok.decode(prompts[3].ids).rstrip().endswith("assistant")
    more, _ = encode_prompts([
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "Let me think. 4"}],
         "answer": "4"},  # an explicit answer wins over the SFT turn
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]},  # prompt only
    ], tok)
    assert more[0].columns["answer"] == "4" and "reference" not in more[0].columns
    assert more[1].prompt == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    shortest = min(len(p.ids) for p in prompts)
    short, skipped = encode_prompts(records, tok, max_prompt_tokens=shortest)
    assert skipped == sum(len(p.ids) > shortest for p in prompts) > 0
    assert [p.ids for p in short] == [p.ids for p in prompts if len(p.ids) == shortest]
    with pytest.raises(DataError, match="ends with an assistant turn"):
        encode_prompts([{"prompt": [{"role": "assistant", "content": "x"}]}], tok)


def test_reward_functions_built_in_and_from_a_file(tmp_path):
    completions = [" 1  2 3 ", [{"role": "assistant", "content": "1 2 4"}], "x"]
    assert exact_match([], completions, [], reference=["1 2 3", "1 2 3", None]) == [1.0, 0.0, None]
    assert exact_match([], completions, []) == [None, None, None]
    assert contains_reference([], ["It was 1918.", "1 9 1 8", "x"], [], answer=["1918", "1918", None]) == [1.0, 0.0,
                                                                                                          None]
    # each record's own field: one names its answer "reference", the next "answer"
    assert exact_match([], ["4", "5"], [], reference=[None, "5"], answer=["4", None]) == [1.0, 1.0]
    assert think_format([], ["<think>a</think>b", "<think>a<think>b</think>", "b"], []) == [1.0, 0.0, 0.0]
    overlong = RewardSet(["overlong"], max_completion_length=8)  # DAPO's: 0 up to 6 tokens, then down to -1 at 8
    assert overlong.names == ["overlong"]
    assert overlong.score([""] * 4, [""] * 4, [[0] * 6, [0] * 7, [0] * 8, [0] * 9], {})[:, 0].tolist() == [
        0.0, -0.5, -1.0, -1.0]
    (tmp_path / "mine.py").write_text(FIRST_TOKEN_ODD)
    rewards = RewardSet([f"{tmp_path}/mine.py:first_token_odd", "exact_match"], weights=[2.0, 1.0])
    assert rewards.names == ["first_token_odd", "exact_match"]
    table = rewards.score(["p"] * 3, ["1 2 3", "9", "z"], [[3, 4], [4], []], {"reference": ["1 2 3", "1", None]})
    torch.testing.assert_close(table, torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, math.nan]]), equal_nan=True)
    torch.testing.assert_close(rewards.combine(table), torch.tensor([3.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="has no function 'nope'"):
        RewardSet([f"{tmp_path}/mine.py:nope"])
    with pytest.raises(ValueError, match="give a built-in"):
        RewardSet(["no_such_reward"])
    with pytest.raises(ValueError, match="1 of 2 records have none"):
        RewardSet(["exact_match"]).check_records([{"answer": "1"}, {"task": "x"}])


def test_a_reward_model_folder_scores_prompt_and_completion_as_one_text(tmp_path, smollm2_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(str(smollm2_path))
    torch.manual_seed(4)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)
    folder = tmp_path / "rm"
    LlamaForSequenceClassification(config).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    rewards = RewardSet([str(folder)])
    assert rewards.names == ["rm"]
    prompts = ["What is 2+2?", [{"role": "user", "content": "Name a colour."}], "Hi"]
    completions = ["4", [{"role": "assistant", "content": "A deep shade of blue, like the sea"}], "Hello there"]
    table = rewards.score(prompts, completions, [[], [], []], {})
    model = LlamaForSequenceClassification.from_pretrained(folder).eval()
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):  # one at a time: no padding
        turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        turns.append({"role": "assistant", "content": completion if isinstance(completion, str)
                      else completion[0]["content"]})
        ids = tok(tok.apply_chat_template(turns, tokenize=False), return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            assert table[row, 0].item() == pytest.approx(model(**ids).logits[0, 0].item(), abs=1e-5)
    assert len(set(table[:, 0].tolist())) == 3
    # a reward model whose tokenizer has no chat template: the plain prompt joined, a conversation one text a line
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    plain = RewardModel(folder)
    assert not getattr(plain.tokenizer, "chat_template", None)
    assert plain.text("2+2=", "4") == "2+2=4"
    assert plain.text([{"role": "user", "content": "Name a colour."}], [{"role": "assistant", "content": "Blue"}]) \
        == "Name a colour.\nBlue"
    scores = plain(prompts[1:2], completions[1:2], [[]])
    ids = tok("Name a colour.\nA deep shade of blue, like the sea", return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        assert scores[0] == pytest.approx(model(**ids).logits[0, 0].item(), abs=1e-5)


@pytest.mark.parametrize("changes,message", [
    ({"reward_funcs": None}, "needs reward_funcs"),
    ({"num_generations": 1}, "at least 2"),
    ({"max_completion_length": 512}, "below max_length"),
    ({"nproc_per_node": 2}, "one process"),
    ({"reward_weights": [1.0, 2.0]}, "2 values for 1 reward"),
])
def test_grpo_settings_are_checked(changes, message):
    settings = {"model": "m", "data": "d", "output": "o", "method": "grpo", "reward_funcs": ["exact_match"],
                **changes}
    with pytest.raises(ValueError, match=message):
        FinetuneConfig(**settings)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [
    ["--lr", "3e-3"],  # every weight, no reference model (TRL's default beta 0)
    ["--lr", "3e-2", "--lora", "--grpo-beta", "0.04"],  # adapters; the KL against the model with them switched off
])
def test_grpo_run_learns_the_reward_and_exports_a_servable_model(tmp_path, tiny_dir, capsys, extra):
    from loom.cli import main

    (tmp_path / "mine.py").write_text(FIRST_TOKEN_ODD)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say something about number {i}"}) + "\n" for i in range(40)))
    out = tmp_path / "out"
    code = main(["finetune", "--method", "grpo", "--model", str(tiny_dir), "--data", str(data), "--eval-data",
                 str(data), "--max-eval-examples", "8", "--output", str(out), "--reward-funcs",
                 f"{tmp_path}/mine.py:first_token_odd", "--num-generations", "8", "--max-completion-length", "8",
                 "--batch-size", "4", "--max-steps", "12", "--temperature", "0.3", "--max-length", "128",
                 "--no-progress", "--threads", "1", *extra])
    assert code == 0
    summary = json.loads((out / "loom_finetune.json").read_text())
    base, tuned = summary["reward_eval"]["base"], summary["reward_eval"]["tuned"]
    assert base["reward"] == 0.0  # greedy, the start model's first token is even
    assert tuned["reward"] >= 0.75  # GRPO moved the greedy first token to odd ones
    logged = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == 12 and {"reward", "reward_std", "rewards/first_token_odd/mean", "entropy",
                                  "completions/clipped_ratio", "frac_reward_zero_std"} <= set(logged[0])
    # at temperature 0.3 the start model samples mostly its even first token; the sampled reward climbs
    assert logged[0]["reward"] <= 0.4 and sum(r["reward"] for r in logged[-3:]) / 3 >= 0.8
    if "--grpo-beta" in extra:
        assert logged[0]["kl"] == 0.0 and logged[-1]["kl"] > 0  # the first step's policy is the reference
    printed = capsys.readouterr().out
    assert "reward" in printed and "first_token_odd" in printed
    # the export is a plain HF folder that Loom's engine serves
    from loom import LLM, SamplingParams

    llm = LLM(str(out), num_kv_blocks=64)
    prompt = encode_prompts([{"prompt": "Say something about number 3"}],
                            AutoTokenizer.from_pretrained(str(out)))[0][0].ids
    first = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=1))[0]
    assert first.outputs[0].token_ids[0] % 2 == 1
