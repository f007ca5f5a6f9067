"""Load an HF folder (config.json + *.safetensors, sharded or not) straight into Loom's Llama modules.

transformers supplies only the config; weights stream from safetensors into preallocated (fused) parameters.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from loom.distributed.parallel import TensorParallel, head_shard
from loom.models.fp8 import FP8_DTYPES, dequantize_fp8
from loom.models.gguf import is_gguf, load_gguf_config, load_gguf_model, load_gguf_tokenizer
from loom.models.int_quant import (
    OPTIONAL_SUFFIXES,
    SUFFIXES,
    GatheredInputs,
    IntQuantConfig,
    IntWeights,
    as_blocks,
    block_quants,
    gguf_rows,
    int_quant_config,
    read_awq,
    read_compressed_tensors,
    read_gptq,
)
from loom.models.llama import LlamaConfig, LlamaForCausalLM, deinterleave_rope, order_partial_rotary
from loom.models.mxfp4 import dequantize_mxfp4, mxfp4_as_q8_0
from loom.models.vision import is_multimodal, language_weight_name
from loom.ops.packed_linear import PackedLinear
from loom.ops.quantized import BlockQuants, GGMLType, GGUFLinear, StackedGGUFLinear, default_activations

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
# Mixtral's names for its experts' projections (w1 gate, w3 up, w2 down), as the Qwen MoE models name them; gpt-oss'
# router, as they name theirs
_MIXTRAL = [(re.compile(r"^block_sparse_moe\."), "mlp."), (re.compile(r"\.w1$"), ".gate_proj"),
            (re.compile(r"\.w3$"), ".up_proj"), (re.compile(r"\.w2$"), ".down_proj"),
            (re.compile(r"^mlp\.router$"), "mlp.gate"), (re.compile(r"^mlp\.shared_experts\."), "mlp.shared_expert.")]
_CANONICAL = [(re.compile(r"\.block_sparse_moe\.input_linear\.weight$"), ".mlp.experts.gate_up_proj"),
              (re.compile(r"\.block_sparse_moe\.output_linear\.weight$"), ".mlp.experts.down_proj"),
              (re.compile(r"\.block_sparse_moe\.router(\.layer)?\.weight$"), ".mlp.gate.weight"),
              (re.compile(r"\.block_sparse_moe\."), ".mlp.")]
"""Checkpoint names of the whole MoE block onto transformers 5's (``mlp.experts.gate_up_proj`` ...), before anything
else reads them: Granite MoE's hub files (``input_linear`` [E, 2I, H], gate rows first; ``output_linear``;
``router.layer``) and Mixtral's ``block_sparse_moe`` prefix."""
QUANTIZATION_METHODS = ("gptq", "awq", "fp8", "fbgemm_fp8", "compressed-tensors", "mxfp4", "gguf")
"""HF ``quantization_config`` methods Loom loads: GPTQ and AWQ (``loom.models.int_quant``: kept quantized as GGUF
blocks); FP8 (transformers' fine-grained blocks, fbgemm's channels, compressed-tensors' FP8 schemes:
``loom.models.fp8``) and MXFP4 (``loom.models.mxfp4``), expanded to the model's dtype at load (gpt-oss' MXFP4 experts
kept as Q8_0 where a quantized kernel runs); and "gguf", which transformers writes into the config of a model it read
from a GGUF file and saved (its weights are floats). Others (bitsandbytes, HQQ, compressed-tensors' integer schemes,
...) are refused."""
_SCALES = (".weight_scale_inv", ".weight_scale", ".input_scale", ".k_scale", ".v_scale")
"""Tensors of FP8 checkpoints that are not weights: the weights' scales (read with them) and the activations' and
KV cache's static scales (Loom computes in the model's dtype: unused)."""


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
    hf = load_hf_config(folder)
    cfg = LlamaConfig.from_hf(hf)
    block = _check_quantization(hf, folder)
    int_quant = _int_quantization(hf, folder)
    index = {name: file for file in files for name in _keys(file)}  # every checkpoint tensor -> the file holding it
    rename = language_weight_name if is_multimodal(hf) else None  # the text model's weights of a vision model
    if rename is not None and cfg.tie_word_embeddings and any(rename(key) == "lm_head.weight" for key in index):
        # a vision config's tie flag defaults to True where the hub's configs leave it out (Mistral 3), though the
        # checkpoint holds a head of its own: transformers then keeps that head, and so does Loom
        cfg.tie_word_embeddings = False
    # MXFP4 experts stay quantized where a quantized kernel can take them (as Q8_0 rows: lossless); else expanded.
    # Their float weights are never allocated: the projections wait as placeholders holding only their biases.
    keep_mxfp4 = tp is None and dummy_seed is None and (quantized_kernels == "triton" or dtype == torch.float32)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, max_positions=1, dtype=dtype, tp=tp)
        if keep_mxfp4:
            _await_mxfp4(model, index, cfg)
        if int_quant is not None:
            _await_int_weights(model, index, cfg, rename, tp, int_quant)
    model = model.to_empty(device=device).to(dtype)
    model.keep_float32_routers()
    model.build_rotary(max_positions, dtype, device)
    if dummy_seed is not None:
        generator = torch.Generator(device).manual_seed(dummy_seed)
        with torch.no_grad():
            for param in model.parameters():
                param.uniform_(-1e-3, 1e-3, generator=generator)
        return model.eval()
    params = dict(model.named_parameters())
    filled: dict[str, int] = {}
    kept: dict[str, torch.Tensor] = {}  # Loom module path of an expert's projection -> its Q8_0 rows
    integer: dict[str, dict[int | None, IntWeights]] = {}  # GPTQ / AWQ: Loom weight -> its parts' integer weights

    def companion(f, name: str) -> torch.Tensor:
        """A tensor read beside another (a scale): from the open file ``f`` when it holds it, the usual case."""
        return f.get_tensor(name) if index.get(name) == file else _read(index, name)

    def place_if_ready(pname: str) -> None:
        """Build an integer projection as soon as all its parts and its bias are read (its integers then go)."""
        parts, bias = integer[pname], pname.removesuffix(".weight") + ".bias"
        if (None in parts or len(parts) == _parts(pname)) and filled.get(bias, 0) >= (_parts(bias) if bias in params
                                                                                    else 0):
            _place_int_linear(model, pname, integer.pop(pname), quantized_kernels, device, dtype)

    def read(f, name: str) -> torch.Tensor:
        """A checkpoint tensor as floats: an FP8 weight multiplied by its scale (from whichever file holds it)."""
        tensor = f.get_tensor(name)
        if tensor.dtype not in FP8_DTYPES:
            return tensor
        base = name.removesuffix(".weight")
        scale = next((base + s for s in (".weight_scale_inv", ".weight_scale") if base + s in index), None)
        if scale is None:
            raise ValueError(f"{name} in {folder} is {tensor.dtype} without a weight_scale_inv or weight_scale beside "
                             "it")
        return dequantize_fp8(tensor, companion(f, scale), block, dtype)

    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                own = _canonical(rename(name) if rename is not None else name)
                expanded = None  # integer weights Loom holds as floats
                if int_quant is not None and own is not None and own.endswith(SUFFIXES[int_quant.method]):
                    packed = SUFFIXES[int_quant.method][0]
                    if not own.endswith(packed):
                        continue  # a companion, read with its weights
                    own = own.removesuffix(packed) + ".weight"
                    target = _target(own, cfg)
                    if target is None:
                        continue
                    weights = _read_int_weights(f, name.removesuffix(packed), int_quant, companion, index)
                    pname, part = target
                    if pname not in params:  # a _Pending projection
                        integer.setdefault(pname, {})[part] = _int_as_loom(pname, part, weights, cfg, tp)
                        place_if_ready(pname)
                        continue
                    expanded = weights.dequantize()  # a projection Loom holds its own way (MLA's kv_b_proj)
                if own is None or own.endswith(_SCALES) or own.endswith("_scales") and _MXFP4.match(
                        own.removesuffix("_scales")):
                    continue  # scales: read with their weights (MXFP4's with their blocks)
                pieces = [(own, expanded)]  # the tensor read only once it is known to be wanted
                if own.endswith("_blocks") and _MXFP4.match(own.removesuffix("_blocks")):
                    own = own.removesuffix("_blocks")
                    blocks, scales = f.get_tensor(name), companion(f, name.removesuffix("_blocks") + "_scales")
                    rows = mxfp4_as_q8_0(blocks, scales) if keep_mxfp4 else None
                    if rows is not None:
                        for loom_name, expert_rows in _per_expert([(own, rows)], cfg, in_by_out=False):
                            kept[_target(loom_name, cfg)[0].removesuffix(".weight")] = expert_rows.contiguous()
                        continue
                    pieces = list(_per_expert([(own, dequantize_mxfp4(blocks, scales))], cfg, in_by_out=False))
                    if keep_mxfp4:  # a scale float16 cannot hold: these experts get float weights after all
                        for loom_name, _ in pieces:
                            path = _target(loom_name, cfg)[0].removesuffix(".weight")
                            linear = _float_linear(model.get_submodule(path), device, dtype)
                            model.set_submodule(path, linear)
                            params[f"{path}.weight"] = linear.weight
                            params[f"{path}.bias"] = linear.bias
                elif _FUSED_EXPERTS.match(own):
                    pieces = _per_expert([(own, read(f, name))], cfg)
                for own, tensor in pieces:
                    target = _target(own, cfg)
                    if target is None:
                        continue
                    pname, part = target
                    if pname not in params:
                        if 0 in (f.get_slice(name).get_shape() if tensor is None else tensor.shape):
                            continue  # a module of no width (GLM with n_shared_experts 0): Loom builds none
                        if int_quant is not None and pname.endswith(".bias") and not read(f, name).any():
                            continue  # the zero biases older AutoGPTQ saved beside every projection (vLLM skips)
                        raise ValueError(f"checkpoint tensor {name} in {folder} has no place in Loom's "
                                         f"{cfg.architecture} model (as {pname})")
                    tensor = _as_loom(pname, read(f, name) if tensor is None else tensor, cfg)
                    if tp is not None:
                        if row_amax and pname.endswith(ROW_PARALLEL_WEIGHTS):  # int8 scales: whole rows'
                            model.row_amax[pname] = tensor.float().abs().amax(1)
                        tensor = _shard(pname, part, tensor, cfg, tp)
                    _copy_into(params[pname], part, tensor, model.config, gate_up="gate_up_proj" in pname)
                    # a checkpoint that stores q/k/v or gate/up already fused (Phi-3) fills every part at once
                    whole = _parts(pname) if part is None else 1
                    filled[pname] = filled.get(pname, 0) + whole
                    if pname.endswith(".bias") and pname.removesuffix(".bias") + ".weight" in integer:
                        place_if_ready(pname.removesuffix(".bias") + ".weight")
    _check_complete(params, filled, folder)
    for pname in list(integer):  # parts the checkpoint lacks: _place_int_linear names them
        _place_int_linear(model, pname, integer.pop(pname), quantized_kernels, device, dtype)
    for path, rows in kept.items():
        model.set_submodule(path, _q8_0_linear(model.get_submodule(path), rows, quantized_kernels, device))
    waiting = [f"{path} ({module.awaits})" for path, module in model.named_modules() if isinstance(module, _Pending)]
    if waiting:
        raise ValueError(f"checkpoint in {folder} lacks the quantized weights of {waiting[:3]}")
    order_partial_rotary(dict(model.named_parameters()), model.config)
    return model.eval()


