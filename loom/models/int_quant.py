"""Integer weight-only checkpoints: GPTQ (AutoGPTQ / GPTQModel / optimum, 4- and 8-bit), AWQ (AutoAWQ's "gemm"
layout, 4-bit) and compressed-tensors' "pack-quantized" format (llm-compressor's W4A16 / W8A16), the quantized HF
folders on the hub (``Qwen2.5-7B-Instruct-AWQ``, ``...-GPTQ-Int4``, RedHatAI's ``...-quantized.w4a16``). All store

    w[n, k] = scale[n, g(k)] * (q[n, k] - zero[n, g(k)])

with q and zero packed eight 4-bit (or four 8-bit) values to an int32 and one float16 scale per output feature and
group of ``group_size`` inputs. Loom reads them into ``IntWeights`` and cuts them into blocks of 32 inputs that each
lie in one group (``as_blocks``; GGUF's block size, which every usual group size is a multiple of), kept quantized for
the kernels GGUF files run on, with exactly the checkpoint's weights:

- on CPU with int8 activations (the default), the C++ int8 kernels' tiles: Q4_0's and Q8_0's where the checkpoint
  is symmetric (every zero 8 or 128: GPTQ's ``sym``), else Q4_K's and Q5_K's tile formats (4- or 8-bit unsigned
  quants, a float32 scale and min per 32: AWQ, GPTQ ``sym: false``);
- on CUDA (or with the triton backend), Triton's dequant-matmul over the same ``BlockQuants``;
- on CPU with float32 activations (``LOOM_GGUF_ACTIVATIONS=float32``), GGUF blocks (``gguf_rows``): Q4_0 and Q8_0
  exactly, Q4_1 with the min rounded to float16 (off by at most zero · 2^-11 of a quantization step: 0.8% for a
  zero of 16, 0.4% for 8).

Groups that do not fill whole 32-input blocks, 8-bit weights with mins on the float32-activation path, and a float
model dtype on CPU (bfloat16) load as float weights (``IntWeights.dequantize``). The layouts:

- GPTQ: ``qweight`` int32 [in / pack, out] packed along the inputs, lowest bits first; ``qzeros`` int32
  [groups, out / pack] packed along the outputs; ``scales`` [groups, out]; ``g_idx`` int32 [in] the group of each
  input (``desc_act``, "act-order", permutes it: the inputs are then reordered at load so that groups are contiguous,
  and the layer gathers its input columns in that order, as exllama's kernels do). The "gptq" (v1) checkpoint format
  stores each zero minus one (AutoGPTQ's convention; a zero of 0 reads back as 2^bits, as AutoGPTQ's and vLLM's
  kernels read it); "gptq_v2" stores it as it is.
- AWQ (``version: "gemm"``): ``qweight`` int32 [in, out / 8] and ``qzeros`` [groups, out / 8], both packed along the
  outputs in AutoAWQ's interleaved order (nibble i holds output ``AWQ_ORDER[i]`` of its eight); ``scales``
  [groups, out]; groups contiguous.
- compressed-tensors: see ``read_compressed_tensors``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from loom.ops.quantized import BlockQuants, GGMLType

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
"""AutoAWQ's packing: nibble i of an int32 (bits 4i to 4i + 3) holds output column ``AWQ_ORDER[i]`` of its eight."""
SUFFIXES = {"gptq": (".qweight", ".qzeros", ".scales", ".g_idx"), "awq": (".qweight", ".qzeros", ".scales"),
            "compressed-tensors": (".weight_packed", ".weight_scale", ".weight_zero_point", ".weight_g_idx",
                                   ".weight_shape")}
"""Each method's tensors of one quantized linear, the first its packed weights (``<module>.qweight``; the others
its companions; biases keep ``.bias``)."""
OPTIONAL_SUFFIXES = (".g_idx", ".weight_g_idx", ".weight_zero_point", ".weight_shape")
"""Companions a checkpoint may leave out: the trivial group order, a symmetric scheme's zero points, the shape."""


