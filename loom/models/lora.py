"""LoRA adapters served unmerged, several in one step (S-LoRA / Punica's idea, on plain matmuls).

    weights = load_peft_adapter("out/adapter", model.config, max_rank=16, dtype=torch.float32)
    lora = LoRAModel(model, max_loras=4, max_rank=16)     # wraps every projection of every layer
    lora.load(slot=0, weights=weights)
    lora.batch.set([(0, 5, 0)], num_rows=5, dense=False, device="cpu")  # rows 0..4 of the next forward: slot 0
    hidden = model(input_ids, positions, kv_caches, meta)

An adapter is the folder peft (and ``loom finetune --lora``) writes: ``adapter_config.json`` +
``adapter_model.safetensors``. Its per-projection A [r, in] / B [out, r] pairs are laid out to match Loom's fused
projections: q/k/v land in ``qkv_proj`` and gate/up in ``gate_up_proj``, each at its own output rows and its own
columns of the rank dimension (so B is block-diagonal), and the scale (alpha / r, or alpha / sqrt(r) with rsLoRA) is
folded into B. Every wrapped projection holds ``max_loras`` such slots, zero past each adapter's rank.

A step's rows are grouped by adapter (the model runner orders them so), and each group adds its own low-rank delta
to the base projection: ``y[rows] += (x[rows] @ A^T) @ B^T``, two small matmuls per adapter and projection; a
decode batch spread over several adapters does the same for all slots at once with a per-row mask (``LoRABatch``).
Rows of the base model (or an adapter that skips a projection) add nothing; the base weights are never changed.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from loom.distributed.parallel import HeadShard
from loom.models.llama import LlamaConfig, LlamaForCausalLM, qkv_load_order
from loom.ops.packed_linear import PackedLinear

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<prefix>model\.|model\.language_model\.|language_model\.model\.|"
                  r"model\.text_model\.)"
                  r"layers\.(?P<layer>\d+)\.(?P<block>self_attn|mlp)\.(?P<proj>\w+)\.lora_(?P<ab>[AB])\.weight$")
"""A peft tensor of a text model's layer (``model.layers...``), or of a vision model's language model (LLaVA's and
Qwen2-VL's in transformers 5: ``model.language_model.layers...``; LLaVA's in 4.x: ``language_model.model.layers...``;
Idefics3's: ``model.text_model.layers...``)."""


def projection_slices(cfg: LlamaConfig) -> dict[str, dict[str, tuple[int, int]]]:
    """Loom projection -> {peft module name: (first output row, rows)}: where each HF projection sits in the fused
    one. A checkpoint that is fused already (Phi-3's ``qkv_proj``) targets the whole projection."""
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    inter, hidden = cfg.intermediate_size, cfg.hidden_size
    return {
        "self_attn.qkv_proj": {"q_proj": (0, q), "k_proj": (q, kv), "v_proj": (q + kv, kv),
                               "qkv_proj": (0, q + 2 * kv)},
        "self_attn.o_proj": {"o_proj": (0, hidden)},
        "mlp.gate_up_proj": {"gate_proj": (0, inter), "up_proj": (inter, inter), "gate_up_proj": (0, 2 * inter)},
        "mlp.down_proj": {"down_proj": (0, hidden)},
    }


def _parts(slices: dict[str, tuple[int, int]]) -> int:
    """How many separate HF projections share this Loom projection (its rank room is that many times max_rank)."""
    return max(1, len(slices) - 1)


@dataclass(slots=True)
class LoRAWeights:
    """One adapter in Loom's fused layout, in host or device memory, ready to copy into a slot."""

    name: str
    max_rank: int
    """The largest r among its projections."""
    layers: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=list)
    """Per layer: Loom projection -> (A [R, in], B^T [R, out]) with the scale folded into B; R is the packed rank."""
    full: LoRAWeights | None = None
    """On a tensor-parallel rank 0: the whole adapter on the CPU, which the other ranks cut their parts from."""

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> LoRAWeights:
        layers = [{name: (a.to(device, dtype).contiguous(), bt.to(device, dtype).contiguous())
                   for name, (a, bt) in pairs.items()} for pairs in self.layers]
        return LoRAWeights(self.name, self.max_rank, layers)


