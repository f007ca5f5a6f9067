"""Parity on CUDA in bfloat16 (runs only where a GPU is present; the CPU suite covers the same code in float32).

Tolerances, teacher-forced: HF transformers' bf16 model of the same checkpoint on the same GPU scores Loom's greedy
tokens in one forward a prompt; each token's logprob is within 0.1 of HF's, and each token within 0.1 of HF's best at
its step. Exact ids are not asked for: the checkpoints here have random weights, whose flat distributions have
near-ties (SmolLM2's random-weight logits: a median top-1/top-2 gap of 0.075; ~4% of positions flip between float32
and bfloat16) that any change of rounding order — fused matmuls, paged attention, a graph's padded batch — can flip,
after which the two continuations part for good.
"""

from __future__ import annotations

import pytest
import torch

from loom import LLM, SamplingParams
from tests.engine.test_parity import varied_prompts

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on a GPU machine)"),
]
LOGPROB_ATOL_BF16 = 0.1


def assert_hf_scores_loom_tokens(hf, prompts, run, label: str) -> None:
    """Teacher-forced: ``hf`` scores each prompt's Loom tokens in one forward; every token's logprob within 0.1 of
    HF's, and every token within 0.1 of HF's best at its step."""
    for i, (prompt, (ids, lps)) in enumerate(zip(prompts, run)):
        with torch.inference_mode():
            logits = hf(torch.tensor([prompt + ids[:-1]], device="cuda")).logits[0, len(prompt) - 1 :].float()
        reference = torch.log_softmax(logits, -1).cpu()
        chosen = reference[torch.arange(len(ids)), torch.tensor(ids)]
        assert (torch.tensor(lps) - chosen).abs().max() < LOGPROB_ATOL_BF16, f"{label}, prompt {i}: logprobs"
        assert (reference.max(-1).values - chosen).max() < LOGPROB_ATOL_BF16, f"{label}, prompt {i}: not HF's best"


def loom_bf16(llm, prompts, max_new):
    params = SamplingParams(temperature=0, max_tokens=max_new, ignore_eos=True, logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [(o.outputs[0].token_ids, [lp[t] for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)])
            for o in outs]


@pytest.mark.parametrize("model_fixture", ["tiny_llama", "smollm2_path"])
def test_bf16_cuda_concurrent_matches_hf_and_alone(request, model_fixture):
    """16 prompts decoded together, then each alone (other batch shapes, other CUDA graphs): both runs score as HF's
    own bf16 model would choose, teacher-forced."""
    from transformers import AutoModelForCausalLM

    path = request.getfixturevalue(model_fixture)
    prompts = varied_prompts(16, seed=21, low=4, high=120)
    llm = LLM(str(path), dtype="bfloat16", device="cuda", max_num_batched_tokens=256, kv_cache_memory_gb=1.0)
    together = loom_bf16(llm, prompts, 16)
    alone = [loom_bf16(llm, [p], 16)[0] for p in prompts]
    del llm
    torch.cuda.empty_cache()
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).cuda().eval()
    assert_hf_scores_loom_tokens(hf, prompts, together, "together")
    assert_hf_scores_loom_tokens(hf, prompts, alone, "alone")