class _Pending(torch.nn.Module):
    """A projection whose quantized weights (``awaits``: MXFP4 blocks, GPTQ or AWQ integers) are still to be read: its
    bias and sizes, no weight."""

    def __init__(self, linear: torch.nn.Linear, awaits: str):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = linear.bias
        self.awaits = awaits


def _await_mxfp4(model: LlamaForCausalLM, index: dict[str, Path], cfg: LlamaConfig) -> None:
    """Put a ``_Pending`` in place of every expert projection the checkpoint holds as MXFP4 blocks (on the meta
    device, before the model is given memory)."""
    for name in index:
        m = _MXFP4.match(name.removesuffix("_blocks")) if name.endswith("_blocks") else None
        if m is None:
            continue
        layer = _LAYER.match(name).group(1)
        for e in range(cfg.num_experts):
            path = f"layers.{layer}.mlp.experts.{e}.{m.group(1)}"
            model.set_submodule(path, _Pending(model.get_submodule(path), "MXFP4 blocks"))


def _float_linear(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Linear:
    """A float ``nn.Linear`` of ``module``'s shape and bias; its weight from ``module.dequantize()`` where it has one
    (a quantized expert given float weights), else to be written."""
    linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device=device,
                             dtype=dtype)
    with torch.no_grad():
        if hasattr(module, "dequantize"):
            linear.weight.copy_(module.dequantize())
        if module.bias is not None:
            linear.bias.copy_(module.bias)
    return linear


