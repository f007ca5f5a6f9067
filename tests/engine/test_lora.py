"""Multi-LoRA serving, checked against HF transformers + peft: unmerged adapters give peft's greedy tokens, adapters
and the base model batch in one step with each row equal to its run alone, the prefix cache never crosses adapters,
the scheduler keeps to max_loras, and bad adapters are refused with a reason."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from loom import LLM, LoRARequest, SamplingParams
from loom.engine.lora import LoRAManager
from loom.models.lora import LoRABatch, LoRALinear
from tests.engine.test_spec_decode import Oracle

TARGETS_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
PROMPTS = [[1, 42, 7, 99, 13, 5], [1, 300, 301, 302], [1, 9, 8, 7, 6, 5, 4, 3, 2, 1, 11, 12, 13, 14, 15, 16, 17, 18]]


def make_adapter(path, base_dir, seed: int, r: int, alpha: int, targets: list[str], rslora: bool = False):
    """A peft adapter with random A and B (init_lora_weights=False: B is not zero), saved as peft saves it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False,
                                            use_rslora=rslora))
    model.save_pretrained(path)
    return model.eval()


def hf_greedy(model, ids: list[int], n: int = GREEDY.max_tokens) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_llama):
    """Four adapters of different shapes (ranks, alphas, rsLoRA, target subsets) on the tiny Llama, and their peft
    models for references."""
    root = tmp_path_factory.mktemp("adapters")
    specs = [(8, 16, TARGETS_ALL, False), (4, 8, ["q_proj", "v_proj"], True), (2, 4, ["gate_proj", "down_proj"], False),
             (8, 8, ["k_proj", "o_proj", "up_proj"], False)]
    out = []
    for i, (r, alpha, targets, rslora) in enumerate(specs):
        path = root / f"a{i + 1}"
        model = make_adapter(path, tiny_llama, seed=i + 1, r=r, alpha=alpha, targets=targets, rslora=rslora)
        out.append((LoRARequest(f"a{i + 1}", i + 1, str(path)), model))
    return out


def tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_unmerged_adapters_match_peft(tiny_llama, adapters, backend):
    llm = LLM(str(tiny_llama), enable_lora=True, max_loras=2, max_lora_rank=8, num_kv_blocks=64,
              attention_backend=backend)
    base = tokens(llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY))
    for request, model in adapters[:2]:
        got = tokens(llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, lora_request=request))
        assert got == [hf_greedy(model, p) for p in PROMPTS]
        assert got != base  # the adapter changes the answer, so the comparison means something
    assert llm.engine.block_manager.num_free_blocks == 64


@pytest.mark.parametrize("async_scheduling", [False, True])  # async: decode rows sorted by adapter, tokens fed
def test_four_adapters_and_the_base_share_steps_and_equal_their_runs_alone(tiny_llama, adapters, async_scheduling):
    llm = LLM(str(tiny_llama), enable_lora=True, max_loras=4, max_lora_rank=8, num_kv_blocks=128,
              async_scheduling=async_scheduling)
    requests = [None] + [r for r, _ in adapters]
    prompts = [{"prompt_token_ids": PROMPTS[i % len(PROMPTS)]} for i in range(len(requests))]
    alone = [tokens(llm.generate(p, GREEDY, lora_request=r))[0] for p, r in zip(prompts, requests)]
    assert llm.engine.stats().max_step_adapters == 1
    together = tokens(llm.generate(prompts, GREEDY, lora_request=requests))
    assert together == alone
    assert llm.engine.stats().max_step_adapters == 4
    assert len({tuple(t) for t in alone[:2]}) == 2
    assert llm.engine.block_manager.num_free_blocks == 128


def test_more_adapters_than_slots_take_turns(tiny_llama, adapters):
    llm = LLM(str(tiny_llama), enable_lora=True, max_loras=2, max_lora_rank=8, num_kv_blocks=128)
    requests = [r for r, _ in adapters] * 2
    prompts = [{"prompt_token_ids": PROMPTS[i % len(PROMPTS)]} for i in range(len(requests))]
    together = tokens(llm.generate(prompts, GREEDY, lora_request=requests))
    stats = llm.engine.stats()
    assert stats.max_step_adapters == 2
    alone = LLM(str(tiny_llama), enable_lora=True, max_loras=1, max_lora_rank=8, num_kv_blocks=64)
    assert together == [tokens(alone.generate(p, GREEDY, lora_request=r))[0] for p, r in zip(prompts, requests)]


