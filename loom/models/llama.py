"""The Llama family in PyTorch over flat token batches and a paged KV cache.

Covers Llama 2/3 (incl. Llama-3 rope scaling), SmolLM2, SmolLM3 (layers without rotary: NoPE), Granite (embedding,
attention, residual and logit multipliers), OLMo 2 (norms after attention and MLP, none before; q/k norms over all
heads), Mistral, Phi-3 (fused qkv / gate_up checkpoints; default rope only), Qwen2
(q/k/v bias), Qwen3 (RMSNorm on q and k per head) and the mixtures of experts Mixtral, Qwen2-MoE (shared expert) and
Qwen3-MoE (``SparseMoE``), gpt-oss (attention sinks, a router with a bias that picks the top k before its
softmax, experts with biases and a clamped SwiGLU) and GLM-4.5 (DeepSeek-V3's sigmoid router with expert groups, an
ungated shared expert, half-rotary heads): RMSNorm, RoPE, grouped-query attention, SwiGLU, tied or untied
embeddings; sliding-window layers (Mistral, Phi-3; Gemma's alternate layers) masked in the paged attention; and
Gemma 2 / 3: RMSNorm of (1 + weight), GeGLU, scaled embeddings, norms on the attention's and the MLP's outputs,
attention and final-logit soft-capping (Gemma 2), q/k norms and a separate rotary base for the sliding layers
(Gemma 3); DeepSeek-V2 / V3's multi-head latent attention (``LatentAttention``: the cache holds one compressed
latent per token, which the heads read through their absorbed projections) with their routers.

Tokens of all sequences in a step are one flat batch [T, D]; attention finds each sequence's keys through
``AttentionMetadata``. q/k/v and gate/up are fused into single matmuls at load time; everything between the matmuls
goes through ``model.ops`` (``loom.ops.layers``), which the engine points at fused kernels where it can. The residual
stream is carried beside the hidden state, as in vLLM, so the residual add and the next norm are one op.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loom.distributed.parallel import TensorParallel, local_config
from loom.models.vision import QWEN3_VL_ARCHITECTURES, QWEN_VL_ARCHITECTURES, is_multimodal, language_config
from loom.ops.attention import AttentionMetadata, PrefillChunk, attend, paged_attention
from loom.ops.layers import TorchOps, rms_norm_reference, rotate_half, uninitialized_embedding
from loom.ops.rotary import (
    RotaryEmbedding,
    mrope_columns,
    mrope_rows,
    partial_rotary_order,
    partial_rotary_rows,
    yarn_mscale,
)

SUPPORTED_ARCHITECTURES = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM", "Gemma2ForCausalLM",
                           "Gemma3ForCausalLM", "Glm4MoeForCausalLM", "GptOssForCausalLM", "GraniteForCausalLM",
                           "GraniteMoeForCausalLM", "LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM",
                           "Olmo2ForCausalLM", "OlmoeForCausalLM", "Phi3ForCausalLM", "Qwen2ForCausalLM",
                           "Qwen2MoeForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "SmolLM3ForCausalLM")
PARTIAL_ROTARY = ("Phi3ForCausalLM", "Glm4MoeForCausalLM")
"""The families whose partial_rotary_factor transformers implements (and Loom with it): the first dimensions of each
head rotate, rotate-half over them."""
GEMMA = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
DEEPSEEK = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")
"""Multi-head latent attention (``LatentAttention``) and DeepSeek's routers."""


