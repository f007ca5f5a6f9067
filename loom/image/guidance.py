"""Fooocus' sampling tweaks on a diffusers pipeline: sharpness, adaptive CFG and SDXL ADM size scaling.

They act on every UNet call of one job through hooks on the (shared) UNet, installed only while the job samples and
only when some setting is not neutral, so neutral settings run the pipeline exactly as diffusers does:

- **sharpness**: the positive noise prediction is blended with a copy filtered by a joint bilateral filter guided by
  the predicted clean latent (edges of the picture stop the blur), weight ``0.001 * sharpness * progress``. Fooocus'
  anisotropic self-attention-guidance substitute: removing a little of the smooth part of the prediction makes the
  sampler put detail back.
- **adaptive CFG**: above ``adaptive_cfg``, guidance ``g`` is replaced by ``progress * g + (1 - progress) *
  adaptive_cfg``: the first steps, which fix colours and layout, see the milder scale and do not burn.
- **ADM scaling** (SDXL): while ``progress < adm_scaler_end``, the positive rows of the size conditioning say
  "originally ``adm_scaler_positive`` times this size" and the negative rows ``adm_scaler_negative`` times it (SDXL
  learned that small originals look blurry and upscaled).

``progress = 1 - t / (T - 1)`` for the UNet's timestep ``t`` of ``T`` training steps: 0 at pure noise, 1 at the end.
NOTE: like Fooocus, sharpness therefore weighs most late in sampling and adaptive CFG acts most early.

The pipeline mixes ``u + g * (c - u)`` itself; the output hook returns ``c' = u + (g_eff / g) * (c_sharp - u)`` in
place of the positive prediction, so the pipeline's own mix yields ``u + g_eff * (c_sharp - u)``.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from loom.image.presets import SamplingTweaks

FILTER_RADIUS = 6
"""13 x 13 window, as Fooocus' filter."""
FILTER_SIGMA_SPACE = 3.0
FILTER_SIGMA_COLOR = 3.0


def gaussian_window(radius: int, sigma: float, device=None) -> torch.Tensor:
    """[(2r+1)^2] spatial weights of a (2r+1) x (2r+1) Gaussian window, flattened row by row."""
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return (g[:, None] * g[None, :]).flatten()


def joint_bilateral_filter(x: torch.Tensor, guide: torch.Tensor, radius: int = FILTER_RADIUS,
                           sigma_space: float = FILTER_SIGMA_SPACE,
                           sigma_color: float = FILTER_SIGMA_COLOR) -> torch.Tensor:
    """x, guide: [B, C, H, W]. Each pixel of ``x`` becomes a weighted mean of its window; a neighbour's weight is
    spatial Gaussian x exp(-d^2 / 2 sigma_color^2), d the L1 distance over channels of the standardized ``guide``."""
    B, C, H, W = x.shape
    r = max(0, min(radius, H - 1, W - 1))  # reflect padding needs r < side
    std, mean = torch.std_mean(guide, dim=(1, 2, 3), keepdim=True)
    g = (guide - mean) / (std + 1e-5)

    def windows(t: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, C, H, W, K]
        return F.pad(t, (r, r, r, r), mode="reflect").unfold(2, 2 * r + 1, 1).unfold(3, 2 * r + 1, 1).flatten(-2)

    distance = (windows(g) - g[..., None]).abs().sum(1, keepdim=True)  # [B, 1, H, W, K]
    weights = torch.exp(-0.5 * distance.square() / sigma_color**2) * gaussian_window(r, sigma_space, x.device)
    return (windows(x) * weights).sum(-1) / weights.sum(-1)