@pytest.mark.parametrize("shape", ["llama-3.2-1b", "llama-3.1-8b"])
def test_bf16_cuda_matches_hf_at_real_shapes_and_graphs_equal_eager(tmp_path, smollm2_path, shape):
    """Issue 11's parity at real shapes: HF's LlamaForCausalLM of the shape with its own random init (bf16, on the
    GPU), saved and loaded by Loom — the same weights in both. 8 prompts x 8 greedy steps, teacher-forced: HF scores
    Loom's tokens in one forward; Loom's logprob of each token within 0.1 of HF's, and each token within 0.1 of HF's
    best at that step (random weights give flat distributions whose near-ties a bf16 rounding can flip). The same
    holds with CUDA graphs on and off; the first tokens (sampled after the eager prefill) are the same in both."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.gpu_shapes import SHAPES

    torch.manual_seed(0)
    with torch.device("cuda"):
        hf = LlamaForCausalLM(LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2)).to(torch.bfloat16).eval()
    hf.save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_path / name, tmp_path / name)
    prompts = varied_prompts(8, seed=31, low=8, high=200)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0, detokenize=False)
    runs = {}
    for eager in (True, False):
        llm = LLM(str(tmp_path), dtype="bfloat16", device="cuda", enforce_eager=eager, gpu_memory_utilization=0.5)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        runs[eager] = [(o.outputs[0].token_ids, [lp[t] for lp, t in zip(o.outputs[0].logprobs,
                                                                          o.outputs[0].token_ids)]) for o in outs]
        del llm
        torch.cuda.empty_cache()
    for eager, run in runs.items():
        assert_hf_scores_loom_tokens(hf, prompts, run, f"eager={eager}")
    assert [ids[0] for ids, _ in runs[True]] == [ids[0] for ids, _ in runs[False]]


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_moe_experts_grouped_on_the_gpu_under_graphs_score_as_hf(tmp_path, smollm2_path, arch):
    """A mixture of experts on Triton's grouped matmuls (no host sync, so its decode steps replay CUDA graphs): HF's
    bf16 model of the same checkpoint scores Loom's tokens as above, graphs on and off."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import save_tiny_model

    path = save_tiny_model(tmp_path / arch, smollm2_path, arch=arch)
    prompts = varied_prompts(8, seed=33, low=4, high=60)
    runs = {}
    for eager in (True, False):
        llm = LLM(str(path), dtype="bfloat16", device="cuda", kv_cache_memory_gb=0.5, enforce_eager=eager)
        runs[eager] = loom_bf16(llm, prompts, 8)
        if not eager:
            assert llm.engine.runner.graphs is not None and llm.engine.runner.graphs.graphs  # graphs were replayed
        del llm
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).cuda().eval()
    for eager, run in runs.items():
        assert_hf_scores_loom_tokens(hf, prompts, run, f"{arch}, eager={eager}")
    assert [ids[0] for ids, _ in runs[True]] == [ids[0] for ids, _ in runs[False]]


def test_async_scheduling_on_cuda_gives_the_sync_tokens(tiny_llama):
    """Async scheduling with CUDA graphs: pending tokens fed on the device, ids read back through pinned memory
    behind an event. Without stops both modes run the same batches, so greedy and seeded ids and logprobs match."""
    from tests.engine.test_async_scheduling import run, same

    prompts = varied_prompts(12, seed=23, low=4, high=120)
    requests = [(p, SamplingParams(temperature=0 if i % 2 else 0.8, seed=i, max_tokens=4 + 3 * i, ignore_eos=True,
                                   logprobs=1)) for i, p in enumerate(prompts)]
    results = []
    for async_scheduling in (False, True):
        llm = LLM(str(tiny_llama), dtype="bfloat16", device="cuda", kv_cache_memory_gb=0.5,
                  async_scheduling=async_scheduling)
        results.append(run(llm.engine, requests))
        assert llm.engine.runner.graphs is not None and llm.engine.runner.graphs.graphs  # graphs were replayed
        del llm
    assert same(results[1], results[0])


def test_async_decode_steps_never_wait_for_the_device(tiny_llama):
    """What async scheduling is for: a decode step queues its forward and sampling and reads the step before back
    through an event, so nothing in it synchronises implicitly (a blocking copy, ``.item()``, ``.tolist()`` of a
    CUDA tensor). torch's sync debug mode warns at each such call; the message names the line."""
    import warnings

    llm = LLM(str(tiny_llama), dtype="bfloat16", device="cuda", kv_cache_memory_gb=0.5, max_num_seqs=8,
              async_scheduling=True)
    engine = llm.engine
    for i, p in enumerate(varied_prompts(6, seed=24, low=4, high=60)):
        engine.add_request(str(i), params=SamplingParams(temperature=0.8 if i % 2 else 0, seed=i, max_tokens=40,
                                                         ignore_eos=True, logprobs=1 if i == 0 else None),
                           prompt_token_ids=p)
    for _ in range(8):  # the prefills, then decode steps (their graph bucket captured)
        engine.step()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(10):
                engine.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if "synchroniz" in str(w.message)]
    assert not syncs, syncs[:5]
