"""The packaged model's formats: `smollm2` runs its 4-bit GGUF where that runs (the default, as llama.cpp and Ollama
serve the file), `smollm2:f32` the float32 folder expanded from it; features the GGUF path lacks fall back to the
folder by themselves."""

from __future__ import annotations

import subprocess
import sys

import pytest

from loom.engine.config import EngineConfig
from loom.models.catalogue import packaged_file, resolve_model, resolve_runtime, split_tag


def test_a_tag_picks_the_format(smollm2_path):
    assert split_tag("smollm2:f32") == ("smollm2", "f32") and split_tag("smollm2") == ("smollm2", None)
    assert split_tag("/models/x:y") == ("/models/x:y", None)  # not a catalogue name: left alone
    with pytest.raises(ValueError, match="unknown format 'q8' for smollm2; choose among q4_1, f32"):
        split_tag("smollm2:q8")
    gguf = packaged_file("smollm2")
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert resolve_model("smollm2") == resolve_model("smollm2:f32") == smollm2_path  # finetuning, references
    assert resolve_model("smollm2:q4_1") == gguf


def test_the_engine_runs_the_quantized_file_unless_a_feature_needs_float_weights(smollm2_path):
    gguf = packaged_file("smollm2")
    assert resolve_runtime("smollm2", None, EngineConfig().needs_float()) == (gguf, smollm2_path)
    assert resolve_runtime("smollm2:f32", None, None) == (smollm2_path, smollm2_path)
    for config, reason in ((EngineConfig(tensor_parallel_size=2), "tensor parallelism"),
                           (EngineConfig(enable_lora=True), "LoRA"), (EngineConfig(quantization="int8"), "int8"),
                           (EngineConfig(dtype="bfloat16"), "dtype bfloat16"), (EngineConfig(device="cuda"), "a GPU")):
        assert reason in config.needs_float()
        assert resolve_runtime("smollm2", None, config.needs_float()) == (smollm2_path, smollm2_path)
    int8 = EngineConfig(quantization="int8")
    with pytest.raises(ValueError, match="smollm2:q4_1 is a GGUF file, which --quantization int8 does not run; use "
                                         "smollm2:f32"):
        resolve_runtime("smollm2:q4_1", None, int8.needs_float(), int8.gguf_unsupported())
    # with tensor parallelism the folder is the default, and the GGUF splits when named
    tp = EngineConfig(tensor_parallel_size=2)
    assert tp.gguf_unsupported() is None
    assert resolve_runtime("smollm2:q4_1", None, tp.needs_float(), tp.gguf_unsupported())[0] == gguf
    # with LoRA the folder is the default (adapters are trained on float weights), and the GGUF runs when named
    lora = EngineConfig(enable_lora=True)
    assert lora.gguf_unsupported() is None
    assert resolve_runtime("smollm2:q4_1", None, lora.needs_float(), lora.gguf_unsupported())[0] == gguf
    # on a GPU the folder is the default, and the GGUF runs when named (Triton kernels)
    gpu = EngineConfig(device="cuda")
    assert gpu.gguf_unsupported() is None and gpu.needs_float() == "a GPU"
    assert resolve_runtime("smollm2:q4_1", None, gpu.needs_float(), gpu.gguf_unsupported())[0] == gguf


def test_models_pull_prints_the_default_format_and_the_float32_one_on_request(smollm2_path):
    def pull(name: str) -> str:
        out = subprocess.run([sys.executable, "-m", "loom.cli", "models", "pull", name], capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip().splitlines()[-1]

    assert pull("smollm2") == str(packaged_file("smollm2"))
    assert pull("smollm2:f32") == str(smollm2_path)


@pytest.mark.slow
def test_the_default_answers_as_llama_cpp_does_on_the_same_file():
    """llama.cpp's llama-server (built from the llama-cpp-python 0.3.36 sdist, commit 0c1e570, 2026-12-05) on the
    packaged Q4_1 file, /v1/chat/completions at temperature 0, 16 tokens: "L'Étoile, la Marseillaise, la femme au",
    first-token logprobs L -1.852, The -2.094 (the float32 weights answer "The capital of France is Paris.")."""
    from loom import LLM, SamplingParams
    from loom.ops.quantized import GGUFLinear

    llm = LLM("smollm2", num_kv_blocks=64)
    assert isinstance(llm.engine.model.layers[0].mlp.gate_up_proj, GGUFLinear)
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=16, logprobs=2))[0].outputs[0]
    assert out.text == "L'Étoile, la Marseillaise, la femme au"
    first = {llm.engine.tokenizer.decode([t]): lp for t, lp in out.logprobs[0].items()}
    assert first["L"] == pytest.approx(-1.852, abs=0.1) and first["The"] == pytest.approx(-2.094, abs=0.15)