@dataclass(slots=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    architecture: str
    qk_norm: bool = False
    """Qwen3: RMSNorm over each head of q and k before the rotary embedding."""
    qk_norm_full: bool = False
    """OLMo 2, OLMoE: the q and k norms span all heads (one RMSNorm over the whole q, one over the whole k)."""
    clip_qkv: float | None = None
    """OLMoE (and OLMo's option): q, k and v clamped to [-clip, clip] after the q/k norms."""
    post_norms: bool = False
    """OLMo 2: no norm before attention or the MLP; each one's output is normalised before the residual add."""
    sliding_window: int | None = None
    """Tokens a query may attend back to (itself included) in sliding-window layers; None: full attention."""
    sliding_layers: tuple[int, ...] = ()
    """Indices of the layers that attend through ``sliding_window`` (Mistral: all; Gemma: alternate ones)."""
    hidden_act: str = "silu"
    """The MLP's gate activation: silu (SwiGLU) or gelu_pytorch_tanh (Gemma's GeGLU)."""
    norm_offset: bool = False
    """Gemma: RMSNorm scales by (1 + weight); the loader adds the 1 to the stored weights, so the norm is plain."""
    sandwich_norms: bool = False
    """Gemma 2/3: RMSNorm on the attention's and the MLP's outputs too (post_attention_layernorm, then
    pre_feedforward_layernorm before the MLP and post_feedforward_layernorm after it)."""
    embed_scale: float = 1.0
    """Gemma: embeddings multiplied by sqrt(hidden_size)."""
    query_pre_attn_scalar: float | None = None
    """Gemma: attention scores scaled by query_pre_attn_scalar ** -0.5 instead of head_dim ** -0.5."""
    attn_logit_softcapping: float | None = None
    """Gemma 2: scores capped as cap * tanh(score / cap)."""
    final_logit_softcapping: float | None = None
    """Gemma 2: logits capped the same way."""
    local_rope_theta: float | None = None
    """Gemma 3: the sliding layers' rotary base (the global layers take rope_theta and rope_scaling)."""
    nope_layers: tuple[int, ...] = ()
    """SmolLM3: indices of the layers whose q and k get no rotary embedding (NoPE)."""
    rotary_dim: int | None = None
    """Partial rotary (Phi-4-mini: 96 of 128): dimensions of each head that rotate; None: all. The loader orders q and
    k rows by ``partial_rotary_order`` so that full-width kernels run it over padded tables (``RotaryEmbedding``)."""
    attention_multiplier: float | None = None
    """Granite: the attention scores' scale (instead of head_dim ** -0.5)."""
    residual_multiplier: float = 1.0
    """Granite: each layer's attention and MLP outputs are scaled by this before the residual add. The loader folds
    it into o_proj's and down_proj's weights (and biases), and LoRA adapters' deltas on them, so no kernel sees it."""
    logits_scaling: float = 1.0
    """Granite: the logits are divided by this."""
    num_experts: int = 0
    """Mixture-of-experts layers (Mixtral, Qwen2-MoE, Qwen3-MoE): routed experts per layer; 0: dense MLPs."""
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    """Width of each routed expert's MLP."""
    norm_topk_prob: bool = True
    """Renormalise the top-k routing probabilities to sum to 1 (Mixtral always; Qwen MoE per config)."""
    shared_expert_intermediate_size: int = 0
    """Qwen2-MoE: a dense expert every token goes through, scaled by a sigmoid gate; 0: none."""
    shared_expert_gated: bool = True
    """Qwen2-MoE: the shared expert's output is scaled by a sigmoid gate; GLM-4.5: added as it is."""
    router_scoring: str = "softmax"
    """The router's scores: "softmax" (Mixtral, Qwen; DeepSeek-V2's too, its experts chosen within the best
    ``topk_group`` of ``n_group`` groups by their best expert's probability where it limits groups, and weighted times
    ``routed_scaling_factor``) or "sigmoid" (GLM-4.5 and DeepSeek-V3's: experts chosen by score plus a per-expert
    correction bias, within the best ``topk_group`` of ``n_group`` groups; weighted by the scores alone, renormalised
    where ``norm_topk_prob``, times ``routed_scaling_factor``)."""
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    moe_layers: tuple[int, ...] = ()
    """Indices of the layers whose MLP is a mixture of experts (the others are dense)."""
    router_bias: bool = False
    """gpt-oss: the router's linear has a bias."""
    topk_before_softmax: bool = False
    """gpt-oss: the router takes the top k of its logits, then a softmax over those k (not over all experts)."""
    swiglu_limit: float | None = None
    """gpt-oss' experts: gate clamped to at most this and up to [-limit, limit], then (up + 1) * gate *
    sigmoid(alpha * gate); None: plain SwiGLU / GeGLU."""
    swiglu_alpha: float = 1.0
    attention_sinks: bool = False
    """gpt-oss: a learned logit per query head joins each softmax's sum (a key with no value), so a query may give
    its keys less than all of its attention."""
    kv_lora_rank: int = 0
    """DeepSeek-V2 / V3's multi-head latent attention (MLA): each token's keys and values are one latent of this width
    (plus a rotary key of ``qk_rope_head_dim`` all heads share), which is all the cache holds; 0: plain attention."""
    q_lora_rank: int | None = None
    """MLA: the queries' low-rank bottleneck (q_a_proj, a norm, q_b_proj); None: one q_proj."""
    qk_nope_head_dim: int = 0
    """MLA: the query / key dimensions of each head without rotary (``head_dim`` is this plus ``qk_rope_head_dim``)."""
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleaved: bool = False
    """DeepSeek: the checkpoint's rotary dimensions pair up interleaved, (x0, x1), (x2, x3) ...; the loader puts them
    in rotate-half order (first of each pair, then the second), which turns the same angles."""
    mrope_section: tuple[int, ...] | None = None
    """Qwen2-VL / Qwen2.5-VL's multimodal rotary (M-RoPE): how many of each head's rotary frequencies turn with the
    temporal, height and width positions of an image token (text tokens have all three equal: plain RoPE)."""
    mrope_interleaved: bool = False
    """Qwen3-VL: M-RoPE's frequencies take the three positions in turn (``loom.ops.rotary.mrope_columns``), not in
    contiguous runs."""
    deepstack_layers: int = 0
    """Qwen3-VL (DeepStack): an image token's rows also carry features of that many of the tower's inner layers, the
    k-th added to its hidden state after decoder layer k."""

    def head_output_dim(self) -> int:
        """The width each attention head hands o_proj: its values' (``v_head_dim``) under MLA, else ``head_dim``."""
        return self.v_head_dim if self.kv_lora_rank else self.head_dim

    def cache_layout(self) -> tuple[int, int, bool]:
        """A layer's KV cache per token: (heads, width, shared): MLA caches one latent, read as both keys and values
        (one tensor); other attention caches keys and values of ``num_key_value_heads`` heads each."""
        if self.kv_lora_rank:
            return 1, self.kv_lora_rank + self.qk_rope_head_dim, True
        return self.num_key_value_heads, self.head_dim, False

    @classmethod
    def from_hf(cls, hf) -> LlamaConfig:
        # a vision-language model's text model: under LLaVA's own LM head, without the text model's logit scaling or
        # soft-capping (transformers' LlavaForConditionalGeneration applies neither)
        head_of_its_own = is_multimodal(hf)
        top_arch = (getattr(hf, "architectures", None) or [""])[0]
        deepstack = len(getattr(getattr(hf, "vision_config", None), "deepstack_visual_indexes", None) or ())
        tie = getattr(hf, "tie_word_embeddings", False)
        hf = language_config(hf)
        if not head_of_its_own:
            tie = getattr(hf, "tie_word_embeddings", tie)
        # else the vision model's own setting decides, as in transformers (whose configs take an older save's text
        # config setting into it): Qwen3-VL-MoE's text config says True by default, its model False
        qwen3_vl = top_arch in QWEN3_VL_ARCHITECTURES
        arch = (getattr(hf, "architectures", None) or ["LlamaForCausalLM"])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"architecture {arch} is not supported; Loom serves {', '.join(SUPPORTED_ARCHITECTURES)}")
        if getattr(hf, "use_bidirectional_attention", False):  # EmbeddingGemma: every token sees every other
            raise ValueError(f"{arch} with use_bidirectional_attention is an encoder (an embedding model such as "
                             "EmbeddingGemma), not a causal language model: Loom does not serve it")
        heads = hf.num_attention_heads
        rope = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
        local_rope = rope.pop("sliding_attention", None)  # Gemma 3: one rope per layer type
        rope = dict(rope.pop("full_attention", None) or rope)
        mrope = rope.pop("mrope_section", None)
        interleaved = bool(rope.pop("mrope_interleaved", False)) or qwen3_vl  # transformers' Qwen3-VL always does
        if mrope is None and head_of_its_own and top_arch in QWEN_VL_ARCHITECTURES:
            # transformers' defaults for a config without one (checked below)
            mrope = [24, 20, 20] if qwen3_vl else [16, 24, 24]
        if rope.get("type") == "mrope":  # Qwen2-VL's older configs name M-RoPE as a scaling type
            rope.pop("type")
        theta = rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
        if rope.get("rope_type", rope.get("type")) in ("longrope", "su", "yarn"):  # both context lengths
            rope.setdefault("original_max_position_embeddings", getattr(hf, "original_max_position_embeddings", None))
            rope["max_position_embeddings"] = hf.max_position_embeddings
        is_qwen2 = arch in ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM")
        glm = arch == "Glm4MoeForCausalLM"
        attention_bias = bool(getattr(hf, "attention_bias", False))
        window = getattr(hf, "sliding_window", None)
        layer_types = getattr(hf, "layer_types", None) or []
        windowed = (arch in ("MistralForCausalLM", "MixtralForCausalLM", "Phi3ForCausalLM")
                    or getattr(hf, "use_sliding_window", False) or "sliding_attention" in layer_types)
        if arch == "SmolLM3ForCausalLM":  # its attention windows a sliding layer only under use_sliding_window
            windowed = bool(getattr(hf, "use_sliding_window", False))
        window = int(window) if window and windowed else None
        if layer_types:
            sliding = tuple(i for i, t in enumerate(layer_types) if t == "sliding_attention")
        else:
            sliding = tuple(range(hf.num_hidden_layers))
        gemma = arch in GEMMA
        granite = arch in ("GraniteForCausalLM", "GraniteMoeForCausalLM")
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
        mla = arch in DEEPSEEK
        if mla:  # transformers' config says the rotary width; the heads' q/k width is both parts
            head_dim = hf.qk_nope_head_dim + hf.qk_rope_head_dim
        partial = rope.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", None) or 1.0)
        rotary_dim = int(head_dim * partial) if partial != 1.0 else None
        if rotary_dim is not None and arch not in PARTIAL_ROTARY:  # the families transformers implements it for
            raise ValueError(f"{arch} with partial_rotary_factor {partial} is not supported (partial rotary: "
                             f"{', '.join(PARTIAL_ROTARY)}, e.g. Phi-4-mini, GLM-4.5)")
        if rotary_dim is not None:
            partial_rotary_order(head_dim, rotary_dim)  # refuses what it cannot order
        if deepstack > hf.num_hidden_layers:
            raise ValueError(f"the vision tower feeds {deepstack} DeepStack features, one per decoder layer, to a "
                             f"language model of {hf.num_hidden_layers} layers")
        if mrope and sum(mrope) != head_dim // 2:
            raise ValueError(f"mrope_section {list(mrope)} must share out the {head_dim // 2} rotary frequencies of "
                             f"a {head_dim}-wide head")
        return cls(
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_hidden_layers=hf.num_hidden_layers,
            num_attention_heads=heads,
            # MLA: every head reads the one latent, as its own KV head in transformers' config (and in Loom's
            # tensor-parallel split: a rank holds whole heads, the latent replicated)
            num_key_value_heads=heads if mla else getattr(hf, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            rms_norm_eps=hf.rms_norm_eps,
            rope_theta=float(theta),
            rope_scaling=rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None,
            max_position_embeddings=hf.max_position_embeddings,
            tie_word_embeddings=bool(tie),
            qkv_bias=is_qwen2 or attention_bias,  # MLA: q_a_proj's and kv_a_proj_with_mqa's
            o_bias=attention_bias and not (is_qwen2 or glm),  # GLM-4.5: q/k/v biases, none on o_proj
            mlp_bias=bool(getattr(hf, "mlp_bias", False)) or arch == "GptOssForCausalLM",  # gpt-oss' experts
            architecture=arch,
            qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Gemma3ForCausalLM", "Olmo2ForCausalLM",
                             "OlmoeForCausalLM") or (glm and bool(getattr(hf, "use_qk_norm", False))),
            qk_norm_full=arch in ("Olmo2ForCausalLM", "OlmoeForCausalLM"),
            clip_qkv=float(hf.clip_qkv) if getattr(hf, "clip_qkv", None) is not None else None,
            post_norms=arch == "Olmo2ForCausalLM",
            sliding_window=window,
            sliding_layers=sliding if window else (),
            hidden_act=getattr(hf, "hidden_activation", None) or getattr(hf, "hidden_act", "silu"),
            norm_offset=gemma,
            sandwich_norms=gemma,
            embed_scale=hf.hidden_size**0.5 if gemma else float(hf.embedding_multiplier) if granite else 1.0,
            query_pre_attn_scalar=getattr(hf, "query_pre_attn_scalar", None) if gemma else None,
            attn_logit_softcapping=getattr(hf, "attn_logit_softcapping", None),
            final_logit_softcapping=None if head_of_its_own else getattr(hf, "final_logit_softcapping", None),
            local_rope_theta=float(local_rope["rope_theta"]) if local_rope else None,
            rotary_dim=rotary_dim,
            nope_layers=tuple(i for i, rope in enumerate(getattr(hf, "no_rope_layers", None) or []) if not rope
                              and i < hf.num_hidden_layers) if arch == "SmolLM3ForCausalLM" else (),
            attention_multiplier=float(hf.attention_multiplier) if granite else None,
            residual_multiplier=float(hf.residual_multiplier) if granite else 1.0,
            logits_scaling=float(hf.logits_scaling) if granite and not head_of_its_own else 1.0,
            mrope_section=tuple(int(n) for n in mrope) if mrope and head_of_its_own else None,
            mrope_interleaved=interleaved and head_of_its_own,
            deepstack_layers=deepstack if head_of_its_own else 0,
            **_moe_fields(hf, arch, renormalise=top_arch == "Qwen3VLMoeForConditionalGeneration"),
            **_gpt_oss_fields(hf, arch),
            **_mla_fields(hf, arch),
        )


