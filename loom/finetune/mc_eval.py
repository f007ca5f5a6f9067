"""Multiple-choice evaluation by log-likelihood, scored the way lm-evaluation-harness scores multiple-choice tasks.

Each record is a question, two or more choices and the right one; the model is not asked to generate, each choice is
scored by how likely the model finds it as the answer::

    records = load_mc_records("mc.jsonl")   # {"question": str, "choices": [str, ...], "answer": index or choice}
    report = mc_evaluate(model, tokenizer, records, template="chat")
    report.acc, report.acc_norm, report.by_task, report.summary()

    python -m loom.finetune.mc_eval --model out --data mc.jsonl          # any model folder or catalogue name

Scoring. The context is the question rendered as a user turn by the chat template with the generation prompt
(``template="chat"``: the tokenizer's own template, as ``loom serve`` renders it; ``"alpaca"``: the Alpaca prompt), the
same prompt SFT trains on; each choice is a continuation, scored as the sum of ``log P(token | everything before)``
over its tokens. ``acc`` takes the argmax of that sum; ``acc_norm`` the argmax of the sum divided by the choice's
length in characters (lm-eval's ``completion_len = len(choice)``; bytes for ASCII), which stops long choices from
losing just for having more tokens. Ties go to the first choice (``np.argmax``).

Tokenization. The prompt and the choice are tokenized separately and their ids concatenated, exactly as
``encode_example`` builds an SFT example (prompt ids, then the assistant content's ids; no EOS is scored here, as in
lm-eval) and as generation sees it (the model continues the prompt's ids). lm-eval's HF backend instead encodes
context + continuation as one string and cuts at the context's length; the two agree whenever the prompt ends on a
token boundary, which chat templates do (they end in a newline or a special token; the tests check SmolLM2's).

Batching. All (question, choice) sequences are right-padded into batches of ``batch_size``, longest first; the LM
head runs only at the positions that predict a continuation token (a ``[N, D]`` gather, as ``token_loss_sum`` does),
so no ``[B, T, V]`` logits are made. ``max_length`` truncates the context on the left, as lm-eval does.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from loom.devices import resolve_device
from loom.finetune.formats import DataError, load_records, where
from loom.finetune.loss import causal_lm_parts
from loom.finetune.modeling import auto_threads, load_model
from loom.finetune.template import TEMPLATES, chat_template_for, split_pieces
from loom.models.catalogue import resolve_model

RECORD_SHAPE = '{"question": str, "choices": [str, str, ...], "answer": 0-based index or the choice text}'


@dataclass(slots=True)
class MCReport:
    acc: float
    """Share of questions whose highest summed log-likelihood choice is the answer."""
    acc_norm: float
    """The same with each log-likelihood divided by its choice's length in characters (lm-eval's acc_norm)."""
    n: int
    by_task: dict[str, dict] = field(default_factory=dict)
    """{task: {"acc", "acc_norm", "n"}}; records without a ``task`` field count as "all"."""
    predictions: list[dict] = field(default_factory=list)
    """Per question: id, task, answer, pred, pred_norm, correct, correct_norm, loglikelihoods (one per choice)."""
    chance: float = 0.0
    """Expected acc of a uniform random guess (mean of 1 / number of choices)."""

    @property
    def acc_stderr(self) -> float:
        """Standard error of acc over questions (lm-eval's sample stderr, sqrt(p(1-p)/(n-1)))."""
        return math.sqrt(self.acc * (1 - self.acc) / (self.n - 1)) if self.n > 1 else float("nan")

    def summary(self) -> dict:
        return {
            "acc": round(self.acc, 4),
            "acc_norm": round(self.acc_norm, 4),
            "acc_stderr": round(self.acc_stderr, 4),
            "chance": round(self.chance, 4),
            "num_questions": self.n,
            "by_task": {t: {**v, "acc": round(v["acc"], 4), "acc_norm": round(v["acc_norm"], 4)}
                        for t, v in self.by_task.items()},
        }

    def line(self) -> str:
        """One human-readable line: acc, acc_norm, the number of questions, chance and acc / acc_norm per task."""
        tasks = " ".join(f"{t}={v['acc']:.2f}/{v['acc_norm']:.2f}" for t, v in self.by_task.items())
        return (f"acc {self.acc:.3f} ± {self.acc_stderr:.3f}, acc_norm {self.acc_norm:.3f} on {self.n} questions "
                f"(chance {self.chance:.3f}); by task acc/acc_norm: {tasks}")


# ---------------------------------------------------------------- records


def load_mc_records(path: str | Path) -> list[dict]:
    """Read multiple-choice records (JSONL or a JSON list) and check each; ``DataError`` names file:line."""
    records = load_records(path)
    if not records:
        raise DataError(f"{path}: no records; write one {RECORD_SHAPE} per line")
    for record in records:
        answer_index(record)
    return records


def answer_index(record: dict) -> int:
    """The 0-based index of the right choice; ``DataError`` (with the record's file:line) if the record is malformed."""
    at = where(record)
    question, choices = record.get("question"), record.get("choices")
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{at}: 'question' must be a non-empty string; each record is {RECORD_SHAPE}")
    if (not isinstance(choices, list) or len(choices) < 2
            or not all(isinstance(c, str) and c for c in choices)):
        raise DataError(f"{at}: 'choices' must be a list of at least 2 non-empty strings, got {choices!r}")
    if len(set(choices)) != len(choices):
        raise DataError(f"{at}: 'choices' repeat a choice ({choices!r}); make them distinct")
    if "task" in record and not isinstance(record["task"], str):
        raise DataError(f"{at}: 'task' must be a string, got {record['task']!r}")
    answer = record.get("answer")
    if isinstance(answer, int) and not isinstance(answer, bool):
        if not 0 <= answer < len(choices):
            raise DataError(f"{at}: 'answer' {answer} is out of range for {len(choices)} choices "
                            f"(a 0-based index, 0 to {len(choices) - 1})")
        return answer
    if isinstance(answer, str):
        if answer not in choices:
            raise DataError(f"{at}: 'answer' {answer!r} is not one of the choices {choices!r}; "
                            "give its 0-based index or its exact text")
        return choices.index(answer)
    raise DataError(f"{at}: 'answer' must be the right choice's 0-based index or its text, got {answer!r}")


def encode_mc(record: dict, tokenizer, *, template: str = "chat") -> tuple[list[int], list[list[int]]]:
    """(context ids, one id list per choice): the question as a user turn + generation prompt, and each choice's ids.

    The prompt is cut out of the rendered conversation exactly as ``encode_example`` does (``split_pieces``: it also
    rejects templates that do not render the assistant turn as prompt + content); each piece is tokenized on its own.
    """
    answer_index(record)
    chat_template = chat_template_for(tokenizer, template)
    messages = [{"role": "user", "content": record["question"]},
                {"role": "assistant", "content": record["choices"][0]}]
    prompt = split_pieces(tokenizer, messages, chat_template, where(record))[0].text
    context = tokenizer.encode(prompt, add_special_tokens=False)
    return context, [tokenizer.encode(c, add_special_tokens=False) for c in record["choices"]]


# ---------------------------------------------------------------- scoring


def _lm_parts(model):
    """(body, head) when the logits are exactly ``head(body(...))`` (the Llama family), else None (full logits)."""
    config = getattr(model, "config", None)
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    try:
        return causal_lm_parts(model)
    except AttributeError:  # no .model body (e.g. GPT-2's .transformer)
        return None


@torch.no_grad()
def loglikelihoods(model, requests: list[tuple[list[int], list[int]]], *, batch_size: int = 16,
                   max_length: int | None = None, pad_id: int = 0) -> list[float]:
    """Summed ``log P(continuation | context)`` for each (context ids, continuation ids), like lm-eval's loglikelihood.

    Each sequence fed is ``(context + continuation)[:-1]`` (the last token is only a target), left-truncated to
    ``max_length``; continuation token k is predicted at the position right before it. Batches are right-padded
    (padding never changes a score: it comes after every real token and is masked).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    model.eval()
    device = next(model.parameters()).device
    rows: list[list[int]] = []
    for i, (context, continuation) in enumerate(requests):
        if not continuation:
            raise ValueError(f"request {i}: the continuation has no tokens")
        if not context:
            raise ValueError(f"request {i}: the context has no tokens (the first continuation token needs one)")
        if max_length is not None and len(continuation) > max_length:
            raise ValueError(f"request {i}: the continuation is {len(continuation)} tokens, more than max_length "
                             f"{max_length}; raise max_length")
        row = (context + continuation)[:-1]
        rows.append(row[-max_length:] if max_length is not None else row)
    parts = _lm_parts(model)
    scores = [0.0] * len(requests)
    order = sorted(range(len(requests)), key=lambda i: -len(rows[i]))  # longest first: an OOM shows at once
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(rows[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        b_idx, t_idx, targets, seq = [], [], [], []
        for b, i in enumerate(chunk):
            n, cont = len(rows[i]), requests[i][1]
            ids[b, :n] = torch.tensor(rows[i])
            mask[b, :n] = 1
            b_idx += [b] * len(cont)
            t_idx += range(n - len(cont), n)  # position n - k + j predicts continuation token j
            targets += cont
            seq += [b] * len(cont)
        ids, mask = ids.to(device), mask.to(device)
        b_idx, t_idx = torch.tensor(b_idx, device=device), torch.tensor(t_idx, device=device)
        if parts is not None:
            body, head = parts
            hidden = body(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state  # [B, T, D]
            logits = head(hidden[b_idx, t_idx]).float()  # [N, V]: only the positions that predict a choice token
        else:
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[b_idx, t_idx].float()
        token_logps = -F.cross_entropy(logits, torch.tensor(targets, device=device), reduction="none")  # [N]
        sums = torch.zeros(len(chunk), dtype=torch.float64)  # summed in float64, on the CPU (MPS has no float64)
        sums.index_add_(0, torch.tensor(seq), token_logps.double().cpu())
        for b, i in enumerate(chunk):
            scores[i] = float(sums[b])
    return scores


def score_records(records: list[dict], lls: list[list[float]]) -> MCReport:
    """acc, acc_norm, per-task figures and predictions from each record's per-choice summed log-likelihoods."""
    predictions, groups = [], {}
    for k, (record, ll) in enumerate(zip(records, lls, strict=True)):
        answer, choices = answer_index(record), record["choices"]
        normed = [x / len(c) for x, c in zip(ll, choices, strict=True)]
        pred, pred_norm = _argmax(ll), _argmax(normed)
        predictions.append({
            "id": record.get("id", k), "task": record.get("task", "all"), "answer": answer, "pred": pred,
            "pred_norm": pred_norm, "correct": pred == answer, "correct_norm": pred_norm == answer,
            "loglikelihoods": list(ll),
        })
        groups.setdefault(predictions[-1]["task"], []).append(predictions[-1])
    n = len(predictions)

    def mean(items: list[dict], key: str) -> float:
        return sum(p[key] for p in items) / len(items) if items else 0.0

    by_task = {t: {"acc": mean(ps, "correct"), "acc_norm": mean(ps, "correct_norm"), "n": len(ps)}
               for t, ps in sorted(groups.items())}
    chance = sum(1 / len(r["choices"]) for r in records) / n if n else 0.0
    return MCReport(mean(predictions, "correct"), mean(predictions, "correct_norm"), n, by_task, predictions, chance)


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # the first of equal maxima, as np.argmax


def mc_evaluate(model, tokenizer, records: list[dict], *, template: str = "chat", batch_size: int = 16,
                max_length: int | None = None) -> MCReport:
    """Score every choice of every record by summed log-likelihood; see the module docstring for the details."""
    encoded = [encode_mc(r, tokenizer, template=template) for r in records]
    requests = [(context, choice) for context, choices in encoded for choice in choices]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    flat = loglikelihoods(model, requests, batch_size=batch_size, max_length=max_length, pad_id=pad_id)
    lls, start = [], 0
    for _, choices in encoded:
        lls.append(flat[start : start + len(choices)])
        start += len(choices)
    return score_records(records, lls)


# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loom.finetune.mc_eval",
                                     description="Score a model on multiple-choice questions by log-likelihood.")
    parser.add_argument("--model", required=True, help="a catalogue name (smollm2) or a local HF model folder")
    parser.add_argument("--data", required=True, help=f"JSONL (or a JSON list) of {RECORD_SHAPE}")
    parser.add_argument("--template", choices=TEMPLATES, default="chat",
                        help="chat: the model's own chat template; alpaca: the Alpaca prompt")
    parser.add_argument("--batch-size", type=int, default=16, help="(question, choice) sequences per forward")
    parser.add_argument("--max-length", type=int, default=None, help="truncate contexts on the left to this")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the idle cores)")
    parser.add_argument("--output", default=None, help="also write the summary and per-question predictions here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads or auto_threads())
    try:
        records = load_mc_records(args.data)  # before loading the model: bad data fails fast
        model, tokenizer = load_model(resolve_model(args.model), resolve_device(args.device))
        report = mc_evaluate(model, tokenizer, records, template=args.template, batch_size=args.batch_size,
                             max_length=args.max_length)
    except ValueError as exc:  # DataError included
        print(f"error: {exc}")
        return 2
    print(report.line())
    print(json.dumps(report.summary()))
    if args.output:
        out = Path(args.output)
        out.write_text(json.dumps({**report.summary(), "predictions": report.predictions}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