def _q8_0_linear(linear: torch.nn.Module, rows: torch.Tensor, kernels: str, device: torch.device) -> torch.nn.Module:
    """An expert's projection from its MXFP4 blocks as Q8_0 rows, in place of its ``_Pending`` (no float weight
    was ever allocated), keeping its bias. On CPU the kernel that dequantizes in
    registers onto float32 activations (exact to float rounding, as transformers' expansion; not the GGUF files'
    default int8 activations); on CUDA Triton's dequant-matmul."""
    bias = None if linear.bias is None else linear.bias.detach().clone()
    if kernels == "triton":
        from loom.ops.triton.quantized import TritonQuantLinear  # local: imports triton

        layer = TritonQuantLinear.from_gguf(rows, GGMLType.Q8_0, linear.in_features, bias, device)
    else:
        layer = GGUFLinear(rows, GGMLType.Q8_0, linear.in_features, bias, activations="float32")
    layer.from_mxfp4 = True  # load_weights expands it again to take float weights (GRPO's syncs)
    return layer


def _int_quantization(hf, folder: Path) -> IntQuantConfig | None:
    """A GPTQ or AWQ checkpoint's ``IntQuantConfig`` (``_check_quantization`` has let the method through), else
    None."""
    quant = _quantization_dict(hf)
    method = None if quant is None else str(quant.get("quant_method")).lower()
    if method in ("gptq", "awq") or method == "compressed-tensors" and _integer_groups(quant):
        return int_quant_config(quant, folder)
    return None