def _moe_fields(hf, arch: str, renormalise: bool = False) -> dict:
    """The mixture-of-experts settings of a Mixtral / Qwen2-MoE / Qwen3-MoE config (nothing for dense models).
    ``renormalise``: the top-k probabilities sum to 1 whatever the config says (Qwen3-VL-MoE's router)."""
    if arch == "MixtralForCausalLM":
        return dict(num_experts=hf.num_local_experts, num_experts_per_tok=hf.num_experts_per_tok,
                    moe_intermediate_size=hf.intermediate_size, norm_topk_prob=True,
                    moe_layers=tuple(range(hf.num_hidden_layers)))
    if arch == "OlmoeForCausalLM":
        return dict(num_experts=hf.num_experts, num_experts_per_tok=hf.num_experts_per_tok,
                    moe_intermediate_size=hf.intermediate_size, norm_topk_prob=bool(hf.norm_topk_prob),
                    moe_layers=tuple(range(hf.num_hidden_layers)))
    if arch == "GraniteMoeForCausalLM":  # Granite 3.x MoE: its router takes the top k of the logits, then softmax
        return dict(num_experts=hf.num_local_experts, num_experts_per_tok=hf.num_experts_per_tok,
                    moe_intermediate_size=hf.intermediate_size, topk_before_softmax=True,
                    moe_layers=tuple(range(hf.num_hidden_layers)))
    if arch in ("Glm4MoeForCausalLM", *DEEPSEEK):  # DeepSeek's routers; the first layers dense
        experts = hf.n_routed_experts
        # DeepSeek-V2 limits the groups only with "group_limited_greedy" ("greedy": over all experts)
        v2_greedy = arch == "DeepseekV2ForCausalLM" and getattr(hf, "topk_method", "greedy") != "group_limited_greedy"
        groups, best = (1, 1) if v2_greedy else (hf.n_group or 1, hf.topk_group or 1)
        if experts % groups or best > groups:
            raise ValueError(f"{experts} experts in {groups} groups, the best {best} of them chosen: "
                             "the groups must divide the experts, and the chosen ones be among them")
        return dict(num_experts=experts, num_experts_per_tok=hf.num_experts_per_tok,
                    moe_intermediate_size=hf.moe_intermediate_size, norm_topk_prob=bool(hf.norm_topk_prob),
                    shared_expert_intermediate_size=hf.moe_intermediate_size * (hf.n_shared_experts or 0),
                    shared_expert_gated=False,
                    router_scoring="softmax" if arch == "DeepseekV2ForCausalLM" else "sigmoid", n_group=groups,
                    topk_group=best, routed_scaling_factor=float(hf.routed_scaling_factor),
                    moe_layers=tuple(range(hf.first_k_dense_replace, hf.num_hidden_layers)))
    if arch not in ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"):
        return {}
    dense = set(getattr(hf, "mlp_only_layers", None) or ())
    step = getattr(hf, "decoder_sparse_step", 1) or 1
    layers = tuple(i for i in range(hf.num_hidden_layers) if i not in dense and (i + 1) % step == 0)
    return dict(num_experts=hf.num_experts, num_experts_per_tok=hf.num_experts_per_tok,
                moe_intermediate_size=hf.moe_intermediate_size,
                norm_topk_prob=renormalise or bool(hf.norm_topk_prob),
                shared_expert_intermediate_size=getattr(hf, "shared_expert_intermediate_size", 0) or 0,
                moe_layers=layers if hf.num_experts else ())


