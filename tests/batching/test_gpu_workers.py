"""Model-server workers on a real GPU (skipped without CUDA; the CPU suite checks the placement with a fake list).

Every visible GPU gets workers in turn, the built-in handlers run there, and their answers match the CPU's.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from loom.batching.config import ModelConfig
from loom.batching.handler import Context, run_batch
from loom.batching.handlers.embedding import EmbeddingHandler
from loom.batching.handlers.image_classifier import ImageClassifierHandler
from loom.batching.placement import device_list
from tests.batching.conftest import image_bytes

from .test_placement import serving_on
from .test_server_inprocess import TOY

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_workers_are_placed_on_every_visible_gpu_in_turn():
    gpus = device_list()
    assert gpus == [f"cuda:{i}" for i in range(torch.cuda.device_count())]

    async def body():
        async with serving_on(gpus, ModelConfig("d", f"{TOY}#DeviceHandler", workers=2 * len(gpus))) as (c, _):
            return [w["device"] for w in c.server.get("d").describe()["worker_processes"]]

    assert asyncio.run(body()) == gpus * 2


def _answers(handler, device: str, items: list, **ctx) -> list:
    handler.setup(Context("m", ctx.get("model_dir"), 0, 1, ctx.get("options", {}), device))
    return [r.value for r in run_batch(handler, items)]


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    """A random 2-layer BERT with a word-level vocabulary (MiniLM's package may be missing on a GPU machine)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    words = "a short sentence somewhat longer about model servers on gpus x".split()
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=5 + len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).eval().save_pretrained(folder)
    return folder


def test_embedding_handler_on_cuda_matches_the_cpu(tiny_bert_dir):
    texts = ["a short sentence", "a somewhat longer sentence about model servers on gpus", "x"]
    on_gpu = _answers(EmbeddingHandler(), "cuda:0", texts, model_dir=str(tiny_bert_dir))  # HF BERT, padded
    on_cpu = _answers(EmbeddingHandler(), "cpu", texts, model_dir=str(tiny_bert_dir))  # PackedBert
    for gpu, cpu in zip(on_gpu, on_cpu):
        assert gpu["tokens"] == cpu["tokens"]
        torch.testing.assert_close(torch.tensor(gpu["embedding"]), torch.tensor(cpu["embedding"]), atol=1e-3,
                                   rtol=1e-3)


def test_image_classifier_on_cuda_matches_the_cpu(tiny_vit_dir):
    images = [image_bytes("png", seed) for seed in range(3)]
    on_gpu = _answers(ImageClassifierHandler(), "cuda:0", images, model_dir=str(tiny_vit_dir))
    on_cpu = _answers(ImageClassifierHandler(), "cpu", images, model_dir=str(tiny_vit_dir))
    for gpu, cpu in zip(on_gpu, on_cpu):
        assert [g["label"] for g in gpu] == [c["label"] for c in cpu]
        assert [g["score"] for g in gpu] == pytest.approx([c["score"] for c in cpu], abs=1e-4)
