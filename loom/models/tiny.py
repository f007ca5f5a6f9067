"""Tiny random Llama-family models saved as HF folders, with a real tokenizer: for tests and fault runs on CPU.

    from loom.models.tiny import save_tiny_model
    save_tiny_model("/tmp/tiny", tokenizer_dir=resolve_model("smollm2"))     # 2 layers, hidden 64, ~3 M params
    loom serve --model /tmp/tiny
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    Glm4MoeConfig,
    Glm4MoeForCausalLM,
    GptOssConfig,
    GptOssForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    GraniteMoeConfig,
    GraniteMoeForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    SmolLM3Config,
    SmolLM3ForCausalLM,
)

TINY = dict(
    vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True, initializer_range=0.2,
    bos_token_id=1, eos_token_id=2, pad_token_id=2,
)  # fmt: skip


ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "phi3": (Phi3Config, Phi3ForCausalLM),
    "mixtral": (MixtralConfig, MixtralForCausalLM),
    "qwen2_moe": (Qwen2MoeConfig, Qwen2MoeForCausalLM),
    "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM),
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM),
    "smollm3": (SmolLM3Config, SmolLM3ForCausalLM),
    "granite": (GraniteConfig, GraniteForCausalLM),
    "olmo2": (Olmo2Config, Olmo2ForCausalLM),
    "gpt_oss": (GptOssConfig, GptOssForCausalLM),
    "glm4_moe": (Glm4MoeConfig, Glm4MoeForCausalLM),
    "granite_moe": (GraniteMoeConfig, GraniteMoeForCausalLM),
    "olmoe": (OlmoeConfig, OlmoeForCausalLM),
    "deepseek_v2": (DeepseekV2Config, DeepseekV2ForCausalLM),
    "deepseek_v3": (DeepseekV3Config, DeepseekV3ForCausalLM),
}
MOE = dict(num_local_experts=8, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64)
"""Mixture-of-experts settings the MoE configs take (each ignores the names it does not know)."""
GEMMA = dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=16)
"""Gemma's defaults (head_dim 256, window 4096) do not fit a tiny model; a 16-token window takes effect at once."""
SMOLLM3 = dict(no_rope_layer_interval=2)
"""Every second layer without rotary (SmolLM3-3B: every fourth; a 2-layer model would otherwise have none)."""
GRANITE = dict(embedding_multiplier=3.0, attention_multiplier=0.2, residual_multiplier=0.4, logits_scaling=2.5)
"""Granite's multipliers (the defaults, 1.0, would leave them untested; Granite-3.x-8B: 12, 0.0078125, 0.22, 16)."""
GPT_OSS = dict(head_dim=16, intermediate_size=64, num_local_experts=8, num_experts_per_tok=2, sliding_window=16,
               swiglu_limit=1.5, tie_word_embeddings=False,
               rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=4.0, beta_fast=32.0, beta_slow=1.0,
                                    truncate=False, original_max_position_embeddings=256))
"""gpt-oss at a tiny size: windowed and full layers in turn (window 16: it takes effect at once), a clamp the
experts' gate and up reach (gpt-oss-20b's is 7.0), and YaRN as the hub's configs set it (factor 32 over 4,096
there; 4 over 256 here, to the tiny context)."""
GLM4_MOE = dict(num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=2.5,
                use_qk_norm=True, attention_bias=True, tie_word_embeddings=False)
"""GLM-4.5 at a tiny size: a dense first layer, then sigmoid-routed experts in two groups (the best one kept) with a
shared expert, q/k norms, q/k/v biases and half of each head rotating (GLM-4.5-Air: 128 experts in one group, top-8,
scaling 1.0; GLM-4.5: 160, scaling 2.5)."""
GRANITE_MOE = {**GRANITE, "num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 64}
"""Granite's multipliers over experts of the MoE's width (its intermediate_size)."""
OLMOE = dict(num_experts=8, num_experts_per_tok=2, intermediate_size=64, norm_topk_prob=False)
"""OLMoE at a tiny size (OLMoE-1B-7B: 64 experts, top-8, weights not renormalised)."""
MLA = dict(num_hidden_layers=3, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
           v_head_dim=20, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, n_shared_experts=1,
           first_k_dense_replace=1, n_group=2, topk_group=1, tie_word_embeddings=False)
"""Multi-head latent attention at a tiny size, a dense first layer, then routed experts in two groups (the best one
kept) with a shared expert (DeepSeek-V3: 128 heads, latent 512 + rotary 64, nope 128, v 128; 256 experts in 8
groups, top-8 of the best 4 groups; DeepSeek-V2-Lite: 16 heads, no query bottleneck, 64 experts top-6)."""
DEEPSEEK_V2 = {**MLA, "q_lora_rank": None, "topk_method": "group_limited_greedy", "routed_scaling_factor": 2.0}
"""DeepSeek-V2's softmax router limited to the best group, its weights scaled; queries without a bottleneck (as
V2-Lite's)."""
DEEPSEEK_V3 = {**MLA, "q_lora_rank": 48, "routed_scaling_factor": 2.5,
               "rope_parameters": dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, mscale=1.0,
                                       mscale_all_dim=1.0, original_max_position_embeddings=256)}