def _integer_groups(quant: dict) -> bool:
    """Whether a compressed-tensors config quantizes its weights to integers (else its FP8 schemes)."""
    groups = (quant.get("config_groups") or {}).values()
    return any((group.get("weights") or {}).get("type") == "int" for group in groups)


def integer_quantization(folder: str | Path) -> str | None:
    """"gptq", "awq" or "compressed-tensors" where the HF folder holds integer weights Loom runs quantized, else
    None."""
    if is_gguf(folder) or not (Path(folder) / "config.json").is_file():
        return None
    config = _int_quantization(load_hf_config(folder), Path(folder))
    return None if config is None else config.method


def _quantization_dict(hf) -> dict | None:
    quant = getattr(hf, "quantization_config", None)
    if quant is None or isinstance(quant, dict):
        return quant
    return quant.to_dict() if hasattr(quant, "to_dict") else vars(quant)


def _await_int_weights(model: LlamaForCausalLM, index: dict[str, Path], cfg: LlamaConfig, rename,
                       tp: TensorParallel | None, config: IntQuantConfig) -> None:
    """Put a ``_Pending`` in place of every projection the checkpoint holds as integers (a fused one once for all its
    parts), on the meta device: their float weights are never allocated."""
    packed = SUFFIXES[config.method][0]
    for name in index:
        if not name.endswith(packed):
            continue
        own = _canonical(rename(name) if rename is not None else name)
        target = None if own is None else _target(own.removesuffix(packed) + ".weight", cfg)
        if target is None:
            continue
        path = target[0].removesuffix(".weight")
        if path == "lm_head" and tp is not None:
            raise ValueError("a quantized LM head is not split over tensor-parallel ranks: serve it on one rank")
        module = model.get_submodule(path)
        if type(module) is torch.nn.Linear:  # others (MLA's latent projection) take the weights expanded
            model.set_submodule(path, _Pending(module, f"{config.method} integers"))


def _read_int_weights(f, base: str, config: IntQuantConfig, companion, index: dict[str, Path]) -> IntWeights:
    """Checkpoint module ``base``'s integer weights (its packed weights from the open file ``f``, the rest from
    wherever they are; optional ones where the checkpoint has them)."""
    packed, *rest = SUFFIXES[config.method]
    tensors = {suffix: companion(f, base + suffix) if base + suffix in index else None for suffix in rest}
    missing = [base + s for s in rest if tensors[s] is None and s not in OPTIONAL_SUFFIXES]
    if missing:
        raise ValueError(f"the checkpoint lacks {missing[0]} beside {base + packed}")
    weights = f.get_tensor(base + packed)
    try:
        if config.method == "awq":
            return read_awq(weights, tensors[".qzeros"], tensors[".scales"], config)
        if config.method == "gptq":
            return read_gptq(weights, tensors[".qzeros"], tensors[".scales"], tensors[".g_idx"], config)
        return read_compressed_tensors(weights, tensors[".weight_scale"], tensors[".weight_zero_point"],
                                       tensors[".weight_g_idx"], tensors[".weight_shape"], config)
    except (ValueError, RuntimeError) as exc:  # tensors that do not fit together
        raise ValueError(f"{base} ({config.method}): {exc}") from None


def _int_as_loom(pname: str, part: int | None, w: IntWeights, cfg: LlamaConfig, tp: TensorParallel | None,
                 ) -> IntWeights:
    """Integer weights as ``_as_loom`` and ``_shard`` take float ones: the same rows and columns (read off those
    functions applied to index probes), Granite's residual multiplier in the scales."""
    out_features, in_features = w.shape
    probe = torch.arange(out_features, dtype=torch.float64)[:, None]
    rows = deinterleave_rope(probe, pname, cfg)[:, 0].long()  # DeepSeek's rotary rows: a permutation
    if not torch.equal(rows, torch.arange(out_features)):
        w = w.rows(rows)
    if cfg.residual_multiplier != 1.0 and pname.endswith(RESIDUAL_BRANCH_OUTPUTS):
        w = w.scaled(cfg.residual_multiplier)
    if tp is not None:
        rows = torch.arange(out_features, dtype=torch.int32)[:, None].expand(out_features, in_features)
        columns = torch.arange(in_features, dtype=torch.int32)[None, :].expand(out_features, in_features)
        w = w.rows(_shard(pname, part, rows, cfg, tp)[:, 0].long()).columns(
            _shard(pname, part, columns, cfg, tp)[0].long())
    return w