def _gpt_oss_fields(hf, arch: str) -> dict:
    """gpt-oss' settings: every layer a mixture of experts (biases on the experts and the router), attention sinks,
    q/k/v/o biases (``attention_bias``, read with the others)."""
    if arch != "GptOssForCausalLM":
        return {}
    return dict(num_experts=hf.num_local_experts, num_experts_per_tok=hf.num_experts_per_tok,
                moe_intermediate_size=hf.intermediate_size, moe_layers=tuple(range(hf.num_hidden_layers)),
                router_bias=True, topk_before_softmax=True, attention_sinks=True,
                swiglu_limit=float(hf.swiglu_limit), swiglu_alpha=float(hf.swiglu_alpha))


def _mla_fields(hf, arch: str) -> dict:
    """DeepSeek-V2 / V3's multi-head latent attention settings (nothing for other models)."""
    if arch not in DEEPSEEK:
        return {}
    return dict(kv_lora_rank=hf.kv_lora_rank, q_lora_rank=hf.q_lora_rank or None,
                qk_nope_head_dim=hf.qk_nope_head_dim, qk_rope_head_dim=hf.qk_rope_head_dim, v_head_dim=hf.v_head_dim,
                rope_interleaved=arch == "DeepseekV2ForCausalLM" or bool(getattr(hf, "rope_interleave", True)))


def deinterleave_rope(tensor: torch.Tensor, pname: str, cfg: LlamaConfig) -> torch.Tensor:
    """MLA checkpoint rows whose rotary dimensions pair up interleaved ((x0, x1), (x2, x3) ...: DeepSeek's layout) in
    rotate-half order instead (x0, x2, ..., x1, x3, ...): each head's rotary rows of q_proj / q_b_proj, the rotary key
    rows of kv_a_proj_with_mqa. The same rotation then turns them with ``RotaryEmbedding``'s tables; q and k
    reordered alike, their dot products are unchanged. Other tensors come back as they are."""
    if not cfg.rope_interleaved:
        return tensor
    rope = cfg.qk_rope_head_dim
    order = torch.cat([torch.arange(0, rope, 2), torch.arange(1, rope, 2)])
    if pname.endswith(("self_attn.q_proj.weight", "self_attn.q_b_proj.weight")):
        heads = tensor.view(cfg.num_attention_heads, cfg.head_dim, -1)
        return torch.cat([heads[:, : cfg.qk_nope_head_dim], heads[:, cfg.qk_nope_head_dim :][:, order]], 1
                         ).reshape(tensor.shape)
    if pname.endswith(("kv_a_proj_with_mqa.weight", "kv_a_proj_with_mqa.bias")):
        return torch.cat([tensor[: cfg.kv_lora_rank], tensor[cfg.kv_lora_rank :][order]])
    return tensor


def order_partial_rotary(tensors: dict[str, torch.Tensor], cfg: LlamaConfig) -> None:
    """Partial rotary: put loaded float q/k/v rows (and biases) among ``tensors`` (Loom's parameter names, e.g. a
    model's ``named_parameters()``, or whole weights about to be packed) in ``qkv_load_order`` and q/k norm weights in
    ``partial_rotary_order``, in place. Quantized projections are ordered as their rows are read
    (``loom.models.gguf``)."""
    rows = qkv_load_order(cfg)
    if rows is None:
        return
    order = partial_rotary_order(cfg.head_dim, cfg.rotary_dim)
    with torch.no_grad():
        for name, tensor in tensors.items():
            if name.endswith(("qkv_proj.weight", "qkv_proj.bias")):
                tensor.copy_(tensor[rows.to(tensor.device)])
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                tensor.copy_(tensor[order.to(tensor.device)])


def qkv_load_order(cfg: LlamaConfig) -> torch.Tensor | None:
    """Partial rotary (``LlamaConfig.rotary_dim``): the fused q/k/v projection's rows in load order, each q and k head
    in ``partial_rotary_order`` and v as it is; None without partial rotary. ``cfg``: a tensor-parallel rank's local
    config orders its own heads."""
    if cfg.rotary_dim is None:
        return None
    order = partial_rotary_order(cfg.head_dim, cfg.rotary_dim)
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return torch.cat((partial_rotary_rows(order, cfg.num_attention_heads),
                      q + partial_rotary_rows(order, cfg.num_key_value_heads), torch.arange(q + kv, q + 2 * kv)))


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_reference(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, tp: TensorParallel | None = None, index: int = 0):
        super().__init__()
        self.tp = tp
        """With tensor parallelism: this rank's heads only (``cfg`` is its local config); o_proj's partial output is
        summed over the ranks."""
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.scale = (cfg.attention_multiplier if cfg.attention_multiplier is not None
                      else (cfg.query_pre_attn_scalar or self.head_dim) ** -0.5)
        self.window = cfg.sliding_window if index in cfg.sliding_layers else None
        self.softcap = cfg.attn_logit_softcapping
        self.qk_norm_full = cfg.qk_norm_full
        norms = (self.q_size, self.kv_size) if cfg.qk_norm_full else (self.head_dim, self.head_dim)
        self.q_norm = RMSNorm(norms[0], cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(norms[1], cfg.rms_norm_eps) if cfg.qk_norm else None
        self.sinks = nn.Parameter(torch.empty(self.num_heads)) if cfg.attention_sinks else None
        self.clip_qkv = cfg.clip_qkv

    def forward(self, x, positions, rotary: RotaryEmbedding, kv_cache, meta: AttentionMetadata, ops: TorchOps):
        k_cache, v_cache = kv_cache
        qkv = self.qkv_proj(x)
        if self.q_norm is not None:
            qkv = self.norm_qk(qkv, ops)
        if self.clip_qkv is not None:
            qkv = qkv.clamp(-self.clip_qkv, self.clip_qkv)
        q, k, v = ops.rotary_and_cache(
            qkv, positions, rotary.cos, rotary.sin, k_cache, v_cache, meta.slot_mapping,
            self.num_heads, self.num_kv_heads,
        )  # fmt: skip  # q [T, H, D], k/v [T, Hkv, D]
        out = paged_attention(q, k, v, k_cache, v_cache, meta, self.scale, ops.decode_attention, self.window,
                              self.softcap, ops.prefill_attention, self.sinks)
        out = self.o_proj(out.reshape(x.shape[0], self.q_size))
        return out if self.tp is None else self.tp.all_reduce(out)

    def norm_qk(self, qkv: torch.Tensor, ops: TorchOps) -> torch.Tensor:
        """Qwen3: RMSNorm over each head of q and of k (v untouched), before the rotary embedding; OLMo 2: over the
        whole of q and of k."""
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)  # each norm spans its weight's width
        q = ops.rms_norm(q.reshape(-1, self.q_norm.weight.shape[0]), self.q_norm.weight, self.q_norm.eps)
        k = ops.rms_norm(k.reshape(-1, self.k_norm.weight.shape[0]), self.k_norm.weight, self.k_norm.eps)
        return torch.cat([q.reshape(qkv.shape[0], -1), k.reshape(qkv.shape[0], -1), v], dim=-1)


