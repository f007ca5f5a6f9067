"""Scheduler: token budget, chunked prefill, prefix hits across requests, n > 1 sharing, preemption and resume, and
the priority policy (admission and preemption by priority, then arrival)."""

import itertools

from loom.engine.block_manager import BlockManager
from loom.engine.sampling_params import SamplingParams
from loom.engine.scheduler import Scheduler, SchedulerConfig
from loom.engine.sequence import Sequence

_ids = itertools.count()


def make_seq(prompt: list[int], request_id: str | None = None, index: int = 0, priority: int = 0,
             arrival: float = 0.0) -> Sequence:
    seq_id = next(_ids)
    return Sequence(seq_id, request_id or f"r{seq_id}", index, prompt, SamplingParams(max_tokens=100), arrival,
                    priority=priority)


def run_step(sched: Scheduler, next_token: int = 7):
    """One engine step without a model: every chunk that reaches the end samples `next_token`."""
    out = sched.schedule()
    sched.update(out)
    for chunk in out.chunks:
        if chunk.samples:
            chunk.seq.output_token_ids.append(next_token)
    return out


def make(num_blocks=16, block_size=4, **kw) -> Scheduler:
    return Scheduler(SchedulerConfig(watermark=0.0, **kw), BlockManager(num_blocks, block_size))


def test_prefill_then_decode_in_shared_steps():
    sched = make()
    a, b = make_seq(list(range(6))), make_seq(list(range(100, 103)))
    sched.add(a)
    sched.add(b)
    out = run_step(sched)
    assert [(c.seq, c.start, c.num_tokens) for c in out.chunks] == [(a, 0, 6), (b, 0, 3)]
    assert sched.block_manager.block_table(a.seq_id) == [0, 1]
    assert sched.block_manager.block_table(b.seq_id) == [2]
    out = run_step(sched)
    # Both decode together: one token each at positions 6 and 3.
    assert [(c.start, c.num_tokens) for c in out.chunks] == [(6, 1), (3, 1)]
    assert sched.block_manager.block_table(b.seq_id) == [2]  # b's 4th token still fits its first block
    out = run_step(sched)
    assert sched.block_manager.block_table(b.seq_id) == [2, 3]  # its 5th crosses into a new block


def test_chunked_prefill_splits_long_prompt_and_keeps_decodes_flowing():
    sched = make(num_blocks=32, max_num_batched_tokens=8)
    short = make_seq(list(range(3)))
    sched.add(short)
    run_step(sched)
    long = make_seq(list(range(100, 120)))
    sched.add(long)
    steps = []
    while long.num_output_tokens == 0:
        out = run_step(sched)
        steps.append([(c.seq is long, c.start, c.num_tokens) for c in out.chunks])
    assert steps == [
        [(False, 3, 1), (True, 0, 7)],
        [(False, 4, 1), (True, 7, 7)],
        [(False, 5, 1), (True, 14, 6)],
    ]


def test_no_chunking_waits_for_room_for_the_whole_prompt():
    sched = make(num_blocks=32, max_num_batched_tokens=8, enable_chunked_prefill=False)
    a = make_seq(list(range(5)))
    b = make_seq(list(range(50, 55)))
    sched.add(a)
    sched.add(b)
    out = run_step(sched)
    assert [c.seq for c in out.chunks] == [a]
    out = run_step(sched)
    assert [(c.seq, c.num_tokens) for c in out.chunks] == [(a, 1), (b, 5)]


def test_prefix_cache_hit_across_requests_skips_computation():
    sched = make(num_blocks=16)
    shared = list(range(8))
    a = make_seq(shared + [50, 51])
    sched.add(a)
    run_step(sched)
    b = make_seq(shared + [60])
    sched.add(b)
    out = run_step(sched)
    chunk_b = next(c for c in out.chunks if c.seq is b)
    assert (chunk_b.start, chunk_b.num_tokens) == (8, 1)
    assert sched.block_manager.block_table(b.seq_id)[:2] == sched.block_manager.block_table(a.seq_id)[:2]
    assert b.num_cached_prompt_tokens == 8