def _place_int_linear(model: LlamaForCausalLM, pname: str, parts: dict[int | None, IntWeights], kernels: str,
                      device: torch.device, dtype: torch.dtype) -> None:
    """Replace Loom weight ``pname``'s ``_Pending`` by a layer over its parts' integer weights: quantized
    (``_quantized_int_linear``) where a kernel takes them, else float weights in ``dtype``."""
    path = pname.removesuffix(".weight")
    pending = model.get_submodule(path)
    count = _parts(pname)
    if None in parts:
        ordered = [parts[None]]
    elif sorted(parts) == list(range(count)):
        ordered = [parts[i] for i in range(count)]
    else:
        raise ValueError(f"{pname}: the checkpoint quantizes {len(parts)} of its {count} parts (mixed quantized and "
                         "float projections are not read)")
    rows = sum(p.shape[0] for p in ordered)
    widths = {p.shape[1] for p in ordered}
    if rows != pending.out_features or widths != {pending.in_features}:
        raise ValueError(f"{pname}: the checkpoint's integers make a [{rows}, {'/'.join(map(str, sorted(widths)))}] "
                         f"weight where the model's config needs [{pending.out_features}, {pending.in_features}]")
    bias = None if pending.bias is None else pending.bias.detach().float()
    layer = None
    if kernels == "triton" or (device.type == "cpu" and dtype == torch.float32):
        layer = _quantized_int_linear(_partial_rotary_rows(pname, ordered, bias, model.config), pending.in_features,
                                      kernels, device)
    if layer is None:  # float weights, rows as the checkpoint's: load_model's order_partial_rotary orders them
        layer = _float_linear(pending, device, dtype)
        with torch.no_grad():
            layer.weight.copy_(torch.cat([p.dequantize() for p in ordered]))
    if path == "lm_head":
        model.logits_proj, model.lm_head = layer, None
    else:
        model.set_submodule(path, layer)


def _partial_rotary_rows(pname: str, parts: list[IntWeights], bias: torch.Tensor | None, cfg: LlamaConfig,
                         ) -> list[tuple[IntWeights, torch.Tensor | None]]:
    """(part, its rows of ``bias``) for each part, under partial rotary in the load order ``order_partial_rotary``
    gives float q/k/v rows and their bias (the quantized layer's bias is no parameter it would reach)."""
    bounds = [0]
    for p in parts:
        bounds.append(bounds[-1] + p.shape[0])
    order = None
    if "qkv_proj" in pname:
        probe = torch.arange(bounds[-1], dtype=torch.float64)[:, None]
        order_partial_rotary({pname: probe}, cfg)
        order = probe[:, 0].long()
        if torch.equal(order, torch.arange(bounds[-1])):
            order = None
    out = []
    for p, start, end in zip(parts, bounds, bounds[1:]):
        rows = None if order is None else order[start:end] - start
        if rows is not None and (rows.min() < 0 or rows.max() >= end - start):
            raise ValueError(f"{pname}: the partial-rotary row order crosses its parts")
        part_bias = None if bias is None else bias[start:end]
        if rows is not None:
            p, part_bias = p.rows(rows), None if part_bias is None else part_bias[rows]
        out.append((p, part_bias))
    return out


def _quantized_int_linear(parts: list[tuple[IntWeights, torch.Tensor | None]], in_features: int, kernels: str,
                          device: torch.device) -> torch.nn.Module | None:
    """One quantized projection over stacked (integer part, bias rows) pairs: runs of parts over the same input order
    share one layer (``block_quants``), and a run whose inputs act-order permuted reads them in its order
    (``GatheredInputs``); None where the blocks cannot hold a part's groups or no kernel takes them."""
    blocks = [as_blocks(p) for p, _ in parts]
    if any(b is None for b in blocks):
        return None
    layers, i = [], 0
    while i < len(parts):
        j = i + 1
        while j < len(parts) and _same_order(blocks[i].order, blocks[j].order):
            j += 1
        biases = [b for _, b in parts[i:j]]
        bias = None if biases[0] is None else torch.cat(biases).contiguous()
        layer = _block_layer(block_quants(blocks[i:j]), in_features, bias, kernels, device)
        if layer is None:
            return None
        layers.append(layer if blocks[i].order is None else GatheredInputs(layer, blocks[i].order.to(device)))
        i = j
    return layers[0] if len(layers) == 1 else StackedGGUFLinear(layers)