class LatentProjection(nn.Module):
    """MLA's kv_b_proj: the weight [H (nope + v), rank] that turns a latent into each head's key (its first ``nope``
    rows per head) and value (the other ``v``). ``LatentAttention`` never runs it as a matmul over the latents: it
    absorbs the key part into the queries and the value part into the output (``absorbed``). Not an ``nn.Linear``,
    so no backend packs or quantizes it."""

    def __init__(self, heads: int, nope: int, v: int, rank: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(heads * (nope + v), rank))
        self.heads, self.nope = heads, nope

    def absorbed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (W_UK [H, nope, rank], W_UV [H, v, rank]) of the weight."""
        w = self.weight.view(self.heads, -1, self.weight.shape[1])
        return w[:, : self.nope], w[:, self.nope :]


class LatentAttention(nn.Module):
    """DeepSeek-V2 / V3's multi-head latent attention (MLA) over a latent cache, as vLLM and FlashMLA run its decode.
    A token's keys and values are one latent c = norm(W_DKV x) of ``kv_lora_rank`` (512 in DeepSeek-V3) and a rotary
    key k_pe of ``qk_rope_head_dim`` (64) that every head shares; head h's key is [W_UK[h] c, k_pe] and its value
    W_UV[h] c. The cache holds only [c, k_pe] (576 numbers a token and layer where plain attention over DeepSeek-V3's
    128 heads would hold 40,960), and the heads read it as one key-value head: q_nope . (W_UK[h] c) =
    (W_UK[h]^T q_nope) . c, so each query becomes [W_UK[h]^T q_nope, q_pe] against the latent keys [c, k_pe]; the
    same latents are the values (their first ``kv_lora_rank`` columns kept), and W_UV[h] turns each head's weighted
    latent into its output. Every backend's paged attention runs it as it is (grouped-query attention with one KV
    head, the keys' cache passed as the values' too); prefill chunks run expanded where the backend takes them one by
    one (``expanded_prefill``: fewer FLOPs a context key). Under tensor parallelism (as vLLM splits it) a rank holds its
    heads' rows of q_proj / q_b_proj and kv_b_proj and their columns of o_proj, computes the latent whole
    (q_a_proj, kv_a_proj_with_mqa and their norms replicated) and caches all of it; o_proj's partial outputs are
    summed over the ranks."""

    expand_prefills = True
    """Prefill chunks run expanded (``expanded_prefill``) where the backend runs them one by one (the reference and
    the C++ backend; Triton's launch takes every chunk absorbed); False: absorbed too (benchmarks/mla_prefill.py)."""

    def __init__(self, cfg: LlamaConfig, tp: TensorParallel | None = None, index: int = 0):
        super().__init__()
        self.tp = tp
        """With tensor parallelism: this rank's heads only (``cfg`` is its local config)."""
        self.num_heads = cfg.num_attention_heads
        self.nope, self.rope, self.rank, self.v_dim = (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank,
                                                       cfg.v_head_dim)
        q_width = self.num_heads * (self.nope + self.rope)
        self.q_proj = self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
        if cfg.q_lora_rank:
            self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=cfg.qkv_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, 1e-6)  # transformers' and DeepSeek's own: not the config's
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, q_width, bias=False)
        else:
            self.q_proj = nn.Linear(cfg.hidden_size, q_width, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, self.rank + self.rope, bias=cfg.qkv_bias)
        self.kv_a_layernorm = RMSNorm(self.rank, 1e-6)
        self.kv_b_proj = LatentProjection(self.num_heads, self.nope, self.v_dim, self.rank)
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, cfg.hidden_size, bias=cfg.o_bias)
        self.scale = (self.nope + self.rope) ** -0.5
        scaling = cfg.rope_scaling or {}
        if scaling.get("mscale_all_dim"):  # YaRN: DeepSeek scales every dimension's scores, not the rotary ones only
            self.scale *= yarn_mscale(scaling["factor"], scaling["mscale_all_dim"]) ** 2

    def forward(self, x, positions, rotary: RotaryEmbedding, kv_cache, meta: AttentionMetadata, ops: TorchOps):
        cache = kv_cache[0]  # [blocks, block_size, 1, rank + rope], the values' cache being the same tensor
        t, h = x.shape[0], self.num_heads
        if self.q_proj is not None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(t, h, self.nope + self.rope)
        kv = self.kv_a_proj_with_mqa(x)  # [T, rank + rope]
        cos, sin = rotary.cos[positions].unsqueeze(1), rotary.sin[positions].unsqueeze(1)  # [T, 1, rope]
        q_pe, k_pe = q[..., self.nope :], kv[:, None, self.rank :]
        q = torch.cat([q[..., : self.nope], q_pe * cos + rotate_half(q_pe) * sin], dim=-1)
        k_pe = k_pe * cos + rotate_half(k_pe) * sin
        latent = torch.cat([self.kv_a_layernorm(kv[:, : self.rank]), k_pe.squeeze(1)], dim=-1)
        cache.view(-1, self.rank + self.rope).index_copy_(0, meta.slot_mapping, latent)
        if meta.prefills and self.expand_prefills and ops.prefill_attention is None:  # chunk by chunk, expanded
            out = q.new_empty(t, h, self.v_dim)
            nd = meta.num_decodes
            if nd:
                out[:nd] = self.absorbed(q[:nd], latent[:nd], cache, meta, ops, decodes_only=True)
            for chunk in meta.prefills:
                rows = slice(chunk.token_start, chunk.token_end)
                out[rows] = self.expanded_prefill(q[rows], latent[rows], cache, chunk)
        else:
            out = self.absorbed(q, latent, cache, meta, ops)
        out = self.o_proj(out.reshape(t, h * self.v_dim))
        return out if self.tp is None else self.tp.all_reduce(out)

    def absorbed(self, q: torch.Tensor, latent: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata,
                 ops: TorchOps, decodes_only: bool = False) -> torch.Tensor:
        """q [T, H, nope + rope] (rotated) and this step's latents [T, rank + rope] -> [T, H, v]: every head reads
        the latent cache as one KV head, W_UK absorbed into its query and W_UV into its output. ``decodes_only``: the
        rows are the step's decodes (the backend's decode attention alone)."""
        w_uk, w_uv = self.kv_b_proj.absorbed()
        q_latent = torch.bmm(q[..., : self.nope].transpose(0, 1), w_uk)  # [H, T, rank]
        query = torch.cat([q_latent.transpose(0, 1), q[..., self.nope :]], dim=-1)  # [T, H, rank + rope]
        if decodes_only:
            out = ops.decode_attention(query, cache, cache, meta, self.scale)
        else:
            latent = latent.unsqueeze(1)  # [T, 1, rank + rope]: this step's keys (and values)
            out = paged_attention(query, latent, latent, cache, cache, meta, self.scale, ops.decode_attention,
                                  prefill_fn=ops.prefill_attention)  # [T, H, rank + rope]
        return torch.bmm(out[..., : self.rank].transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)

    def expanded_prefill(self, q: torch.Tensor, latent: torch.Tensor, cache: torch.Tensor,
                         chunk: PrefillChunk) -> torch.Tensor:
        """One prefill chunk as vLLM runs MLA's prefills: its context's latents (the cached prefix's and its own)
        expanded through kv_b_proj into every head's keys [W_UK c, k_pe] and values W_UV c, then causal attention
        at the heads' own width (nope + rope, the values zero-padded to it: CPU SDPA's fused kernel wants one
        width) — DeepSeek-V3: 192 a head instead of the absorbed 576 against every context key, the up-projection
        paid once per key. q [n, H, nope + rope], latent [n, rank + rope] -> [n, H, v]."""
        n, h = q.shape[:2]
        context = latent if chunk.start_pos == 0 else (
            cache[chunk.block_table].view(-1, latent.shape[-1])[: chunk.start_pos + n])
        up = F.linear(context[:, : self.rank], self.kv_b_proj.weight).view(-1, h, self.nope + self.v_dim)
        keys = torch.cat([up[..., : self.nope], context[:, None, self.rank :].expand(-1, h, self.rope)], dim=-1)
        width = max(self.nope + self.rope, self.v_dim)
        q, keys, values = (x if x.shape[-1] == width else F.pad(x, (0, width - x.shape[-1]))
                           for x in (q, keys, up[..., self.nope :]))
        mask = None
        if chunk.start_pos:  # a query at position p sees the keys up to p
            positions = torch.arange(chunk.start_pos + n, device=q.device)
            mask = positions[None, :] <= positions[chunk.start_pos :, None]
        out = attend(q.transpose(0, 1).unsqueeze(0), keys.transpose(0, 1).unsqueeze(0),
                     values.transpose(0, 1).unsqueeze(0), mask, self.scale, causal=mask is None)  # [1, H, n, width]
        return out[0, ..., : self.v_dim].transpose(0, 1)


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig, tp: TensorParallel | None = None, intermediate_size: int | None = None):
        super().__init__()
        self.tp = tp
        if cfg.hidden_act not in ("silu", "gelu_pytorch_tanh"):
            raise ValueError(f"MLP activation {cfg.hidden_act!r} is not supported (silu, gelu_pytorch_tanh)")
        self.gelu = cfg.hidden_act == "gelu_pytorch_tanh"
        self.clamp = (cfg.swiglu_alpha, cfg.swiglu_limit) if cfg.swiglu_limit is not None else None
        """gpt-oss' clamped SwiGLU: (alpha, limit)."""
        self.intermediate_size = intermediate_size or cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * self.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(self.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor, ops: TorchOps) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.clamp is not None:
            act = ops.clamped_swiglu(gate_up, *self.clamp)
        else:
            act = ops.gelu_and_mul(gate_up) if self.gelu else ops.silu_and_mul(gate_up)
        out = self.down_proj(act)
        return out if self.tp is None else self.tp.all_reduce(out)


