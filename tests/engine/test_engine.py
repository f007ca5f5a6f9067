"""Engine behaviour on a tiny random Llama: seeds, n > 1, stops, min_tokens, logprobs, bad input, no leaked blocks,
preemption with identical output, CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from loom import LLM, SamplingParams
from tests.engine.test_parity import varied_prompts


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama), block_size=4, max_num_batched_tokens=128, num_kv_blocks=1024)


def gen(llm, prompts, params):
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params)


def assert_no_leaks(llm):
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert not llm.engine.requests and not llm.engine.scheduler.has_unfinished


def test_seeded_request_is_reproducible_whatever_shares_the_batch(llm):
    target = varied_prompts(1, seed=10)[0]
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=24, ignore_eos=True)
    alone = gen(llm, [target], seeded)[0].outputs[0].token_ids
    others = varied_prompts(7, seed=11)
    mixed = llm.generate(
        [{"prompt_token_ids": p} for p in [*others[:3], target, *others[3:]]],
        [SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True)] * 3 + [seeded]
        + [SamplingParams(temperature=0.7, top_p=0.9, max_tokens=10, ignore_eos=True)] * 4,
    )  # fmt: skip
    assert mixed[3].outputs[0].token_ids == alone
    different = gen(llm, [target], seeded.clone(seed=99))[0].outputs[0].token_ids
    assert different != alone
    assert_no_leaks(llm)


def test_n_completions_share_the_prompt_and_differ(llm):
    prompt = varied_prompts(1, seed=12, low=40, high=40)[0]
    before = llm.engine.block_manager.num_prefix_hit_tokens
    out = gen(llm, [prompt], SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=12, ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 12 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3
    # Siblings 2 and 3 reuse the first one's 9 full blocks (36 tokens) of the 40-token prompt.
    assert llm.engine.block_manager.num_prefix_hit_tokens - before == 2 * 36
    assert_no_leaks(llm)


def test_stop_string_ends_text_before_it(llm):
    prompt = varied_prompts(1, seed=13)[0]
    full = gen(llm, [prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0].outputs[0]
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    assert len(stop) == 3
    out = gen(llm, [prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full.text[: full.text.index(stop)]
    kept = gen(llm, [prompt],
               SamplingParams(temperature=0, max_tokens=30, stop=[stop], include_stop_str_in_output=True))
    assert kept[0].outputs[0].text == full.text[: full.text.index(stop) + 3]


def test_without_detokenizing_the_ids_are_the_same_and_there_is_no_text(llm):
    prompts = varied_prompts(3, seed=17)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    full = [o.outputs[0] for o in gen(llm, prompts, params)]
    bare = [o.outputs[0] for o in gen(llm, prompts, params.clone(detokenize=False))]
    assert [o.token_ids for o in bare] == [o.token_ids for o in full] and all(o.text for o in full)
    assert [o.text for o in bare] == ["", "", ""]
    with pytest.raises(ValueError, match="stop strings are matched on text"):
        SamplingParams(stop=["x"], detokenize=False)


def test_dummy_weights_need_only_a_config_and_follow_the_seed(tmp_path, smollm2_path):
    """load_format="dummy" (vLLM's): a folder with config.json and a tokenizer, no safetensors; weights drawn from
    U(-1e-3, 1e-3) with the engine's seed, so the same seed gives the same weights."""
    import shutil

    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_path / name, tmp_path / name)
    (tmp_path / "config.json").write_text((tmp_path / "config.json").read_text().replace('"num_hidden_layers": 30',
                                                                                         '"num_hidden_layers": 2'))
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        LLM(str(tmp_path))
    kwargs = dict(load_format="dummy", num_kv_blocks=64)
    first, again, other = (LLM(str(tmp_path), seed=s, **kwargs) for s in (1, 1, 2))
    weights = first.engine.model.embed_tokens.weight.detach()
    assert weights.shape == (49152, 576) and 0 < weights.abs().max() <= 1e-3 and weights.std() > 4e-4
    assert torch.equal(weights, again.engine.model.embed_tokens.weight)
    assert not torch.equal(weights, other.engine.model.embed_tokens.weight)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, detokenize=False)
    ids = [gen(m, [[5, 6, 7, 8]], params)[0].outputs[0].token_ids for m in (first, again)]
    assert len(ids[0]) == 6 and ids[0] == ids[1]


