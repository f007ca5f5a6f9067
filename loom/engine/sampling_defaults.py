"""The model's own default sampling parameters, as vLLM applies them (its ``--generation-config auto``, the default):
a model folder's ``generation_config.json`` recommends temperature, top_p, top_k, min_p and repetition_penalty
(Qwen3: 0.6 / 0.95 / 20; Llama 3.1 Instruct: 0.6 / 0.9), and ``max_new_tokens``. A request that leaves one of them
out gets the model's value instead of the API's default (``temperature`` 1.0 ...); a request that gives it keeps its
own. ``--generation-config vllm`` ignores the file (the API's defaults, as before vLLM 0.9); a folder path reads that
folder's file; ``--override-generation-config '{"temperature": 0.5}'`` sets values over either (vLLM's flags).

    defaults = sampling_defaults("auto", None, model_folder)
    params = defaults.apply(temperature=request.temperature, top_p=request.top_p, ...)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path

from loom.engine.sampling_params import SamplingParams

GENERATION_CONFIG = "generation_config.json"
_HF_NAMES = {"max_new_tokens": "max_tokens"}
"""generation_config.json's names that differ from SamplingParams'."""


@dataclass(frozen=True, slots=True)
class SamplingDefaults:
    """Defaults for the sampling parameters a request leaves out; None: the API's own default."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_tokens: int | None = None
    """The default max_tokens where a request gives none (generation_config.json's ``max_new_tokens``)."""

    @classmethod
    def from_dict(cls, values: dict) -> SamplingDefaults:
        """From generation_config.json's names (``max_new_tokens``) or SamplingParams' (``max_tokens``); other keys
        are a ValueError that lists the ones read."""
        names = {f.name for f in fields(cls)}
        known = {_HF_NAMES.get(k, k): v for k, v in values.items()}
        unknown = sorted(k for k in known if k not in names)
        if unknown:
            raise ValueError(f"unknown sampling default(s) {', '.join(unknown)}; the ones read are "
                             f"{', '.join(sorted(names | set(_HF_NAMES)))}")
        return cls(**known)._checked()

    def _checked(self) -> SamplingDefaults:
        """Numbers, finite, whole where the parameter is (20.0 becomes 20), and in the ranges SamplingParams takes."""
        values = {}
        for name, kind in (("temperature", float), ("top_p", float), ("top_k", int), ("min_p", float),
                           ("repetition_penalty", float), ("max_tokens", int)):
            value = getattr(self, name)
            if value is None:
                continue
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                    or kind is int and value != int(value)):
                raise ValueError(f"the sampling default {name} must be a finite number"
                                 f"{' (whole)' if kind is int else ''}, got {value!r}")
            values[name] = int(value) if kind is int else float(value)
        try:
            SamplingParams(**{k: v for k, v in values.items() if k != "max_tokens"}, max_tokens=None,
                           default_max_tokens=values.get("max_tokens"))
        except ValueError as exc:
            raise ValueError(f"an invalid sampling default: {exc}") from None
        return replace(self, **values)

    def over(self, base: SamplingDefaults) -> SamplingDefaults:
        """These values where set, ``base``'s elsewhere."""
        return replace(base, **self.as_dict())._checked()

    def as_dict(self) -> dict:
        """The values that are set."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def value(self, name: str, given, fallback):
        """A request's ``given`` value for parameter ``name``, else this default, else the API's ``fallback``."""
        if given is not None:
            return given
        default = getattr(self, name)
        return fallback if default is None else default


def read_generation_config(folder: str | Path) -> SamplingDefaults:
    """The sampling parameters a folder's generation_config.json sets (none where it has no file); the rest of the
    file (token ids, ``do_sample``, beam settings) is not read here, as vLLM does not."""
    path = Path(folder) / GENERATION_CONFIG
    if not path.is_file():
        return SamplingDefaults()
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not readable JSON ({exc}); fix it or pass --generation-config vllm") from None
    read = {name: values[hf] for hf, name in (("temperature", "temperature"), ("top_p", "top_p"),
                                               ("top_k", "top_k"), ("min_p", "min_p"),
                                               ("repetition_penalty", "repetition_penalty"),
                                               ("max_new_tokens", "max_tokens")) if values.get(hf) is not None}
    try:
        return SamplingDefaults(**read)._checked()
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def sampling_defaults(generation_config: str, override: SamplingDefaults | None,
                      model_folder: str | Path | None) -> SamplingDefaults:
    """The defaults an engine applies: "auto" reads ``model_folder``'s generation_config.json (a GGUF file or a
    folder without one: none), "vllm" none, a folder path that folder's; ``override`` over them."""
    if generation_config == "vllm":
        base = SamplingDefaults()
    elif generation_config == "auto":
        folder = Path(model_folder) if model_folder is not None else None
        base = read_generation_config(folder) if folder is not None and folder.is_dir() else SamplingDefaults()
    else:
        if not (Path(generation_config) / GENERATION_CONFIG).is_file():
            raise ValueError(f"--generation-config {generation_config}: no {GENERATION_CONFIG} there; give auto, "
                             "vllm or a folder holding one")
        base = read_generation_config(generation_config)
    return base if override is None else override.over(base)
