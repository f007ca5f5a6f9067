"""PackedBert (loom/models/bert.py) against HF BertModel on the padded batch, and the packed embedding handler."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertModel

from loom.batching.handlers.embedding import pack, pool
from loom.models.bert import PackedBert, pool_segments

LENGTHS = [1, 3, 7, 8, 13]
VOCAB = 100


def tiny_config(**overrides) -> BertConfig:
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        type_vocab_size=2,
    )
    return BertConfig(**(kwargs | overrides))


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Nudge every parameter so that biases and LayerNorm affine terms are not HF's init (zeros / ones)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    """A seeded random 2-layer BertModel saved as an HF folder (keys without the ``bert.`` prefix)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-bert")
    randomize(BertModel(tiny_config(), add_pooling_layer=True)).save_pretrained(folder)
    return folder


def packed_inputs(seed: int, with_types: bool) -> tuple[list[list[int]], list[list[int]] | None]:
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in LENGTHS]
    types = [torch.randint(0, 2, (n,), generator=g).tolist() for n in LENGTHS] if with_types else None
    return ids, types


def padded(rows: list[list[int]], length: int) -> torch.Tensor:
    """Token lists -> [B, length] with zeros after each list."""
    return torch.tensor([row + [0] * (length - len(row)) for row in rows])


def max_diff_vs_hf(ours: PackedBert, reference: BertModel, ids, types) -> float:
    """Largest |packed - HF padded| over every real token of the batch."""
    batch = pack(ids, types)
    t = batch["max_len"]
    mask = padded([[1] * n for n in LENGTHS], t)  # [B, T]
    with torch.inference_mode():
        packed_out = ours(batch["input_ids"], batch["cu_seqlens"], t, batch["token_type_ids"])  # [N, D]
        hf_out = reference(
            input_ids=padded(ids, t), attention_mask=mask, token_type_ids=None if types is None else padded(types, t)
        ).last_hidden_state  # [B, T, D]
    assert packed_out.shape == (sum(LENGTHS), 32)
    return (packed_out - hf_out[mask.bool()]).abs().max().item()


@pytest.mark.parametrize("with_types", [False, True])
def test_packed_bert_matches_hf_on_the_padded_batch(tiny_bert_dir, with_types):
    reference = BertModel.from_pretrained(tiny_bert_dir, dtype=torch.float32).eval()
    ours = PackedBert.from_pretrained(tiny_bert_dir)
    ids, types = packed_inputs(seed=1, with_types=with_types)
    assert max_diff_vs_hf(ours, reference, ids, types) < 1e-5


@pytest.mark.parametrize("weights_file", ["model.safetensors", "pytorch_model.bin"])
def test_packed_bert_loads_a_bert_prefixed_checkpoint(tmp_path, weights_file):
    torch.manual_seed(2)
    mlm = randomize(BertForMaskedLM(tiny_config(hidden_act="gelu_new")))  # keys "bert.*" and "cls.*", no pooler
    mlm.save_pretrained(tmp_path)
    if weights_file == "pytorch_model.bin":
        (tmp_path / "model.safetensors").unlink()
        torch.save(mlm.state_dict(), tmp_path / weights_file)
    ours = PackedBert.from_pretrained(tmp_path)
    assert ours.layers[0].qkv.weight.shape == (96, 32)
    assert max_diff_vs_hf(ours, mlm.bert, *packed_inputs(seed=3, with_types=True)) < 1e-5


@pytest.mark.parametrize("mode", ["mean", "cls", "max", "mean_sqrt_len", "lasttoken", "weightedmean"])
def test_pool_segments_matches_padded_pool(mode):
    torch.manual_seed(4)
    batch = pack([[0] * n for n in LENGTHS], None)
    hidden = torch.randn(sum(LENGTHS), 8)  # [N, D]
    t, mask = batch["max_len"], padded([[1] * n for n in LENGTHS], max(LENGTHS))  # [B, T]
    padded_hidden = torch.full((len(LENGTHS), t, 8), 123.0)  # padding rows hold junk that pool() must ignore
    padded_hidden[mask.bool()] = hidden
    expected = pool(padded_hidden, mask, mode)  # [B, D]
    torch.testing.assert_close(pool_segments(hidden, batch["cu_seqlens"], mode), expected, rtol=1e-6, atol=1e-6)


def test_pack_builds_flat_inputs():
    batch = pack([[5, 6, 7], [8], [9, 10]], [[0, 0, 1], [0], [1, 1]])
    assert batch["input_ids"].tolist() == [5, 6, 7, 8, 9, 10]
    assert batch["token_type_ids"].tolist() == [0, 0, 1, 0, 1, 1]
    assert batch["cu_seqlens"].tolist() == [0, 3, 4, 6]
    assert batch["lengths"].tolist() == [3, 1, 2] and batch["max_len"] == 3
    assert pack([[1, 2]], None)["token_type_ids"] is None


def test_packed_bert_rejects_other_configs(tmp_path):
    from transformers import DistilBertConfig

    with pytest.raises(ValueError, match="model_type 'bert' only, not 'distilbert'"):
        PackedBert(DistilBertConfig())
    with pytest.raises(ValueError, match="absolute position embeddings only"):
        PackedBert(tiny_config(position_embedding_type="relative_key"))
    DistilBertConfig().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type 'bert' only"):
        PackedBert.from_pretrained(tmp_path)


@pytest.mark.slow
def test_embedding_handler_packed_path_matches_the_padded_path():
    from transformers import AutoModel

    from loom.batching.handler import Context, run_batch
    from loom.batching.handlers.embedding import EmbeddingHandler, default_model_dir
    from loom.bench.load_client import sentences

    texts = [*sentences(12, seed=5), "short", "x " * 400]
    handler = EmbeddingHandler()
    handler.setup(Context("minilm", None, 0, num_threads=1))
    assert handler.packed and isinstance(handler.model, PackedBert)
    packed = run_batch(handler, texts)
    handler.packed, handler.model = False, AutoModel.from_pretrained(default_model_dir(), dtype=torch.float32).eval()
    padded_results = run_batch(handler, texts)
    ours = torch.tensor([r.value["embedding"] for r in packed])
    reference = torch.tensor([r.value["embedding"] for r in padded_results])
    assert (ours - reference).abs().max().item() < 1e-5
    assert [r.value["tokens"] for r in packed] == [r.value["tokens"] for r in padded_results]
    assert packed[-1].value["tokens"] == 256