def test_prefix_cache_is_keyed_by_adapter(tiny_llama, adapters):
    llm = LLM(str(tiny_llama), enable_lora=True, max_loras=2, max_lora_rank=8, num_kv_blocks=64, block_size=4)
    prompt = {"prompt_token_ids": PROMPTS[2]}  # 18 tokens: four full blocks of 4
    a1, a2 = adapters[0][0], adapters[1][0]
    first = llm.generate(prompt, GREEDY, lora_request=a1)[0]
    assert first.num_cached_tokens == 0
    assert llm.generate(prompt, GREEDY, lora_request=a1)[0].num_cached_tokens == 16  # same adapter: shared
    assert llm.generate(prompt, GREEDY, lora_request=a2)[0].num_cached_tokens == 0  # another adapter: not
    assert llm.generate(prompt, GREEDY)[0].num_cached_tokens == 0  # the base model: not
    assert llm.generate(prompt, GREEDY)[0].num_cached_tokens == 16


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_lora_linear_adds_each_groups_delta_only_to_its_rows(dense, packed):
    from loom.ops.packed_linear import PackedLinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 5, bias=False)
    base = PackedLinear.from_linear(linear) if packed else linear
    batch = LoRABatch()
    layer = LoRALinear(base, 6, 5, max_loras=3, rank_room=3, batch=batch, dtype=torch.float32, device="cpu")
    layer.set_slot(2, (torch.randn(3, 6), torch.randn(3, 5)))  # then replaced by a lower rank: no stale rows left
    a = [torch.randn(3, 6), torch.randn(2, 6)]
    bt = [torch.randn(3, 5), torch.randn(2, 5)]
    layer.set_slot(0, (a[0], bt[0]))
    layer.set_slot(2, (a[1], bt[1]))
    x = torch.randn(7, 6)
    batch.set([(0, 2, 2), (4, 7, 0)], num_rows=7, dense=dense, device="cpu")  # rows 2-3: the base model
    want = linear(x).detach()
    want[0:2] += x[0:2] @ a[1].t() @ bt[1]
    want[4:7] += x[4:7] @ a[0].t() @ bt[0]
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want)
        layer.set_slot(2, None)
        want[0:2] = linear(x[0:2])
        torch.testing.assert_close(layer(x), want)


def test_dense_and_grouped_steps_give_the_same_tokens(tiny_llama, adapters, monkeypatch):
    import loom.engine.lora as lora_module

    requests = [None] + [r for r, _ in adapters]
    prompts = [{"prompt_token_ids": PROMPTS[i % len(PROMPTS)]} for i in range(len(requests))]
    runs = []
    for groups in (99, 2):  # never dense; dense whenever two groups or more
        monkeypatch.setattr(lora_module, "DENSE_MIN_GROUPS", groups)
        llm = LLM(str(tiny_llama), enable_lora=True, max_loras=4, max_lora_rank=8, num_kv_blocks=128)
        runs.append(tokens(llm.generate(prompts, GREEDY, lora_request=requests)))
    assert runs[0] == runs[1]


def test_bad_adapters_are_refused_with_the_reason(tiny_llama, adapters, tmp_path):
    llm = LLM(str(tiny_llama), enable_lora=True, max_loras=1, max_lora_rank=4, num_kv_blocks=16)
    good = adapters[0][0]
    with pytest.raises(ValueError, match="raise --max-lora-rank to at least 8"):
        llm.generate("hi", GREEDY, lora_request=good)
    with pytest.raises(ValueError, match="adapter_config.json"):
        llm.generate("hi", GREEDY, lora_request=LoRARequest("x", 9, str(tmp_path)))
    folder = tmp_path / "saved"
    adapters[2][1].save_pretrained(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["lm_head"]}))
    with pytest.raises(ValueError, match="modules_to_save"):
        llm.generate("hi", GREEDY, lora_request=LoRARequest("m", 10, str(folder)))
    with pytest.raises(ValueError, match="enable_lora=True"):
        LLM(str(tiny_llama), num_kv_blocks=16).generate("hi", GREEDY, lora_request=good)
    with pytest.raises(ValueError, match="lora_int_id"):
        LoRARequest("z", 0, str(tmp_path))
    ok = LoRARequest("a3", 3, adapters[2][0].lora_path)
    llm.generate("hi", GREEDY, lora_request=ok)
    with pytest.raises(ValueError, match="already names adapter 'a3'"):
        llm.generate("hi", GREEDY, lora_request=LoRARequest("other", 3, adapters[1][0].lora_path))
    assert llm.engine.block_manager.num_free_blocks == 16


