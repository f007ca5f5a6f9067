"""Parity on CUDA in bfloat16 (runs only where a GPU is present; the CPU suite covers the same code in float32).

Tolerances: greedy token ids identical to HF transformers' bf16 run of the same checkpoint on the same GPU, and to
the same prompt run alone; logprobs of the chosen tokens within 0.1 (bf16 keeps ~3 significant digits, and the two
implementations round in different places: fused q/k/v and gate/up matmuls, paged attention).
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


def hf_bf16(path, prompts, max_new):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).cuda().eval()
    out = []
    with torch.inference_mode():
        for ids in prompts:
            g = model.generate(
                torch.tensor([ids], device="cuda"), max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                output_logits=True, return_dict_in_generate=True, pad_token_id=2,
            )  # fmt: skip
            new = g.sequences[0, len(ids) :].tolist()
            out.append((new, [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(g.logits, new)]))
    return out


def loom_bf16(llm, prompts, max_new):
    params = SamplingParams(temperature=0, max_tokens=max_new, ignore_eos=True, logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [(o.outputs[0].token_ids, [lp[t] for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)])
            for o in outs]


@pytest.mark.parametrize("model_fixture", ["tiny_llama", "smollm2_path"])
def test_bf16_cuda_concurrent_matches_hf_and_alone(request, model_fixture):
    path = request.getfixturevalue(model_fixture)
    prompts = varied_prompts(16, seed=21, low=4, high=120)
    llm = LLM(str(path), dtype="bfloat16", device="cuda", max_num_batched_tokens=256, kv_cache_memory_gb=1.0)
    together = loom_bf16(llm, prompts, 16)
    reference = hf_bf16(path, prompts, 16)
    for i, ((ids, lps), (ref_ids, ref_lps)) in enumerate(zip(together, reference)):
        assert ids == ref_ids, f"prompt {i}: token ids differ from HF bf16"
        assert max(abs(a - b) for a, b in zip(lps, ref_lps)) < LOGPROB_ATOL_BF16, f"prompt {i}: logprobs"
    alone = [loom_bf16(llm, [p], 16)[0][0] for p in prompts]
    assert alone == [t[0] for t in together]