class TweakHooks:
    """What the UNet hooks need to know about one sampler run."""

    def __init__(self, pipe, tweaks: SamplingTweaks, guidance: float):
        self.pipe, self.tweaks, self.guidance = pipe, tweaks, guidance

    def progress(self, timestep: torch.Tensor) -> float:
        t = float(timestep.flatten()[0])
        return 1.0 - t / (self.pipe.scheduler.config.num_train_timesteps - 1)

    def alpha_bar(self, timestep: torch.Tensor) -> float:
        """ᾱ at ``timestep`` (interpolated: Karras schedules pass fractional timesteps)."""
        table = self.pipe.scheduler.alphas_cumprod
        t = min(max(float(timestep.flatten()[0]), 0.0), len(table) - 1.0)
        low = int(t)
        high = min(low + 1, len(table) - 1)
        return float(table[low] + (t - low) * (table[high] - table[low]))

    # ------------------------------------------------------------ ADM (SDXL size conditioning)
    def before(self, module, args, kwargs):
        cond = kwargs.get("added_cond_kwargs")
        if not cond or "time_ids" not in cond or self.progress(args[1]) >= self.tweaks.adm_scaler_end:
            return args, kwargs
        # ids: [2B, 6] (orig h, orig w, crop top, crop left, target h, target w; the refiner's 5th is an aesthetic
        # score). NOTE: diffusers lays the rows out as [negative, positive] * B while the UNet batch is
        # [uncond * B; cond * B], so the rows are rebuilt from the first pair in the batch's order.
        ids = cond["time_ids"]
        rows = ids.shape[0]
        if self.pipe.do_classifier_free_guidance:
            negative = _scale_size(ids[0], self.tweaks.adm_scaler_negative)
            positive = _scale_size(ids[1], self.tweaks.adm_scaler_positive)
            ids = torch.stack([negative] * (rows // 2) + [positive] * (rows // 2))
        else:
            ids = _scale_size(ids[0], self.tweaks.adm_scaler_positive).repeat(rows, 1)
        return args, kwargs | {"added_cond_kwargs": cond | {"time_ids": ids}}

    # ------------------------------------------------------------ sharpness + adaptive CFG
    def after(self, module, args, kwargs, output):
        if not self.pipe.do_classifier_free_guidance:
            return output
        pred = output[0] if isinstance(output, tuple) else output.sample  # [2B, C, h, w]: [uncond; cond]
        uncond, cond = pred.chunk(2)
        sample, timestep = args[0], args[1]
        p = self.progress(timestep)
        alpha = 0.001 * self.tweaks.sharpness * p
        if alpha > 0:
            x = sample.chunk(2)[1][:, : cond.shape[1]]  # inpainting UNets take extra channels
            cond = self.sharpen(cond, x, timestep, alpha)
        g_eff = self.guidance
        if self.guidance > self.tweaks.adaptive_cfg:
            g_eff = p * self.guidance + (1 - p) * self.tweaks.adaptive_cfg
        new = torch.cat([uncond, uncond + (g_eff / self.guidance) * (cond - uncond)])
        return (new,) + tuple(output[1:]) if isinstance(output, tuple) else type(output)(sample=new)

    def sharpen(self, cond: torch.Tensor, x: torch.Tensor, timestep: torch.Tensor, alpha: float) -> torch.Tensor:
        """Blend the positive prediction with its filtered self, in noise (epsilon) space."""
        a = self.alpha_bar(timestep)
        v_pred = self.pipe.scheduler.config.get("prediction_type", "epsilon") == "v_prediction"
        c = cond.float()
        xf = x.float()
        eps = a**0.5 * c + (1 - a) ** 0.5 * xf if v_pred else c
        x0 = (xf - (1 - a) ** 0.5 * eps) / a**0.5
        eps = alpha * joint_bilateral_filter(eps, x0) + (1 - alpha) * eps
        out = (eps - (1 - a) ** 0.5 * xf) / a**0.5 if v_pred else eps
        return out.to(cond.dtype)


def _scale_size(row: torch.Tensor, factor: float) -> torch.Tensor:
    """One time-ids row with its "original size" (the first two entries) times ``factor``."""
    row = row.clone()
    row[:2] = row[:2] * factor
    return row


def is_neutral(tweaks: SamplingTweaks, guidance: float, xl: bool) -> bool:
    """True when the tweaks would change nothing for this run (then no hook is installed at all)."""
    adm = xl and tweaks.adm_scaler_end > 0 and (tweaks.adm_scaler_positive != 1 or tweaks.adm_scaler_negative != 1)
    cfg = guidance > 1 and (tweaks.sharpness > 0 or guidance > tweaks.adaptive_cfg)
    return not adm and not cfg


@contextmanager
def sampling_tweaks(pipe, tweaks: SamplingTweaks, guidance: float):
    """Hooks on ``pipe.unet`` for the duration of one pipeline call; none when the tweaks are neutral."""
    if is_neutral(tweaks, guidance, hasattr(pipe, "text_encoder_2")):
        yield
        return
    hooks = TweakHooks(pipe, tweaks, guidance)
    handles = [pipe.unet.register_forward_pre_hook(hooks.before, with_kwargs=True),
               pipe.unet.register_forward_hook(hooks.after, with_kwargs=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
