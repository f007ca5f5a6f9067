"""Beam search: the pure search on hand-made log-probabilities (the width best continuations, end tokens, length
penalty, 2 × width candidates per beam), and ``LLM.beam_search`` against HF transformers' ``generate(num_beams=...)``
on a tiny random model (the same beams, tokens and scores), width 1 against greedy decoding."""

from __future__ import annotations

import pytest
import torch

from loom import LLM, BeamSearchParams, SamplingParams
from loom.engine.beam_search import BeamSearch

EOS = 0


def _search(width: int, max_tokens: int = 3, **kw) -> BeamSearch:
    return BeamSearch([11, 12], BeamSearchParams(beam_width=width, max_tokens=max_tokens, **kw), {EOS})


def _beams(beams) -> list[tuple[list[int], float, str | None]]:
    return [(b.token_ids, round(b.cum_logprob, 6), b.finish_reason) for b in beams]


def test_each_step_keeps_the_width_best_continuations_of_all_beams():
    search = _search(2)
    assert search.prompts() == [[11, 12]]
    search.advance([{5: -0.1, 6: -1.0, 7: -2.0, 8: -3.0}])
    assert search.prompts() == [[11, 12, 5], [11, 12, 6]]
    search.advance([{1: -2.0, 2: -3.0, 3: -4.0, 4: -5.0}, {3: -0.5, 4: -0.6, 9: -7.0, 10: -8.0}])
    assert _beams(search.live) == [([6, 3], -1.5, None), ([6, 4], -1.6, None)]  # both children of the second beam
    search.advance([{1: -1.0}, {2: -0.1}])
    assert search.done and _beams(search.result()) == [([6, 4, 2], -1.7, "length"), ([6, 3, 1], -2.5, "length")]


def test_an_end_token_finishes_a_beam_and_the_ranking_divides_by_length():
    search = _search(2)
    search.advance([{EOS: -0.5, 5: -0.6, 6: -0.7}])  # [EOS] finishes; 5 and 6 stay live
    assert _beams(search.finished) == [([], -0.5, "stop")]
    assert _beams(search.live) == [([5], -0.6, None), ([6], -0.7, None)]
    search.advance([{7: -0.4}, {8: -0.5}])
    search.advance([{9: -0.2}, {10: -0.2}])
    # lengths, end tokens counted: 1 for the finished beam, 3 for the others: -0.5 / 1 against -1.2 / 3 and -1.4 / 3
    assert _beams(search.result()) == [([5, 7, 9], -1.2, "length"), ([6, 8, 10], -1.4, "length")]
    flat = _search(2, max_tokens=2, length_penalty=0.0)  # no normalisation: the plain sums
    flat.advance([{EOS: -0.5, 5: -0.6, 6: -0.7}])
    flat.advance([{7: -0.4}, {8: -0.5}])
    assert _beams(flat.result()) == [([], -0.5, "stop"), ([5, 7], -1.0, "length")]


def test_end_token_options_and_the_candidates_per_beam():
    kept = _search(2, include_stop_str_in_output=True)
    kept.advance([{EOS: -0.1, 4: -0.2}])
    assert _beams(kept.finished) == [([EOS], -0.1, "stop")]
    assert _beams(kept.live) == [([4], -0.2, None)]  # the second candidate lives on beside the finished first
    ignoring = _search(1, ignore_eos=True)
    ignoring.advance([{EOS: -0.1, 4: -0.2}])
    assert not ignoring.finished and _beams(ignoring.live) == [([EOS], -0.1, None)]
    wide = _search(1)  # 2 × width = 2 candidates per beam: the third-best end token is not one
    wide.advance([{5: -0.1, 6: -0.2, EOS: -0.3}])
    assert not wide.finished
    below = _search(1)  # an end token below the first width candidates does not finish a beam (HF's rule)
    below.advance([{5: -0.1, EOS: -0.2}])
    assert not below.finished and _beams(below.live) == [([5], -0.1, None)]
    settled = _search(1, max_tokens=10)  # one finished beam the live one cannot beat at its length: the search stops
    settled.advance([{EOS: -0.1, 5: -0.2}])
    assert settled.done and settled.num_steps == 1 and _beams(settled.result()) == [([], -0.1, "stop")]
    for bad in (dict(beam_width=11), dict(length_penalty=float("nan")), dict(length_penalty=2000.0)):
        with pytest.raises(ValueError):
            BeamSearchParams(**{"beam_width": 2, "max_tokens": 4, **bad})


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama), block_size=4, num_kv_blocks=512)


