"""Samplers by the names people know (A1111 / Fooocus), built from a pipeline's scheduler config.

    scheduler = make_sampler("DPM++ 2M Karras", pipe.scheduler.config)
"""

from __future__ import annotations

from typing import Any

# name -> (diffusers scheduler class, overrides)
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "DPM++ 2M SDE Karras": ("DPMSolverMultistepScheduler",
                            {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
    "DDIM": ("DDIMScheduler", {"set_alpha_to_one": False}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "LCM": ("LCMScheduler", {}),
}
DEFAULT_SAMPLER = "DPM++ 2M Karras"


def sampler_names() -> list[str]:
    return list(SAMPLERS)


def make_sampler(name: str, base_config: dict):
    """A fresh scheduler of sampler ``name`` on the model's own noise schedule (betas, prediction type)."""
    import diffusers  # optional: diffusers comes with the image extra

    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    class_name, overrides = SAMPLERS[name]
    overrides = dict(overrides)
    if base_config.get("beta_schedule") == "squaredcos_cap_v2":
        # NOTE: on a cosine schedule, solvers starting at t=999 (linspace spacing) return pure noise; start lower.
        overrides.setdefault("timestep_spacing", "leading")
        if class_name == "DPMSolverMultistepScheduler":
            overrides.setdefault("lambda_min_clipped", -5.1)
    cls = getattr(diffusers, class_name)
    return cls.from_config(dict(base_config), **overrides)