@dataclass(frozen=True)
class IntQuantConfig:
    """What a GPTQ or AWQ ``quantization_config`` says about its tensors."""

    method: str
    """"gptq", "awq" or "compressed-tensors" (its "pack-quantized" format)."""
    bits: int
    group_size: int
    """Inputs per group; -1: one group per output feature (the whole row)."""
    zero_offset: int
    """Added to each stored zero: 1 for GPTQ's v1 format, else 0."""


def int_quant_config(quant: dict, folder) -> IntQuantConfig:
    """Validate a GPTQ / AWQ / compressed-tensors integer ``quantization_config`` (a dict) and return what the loader
    needs, or raise a ``ValueError`` that says what Loom reads."""
    method = str(quant.get("quant_method")).lower()
    if method == "compressed-tensors":
        return _compressed_tensors_config(quant, folder)
    try:
        bits = int(quant.get("bits", quant.get("w_bit", 4)))
        group = int(quant.get("group_size", quant.get("q_group_size", 128)))
    except (TypeError, ValueError):
        raise ValueError(f"{folder}'s {method} config gives bits {quant.get('bits')!r} and group_size "
                         f"{quant.get('group_size')!r}; both must be whole numbers") from None
    if group != -1 and (group <= 0 or group % 32):
        raise ValueError(f"{folder} holds {method} weights in groups of {group} inputs; Loom reads groups of a "
                         "multiple of 32 inputs (or -1, one per row): serve the unquantized checkpoint or a GGUF file")
    if method == "awq":
        version = str(quant.get("version", "gemm")).lower()
        if version != "gemm" or bits != 4:
            raise ValueError(f"{folder} holds {bits}-bit AWQ weights in the {version!r} layout; Loom reads AutoAWQ's "
                             "4-bit 'gemm' layout (what the hub's AWQ models ship): serve the unquantized checkpoint "
                             "or a GGUF file")
        if quant.get("zero_point") is False:
            raise ValueError(f"{folder} holds AWQ weights without zero points, which Loom does not read")
        return IntQuantConfig("awq", 4, group, 0)
    fmt = str(quant.get("checkpoint_format") or quant.get("format") or "gptq").lower()
    if fmt not in ("gptq", "gptq_v2") or bits not in (4, 8):
        raise ValueError(f"{folder} holds {bits}-bit GPTQ weights in the {fmt!r} format; Loom reads the 4- and 8-bit "
                         "'gptq' and 'gptq_v2' formats: serve the unquantized checkpoint or a GGUF file")
    if any(not str(rule).startswith("-:") for rule in quant.get("dynamic") or {}):
        # "-:" rules only leave modules unquantized (float weights, which load as any); others change bits or groups
        raise ValueError(f"{folder}'s GPTQ config has per-module overrides ('dynamic'), which Loom does not read: "
                         "serve the unquantized checkpoint or a GGUF file")
    if str(quant.get("pack_dtype", "int32")).removeprefix("torch.") != "int32":
        raise ValueError(f"{folder} packs its GPTQ weights in {quant['pack_dtype']} words; Loom reads int32 ones")
    return IntQuantConfig("gptq", bits, group, 1 if fmt == "gptq" else 0)


