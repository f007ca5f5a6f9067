"""Load an HF folder (config.json + *.safetensors, sharded or not) straight into Loom's Llama modules.

transformers supplies only the config; weights stream from safetensors into preallocated (fused) parameters.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open

from loom.distributed.parallel import TensorParallel, head_shard
from loom.models.gguf import is_gguf, load_gguf_config, load_gguf_model, load_gguf_tokenizer
from loom.models.llama import LlamaConfig, LlamaForCausalLM

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# The last part of an HF module name -> (Loom's fused module, which slice of it); the prefix is kept, so experts'
# projections ("mlp.experts.3.gate_proj") fuse as the dense MLP's do.
_FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
# Mixtral's names for its experts' projections (w1 gate, w3 up, w2 down), as the Qwen MoE models name them
_MIXTRAL = [(re.compile(r"^block_sparse_moe\."), "mlp."), (re.compile(r"\.w1$"), ".gate_proj"),
            (re.compile(r"\.w3$"), ".up_proj"), (re.compile(r"\.w2$"), ".down_proj")]


def load_tokenizer(folder: str | Path):
    """The folder's tokenizer (fast when it has a tokenizer.json), with its chat template; a GGUF file's from its
    metadata."""
    if is_gguf(folder):
        return load_gguf_tokenizer(folder)
    # local: transformers takes ~1 s to import; `loom serve --help` and `loom generate --help` load this module
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def load_hf_config(folder: str | Path):
    if is_gguf(folder):
        return load_gguf_config(folder)
    from transformers import AutoConfig  # local: as in load_tokenizer, flag parsing must not pay for transformers

    return AutoConfig.from_pretrained(str(folder))


def load_model(folder: str | Path, dtype: torch.dtype, device: torch.device, max_positions: int,
               tp: TensorParallel | None = None, quantized_kernels: str = "cpu",
               row_amax: bool = False, dummy_seed: int | None = None) -> LlamaForCausalLM:
    """``tp``: load only this rank's shard of every weight (``loom.distributed.parallel``); with ``row_amax`` (the
    weights are to be quantized) it notes the whole rows' amax of the row-parallel ones in ``model.row_amax``. A
    ``.gguf`` file loads with its quantized weights kept (``loom.models.gguf``), multiplied by ``quantized_kernels``:
    "cpu" (the C++ kernels, float32 activations) or "triton". ``dummy_seed``: no weights are read; every parameter is
    drawn from U(-1e-3, 1e-3) on the device with that seed (vLLM's dummy format; only config.json is needed)."""
    if is_gguf(folder):
        if dummy_seed is not None:
            raise ValueError(f"{folder} is a GGUF file: load_format dummy takes an HF folder's config.json")
        return load_gguf_model(folder, device, max_positions, dtype, quantized_kernels, tp)
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files and dummy_seed is None:
        raise ValueError(f"no *.safetensors in {folder}; Loom loads HF folders saved with safetensors")
    cfg = LlamaConfig.from_hf(load_hf_config(folder))
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, max_positions=1, dtype=dtype, tp=tp)
    model = model.to_empty(device=device).to(dtype)
    model.build_rotary(max_positions, dtype, device)
    if dummy_seed is not None:
        generator = torch.Generator(device).manual_seed(dummy_seed)
        with torch.no_grad():
            for param in model.parameters():
                param.uniform_(-1e-3, 1e-3, generator=generator)
        return model.eval()
    params = dict(model.named_parameters())
    filled: dict[str, int] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                target = _target(name, cfg)
                if target is None:
                    continue
                pname, part = target
                tensor = f.get_tensor(name)
                if cfg.norm_offset and pname.endswith("norm.weight"):  # Gemma: (1 + w), added once here
                    tensor = tensor.float() + 1.0
                if cfg.residual_multiplier != 1.0 and pname.endswith(RESIDUAL_BRANCH_OUTPUTS):  # Granite
                    tensor = tensor.float() * cfg.residual_multiplier
                if tp is not None:
                    if row_amax and pname.endswith(ROW_PARALLEL_WEIGHTS):  # int8 scales: whole rows' (ops.quantized)
                        model.row_amax[pname] = tensor.float().abs().amax(1)
                    tensor = _shard(pname, part, tensor, cfg, tp)
                _copy_into(params[pname], part, tensor, model.config, gate_up="gate_up_proj" in pname)
                # a checkpoint that stores q/k/v or gate/up already fused (Phi-3) fills every part at once
                whole = _parts(pname) if part is None else 1
                filled[pname] = filled.get(pname, 0) + whole
    _check_complete(params, filled, folder)
    model.order_partial_rotary_rows()
    return model.eval()