def test_stop_token_ids_and_min_tokens(llm):
    prompt = varied_prompts(1, seed=14)[0]
    greedy = gen(llm, [prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0].outputs[0].token_ids
    stop_id = greedy[3]
    first = greedy.index(stop_id)
    out = gen(llm, [prompt], SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_id]))[0].outputs[0]
    assert (out.finish_reason, out.stop_reason, out.token_ids) == ("stop", stop_id, greedy[: first + 1])
    # The stop token's own text is left out (special or not), unless include_stop_str_in_output.
    shown = SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_id], skip_special_tokens=False)
    before = gen(llm, [prompt], SamplingParams(temperature=0, max_tokens=first, ignore_eos=True))[0].outputs[0].text
    upto = gen(llm, [prompt], SamplingParams(temperature=0, max_tokens=first + 1, ignore_eos=True))[0].outputs[0].text
    assert gen(llm, [prompt], shown)[0].outputs[0].text == before != upto
    shown.include_stop_str_in_output = True
    assert gen(llm, [prompt], shown)[0].outputs[0].text == upto
    # min_tokens masks the stop id for the first 8 tokens, so generation goes past it.
    held = gen(llm, [prompt], SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_id], min_tokens=8))
    ids = held[0].outputs[0].token_ids
    assert len(ids) > 8 and stop_id not in ids[:8]


def test_max_tokens_gives_length_and_logprobs_have_top_k(llm):
    prompt = varied_prompts(1, seed=15)[0]
    out = gen(llm, [prompt], SamplingParams(temperature=0.8, seed=3, max_tokens=7, ignore_eos=True, logprobs=3))
    c = out[0].outputs[0]
    assert c.finish_reason == "length" and len(c.token_ids) == 7 and len(c.logprobs) == 7
    for token, lp in zip(c.token_ids, c.logprobs):
        assert token in lp and 3 <= len(lp) <= 4 and all(v <= 0 for v in lp.values())
    assert c.cumulative_logprob == pytest.approx(sum(lp[t] for t, lp in zip(c.token_ids, c.logprobs)))


def test_bad_input_raises_clear_errors(llm, tmp_path):
    with pytest.raises(ValueError, match="prompt is empty"):
        gen(llm, [[]], SamplingParams())
    too_long = [5] * 1024
    with pytest.raises(ValueError, match="1024 tokens but the model's context is 1024"):
        gen(llm, [too_long], SamplingParams())
    with pytest.raises(ValueError, match="exceeds the model's context"):
        gen(llm, [[5] * 1000], SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=10, max_tokens=5)
    with pytest.raises(ValueError, match="neither a catalogue name"):
        LLM(str(tmp_path / "missing"))
    assert_no_leaks(llm)


def test_request_larger_than_the_whole_pool_fails_at_once(tiny_llama):
    small = LLM(str(tiny_llama), block_size=4, num_kv_blocks=8)
    with pytest.raises(ValueError, match="whole pool holds 32"):
        gen(small, [[5] * 20], SamplingParams(max_tokens=20))


def test_abort_frees_every_block(llm):
    engine = llm.engine
    for i, p in enumerate(varied_prompts(6, seed=16)):
        engine.add_request(f"abort-{i}", None, SamplingParams(n=2, max_tokens=50, ignore_eos=True), prompt_token_ids=p)
    for _ in range(3):
        engine.step()
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks
    for i in range(6):
        assert engine.abort_request(f"abort-{i}")
    assert_no_leaks(llm)