def _compressed_tensors_config(quant: dict, folder) -> IntQuantConfig:
    """compressed-tensors' weight-only integer schemes in its "pack-quantized" format (llm-compressor's W4A16 and
    W8A16: RedHatAI's ``*-quantized.w4a16``): one scheme for every quantized module, group or channel strategy."""
    schemes = set()
    for name, group in (quant.get("config_groups") or {}).items():
        weights = group.get("weights") or {}
        fmt = group.get("format") or quant.get("format")
        strategy = weights.get("strategy")
        size = int(weights.get("group_size") or -1) if strategy == "group" else -1
        if (weights.get("type") != "int" or weights.get("num_bits") not in (4, 8) or fmt != "pack-quantized"
                or strategy not in ("group", "channel") or weights.get("dynamic")
                or group.get("input_activations") is not None):
            raise ValueError(f"{folder} holds compressed-tensors weights of scheme {name!r} ({weights.get('num_bits')}"
                             f"-bit {weights.get('type')}, strategy {strategy!r}, format {fmt!r}, input activations "
                             f"{'quantized' if group.get('input_activations') else 'not quantized'}), which Loom does "
                             "not load: it reads weight-only 4- and 8-bit integers in the 'pack-quantized' format "
                             "(group or channel strategy) and the FP8 schemes; serve the unquantized checkpoint or a "
                             "GGUF file")
        if size != -1 and size % 32:
            raise ValueError(f"{folder} holds compressed-tensors weights in groups of {size} inputs; Loom reads groups "
                             "of a multiple of 32 inputs: serve the unquantized checkpoint or a GGUF file")
        # zeros are stored only for asymmetric schemes: a symmetric one's is the middle level
        schemes.add((int(weights["num_bits"]), size, bool(weights.get("symmetric", True))))
    if len(schemes) != 1:
        raise ValueError(f"{folder} quantizes its modules with {len(schemes) or 'no'} different integer schemes; Loom "
                         "reads one: serve the unquantized checkpoint or a GGUF file")
    bits, size, _ = schemes.pop()
    return IntQuantConfig("compressed-tensors", bits, size, 0)


@dataclass
class IntWeights:
    """One linear's integer weights in Loom's orientation (``nn.Linear``'s [out, in]):
    w[n, k] = scale[n, group[k]] * (q[n, k] - zero[n, group[k]])."""

    q: torch.Tensor
    """[out, in] uint8."""
    zero: torch.Tensor
    """[out, groups] int16."""
    scale: torch.Tensor
    """[out, groups] as stored (float16; compressed-tensors: the model's dtype)."""
    group: torch.Tensor
    """[in] int64: each input's group."""
    bits: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def rows(self, index) -> IntWeights:
        """The weights of some output features (a slice or an index tensor)."""
        return IntWeights(self.q[index], self.zero[index], self.scale[index], self.group, self.bits)

    def columns(self, index) -> IntWeights:
        """The weights of some inputs (a tensor-parallel rank's columns)."""
        return IntWeights(self.q[:, index], self.zero, self.scale, self.group[index], self.bits)

    def scaled(self, factor: float) -> IntWeights:
        """w times ``factor`` (Granite's residual multiplier), folded into the scales (in float32)."""
        return IntWeights(self.q, self.zero, self.scale.float() * factor, self.group, self.bits)

    def dequantize(self) -> torch.Tensor:
        """w as float32 [out, in]."""
        g = self.group
        return self.scale.float()[:, g] * (self.q.to(torch.int16) - self.zero[:, g]).float()


def _unpack(words: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """int32 [..., m] -> int16 [..., m * 32 / bits]: the fields of each word, lowest bits first (``order``: field i
    holds value ``order[i]`` of its word's)."""
    per_word = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    if order is not None:  # value j sits in field order.index(j)
        shifts = shifts[torch.tensor([order.index(j) for j in range(per_word)])]
    fields = (words.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return fields.flatten(-2).to(torch.int16)


def read_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
              config: IntQuantConfig) -> IntWeights:
    """One GPTQ linear's tensors (as stored) as ``IntWeights``; ``g_idx`` None: contiguous groups."""
    bits = config.bits
    q = _unpack(qweight.t(), bits)  # packed along the inputs: [out, in / pack] words -> [out, in]
    out_features, in_features = q.shape
    zero = _unpack(qzeros, bits)[:, :out_features].t() + config.zero_offset  # [groups, out] -> [out, groups]
    group = _groups(in_features, config) if g_idx is None else g_idx.to(torch.int64)
    return _checked(IntWeights(q.to(torch.uint8).contiguous(), zero.contiguous(), scales.t().contiguous(), group,
                               bits), "GPTQ")


def read_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, config: IntQuantConfig) -> IntWeights:
    """One AWQ ("gemm") linear's tensors (as stored) as ``IntWeights``."""
    q = _unpack(qweight, 4, AWQ_ORDER).t()  # [in, out]: packed along the outputs
    zero = _unpack(qzeros, 4, AWQ_ORDER).t()
    return _checked(IntWeights(q.to(torch.uint8).contiguous(), zero.contiguous(), scales.t().contiguous(),
                               _groups(q.shape[1], config), 4), "AWQ")


