"""Multiple-choice evaluation by log-likelihood: scores equal plain HF, padding changes nothing, acc vs acc_norm,
record checks with file:line, the command line, the recipe's base vs tuned figures and the demo's MC generator."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F

from loom.finetune import mc_eval
from loom.finetune.config import FinetuneConfig
from loom.finetune.formats import DataError
from loom.finetune.mc_eval import (
    encode_mc,
    load_mc_records,
    loglikelihoods,
    main,
    mc_evaluate,
    score_records,
)
from loom.finetune.recipe import finetune
from loom.finetune.template import chat_template_for, encode_example, render
from scripts.finetune_demo_data import generate, generate_mc, write_jsonl
from scripts.finetune_demo_data import main as demo_main

from .test_loss import RECORDS

MC = [
    {"question": "What is the capital of France?", "choices": ["Paris", "Lyon", "Marseille, on the south coast"],
     "answer": 0, "task": "geo"},
    {"question": "2+2?", "choices": ["4", "22", "four, as everyone knows"], "answer": "4", "task": "math"},
    {"question": "Pick the colour of a clear daytime sky, in one word please.", "choices": ["blue", "green"],
     "answer": 0, "task": "geo", "id": "sky"},
]


def reference_loglikelihood(model, context: list[int], continuation: list[int]) -> float:
    """Plain HF: full logits of context + continuation, log_softmax, the continuation tokens gathered and summed."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logps = F.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)  # [T, V]
    positions = torch.arange(len(context) - 1, len(context) + len(continuation) - 1)  # position t predicts t + 1
    return float(logps[positions, torch.tensor(continuation)].double().sum())


def requests_of(tokenizer, records: list[dict], template: str = "chat") -> list[tuple[list[int], list[int]]]:
    return [(ctx, cont) for ctx, conts in (encode_mc(r, tokenizer, template=template) for r in records)
            for cont in conts]


@pytest.mark.parametrize("template", ["chat", "alpaca"])
def test_loglikelihoods_equal_plain_hf_batched_or_alone(tokenizer, tiny_llama, template):
    requests = requests_of(tokenizer, MC, template)
    assert len({len(c) + len(k) for c, k in requests}) > 3  # rows of different lengths: batches hold padding
    reference = [reference_loglikelihood(tiny_llama, c, k) for c, k in requests]
    batched = loglikelihoods(tiny_llama, requests, batch_size=4, pad_id=2)
    alone = loglikelihoods(tiny_llama, requests, batch_size=1, pad_id=2)
    assert mc_eval._lm_parts(tiny_llama) is not None  # the gathered-head path was the one measured
    torch.testing.assert_close(torch.tensor(batched), torch.tensor(reference), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(alone), torch.tensor(reference), atol=1e-5, rtol=0)
    # the pad id is masked, never read: another one gives the same scores
    torch.testing.assert_close(torch.tensor(loglikelihoods(tiny_llama, requests, batch_size=8, pad_id=7)),
                               torch.tensor(reference), atol=1e-5, rtol=0)


def test_full_logits_fallback_for_models_without_a_llama_body(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4,
                                       n_positions=512)).eval()
    assert mc_eval._lm_parts(model) is None
    requests = requests_of(tokenizer, MC)
    reference = [reference_loglikelihood(model, c, k) for c, k in requests]
    torch.testing.assert_close(torch.tensor(loglikelihoods(model, requests, batch_size=4)), torch.tensor(reference),
                               atol=1e-5, rtol=0)


def test_left_truncation_keeps_the_continuation_and_the_last_context_tokens(tokenizer, tiny_llama):
    context, continuation = requests_of(tokenizer, MC[:1])[2]
    keep = 6
    truncated = loglikelihoods(tiny_llama, [(context, continuation)], max_length=len(continuation) + keep - 1)
    reference = reference_loglikelihood(tiny_llama, context[-keep:], continuation)
    assert abs(truncated[0] - reference) < 1e-5
    with pytest.raises(ValueError, match="raise max_length"):
        loglikelihoods(tiny_llama, [(context, continuation)], max_length=len(continuation) - 1)


@pytest.mark.parametrize("template", ["chat", "alpaca"])
def test_context_and_choices_are_the_tokens_sft_trains_on(tokenizer, template):
    for record in MC:
        context, choices = encode_mc(record, tokenizer, template=template)
        for choice, ids in zip(record["choices"], choices, strict=True):
            sft = encode_example({"messages": [{"role": "user", "content": record["question"]},
                                               {"role": "assistant", "content": choice}]}, tokenizer,
                                 template=template)
            assert context + ids == sft["input_ids"][:-1]  # all but the supervised EOS
            # lm-eval's HF backend encodes prompt + choice as one string: the same ids here (a token boundary)
            prompt = render(tokenizer, [{"role": "user", "content": record["question"]}],
                            chat_template_for(tokenizer, template), add_generation_prompt=True)
            assert tokenizer.encode(prompt + choice, add_special_tokens=False) == context + ids