def read_adapter_config(folder: Path) -> dict:
    path = folder / ADAPTER_CONFIG
    if not path.is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
        raise ValueError(f"a LoRA adapter folder holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} (what peft and "
                         "`loom finetune --lora` write under OUTPUT/adapter); this folder does not")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{ADAPTER_CONFIG} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{ADAPTER_CONFIG} must hold a JSON object")
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}, not LORA")
    if config.get("use_dora"):
        problems.append("DoRA (use_dora) is not supported")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append("trained biases (bias / lora_bias) are not supported")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save {config['modules_to_save']} (fully trained modules) are not supported; "
                        "serve the merged export instead")
    if config.get("fan_in_fan_out"):
        problems.append("fan_in_fan_out (Conv1D layers) is not supported")
    if problems:
        raise ValueError("this adapter cannot be served unmerged: " + "; ".join(problems))
    return config


def load_peft_adapter(folder: str | Path, cfg: LlamaConfig, max_rank: int, dtype: torch.dtype,
                      device: torch.device | str = "cpu", name: str | None = None) -> LoRAWeights:
    """Read a peft LoRA folder and lay it out for ``cfg``'s fused projections; ValueError says what does not fit."""
    from safetensors import safe_open  # local: only adapters need it here

    folder = Path(folder)
    config = read_adapter_config(folder)
    alpha = float(config.get("lora_alpha", 8))
    alpha_pattern = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora", False))
    slices = projection_slices(cfg)
    allowed = {f"{loom.split('.')[0]}.{hf}" for loom, parts in slices.items() for hf in parts}
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    prefix = "model."  # where the layers sit in the trained model (peft's alpha_pattern names modules from there)
    with safe_open(str(folder / ADAPTER_WEIGHTS), framework="pt") as f:
        for key in f.keys():
            m = _KEY.match(key)
            if m is None or f"{m['block']}.{m['proj']}" not in allowed:
                raise ValueError(f"adapter tensor {key!r} targets a module Loom cannot serve unmerged (LoRA on the "
                                 "attention and MLP projections only)")
            layer = int(m["layer"])
            if layer >= cfg.num_hidden_layers:
                raise ValueError(f"adapter tensor {key!r} is for layer {layer}, but the model has "
                                 f"{cfg.num_hidden_layers} layers: the adapter was trained for another model")
            if m["block"] == "self_attn" and cfg.kv_lora_rank and m["proj"] != "o_proj":
                raise ValueError(f"adapter tensor {key!r} targets {m['proj']} of DeepSeek's latent attention, which "
                                 "Loom holds as its own projections (q_a_proj, kv_a_proj_with_mqa, ...): LoRA there "
                                 "is not served unmerged (o_proj and dense MLPs are); merge the adapter into the "
                                 "weights instead")
            if m["block"] == "mlp" and layer in cfg.moe_layers:
                raise ValueError(f"adapter tensor {key!r} targets the MLP of layer {layer}, a mixture of experts in "
                                 "this model: LoRA on experts is not served (the attention projections and dense "
                                 "MLPs are): the adapter was trained for another model")
            prefix = m["prefix"]
            pairs.setdefault((layer, m["proj"]), {})[m["ab"]] = f.get_tensor(key)
    if not pairs:
        raise ValueError(f"{ADAPTER_WEIGHTS} holds no LoRA tensors")
    weights = LoRAWeights(name or folder.name, 0, [{} for _ in range(cfg.num_hidden_layers)])
    in_features = _in_features(cfg)
    qkv_order = qkv_load_order(cfg)
    for layer in range(cfg.num_hidden_layers):
        for loom_name, parts in slices.items():
            found = [(hf, pairs[(layer, hf)]) for hf in parts if (layer, hf) in pairs]
            if not found:
                continue
            a_rows, b_cols, width = [], [], parts_out(parts)
            for hf, ab in found:
                if set(ab) != {"A", "B"}:
                    raise ValueError(f"layer {layer} {hf}: the adapter has lora_{'A' if 'A' not in ab else 'B'} "
                                     "missing")
                a, b = ab["A"].float(), ab["B"].float()
                r = a.shape[0]
                row0, rows = parts[hf]
                if a.shape != (r, in_features[loom_name]) or b.shape != (rows, r):
                    raise ValueError(f"layer {layer} {hf}: adapter shapes A {tuple(a.shape)} / B {tuple(b.shape)} "
                                     f"do not fit this model (expected A [r, {in_features[loom_name]}], B [{rows}, r]):"
                                     " the adapter was trained for another model")
                if r > max_rank:
                    raise ValueError(f"the adapter's rank {r} (layer {layer} {hf}) exceeds max_lora_rank {max_rank};"
                                     f" raise --max-lora-rank to at least {r}")
                a_alpha = float(_pattern_value(alpha_pattern, f"{prefix}layers.{layer}.{loom_name.split('.')[0]}.{hf}",
                                               alpha))
                scale = a_alpha / (math.sqrt(r) if rslora else r)
                if loom_name in ("self_attn.o_proj", "mlp.down_proj"):  # Granite: folded as into the base weights
                    scale *= cfg.residual_multiplier
                if qkv_order is not None and loom_name == "self_attn.qkv_proj":  # rows as the base's (partial rotary)
                    b = b[qkv_order[row0:row0 + rows] - row0]
                bt = torch.zeros(r, width)
                bt[:, row0:row0 + rows] = (b * scale).t()
                a_rows.append(a)
                b_cols.append(bt)
                weights.max_rank = max(weights.max_rank, r)
            weights.layers[layer][loom_name] = (torch.cat(a_rows).to(device, dtype).contiguous(),
                                                torch.cat(b_cols).to(device, dtype).contiguous())
    return weights


