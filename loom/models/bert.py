"""A packed (unpadded) BERT encoder in PyTorch, as Hugging Face's text-embeddings-inference runs it.

The tokens of every sequence in a batch are one flat tensor [N, D]: no padding row ever goes through a Linear,
LayerNorm or GELU. Sequence boundaries are ``cu_seqlens`` [B+1] (cumulative lengths, as in flash-attn varlen).
Only attention needs a per-sequence layout: each layer scatters its fused q/k/v rows into a padded
[B, max_len, 3D] buffer, runs ``scaled_dot_product_attention`` with a key-padding mask, and gathers the real
rows back. q/k/v are fused into one Linear at load time. Covers ``model_type == "bert"`` with absolute position
embeddings (all-MiniLM, BGE, E5 and other BERT sentence encoders).

    model = PackedBert.from_pretrained(folder)
    hidden = model(input_ids, cu_seqlens, max_len)            # [N, D]
    vectors = pool_segments(hidden, cu_seqlens, "mean")       # [B, D]
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig

from loom.ops.layers import uninitialized_embedding

# config.hidden_act -> the activation between the intermediate and output dense layers
_ACTIVATIONS = {
    "gelu": F.gelu,  # exact (erf) GELU, as HF's "gelu"
    "gelu_new": partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
}
# HF module inside encoder.layer.{i} -> PackedBert module inside layers.{i} (query/key/value go to the fused qkv)
_LAYER_KEYS = {
    "attention.output.dense": "attn_out",
    "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "intermediate",
    "output.dense": "output",
    "output.LayerNorm": "out_norm",
}


@dataclass(slots=True)
class Packing:
    """Where each packed token sits in the padded [B, max_len] layout; computed once per forward.

    positions: [N] position of each token inside its sequence; flat_index: [N] row in the [B * max_len] buffer;
    key_mask: [B, 1, 1, max_len] bool, True at real keys.
    """

    positions: torch.Tensor
    flat_index: torch.Tensor
    key_mask: torch.Tensor
    batch: int
    max_len: int

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, max_len: int) -> Packing:
        """cu_seqlens: [B+1] cumulative lengths starting at 0; max_len: the longest length."""
        lengths = cu_seqlens.diff()  # [B]
        seq_ids = segment_ids(cu_seqlens)  # [N]
        positions = torch.arange(seq_ids.shape[0], device=cu_seqlens.device) - cu_seqlens[seq_ids]
        flat_index = seq_ids * max_len + positions
        key_mask = torch.arange(max_len, device=cu_seqlens.device) < lengths[:, None]  # [B, max_len]
        return cls(positions, flat_index, key_mask[:, None, None, :], lengths.shape[0], max_len)


def segment_ids(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """cu_seqlens: [B+1] -> [N] index of the sequence each packed token belongs to."""
    lengths = cu_seqlens.diff()
    return torch.repeat_interleave(torch.arange(lengths.shape[0], device=cu_seqlens.device), lengths)


class BertEmbeddings(nn.Module):
    def __init__(self, hf):
        super().__init__()
        self.word_embeddings = uninitialized_embedding(hf.vocab_size, hf.hidden_size)  # built on meta, loaded after
        self.position_embeddings = uninitialized_embedding(hf.max_position_embeddings, hf.hidden_size)
        self.token_type_embeddings = uninitialized_embedding(hf.type_vocab_size, hf.hidden_size)
        self.LayerNorm = nn.LayerNorm(hf.hidden_size, eps=hf.layer_norm_eps)

    def forward(self, input_ids, positions, token_type_ids):
        """input_ids, positions: [N]; token_type_ids: [N] or None (all type 0) -> [N, D]."""
        if token_type_ids is None:
            types = self.token_type_embeddings.weight[0]  # [D], broadcast over the rows
        else:
            types = self.token_type_embeddings(token_type_ids)
        x = self.word_embeddings(input_ids) + types + self.position_embeddings(positions)
        return self.LayerNorm(x)


class BertLayer(nn.Module):
    def __init__(self, hf):
        super().__init__()
        d = hf.hidden_size
        self.num_heads, self.head_dim = hf.num_attention_heads, d // hf.num_attention_heads
        self.qkv = nn.Linear(d, 3 * d)
        self.attn_out = nn.Linear(d, d)
        self.attn_norm = nn.LayerNorm(d, eps=hf.layer_norm_eps)
        self.intermediate = nn.Linear(d, hf.intermediate_size)
        self.output = nn.Linear(hf.intermediate_size, d)
        self.out_norm = nn.LayerNorm(d, eps=hf.layer_norm_eps)
        self.act = _ACTIVATIONS[hf.hidden_act]

    def attention(self, x: torch.Tensor, packing: Packing) -> torch.Tensor:
        """x: [N, D] -> attention context [N, D], each token attending only to its own sequence."""
        d = x.shape[1]
        b, t, h = packing.batch, packing.max_len, self.num_heads
        padded = x.new_zeros(b * t, 3 * d).index_copy_(0, packing.flat_index, self.qkv(x))  # [B*T, 3D]
        q, k, v = padded.view(b, t, 3, h, self.head_dim).permute(2, 0, 3, 1, 4)  # each [B, H, T, hd]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=packing.key_mask)  # [B, H, T, hd]
        return out.transpose(1, 2).reshape(b * t, d).index_select(0, packing.flat_index)  # [N, D]

    def forward(self, x: torch.Tensor, packing: Packing) -> torch.Tensor:
        """x: [N, D] -> [N, D] (post-LayerNorm BERT block)."""
        x = self.attn_norm(x + self.attn_out(self.attention(x, packing)))
        return self.out_norm(x + self.output(self.act(self.intermediate(x))))


class PackedBert(nn.Module):
    """BERT's encoder (no pooler) over packed sequences; build from a transformers ``BertConfig``."""

    def __init__(self, hf):
        super().__init__()
        check_config(hf)
        self.config = hf
        self.embeddings = BertEmbeddings(hf)
        self.layers = nn.ModuleList(BertLayer(hf) for _ in range(hf.num_hidden_layers))

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype = torch.float32) -> PackedBert:
        """An HF BERT folder (config.json + model.safetensors, else pytorch_model.bin) -> eval-mode PackedBert."""
        folder = Path(folder)
        hf = AutoConfig.from_pretrained(str(folder))
        with torch.device("meta"):
            model = cls(hf)
        model.load_state_dict(convert_state_dict(read_weights(folder), hf.num_hidden_layers), assign=True)
        return model.to(dtype).eval()

    def forward(
        self,
        input_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_len: int,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, token_type_ids: [N]; cu_seqlens: [B+1]; max_len: longest length -> last hidden state [N, D]."""
        packing = Packing.from_cu_seqlens(cu_seqlens, max_len)
        x = self.embeddings(input_ids, packing.positions, token_type_ids)
        for layer in self.layers:
            x = layer(x, packing)
        return x


def check_config(hf) -> None:
    """Raise ValueError unless ``hf`` is a BERT config that PackedBert reproduces exactly."""
    model_type = getattr(hf, "model_type", None)
    if model_type != "bert":
        raise ValueError(
            f"PackedBert runs model_type 'bert' only, not {model_type!r}; load other encoders with "
            "transformers.AutoModel"
        )
    position_type = getattr(hf, "position_embedding_type", "absolute") or "absolute"
    if position_type != "absolute":
        raise ValueError(f"PackedBert supports absolute position embeddings only, not {position_type!r}")
    if hf.hidden_act not in _ACTIVATIONS:
        raise ValueError(f"PackedBert does not know hidden_act {hf.hidden_act!r}; it knows {sorted(_ACTIVATIONS)}")
    if hf.hidden_size % hf.num_attention_heads:
        raise ValueError(f"hidden_size {hf.hidden_size} is not a multiple of {hf.num_attention_heads} heads")


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The folder's model.safetensors, else pytorch_model.bin, as a CPU state dict (HF names)."""
    if (folder / "model.safetensors").is_file():
        return load_file(str(folder / "model.safetensors"))
    if (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {folder}")


def convert_state_dict(weights: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """HF BertModel names (with or without the ``bert.`` prefix) -> PackedBert names, q/k/v concatenated.

    Old ``LayerNorm.gamma/beta`` names are read as weight/bias; the pooler, MLM/NSP heads and
    ``embeddings.position_ids`` are dropped.
    """
    weights = {_hf_name(name): tensor for name, tensor in weights.items()}

    def get(name: str) -> torch.Tensor:
        if name not in weights:
            raise ValueError(f"checkpoint has no {name!r} (nor 'bert.{name}'); is it a BERT model?")
        return weights[name]

    embedding_names = [f"embeddings.{m}_embeddings.weight" for m in ("word", "position", "token_type")]
    out = {name: get(name) for name in [*embedding_names, "embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"]}
    for i in range(num_layers):
        prefix = f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            qkv = [get(f"{prefix}attention.self.{p}.{kind}") for p in ("query", "key", "value")]
            out[f"layers.{i}.qkv.{kind}"] = torch.cat(qkv)  # [3D, D] / [3D]
            for hf_module, ours in _LAYER_KEYS.items():
                out[f"layers.{i}.{ours}.{kind}"] = get(f"{prefix}{hf_module}.{kind}")
    return out


def _hf_name(name: str) -> str:
    name = name.removeprefix("bert.")
    if ".LayerNorm." in name:
        name = name.replace(".gamma", ".weight").replace(".beta", ".bias")
    return name


def pool_segments(hidden: torch.Tensor, cu_seqlens: torch.Tensor, mode: str) -> torch.Tensor:
    """hidden: [N, D] packed rows, cu_seqlens: [B+1] -> [B, D] by sentence-transformers' rule for `mode`.

    mode: "mean", "cls" (first token), "lasttoken", "max", "mean_sqrt_len" (sum / sqrt(length)) or "weightedmean"
    (token i of a text weighted i + 1); the packed twin of ``loom.batching.handlers.embedding.pool``.
    """
    if mode == "cls":
        return hidden.index_select(0, cu_seqlens[:-1])
    if mode == "lasttoken":
        return hidden.index_select(0, cu_seqlens[1:] - 1)
    batch, dim = cu_seqlens.shape[0] - 1, hidden.shape[1]
    seq_ids = segment_ids(cu_seqlens)  # [N]
    if mode == "max":
        index = seq_ids[:, None].expand(-1, dim)
        return hidden.new_empty(batch, dim).scatter_reduce_(0, index, hidden, "amax", include_self=False)
    if mode == "weightedmean":
        weights = (torch.arange(hidden.shape[0], device=hidden.device) - cu_seqlens[seq_ids] + 1).to(hidden.dtype)
        summed = hidden.new_zeros(batch, dim).index_add_(0, seq_ids, hidden * weights[:, None])
        return summed / hidden.new_zeros(batch).index_add_(0, seq_ids, weights)[:, None]
    summed = hidden.new_zeros(batch, dim).index_add_(0, seq_ids, hidden)  # [B, D]
    counts = cu_seqlens.diff().to(hidden.dtype)[:, None]  # [B, 1]
    return summed / (counts.sqrt() if mode == "mean_sqrt_len" else counts)