@dataclass(slots=True)
class StackedExperts:
    """A MoE layer's expert weights as stacks over experts, in ``nn.Linear``'s layout: gate/up [E, 2I, H] (gate rows
    first), down [E, H, I], biases [E, 2I] and [E, H] where the experts have them."""

    gate_up: torch.Tensor
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None


class SparseMoE(nn.Module):
    """A mixture-of-experts MLP: a router picks ``num_experts_per_tok`` experts per token (softmax, then top-k, then
    renormalised where the model does; gpt-oss: top-k of the logits, then their softmax), tokens are grouped by
    expert so that each expert chosen in the step runs once over all its tokens (two matmuls, whatever the batch),
    and the outputs are scattered back weighted. Qwen2-MoE adds a shared expert every token goes through, scaled by
    a sigmoid gate. Under tensor parallelism each rank holds a slice of every expert's columns (``cfg`` is the
    rank's) and the router whole, so all ranks route alike, and one all-reduce sums the weighted partial outputs."""

    def __init__(self, cfg: LlamaConfig, tp: TensorParallel | None = None):
        super().__init__()
        self.tp = tp
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        self.topk_before_softmax = cfg.topk_before_softmax
        self.sigmoid = cfg.router_scoring == "sigmoid"
        self.float32_router = self.sigmoid or cfg.architecture in DEEPSEEK
        """The router's weights and scores in float32 whatever the model's dtype (``keep_float32_routers``)."""
        self.groups = (cfg.n_group, cfg.topk_group)
        self.routed_scaling_factor = cfg.routed_scaling_factor
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=cfg.router_bias)
        self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.num_experts)) if self.sigmoid else None
        """Sigmoid routing: added to the scores to choose the experts (not to weight them)."""
        self.experts = nn.ModuleList(MLP(cfg, intermediate_size=cfg.moe_intermediate_size)
                                     for _ in range(cfg.num_experts))
        shared = cfg.shared_expert_intermediate_size
        self.shared_expert = MLP(cfg, intermediate_size=shared) if shared else None
        gated = shared and cfg.shared_expert_gated
        self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False) if gated else None
        self.stacked: StackedExperts | None = None
        """The experts' weights stacked for a backend's grouped matmuls (``stack_experts``), or None."""

    def stack_experts(self) -> bool:
        """Hold the experts' weights (and biases) as stacks [E, N, K] for a backend whose ``ops.fused_moe`` runs
        every expert in one grouped matmul per projection; each expert's parameters become views into them, so
        weights written in place (``load_weights``) land in the stacks. False, and nothing changed, where an expert
        is not a plain float linear (quantized, packed)."""
        pairs = [(e.gate_up_proj, e.down_proj) for e in self.experts]
        if not all(type(p) is nn.Linear for pair in pairs for p in pair):
            return False

        def stack(params: list[torch.Tensor | None]) -> torch.Tensor | None:
            if params[0] is None:
                return None
            whole = torch.stack([p.detach() for p in params])
            for i, p in enumerate(params):
                p.data = whole[i]
            return whole
        self.stacked = StackedExperts(stack([g.weight for g, _ in pairs]), stack([g.bias for g, _ in pairs]),
                                      stack([d.weight for _, d in pairs]), stack([d.bias for _, d in pairs]))
        return True

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> (weights [T, k] in x's dtype, expert ids [T, k]), as HF routes (float32 softmax)."""
        if self.topk_before_softmax:  # gpt-oss
            logits, experts = torch.topk(self.gate(x), self.top_k, dim=-1)
            return torch.softmax(logits.float(), dim=-1).to(x.dtype), experts
        if self.sigmoid:
            return self._route_sigmoid(x)
        probs = torch.softmax((self.gate(x.float()) if self.float32_router else self.gate(x)).float(), dim=-1)
        if self.groups[0] > 1:  # DeepSeek-V2's group_limited_greedy: experts of the best groups by their best one
            probs = self._best_groups(probs, lambda grouped: grouped.amax(-1), 0.0)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.routed_scaling_factor != 1.0:  # DeepSeek-V2
            weights = weights * self.routed_scaling_factor
        return weights.to(x.dtype), experts

    def _route_sigmoid(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """GLM-4.5 / DeepSeek-V3 ("noaux_tc"): experts chosen by sigmoid score + correction bias among the best
        ``topk_group`` groups (a group's worth: its two best biased scores), weighted by the plain scores."""
        scores = torch.sigmoid(self.gate(x.float()))  # in float32, as the router's weights are kept
        choice = scores + self.e_score_correction_bias.float()
        if self.groups[0] > 1:
            choice = self._best_groups(choice, lambda grouped: grouped.topk(2, dim=-1)[0].sum(-1), float("-inf"))
        experts = torch.topk(choice, self.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, experts)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return (weights * self.routed_scaling_factor).to(x.dtype), experts

    def _best_groups(self, scores: torch.Tensor, worth, fill: float) -> torch.Tensor:
        """``scores`` [T, experts] with the experts outside each token's best ``topk_group`` of ``n_group`` groups
        set to ``fill``; ``worth``: a group's value from its scores [T, groups, experts per group] -> [T, groups]."""
        groups, best = self.groups
        grouped = scores.unflatten(-1, (groups, -1))
        kept = torch.topk(worth(grouped), best, dim=-1, sorted=False)[1]
        mask = torch.zeros(grouped.shape[:2], dtype=torch.bool, device=scores.device).scatter_(1, kept, True)
        return grouped.masked_fill(~mask.unsqueeze(-1), fill).flatten(1)

    def forward(self, x: torch.Tensor, ops: TorchOps) -> torch.Tensor:
        weights, experts = self.route(x)
        if self.stacked is not None and ops.fused_moe is not None:
            y = ops.fused_moe(x, weights, experts, self.stacked, self.experts[0])
        else:
            y = self._grouped(x, weights, experts, ops)
        if self.shared_expert is not None:
            shared = self.shared_expert(x, ops)
            y += shared if self.shared_expert_gate is None else torch.sigmoid(self.shared_expert_gate(x)) * shared
        return y if self.tp is None else self.tp.all_reduce(y)

    def _grouped(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, ops: TorchOps) -> torch.Tensor:
        """The routed experts' weighted sum, each expert chosen in the step run once over its tokens."""
        flat = experts.flatten()
        order = torch.argsort(flat, stable=True)  # the T*k (token, expert) pairs, grouped by expert
        token = order // self.top_k
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()  # one host sync per layer
        grouped = x[token]
        out = torch.empty_like(grouped)
        start = 0
        for expert, count in zip(self.experts, counts):
            if count:
                out[start : start + count] = expert(grouped[start : start + count], ops)
                start += count
        out.mul_(weights.flatten()[order].unsqueeze(-1))
        return torch.zeros_like(x).index_add_(0, token, out)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, tp: TensorParallel | None = None, index: int = 0):
        super().__init__()
        self.post_norms = cfg.post_norms
        self.input_layernorm = None if cfg.post_norms else RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = (LatentAttention if cfg.kv_lora_rank else Attention)(cfg, tp, index)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SparseMoE(cfg, tp) if index in cfg.moe_layers else MLP(cfg, tp)
        self.sandwich = cfg.sandwich_norms
        if self.sandwich:  # Gemma: post_attention_layernorm normalises the attention's output instead
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        elif self.post_norms:  # OLMo 2: post_attention_layernorm normalises the attention's output
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, residual, positions, rotary, kv_cache, meta, ops: TorchOps):
        """x: this layer's input; residual: the stream before it (None for the first layer). HF computes
        h = x + attn(norm(x)); out = h + mlp(norm(h)); here the adds ride with the norms."""
        if self.post_norms:
            return self._forward_post_norms(x, residual, positions, rotary, kv_cache, meta, ops)
        norm = self.input_layernorm
        if residual is None:
            residual, x = x, ops.rms_norm(x, norm.weight, norm.eps)
        else:
            x, residual = ops.add_rms_norm(x, residual, norm.weight, norm.eps)
        x = self.self_attn(x, positions, rotary, kv_cache, meta, ops)
        norm = self.post_attention_layernorm
        if self.sandwich:
            x = ops.rms_norm(x, norm.weight, norm.eps)
            norm = self.pre_feedforward_layernorm
        x, residual = ops.add_rms_norm(x, residual, norm.weight, norm.eps)
        x = self.mlp(x, ops)
        if self.sandwich:
            x = ops.rms_norm(x, self.post_feedforward_layernorm.weight, self.post_feedforward_layernorm.eps)
        return x, residual

    def _forward_post_norms(self, x, residual, positions, rotary, kv_cache, meta, ops: TorchOps):
        """OLMo 2: h = x + norm(attn(x)); out = h + norm(mlp(h)) (no norm before either), returned as (norm(mlp(h)),
        h) so the next layer's add (or the final norm's) completes it."""
        h = x if residual is None else x + residual
        attn = self.self_attn(h, positions, rotary, kv_cache, meta, ops)
        h = h + ops.rms_norm(attn, self.post_attention_layernorm.weight, self.post_attention_layernorm.eps)
        out = self.mlp(h, ops)
        return ops.rms_norm(out, self.post_feedforward_layernorm.weight, self.post_feedforward_layernorm.eps), h


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: LlamaConfig, max_positions: int, dtype: torch.dtype, tp: TensorParallel | None = None):
        """``tp``: build only this rank's part (``loom.distributed.parallel``); ``config`` is then the rank's local
        config (its heads and MLP columns, the full vocab_size) and ``full_config`` the model's."""
        super().__init__()
        self.full_config = cfg
        self.tp = tp
        if tp is not None:
            cfg = local_config(cfg, tp.rank, tp.size)
        self.config = cfg
        vocab_rows = cfg.vocab_size if tp is None else tp.vocab_shard(cfg.vocab_size)
        self.vocab_start = 0 if tp is None else tp.vocab_range(cfg.vocab_size)[0]
        self.embed_tokens = uninitialized_embedding(vocab_rows, cfg.hidden_size)  # built on meta, loaded after
        self.layers = nn.ModuleList(DecoderLayer(cfg, tp, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, vocab_rows, bias=False)
        self.rotary: RotaryEmbedding
        self.rotary_local: RotaryEmbedding | None
        """Gemma 3: the sliding layers' rotary tables (their own base, no scaling)."""
        self.rotary_none: RotaryEmbedding | None
        """SmolLM3: the NoPE layers' tables, cos 1 and sin 0 (rotating by them leaves q and k exactly as they are, so
        every backend and the whole-layer calls take these layers as they are)."""
        self.build_rotary(max_positions, dtype)
        self.mrope_columns = None if cfg.mrope_section is None else mrope_columns(cfg.mrope_section,
                                                                                  cfg.mrope_interleaved)
        self.ops: TorchOps = TorchOps()
        self.row_amax: dict[str, torch.Tensor] = {}
        """With tensor parallelism, the largest |weight| of each whole row of the row-parallel projections (the rank
        holds some of their columns), by parameter name: ``--quantization int8`` scales by it, as one rank would."""
        self.logits_proj: nn.Module | None = None
        """Set by a backend that replaces the LM head matmul (``CpuOps.prepare`` packs it, see
        ``loom.ops.packed_linear``)."""

    def keep_float32_routers(self) -> None:
        """Sigmoid routers (GLM-4.5, DeepSeek-V3) and their correction biases stay float32 in a 16-bit model, as
        transformers and vLLM keep them: in bfloat16 the biases' 0.01-scale differences (around 1.0) vanish and
        tokens go to other experts. DeepSeek-V2's softmax router too, as transformers holds it."""
        for module in self.modules():
            if isinstance(module, SparseMoE) and module.float32_router:
                module.gate.float()
                if module.e_score_correction_bias is not None:
                    module.e_score_correction_bias.data = module.e_score_correction_bias.data.float()

    def build_rotary(self, max_positions: int, dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        """(Re)compute the rotary tables for ``max_positions`` (computed on the CPU, then moved to ``device``; None:
        left there): they are computed, not loaded, so a model built on the meta device gets them here once its
        weights are in place."""
        cfg = self.config
        self.rotary = RotaryEmbedding(cfg.qk_rope_head_dim or cfg.head_dim, max_positions, cfg.rope_theta,
                                      cfg.rope_scaling, dtype, cfg.rotary_dim)
        self.rotary_local = None
        if cfg.local_rope_theta is not None:
            self.rotary_local = RotaryEmbedding(cfg.head_dim, max_positions, cfg.local_rope_theta, None, dtype)
        self.rotary_none = RotaryEmbedding.identity(cfg.head_dim, max_positions, dtype) if cfg.nope_layers else None
        if device is not None:
            for rotary in (self.rotary, self.rotary_local, self.rotary_none):
                if rotary is not None:
                    rotary.to(device)

    def rotary_of(self, index: int) -> RotaryEmbedding:
        """Layer ``index``'s rotary tables: Gemma 3's sliding layers have their own (``rotary_local``), SmolLM3's NoPE
        layers the identity (``rotary_none``)."""
        if self.rotary_none is not None and index in self.config.nope_layers:
            return self.rotary_none
        if self.rotary_local is not None and index in self.config.sliding_layers:
            return self.rotary_local
        return self.rotary

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        images: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """input_ids, positions: [T] -> hidden states [T, D] after the final norm. ``images``: (rows, embeddings,
        M-RoPE positions [R, 3] or None) of a vision model's image tokens, which take the place of those rows' token
        embeddings (and, with M-RoPE, rotate by their temporal / height / width positions). With DeepStack the
        embeddings are [R, (1 + deepstack_layers) * D]: the input rows, then what each of the first layers adds."""
        step_rotary, deepstack = None, None
        if images is not None and images[2] is not None:
            step_rotary = mrope_rows(self.rotary, positions, images[0], images[2], self.mrope_columns)
            positions = torch.arange(len(positions), device=positions.device)
        if images is not None and self.config.deepstack_layers:
            rows, embeds, mrope = images
            deepstack = embeds[:, self.config.hidden_size :].unflatten(1, (self.config.deepstack_layers, -1))
            images = (rows, embeds[:, : self.config.hidden_size], mrope)
        x, residual = self.embed(input_ids), None
        # Granite multiplies the whole input (image rows too); Gemma scales its token embeddings only
        scale_images = self.config.architecture in ("GraniteForCausalLM", "GraniteMoeForCausalLM")
        if images is not None and scale_images:
            x = x.index_copy(0, images[0], images[1].to(x.dtype))
        if self.config.embed_scale != 1.0:
            x = x * self.config.embed_scale
        if images is not None and not scale_images:
            x = x.index_copy(0, images[0], images[1].to(x.dtype))
        fused = None  # the backend's whole-decode path (the C++ layer plan) takes token rows only
        if not meta.prefills and images is None:
            fused = self.ops.decode_layers(self, x, positions, kv_caches, meta)
        if fused is not None:
            x, residual = fused
        else:
            for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
                x, residual = layer(x, residual, positions, step_rotary or self.rotary_of(i), kv_cache, meta,
                                    self.ops)
                if deepstack is not None and i < self.config.deepstack_layers:
                    x = x.index_add(0, images[0], deepstack[:, i].to(x.dtype))  # the layer's output is x + residual
        x, _ = self.ops.add_rms_norm(x, residual, self.norm.weight, self.norm.eps)
        return x

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return self.embed_tokens(input_ids)
        # Vocab-parallel: a rank looks up the ids in its rows, zeros the others, and the ranks' rows are summed.
        local = input_ids - self.vocab_start
        inside = (local >= 0) & (local < self.embed_tokens.num_embeddings)
        x = self.embed_tokens(local * inside)
        x.mul_(inside.unsqueeze(-1).to(x.dtype))
        return self.tp.all_reduce(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """hidden: [S, D] (only the rows that sample) -> float32 logits [S, V]; with tensor parallelism on rank 0
        only (the others return None after sending their vocabulary shard's logits)."""
        if self.logits_proj is not None:
            logits = self.logits_proj(hidden).float()
        else:
            weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
            logits = F.linear(hidden, weight).float()
        if self.config.logits_scaling != 1.0:  # Granite
            logits = logits / self.config.logits_scaling
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits if self.tp is None else self.tp.gather_logits(logits, self.config.vocab_size)
