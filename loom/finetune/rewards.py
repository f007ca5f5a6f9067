"""Reward functions for GRPO, in TRL's calling convention.

    rewards = RewardSet.from_names(["exact_match", "mymodule:brevity"], weights=None)
    table = rewards.score(prompts, completions, completion_ids, columns)   # [N, F] float, NaN where one abstains

A reward function is ``fn(prompts, completions, completion_ids, **columns) -> list[float | None]``, as TRL's
``GRPOTrainer`` calls one: ``prompts`` as the dataset gives them (a string, or a list of chat messages),
``completions`` as text (a string) or, for conversational prompts, ``[{"role": "assistant", "content": text}]``,
``completion_ids`` the sampled token ids, and every other field of the records as a keyword argument holding one value
per completion (``reference`` included: the answer of an SFT-style record). ``None`` means "no opinion" for that
completion; a completion every function abstains on gets no advantage.

Built in:

- ``exact_match``: 1.0 when the completion, stripped and with whitespace runs collapsed, equals the record's
  ``reference`` (or ``answer`` / ``solution``), else 0.0;
- ``contains_reference``: 1.0 when that reference (whitespace-normalised) appears anywhere in the completion: partial
  credit for a right answer wrapped in words, which a model that never answers exactly still earns;
- ``overlong``: DAPO's soft overlong punishment, 0 up to 3/4 of max_completion_length tokens, then down to -1 at the
  limit (TRL's ``get_soft_overlong_punishment`` with a cache of a quarter): no credit for running on;
- ``think_format``: 1.0 when the completion is ``<think>...</think>`` followed by an answer (TRL's
  ``think_format_reward``), else 0.0.

A folder is a reward model (``RewardModel``: a sequence classifier scoring prompt + completion, as TRL takes one).
Any other name is ``module:function`` (an importable module) or ``path/to/file.py:function``: the user's own code,
run in the training process (``loom finetune`` runs what its user names, as TRL does; nothing here is reachable
from a server).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

REFERENCE_FIELDS = ("reference", "answer", "solution")
"""Where ``exact_match`` finds a record's expected answer, in this order."""


def completion_text(completion) -> str:
    """The text of a completion in either of TRL's shapes."""
    if isinstance(completion, str):
        return completion
    return completion[-1]["content"] if completion else ""


def _normalise(text: str) -> str:
    return " ".join(str(text).split())


def references(columns: dict[str, list], count: int) -> list[str | None]:
    """Each completion's expected answer: its record's first field of REFERENCE_FIELDS that is not None."""
    fields = [columns[f] for f in REFERENCE_FIELDS if f in columns]
    return [next((str(values[n]) for values in fields if values[n] is not None), None) for n in range(count)]


def exact_match(prompts, completions, completion_ids, **columns) -> list[float | None]:
    return [None if ref is None else float(_normalise(completion_text(c)) == _normalise(ref))
            for c, ref in zip(completions, references(columns, len(completions)))]


def contains_reference(prompts, completions, completion_ids, **columns) -> list[float | None]:
    return [None if ref is None else float(_normalise(ref) in _normalise(completion_text(c)))
            for c, ref in zip(completions, references(columns, len(completions)))]


_THINK = re.compile(r"^<think>(?!.*<think>)(.*?)</think>.*$", re.DOTALL)


def think_format(prompts, completions, completion_ids, **columns) -> list[float]:
    return [1.0 if _THINK.match(completion_text(c)) else 0.0 for c in completions]


class SoftOverlong:
    """DAPO's soft overlong punishment (TRL's ``get_soft_overlong_punishment``): 0 up to ``max_len - cache`` tokens,
    then falling linearly to -1 at ``max_len`` (a completion cut at the limit gets -1)."""

    __name__ = "overlong"

    def __init__(self, max_len: int, cache: int):
        if not 0 < cache <= max_len:
            raise ValueError(f"overlong: the soft cache must be in (0, {max_len}], got {cache}")
        self.max_len, self.cache = max_len, cache

    def __call__(self, prompts, completions, completion_ids, **columns) -> list[float]:
        start = self.max_len - self.cache
        return [0.0 if len(ids) <= start else -1.0 if len(ids) > self.max_len else (start - len(ids)) / self.cache
                for ids in completion_ids]


BUILT_IN: dict[str, Callable] = {"exact_match": exact_match, "contains_reference": contains_reference,
                                 "think_format": think_format}
NEEDS_FIELD = {"exact_match": REFERENCE_FIELDS, "contains_reference": REFERENCE_FIELDS}
"""Built-ins that read a record field: every training record must have one of these."""