def read_compressed_tensors(packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                            g_idx: torch.Tensor | None, shape: torch.Tensor | None,
                            config: IntQuantConfig) -> IntWeights:
    """One compressed-tensors "pack-quantized" linear's tensors (as stored) as ``IntWeights``: ``weight_packed``
    int32 [out, ceil(in / pack)] packed along the inputs, lowest bits first, each value stored plus 2^(bits - 1) (its
    signed quant made unsigned); ``weight_zero_point`` (asymmetric only) int32 [ceil(out / pack), groups] packed along
    the outputs, stored the same way; ``weight_scale`` [out, groups]; ``weight_g_idx`` [in] (activation order; -1s:
    none); ``weight_shape`` [out, in]. w = scale (q_signed - zero_signed) = scale (q - zero) in the stored values."""
    bits = config.bits
    q = _unpack(packed, bits)
    out_features = q.shape[0]
    in_features = int(shape[1]) if shape is not None else q.shape[1]
    q = q[:, :in_features]
    groups = scale.shape[1] if scale.dim() == 2 else 1
    if zero_point is None:  # symmetric: zero_signed 0, the middle level stored
        zero = torch.full((out_features, groups), 1 << (bits - 1), dtype=torch.int16)
    else:
        zero = _unpack(zero_point.t(), bits).t()[:out_features]
    if g_idx is None or bool((g_idx < 0).any()):
        group = _groups(in_features, config)
    else:
        group = g_idx.to(torch.int64)
    return _checked(IntWeights(q.to(torch.uint8).contiguous(), zero.contiguous(),
                               scale.reshape(out_features, groups).contiguous(), group, bits), "compressed-tensors")


def _groups(in_features: int, config: IntQuantConfig) -> torch.Tensor:
    if config.group_size == -1:
        return torch.zeros(in_features, dtype=torch.int64)
    return torch.arange(in_features) // config.group_size


def _checked(w: IntWeights, method: str) -> IntWeights:
    out_features, groups = w.scale.shape
    if w.zero.shape != (out_features, groups) or w.q.shape[0] != out_features or w.group.shape != (w.q.shape[1],):
        raise ValueError(f"{method} tensors do not fit together: weights {tuple(w.q.shape)}, zeros "
                         f"{tuple(w.zero.shape)}, scales {tuple(w.scale.shape)}, groups {tuple(w.group.shape)}")
    if w.group.numel() and (w.group.min() < 0 or w.group.max() >= groups):
        raise ValueError(f"{method} g_idx names group {int(w.group.max())} of {groups}")
    return w


@dataclass
class Blocks:
    """``IntWeights`` over blocks of 32 inputs, the inputs taken in ``order`` (None: as they come) so that each
    block lies in one group: block b of row n is scale[n, b] * (q[n, 32 b : 32 b + 32] - zero[n, b])."""

    q: torch.Tensor
    """[out, in] uint8."""
    scale: torch.Tensor
    """[out, in / 32] float32."""
    zero: torch.Tensor
    """[out, in / 32] int16."""
    order: torch.Tensor | None
    bits: int