def test_adapter_for_another_model_is_refused(tmp_path, smollm2_path, adapters):
    from loom.models.tiny import save_tiny_model

    wider = save_tiny_model(tmp_path / "wider", smollm2_path, hidden_size=96)
    llm = LLM(str(wider), enable_lora=True, max_lora_rank=8, num_kv_blocks=16)
    with pytest.raises(ValueError, match="trained for another model"):
        llm.generate("hi", GREEDY, lora_request=adapters[0][0])


def test_an_evicted_or_removed_adapter_never_fails_a_sequence_in_flight(tiny_llama, adapters):
    llm = LLM(str(tiny_llama), enable_lora=True, max_loras=1, max_cpu_loras=1, max_lora_rank=8, num_kv_blocks=64)
    engine = llm.engine
    (r1, m1), (r2, m2) = adapters[0], adapters[1]
    engine.add_request("x", None, GREEDY, prompt_token_ids=PROMPTS[0], lora_request=r1)
    engine.add_request("y", None, GREEDY, prompt_token_ids=PROMPTS[1], lora_request=r2)  # evicts r1 from the cache
    assert isinstance(engine.lora, LoRAManager) and engine.lora.loaded_ids() == [2]
    engine.lora.remove(2)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    assert done == {"x": hf_greedy(m1, PROMPTS[0]), "y": hf_greedy(m2, PROMPTS[1])}


def test_an_id_removed_and_given_to_another_folder_serves_the_new_adapter(tiny_llama, adapters):
    """The slot still holding the old weights is not taken for the new ones under the same id."""
    (r1, _), (r2, m2) = adapters[0], adapters[1]
    llm = LLM(str(tiny_llama), enable_lora=True, max_loras=1, max_lora_rank=8, num_kv_blocks=64)
    llm.generate([{"prompt_token_ids": PROMPTS[0]}], GREEDY, lora_request=r1)
    assert llm.engine.lora.remove(r1.lora_int_id)
    renamed = LoRARequest(r2.lora_name, r1.lora_int_id, r2.lora_path)
    out = llm.generate([{"prompt_token_ids": PROMPTS[1]}], GREEDY, lora_request=renamed)
    assert out[0].outputs[0].token_ids == hf_greedy(m2, PROMPTS[1])


@pytest.mark.slow
def test_smollm2_with_an_adapter_matches_peft(smollm2_path, tmp_path):
    model = make_adapter(tmp_path / "s", smollm2_path, seed=5, r=8, alpha=16, targets=TARGETS_ALL)
    llm = LLM(str(smollm2_path), enable_lora=True, max_lora_rank=8, num_kv_blocks=64)
    ids = llm.tokenizer.encode("The capital of France is")
    got = llm.generate({"prompt_token_ids": ids}, GREEDY, lora_request=LoRARequest("s", 1, str(tmp_path / "s")))
    assert got[0].outputs[0].token_ids == hf_greedy(model, ids)
    assert got[0].outputs[0].token_ids != llm.generate({"prompt_token_ids": ids}, GREEDY)[0].outputs[0].token_ids


