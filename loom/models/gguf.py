"""GGUF files served as they are: `--model path/to/model.gguf`, the quantized weights kept quantized.

    model = load_gguf_model("SmolLM2-135M-Instruct.Q4_1.gguf", torch.device("cpu"), max_positions=2048)
    model = load_gguf_model(path, torch.device("cuda"), 2048, dtype=torch.bfloat16, kernels="triton")

transformers reads the file's metadata into an HF config and its tokenizer (with the chat template); the tensors
are read here with the ``gguf`` package's reader, parsed faster (``loom.models.gguf_reader``, which transformers gets
too while it reads). Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL and
IQ4_XS projections become ``GGUFLinear`` layers (the blocks repacked for int8 dot products; rows of q/k/v and of
gate/up stacked into Loom's fused projections; parts of different types, as Q4_K_M files have, a
``StackedGGUFLinear``); with
``LOOM_GGUF_ACTIVATIONS=float32`` only ``FLOAT_KERNEL_TYPES`` run in their blocks. Other types (IQ2/IQ3, BF16, ...) are
expanded at load, and float tensors (norms) load as they are. ``kernels="triton"`` (CUDA; on CPU under
TRITON_INTERPRET=1 for tests) makes them ``TritonQuantLinear`` layers instead, the rest of the model in ``dtype``;
``"cpu"`` (the C++ kernels) runs float32.
The tied embedding is expanded once for lookups while the LM head multiplies its quantized copy. llama.cpp's
converter stores q and k rows permuted for its rotary layout; rows are independent, so un-permuting the rows of the
quantized matrix restores the HF order without touching a block. Architectures: llama (Llama, SmolLM2, Mistral-shaped
files), qwen2 (q/k/v biases), qwen3 (q/k RMSNorm per head, head_dim from ``attention.key_length``) and their
mixtures of experts qwen2moe (with its shared expert) and qwen3moe (each expert's matrices sliced out of the 3-D
``ffn_*_exps`` tensors, kept quantized), whose converter keeps q and k in HF's order, and phi3 (q/k/v rows in one
``attn_qkv`` tensor and gate/up in one ``ffn_up``, as Loom fuses them; its sliding window read from the file; the
128k models' per-frequency rotary factors refused), gemma2 and gemma3 (four norms a layer, stored plus one as Loom
keeps them; soft caps, Gemma 3's rotary scaling and Gemma 2 27B's query scale read or derived as llama.cpp does);
others are refused by name.
"""

from __future__ import annotations

import copy
import re
from functools import lru_cache, partial
from itertools import groupby
from pathlib import Path

import numpy as np
import torch

from loom.distributed.parallel import TensorParallel, head_shard
from loom.models.llama import LlamaConfig, LlamaForCausalLM, SparseMoE, qkv_load_order
from loom.ops.quantized import (
    FLOAT_KERNEL_TYPES,
    GGMLType,
    GGUFLinear,
    StackedGGUFLinear,
    block_quants,
    default_activations,
    dequantize_block_quants,
)
from loom.ops.rotary import partial_rotary_order

_LAYER = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "qwen2moe": "Qwen2MoeForCausalLM", "qwen3moe": "Qwen3MoeForCausalLM", "phi3": "Phi3ForCausalLM",
                 "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}
