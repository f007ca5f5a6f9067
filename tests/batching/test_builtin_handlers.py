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


def _decoder_embedder(path, smollm2_path, pooling: str, padding_side: str):
    """A tiny random Qwen3 as a sentence-transformers folder, pooled as Qwen3-Embedding (last token) or otherwise."""
    import json

    from transformers import AutoTokenizer

    from tests.conftest import save_tiny_model

    save_tiny_model(path, smollm2_path, arch="qwen3")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.pad_token, tokenizer.padding_side = tokenizer.eos_token, padding_side
    tokenizer.save_pretrained(path)
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64,
                                                                f"pooling_mode_{pooling}": True}))
    (path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128, "do_lower_case": False}))
    return path


@pytest.mark.parametrize("pooling, padding_side", [("lasttoken", "left"), ("lasttoken", "right"),
                                                   ("weightedmean_tokens", "right")])
def test_a_decoder_embedder_matches_sentence_transformers(tmp_path, smollm2_path, pooling, padding_side):
    """Qwen3-Embedding's shape (a decoder, its last token pooled, left padding) and weighted mean, through the padded
    HF path: each text's vector as sentence-transformers gives it, whatever its neighbours' lengths."""
    from sentence_transformers import SentenceTransformer

    folder = _decoder_embedder(tmp_path / "emb", smollm2_path, pooling, padding_side)
    handler = EmbeddingHandler()
    handler.setup(Context("emb", str(folder), 0, num_threads=1))
    texts = [TEXTS[0], TEXTS[2], TEXTS[1]]  # uneven lengths: the short one padded in the batch
    ours = torch.tensor([r.value["embedding"] for r in run_batch(handler, texts)])
    reference = SentenceTransformer(str(folder), device="cpu").encode(texts, convert_to_tensor=True).float()
    alone = torch.tensor([run_batch(handler, [t])[0].value["embedding"] for t in texts])
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours, alone, atol=1e-5, rtol=1e-4)


PAIRS = [("how do I bake bread", "Mix flour, water, salt and yeast, then bake."),
         ("how do I bake bread", "The stock market fell today."),
         ("capital of France", "Paris " * 600),  # past 512 tokens: truncated as sentence-transformers truncates
         ("capital of France", "")]


def test_reranker_scores_pairs_as_sentence_transformers_cross_encoder(tiny_cross_encoder_dir):
    from sentence_transformers import CrossEncoder

    from loom.batching.handlers.reranker import RerankerHandler

    handler = RerankerHandler()
    handler.setup(Context("rerank", str(tiny_cross_encoder_dir), 0, num_threads=1))
    items = [{"query": PAIRS[0][0], "document": PAIRS[0][1]}, list(PAIRS[1]),
             {"text": PAIRS[2][0], "text_pair": PAIRS[2][1]}, {"query": PAIRS[3][0], "document": PAIRS[3][1]},
             {"query": "only a query"}]
    results = run_batch(handler, items)
    ours = torch.tensor([r.value["score"] for r in results[:4]])
    reference = torch.tensor(CrossEncoder(str(tiny_cross_encoder_dir), device="cpu").predict(PAIRS))
    torch.testing.assert_close(ours, reference.float(), atol=1e-5, rtol=1e-5)
    assert ((ours > 0) & (ours < 1)).all()  # the one-label model's sigmoid, as CrossEncoder applies it
    assert results[2].value["tokens"] == 512
    assert results[4].status == 400 and '"document"' in results[4].error