"""DeepSeek-V3 with a query bottleneck and YaRN as its hub config sets it (factor 40 over 4,096 there), whose
mscale_all_dim also scales every score."""


def save_tiny_model(path: str | Path, tokenizer_dir: str | Path, arch: str = "llama", seed: int = 0,
                    **overrides) -> Path:
    """A tiny random model of ``arch`` (one of ARCHS) with the tokenizer (and chat template) of ``tokenizer_dir``."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
    torch.manual_seed(seed)
    config_cls, model_cls = ARCHS[arch]
    model = model_cls(config_cls(**{**TINY, **_arch_settings(arch), **overrides})).eval()
    if arch in ("gpt_oss", "glm4_moe", "deepseek_v3"):  # sinks drawn like every weight (std 0.2) would hardly move
        with torch.no_grad():  # a softmax (gpt-oss' own are ~1-5), and biases left at zero would go untested
            for name, param in [*model.named_parameters(), *model.named_buffers()]:
                if name.endswith("sinks"):
                    param.normal_(2.0, 1.5)
                elif name.endswith("bias"):  # GLM's router correction too: it changes which experts are chosen
                    param.normal_(0.0, 0.3)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(path)
    return Path(path)


def _arch_settings(arch: str) -> dict:
    """The settings a tiny ``arch`` model needs beside TINY (the ones whose defaults would not be tested)."""
    return {"smollm3": SMOLLM3, "granite": GRANITE, "gpt_oss": GPT_OSS, "glm4_moe": GLM4_MOE,
            "granite_moe": GRANITE_MOE, "olmoe": OLMOE, "deepseek_v2": DEEPSEEK_V2, "deepseek_v3": DEEPSEEK_V3
            }.get(arch) or (
        MOE if arch in ("mixtral", "qwen2_moe", "qwen3_moe") else GEMMA if arch.startswith("gemma") else {})


def save_mxfp4_copy(folder: str | Path, target: str | Path, expanded_copy: str | Path | None = None) -> Path:
    """A gpt-oss folder's copy with its experts stored as the hub's checkpoints store them: MXFP4 blocks and scales
    ([E, out, in / 32, 16] / [E, out, in / 32], ``loom.models.mxfp4.quantize_mxfp4``), and the quantization config.
    ``expanded_copy``: also a float copy holding the MXFP4 values expanded (the weights transformers runs with
    ``Mxfp4Config(dequantize=True)``)."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from loom.models.mxfp4 import dequantize_mxfp4, quantize_mxfp4

    folder, target = Path(folder), Path(target)
    shutil.copytree(folder, target)
    quantized, expanded = {}, {}
    for name, tensor in load_file(folder / "model.safetensors").items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = quantize_mxfp4(tensor.transpose(1, 2))  # transformers holds them [E, in, out]
            quantized[name + "_blocks"], quantized[name + "_scales"] = blocks, scales
            expanded[name] = dequantize_mxfp4(blocks, scales).transpose(1, 2).contiguous()
        else:
            quantized[name] = expanded[name] = tensor
    save_file(quantized, target / "model.safetensors", metadata={"format": "pt"})
    if expanded_copy is not None:
        shutil.copytree(folder, expanded_copy)
        save_file(expanded, Path(expanded_copy) / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((target / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (target / "config.json").write_text(json.dumps(config))
    return target


LLAVA_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}{{ part['text'] + ' ' }}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
"""llava-hf's chat template layout (images first in a turn, then its text; it loops over content parts)."""


ANYRES_PINPOINTS = [[32, 64], [64, 32], [64, 64], [32, 96]]
"""The tiny LLaVA-NeXT's AnyRes resolutions (height, width): grids of 1 x 2, 2 x 1, 2 x 2 and 1 x 3 tiles of 32."""


def save_tiny_vision_model(path: str | Path, tokenizer_dir: str | Path, tower: str = "clip", arch: str = "llama",
                           seed: int = 0, anyres: bool = False, onevision: bool = False, **overrides) -> Path:
    """A tiny random LLaVA (``LlavaForConditionalGeneration``; with ``anyres``, a LLaVA-NeXT,
    ``LlavaNextForConditionalGeneration``, tiled by ANYRES_PINPOINTS; with ``onevision``, a LLaVA-OneVision, tiled
    the same, ``anyres_max_1`` so that a grid of more than one tile's rows is scaled down): a 2-layer CLIP or SigLIP
    tower on 32x32 images (patch 8: 16 patches), the projector, and a tiny ``arch`` language model, with ``<image>``
    added to the tokenizer and llava-hf's processor files and chat template. ``overrides`` go to the model's
    config. (OneVision's processor needs torchvision for videos: its image processor and tokenizer are saved
    alone.)"""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaProcessor,
        SiglipImageProcessor,
        SiglipVisionConfig,
    )

    torch.manual_seed(seed)
    tokenizer, image_id = image_tokenizer(tokenizer_dir)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    if tower == "clip":
        vision_config, processor = CLIPVisionConfig(**vision), CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        strategy, extra_tokens = "default", 1  # CLIP's CLS row is dropped
    elif tower == "siglip":
        vision_config, processor = SiglipVisionConfig(**vision), SiglipImageProcessor(size={"height": 32, "width": 32})
        strategy, extra_tokens = "full", 0
    else:
        raise ValueError(f"tower must be clip or siglip, got {tower!r}")
    config_cls, _ = ARCHS[arch]
    text = config_cls(**{**TINY, **_arch_settings(arch), "vocab_size": 49216})
    settings = dict(vision_feature_layer=-2, vision_feature_select_strategy=strategy, projector_hidden_act="gelu",
                    tie_word_embeddings=True)
    if onevision:
        config = LlavaOnevisionConfig(vision_config=vision_config, text_config=text, image_token_id=image_id,
                                      image_grid_pinpoints=ANYRES_PINPOINTS, vision_aspect_ratio="anyres_max_1",
                                      **{**settings, **overrides})
        model = LlavaOnevisionForConditionalGeneration(config).eval()
        processor = LlavaOnevisionImageProcessor(size={"height": 32, "width": 32},
                                                 image_grid_pinpoints=ANYRES_PINPOINTS)
        processor_cls = None
    elif anyres:
        if tower != "clip":
            raise ValueError("the tiny LLaVA-NeXT has a CLIP tower")
        config = LlavaNextConfig(vision_config=vision_config, text_config=text, image_token_id=image_id,
                                 image_grid_pinpoints=ANYRES_PINPOINTS, **{**settings, **overrides})
        model = LlavaNextForConditionalGeneration(config).eval()
        processor = LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                            image_grid_pinpoints=ANYRES_PINPOINTS)
        processor_cls = LlavaNextProcessor
    else:
        config = LlavaConfig(vision_config=vision_config, text_config=text, image_token_id=image_id,
                             **{**settings, **overrides})
        model = LlavaForConditionalGeneration(config).eval()
        processor_cls = LlavaProcessor
    with torch.no_grad():  # transformers' init leaves the projector's rows tiny next to the embeddings: scale it up
        for p in model.model.multi_modal_projector.parameters():
            p.normal_(0, 0.3)
        if anyres or onevision:
            model.model.image_newline.normal_(0, 1)
    return save_vision_folder(path, model, tokenizer, processor, processor_cls, 8, strategy, extra_tokens)