"""GGUF ``general.architecture`` values Loom executes, and the HF architecture each is."""
_FLOAT_TYPES = {0: torch.float32, 1: torch.float16}
_NORMS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_GEMMA_NORMS = {"attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
                "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
"""Gemma's four norms a layer (llama.cpp stores Gemma's norm weights plus one, which is how Loom keeps them too)."""


def is_gguf(path: str | Path) -> bool:
    return str(path).endswith(".gguf")


def gguf_reader(path: str | Path):
    """The file's ``gguf.GGUFReader``, parsed once per file version (path, size and modification time) until a model
    has been loaded from it (``load_gguf_model`` lets the cache go).

    NOTE: the ``gguf`` package's reader takes ~2 s on SmolLM2's file (it walks the 49,152-token vocabulary and its
    merges in Python; ``FastGGUFReader``, what this returns, 0.14 s), and loading a model asks for the architecture,
    the config and the tensors: six parses in Loom (and two in transformers, for the config), most of
    ``loom serve --model smollm2``'s start before this cache."""
    return _reader(*_version(path))


def _version(path: str | Path) -> tuple[str, int, int]:
    """The cache key of a file's contents: its resolved path, size and modification time."""
    stat = Path(path).stat()
    return str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns


@lru_cache(maxsize=2)
def _reader(path: str, size: int, mtime_ns: int):
    from loom.models.gguf_reader import FastGGUFReader

    return FastGGUFReader(path)


def gguf_architecture(path: str | Path) -> str:
    """The file's ``general.architecture``; ValueError naming the supported ones when Loom does not execute it."""
    arch = _field(gguf_reader(path), "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported yet; Loom executes GGUF files of "
                         f"{', '.join(ARCHITECTURES)}; for others serve the HF folder")
    return arch


def load_gguf_config(path: str | Path):
    """transformers' reading of the file's metadata as an HF config, its architecture set (transformers leaves it
    out) and, where the file gives one, the head size. A copy of what the first call for this file version read."""
    return copy.deepcopy(_gguf_config(*_version(path)))


@lru_cache(maxsize=2)
def _gguf_config(path: str, size: int, mtime_ns: int):
    from transformers import AutoConfig  # local: transformers takes ~1 s to import

    from loom.models.gguf_reader import fast_gguf_reads  # local: as gguf itself

    arch = gguf_architecture(path)
    path = Path(path)
    with fast_gguf_reads():
        hf = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    hf.architectures = [ARCHITECTURES[arch]]
    reader = gguf_reader(path)
    fields = reader.fields
    if f"{arch}.attention.key_length" in fields:  # Qwen3: head_dim need not be hidden / heads
        hf.head_dim = _int_field(fields, f"{arch}.attention.key_length", None)
    if arch in ("gemma2", "gemma3"):  # what transformers does not read from the file, where the file has it
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            setattr(hf, key, _float_field(fields, f"{arch}.{key}", getattr(hf, key, None)))
        # llama.cpp's rule (the file has no such key): Gemma 2 27B scales queries by hidden / heads, others by head_dim
        big = arch == "gemma2" and hf.num_hidden_layers == 46
        hf.query_pre_attn_scalar = hf.hidden_size // hf.num_attention_heads if big else hf.head_dim
        factor = _float_field(fields, f"{arch}.rope.scaling.factor", 1.0)
        if arch == "gemma3" and factor != 1.0:  # Gemma 3 4B and up: linear, on the global layers only
            hf.rope_parameters["full_attention"].update(rope_type="linear", factor=factor)
    if arch == "phi3":  # transformers reads neither of these from the file
        hf.sliding_window = _int_field(fields, "phi3.attention.sliding_window", None)
        head_dim = hf.hidden_size // hf.num_attention_heads
        hf.partial_rotary_factor = _int_field(fields, "phi3.rope.dimension_count", head_dim) / head_dim
        hf.rope_parameters["partial_rotary_factor"] = hf.partial_rotary_factor  # where LlamaConfig reads it first
    key = f"{arch}.rope.scaling.type"
    scaling = _field(reader, key) if key in fields else "none"
    factors = {t.name: t for t in reader.tensors if t.name.startswith("rope_factors_")}
    if factors:  # Phi-3 128k: LongRoPE, its factors as tensors (llama.cpp's converter writes them so)
        original = _int_field(fields, f"{arch}.rope.scaling.original_context_length", None)
        if arch != "phi3" or len(factors) != 2 or not original:
            raise ValueError(f"{path.name} has per-frequency rotary factors ({', '.join(sorted(factors))}) without "
                             "Phi-3's pair of long and short ones and its original context length; serve the HF "
                             "folder")
        hf.original_max_position_embeddings = original
        hf.rope_parameters.update(
            rope_type="longrope", original_max_position_embeddings=original,
            short_factor=_dense(factors["rope_factors_short.weight"]).flatten().tolist(),
            long_factor=_dense(factors["rope_factors_long.weight"]).flatten().tolist(),
            attention_factor=_float_field(fields, f"{arch}.rope.scaling.attn_factor", None))
        scaling = "none" if scaling in ("longrope", "su") else scaling
    if scaling != "none" and arch != "gemma3":  # transformers reads none of it (Gemma 3's is handled above)
        factor = _float_field(fields, f"{arch}.rope.scaling.factor", 1.0)
        if f"{arch}.rope.scaling.yarn_log_multiplier" in fields or _float_field(
                fields, f"{arch}.rope.scaling.attn_factor", 1.0) != 1.0:  # llama.cpp's: a product on top of yarn's
            raise ValueError(f"{path.name} sets rope.scaling.attn_factor / yarn_log_multiplier, which Loom does not "
                             "run from GGUF files; serve the HF folder")
        if scaling == "linear":
            hf.rope_parameters.update(rope_type="linear", factor=factor)
        elif scaling == "yarn":
            hf.rope_parameters.update(
                rope_type="yarn", factor=factor,
                original_max_position_embeddings=_int_field(fields, f"{arch}.rope.scaling.original_context_length",
                                                            None),
                beta_fast=_float_field(fields, f"{arch}.rope.scaling.yarn_beta_fast", None),
                beta_slow=_float_field(fields, f"{arch}.rope.scaling.yarn_beta_slow", None))
        else:
            raise ValueError(f"{path.name} scales its rotary embedding by {scaling!r}, which Loom does not run from "
                             "GGUF files (linear and yarn only); serve the HF folder")
    if arch in ("qwen2moe", "qwen3moe"):  # every layer sparse; llama.cpp normalises the top-k weights for qwen3moe
        hf.moe_intermediate_size = _int_field(fields, f"{arch}.expert_feed_forward_length", hf.moe_intermediate_size)
        if arch == "qwen2moe":
            hf.shared_expert_intermediate_size = _int_field(fields, f"{arch}.expert_shared_feed_forward_length",
                                                            hf.shared_expert_intermediate_size)
        hf.norm_topk_prob = arch == "qwen3moe"
        hf.mlp_only_layers, hf.decoder_sparse_step = [], 1
    return hf


def load_gguf_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    from loom.models.gguf_reader import fast_gguf_reads

    path = Path(path)
    with fast_gguf_reads():
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def load_gguf_model(path: str | Path, device: torch.device, max_positions: int, dtype: torch.dtype = torch.float32,
                    kernels: str = "cpu", tp: TensorParallel | None = None) -> LlamaForCausalLM:
    """``tp``: only this rank's shard, cut from the quantized rows as stored (``_Shard``)."""
    try:
        return _load_gguf_model(path, device, max_positions, dtype, kernels, tp)
    finally:  # the weights are copied out: let the file's mapping go (a 7B file maps gigabytes)
        _reader.cache_clear()


def _load_gguf_model(path, device, max_positions, dtype, kernels, tp) -> LlamaForCausalLM:
    if kernels not in ("cpu", "triton"):
        raise ValueError(f"kernels must be cpu or triton, got {kernels!r}")
    if kernels == "cpu" and (device.type != "cpu" or dtype != torch.float32):
        raise ValueError(f"GGUF weights run with the CPU kernels in float32 (got {device.type}, {dtype}); on CUDA "
                         "they need triton")
    reader = gguf_reader(path)
    arch = gguf_architecture(path)
    cfg = LlamaConfig.from_hf(load_gguf_config(path))
    tensors = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensors:  # Llama 3.1+: llama.cpp's converter stores llama3 rope scaling as divisors
        factors = _dense(tensors["rope_freqs.weight"]).flatten().tolist()
        cfg.rope_scaling = {"rope_type": "freq_factors", "factors": factors}
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, max_positions=1, dtype=dtype, tp=tp)
    model = model.to_empty(device=device)
    model.build_rotary(max_positions, dtype, device)  # both tables (Gemma 3 has a second, for its sliding layers)
    shard = _Shard(cfg, tp)

    _quantized_or_dense = partial(_linear, kernels=kernels, device=device, dtype=dtype)
    with torch.no_grad():
        embed = tensors["token_embd.weight"]
        model.embed_tokens.weight.copy_(shard.vocab_dense(_dense(embed)))
        head = tensors.get("output.weight", embed)
        model.logits_proj = _quantized_or_dense([shard.vocab(_rows(head))], cfg.hidden_size)
        model.lm_head = None
        model.norm.weight.copy_(_dense(tensors["output_norm.weight"]))
        permuted = arch == "llama"  # llama.cpp's converter permutes q/k rows for llama files only
        # partial rotary (Phi-4-mini): q and k rows (and q/k norm weights) in the load order the padded rotary tables
        # expect, as load_model puts a folder's (``qkv_load_order``, over all heads: the ranks cut whole heads after)
        qkv_order = qkv_load_order(cfg)
        q_size, kv_size = shard.qkv_sizes[:2]
        orders = [None, None, None] if qkv_order is None else [
            qkv_order[:q_size].numpy(), (qkv_order[q_size:q_size + kv_size] - q_size).numpy(), None]
        norm_order = slice(None) if cfg.rotary_dim is None else partial_rotary_order(cfg.head_dim, cfg.rotary_dim)

        def ordered(rows, part: int):
            """Rows (stored bytes or floats) of q (0), k (1) or v (2) in load order."""
            return rows if orders[part] is None else rows[orders[part]]
        for i, layer in enumerate(model.layers):
            t = {m.group(2) + (".bias" if m.group(3) == "bias" else ""): tensors[name] for name in tensors
                 if (m := _LAYER.match(name)) and int(m.group(1)) == i}
            for gguf_name, norm in (_GEMMA_NORMS if cfg.sandwich_norms else _NORMS).items():
                getattr(layer, norm).weight.copy_(_dense(t[gguf_name]))
            attn, mlp = layer.self_attn, layer.mlp
            if "attn_qkv" in t:  # phi3: q, k and v rows in one tensor, as Loom fuses them
                parts = _split_rows(_rows(t["attn_qkv"]), shard.qkv_sizes)
                q, k, v = [(qtype, ordered(rows, i)) for i, (qtype, rows) in enumerate(parts)]
                attn.qkv_proj = _quantized_or_dense(shard.qkv(q, k, v), cfg.hidden_size)
            else:
                q = _rows(t["attn_q"], cfg.num_attention_heads if permuted else None)
                k = _rows(t["attn_k"], cfg.num_key_value_heads if permuted else None)
                q, k = (q[0], ordered(q[1], 0)), (k[0], ordered(k[1], 1))
                bias = None
                if cfg.qkv_bias:
                    kept = (shard.q_rows, shard.kv_rows, shard.kv_rows)
                    bias = torch.cat([ordered(_dense(t[f"attn_{x}.bias"]), i)[kept[i]] for i, x in enumerate("qkv")])
                attn.qkv_proj = _quantized_or_dense(shard.qkv(q, k, _rows(t["attn_v"])), cfg.hidden_size, bias)
            if cfg.qk_norm:
                attn.q_norm.weight.copy_(_dense(t["attn_q_norm"])[norm_order])
                attn.k_norm.weight.copy_(_dense(t["attn_k_norm"])[norm_order])
            attn.o_proj = _quantized_or_dense([shard.columns(_rows(t["attn_output"]), shard.q_rows)], attn.q_size)
            if isinstance(mlp, SparseMoE):
                _load_experts(mlp, t, cfg, shard, _quantized_or_dense)
                continue
            # phi3: ffn_up holds the gate rows, then the up rows
            gate_up = ([_rows(t["ffn_gate"]), _rows(t["ffn_up"])] if "ffn_gate" in t
                       else _split_rows(_rows(t["ffn_up"]), [cfg.intermediate_size] * 2))
            mlp.gate_up_proj = _quantized_or_dense([shard.mlp(part) for part in gate_up], cfg.hidden_size)
            mlp.down_proj = _quantized_or_dense([shard.columns(_rows(t["ffn_down"]), shard.mlp_rows)],
                                                model.config.intermediate_size)
    return model.eval()


