"""A CLIP tokenizer built offline from the BPE file inside the ``open_clip_torch`` package's files.

No hub download: the 49,408-token vocabulary is derived from ``open_clip/bpe_simple_vocab_16e6.txt.gz`` exactly as
CLIP's ``SimpleTokenizer`` derives it (256 byte tokens, the same with ``</w>``, 48,894 merges, two specials), then
written as the ``vocab.json`` + ``merges.txt`` pair that ``transformers.CLIPTokenizer`` reads. The package is located
with ``importlib.util.find_spec`` and never imported (importing it drags its own torch requirements).

    python -m loom.image.tokenizer OUT_DIR     # writes OUT_DIR/{vocab.json,merges.txt,...}
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
import sys
from functools import lru_cache
from pathlib import Path

from loom.tokenization import bytes_to_unicode

CLIP_MAX_LENGTH = 77
NUM_MERGES = 49152 - 256 - 2  # SimpleTokenizer keeps lines 1 .. 48894 of the BPE file
INSTALL_HINT = ("install it without dependencies: pip install --no-deps open_clip_torch "
                "(or set LOOM_CLIP_BPE=/path/to/bpe_simple_vocab_16e6.txt.gz)")


def find_bpe_file() -> Path:
    """Path of CLIP's BPE merges file: $LOOM_CLIP_BPE, else inside the installed open_clip_torch package."""
    if env := os.environ.get("LOOM_CLIP_BPE"):
        path = Path(env)
        if not path.is_file():
            raise FileNotFoundError(f"LOOM_CLIP_BPE={env} is not a file; point it at bpe_simple_vocab_16e6.txt.gz")
        return path
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the CLIP BPE vocabulary comes from the open_clip_torch package, which is missing; "
                                f"{INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from open_clip_torch; reinstall it: {INSTALL_HINT}")
    return path


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """(token -> id for all 49,408 tokens, the 48,894 merges as "a b" lines)."""
    lines = gzip.open(find_bpe_file()).read().decode("utf-8").split("\n")
    merges = lines[1 : NUM_MERGES + 1]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def write_clip_tokenizer(out_dir: str | Path) -> Path:
    """Write a CLIPTokenizer folder (vocab.json, merges.txt, tokenizer_config.json) to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {
        "model_max_length": CLIP_MAX_LENGTH,  # without it truncation overflows the text encoder's 77 positions
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
        "tokenizer_class": "CLIPTokenizer",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (out / "special_tokens_map.json").write_text(json.dumps(special))
    return out


def cached_tokenizer_dir() -> Path:
    """A tokenizer folder under LOOM_HOME (default ~/.cache/loom), written once."""
    root = Path(os.environ.get("LOOM_HOME", Path.home() / ".cache" / "loom")) / "image" / "clip-tokenizer"
    if not (root / "merges.txt").is_file():
        tmp = root.with_name(root.name + f".tmp{os.getpid()}")
        write_clip_tokenizer(tmp)
        try:
            tmp.replace(root)  # atomic: a concurrent builder may have won, which is fine
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def load_clip_tokenizer():
    """A ``transformers.CLIPTokenizer`` with model_max_length=77, built offline."""
    # local: transformers takes ~1 s to import; `python -m loom.image.tokenizer` writes the folder without it
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(cached_tokenizer_dir()), model_max_length=CLIP_MAX_LENGTH)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m loom.image.tokenizer OUT_DIR")
    print(write_clip_tokenizer(sys.argv[1]))
