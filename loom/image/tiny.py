"""Small Stable-Diffusion-shaped components built from configs: tiny random ones for tests, the demo's sizes.

The shapes follow diffusers' own ``get_dummy_components`` (UNet2DConditionModel with cross-attention, AutoencoderKL,
CLIPTextModel); the tokenizer is CLIP's real vocabulary built offline (``loom.image.tokenizer``).

    from loom.image.tiny import tiny_pipeline
    pipe = tiny_pipeline(seed=0)          # a StableDiffusionPipeline of random weights, ~1 s on CPU
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from loom.image.tokenizer import load_clip_tokenizer


@dataclass(slots=True)
class TinySpec:
    """Sizes of a small SD-shaped model; the defaults are diffusers' dummy test components."""

    unet_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 2
    cross_attention_dim: int = 32
    attention_head_dim: int = 8
    norm_num_groups: int = 32
    sample_size: int = 32
    """Latent side the UNet was made for (pixels = sample_size * vae_scale_factor)."""
    vae_channels: tuple[int, ...] = (32, 64)
    latent_channels: int = 4
    text_hidden: int = 32
    text_layers: int = 5
    text_heads: int = 4
    in_channels: int = 3

    def __post_init__(self):
        if any(c % self.norm_num_groups for c in self.unet_channels + self.vae_channels):
            raise ValueError(f"every channel count must be a multiple of norm_num_groups={self.norm_num_groups}")
        if self.text_hidden % self.text_heads:
            raise ValueError(f"text_hidden={self.text_hidden} must be a multiple of text_heads={self.text_heads}")


def build_unet(spec: TinySpec):
    from diffusers import UNet2DConditionModel  # optional: diffusers comes with the image extra

    n = len(spec.unet_channels)
    return UNet2DConditionModel(
        block_out_channels=spec.unet_channels,
        layers_per_block=spec.layers_per_block,
        sample_size=spec.sample_size,
        in_channels=spec.latent_channels,
        out_channels=spec.latent_channels,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=spec.cross_attention_dim,
        attention_head_dim=spec.attention_head_dim,
        norm_num_groups=spec.norm_num_groups,
    )


def build_vae(spec: TinySpec):
    from diffusers import AutoencoderKL  # optional: diffusers comes with the image extra

    n = len(spec.vae_channels)
    return AutoencoderKL(
        block_out_channels=spec.vae_channels,
        in_channels=spec.in_channels,
        out_channels=spec.in_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        latent_channels=spec.latent_channels,
        norm_num_groups=spec.norm_num_groups,
        sample_size=spec.sample_size * 2 ** (n - 1),
    )


def build_text_encoder(spec: TinySpec):
    config = CLIPTextConfig(
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_hidden * 4,
        num_attention_heads=spec.text_heads,
        num_hidden_layers=spec.text_layers,
        projection_dim=spec.text_hidden,
        vocab_size=49408,
        max_position_embeddings=77,
        layer_norm_eps=1e-5,
    )
    model = CLIPTextModel(config)
    # A trained CLIP's final LayerNorm has a learned bias; a zero one makes every token's states average to 0,
    # which prompt weighting's mean restoration (loom.image.text_encoding) cannot divide by.
    torch.nn.init.normal_(model.final_layer_norm.bias, std=0.5)
    return model


def build_scheduler():
    """SD's own training schedule (scaled_linear betas): every sampler starts from a usable t=999."""
    from diffusers import DDPMScheduler  # optional: diffusers comes with the image extra

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                         clip_sample=False, steps_offset=1)


def tiny_components(seed: int = 0, spec: TinySpec | None = None) -> dict:
    """The components dict of a StableDiffusionPipeline, random weights fixed by ``seed``."""
    from diffusers import EulerDiscreteScheduler  # optional: diffusers comes with the image extra

    spec = spec or TinySpec()
    torch.manual_seed(seed)
    unet = build_unet(spec)
    torch.manual_seed(seed)
    vae = build_vae(spec)
    torch.manual_seed(seed)
    text_encoder = build_text_encoder(spec)
    scheduler = EulerDiscreteScheduler.from_config(build_scheduler().config)
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": load_clip_tokenizer(),
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
    }


def tiny_pipeline(seed: int = 0, spec: TinySpec | None = None):
    """A StableDiffusionPipeline of tiny random components (for tests and CPU benchmarks)."""
    from diffusers import StableDiffusionPipeline  # optional: diffusers comes with the image extra

    return StableDiffusionPipeline(**tiny_components(seed, spec), requires_safety_checker=False)


def save_tiny_model(path: str, seed: int = 0, spec: TinySpec | None = None) -> str:
    """Write a tiny random pipeline as a diffusers folder (what ``--model PATH`` loads)."""
    tiny_pipeline(seed, spec).save_pretrained(path, safe_serialization=True)
    return path


def _tiny_sdxl_unet(seed: int, pooled_and_time_ids: int, cross_attention_dim: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=pooled_and_time_ids, cross_attention_dim=cross_attention_dim,
        norm_num_groups=1,
    )