def test_n_siblings_share_prompt_blocks_with_ref_counts():
    sched = make(num_blocks=16)
    prompt = list(range(9))
    siblings = [make_seq(prompt, request_id="req", index=i) for i in range(3)]
    for s in siblings:
        sched.add(s)
    out = run_step(sched)
    # The first computes the prompt; the others hit its two full blocks in the same step.
    assert [(c.start, c.num_tokens) for c in out.chunks] == [(0, 9), (8, 1), (8, 1)]
    bm = sched.block_manager
    tables = [bm.block_table(s.seq_id) for s in siblings]
    assert tables == [[0, 1, 2], [0, 1, 3], [0, 1, 4]]
    assert [bm.blocks[i].ref_count for i in range(5)] == [3, 3, 1, 1, 1]
    for s in siblings:
        sched.finish(s, "length")
    assert bm.num_free_blocks == 16


def test_preemption_frees_newest_and_resume_recomputes_with_prefix_hits():
    # 6 blocks of 4 tokens. Two sequences of 8-token prompts take 2 blocks each (+1 each for the first decode).
    sched = make(num_blocks=6, block_size=4)
    old, new = make_seq(list(range(8))), make_seq(list(range(40, 48)))
    sched.add(old)
    sched.add(new)
    run_step(sched)  # prefill both: blocks [0,1] and [2,3]
    run_step(sched)  # decode: each needs a third block -> [0,1,4] and [2,3,5]
    assert sched.block_manager.num_free_blocks == 0
    for _ in range(3):
        run_step(sched)  # fill the third blocks (positions 8..11)
    out = run_step(sched)  # old needs a 4th block: newest (new) is preempted
    assert out.preempted == [new]
    assert new.num_computed_tokens == 0 and sched.waiting[0] is new
    assert [c.seq for c in out.chunks] == [old]
    assert sched.num_preemptions == 1
    # old took new's freed tail block (evicted first); new's first two blocks are still cached.
    assert sched.block_manager.block_table(old.seq_id) == [0, 1, 4, 5]
    sched.finish(old, "length")
    out = run_step(sched)
    (chunk,) = out.chunks
    # Resume recomputes prompt + outputs, skipping the two cached blocks.
    assert chunk.seq is new and chunk.start == 8 and chunk.end == 13 and new.num_tokens == 14
    assert sched.block_manager.block_table(new.seq_id)[:2] == [2, 3]
    assert new.num_output_tokens == 6  # five before preemption, one sampled after resume
    sched.finish(new, "length")
    assert sched.block_manager.num_free_blocks == 6


def test_abort_frees_everything():
    sched = make(num_blocks=8)
    a, b = make_seq(list(range(10)), "x"), make_seq(list(range(30, 40)), "y")
    sched.add(a)
    sched.add(b)
    run_step(sched)
    c = make_seq(list(range(60, 70)), "x")
    sched.add(c)
    assert sched.abort("x") == [a, c]
    assert sched.running == [b] and not sched.waiting
    sched.abort("y")
    assert sched.block_manager.num_free_blocks == 8


def test_max_num_seqs_caps_running():
    sched = make(num_blocks=64, max_num_seqs=2)
    seqs = [make_seq(list(range(i * 10, i * 10 + 3))) for i in range(3)]
    for s in seqs:
        sched.add(s)
    out = run_step(sched)
    assert [c.seq for c in out.chunks] == seqs[:2]
    sched.finish(seqs[0], "stop")
    out = run_step(sched)
    assert [c.seq for c in out.chunks] == [seqs[1], seqs[2]]


def test_token_slices_and_the_token_view_equal_slices_of_all_token_ids():
    seq = make_seq(list(range(10, 16)))
    seq.output_token_ids = [20, 21, 22]
    full = seq.all_token_ids
    for start in range(len(full) + 1):
        for end in range(start, len(full) + 1):
            assert seq.token_slice(start, end) == full[start:end]
            assert seq.tokens[start:end] == full[start:end]
    assert len(seq.tokens) == 9 and seq.tokens[7:] == [21, 22] and seq.tokens[:] == full and seq.tokens[5:2] == []


def _four(name: str, priority: int, arrival: float) -> Sequence:
    """A sequence whose 4-token prompt fills one block of 4: its first decode needs a second block."""
    return make_seq([ord(name) * 10 + i for i in range(4)], name, priority=priority, arrival=arrival)


def test_the_priority_policy_admits_by_priority_then_arrival():
    spec = [("a", 1, 0.0), ("b", 0, 1.0), ("c", 0, 2.0), ("d", -1, 3.0), ("e", 1, 4.0)]
    for policy, order in (("fcfs", "abcde"), ("priority", "dbcae")):
        sched = make(num_blocks=64, policy=policy)
        for name, priority, arrival in spec:
            sched.add(_four(name, priority, arrival))
        assert "".join(s.request_id for s in sched.waiting) == order
        assert "".join(c.seq.request_id for c in run_step(sched).chunks) == order