def test_granite_adapters_on_the_residual_branch_match_peft(tmp_path, smollm2_path):
    """Granite's residual_multiplier is folded into o_proj and down_proj at load; an adapter's delta on those two must
    be scaled the same way (the tiny Granite's multiplier is 0.4), which peft's greedy tokens check."""
    from tests.conftest import save_tiny_model

    base = save_tiny_model(tmp_path / "granite", smollm2_path, arch="granite")
    model = make_adapter(tmp_path / "g", str(base), seed=6, r=8, alpha=32, targets=["o_proj", "down_proj"])
    llm = LLM(str(base), enable_lora=True, max_lora_rank=8, num_kv_blocks=64)
    request = LoRARequest("g", 1, str(tmp_path / "g"))
    got = tokens(llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, lora_request=request))
    assert got == [hf_greedy(model, p) for p in PROMPTS]
    assert got != tokens(llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY))


def test_phi4_mini_shaped_adapters_on_the_fused_qkv_match_peft(tmp_path, smollm2_path):
    """Partial rotary reorders each q and k head's rows at load; an adapter's rows on Phi-3's fused qkv_proj must be
    reordered the same way (v's left alone), which peft's greedy tokens check."""
    from tests.conftest import save_tiny_model

    base = save_tiny_model(tmp_path / "phi4", smollm2_path, arch="phi3", head_dim=16, sliding_window=None,
                           partial_rotary_factor=0.75)
    model = make_adapter(tmp_path / "p", str(base), seed=7, r=8, alpha=32, targets=["qkv_proj"])
    llm = LLM(str(base), enable_lora=True, max_lora_rank=8, num_kv_blocks=64)
    request = LoRARequest("p", 1, str(tmp_path / "p"))
    got = tokens(llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, lora_request=request))
    assert got == [hf_greedy(model, p) for p in PROMPTS]
    assert got != tokens(llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY))


@pytest.mark.slow
def test_finetuned_adapter_served_unmerged_answers_like_the_merged_export(tmp_path, tiny_llama):
    """`loom finetune --lora` writes OUTPUT (merged) and OUTPUT/adapter (peft): both serve the same answers."""
    from loom.cli import main
    from scripts.finetune_demo_data import write_jsonl
    from tests.finetune.test_loss import RECORDS

    write_jsonl(RECORDS, tmp_path / "train.jsonl")
    out = tmp_path / "out"
    assert main(["finetune", "--model", str(tiny_llama), "--data", str(tmp_path / "train.jsonl"), "--output",
                 str(out), "--lora", "--lora-r", "4", "--lr", "5e-2", "--max-steps", "4", "--batch-size", "2",
                 "--max-length", "128", "--no-progress"]) == 0
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    merged = tokens(LLM(str(out), num_kv_blocks=64).generate(prompts, GREEDY))
    base = LLM(str(tiny_llama), enable_lora=True, max_lora_rank=4, num_kv_blocks=64)
    unmerged = tokens(base.generate(prompts, GREEDY, lora_request=LoRARequest("tuned", 1, str(out / "adapter"))))
    assert unmerged == merged
    assert unmerged != tokens(base.generate(prompts, GREEDY))