def _same_order(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is None and b is None or a is not None and b is not None and torch.equal(a, b)


def _block_layer(bq: BlockQuants, in_features: int, bias: torch.Tensor | None, kernels: str,
                 device: torch.device) -> torch.nn.Module | None:
    """A quantized linear over ``bq`` on ``kernels``, or None where the CPU's float32-activation kernels read no GGUF
    type that holds it."""
    if kernels == "triton":
        from loom.ops.triton.quantized import TritonQuantLinear  # local: imports triton

        return TritonQuantLinear(bq.to(device), in_features, None if bias is None else bias.to(device), "GPTQ/AWQ")
    if default_activations() == "int8":
        return GGUFLinear.from_quants(bq, in_features, bias)
    encoded = gguf_rows(bq)
    return None if encoded is None else GGUFLinear(torch.from_numpy(encoded[1]), encoded[0], in_features, bias,
                                                   activations="float32")


def load_weights(model: LlamaForCausalLM, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Overwrite a loaded model's weights in place with ``weights``: (name, tensor) pairs named as in an HF checkpoint
    (a training model's ``state_dict().items()``, say), the same shapes. Every weight the model holds must be given,
    so a fused projection (q/k/v, gate/up) or a packed one (``PackedLinear``) is rebuilt whole; the names and the
    completeness are checked before anything is written. Tensors stay where they are (CUDA graphs and the C++ layer
    plan keep reading them). Quantized weights and tensor-parallel shards are refused. Returns how many checkpoint
    tensors were written."""
    if model.tp is not None:
        raise ValueError("load_weights: the model is sharded over tensor-parallel ranks; load the new weights from a "
                         "folder instead")
    for path, module in list(model.named_modules()):  # MXFP4 experts kept as Q8_0: float weights replace them
        if getattr(module, "from_mxfp4", False):
            model.set_submodule(path, _float_linear(module, model.embed_tokens.weight.device,
                                                    model.embed_tokens.weight.dtype))
    quantized = sorted({type(m).__name__ for m in model.modules() if type(m).__name__ in QUANTIZED_MODULES})
    if quantized:
        raise ValueError(f"load_weights: the model's weights are quantized ({', '.join(quantized)}); float weights "
                         "cannot replace them: serve the float checkpoint to update it")
    cfg = model.config
    params = dict(model.named_parameters())
    staged: dict[str, torch.Tensor] = {}  # the whole weights of packed projections, rebuilt in float32
    seen: dict[str, set[int | None]] = {}  # the parts of each Loom weight given (None: all of it at once)
    writes = []  # (the whole Loom tensor, the rows this checkpoint tensor fills, the checkpoint tensor)
    for name, tensor in _per_expert(((_canonical(n), t) for n, t in weights), cfg):
        target = _target(name, cfg)
        if target is None:
            continue
        pname, part = target
        if pname == "lm_head.weight" and model.lm_head is None:
            if not isinstance(model.logits_proj, PackedLinear):
                raise ValueError("load_weights: the LM head is quantized; float weights cannot replace it")
            pname = "logits_proj.weight"
        parts = seen.setdefault(pname, set())
        if part in parts or None in parts or (part is None and parts):  # a fused tensor covers all its parts
            raise ValueError(f"load_weights: {name} is given twice (as part of {pname})")
        parts.add(part)
        if pname not in params and pname not in staged:
            module = _packed(model, pname)
            staged[pname] = (torch.empty_like(module.bias) if pname.endswith(".bias")
                             else torch.empty(module.out_features, module.in_features))
        whole = params[pname] if pname in params else staged[pname]
        rows = _slice(whole, part, cfg, "gate_up_proj" in pname)
        if rows.shape != tensor.shape:
            raise ValueError(f"load_weights: {pname} takes a tensor of shape {tuple(rows.shape)}, got "
                             f"{tuple(tensor.shape)}")
        writes.append((pname, whole, rows, tensor))
    expected = {name: _parts(name) for name in [*params, *_packed_weights(model)]}
    missing = [n for n, count in expected.items() if None not in seen.get(n, ()) and len(seen.get(n, ())) < count]
    if missing:
        raise ValueError(f"load_weights: no new values for {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
                         "give every weight of the model")
    with torch.no_grad():  # every name, part and shape checked: now write
        for pname, _, rows, tensor in writes:
            rows.copy_(_as_loom(pname, tensor, cfg))
    order_partial_rotary({pname: whole for pname, whole, _, _ in writes}, cfg)  # before any is packed
    for pname, weight in staged.items():
        if pname.endswith(".weight"):
            bias = staged.get(pname.removesuffix(".weight") + ".bias")
            _packed(model, pname).load_(weight, bias)
    if cfg.tie_word_embeddings and isinstance(model.logits_proj, PackedLinear):  # the head packs the embeddings
        model.logits_proj.load_(model.embed_tokens.weight)
    model.ops.weights_changed(model)
    return len(writes)


QUANTIZED_MODULES = ("GGUFLinear", "StackedGGUFLinear", "Int8Linear", "TritonQuantLinear")
"""Modules holding quantized weights (``loom.ops.quantized``, ``loom.ops.triton.quantized``)."""
_FUSED_EXPERTS = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)(_bias)?$")
_MXFP4 = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.(gate_up_proj|down_proj)$")
"""gpt-oss' quantized experts: ``<name>_blocks`` and ``<name>_scales`` (``loom.models.mxfp4``)."""
GPT_OSS = "GptOssForCausalLM"


def _in_by_out(name: str, fused: torch.Tensor, cfg: LlamaConfig) -> bool:
    """Whether a checkpoint's fused experts are input-major, ``gate_up_proj`` [E, H, 2I] and ``down_proj`` [E, I, H]
    (Qwen3-VL-MoE's files on the hub; gpt-oss' always, as transformers holds them), not as transformers holds
    Qwen's and Mixtral's; square ones are taken as transformers holds them (as transformers' loader takes them)."""
    if cfg.architecture == GPT_OSS:
        return True
    rows = 2 * cfg.moe_intermediate_size if name.endswith("gate_up_proj") else cfg.hidden_size
    return fused.shape[1] != rows


def _per_expert(weights: Iterable[tuple[str, torch.Tensor]], cfg: LlamaConfig, in_by_out: bool | None = None,
                ) -> Iterator[tuple[str, torch.Tensor]]:
    """transformers 5 holds a MoE layer's experts as two 3-D tensors (``mlp.experts.gate_up_proj`` [E, 2I, H], gate
    rows first, and ``mlp.experts.down_proj`` [E, H, I]; ``in_by_out``: each expert's matrix transposed, as
    Qwen3-VL-MoE's and gpt-oss' files hold them; None: decided by ``_in_by_out``), gpt-oss biases too
    (``gate_up_proj_bias`` [E, 2I], ``down_proj_bias`` [E, H]); Loom holds one projection per expert. gpt-oss
    interleaves gate and up (gate in the even columns): Loom's rows are gate first, then up."""
    for name, tensor in weights:
        m = _FUSED_EXPERTS.match(name)
        if m is None or tensor.dim() != (2 if m.group(3) else 3):
            yield name, tensor
            continue
        prefix, kind, bias = m.groups()
        flip = not bias and (_in_by_out(name, tensor, cfg) if in_by_out is None else in_by_out)
        for e in range(tensor.shape[0]):
            one = tensor[e].T if flip else tensor[e]
            if kind == "gate_up_proj" and cfg.architecture == GPT_OSS:
                one = torch.cat([one[0::2], one[1::2]])
            yield f"{prefix}.{e}.{kind}.{'bias' if bias else 'weight'}", one


def _packed(model: LlamaForCausalLM, pname: str) -> PackedLinear:
    module = model.get_submodule(pname.rsplit(".", 1)[0])
    if not isinstance(module, PackedLinear):
        raise ValueError(f"load_weights: {pname} is held as {type(module).__name__} (quantized?); only float "
                         "weights can be replaced")
    return module


def _packed_weights(model: LlamaForCausalLM) -> list[str]:
    """The Loom names of the weights (and biases) held packed, besides a tied head's (it packs the embeddings)."""
    names = []
    for path, module in model.named_modules():
        if isinstance(module, PackedLinear) and not (path == "logits_proj" and model.config.tie_word_embeddings):
            names.append(f"{path}.weight")
            if module.bias is not None:
                names.append(f"{path}.bias")
    return names


def _as_loom(pname: str, tensor: torch.Tensor, cfg: LlamaConfig) -> torch.Tensor:
    """A checkpoint tensor as Loom's parameter holds it: Gemma's norms as (1 + w), Granite's residual multiplier
    folded into the projections that join the residual stream, DeepSeek's interleaved rotary rows in rotate-half
    order."""
    if cfg.norm_offset and pname.endswith("norm.weight"):
        tensor = tensor.float() + 1.0
    if cfg.residual_multiplier != 1.0 and pname.endswith(RESIDUAL_BRANCH_OUTPUTS):
        tensor = tensor.float() * cfg.residual_multiplier
    return deinterleave_rope(tensor, pname, cfg)


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
    if int(layer) >= cfg.num_hidden_layers:  # GLM-4.5's multi-token-prediction layer after the last: not served
        return None
    module, kind = rest.rsplit(".", 1)
    if kind == "e_score_correction_bias":  # the router's, held by Loom's MoE module (the router is a plain linear)
        return f"layers.{layer}.{module.removesuffix('.gate')}.{kind}", None
    for pattern, replacement in _MIXTRAL:
        module = pattern.sub(replacement, module)
    prefix, _, last = module.rpartition(".")
    if last in _FUSED and not (cfg.kv_lora_rank and prefix == "self_attn"):  # MLA's q_proj stays its own
        fused, part = _FUSED[last]
        return f"layers.{layer}.{prefix}.{fused}.{kind}", part
    return f"layers.{layer}.{module}.{kind}", None


def _copy_into(param: torch.nn.Parameter, part: int | None, tensor: torch.Tensor, cfg: LlamaConfig,
               gate_up: bool) -> None:
    with torch.no_grad():
        _slice(param, part, cfg, gate_up).copy_(tensor)


def _slice(param: torch.Tensor, part: int | None, cfg: LlamaConfig, gate_up: bool) -> torch.Tensor:
    """The rows of ``param`` that checkpoint tensor ``part`` of a fused projection fills (all of it: None)."""
    # NOTE: which fused parameter comes from its name: q + 2 kv rows can equal 2 x intermediate_size (a Qwen3 shape)
    if part is None:
        return param
    if gate_up:  # a dense MLP's, an expert's or a shared expert's: each its own width
        sizes = [param.shape[0] // 2] * 2
    else:  # qkv
        kv = cfg.num_key_value_heads * cfg.head_dim
        sizes = [cfg.num_attention_heads * cfg.head_dim, kv, kv]
    start = sum(sizes[:part])
    return param[start : start + sizes[part]]


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
    if pname.endswith("self_attn.sinks"):  # one per query head
        return tensor[shard.q_rows(1)]
    if pname.endswith(("self_attn.q_proj.weight", "self_attn.q_b_proj.weight")):  # MLA: its heads' query rows
        return tensor[q_rows]
    if pname.endswith("self_attn.kv_b_proj.weight"):  # MLA: its heads' key and value rows
        return tensor[shard.q_rows(cfg.qk_nope_head_dim + cfg.v_head_dim)]
    if pname.endswith(("o_proj.bias", "down_proj.bias")):  # added once, after the all-reduce sums the ranks
        return tensor if tp.rank == 0 else torch.zeros_like(tensor)
    if pname.endswith("o_proj.weight"):  # its heads' outputs (MLA: their values' width)
        return tensor[:, shard.q_rows(cfg.head_output_dim())]
    if pname.endswith("down_proj.weight"):
        return tensor[:, mlp_rows]
    if pname in ("embed_tokens.weight", "lm_head.weight"):
        return tp.vocab_rows(tensor, cfg.vocab_size)
    return tensor


def _parts(pname: str) -> int:
    """How many checkpoint tensors make up Loom parameter ``pname`` (fused q/k/v: 3, gate/up: 2)."""
    return 3 if "qkv_proj" in pname else 2 if "gate_up_proj" in pname else 1


def _canonical(name: str | None) -> str | None:
    if name is None or "block_sparse_moe" not in name:
        return name
    for pattern, replacement in _CANONICAL:
        name = pattern.sub(replacement, name)
    return name


def _keys(file: Path) -> list[str]:
    with safe_open(str(file), framework="pt", device="cpu") as f:
        return list(f.keys())


def _read(index: dict[str, Path], name: str) -> torch.Tensor:
    """Checkpoint tensor ``name``, from the file ``index`` names for it."""
    if name not in index:
        raise ValueError(f"the checkpoint lacks {name}")
    with safe_open(str(index[name]), framework="pt", device="cpu") as f:
        return f.get_tensor(name)


def _check_quantization(hf, folder: Path) -> tuple[int, int] | None:
    """Refuse a checkpoint quantized by a method Loom does not read (GPTQ, AWQ, bitsandbytes, integer
    compressed-tensors, ...): its tensors would be missing or taken for float weights. Returns the FP8 block tile
    where the config gives one."""
    quant = _quantization_dict(hf)
    if quant is None:
        return None
    method = quant.get("quant_method")
    if method is None:
        raise ValueError(f"{folder}'s config holds a quantization_config without a quant_method (an older "
                         "bitsandbytes save?), which Loom does not load: serve the unquantized checkpoint")
    method = str(getattr(method, "value", method)).lower()  # transformers' enum
    if method == "mxfp4" and getattr(hf, "architectures", [None])[0] != GPT_OSS:
        raise ValueError(f"{folder} holds MXFP4 weights of {getattr(hf, 'architectures', ['?'])[0]}; Loom reads "
                         f"MXFP4 experts of {GPT_OSS} only")
    if method not in QUANTIZATION_METHODS:
        raise ValueError(f"{folder} holds weights quantized with {method!r}, which Loom does not load (it reads "
                         f"{', '.join(QUANTIZATION_METHODS[:-1])}): serve the unquantized checkpoint (with "
                         "--quantization int8 for int8 weights) or a GGUF file")
    block = quant.get("weight_block_size")
    if method == "compressed-tensors" and not _integer_groups(quant):  # the integer schemes: int_quant_config
        for group in (quant.get("config_groups") or {}).values():
            weights = group.get("weights") or {}
            if weights.get("type") != "float" or weights.get("num_bits") != 8:
                raise ValueError(f"{folder} holds compressed-tensors weights of {weights.get('num_bits')}-bit "
                                 f"{weights.get('type')} (format {quant.get('format')!r}), which Loom does not load "
                                 "(it reads the FP8 schemes): serve the unquantized checkpoint or a GGUF file")
            block = block or weights.get("block_structure")
    return tuple(int(n) for n in block) if block else None


def _check_complete(params: dict, filled: dict[str, int], folder: Path) -> None:
    expected = {name: _parts(name) for name in params}
    missing = [n for n, count in expected.items() if filled.get(n, 0) < count]
    if missing:
        raise ValueError(f"checkpoint in {folder} lacks weights for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
