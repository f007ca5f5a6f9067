"""`reranker` handler: relevance scores of (query, document) pairs from a cross-encoder folder, as
sentence-transformers' ``CrossEncoder.predict`` gives them (ms-marco-MiniLM, bge-reranker, mxbai-rerank, ...).

    loom serve --serve rerank=reranker:/models/bge-reranker-base
    curl localhost:8000/v1/rerank -d '{"model": "rerank", "query": "...", "documents": ["...", "..."]}'

The folder is an HF ``*ForSequenceClassification`` with one label. A pair is tokenized as the model was trained
(query, then document, ``truncation="longest_first"`` at the model's maximum length, at most 512), every pair of a
batch padded together, and the label's logit goes through the folder's activation: sentence-transformers writes it
in ``config.json`` (``sentence_transformers.activation_fn``), and a one-label model without it gets the sigmoid, as
``CrossEncoder`` does. An item is {"query", "document"} (also {"text", "text_pair"}) or a [query, document] pair;
the result is {"score": float, "tokens": n}. ``/v1/rerank`` and ``/v1/score`` (``loom.batching.routes``) turn a
query and its documents into such items, so the pairs of concurrent requests share batches.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loom.batching.handler import Context, Handler, ItemError

MAX_TEXT_CHARS = 100_000
ACTIVATIONS = {"torch.nn.modules.activation.Sigmoid": "sigmoid", "torch.nn.modules.linear.Identity": "identity"}
"""sentence-transformers' ``activation_fn`` names Loom applies."""


def read_activation(folder: Path) -> str:
    """The folder's activation on the logit: what sentence-transformers saved, else the sigmoid."""
    config = json.loads((folder / "config.json").read_text())
    if config.get("num_labels", len(config.get("id2label") or {0: 0})) != 1:
        raise ValueError(f"{folder} classifies into {config.get('num_labels') or len(config['id2label'])} labels; a "
                         "reranker gives one relevance score per pair (a one-label cross-encoder)")
    name = (config.get("sentence_transformers") or {}).get("activation_fn", "torch.nn.modules.activation.Sigmoid")
    if name not in ACTIVATIONS:
        raise ValueError(f"{folder}: activation_fn {name!r} is not one Loom applies ({', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


def pair_of(item: Any) -> tuple[str, str]:
    """(query, document) of a request item; ItemError saying what to send otherwise."""
    if isinstance(item, dict):
        query, document = item.get("query", item.get("text")), item.get("document", item.get("text_pair"))
    elif isinstance(item, list | tuple) and len(item) == 2:
        query, document = item
    else:
        query = document = None
    if not isinstance(query, str) or not isinstance(document, str):
        raise ItemError('send {"query": "...", "document": "..."} (or a [query, document] pair) to a reranker')
    if len(query) + len(document) > MAX_TEXT_CHARS:
        raise ItemError(f"query and document have {len(query) + len(document)} characters; send at most "
                        f"{MAX_TEXT_CHARS}", status=413)
    return query, document


class RerankerHandler(Handler):
    def setup(self, ctx: Context) -> None:
        import torch  # local: clients import this module's helpers without torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not ctx.model_dir:
            raise ValueError("the reranker handler needs a cross-encoder folder: NAME=reranker:PATH")
        folder = Path(ctx.model_dir)
        self.activation = read_activation(folder)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
        self.model.to(ctx.device)
        self.device = ctx.device
        self.max_length = min(512, getattr(self.tokenizer, "model_max_length", 512) or 512)
        self.torch = torch

    def decode(self, item: Any) -> tuple[str, str]:
        return pair_of(item)

    def preprocess(self, pairs: list[tuple[str, str]]) -> dict:
        queries, documents = zip(*pairs)
        return self.tokenizer(list(queries), list(documents), padding=True, truncation="longest_first",
                              max_length=self.max_length, return_tensors="pt")

    def inference(self, batch: dict) -> tuple:
        with self.torch.inference_mode():
            batch = batch.to(self.device)
            logits = self.model(**batch).logits[:, 0].float()  # [B]
            scores = self.torch.sigmoid(logits) if self.activation == "sigmoid" else logits
        return scores, batch["attention_mask"].sum(dim=1)

    def postprocess(self, outputs: tuple) -> list[dict]:
        scores, lengths = outputs
        return [{"score": score, "tokens": int(n)} for score, n in zip(scores.tolist(), lengths.tolist())]
