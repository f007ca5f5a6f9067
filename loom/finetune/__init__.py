"""Instruction finetuning: data formats, chat-template masking, padding and packing, LoRA, training, evaluation.

    from loom.finetune import encode_example, FinetuneConfig, finetune
    encode_example({"instruction": "Sort: 3 1 2", "output": "1 2 3"}, tokenizer)
    finetune(FinetuneConfig(model="smollm2", data="train.jsonl", output="out", lora=True, max_steps=100))

Run ``loom finetune --help`` for the command line; docs/finetune.md for the guide.
"""

from loom.finetune.config import FinetuneConfig
from loom.finetune.formats import DataError, load_records, to_messages
from loom.finetune.template import ALPACA_CHAT_TEMPLATE, IGNORE_INDEX, encode_example

__all__ = [
    "ALPACA_CHAT_TEMPLATE",
    "IGNORE_INDEX",
    "DataError",
    "FinetuneConfig",
    "encode_example",
    "finetune",
    "load_records",
    "to_messages",
]


def __getattr__(name: str):
    if name == "finetune":  # lazy: the recipe imports torch and transformers
        from loom.finetune.recipe import finetune

        return finetune
    raise AttributeError(f"module 'loom.finetune' has no attribute {name!r}")