def test_preemption_resumes_with_identical_output(tiny_llama):
    prompts = varied_prompts(8, seed=17, low=20, high=40)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    roomy = LLM(str(tiny_llama), block_size=4, num_kv_blocks=1024)
    tight = LLM(str(tiny_llama), block_size=4, num_kv_blocks=40)  # 160 slots for 8 sequences of up to 80 tokens
    expected = [o.outputs[0].token_ids for o in gen(roomy, prompts, params)]
    got = [o.outputs[0].token_ids for o in gen(tight, prompts, params)]
    assert tight.engine.stats().num_preemptions > 0
    assert got == expected
    assert_no_leaks(tight)


def test_incremental_detokenization_never_splits_utf8(smollm2_path):
    from transformers import AutoTokenizer

    from loom.engine.detokenizer import detokenize_next, new_state

    tok = AutoTokenizer.from_pretrained(str(smollm2_path))
    text = "Grüße aus Köln — 日本語のテキスト 🙂🚀 done."
    ids = tok.encode(text, add_special_tokens=False)
    state = new_state(tok.encode("Say:", add_special_tokens=False))
    deltas = [detokenize_next(tok, state, t, skip_special_tokens=True) for t in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tok.decode(ids) and state.text == text


def test_the_fast_decode_decodes_as_the_tokenizer_does(smollm2_path):
    """The engine's detokenizer calls the Rust tokenizer directly: the same text as ``tokenizer.decode`` for random
    ids with special tokens among them, skipping them or not, and the incremental stream adds up to the text; a
    tokenizer that cleans up spaces keeps its own decode."""
    import random

    from transformers import AutoTokenizer

    from loom.engine.detokenizer import FastDecode, detokenize_next, new_state

    tok = AutoTokenizer.from_pretrained(str(smollm2_path))
    fast = FastDecode(tok)
    assert fast.backend is not None
    rng = random.Random(3)
    specials = tok.all_special_ids
    for _ in range(300):
        ids = [rng.choice(specials) if rng.random() < 0.1 else rng.randrange(tok.vocab_size)
               for _ in range(rng.randrange(1, 12))]
        for skip in (True, False):
            assert fast.decode(ids, skip_special_tokens=skip) == tok.decode(ids, skip_special_tokens=skip), ids
    text = "Grüße aus Köln — 日本語のテキスト 🙂🚀 done."
    ids = tok.encode(text, add_special_tokens=False)
    state = new_state(tok.encode("Say:", add_special_tokens=False))
    assert "".join(detokenize_next(fast, state, t, skip_special_tokens=True) for t in ids) == text
    tok.clean_up_tokenization_spaces = True
    assert FastDecode(tok).backend is None


def test_kv_waste_is_reported_below_a_block_per_sequence(llm):
    gen(llm, varied_prompts(8, seed=18, low=50, high=90), SamplingParams(max_tokens=16, ignore_eos=True))
    stats = llm.engine.stats()
    assert 0 < stats.kv_waste_mean < 0.1
    assert stats.num_generation_tokens > 0 and stats.num_prompt_tokens > 0


@pytest.mark.slow
def test_loom_chat_answers_capital_of_france():
    proc = subprocess.run(
        [sys.executable, "-m", "loom.cli", "chat", "--model", "smollm2:f32", "--kv-cache-memory-gb", "0.25"],
        input="What is the capital of France?\n", capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


def test_loom_generate_cli(tiny_llama):
    proc = subprocess.run(
        [sys.executable, "-m", "loom.cli", "generate", "--model", str(tiny_llama), "--max-tokens", "5", "--json",
         "Hello"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert '"finish_reason": "length"' in proc.stdout


def test_string_prompts_get_the_tokenizers_bos_and_chat_prompts_do_not_get_two(tmp_path, smollm2_path):
    """As vLLM and HF encode them: a string prompt with the tokenizer's special tokens (Llama's BOS), a chat prompt
    exactly as the chat template writes it."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    from tests.conftest import save_tiny_model

    path = save_tiny_model(tmp_path / "bos-llama", smollm2_path)
    tok = AutoTokenizer.from_pretrained(str(path))
    bos = tok.convert_tokens_to_ids("<|im_start|>")  # SmolLM2's bos_token; its tokenizer adds none by default
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)]
    )
    tok.save_pretrained(path)
    text = "The quick brown fox"
    expected = AutoTokenizer.from_pretrained(str(path))(text)["input_ids"]
    assert expected[0] == bos and len(expected) > 1

    llm = LLM(str(path), num_kv_blocks=64)
    out = llm.generate(text, SamplingParams(max_tokens=2, temperature=0))[0]
    assert out.prompt_token_ids == expected

    messages = [{"role": "user", "content": text}]
    chat = llm.chat(messages, SamplingParams(max_tokens=2, temperature=0))[0]
    templated = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    templated = list(templated["input_ids"] if hasattr(templated, "keys") else templated)
    assert chat.prompt_token_ids == templated
    assert chat.prompt_token_ids[:2] != [bos, bos]


def test_an_output_ending_inside_a_character_gets_its_held_back_text_at_the_end(smollm2_path):
    from transformers import AutoTokenizer

    from loom.engine.detokenizer import detokenize_flush, detokenize_next, new_state

    tok = AutoTokenizer.from_pretrained(str(smollm2_path))
    ids = tok.encode("Grüße 🙂🚀", add_special_tokens=False)
    cut = next(n for n in range(len(ids), 0, -1) if tok.decode(ids[:n]).endswith("\ufffd"))  # ends mid-character
    state = new_state(tok.encode("Say:", add_special_tokens=False))
    streamed = "".join(detokenize_next(tok, state, t, skip_special_tokens=True) for t in ids[:cut])
    assert "\ufffd" not in streamed  # held back while the character may still complete ...
    rest = detokenize_flush(tok, state, skip_special_tokens=True)
    assert rest.endswith("\ufffd") and streamed + rest == tok.decode(ids[:cut]) == state.text  # ... given at the end
    assert detokenize_flush(tok, state, skip_special_tokens=True) == ""


def test_final_only_requests_come_back_once_with_the_cumulative_final_output(llm):
    engine = llm.engine
    prompts = varied_prompts(3, seed=50)
    for kind in ("cumulative", "final_only"):
        for i, p in enumerate(prompts):
            engine.add_request(f"{kind}-{i}", None, SamplingParams(temperature=0, max_tokens=5 + i, ignore_eos=True,
                                                                   output_kind=kind), prompt_token_ids=p)
    seen: dict[str, list] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen.setdefault(out.request_id, []).append(out)
    for i in range(3):
        cumulative, final = seen[f"cumulative-{i}"], seen[f"final_only-{i}"]
        assert len(cumulative) == 5 + i and len(final) == 1 and final[0].finished
        assert (final[0].outputs[0].token_ids, final[0].outputs[0].text) == (cumulative[-1].outputs[0].token_ids,
                                                                             cumulative[-1].outputs[0].text)
    with pytest.raises(ValueError, match="output_kind"):
        SamplingParams(output_kind="deltas")
    assert_no_leaks(llm)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_delta_outputs_add_up_to_the_cumulative_ones_step_by_step(tiny_llama, async_scheduling):
    """Each request runs twice in one engine, "cumulative" and "delta", side by side (so in the same steps): after
    every step, the deltas so far merged equal the cumulative output (text held back before a stop string, logprobs,
    two completions of which one stops early, a stop string kept in the text)."""
    from loom.engine.outputs import merge_deltas

    llm = LLM(str(tiny_llama), block_size=4, max_num_batched_tokens=256, num_kv_blocks=512,
              async_scheduling=async_scheduling)
    prompts = varied_prompts(3, seed=60, low=5, high=20)
    plain = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
    text, other = (o.outputs[0].text for o in gen(llm, prompts[::2], plain))
    sampled = SamplingParams(n=2, temperature=1.0, seed=8, max_tokens=12, ignore_eos=True, logprobs=2)
    first = gen(llm, prompts[1:2], sampled)[0].outputs[0].text
    cases = [
        (prompts[0], plain.clone(stop=[text[8:12]], logprobs=0)),
        (prompts[1], sampled.clone(stop=[first[6:9]])),
        (prompts[2], plain.clone(stop=["zzz", other[5:7]], include_stop_str_in_output=True)),
    ]
    engine = llm.engine
    for i, (prompt, params) in enumerate(cases):
        for kind in ("cumulative", "delta"):
            engine.add_request(f"{kind}-{i}", None, params.clone(output_kind=kind), prompt_token_ids=prompt)
    merged: dict[int, object] = {}
    compared = 0
    while engine.has_unfinished_requests():
        outs = {o.request_id: o for o in engine.step()}
        for i in range(len(cases)):
            cumulative, delta = outs.get(f"cumulative-{i}"), outs.get(f"delta-{i}")
            assert (cumulative is None) == (delta is None)
            if delta is None:
                continue
            merged[i] = delta if i not in merged else merge_deltas(merged[i], delta)
            got = merged[i]
            assert (got.outputs, got.finished, got.prompt_token_ids) == (cumulative.outputs, cumulative.finished,
                                                                         cumulative.prompt_token_ids)
            compared += 1
    finals = [merged[i].outputs for i in range(3)]
    assert [c.finish_reason for c in finals[0]] == ["stop"] and finals[0][0].logprobs[0]
    assert [c.finish_reason for c in finals[1]] == ["stop", "length"] and len(finals[1][0].logprobs[0]) >= 2
    assert finals[2][0].finish_reason == "stop" and finals[2][0].text.endswith(finals[2][0].stop_reason)
    assert compared >= 12  # several steps of each request
    assert_no_leaks(llm)


def test_generate_asks_for_final_outputs_only_and_leaves_the_callers_params_alone(llm, monkeypatch):
    returned = []
    step = llm.engine.step
    monkeypatch.setattr(llm.engine, "step", lambda: returned.extend(outs := step()) or outs)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = gen(llm, varied_prompts(4, seed=51), params)
    assert params.output_kind == "cumulative"
    assert [len(o.outputs[0].token_ids) for o in outs] == [6] * 4
    assert len(returned) == 4 and all(o.finished for o in returned)  # no output built for an unfinished step


def test_logit_bias_and_allowed_token_ids_steer_sampling_and_keep_the_models_logprobs(tiny_llama):
    """OpenAI's logit_bias and vLLM's allowed_token_ids: +100 forces a token, -100 bans it, an allowed set holds every
    output token; the log-probabilities returned are the model's own (as vLLM's default), not the biased ones."""
    llm = LLM(str(tiny_llama), num_kv_blocks=64)
    prompt = {"prompt_token_ids": [1, 42, 7, 99, 13]}
    greedy = dict(temperature=0, max_tokens=6, ignore_eos=True)
    base = llm.generate(prompt, SamplingParams(**greedy, logprobs=20))[0].outputs[0]
    forced = llm.generate(prompt, SamplingParams(**greedy, logit_bias={"777": 100}))[0].outputs[0]
    assert forced.token_ids == [777] * 6
    banned = llm.generate(prompt, SamplingParams(**greedy, logit_bias={base.token_ids[0]: -100}))[0].outputs[0]
    assert banned.token_ids[0] != base.token_ids[0]
    top = sorted(base.logprobs[0], key=base.logprobs[0].get, reverse=True)
    allowed = top[3:6]  # three of the first step's top 20, not its best
    out = llm.generate(prompt, SamplingParams(**greedy, allowed_token_ids=allowed, logprobs=0))[0].outputs[0]
    assert set(out.token_ids) <= set(allowed)
    assert out.token_ids[0] == max(allowed, key=base.logprobs[0].get)  # the best of the allowed
    assert out.logprobs[0][out.token_ids[0]] == pytest.approx(base.logprobs[0][out.token_ids[0]], abs=1e-5)
    seeded = SamplingParams(temperature=1.0, seed=5, max_tokens=8, ignore_eos=True, allowed_token_ids=allowed,
                            logit_bias={allowed[0]: -2.0})
    runs = [llm.generate(prompt, seeded)[0].outputs[0].token_ids for _ in range(2)]
    assert runs[0] == runs[1] and set(runs[0]) <= set(allowed)
    vocab = llm.engine.model.config.vocab_size
    for bad, message in (({"logit_bias": {vocab: 1.0}}, "outside the vocabulary"),
                         ({"allowed_token_ids": [3, vocab + 5]}, "outside the vocabulary"),
                         ({"logit_bias": {"3": 101}}, r"\[-100, 100\]"), ({"logit_bias": {"x": 1}}, "token ids"),
                         ({"allowed_token_ids": []}, "empty"), ({"logit_bias": {float("inf"): 1}}, "token ids"),
                         ({"allowed_token_ids": [2], "min_tokens": 2, "stop_token_ids": [2]}, "only stop tokens")):
        with pytest.raises(ValueError, match=message):
            llm.generate(prompt, SamplingParams(**greedy, **bad))
    assert llm.engine.block_manager.num_free_blocks == 64


def test_priority_scheduling_serves_lower_values_first_with_the_same_outputs(tiny_llama, llm):
    prompts = varied_prompts(6, seed=5, low=8, high=16)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in gen(llm, prompts, params)]
    one_at_a_time = LLM(str(tiny_llama), block_size=4, num_kv_blocks=1024, max_num_seqs=1,
                        scheduling_policy="priority")
    engine = one_at_a_time.engine
    for i, (prompt, priority) in enumerate(zip(prompts, [3, 1, 2, 0, 1, 5])):
        engine.add_request(str(i), None, params, prompt_token_ids=prompt, priority=priority)
    finished, outputs = [], {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished.append(out.request_id)
                outputs[int(out.request_id)] = out.outputs[0].token_ids
    assert finished == ["3", "1", "4", "2", "0", "5"]  # by priority, then arrival
    assert [outputs[i] for i in range(6)] == expected
    # preempted by priority in a tight pool: the same outputs, nothing leaked
    tight = LLM(str(tiny_llama), block_size=4, num_kv_blocks=40, scheduling_policy="priority")
    long = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompts = varied_prompts(8, seed=17, low=20, high=40)
    got = tight.generate([{"prompt_token_ids": p} for p in prompts], long, priority=[2, 0, 1, 3, 0, 2, 1, 0])
    assert tight.engine.stats().num_preemptions > 0
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in gen(llm, prompts, long)]
    assert_no_leaks(tight)
    with pytest.raises(ValueError, match="--scheduling-policy priority"):  # the first prompt is dropped too
        llm.generate([{"prompt_token_ids": p} for p in prompts[:2]], params, priority=[0, 1])
    assert_no_leaks(llm)


def test_chat_takes_vllms_use_tqdm(tiny_llama, capsys):
    llm = LLM(str(tiny_llama), num_kv_blocks=32)
    messages = [{"role": "user", "content": "Hello there"}]
    params = SamplingParams(max_tokens=4, temperature=0)
    quiet = llm.chat(messages, params)[0].outputs[0].token_ids
    capsys.readouterr()
    assert llm.chat(messages, params, use_tqdm=True)[0].outputs[0].token_ids == quiet
    assert "requests" in capsys.readouterr().err  # the bar