def test_generate_cli_applies_an_adapter_folder(tiny_llama, adapters, capsys):
    from loom.cli import main

    request = adapters[0][0]
    assert main(["generate", "--model", str(tiny_llama), "--lora", request.lora_path, "--max-tokens", "6",
                 "--ignore-eos", "--num-kv-blocks", "16", "--json", "Hello there"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    llm = LLM(str(tiny_llama), enable_lora=True, max_lora_rank=8, num_kv_blocks=16)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    assert printed["text"] == llm.generate("Hello there", params, lora_request=request)[0].outputs[0].text
    assert printed["text"] != llm.generate("Hello there", params)[0].outputs[0].text


def test_adapters_with_speculative_decoding_give_the_same_tokens_and_keep_their_cache_apart(tiny_llama, adapters):
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2, "prompt_lookup_min": 1}
    requests = [None] + [r for r, _ in adapters]
    prompts = [{"prompt_token_ids": [1, 20 + i, 21, 22, 20 + i, 21, 22][: 3 + i % 3]} for i in range(len(requests))]
    runs = []
    for config in (None, spec):
        llm = LLM(str(tiny_llama), enable_lora=True, max_loras=4, max_lora_rank=8, num_kv_blocks=128, block_size=4,
                  speculative_config=config)
        if config is not None:  # drafts from the plain run's answers, every third one wrong: accepted and rejected
            llm.engine.spec.proposer = Oracle({tuple(p["prompt_token_ids"]): t for p, t in zip(prompts, runs[0])}, 3)
        runs.append(tokens(llm.generate(prompts, GREEDY, lora_request=requests)))
    assert runs[0] == runs[1]
    stats = llm.engine.stats()
    assert 0 < stats.num_spec_accepted_tokens < stats.num_spec_draft_tokens
    # the blocks a1 filled while speculating are a1's: a1 finds them, the base model and a2 do not
    a1, a2 = adapters[0][0], adapters[1][0]
    history = {"prompt_token_ids": prompts[1]["prompt_token_ids"] + runs[1][1][:6]}
    assert llm.generate(history, GREEDY, lora_request=a1)[0].num_cached_tokens == 8
    assert llm.generate(history, GREEDY, lora_request=a2)[0].num_cached_tokens == 0
    assert llm.generate(history, GREEDY)[0].num_cached_tokens == 0
    assert llm.engine.block_manager.num_free_blocks == 128


def test_adapters_over_quantized_weights_match_peft_on_the_dequantized_model(tmp_path, smollm2_path, monkeypatch):
    """LoRA over a GGUF file (a Q4_K_M-shaped tiny llama: Q4_K and Q6_K projections, one fused q/k/v of two types) and
    over --quantization int8: each projection's delta is added to the quantized one's output. With the exact
    float32-activation kernels the greedy tokens equal peft's on the file's dequantized weights (transformers' GGUF
    loader, saved as a folder); with int8 activations and with int8 weights the next token given peft's context
    agrees on >= 90% of positions, and the adapter changes the answer."""
    from transformers import AutoModelForCausalLM

    from tests.engine.test_gguf_kquants import VOCAB, write_tiny_kquant_gguf

    gguf = tmp_path / "tiny.gguf"
    write_tiny_kquant_gguf(gguf)
    folder = tmp_path / "dequantized"
    expanded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=gguf.name, dtype=torch.float32)
    plain = AutoModelForCausalLM.from_config(expanded.config, dtype=torch.float32)  # transformers will not save a
    plain.load_state_dict(expanded.state_dict())                                     # GGUF-loaded model as it is
    plain.save_pretrained(folder)
    peft_model = make_adapter(tmp_path / "adapter", str(folder), seed=3, r=8, alpha=16, targets=TARGETS_ALL)
    request = LoRARequest("a", 1, str(tmp_path / "adapter"))
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, VOCAB, n).tolist() for n in (4, 11, 23)]
    reference = [hf_greedy(peft_model, p, 8) for p in prompts]
    params = SamplingParams(max_tokens=8, min_tokens=8, temperature=0, ignore_eos=True)

    def run(llm, lora=request):
        return tokens(llm.generate([{"prompt_token_ids": p} for p in prompts], params, lora_request=lora))

    engine = dict(tokenizer=str(smollm2_path), enable_lora=True, max_lora_rank=8, num_kv_blocks=64)
    monkeypatch.setenv("LOOM_GGUF_ACTIVATIONS", "float32")
    exact = LLM(str(gguf), **engine)
    assert type(exact.engine.model.layers[0].mlp.gate_up_proj.base).__name__ == "GGUFLinear"
    assert run(exact) == reference
    assert run(exact, None) != reference  # the adapter changes the answer
    forced = [p + list(ids[:i]) for p, ids in zip(prompts, reference) for i in range(len(ids))]

    def agreement(llm, lora) -> float:  # next token given peft's context
        outs = llm.generate([{"prompt_token_ids": f} for f in forced], SamplingParams(max_tokens=1, temperature=0),
                            lora_request=lora)
        return float(np.mean([o.outputs[0].token_ids[0] == t for o, t in zip(outs, sum(reference, []))]))

    monkeypatch.setenv("LOOM_GGUF_ACTIVATIONS", "int8")
    for kind, llm in (("int8 activations", LLM(str(gguf), **engine)),
                      ("int8 weights", LLM(str(folder), quantization="int8", **engine))):
        with_adapter = agreement(llm, request)
        assert with_adapter >= 0.9 and agreement(llm, None) < with_adapter, kind