def test_acc_and_acc_norm_differ_when_lengths_differ():
    records = [
        {"question": "q1", "choices": ["no", "a much longer answer"], "answer": 1, "task": "a"},
        {"question": "q2", "choices": ["yes", "no"], "answer": "yes", "task": "a"},
        {"question": "q3", "choices": ["x", "y", "z"], "answer": 2, "task": "b"},
        # lm-eval divides by len(choice) in characters: 3.3/3 = 1.1 > 4/4 = 1.0 (per byte: 3.3/6 < 1.0)
        {"question": "q4", "choices": ["ééé", "abcd"], "answer": 1, "task": "b"},
    ]
    lls = [[-3.0, -5.0], [-1.0, -2.0], [-2.0, -1.0, -1.0], [-3.3, -4.0]]
    report = score_records(records, lls)
    assert [p["pred"] for p in report.predictions] == [0, 0, 1, 0]  # q3: a tie goes to the first choice
    assert [p["pred_norm"] for p in report.predictions] == [1, 0, 1, 1]  # q1: -5/20 > -3/2
    assert report.acc == 1 / 4 and report.acc_norm == 3 / 4 and report.n == 4
    assert report.by_task == {"a": {"acc": 0.5, "acc_norm": 1.0, "n": 2}, "b": {"acc": 0.0, "acc_norm": 0.5, "n": 2}}
    assert report.chance == pytest.approx((1 / 2 + 1 / 2 + 1 / 3 + 1 / 2) / 4)
    summary = report.summary()
    assert summary["acc"] == 0.25 and summary["acc_norm"] == 0.75 and summary["num_questions"] == 4
    assert summary["acc_stderr"] == pytest.approx((0.25 * 0.75 / 3) ** 0.5, abs=1e-4)


def test_mc_evaluate_maps_flat_scores_back_to_questions(tokenizer, monkeypatch):
    seen = []

    def fake(model, requests, **kwargs):
        seen.extend(requests)
        return [-float(i) for i in range(len(requests))]  # the first choice of each question is the likeliest

    monkeypatch.setattr(mc_eval, "loglikelihoods", fake)
    report = mc_evaluate(None, tokenizer, MC, batch_size=2)
    assert len(seen) == 3 + 3 + 2
    assert [p["loglikelihoods"] for p in report.predictions] == [[0, -1, -2], [-3, -4, -5], [-6, -7]]
    assert [p["pred"] for p in report.predictions] == [0, 0, 0]
    assert report.acc == 1.0  # the answers are 0, "4" (index 0) and 0
    assert [p["id"] for p in report.predictions] == [0, 1, "sky"]


def test_mc_evaluate_on_the_tiny_model_matches_the_reference(tokenizer, tiny_llama):
    report = mc_evaluate(tiny_llama, tokenizer, MC, batch_size=3)
    requests = iter(requests_of(tokenizer, MC))
    for record, pred in zip(MC, report.predictions, strict=True):
        expected = [reference_loglikelihood(tiny_llama, *next(requests)) for _ in record["choices"]]
        assert pred["loglikelihoods"] == pytest.approx(expected, abs=1e-5)
        assert pred["pred"] == max(range(len(expected)), key=expected.__getitem__)


def test_answer_as_index_or_text(tmp_path):
    path = tmp_path / "mc.jsonl"
    write_jsonl([{"question": "q", "choices": ["a", "b", "c"], "answer": 2},
                 {"question": "q", "choices": ["a", "b", "c"], "answer": "c"}], path)
    records = load_mc_records(path)
    report = score_records(records, [[-3.0, -2.0, -1.0]] * 2)
    assert [p["answer"] for p in report.predictions] == [2, 2] and report.acc == 1.0


GOOD = '{"question": "q", "choices": ["a", "b"], "answer": 0}'


@pytest.mark.parametrize(("line", "message"), [
    ('{"question": "q", "choices": ["a", "b"], "answer": 0', "invalid JSON"),
    ('{"choices": ["a", "b"], "answer": 0}', "'question' must be a non-empty string"),
    ('{"question": "q", "choices": ["a"], "answer": 0}', "at least 2 non-empty strings"),
    ('{"question": "q", "choices": ["a", 3], "answer": 0}', "at least 2 non-empty strings"),
    ('{"question": "q", "choices": ["a", ""], "answer": 0}', "at least 2 non-empty strings"),
    ('{"question": "q", "choices": ["a", "a"], "answer": 0}', "make them distinct"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 2}', "out of range for 2 choices"),
    ('{"question": "q", "choices": ["a", "b"], "answer": -1}', "out of range"),
    ('{"question": "q", "choices": ["a", "b"], "answer": "c"}', "is not one of the choices"),
    ('{"question": "q", "choices": ["a", "b"], "answer": true}', "0-based index or its text"),
    ('{"question": "q", "choices": ["a", "b"]}', "0-based index or its text"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 0, "task": 1}', "'task' must be a string"),
])
def test_malformed_records_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "mc.jsonl"
    path.write_text(f"{GOOD}\n{line}\n")
    with pytest.raises(DataError, match=re.escape(message)) as info:
        load_mc_records(path)
    assert str(info.value).startswith(f"{path}:2:")


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "mc.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match="no records"):
        load_mc_records(path)