def tokenizer_with(tokenizer_dir: str | Path, tokens: list[str]):
    """``tokenizer_dir``'s tokenizer with ``tokens`` added as special tokens (49152 on in SmolLM2's)."""
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer.add_special_tokens({"additional_special_tokens": tokens})
    return tokenizer


def image_tokenizer(tokenizer_dir: str | Path):
    """``tokenizer_dir``'s tokenizer with ``<image>`` added (49152 in SmolLM2's, so a vocabulary of 49216 holds it),
    and the token's id."""
    tokenizer = tokenizer_with(tokenizer_dir, ["<image>"])
    return tokenizer, tokenizer.convert_tokens_to_ids("<image>")


def save_vision_folder(path: str | Path, model, tokenizer, image_processor, processor_cls, patch_size: int,
                       strategy: str, extra_tokens: int) -> Path:
    """A vision model's folder as llava-hf lays one out: the weights, the tokenizer with llava-hf's chat template, and
    the processor (``processor_cls`` None: the image processor alone, for processors that need torchvision)."""
    model.save_pretrained(path)
    tokenizer.chat_template = LLAVA_TEMPLATE
    if processor_cls is None:
        image_processor.save_pretrained(path)
        tokenizer.save_pretrained(path)
    else:
        processor_cls(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                      image_token="<image>", vision_feature_select_strategy=strategy,
                      num_additional_image_tokens=extra_tokens, chat_template=LLAVA_TEMPLATE).save_pretrained(path)
    return Path(path)


