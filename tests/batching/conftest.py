"""Shared fixtures: a tiny random ViT folder (no hub) and a few test images."""

from __future__ import annotations

import io

import pytest


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory):
    """A random 2-layer ViTForImageClassification (32x32 input, 5 labels) saved as an HF folder."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    labels = ["cat", "dog", "ship", "tree", "car"]
    config = ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=64, num_labels=len(labels),
                       id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)})
    folder = tmp_path_factory.mktemp("tiny-vit")
    ViTForImageClassification(config).eval().save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def image_bytes(fmt: str, seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def tiny_cross_encoder_dir(tmp_path_factory):
    """A random 2-layer one-label BertForSequenceClassification with MiniLM's tokenizer: a cross-encoder's shape."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from loom.batching.handlers.embedding import default_model_dir

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(default_model_dir()))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, num_labels=1, max_position_embeddings=512)
    folder = tmp_path_factory.mktemp("tiny-cross-encoder")
    BertForSequenceClassification(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
