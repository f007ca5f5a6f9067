"""LoRAs for SD / SDXL: named files in an operator's folder, loaded once as peft adapters, switched per job.

A LoRA is named by what sits directly in the folder (``--image-lora-dir`` / ``--lora-dir``): ``NAME.safetensors``
(diffusers or kohya keys; diffusers' loader converts kohya's) or a folder ``NAME/`` holding diffusers'
``pytorch_lora_weights.safetensors``. A request never names a path: names are checked against the folder's listing
and resolved inside it (``loom.server.paths.resolve_inside``), so a symlink out of the folder is refused.

A job asks for up to 5 LoRAs with weights — ``loras: [{"name", "weight"}]`` and/or ``<lora:NAME:0.8>`` tags in the
prompt (a tag's weight wins for a name given twice; the tags are removed from the text the encoder sees). The first
job that names a LoRA loads it into the shared UNet / text encoders (``load_lora_weights``); every job then sets its
own adapters and weights (``set_adapters``), or turns LoRA off (``disable_lora``) when it names none, so switching
never reloads the pipeline.

    manager = LoRAManager(pipe, LoRALibrary("/models/loras"))
    manager.activate([LoRASpec("film-grain", 0.8)])
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from loom.server.paths import resolve_inside

MAX_LORAS = 5
MAX_LORA_WEIGHT = 4.0
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
NAME = re.compile(r"[A-Za-z0-9][\w.\- ]{0,127}")
# <lora:NAME> or <lora:NAME:WEIGHT>
TAG = re.compile(r"<lora:([^:<>]+?)(?::([+-]?(?:\d+(?:\.\d*)?|\.\d+)))?>")


class UnknownLoRA(ValueError):
    """A request named a LoRA the folder does not hold (or the server has no LoRA folder)."""


@dataclass(frozen=True, slots=True)
class LoRASpec:
    name: str
    weight: float = 1.0

    def __post_init__(self):
        if not NAME.fullmatch(self.name):
            raise ValueError(f"LoRA name {self.name[:64]!r} must be letters, digits, spaces, '_', '-' and '.' "
                             "(a file name in the server's LoRA folder, without .safetensors)")
        if not -MAX_LORA_WEIGHT <= self.weight <= MAX_LORA_WEIGHT:
            raise ValueError(f"LoRA {self.name!r}: weight must be within ±{MAX_LORA_WEIGHT:g}, got {self.weight}")


def strip_lora_tags(prompt: str) -> str:
    """``prompt`` without its ``<lora:...>`` tags."""
    return TAG.sub("", prompt)


def prompt_loras(prompt: str) -> list[LoRASpec]:
    """The ``<lora:NAME:WEIGHT>`` tags of ``prompt`` (weight 1 when left out)."""
    return [LoRASpec(name.strip(), float(weight) if weight else 1.0) for name, weight in TAG.findall(prompt)]


def merge_loras(listed: list[LoRASpec], prompt: str) -> list[LoRASpec]:
    """The request's LoRAs then the prompt's tags, one entry per name (the later weight wins), at most MAX_LORAS."""
    merged = {spec.name: spec for spec in listed + prompt_loras(prompt)}
    if len(merged) > MAX_LORAS:
        raise ValueError(f"at most {MAX_LORAS} LoRAs per job, got {len(merged)}: {sorted(merged)}")
    return list(merged.values())


class LoRALibrary:
    """The LoRAs in one operator folder, by name."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).expanduser().resolve()
        if not self.folder.is_dir():
            raise FileNotFoundError(f"LoRA folder {folder} does not exist; create it or fix --image-lora-dir")

    def names(self) -> list[str]:
        found = [p.stem for p in self.folder.glob("*.safetensors")]
        found += [p.name for p in self.folder.iterdir() if (p / DIFFUSERS_WEIGHTS).is_file()]
        return sorted(n for n in found if NAME.fullmatch(n))

    def path(self, name: str) -> Path:
        """The weights file of LoRA ``name``; UnknownLoRA when the folder has none (the message lists them)."""
        for candidate in (f"{name}.safetensors", f"{name}/{DIFFUSERS_WEIGHTS}"):
            path = resolve_inside(self.folder, candidate) if NAME.fullmatch(name) else None
            if path is not None and path.is_file():
                return path
        raise UnknownLoRA(f"unknown LoRA {name[:64]!r}; this server has {self.names() or 'none'} "
                          "(GET /v1/images/options lists them)")


class LoRAManager:
    """Adapters of one pipeline (and every pipeline sharing its modules): loaded once, activated per job."""

    def __init__(self, pipe, library: LoRALibrary | None):
        self.pipe, self.library = pipe, library
        self.adapters: dict[str, str] = {}  # LoRA name -> peft adapter name (peft names cannot hold '.')
        self.num_attempts = 0  # numbers adapters; a failed load's name is never reused
        self.enabled = False

    def names(self) -> list[str]:
        return self.library.names() if self.library is not None else []

    def check(self, specs: list[LoRASpec]) -> None:
        """Raise UnknownLoRA for a name this server cannot load (before the job is queued)."""
        if specs and self.library is None:
            raise UnknownLoRA("this server has no LoRA folder; start it with --image-lora-dir DIR "
                              "(or ImageEngine.load(..., lora_dir=DIR))")
        for spec in specs:
            self.library.path(spec.name)

    def activate(self, specs: list[LoRASpec]) -> None:
        """Make exactly ``specs`` active for the next pipeline calls; no LoRA at all when ``specs`` is empty."""
        if not specs:
            if self.enabled:
                self.pipe.disable_lora()
                self.enabled = False
            return
        self.check(specs)
        for spec in specs:
            self._load(spec.name)
        if not self.enabled:
            self.pipe.enable_lora()
            self.enabled = True
        self.pipe.set_adapters([self.adapters[s.name] for s in specs], [s.weight for s in specs])

    def _load(self, name: str) -> None:
        if name in self.adapters:
            return
        adapter = f"lora_{self.num_attempts}"
        self.num_attempts += 1
        path = self.library.path(name)
        try:
            self.pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter)
        except Exception as exc:  # a file that is no LoRA of this model: drop what was injected, say which one
            if adapter in self.pipe.get_list_adapters().get("unet", []):
                self.pipe.delete_adapters(adapter)
            raise ValueError(f"LoRA {name!r} could not be loaded into this model ({type(exc).__name__}: "
                             f"{str(exc)[:200]}); is it an SD / SDXL LoRA of this architecture?") from None
        self.adapters[name] = adapter