QWEN_VL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}{% if message['content'] is string %}"
    "{{ message['content'] + '<|im_end|>\n' }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{{ '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""Qwen2-VL's chat template (images as ``<|vision_start|><|image_pad|><|vision_end|>`` where they stand in a turn),
without its video and numbering options."""

QWEN_VL_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def save_tiny_qwen_vl(path: str | Path, tokenizer_dir: str | Path, version: str = "2", seed: int = 0,
                      min_pixels: int = 32 * 32, max_pixels: int = 64 * 96, **overrides) -> Path:
    """A tiny random Qwen2-VL (``version`` "2"), Qwen2.5-VL ("2.5"), Qwen3-VL ("3") or Qwen3-VL-MoE ("3-moe": 4
    experts, top 2, held fused and input-major as the hub's files hold them; its own LM head): a 2-layer vision
    transformer (Qwen3-VL: 3 layers, the first two's features fed to the language model's first two layers:
    DeepStack) on 8-pixel patches merged 2 x 2 (a token per 16 x 16 pixels of the resized picture, which has between
    ``min_pixels`` and ``max_pixels``), and a 2-layer Qwen2 language model (Qwen3-VL: Qwen3) with M-RoPE (head 16:
    sections 2, 3, 3; Qwen3-VL's interleaved), with Qwen2-VL's vision tokens added to the ``tokenizer_dir``
    tokenizer, its chat template and image processor. ``overrides`` go to the model's config. Saved as transformers
    saves it: the hub's layout (Qwen2-VL: ``model.*``, ``visual.*``; Qwen3-VL: ``model.language_model.*``,
    ``model.visual.*``)."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLMoeConfig,
        Qwen3VLMoeForConditionalGeneration,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    torch.manual_seed(seed)
    tokenizer = tokenizer_with(tokenizer_dir, QWEN_VL_TOKENS)
    start, end, image, video = tokenizer.convert_tokens_to_ids(QWEN_VL_TOKENS)
    text = dict(vocab_size=49216, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    vision = dict(depth=2, num_heads=2, patch_size=8, spatial_merge_size=2, temporal_patch_size=2)
    if version == "2":
        config_cls, model_cls = Qwen2VLConfig, Qwen2VLForConditionalGeneration
        vision.update(embed_dim=32, hidden_size=64, mlp_ratio=2)
    elif version == "2.5":
        config_cls, model_cls = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        # windows of 32 pixels (2 x 2 merged patches); the second block attends over the whole picture
        vision.update(hidden_size=32, intermediate_size=64, out_hidden_size=64, window_size=32,
                      fullatt_block_indexes=[1])
    elif version in ("3", "3-moe"):
        config_cls, model_cls = Qwen3VLConfig, Qwen3VLForConditionalGeneration
        text.update(head_dim=16)
        if version == "3-moe":  # 4 experts of width 48, top-2 (48 x 2 is no multiple of the hidden size 64)
            config_cls, model_cls = Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration
            text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48)
            overrides = {"tie_word_embeddings": False, **overrides}  # the hub's: its own head
        text["rope_parameters"]["mrope_interleaved"] = True
        vision.update(depth=3, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_position_embeddings=64,
                      deepstack_visual_indexes=[0, 1])
    else:
        raise ValueError(f"version must be 2, 2.5, 3 or 3-moe, got {version!r}")
    config = config_cls(text_config=text, vision_config=vision, image_token_id=image, video_token_id=video,
                        vision_start_token_id=start, vision_end_token_id=end,
                        **{"tie_word_embeddings": True, **overrides})
    model = model_cls(config).eval()
    with torch.no_grad():  # transformers' init leaves the rows small next to the embeddings: widen them
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    model.save_pretrained(path)
    if version == "3-moe":  # the hub's files hold each expert's matrix input-major: [E, H, 2I], [E, I, H]
        from safetensors.torch import load_file, save_file

        file = Path(path) / "model.safetensors"
        tensors = load_file(str(file))
        save_file({name: t.transpose(1, 2).contiguous() if ".mlp.experts." in name else t
                   for name, t in tensors.items()}, str(file), metadata={"format": "pt"})
    Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, temporal_patch_size=2,
                             size={"shortest_edge": min_pixels, "longest_edge": max_pixels}).save_pretrained(path)
    tokenizer.chat_template = QWEN_VL_TEMPLATE
    tokenizer.save_pretrained(path)
    return Path(path)


IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
"""SmolVLM's chat template (Idefics3's layout: ``User:<image>text<end_of_utterance>``)."""

IDEFICS3_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
                   *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7))]


def save_tiny_idefics3(path: str | Path, tokenizer_dir: str | Path, seed: int = 0, longest_edge: int = 64,
                       split: bool = True, smolvlm: bool = False, **overrides) -> Path:
    """A tiny random Idefics3 (SmolVLM's architecture; ``smolvlm``: SmolVLM2's ``SmolVLMForConditionalGeneration``):
    a 2-layer tower on 32-pixel tiles (8-pixel patches, pixel shuffle by 2: 4 rows a tile), a pictures' longest side
    resized to ``longest_edge`` (64: up to 2 x 2 tiles and the global view), and a tiny Llama language model, with
    Idefics3's tokens added to the ``tokenizer_dir`` tokenizer, SmolVLM's chat template and the processor (SmolVLM2's
    image processor alone: its processor needs num2words). ``overrides`` go to the model's config."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3Processor,
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
    )
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    torch.manual_seed(seed)
    tokenizer = tokenizer_with(tokenizer_dir, IDEFICS3_TOKENS)
    text = {**TINY, "model_type": "llama", "vocab_size": 49216}
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    config_cls, model_cls = (SmolVLMConfig, SmolVLMForConditionalGeneration) if smolvlm else (
        Idefics3Config, Idefics3ForConditionalGeneration)
    config = config_cls(text_config=text, vision_config=vision, scale_factor=2,
                        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), tie_word_embeddings=True,
                        **overrides)
    model = model_cls(config).eval()
    with torch.no_grad():  # transformers' init leaves the connector's rows small next to the embeddings
        model.model.connector.modality_projection.proj.weight.normal_(0, 0.3)
    model.save_pretrained(path)
    images = (SmolVLMImageProcessorPil if smolvlm else Idefics3ImageProcessorPil)(
        size={"longest_edge": longest_edge}, max_image_size={"longest_edge": 32}, do_image_splitting=split)
    if smolvlm:
        images.save_pretrained(path)
    else:
        Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=4,
                          chat_template=IDEFICS3_TEMPLATE).save_pretrained(path)
    tokenizer.chat_template = IDEFICS3_TEMPLATE
    tokenizer.save_pretrained(path)
    return Path(path)


GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
"""Gemma 3's chat template, as far as the turns and pictures go (``<start_of_turn>user\\n<start_of_image>text``)."""

GEMMA3_MARKERS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}


def gemma3_tokenizer(tokenizer_dir: str | Path):
    """``tokenizer_dir``'s tokenizer with Gemma 3's image markers and turn tokens (special, 49152 on), and runs of 1 to
    31 newlines as tokens of their own, as Gemma's tokenizer has them (so "\\n" + "\\n\\n" is one token written as
    text: what the processor's expansion merges into)."""
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), extra_special_tokens=GEMMA3_MARKERS)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tokenizer.add_tokens(["\n" * k for k in range(31, 0, -1)])
    return tokenizer