def shard_adapter(weights: LoRAWeights, cfg: LlamaConfig, shard: HeadShard) -> LoRAWeights:
    """A tensor-parallel rank's part of an adapter laid out for the whole model ``cfg``: as the base weights are cut
    (``loom.distributed.parallel``), B's columns of q/k/v and gate/up (column-parallel) and A's input columns of
    o_proj and down_proj (row-parallel: the rank's partial delta joins its partial output before the all-reduce,
    which sums x A^T B^T over the ranks' columns)."""
    d, inter = cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    q_rows, kv_rows, mlp_rows = shard.q_rows(d), shard.kv_rows(d), slice(*shard.intermediate)

    def run(r: slice, offset: int = 0) -> torch.Tensor:
        return torch.arange(r.start + offset, r.stop + offset)

    b_columns = {"self_attn.qkv_proj": torch.cat([run(q_rows), run(kv_rows, q), run(kv_rows, q + kv)]),
                 "mlp.gate_up_proj": torch.cat([run(mlp_rows), run(mlp_rows, inter)])}
    a_columns = {"self_attn.o_proj": shard.q_rows(cfg.head_output_dim()), "mlp.down_proj": mlp_rows}
    layers = []
    for pairs in weights.layers:
        local = {}
        for name, (a, bt) in pairs.items():
            if name in b_columns:
                bt = bt[:, b_columns[name].to(bt.device)]
            else:
                a = a[:, a_columns[name]]
            local[name] = (a.contiguous(), bt.contiguous())
        layers.append(local)
    return LoRAWeights(weights.name, weights.max_rank, layers)


def parts_out(parts: dict[str, tuple[int, int]]) -> int:
    return max(start + rows for start, rows in parts.values())


def _pattern_value(pattern: dict, module: str, default):
    """peft's per-module override: the first key that names the module or a suffix of it."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def _in_features(cfg: LlamaConfig) -> dict[str, int]:
    attn = cfg.num_attention_heads * cfg.head_output_dim()
    return {"self_attn.qkv_proj": cfg.hidden_size, "self_attn.o_proj": attn, "mlp.gate_up_proj": cfg.hidden_size,
            "mlp.down_proj": cfg.intermediate_size}


@dataclass(slots=True)
class LoRABatch:
    """The step's rows by adapter, set before each forward (``set``).

    Two ways to add the deltas, chosen per step: by groups, two matmuls per adapter group and projection (exact work;
    best for few groups or long prefills), or dense, two matmuls over every slot at once with each row's columns of
    other slots masked to zero (a decode batch spread over many adapters: a few larger matmuls instead of many tiny
    ones, which on CPU cost far more in dispatch than in arithmetic)."""

    segments: list[tuple[int, int, int]] = field(default_factory=list)
    """(first row, end row, slot) of each group; rows in no group run the base model alone."""
    row_slots: torch.Tensor | None = None
    """[T] slot of each row (-1: base), set only for a dense step."""
    _masks: dict = field(default_factory=dict)

    def set(self, segments: list[tuple[int, int, int]], num_rows: int, dense: bool, device) -> None:
        self.segments = segments
        self._masks = {}
        self.row_slots = None
        if dense:
            slots = torch.full((num_rows,), -1, dtype=torch.long)
            for start, end, slot in segments:
                slots[start:end] = slot
            self.row_slots = slots.to(device)

    def mask(self, num_slots: int, room: int, dtype: torch.dtype) -> torch.Tensor:
        """[T, num_slots * room]: 1 where a column belongs to the row's own slot."""
        key = (num_slots, room, dtype)
        if key not in self._masks:
            column_slot = torch.arange(num_slots * room, device=self.row_slots.device) // room
            self._masks[key] = (column_slot[None, :] == self.row_slots[:, None]).to(dtype)
        return self._masks[key]


