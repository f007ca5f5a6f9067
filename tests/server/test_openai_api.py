"""The OpenAI-compatible API driven by the official ``openai`` client against a real uvicorn server (tiny model)."""

from __future__ import annotations

import httpx
import pytest
import torch

from tests.engine.test_spec_decode import NGRAM, Oracle
from tests.server.conftest import start_llm_server, tiny_config

MESSAGES = [{"role": "user", "content": "Name three colours."}]


def _chat(client, **kw):
    return client.chat.completions.create(model="tiny", messages=MESSAGES, **kw)


def test_models_lists_the_served_name(client, tiny_server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert models.data[0].max_model_len == 1024


def test_completion_usage_and_length_finish(client, tiny_server):
    prompt = "The quick brown fox"
    expected_prompt = httpx.post(f"{tiny_server.url}/tokenize", json={"prompt": prompt}).json()["count"]
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=7, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.object == "text_completion" and out.id.startswith("cmpl-") and out.created > 0
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == expected_prompt
    assert out.usage.completion_tokens == 7
    assert out.usage.total_tokens == expected_prompt + 7
    ids = httpx.post(f"{tiny_server.url}/tokenize", json={"prompt": out.choices[0].text}).json()["tokens"]
    assert 1 <= len(ids) <= 14  # the text re-tokenizes to a similar count (merges may differ)


def test_streaming_completion_matches_non_streaming(client):
    kw = dict(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_chat_stream_matches_non_stream_and_has_openai_shape(client):
    full = _chat(client, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    assert full.object == "chat.completion" and full.id.startswith("chatcmpl-")
    assert full.choices[0].message.role == "assistant" and full.choices[0].finish_reason == "length"
    chunks = list(_chat(client, max_tokens=10, temperature=0, stream=True, stream_options={"include_usage": True},
                        extra_body={"ignore_eos": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == full.choices[0].message.content
    last_choice = [c for c in chunks if c.choices][-1].choices[0]
    assert last_choice.finish_reason == "length" and last_choice.delta.content is None
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_raw_sse_ends_with_done(tiny_server):
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{tiny_server.base_url}/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert '"finish_reason":' in lines[-2] and '"finish_reason":null' not in lines[-2]


def test_n2_gives_two_choices_and_counts_both(client):
    out = _chat(client, n=2, max_tokens=6, temperature=1.0, seed=7, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1]
    assert out.choices[0].message.content != out.choices[1].message.content
    assert out.usage.completion_tokens == 12
    stream = list(_chat(client, n=2, max_tokens=6, temperature=1.0, seed=7, stream=True,
                        extra_body={"ignore_eos": True}))
    texts = ["", ""]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == [c.message.content for c in sorted(out.choices, key=lambda c: c.index)]


def test_seed_reproduces_and_differs(client):
    a = _chat(client, max_tokens=8, temperature=1.0, seed=1234).choices[0].message.content
    b = _chat(client, max_tokens=8, temperature=1.0, seed=1234).choices[0].message.content
    c = _chat(client, max_tokens=8, temperature=1.0, seed=4321).choices[0].message.content
    assert a == b
    assert a != c


def test_stop_string_cuts_the_text(client):
    kw = dict(model="tiny", prompt="A B C", temperature=0, extra_body={"ignore_eos": True})
    text = client.completions.create(max_tokens=16, **kw).choices[0].text
    words = text.split()
    stop = next(w for w in words[1:] if len(w) >= 3)  # a word after the first one
    out = client.completions.create(max_tokens=16, stop=[stop], **kw).choices[0]
    assert out.finish_reason == "stop"
    assert out.text == text[: text.index(stop)]
    streamed = "".join(c.choices[0].text
                       for c in client.completions.create(max_tokens=16, stop=stop, stream=True, **kw))
    assert streamed == out.text  # the held-back text never leaks part of the stop string


def test_chat_logprobs_have_tokens_bytes_and_sorted_top(client):
    out = _chat(client, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    entries = out.choices[0].logprobs.content
    assert len(entries) == out.usage.completion_tokens == 6
    joined = b"".join(bytes(e.bytes) for e in entries).decode("utf-8", errors="replace")
    assert joined == out.choices[0].message.content
    for e in entries:
        assert len(e.top_logprobs) == 3
        tops = [t.logprob for t in e.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert e.top_logprobs[0].token == e.token and e.logprob == pytest.approx(tops[0])  # greedy


def test_completion_logprobs_match_transformers(client, tiny_llama, tiny_server):
    from transformers import AutoModelForCausalLM

    prompt_ids = httpx.post(f"{tiny_server.url}/tokenize", json={"prompt": "Paris is the capital of"}).json()["tokens"]
    out = client.completions.create(model="tiny", prompt=prompt_ids, max_tokens=1, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([prompt_ids])).logits[0, -1], dim=-1)  # [V]
    values, ids = ref.topk(2)
    tok = client_tokenizer(tiny_llama)
    expected_tokens = [tok.decode([i]) for i in ids.tolist()]
    assert lp.tokens[0] == expected_tokens[0]
    assert lp.token_logprobs[0] == pytest.approx(values[0].item(), abs=1e-4)
    assert list(lp.top_logprobs[0]) == expected_tokens
    assert list(lp.top_logprobs[0].values()) == pytest.approx(values.tolist(), abs=1e-4)


def client_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def test_token_id_prompts_and_prompt_lists(client):
    out = client.completions.create(model="tiny", prompt=["one", "two"], n=2, max_tokens=3, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    assert out.usage.completion_tokens == 12
    by_prompt = {c.index: c.text for c in out.choices}
    assert by_prompt[0] == by_prompt[1] and by_prompt[2] == by_prompt[3]  # greedy: both completions agree


def test_tokenize_detokenize_roundtrip(tiny_server):
    ids = httpx.post(f"{tiny_server.url}/tokenize", json={"prompt": "hello world"}).json()["tokens"]
    assert httpx.post(f"{tiny_server.url}/detokenize", json={"tokens": ids}).json() == {"prompt": "hello world"}
    chat = httpx.post(f"{tiny_server.url}/tokenize", json={"messages": MESSAGES}).json()
    assert chat["count"] == len(chat["tokens"]) > len(ids)
    bad = httpx.post(f"{tiny_server.url}/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_extra_sampling_fields_are_honoured(client):
    out = _chat(client, max_tokens=5, temperature=0.8, seed=3,
                extra_body={"top_k": 1, "min_tokens": 5, "repetition_penalty": 1.1, "min_p": 0.0})
    greedy = _chat(client, max_tokens=5, temperature=0, extra_body={"repetition_penalty": 1.1, "min_tokens": 5})
    assert out.choices[0].message.content == greedy.choices[0].message.content  # top_k=1 is greedy
    assert out.usage.completion_tokens == 5


def test_logit_bias_and_allowed_token_ids_through_the_api(client, tiny_server):
    """OpenAI's logit_bias (string ids, as the openai client sends them) forces or bans tokens in completions and
    chat; vLLM's allowed_token_ids (extra_body) holds a stream to its set."""
    forced = httpx.post(f"{tiny_server.url}/tokenize", json={"prompt": " blue", "add_special_tokens": False}).json()
    token = forced["tokens"][0]
    out = client.completions.create(model="tiny", prompt="The sky is", max_tokens=4, temperature=0,
                                    logit_bias={str(token): 100}, extra_body={"ignore_eos": True})
    assert out.choices[0].text == httpx.post(f"{tiny_server.url}/detokenize", json={"tokens": [token] * 4}).json()[
        "prompt"]
    plain = _chat(client, max_tokens=3, temperature=0, extra_body={"ignore_eos": True}, logprobs=True)
    first = plain.choices[0].logprobs.content[0]
    first_id = httpx.post(f"{tiny_server.url}/tokenize", json={"prompt": first.token,
                                                               "add_special_tokens": False}).json()["tokens"]
    banned = _chat(client, max_tokens=3, temperature=0, extra_body={"ignore_eos": True}, logprobs=True,
                   logit_bias={str(t): -100 for t in first_id})
    assert banned.choices[0].logprobs.content[0].token != first.token
    words = [" blue", " red", " green", " sky"]
    allowed = [httpx.post(f"{tiny_server.url}/tokenize", json={"prompt": w, "add_special_tokens": False}).json()[
        "tokens"] for w in words]
    assert all(len(ids) == 1 for ids in allowed)  # each word one token
    chunks = _chat(client, max_tokens=6, temperature=0.9, seed=1, stream=True,
                   extra_body={"ignore_eos": True, "allowed_token_ids": [ids[0] for ids in allowed]})
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.split() and set(text.split()) <= {w.strip() for w in words} and len(text.split()) == 6


def test_echo_prepends_the_prompt(client):
    kw = dict(model="tiny", prompt="Echo this", max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    plain = client.completions.create(**kw).choices[0].text
    echoed = client.completions.create(echo=True, **kw).choices[0].text
    assert echoed == "Echo this" + plain
    streamed = "".join(c.choices[0].text for c in client.completions.create(echo=True, stream=True, **kw))
    assert streamed == echoed


def test_echo_with_logprobs_scores_the_prompt_as_lm_eval_reads_it(tiny_server, tiny_llama):
    """lm-eval's loglikelihood request (``echo``, ``logprobs: 1``, ``max_tokens: 1``): every prompt token scored
    after the first, as HF transformers scores it; the top logprobs let it tell a greedy continuation; a stream
    gives the same."""
    import json

    from transformers import AutoModelForCausalLM

    ids = list(range(500, 530))
    body = {"model": "tiny", "prompt": ids, "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True}
    lp = httpx.post(f"{tiny_server.base_url}/completions", json=body, timeout=60).json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 1 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0], dim=-1)
    assert lp["token_logprobs"][1:len(ids)] == pytest.approx([ref[j - 1, ids[j]].item() for j in range(1, len(ids))],
                                                            abs=1e-4)
    greedy = [max(top.values()) == token for token, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:])]
    assert greedy[:-1] == [int(ref[j - 1].argmax()) == ids[j] for j in range(1, len(ids))]
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
    streamed = {"tokens": [], "token_logprobs": [], "text_offset": []}
    with httpx.stream("POST", f"{tiny_server.base_url}/completions", json={**body, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    for key in streamed:
                        streamed[key] += (choice["logprobs"] or {}).get(key) or []
    assert streamed["tokens"] == lp["tokens"] and streamed["text_offset"] == lp["text_offset"]
    assert streamed["token_logprobs"][1:] == pytest.approx(lp["token_logprobs"][1:], abs=1e-5)


def test_speculative_server_streams_the_same_text_and_reports_acceptance(client, tiny_server, tiny_llama):
    import openai  # local, as in conftest's client fixture

    kw = dict(model="tiny", prompt="The quick brown fox", max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    want = client.completions.create(**kw).choices[0].text
    ids = httpx.post(f"{tiny_server.url}/tokenize", json={"prompt": kw["prompt"]}).json()["tokens"]
    ahead = httpx.post(f"{tiny_server.url}/tokenize", json={"prompt": want, "add_special_tokens": False}).json()
    server = start_llm_server(tiny_config(tiny_llama, num_kv_blocks=256, speculative_config=NGRAM))
    try:
        server.component.front.engine.spec.proposer = Oracle({tuple(ids): ahead["tokens"]})  # drafts: the answer
        with openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60) as spec_client:
            chunks = list(spec_client.completions.create(stream=True, **kw))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == want
        m = server.metrics()
        assert m["loom_generation_tokens_total"] == 24
        assert m["loom_spec_decode_num_draft_tokens_total"] >= m["loom_spec_decode_num_accepted_tokens_total"] > 0
        assert m["loom_spec_decode_num_drafts_total"] < 24
        assert m["loom_spec_decode_num_accepted_tokens_per_pos_total{position=0}"] > 0
        assert 0 < m["loom_spec_decode_draft_acceptance_rate"] <= 1
    finally:
        server.stop()


def test_async_scheduling_server_streams_what_the_synchronous_one_answers(client, tiny_llama):
    """A server with --async-scheduling: concurrent streamed completions (stop strings, n = 2, seeds) give the text,
    finish reasons and token counts of the synchronous server; tokens a stop made the step in flight waste are not
    counted."""
    import concurrent.futures

    import openai  # local, as in conftest's client fixture

    kinds = [dict(prompt="Once upon a time", max_tokens=16, temperature=0, extra_body={"ignore_eos": True}),
             dict(prompt="The capital of", max_tokens=20, temperature=0, stop=["e", "a"],
                  extra_body={"ignore_eos": True}),
             dict(prompt="Tell me", max_tokens=12, temperature=0.9, seed=3, n=2, extra_body={"ignore_eos": True})]

    def ask(c, kw):
        chunks = list(c.completions.create(model="tiny", stream=True, stream_options={"include_usage": True}, **kw))
        texts, reasons = {}, {}
        for chunk in chunks:
            for choice in chunk.choices:
                texts[choice.index] = texts.get(choice.index, "") + choice.text
                reasons[choice.index] = choice.finish_reason or reasons.get(choice.index)
        return texts, reasons, chunks[-1].usage.completion_tokens

    want = [ask(client, kw) for kw in kinds]
    server = start_llm_server(tiny_config(tiny_llama, num_kv_blocks=256, max_num_seqs=32, async_scheduling=True))
    try:
        with openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60) as async_client:
            with concurrent.futures.ThreadPoolExecutor(3) as pool:
                got = list(pool.map(lambda kw: ask(async_client, kw), kinds))
        assert got == want
        assert want[1][1][0] == "stop" and want[1][2] < 20  # a stop string did end one early
        assert server.metrics()["loom_generation_tokens_total"] == sum(w[2] for w in want)
    finally:
        server.stop()


def test_a_non_streamed_request_is_delivered_once_finished_and_timed_from_its_first_token(client, tiny_server):
    """A non-streamed request asks the engine for its final output only (no per-step wake-up of the event loop);
    its time to first token still comes from when its first token was sampled, not from when it finished."""
    from loom.engine.outputs import RequestOutput

    front = tiny_server.component.front
    delivered = []
    deliver, deliver_all = front._deliver, front._deliver_all
    front._deliver = lambda stream, item: (delivered.append(item), deliver(stream, item))[1]
    front._deliver_all = lambda routed: (delivered.extend(out for _, out in routed), deliver_all(routed))[1]
    before = tiny_server.metrics()
    try:
        out = client.completions.create(model="tiny", prompt="Hello there", max_tokens=40, temperature=0,
                                        extra_body={"ignore_eos": True})
    finally:
        front._deliver, front._deliver_all = deliver, deliver_all
    assert out.usage.completion_tokens == 40
    outputs = [d for d in delivered if isinstance(d, RequestOutput)]
    assert len(outputs) == 1 and outputs[0].finished
    after = tiny_server.metrics()
    ttft = after["loom_time_to_first_token_seconds_sum"] - before.get("loom_time_to_first_token_seconds_sum", 0)
    e2e = after["loom_e2e_request_latency_seconds_sum"] - before.get("loom_e2e_request_latency_seconds_sum", 0)
    assert 0 < ttft < e2e  # 39 more decode steps came after the first token


def test_beam_search_returns_the_offline_searchs_beams(client, tiny_server, tiny_llama):
    from loom import LLM, BeamSearchParams

    prompts = ["The capital of France is", "Once upon a time"]
    offline = LLM(str(tiny_llama), num_kv_blocks=256).beam_search(prompts, BeamSearchParams(beam_width=3, max_tokens=5))
    out = client.completions.create(model="tiny", prompt=prompts, n=3, max_tokens=5,
                                    extra_body={"use_beam_search": True})
    assert [c.text for c in out.choices] == [c.text for o in offline for c in o.outputs]
    assert [c.index for c in out.choices] == list(range(6)) and out.usage.completion_tokens == 30
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], n=2,
                                          max_tokens=4, extra_body={"use_beam_search": True, "length_penalty": 0.5})
    assert len(chat.choices) == 2 and all(c.finish_reason == "length" for c in chat.choices)
    assert chat.choices[0].message.content != chat.choices[1].message.content
    kept = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], n=2,
                                          max_tokens=2, response_format={"type": "text"},  # the default: no format
                                          stop=[], extra_body={"use_beam_search": True})  # no stops: none asked
    assert len(kept.choices) == 2
    for body, param in (({"stream": True}, "stream"), ({"stop": ["x"]}, "stop"), ({"n": 11}, "n"),
                        ({"max_tokens": 5000}, "max_tokens"), ({"logprobs": 0}, "logprobs"),
                        ({"suffix": "x"}, "suffix"), ({"length_penalty": 2000}, "length_penalty")):
        r = httpx.post(f"{tiny_server.base_url}/completions", timeout=30, json={
            "model": "tiny", "prompt": "Hi", "use_beam_search": True, "n": 2, "max_tokens": 4, **body})
        assert (r.status_code, r.json()["error"]["param"]) == (400, param), body
    assert tiny_server.metrics()["loom_kv_cache_free_blocks"] == tiny_server.metrics()["loom_kv_cache_num_blocks"]


def test_a_beam_search_holds_its_room_from_the_first_step_to_the_last(tiny_llama):
    """Capacity 4, a search of width 4, and requests one after another while it runs: they are refused (503), and no
    step of the search is, whatever comes in between its steps (the last ones may come after it let go)."""
    import asyncio

    server = start_llm_server(tiny_config(tiny_llama, num_kv_blocks=128, max_num_seqs=2, max_waiting=2))

    async def run() -> tuple[int, set[int]]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as http:
            search = asyncio.create_task(http.post("/completions", json={
                "model": "tiny", "prompt": "Hi", "n": 4, "max_tokens": 40, "use_beam_search": True}))
            while server.component.front.num_in_flight < 4 and not search.done():
                await asyncio.sleep(0.005)
            others = []  # one after another until the search ends: some land between its steps
            while not search.done():
                others.append((await http.post("/completions", json={"model": "tiny", "prompt": "Hi",
                                                                      "max_tokens": 2})).status_code)
            return (await search).status_code, set(others)

    try:
        status, others = asyncio.run(run())
        assert status == 200 and 503 in others
        assert server.component.front.num_in_flight == 0
    finally:
        server.stop()
    server = start_llm_server(tiny_config(tiny_llama, num_kv_blocks=128, max_num_seqs=2, max_waiting=3))
    try:  # capacity 5: the search's 4 are counted once (not again for each step's requests), so 1 more fits
        status, others = asyncio.run(run())
        assert status == 200 and others == {200}
    finally:
        server.stop()


def test_prompt_logprobs_field_gives_each_prompt_tokens_score_and_rank(tiny_server, tiny_llama):
    """vLLM's ``prompt_logprobs``: [None, {"<id>": {"logprob", "rank", "decoded_token"}}, ...], the prompt token's
    own entry and the top k (ranks 1..k), as the engine scores them; in a completion, in its stream's first chunk,
    and beside a chat answer's choices."""
    import json

    from loom import LLM, SamplingParams

    ids = [1, 504, 3458, 314, 2858, 30, 17]
    engine = LLM(str(tiny_llama), num_kv_blocks=64).generate(
        [{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=2))[0]
    body = {"model": "tiny", "prompt": ids, "max_tokens": 2, "prompt_logprobs": 2}
    whole = httpx.post(f"{tiny_server.base_url}/completions", json=body, timeout=30).json()
    scores = whole["choices"][0]["prompt_logprobs"]
    assert scores[0] is None and len(scores) == len(ids)
    for j in range(1, len(ids)):
        own = scores[j][str(ids[j])]
        assert own["rank"] == engine.prompt_ranks[j]
        assert own["logprob"] == pytest.approx(engine.prompt_logprobs[j][ids[j]], abs=1e-5)
        top = sorted(((int(t), e) for t, e in scores[j].items() if e["rank"] <= 2), key=lambda te: te[1]["rank"])
        assert [e["rank"] for _, e in top] == [1, 2] and top[0][1]["logprob"] >= top[1][1]["logprob"]
        assert len(scores[j]) == (2 if own["rank"] <= 2 else 3)
    with httpx.stream("POST", f"{tiny_server.base_url}/completions", json={**body, "stream": True}, timeout=30) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert chunks[0]["choices"][0]["prompt_logprobs"] == scores
    assert all("prompt_logprobs" not in c["choices"][0] for c in chunks[1:])
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "prompt_logprobs": 0}
    answer = httpx.post(f"{tiny_server.base_url}/chat/completions", json=chat, timeout=30).json()
    assert answer["prompt_logprobs"][0] is None and len(answer["prompt_logprobs"]) == answer["usage"]["prompt_tokens"]
    assert all(len(e) == 1 for e in answer["prompt_logprobs"][1:])
    refused = httpx.post(f"{tiny_server.base_url}/chat/completions", json={**chat, "stream": True}, timeout=30)
    assert (refused.status_code, refused.json()["error"]["param"]) == (400, "prompt_logprobs")
    out_of_range = httpx.post(f"{tiny_server.base_url}/completions", timeout=30,  # beside echo's logprobs too
                              json={**body, "echo": True, "logprobs": 5, "prompt_logprobs": -1})
    assert (out_of_range.status_code, out_of_range.json()["error"]["param"]) == (400, "prompt_logprobs")


@pytest.mark.parametrize("route, body", [("/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
                                         ("/completions", {"prompt": ["Hi", "Hello there"]})])
def test_continuous_usage_stats_put_the_counts_so_far_in_every_chunk(tiny_server, route, body):
    """vLLM's counts: each chunk its own choice's prompt and tokens so far; the usage-only chunk the request's."""
    import json

    options = {"include_usage": True, "continuous_usage_stats": True}
    with httpx.stream("POST", f"{tiny_server.base_url}{route}", timeout=30, json={
            "model": "tiny", "max_tokens": 6, "ignore_eos": True, "n": 2, "stream": True, "stream_options": options,
            **body}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    *per_choice, total = chunks
    counts: dict[int, list[int]] = {}
    prompt_of: dict[int, set[int]] = {}
    for chunk in per_choice:
        index = chunk["choices"][0]["index"]
        counts.setdefault(index, []).append(chunk["usage"]["completion_tokens"])
        prompt_of.setdefault(index, set()).add(chunk["usage"]["prompt_tokens"])
    num_choices = len(counts)
    assert num_choices == (2 if route == "/chat/completions" else 4)
    assert all(c == sorted(c) and c[-1] == 6 for c in counts.values())
    assert all(len(p) == 1 for p in prompt_of.values())  # each choice's own prompt, throughout
    assert total["choices"] == [] and total["usage"]["completion_tokens"] == 6 * num_choices