class RewardModel:
    """A sequence-classification model folder as a reward function (TRL's ``reward_funcs="path/to/model"``): the
    model's first logit for the prompt followed by the completion. With a chat template the reward model's tokenizer
    renders the conversation that ends with the completion as the assistant's turn (a plain prompt is the user's
    turn); without one, a plain prompt and the completion are joined, and a conversation's texts go one a line.
    Weights from safetensors only; scored in right-padded batches of ``batch_size`` on ``device``."""

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu", batch_size: int = 16):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer  # local: ~1 s to import

        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(str(folder), use_safetensors=True).to(device)
        self.model.eval()
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device, self.batch_size = torch.device(device), batch_size
        self.__name__ = Path(folder).name

    def text(self, prompt, completion) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            turns.append({"role": "assistant", "content": completion_text(completion)})
            return self.tokenizer.apply_chat_template(turns, tokenize=False)
        if isinstance(prompt, str):
            return prompt + completion_text(completion)
        # no template: the conversation's texts, one a line
        return "\n".join([m["content"] for m in prompt] + [completion_text(completion)])

    @torch.no_grad()
    def __call__(self, prompts, completions, completion_ids, **columns) -> list[float]:
        texts = [self.text(p, c) for p, c in zip(prompts, completions)]
        scores = []
        for start in range(0, len(texts), self.batch_size):
            inputs = self.tokenizer(texts[start : start + self.batch_size], return_tensors="pt", padding=True,
                                    padding_side="right", add_special_tokens=False).to(self.device)
            scores += self.model(**inputs).logits[:, 0].float().tolist()
        return scores


def load_reward(name: str, device: str | torch.device = "cpu", max_completion_length: int | None = None) -> Callable:
    """A built-in by name, a reward model's folder, or ``module:function`` / ``file.py:function``."""
    if name in BUILT_IN:
        return BUILT_IN[name]
    if name == "overlong":
        if max_completion_length is None:
            raise ValueError("reward 'overlong' needs the run's max_completion_length")
        return SoftOverlong(max_completion_length, max(1, max_completion_length // 4))
    if Path(name).is_dir():
        if not (Path(name) / "config.json").is_file():
            raise ValueError(f"reward function {name!r}: a folder is a reward model, but it has no config.json")
        return RewardModel(name, device)
    module_name, sep, attr = name.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward function {name!r}: give a built-in ({', '.join(BUILT_IN)}, overlong), a reward "
                         "model's folder, or module:function / path/to/file.py:function")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise ValueError(f"reward function {name!r}: {path} is not a file")
        spec = importlib.util.spec_from_file_location(f"loom_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(f"reward function {name!r}: cannot import {module_name}: {exc}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward function {name!r}: {module_name} has no function {attr!r}")
    return fn


class RewardSet:
    """The run's reward functions with their weights; ``score`` calls each once over a whole batch of completions."""

    def __init__(self, names: Sequence[str], weights: Sequence[float] | None = None,
                 device: str | torch.device = "cpu", max_completion_length: int | None = None):
        if not names:
            raise ValueError(f"GRPO needs at least one reward function: built-in {', '.join(BUILT_IN)}, or "
                             "module:function")
        if weights is not None and len(weights) != len(names):
            raise ValueError(f"reward_weights has {len(weights)} values for {len(names)} reward functions")
        self.funcs = [load_reward(n, device, max_completion_length) for n in names]
        self.names = []
        """What the metrics call each: the built-in's name or the function's own (TRL's ``__name__``)."""
        for spec, fn in zip(names, self.funcs):
            name = spec if spec in (*BUILT_IN, "overlong") else getattr(fn, "__name__", spec)
            self.names.append(name if name not in self.names else f"{name}_{len(self.names)}")
        self.specs = list(names)
        self.weights = torch.tensor(list(weights) if weights is not None else [1.0] * len(names))

    def check_records(self, records: Sequence[dict]) -> None:
        """A built-in that reads a field must find it in every record (else the run would learn from nothing)."""
        for name in self.specs:
            fields = NEEDS_FIELD.get(name)
            if fields is None:
                continue
            lacking = [r for r in records if not any(r.get(f) is not None for f in fields)]
            if lacking:
                raise ValueError(f"reward {name!r} compares with a record's {' / '.join(fields)} (or an SFT record's "
                                 f"answer); {len(lacking)} of {len(records)} records have none")

    def score(self, prompts: list, completions: list, completion_ids: list[list[int]],
              columns: dict[str, list]) -> torch.Tensor:
        """[N, F] float32: function f's reward for completion n; NaN where it returned None."""
        table = torch.full((len(completions), len(self.funcs)), math.nan)
        for f, (name, fn) in enumerate(zip(self.names, self.funcs)):
            values = list(fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns))
            if len(values) != len(completions):
                raise ValueError(f"reward function {name!r} returned {len(values)} values for {len(completions)} "
                                 "completions")
            for n, value in enumerate(values):
                if value is not None:
                    table[n, f] = float(value)
        return table

    def combine(self, table: torch.Tensor) -> torch.Tensor:
        """[N] weighted sum over the functions (TRL's nansum), NaN where every function abstained."""
        combined = (table * self.weights).nansum(1)
        combined[torch.isnan(table).all(1)] = math.nan
        return combined