def test_the_priority_policy_preempts_the_lowest_priority_then_newest():
    """Three running sequences on 4 blocks; each decode needs a second block, so the step must preempt. FCFS takes the
    newest (c); the priority policy takes the largest (priority, arrival), here a, which then waits behind the
    waiting sequence of higher priority."""
    results = {}
    for policy in ("fcfs", "priority"):
        sched = make(num_blocks=4, policy=policy)
        a, b, c = _four("a", 2, 0.0), _four("b", 0, 1.0), _four("c", 0, 2.0)
        for s in (a, b, c):
            sched.add(s)
        run_step(sched)  # three prefills, three blocks
        w = _four("w", 1, 3.0)
        sched.add(w)
        out = run_step(sched)
        results[policy] = ("".join(ch.seq.request_id for ch in out.chunks),
                           "".join(s.request_id for s in out.preempted),
                           "".join(s.request_id for s in sched.waiting),
                           sched.block_manager.num_free_blocks)
        assert all(s.num_computed_tokens == 0 for s in out.preempted)
    assert results == {"fcfs": ("ab", "c", "cw", 0), "priority": ("bc", "a", "wa", 0)}


def test_the_priority_policy_preempts_the_sequence_itself_when_it_is_the_lowest():
    sched = make(num_blocks=4, policy="priority")
    a, b, c = _four("a", 0, 0.0), _four("b", 2, 1.0), _four("c", 1, 2.0)
    for s in (a, b, c):
        sched.add(s)
    run_step(sched)
    out = run_step(sched)
    # a takes the last block; b finds none and is itself the lowest: it steps back, and c decodes in its block
    assert ([ch.seq for ch in out.chunks], out.preempted, list(sched.waiting)) == ([a, c], [b], [b])


def test_a_victim_scheduled_earlier_in_the_step_gives_back_its_chunk_and_tokens():
    """a (priority 2) runs first, b and c (priority 0) join a step later, on 4 blocks. a's next decode fits its
    second block and is scheduled; b's needs a block there is none of, and the victim is a: its chunk and token go
    back, and c, now one place earlier in the running list, is still scheduled."""
    sched = make(num_blocks=4, policy="priority")
    a, b, c = _four("a", 2, 0.0), _four("b", 0, 1.0), _four("c", 0, 2.0)
    sched.add(a)
    run_step(sched)  # a's prompt: 1 block
    sched.add(b)
    sched.add(c)
    run_step(sched)  # a decodes into a second block; b's and c's prompts take the other two
    out = run_step(sched)
    assert ([ch.seq.request_id for ch in out.chunks], out.preempted, out.num_batched_tokens) == (["b", "c"], [a], 2)
    assert sched.running == [b, c] and list(sched.waiting) == [a] and a.num_computed_tokens == 0
    assert sched.block_manager.num_free_blocks == 0  # a's two blocks back, then b's and c's second ones


def test_a_victim_that_got_no_chunk_this_step_is_preempted_too():
    """Async scheduling: a sequence whose in-flight token ends it gets no chunk; as the victim it still goes."""
    sched = make(num_blocks=4, policy="priority")
    a = _four("a", 2, 0.0)
    sched.add(a)
    run_step(sched)
    a.params = SamplingParams(max_tokens=2)
    a.num_pending = 1  # its second token is in flight: nothing to schedule for it
    b, c = _four("b", 0, 1.0), _four("c", 0, 2.0)
    sched.add(b)
    sched.add(c)
    run_step(sched)  # b and c prefill: 3 blocks held
    out = run_step(sched)  # b takes the last block; c finds none: a goes
    assert ([ch.seq.request_id for ch in out.chunks], out.preempted) == (["b", "c"], [a])
    assert sched.block_manager.num_free_blocks == 0 and list(sched.waiting) == [a]


def test_of_equal_priority_and_arrival_the_later_running_sequence_goes():
    """n > 1 siblings share their key: the later one is preempted, as FCFS's newest (vLLM's max takes the first)."""
    sched = make(num_blocks=3, policy="priority")
    first, second = (make_seq([i * 10 + t for t in range(4)], "x", i, priority=1) for i in (1, 2))
    sched.add(first)
    sched.add(second)
    run_step(sched)
    out = run_step(sched)  # first takes the last block; second finds none and is the victim itself
    assert ([ch.seq for ch in out.chunks], out.preempted) == ([first], [second])