class LoRALinear(nn.Module):
    """A projection (``nn.Linear`` or a packed one) plus ``max_loras`` adapter slots applied per row group."""

    def __init__(self, base: nn.Module, in_features: int, out_features: int, max_loras: int, rank_room: int,
                 batch: LoRABatch, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.base = base
        self.batch = batch
        self.lora_a = torch.zeros(max_loras, rank_room, in_features, dtype=dtype, device=device)
        self.lora_bt = torch.zeros(max_loras, rank_room, out_features, dtype=dtype, device=device)
        self.ranks = [0] * max_loras
        self._packed: tuple[PackedLinear, PackedLinear] | None = None
        """Every slot's A and B packed for the CPU matmul kernels (when the base projection is packed too): the
        dense path's two matmuls then run ~1.7x faster than torch's on these skinny shapes. Rebuilt after a slot
        changes."""

    def set_slot(self, slot: int, pair: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Copy (A, B^T) into ``slot``, zeros past its rank (the dense path reads the whole slot); None empties it."""
        r = 0 if pair is None else pair[0].shape[0]
        if pair is not None:
            self.lora_a[slot, :r].copy_(pair[0])
            self.lora_bt[slot, :r].copy_(pair[1])
        self.lora_a[slot, r:].zero_()
        self.lora_bt[slot, r:].zero_()
        self.ranks[slot] = r
        self._packed = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.batch.row_slots is not None:
            return self._dense(x, y)
        for start, end, slot in self.batch.segments:
            r = self.ranks[slot]
            if r:
                y[start:end].addmm_(x[start:end] @ self.lora_a[slot, :r].t(), self.lora_bt[slot, :r])
        return y

    def _dense(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        slots, room, _ = self.lora_a.shape
        a, bt = self.lora_a.view(slots * room, -1), self.lora_bt.view(slots * room, -1)
        if isinstance(self.base, PackedLinear):
            if self._packed is None:
                self._packed = (PackedLinear(a, None), PackedLinear(bt.t(), None))
            xa = self._packed[0](x)
            xa.mul_(self.batch.mask(slots, room, xa.dtype))
            return y.add_(self._packed[1](xa))
        xa = x @ a.t()
        xa.mul_(self.batch.mask(slots, room, xa.dtype))
        return y.addmm_(xa, bt)


class LoRAModel:
    """Wraps every attention and MLP projection of ``model`` in a ``LoRALinear`` with ``max_loras`` slots (a
    mixture-of-experts layer's attention only: its experts take no adapter)."""

    def __init__(self, model: LlamaForCausalLM, max_loras: int, max_rank: int):
        if max_loras < 1 or max_rank < 1:
            raise ValueError(f"max_loras and max_lora_rank must be >= 1, got {max_loras} and {max_rank}")
        cfg = model.config
        self.config = cfg
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.batch = LoRABatch()
        self.slots: list[LoRAWeights | None] = [None] * max_loras
        weight = model.embed_tokens.weight
        slices, in_features = projection_slices(cfg), _in_features(cfg)
        self.layers: list[dict[str, LoRALinear]] = []
        for index, layer in enumerate(model.layers):
            wrapped = {}
            for name, parts in slices.items():
                parent_name, attr = name.split(".")
                if parent_name == "mlp" and index in cfg.moe_layers or not hasattr(getattr(layer, parent_name), attr):
                    continue  # experts; DeepSeek's latent attention has no fused q/k/v
                parent = getattr(layer, parent_name)
                module = LoRALinear(getattr(parent, attr), in_features[name], parts_out(parts), max_loras,
                                    _parts(parts) * max_rank, self.batch, weight.dtype, weight.device)
                setattr(parent, attr, module)
                wrapped[name] = module
            self.layers.append(wrapped)

    def load(self, slot: int, weights: LoRAWeights) -> None:
        """Copy an adapter into ``slot`` (projections it does not train get rank 0 there)."""
        if weights.max_rank > self.max_rank:
            raise ValueError(f"the adapter's rank {weights.max_rank} exceeds max_lora_rank {self.max_rank}")
        for modules, pairs in zip(self.layers, weights.layers, strict=True):
            for name, module in modules.items():
                module.set_slot(slot, pairs.get(name))
        self.slots[slot] = weights

    def clear(self, slot: int) -> None:
        for modules in self.layers:
            for module in modules.values():
                module.set_slot(slot, None)
        self.slots[slot] = None