RESIDUAL_BRANCH_OUTPUTS = ("o_proj.weight", "o_proj.bias", "down_proj.weight", "down_proj.bias")
"""The projections whose outputs join the residual stream: Granite's residual_multiplier is folded into them."""
ROW_PARALLEL_WEIGHTS = ("o_proj.weight", "down_proj.weight")
"""A tensor-parallel rank holds some input columns of these; ``model.row_amax`` keeps each whole row's largest |w|."""


def _target(name: str, cfg: LlamaConfig) -> tuple[str, int | None] | None:
    if name.endswith("rotary_emb.inv_freq"):
        return None
    if name == "lm_head.weight":
        return None if cfg.tie_word_embeddings else ("lm_head.weight", None)
    if name.startswith("model.") and not name.startswith("model.layers."):
        return name.removeprefix("model."), None
    m = _LAYER.match(name)
    if m is None:
        return None
    layer, rest = m.groups()
    module, kind = rest.rsplit(".", 1)
    for pattern, replacement in _MIXTRAL:
        module = pattern.sub(replacement, module)
    prefix, _, last = module.rpartition(".")
    if last in _FUSED:
        fused, part = _FUSED[last]
        return f"layers.{layer}.{prefix}.{fused}.{kind}", part
    return f"layers.{layer}.{module}.{kind}", None


def _copy_into(param: torch.nn.Parameter, part: int | None, tensor: torch.Tensor, cfg: LlamaConfig,
               gate_up: bool) -> None:
    # NOTE: which fused parameter comes from its name: q + 2 kv rows can equal 2 x intermediate_size (a Qwen3 shape)
    with torch.no_grad():
        if part is None:
            param.copy_(tensor)
            return
        if gate_up:  # a dense MLP's, an expert's or a shared expert's: each its own width
            sizes = [param.shape[0] // 2] * 2
        else:  # qkv
            kv = cfg.num_key_value_heads * cfg.head_dim
            sizes = [cfg.num_attention_heads * cfg.head_dim, kv, kv]
        start = sum(sizes[:part])
        param[start : start + sizes[part]].copy_(tensor)


def _shard(pname: str, part: int | None, tensor: torch.Tensor, cfg: LlamaConfig, tp: TensorParallel) -> torch.Tensor:
    """This rank's piece of checkpoint tensor ``tensor`` (bound for Loom parameter ``pname``, slice ``part`` of a
    fused one): column-parallel weights by output rows, row-parallel ones by input columns, vocabularies by rows."""
    shard = head_shard(cfg, tp.rank, tp.size)
    d = cfg.head_dim
    q_rows, kv_rows = shard.q_rows(d), shard.kv_rows(d)
    # a routed expert's, the shared expert's or a dense MLP's columns
    mlp_rows = slice(*(shard.moe_intermediate if ".experts." in pname else
                       shard.shared_intermediate if ".shared_expert." in pname else shard.intermediate))
    if "qkv_proj" in pname:
        q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
        if part is None:  # a fused checkpoint tensor (Phi-3): cut it into q, k, v first
            q_part, k_part, v_part = tensor.split([q, kv, kv])
            return torch.cat([q_part[q_rows], k_part[kv_rows], v_part[kv_rows]])
        return tensor[q_rows] if part == 0 else tensor[kv_rows]
    if "gate_up_proj" in pname:
        if part is None:
            gate, up = tensor.chunk(2)
            return torch.cat([gate[mlp_rows], up[mlp_rows]])
        return tensor[mlp_rows]
    if pname.endswith(("o_proj.bias", "down_proj.bias")):  # added once, after the all-reduce sums the ranks
        return tensor if tp.rank == 0 else torch.zeros_like(tensor)
    if pname.endswith("o_proj.weight"):
        return tensor[:, q_rows]
    if pname.endswith("down_proj.weight"):
        return tensor[:, mlp_rows]
    if pname in ("embed_tokens.weight", "lm_head.weight"):
        return tp.vocab_rows(tensor, cfg.vocab_size)
    return tensor


def _parts(pname: str) -> int:
    """How many checkpoint tensors make up Loom parameter ``pname`` (fused q/k/v: 3, gate/up: 2)."""
    return 3 if "qkv_proj" in pname else 2 if "gate_up_proj" in pname else 1


def _check_complete(params: dict, filled: dict[str, int], folder: Path) -> None:
    expected = {name: _parts(name) for name in params}
    missing = [n for n, count in expected.items() if filled.get(n, 0) < count]
    if missing:
        raise ValueError(f"checkpoint in {folder} lacks weights for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
