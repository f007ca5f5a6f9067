"""Prometheus metrics of the LLM server, named like vLLM's (``vllm:x`` becomes ``loom_x``).

Gauges and counters follow the engine's ``stats()`` after every step; the latency histograms are observed once
per finished request; the iteration histograms once per engine step (tokens and sequences in the batch), so
``/metrics`` shows whether concurrent requests really shared steps.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)
_SEQ_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


@dataclass(slots=True)
class RequestTimes:
    """Wall-clock times of one request (``time.time()``), filled in by the engine thread."""

    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0


class LLMMetrics:
    def __init__(self, registry: CollectorRegistry, model_name: str):
        label, name = ["model_name"], [model_name]
        self.running = Gauge("loom_num_requests_running", "Sequences in the running batch", label,
                             registry=registry).labels(*name)
        self.waiting = Gauge("loom_num_requests_waiting", "Sequences waiting to be scheduled", label,
                             registry=registry).labels(*name)
        self.kv_usage = Gauge("loom_kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1)", label,
                              registry=registry).labels(*name)
        self.kv_free = Gauge("loom_kv_cache_free_blocks", "Free KV-cache blocks", label,
                             registry=registry).labels(*name)
        self.kv_total = Gauge("loom_kv_cache_num_blocks", "KV-cache blocks in the pool", label,
                              registry=registry).labels(*name)
        self.prefix_hit_rate = Gauge("loom_prefix_cache_hit_rate",
                                     "Prompt tokens found in the prefix cache / prompt tokens looked up", label,
                                     registry=registry).labels(*name)
        self.preemptions = Counter("loom_num_preemptions", "Sequences preempted (recomputed later)", label,
                                   registry=registry).labels(*name)
        self.prompt_tokens = Counter("loom_prompt_tokens", "Prompt tokens computed (prefix-cache hits excluded)", label,
                                     registry=registry).labels(*name)
        self.generation_tokens = Counter("loom_generation_tokens", "Tokens generated", label,
                                         registry=registry).labels(*name)
        self.steps = Counter("loom_engine_steps", "Engine steps that ran the model", label,
                             registry=registry).labels(*name)
        self.iteration_tokens = Histogram("loom_iteration_tokens",
                                          "Tokens in one engine step (prefill chunks + decodes)", label,
                                          buckets=_TOKEN_BUCKETS, registry=registry).labels(*name)
        self.iteration_seqs = Histogram("loom_iteration_num_seqs", "Sequences in one engine step (the batch size)",
                                        label, buckets=_SEQ_BUCKETS, registry=registry).labels(*name)
        self.step_seconds = Histogram("loom_iteration_seconds",
                                      "Wall time of one engine step (schedule, model, sample, update)", label,
                                      buckets=_LATENCY_BUCKETS, registry=registry).labels(*name)
        self.max_batch_seqs = Gauge("loom_iteration_num_seqs_max", "Largest batch of one step so far", label,
                                    registry=registry).labels(*name)
        self.ttft = Histogram("loom_time_to_first_token_seconds", "Arrival to first generated token", label,
                              buckets=_LATENCY_BUCKETS, registry=registry).labels(*name)
        self.tpot = Histogram("loom_time_per_output_token_seconds", "Mean gap between output tokens of a request",
                              label, buckets=_TPOT_BUCKETS, registry=registry).labels(*name)
        self.e2e = Histogram("loom_e2e_request_latency_seconds", "Arrival to the last token", label,
                             buckets=_LATENCY_BUCKETS, registry=registry).labels(*name)
        self.queue_time = Histogram("loom_request_queue_time_seconds", "Arrival to first scheduled in a step", label,
                                    buckets=_LATENCY_BUCKETS, registry=registry).labels(*name)
        self._finished = Counter("loom_request_success", "Finished requests by finish reason",
                                 [*label, "finished_reason"], registry=registry)
        self.rejected = Counter("loom_requests_rejected", "Requests refused with 503 (waiting queue full or draining)",
                                label, registry=registry).labels(*name)
        self.constrained_seqs = Counter("loom_structured_output_seqs",
                                        "Sequences generated under a structured-output grammar", label,
                                        registry=registry).labels(*name)
        self.mixed_steps = Counter("loom_structured_output_mixed_steps",
                                   "Engine steps that sampled both grammar-constrained and free sequences", label,
                                   registry=registry).labels(*name)
        self.grammar_cache_hits = Counter("loom_grammar_cache_hits", "Structured-output grammars found compiled",
                                          label, registry=registry).labels(*name)
        self.grammar_cache_misses = Counter("loom_grammar_cache_misses", "Structured-output grammars compiled",
                                            label, registry=registry).labels(*name)
        self.lora_running = Gauge("loom_lora_running_adapters", "Distinct LoRA adapters among the running sequences",
                                  label, registry=registry).labels(*name)
        self.lora_waiting = Gauge("loom_lora_waiting_adapters", "Distinct LoRA adapters among the waiting sequences",
                                  label, registry=registry).labels(*name)
        self.lora_step_max = Gauge("loom_lora_step_adapters_max", "Most distinct LoRA adapters one engine step has run",
                                   label, registry=registry).labels(*name)
        self.spec_drafts = Counter("loom_spec_decode_num_drafts",
                                   "Speculative verifications (a sequence with draft tokens in a step)", label,
                                   registry=registry).labels(*name)
        self.spec_draft_tokens = Counter("loom_spec_decode_num_draft_tokens", "Draft tokens proposed and verified",
                                         label, registry=registry).labels(*name)
        self.spec_accepted_tokens = Counter("loom_spec_decode_num_accepted_tokens", "Draft tokens accepted", label,
                                            registry=registry).labels(*name)
        self._spec_accepted_per_pos = Counter("loom_spec_decode_num_accepted_tokens_per_pos",
                                              "Draft tokens accepted, by position in the draft (0 = first)",
                                              [*label, "position"], registry=registry)
        self.spec_acceptance_rate = Gauge("loom_spec_decode_draft_acceptance_rate",
                                          "Accepted / proposed draft tokens since start (0-1)", label,
                                          registry=registry).labels(*name)
        self._name = model_name
        self._max_seqs = 0
        self._last: dict[str, int] = {}

    def observe_step(self, num_tokens: int, num_seqs: int, seconds: float) -> None:
        self.steps.inc()
        self.step_seconds.observe(seconds)
        self.iteration_tokens.observe(num_tokens)
        self.iteration_seqs.observe(num_seqs)
        if num_seqs > self._max_seqs:
            self._max_seqs = num_seqs
            self.max_batch_seqs.set(num_seqs)

    def update_stats(self, stats, num_free_blocks: int) -> None:
        """Copy an ``EngineStats`` snapshot into the gauges; counters advance by the change since the last call."""
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_usage)
        self.kv_free.set(num_free_blocks)
        self.kv_total.set(stats.num_kv_blocks)
        self.prefix_hit_rate.set(stats.prefix_hit_rate)
        self.lora_running.set(len(stats.running_adapters))
        self.lora_waiting.set(len(stats.waiting_adapters))
        self.lora_step_max.set(stats.max_step_adapters)
        for attr, counter in (("num_preemptions", self.preemptions), ("num_prompt_tokens", self.prompt_tokens),
                              ("num_generation_tokens", self.generation_tokens),
                              ("num_constrained_seqs", self.constrained_seqs), ("num_mixed_steps", self.mixed_steps),
                              ("grammar_cache_hits", self.grammar_cache_hits),
                              ("grammar_cache_misses", self.grammar_cache_misses),
                              ("num_spec_drafts", self.spec_drafts), ("num_spec_draft_tokens", self.spec_draft_tokens),
                              ("num_spec_accepted_tokens", self.spec_accepted_tokens)):
            self._advance(counter, attr, getattr(stats, attr, 0))
        for pos, value in enumerate(getattr(stats, "spec_accepted_per_pos", ())):
            self._advance(self._spec_accepted_per_pos.labels(self._name, str(pos)), f"spec_pos_{pos}", value)
        if getattr(stats, "num_spec_draft_tokens", 0):
            self.spec_acceptance_rate.set(stats.spec_acceptance_rate)

    def _advance(self, counter, key: str, value: int) -> None:
        """Counters advance by the change since the last snapshot."""
        counter.inc(max(0, value - self._last.get(key, 0)))
        self._last[key] = value

    def observe_finished(self, times: RequestTimes, reason: str) -> None:
        self._finished.labels(self._name, reason).inc()
        if times.first_scheduled is not None:
            self.queue_time.observe(max(0.0, times.first_scheduled - times.arrival))
        if times.first_token is None or times.finished is None:
            return
        self.ttft.observe(times.first_token - times.arrival)
        self.e2e.observe(times.finished - times.arrival)
        if times.num_generation_tokens > 1:
            self.tpot.observe((times.finished - times.first_token) / (times.num_generation_tokens - 1))