def test_beam_search_equals_hf_transformers_beams(llm, tiny_llama):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7, 100, 200], [42] * 9]
    width, steps = 3, 6
    outs = llm.beam_search([{"prompt_token_ids": p} for p in prompts], BeamSearchParams(beam_width=width,
                                                                                         max_tokens=steps))
    for prompt, out in zip(prompts, outs):
        ref = hf.generate(torch.tensor([prompt]), num_beams=width, num_return_sequences=width, do_sample=False,
                          max_new_tokens=steps, output_scores=True, return_dict_in_generate=True)
        assert [c.token_ids for c in out.outputs] == [s[len(prompt):].tolist() for s in ref.sequences]
        # HF's score is the sum over the length (length_penalty 1): no end token among these beams
        assert [c.cumulative_logprob / steps for c in out.outputs] == pytest.approx(ref.sequences_scores.tolist(),
                                                                                  abs=1e-4)
        assert [c.text for c in out.outputs] == [llm.tokenizer.decode(c.token_ids, skip_special_tokens=True)
                                                 for c in out.outputs]
    one = llm.beam_search([{"prompt_token_ids": prompts[0]}], BeamSearchParams(beam_width=1, max_tokens=steps))
    greedy = llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(temperature=0, max_tokens=steps))
    assert one[0].outputs[0].token_ids == greedy[0].outputs[0].token_ids
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not llm.engine.requests


@pytest.mark.parametrize("width, length_penalty", [(2, 1.0), (3, 0.0), (2, 2.0)])
def test_with_an_end_token_the_beams_and_scores_are_hfs(llm, tiny_llama, monkeypatch, width, length_penalty):
    """An end token that the best beams draw (a token of HF's own unconstrained search): finished beams, their
    scores (end token counted), the candidates an end token may finish, and the early stop are HF's."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    prompt, steps = [9, 8, 7, 100, 200], 6
    free = hf.generate(torch.tensor([prompt]), num_beams=width, do_sample=False, max_new_tokens=steps)
    eos = int(free[0, len(prompt) + 2])  # the best beam's third token ends beams from now on
    ref = hf.generate(torch.tensor([prompt]), num_beams=width, num_return_sequences=width, do_sample=False,
                      max_new_tokens=steps, eos_token_id=eos, pad_token_id=eos, length_penalty=length_penalty,
                      output_scores=True, return_dict_in_generate=True)
    monkeypatch.setattr(llm.engine, "eos_token_ids", [eos])
    out = llm.beam_search([{"prompt_token_ids": prompt}], BeamSearchParams(
        beam_width=width, max_tokens=steps, length_penalty=length_penalty, include_stop_str_in_output=True))[0]
    # a finished beam is among the best unless a length penalty of 2 ranks it below the longer ones
    assert any(c.finish_reason == "stop" for c in out.outputs) == (length_penalty < 2)
    assert len(out.outputs) == len(ref.sequences) == width
    for c, seq, score in zip(out.outputs, ref.sequences.tolist(), ref.sequences_scores.tolist()):
        generated = seq[len(prompt):]
        assert generated[:len(c.token_ids)] == c.token_ids and set(generated[len(c.token_ids):]) <= {eos}
        assert c.cumulative_logprob / len(c.token_ids) ** length_penalty == pytest.approx(score, abs=1e-4)


def test_a_refused_prompt_leaves_nothing_in_the_engine(llm):
    limit = llm.engine.max_model_len
    with pytest.raises(ValueError, match="context"):  # checked before any step
        llm.beam_search([{"prompt_token_ids": [5] * 8}], BeamSearchParams(beam_width=2, max_tokens=limit))
    with pytest.raises(ValueError, match="prompt token ids"):  # the second prompt's first step: the first's dropped
        llm.beam_search([{"prompt_token_ids": [5, 6]}, {"prompt_token_ids": [10 ** 9]}],
                        BeamSearchParams(beam_width=2, max_tokens=3))
    assert not llm.engine.requests and not llm.engine.scheduler.has_unfinished