class _Shard:
    """Which rows and columns of each GGUF tensor this tensor-parallel rank keeps (all of them without ``tp``), cut
    from ``_rows`` results: column-parallel projections (q/k/v, gate/up) by output rows, row-parallel ones (o, down)
    by input columns, which must fall on block boundaries; the vocabulary by rows, padded with zero rows as the HF
    loader pads it (a block of zero bytes has scale 0: every weight 0)."""

    def __init__(self, cfg: LlamaConfig, tp: TensorParallel | None):
        self.tp, self.vocab_size = tp, cfg.vocab_size
        d = cfg.head_dim
        self.qkv_sizes = [cfg.num_attention_heads * d, cfg.num_key_value_heads * d, cfg.num_key_value_heads * d]
        heads = head_shard(cfg, tp.rank, tp.size) if tp is not None else head_shard(cfg, 0, 1)  # one rank: all
        self.q_rows, self.kv_rows, self.mlp_rows = heads.q_rows(d), heads.kv_rows(d), slice(*heads.intermediate)
        self.moe_rows, self.shared_rows = slice(*heads.moe_intermediate), slice(*heads.shared_intermediate)

    def qkv(self, q: tuple, k: tuple, v: tuple) -> list[tuple]:
        return [(q[0], q[1][self.q_rows]), (k[0], k[1][self.kv_rows]), (v[0], v[1][self.kv_rows])]

    def mlp(self, part: tuple, rows: slice | None = None) -> tuple:
        """This rank's rows of a gate or up matrix (a dense MLP's, or ``rows`` of an expert's)."""
        return part[0], part[1][self.mlp_rows if rows is None else rows]

    def columns(self, part: tuple, columns: slice) -> tuple:
        """Input columns of a (type, rows) pair: whole blocks of the stored bytes, or float columns."""
        qtype, data = part
        if self.tp is None:
            return part
        if qtype in _FLOAT_TYPES:
            return qtype, data[:, columns]
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        weights, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        start, end = columns.start, columns.stop
        if start % weights or end % weights:
            raise ValueError(f"a {GGMLQuantizationType(qtype).name} matrix cannot be split at input column "
                             f"{start if start % weights else end}: its blocks hold {weights} weights; use another "
                             "tensor_parallel_size (or a file of 32-weight types)")
        return qtype, data[:, start // weights * nbytes:end // weights * nbytes]

    def vocab(self, part: tuple) -> tuple:
        """A (type, rows) head: this rank's rows, zero rows (zero blocks) past the vocabulary."""
        if self.tp is None:
            return part
        qtype, data = part
        start, end = self.tp.vocab_range(self.vocab_size)
        rows = data[start:end]
        return qtype, np.concatenate([rows, np.zeros((end - start - rows.shape[0], *rows.shape[1:]), rows.dtype)])

    def vocab_dense(self, weight: torch.Tensor) -> torch.Tensor:
        return weight if self.tp is None else self.tp.vocab_rows(weight, self.vocab_size)


def _split_rows(part: tuple, sizes: list[int]) -> list[tuple]:
    """A (type, rows) pair cut into consecutive runs of rows (a fused tensor into its parts)."""
    qtype, data = part
    bounds = np.cumsum([0, *sizes])
    return [(qtype, data[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def _load_experts(moe: SparseMoE, t: dict, cfg: LlamaConfig, shard: _Shard, linear) -> None:
    """A mixture-of-experts layer from llama.cpp's tensors: the router ``ffn_gate_inp``, every expert's rows of the
    3-D ``ffn_{gate,up,down}_exps`` (one matrix per expert, quantized as stored), and Qwen2-MoE's shared expert
    (``*_shexp``, with its sigmoid gate ``ffn_gate_inp_shexp``); under tensor parallelism this rank's slice of each
    expert (``shard``: gate/up rows, down's input columns in whole blocks), the router and gates whole."""
    moe.gate.weight.copy_(_dense(t["ffn_gate_inp"]))
    (gate_type, gates), (up_type, ups), (down_type, downs) = (_rows(t[f"ffn_{w}_exps"]) for w in ("gate", "up", "down"))
    rows, width = shard.moe_rows, shard.moe_rows.stop - shard.moe_rows.start
    for e, expert in enumerate(moe.experts):
        expert.gate_up_proj = linear([shard.mlp((gate_type, gates[e]), rows), shard.mlp((up_type, ups[e]), rows)],
                                     cfg.hidden_size)
        expert.down_proj = linear([shard.columns((down_type, downs[e]), rows)], width)
    if moe.shared_expert is not None:
        shared, rows = moe.shared_expert, shard.shared_rows
        shared.gate_up_proj = linear([shard.mlp(_rows(t["ffn_gate_shexp"]), rows),
                                      shard.mlp(_rows(t["ffn_up_shexp"]), rows)], cfg.hidden_size)
        shared.down_proj = linear([shard.columns(_rows(t["ffn_down_shexp"]), rows)], rows.stop - rows.start)
        moe.shared_expert_gate.weight.copy_(_dense(t["ffn_gate_inp_shexp"]).reshape(1, -1))


def _int_field(fields, key: str, default):
    """An integer metadata value of the file, or ``default`` where it has none."""
    return int(fields[key].parts[-1][0]) if key in fields else default


def _float_field(fields, key: str, default):
    """A number of the file's metadata as a float, or ``default`` where it has none."""
    return float(fields[key].parts[-1][0]) if key in fields else default


def _field(reader, key: str):
    field = reader.fields[key]
    return bytes(field.parts[field.data[0]]).decode()


def _rows(tensor, num_heads: int | None = None) -> tuple[int, np.ndarray]:
    """(ggml type, the tensor's rows as stored: [out, row bytes] uint8 or [out, in] float), q/k rows un-permuted."""
    data = np.asarray(tensor.data)
    if num_heads is not None:  # llama.cpp stores each head's rows as (half, pair) -> back to HF's (pair, half)
        half = data.shape[0] // num_heads // 2
        data = data.reshape(num_heads, half, 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)
    return int(tensor.tensor_type), data


def _linear(parts: list[tuple[int, np.ndarray]], in_features: int, bias: torch.Tensor | None = None, *,
            kernels: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """One layer over the stacked rows of ``parts`` (``_rows`` results): quantized when every part is of an executable
    block type (one quantized linear of ``kernels`` per run of parts of one type, each with its rows of ``bias``),
    else the float weights (a dense ``nn.Linear`` in ``dtype``)."""
    executable = {int(t) for t in (GGMLType if kernels == "triton" or default_activations() == "int8"
                                   else FLOAT_KERNEL_TYPES)}
    if all(qtype in executable for qtype, _ in parts):
        runs = [list(run) for _, run in groupby(parts, key=lambda part: part[0])]
        layers, row = [], 0
        for run in runs:
            rows = torch.from_numpy(np.ascontiguousarray(np.concatenate([data for _, data in run])))
            part_bias = None if bias is None else bias[row:row + rows.shape[0]].contiguous()
            if kernels == "triton":
                from loom.ops.triton.quantized import TritonQuantLinear  # local: imports triton

                layers.append(TritonQuantLinear.from_gguf(rows, run[0][0], in_features, part_bias, device))
            else:
                layers.append(GGUFLinear(rows, run[0][0], in_features, part_bias))
            row += rows.shape[0]
        return layers[0] if len(layers) == 1 else StackedGGUFLinear(layers)
    weight = torch.cat([_as_float(qtype, data, in_features) for qtype, data in parts])
    linear = torch.nn.Linear(in_features, weight.shape[0], bias=bias is not None, device=device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


def _dense(tensor) -> torch.Tensor:
    qtype, data = _rows(tensor)
    shape = [int(d) for d in reversed(tensor.shape)]  # ggml lists dimensions innermost first
    return _as_float(qtype, data, shape[-1]).reshape(shape)


def _as_float(qtype: int, data: np.ndarray, in_features: int) -> torch.Tensor:
    if qtype in _FLOAT_TYPES:
        return torch.from_numpy(np.array(data)).to(torch.float32).reshape(-1, in_features)
    if qtype in {int(t) for t in GGMLType}:
        return dequantize_block_quants(block_quants(torch.from_numpy(np.array(data)), qtype, in_features))
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    return torch.from_numpy(np.ascontiguousarray(dequantize(data, GGMLQuantizationType(qtype)))).reshape(
        -1, in_features)