def tiny_sdxl_pipeline(seed: int = 0):
    """A StableDiffusionXLPipeline of tiny random components (two text encoders, text-time conditioning)."""
    # optional: diffusers comes with the image extra
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline

    unet = _tiny_sdxl_unet(seed, pooled_and_time_ids=80, cross_attention_dim=64)  # 6 time ids x 8 + 32 pooled
    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, sample_size=128)
    config = CLIPTextConfig(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=32,
                            intermediate_size=37, num_attention_heads=4, num_hidden_layers=5, projection_dim=32,
                            vocab_size=49408, hidden_act="gelu")
    torch.manual_seed(seed)
    text_encoder, text_encoder_2 = CLIPTextModel(config), CLIPTextModelWithProjection(config)
    tokenizer = load_clip_tokenizer()
    pipe = StableDiffusionXLPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), text_encoder_2=text_encoder_2.eval(), tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet.eval(), scheduler=EulerDiscreteScheduler.from_config(build_scheduler().config),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_refiner(base, seed: int = 1):
    """A StableDiffusionXLImg2ImgPipeline shaped like SDXL's refiner (encoder 2 only, aesthetic-score conditioning),
    sharing ``base``'s VAE, tokenizer and second text encoder (the real refiner ships its own copies of them)."""
    # optional: diffusers comes with the image extra
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline

    # 72 = 5 time ids (sizes, crop, aesthetic score) x 8 + the 32-wide pooled text embedding
    unet = _tiny_sdxl_unet(seed, pooled_and_time_ids=72, cross_attention_dim=32)
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=base.vae, text_encoder=None, text_encoder_2=base.text_encoder_2, tokenizer=None,
        tokenizer_2=base.tokenizer_2, unet=unet.eval(), requires_aesthetics_score=True,
        scheduler=EulerDiscreteScheduler.from_config(build_scheduler().config),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_controlnet(unet, folder: str, seed: int = 1, vae_scale_factor: int = 2) -> str:
    """A ControlNet for ``unet`` with random (not zero) output convolutions, so it changes the image; its condition
    embedding downsamples by ``vae_scale_factor`` (the tiny VAEs here: 2). Saved as a diffusers folder."""
    from diffusers import ControlNetModel  # optional: diffusers comes with the image extra

    torch.manual_seed(seed)
    stages = (16, 32, 64, 128)[: vae_scale_factor.bit_length()]  # one stride-2 convolution per stage after the first
    model = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=stages)
    for name, param in model.named_parameters():  # diffusers starts these at zero: the ControlNet would do nothing
        if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
            torch.nn.init.normal_(param, std=0.1)
    model.save_pretrained(folder)
    return folder


def save_tiny_depth_estimator(folder: str, seed: int = 0) -> str:
    """A tiny random DPT depth estimator (transformers' DPTForDepthEstimation + its image processor) as a folder."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    config = DPTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                       intermediate_size=37, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[16, 16, 16, 16],
                       fusion_hidden_size=16, reassemble_factors=[4, 2, 1, 0.5], is_hybrid=False)
    torch.manual_seed(seed)
    DPTForDepthEstimation(config).eval().save_pretrained(folder)
    DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False).save_pretrained(folder)
    return folder


def save_tiny_ip_adapter(unet, folder: str, seed: int = 3, image_embed_dim: int = 32) -> str:
    """A random IP-Adapter for ``unet`` in h94/IP-Adapter's layout: ``ip-adapter.safetensors`` (the image projection
    to 4 tokens and each cross-attention's to_k_ip / to_v_ip, keyed as diffusers' loader reads them) and
    ``image_encoder/`` (a tiny CLIPVisionModelWithProjection with a 32-pixel image processor)."""
    from pathlib import Path

    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    out = Path(folder)
    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=4, projection_dim=image_embed_dim)
    CLIPVisionModelWithProjection(config).eval().save_pretrained(out / "image_encoder")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        out / "image_encoder")
    state = ip_adapter_state_dict(unet, image_embed_dim)
    tensors = {f"{part}.{key}": value for part, values in state.items() for key, value in values.items()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "ip-adapter.safetensors"))
    return folder


def ip_adapter_state_dict(unet, image_embed_dim: int) -> dict:
    """Random IP-Adapter weights for ``unet`` as diffusers' loader takes them: {"image_proj": {...}, "ip_adapter":
    {"1.to_k_ip.weight", ...}} (an image projection to 4 tokens; to_k_ip / to_v_ip per cross-attention layer)."""
    cross = unet.config.cross_attention_dim
    tensors = {"image_proj.proj.weight": torch.randn(cross * 4, image_embed_dim) * 0.2,
               "image_proj.proj.bias": torch.randn(cross * 4) * 0.2,
               "image_proj.norm.weight": torch.ones(cross), "image_proj.norm.bias": torch.zeros(cross)}
    channels = list(unet.config.block_out_channels)
    key_id = 1
    for name in unet.attn_processors:  # diffusers numbers the cross-attention layers 1, 3, 5, ... in this order
        if name.endswith("attn1.processor"):
            continue
        block = name.split(".")
        hidden = (channels[-1] if block[0] == "mid_block" else
                  channels[int(block[1])] if block[0] == "down_blocks" else channels[::-1][int(block[1])])
        for kind in ("to_k_ip", "to_v_ip"):
            tensors[f"ip_adapter.{key_id}.{kind}.weight"] = torch.randn(hidden, cross) * 0.2
        key_id += 2
    state: dict = {"image_proj": {}, "ip_adapter": {}}
    for key, value in tensors.items():
        part, _, rest = key.partition(".")
        state[part][rest] = value
    return state