def save_tiny_gemma3_vision(path: str | Path, tokenizer_dir: str | Path, seed: int = 0, window: int = 8,
                            **overrides) -> Path:
    """A tiny random Gemma 3 vision model (``Gemma3ForConditionalGeneration``): a 2-layer SigLIP tower on 64-pixel
    pictures (8-pixel patches, 8 x 8), pooled 2 x 2 to 16 tokens an image, and a Gemma 3 text model of a sliding
    layer (``window`` tokens: shorter than an image, so the window clips its both-ways attention) and a global one,
    with ``gemma3_tokenizer``, Gemma 3's chat template and the processor. ``overrides`` go to the model's config."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    torch.manual_seed(seed)
    tokenizer = gemma3_tokenizer(tokenizer_dir)
    text = {**TINY, **GEMMA, "model_type": "gemma3_text", "vocab_size": 49216, "sliding_window": window,
            "layer_types": ["sliding_attention", "full_attention"]}
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                  patch_size=8)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=16,
                          boi_token_index=tokenizer.boi_token_id, eoi_token_index=tokenizer.eoi_token_id,
                          image_token_index=tokenizer.image_token_id, **overrides)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # transformers' init leaves the projector at zero: images would add nothing
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.3)
    model.save_pretrained(path)
    images = Gemma3ImageProcessorPil(size={"height": 64, "width": 64})
    Gemma3Processor(image_processor=images, tokenizer=tokenizer, image_seq_length=16,
                    chat_template=GEMMA3_TEMPLATE).save_pretrained(path)
    tokenizer.chat_template = GEMMA3_TEMPLATE
    tokenizer.save_pretrained(path)
    return Path(path)


MISTRAL3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}[INST]"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '[IMG]' }}{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}[/INST]{% else %}{{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
"""Mistral's chat template, as far as the turns and pictures go (``[INST][IMG]text[/INST]``)."""

PIXTRAL_TOKENS = ["[IMG]", "[IMG_BREAK]", "[IMG_END]", "[INST]", "[/INST]"]


def save_tiny_mistral3(path: str | Path, tokenizer_dir: str | Path, seed: int = 0, pixtral: bool = False,
                       **overrides) -> Path:
    """A tiny random Mistral 3 (``Mistral3ForConditionalGeneration``: a 2-layer Pixtral tower on 8-pixel patches, 2 x 2
    merged, so a token per 16 x 16 pixels, pictures' longest side at most 64) with a tiny Mistral language model; or,
    ``pixtral``, Pixtral 12B's layout (``LlavaForConditionalGeneration`` on a Pixtral tower, LLaVA's projector, a token
    per 8 x 8 pixels, longest side 48). Pixtral's tokens added to the ``tokenizer_dir`` tokenizer, Mistral's chat
    template and the image processor. ``overrides`` go to the model's config."""
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        Mistral3Config,
        Mistral3ForConditionalGeneration,
    )
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    torch.manual_seed(seed)
    tokenizer = tokenizer_with(tokenizer_dir, PIXTRAL_TOKENS)
    # an LM head of its own, as Mistral Small 3.1's and Pixtral 12B's
    text = {**TINY, "model_type": "mistral", "vocab_size": 49216, "head_dim": 16, "sliding_window": None,
            "tie_word_embeddings": False}
    vision = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, head_dim=16, image_size=64, patch_size=8)
    image_token = tokenizer.convert_tokens_to_ids("[IMG]")
    if pixtral:
        config = LlavaConfig(**{"text_config": text, "vision_config": vision, "image_token_index": image_token,
                                "vision_feature_select_strategy": "full", "vision_feature_layer": -1,
                                "projector_hidden_act": "gelu", "tie_word_embeddings": False, **overrides})
        model = LlavaForConditionalGeneration(config).eval()
        longest = 48
        hub = False
    else:
        config = Mistral3Config(**{"text_config": text, "vision_config": vision, "image_token_index": image_token,
                                   "spatial_merge_size": 2, "vision_feature_layer": -1, "tie_word_embeddings": False,
                                   **overrides})
        model = Mistral3ForConditionalGeneration(config).eval()
        hub = True  # the hub's config.json leaves the top-level tie flag out (transformers' default: True)
        longest = 64
    with torch.no_grad():  # transformers' init leaves the projector's rows small next to the embeddings
        model.model.multi_modal_projector.linear_2.weight.normal_(0, 0.3)
    model.save_pretrained(path)
    if hub:
        import json

        saved = json.loads((Path(path) / "config.json").read_text())
        saved.pop("tie_word_embeddings", None)
        (Path(path) / "config.json").write_text(json.dumps(saved, indent=2))
    # the image processor alone: transformers' PixtralProcessor needs torchvision
    PixtralImageProcessorPil(size={"longest_edge": longest}, patch_size={"height": 8, "width": 8}).save_pretrained(path)
    tokenizer.chat_template = MISTRAL3_TEMPLATE
    tokenizer.save_pretrained(path)
    return Path(path)
