"""Make a random-weight model with SmolLM2-135M's exact architecture and its tokenizer, registered as the catalogue's
``smollm2`` under $LOOM_HOME: for machines (a lent GPU) where the packaged weights cannot travel.

    LOOM_HOME=/tmp/loom python scripts/random_smollm2.py --tokenizer DIR
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from loom.models.catalogue import converted_dir

SMOLLM2_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2, initializer_range=0.02,
)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True, help="folder with SmolLM2's tokenizer files")
    args = ap.parse_args()
    torch.manual_seed(0)
    target = converted_dir("smollm2")
    LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).save_pretrained(target)
    AutoTokenizer.from_pretrained(args.tokenizer).save_pretrained(target)
    (target / "loom_converted.json").write_text(json.dumps({"source": "random weights, SmolLM2-135M config"}))
    print(target)


if __name__ == "__main__":
    main()