def test_command_line_scores_a_model_folder(tmp_path, tiny_model_dir, capsys):
    data, out = tmp_path / "mc.jsonl", tmp_path / "report.json"
    write_jsonl(MC, data)
    code = main(["--model", str(tiny_model_dir), "--data", str(data), "--threads", "1", "--batch-size", "4",
                 "--output", str(out)])
    assert code == 0
    line, summary = capsys.readouterr().out.strip().splitlines()
    assert line.startswith("acc ") and "acc_norm" in line and "on 3 questions" in line and "geo=" in line
    summary = json.loads(summary)
    assert summary["num_questions"] == 3 and set(summary["by_task"]) == {"geo", "math"}
    assert summary["by_task"]["geo"]["n"] == 2
    written = json.loads(out.read_text())
    assert len(written["predictions"]) == 3 and written["acc"] == summary["acc"]


def test_command_line_reports_bad_data_with_file_and_line(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "mc.jsonl"
    data.write_text(f"{GOOD}\n{{\"question\": \"q\", \"choices\": [\"a\", \"b\"], \"answer\": 5}}\n")
    assert main(["--model", str(tiny_model_dir), "--data", str(data), "--threads", "1"]) == 2
    assert f"error: {data}:2: 'answer' 5 is out of range" in capsys.readouterr().out


@pytest.mark.slow
def test_recipe_scores_base_and_tuned(tmp_path, tiny_model_dir):
    write_jsonl(RECORDS, tmp_path / "train.jsonl")
    write_jsonl(MC, tmp_path / "mc.jsonl")
    out = tmp_path / "out"
    summary = finetune(FinetuneConfig(
        model=str(tiny_model_dir), data=str(tmp_path / "train.jsonl"), mc_eval_data=str(tmp_path / "mc.jsonl"),
        output=str(out), max_steps=2, batch_size=4, max_length=128, lr=1e-3, progress=False, num_threads=1,
    ))
    base, tuned = summary["mc_eval"]["base"], summary["mc_eval"]["tuned"]
    assert base["num_questions"] == tuned["num_questions"] == 3 and set(tuned["by_task"]) == {"geo", "math"}
    assert "eval" not in summary  # no eval_data: only the multiple-choice figures
    written = json.loads((out / "mc_eval.json").read_text())
    base_lls = [p["loglikelihoods"] for p in written["predictions"]["base"]]
    tuned_lls = [p["loglikelihoods"] for p in written["predictions"]["tuned"]]
    assert base_lls != tuned_lls  # the tuned export was scored, not the base model again
    assert json.loads((out / "loom_finetune.json").read_text())["mc_eval"] == summary["mc_eval"]


def check_mc(record: dict) -> bool:
    """The demo MC answer is right, recomputed from the question alone."""
    question, answer = record["question"], record["choices"][record["answer"]]
    task, text = record["task"], question.split("\n\n")[-1]
    if task == "sort":
        return answer == " ".join(map(str, sorted(map(int, text.split()))))
    if task == "reverse":
        return answer == " ".join(text.split()[::-1])
    if task == "year":
        return answer == re.search(r"\b(1[6-9]\d\d|20[0-2]\d)\b", text).group(0)
    a, op, b = re.match(r"What is (\d+) ([+-]) (\d+)\?", question).groups()
    return int(answer) == (int(a) + int(b) if op == "+" else int(a) - int(b))


def test_demo_mc_set_is_seeded_checkable_and_held_out(tmp_path):
    train, held_out = generate(200, 40, seed=1)
    mc = generate_mc(40, seed=1, exclude=train + held_out)
    assert mc == generate_mc(40, seed=1, exclude=train + held_out) and mc != generate_mc(40, seed=2)
    assert all(check_mc(r) for r in mc)
    assert {r["task"] for r in mc} == {"sort", "reverse", "year", "arithmetic"}
    for r in mc:
        assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4
        assert not any(a != b and a.startswith(b) for a in r["choices"] for b in r["choices"])  # no prefixes
    assert len({r["answer"] for r in mc}) > 1  # shuffled: the answer is not always in one place
    prompts = {r["instruction"] + ("\n\n" + r["input"] if r["input"] else "") for r in train + held_out}
    assert not prompts & {r["question"] for r in mc}
    path = tmp_path / "mc.jsonl"
    write_jsonl(mc, path)
    assert len(load_mc_records(path)) == 40


def test_demo_script_writes_mc_only_when_asked(tmp_path):
    assert demo_main(["--out", str(tmp_path / "a"), "--train", "8", "--eval", "4"]) == 0
    assert demo_main(["--out", str(tmp_path / "b"), "--train", "8", "--eval", "4", "--mc", "6"]) == 0
    assert not (tmp_path / "a" / "mc.jsonl").exists()
    for name in ("train.jsonl", "eval.jsonl"):  # the other outputs do not change
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()
    assert len(load_mc_records(tmp_path / "b" / "mc.jsonl")) == 6
