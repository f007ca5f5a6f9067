"""Built-in handlers against their references: sentence-transformers for `embedding`, HF ViT for `image-classifier`."""

from __future__ import annotations

import io

import pytest
import torch

from loom.batching.handler import Context, run_batch
from loom.batching.handlers.embedding import EmbeddingHandler, default_model_dir
from loom.batching.handlers.image_classifier import ImageClassifierHandler
from tests.batching.conftest import image_bytes

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Dynamic batching trades a little latency for a lot of throughput.",
    "short",
    "A much longer sentence that keeps going " * 60,  # > 256 tokens: truncated exactly as sentence-transformers does
]


@pytest.mark.slow
def test_embedding_handler_matches_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    folder = default_model_dir()
    handler = EmbeddingHandler()
    handler.setup(Context("minilm", None, 0, num_threads=2))
    results = run_batch(handler, [*TEXTS[:2], {"text": TEXTS[2]}, TEXTS[3].encode()])
    ours = torch.tensor([r.value["embedding"] for r in results])  # [4, 384]
    reference = SentenceTransformer(str(folder), device="cpu").encode(TEXTS, convert_to_tensor=True)  # [4, 384]
    cosine = torch.nn.functional.cosine_similarity(ours, reference.float(), dim=1)
    assert ours.shape == (4, 384)
    assert cosine.min().item() > 0.9999, cosine
    assert results[3].value["tokens"] == 256
    assert results[2].value["tokens"] == 3  # [CLS] short [SEP]


@pytest.mark.slow
def test_embedding_handler_rejects_non_text_items_alone():
    handler = EmbeddingHandler()
    handler.setup(Context("minilm", None, 0, num_threads=2))
    ok, bad_type, bad_bytes = run_batch(handler, ["fine", {"image": 1}, b"\xff\xfe\xfa"])
    assert ok.error is None and len(ok.value["embedding"]) == 384
    assert bad_type.status == 400 and "send a string" in bad_type.error
    assert bad_bytes.status == 400 and "UTF-8" in bad_bytes.error


def test_image_classifier_top_k_matches_the_hf_model(tiny_vit_dir):
    from PIL import Image
    from transformers import ViTForImageClassification, ViTImageProcessor

    handler = ImageClassifierHandler()
    handler.setup(Context("vit", str(tiny_vit_dir), 0, num_threads=1, options={"top_k": 3}))
    png, jpeg = image_bytes("PNG", 1), image_bytes("JPEG", 2)
    results = run_batch(handler, [png, jpeg, b"not an image"])

    model = ViTForImageClassification.from_pretrained(tiny_vit_dir).eval()
    processor = ViTImageProcessor.from_pretrained(tiny_vit_dir)
    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in (png, jpeg)]
    with torch.no_grad():
        probs = model(**processor(images=images, return_tensors="pt")).logits.softmax(-1)  # [2, 5]
    top = probs.topk(3, dim=-1)
    for result, scores, ids in zip(results[:2], top.values, top.indices):
        assert [x["label"] for x in result.value] == [model.config.id2label[int(i)] for i in ids]
        assert [x["score"] for x in result.value] == pytest.approx(scores.tolist(), abs=1e-6)
    assert results[2].status == 400 and "PNG or JPEG" in results[2].error
