"""Prompt templates and ``encode_example``: one record -> input ids, labels (-100 on the prompt) and attention mask.

The prompt is what the model's chat template renders with ``add_generation_prompt=True`` — the text ``loom serve``
gives the model — so the tuned model sees at training time exactly what it will see when served. Each assistant turn
is supervised as its content's tokens followed by the tokenizer's EOS token, so the model learns to stop::

    ex = encode_example({"instruction": "Sort: 3 1 2", "output": "1 2 3"}, tokenizer)
    ex["labels"]  # [-100, ..., -100, <ids of "1 2 3">, eos_id]

``template="alpaca"`` uses the Stanford Alpaca prompt instead (``ALPACA_CHAT_TEMPLATE``, written into the output
folder so the server applies the same one).
"""

from __future__ import annotations

from dataclasses import dataclass

from loom.finetune.formats import DataError, to_messages, where

IGNORE_INDEX = -100

ALPACA_HEADER = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
# A Jinja chat template that renders conversations in the Alpaca layout; it is saved as the output folder's
# chat template when training with template="alpaca", so serving renders prompts the same way.
ALPACA_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}"
    "{% else %}{{ '" + ALPACA_HEADER + "\\n\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
)
ALPACA_INPUT_JOINER = "\n\n### Input:\n"
TEMPLATES = ("chat", "alpaca")


@dataclass(frozen=True, slots=True)
class Piece:
    """A span of rendered text; ``is_supervised`` spans are an assistant turn's content (EOS appended)."""

    text: str
    is_supervised: bool


def check_tokenizer(tokenizer) -> None:
    """Training needs an EOS token (the model must learn to stop) and a chat template unless Alpaca is chosen."""
    if tokenizer.eos_token_id is None:
        raise ValueError(
            "the tokenizer has no EOS token, so the model could never learn to stop; set tokenizer.eos_token "
            "(or eos_token in tokenizer_config.json) before finetuning"
        )


def chat_template_for(tokenizer, template: str) -> str:
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    if template == "alpaca":
        return ALPACA_CHAT_TEMPLATE
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; pass template='alpaca' (--template alpaca)")
    return tokenizer.chat_template


def render(tokenizer, messages: list[dict], chat_template: str, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=chat_template, add_generation_prompt=add_generation_prompt, tokenize=False
    )


def split_pieces(tokenizer, messages: list[dict], chat_template: str, where_: str = "<record>") -> list[Piece]:
    """Cut the rendered conversation into prompt pieces and supervised assistant contents, in order.

    NOTE: each assistant turn's prompt is rendered on its own (``messages[:i]`` + generation prompt) and must
    extend what came before; templates that rewrite earlier turns (e.g. drop past reasoning) are rejected.
    """
    eos_text = tokenizer.eos_token
    pieces: list[Piece] = []
    covered = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:i], chat_template, add_generation_prompt=True)
        full = render(tokenizer, messages[: i + 1], chat_template, add_generation_prompt=False)
        content = message["content"]
        if not prompt.startswith(covered) or not full.startswith(prompt + content):
            raise DataError(
                f"{where_}: the chat template does not render turn {i} as prompt + content; "
                "use template='alpaca' or a template whose turns extend each other"
            )
        pieces.append(Piece(prompt[len(covered) :], is_supervised=False))
        pieces.append(Piece(content, is_supervised=True))
        covered = prompt + content
        if full[len(covered) :].startswith(eos_text):
            covered += eos_text  # the template's own end-of-turn EOS is the one we supervise
    return pieces


def encode_example(
    record: dict,
    tokenizer,
    *,
    template: str = "chat",
    train_on_inputs: bool = False,
    max_length: int | None = None,
) -> dict[str, list[int]]:
    """One record -> ``{"input_ids", "labels", "attention_mask"}`` (lists of ints, unpadded, same length).

    ``labels`` is -100 on every prompt token (system, user turns, template markup) unless ``train_on_inputs``;
    each assistant turn's tokens and the EOS after it are supervised. ``max_length`` truncates on the right.
    """
    check_tokenizer(tokenizer)
    chat_template = chat_template_for(tokenizer, template)
    joiner = ALPACA_INPUT_JOINER if template == "alpaca" else "\n\n"
    messages = to_messages(record, input_joiner=joiner)
    input_ids: list[int] = []
    labels: list[int] = []
    for piece in split_pieces(tokenizer, messages, chat_template, where(record)):
        ids = tokenizer.encode(piece.text, add_special_tokens=False)
        if piece.is_supervised:
            ids = ids + [tokenizer.eos_token_id]
        input_ids += ids
        labels += ids if (piece.is_supervised or train_on_inputs) else [IGNORE_INDEX] * len(ids)
    if max_length is not None:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "labels": labels, "attention_mask": [1] * len(input_ids)}


def encode_prompt(record: dict, tokenizer, *, template: str = "chat") -> tuple[list[int], str]:
    """The generation prompt's token ids (everything before the last assistant turn) and that turn's reference."""
    chat_template = chat_template_for(tokenizer, template)
    joiner = ALPACA_INPUT_JOINER if template == "alpaca" else "\n\n"
    messages = to_messages(record, input_joiner=joiner)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt = render(tokenizer, messages[:last], chat_template, add_generation_prompt=True)
    return tokenizer.encode(prompt, add_special_tokens=False), messages[last]["content"]


def num_supervised(example: dict[str, list[int]]) -> int:
    """Tokens that contribute to the loss: labels after the first position (causal LMs predict token t from < t)."""
    return sum(1 for label in example["labels"][1:] if label != IGNORE_INDEX)