def as_blocks(w: IntWeights) -> Blocks | None:
    """``w`` over 32-input blocks, or None where its groups do not fill whole blocks (groups of other sizes, or
    act-order groups cut by a tensor-parallel rank's columns)."""
    out_features, in_features = w.q.shape
    if in_features % 32:
        return None
    order = torch.argsort(w.group, stable=True)
    blocks = w.group[order].reshape(-1, 32)
    if not bool((blocks == blocks[:, :1]).all()):  # a block would straddle two groups
        return None
    first = blocks[:, 0]  # each block's group
    identity = bool(torch.equal(order, torch.arange(in_features)))
    return Blocks(w.q[:, order].to(torch.uint8), w.scale.float()[:, first], w.zero[:, first],
                  None if identity else order, w.bits)


def block_quants(parts: list[Blocks]) -> BlockQuants:
    """Blocks of one or more parts (stacked rows over the same inputs) as the ``BlockQuants`` Loom's kernels take:
    symmetric (every zero the middle level, 8 or 128, and every scale a float16: Q4_0's and Q8_0's arithmetic,
    d (q - zero)) or with a float32 min per block (m = -d zero: w = d q + m) — exactly the weights either way."""
    bits = parts[0].bits
    middle = 1 << (bits - 1)
    q, scale, zero = (torch.cat([getattr(p, f) for p in parts]) for f in ("q", "scale", "zero"))
    half = scale.to(torch.float16)
    if bool((zero == middle).all()) and bool(torch.isfinite(half).all()) and torch.equal(half.float(), scale):
        return BlockQuants(q, half, None, zero=middle, group=32, bits=bits)
    return BlockQuants(q, scale, -scale * zero.float(), zero=0, group=32, bits=bits)


def gguf_rows(bq: BlockQuants) -> tuple[int, np.ndarray] | None:
    """``block_quants``' result as GGUF blocks (type, [out, row bytes] uint8), for the float32-activation CPU kernels
    that read them: Q4_0 and Q8_0 (symmetric: the same weights), Q4_1 (4-bit with mins: d and m rounded to float16,
    up to zero · 2^-11 of a quantization step); None for 8-bit with mins, or scales float16 cannot hold."""
    out_features = bq.q.shape[0]
    q = bq.q.reshape(out_features, -1, 32)
    d = bq.scale.to(torch.float16)
    if not bool(torch.isfinite(d).all()):
        return None
    if bq.offset is None and bq.bits == 4:
        qtype, body, head = GGMLType.Q4_0, _nibble_bytes(q), [d]
    elif bq.offset is None:
        qtype, body, head = GGMLType.Q8_0, (q.to(torch.int16) - 128).to(torch.int8).view(torch.uint8), [d]
    elif bq.bits == 4:
        m = bq.offset.to(torch.float16)
        if not bool(torch.isfinite(m).all()):
            return None
        qtype, body, head = GGMLType.Q4_1, _nibble_bytes(q), [d, m]
    else:
        return None
    halves = [h.contiguous().view(torch.uint8).reshape(out_features, -1, 2) for h in head]
    return int(qtype), torch.cat([*halves, body], dim=-1).reshape(out_features, -1).numpy()


def _nibble_bytes(q: torch.Tensor) -> torch.Tensor:
    """[..., 32] quants 0-15 -> [..., 16] bytes, ggml's order: byte j holds weight j (low) and j + 16 (high)."""
    return q[..., :16] | (q[..., 16:] << 4)


class GatheredInputs(nn.Module):
    """A linear over its inputs taken in ``order`` (GPTQ's act-order: the layer's weights were stored with their
    inputs permuted so that each quantization group is contiguous): y = layer(x[..., order])."""

    def __init__(self, layer: nn.Module, order: torch.Tensor):
        super().__init__()
        self.layer = layer
        self.register_buffer("order", order.to(torch.int64), persistent=False)
        self.in_features, self.out_features = layer.in_features, layer.out_features

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.layer, "bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x.index_select(-1, self.order))

    def dequantize(self) -> torch.Tensor:
        """W over the inputs in their own order."""
        weight = self.layer.dequantize()
        out = torch.empty_like(weight)
        out[:, self.order.to(weight.device)] = weight
        return out

    @property
    def nbytes(self) -> int:
        return self.layer.nbytes
