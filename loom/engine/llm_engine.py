"""LLMEngine: add requests, then ``step()`` until done. One step is schedule -> run -> sample -> update."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from loom.distributed.parallel import TensorParallel, head_shard
from loom.engine.block_manager import BlockManager
from loom.engine.config import EngineConfig, MultiModalLimits
from loom.engine.cuda_graphs import DecodeGraphs
from loom.engine.detokenizer import DetokState, FastDecode, detokenize_flush, detokenize_next, find_stop, new_state
from loom.engine.lora import LoRAManager, LoRARequest
from loom.engine.model_runner import ModelRunner, StepInputs, allocate_kv_caches, build_model, kv_bytes_per_block
from loom.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from loom.engine.reasoning import REASONING_TAGS, think_tokens
from loom.engine.sampling_defaults import sampling_defaults
from loom.engine.sampling_params import SamplingParams
from loom.engine.scheduler import ScheduledChunk, Scheduler, SchedulerConfig
from loom.engine.sequence import Sequence
from loom.engine.spec_decode import SpecDecoder
from loom.engine.structured import StructuredOutputs
from loom.engine.tensor_parallel import EngineFatalError, RankSpec, TPWorkers, threads_per_rank
from loom.models.catalogue import resolve_runtime
from loom.models.llama import LlamaConfig, SparseMoE
from loom.models.loader import load_hf_config, load_tokenizer, load_weights
from loom.models.multimodal import Encoder, vision_encoder
from loom.models.vision import SERVE_A_VISION_MODEL, ImageTokens, PreparedImage, is_multimodal
from loom.ops.sampler import DeferredSample, SamplingRow, SamplingSettings, has_token_penalty, sample_deferred

log = logging.getLogger("loom.engine")


@dataclass(slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_usage: float
    """Fraction of KV blocks in use."""
    prefix_hit_rate: float
    num_preemptions: int
    kv_waste: float
    """Fraction of the used blocks' slots that hold no token (partially filled last blocks), now."""
    kv_waste_mean: float
    """The same, averaged over every step so far (weighted by slots in use)."""
    num_kv_blocks: int
    num_steps: int
    num_prompt_tokens: int
    """Prompt tokens computed so far (cache hits excluded)."""
    num_generation_tokens: int
    mean_batch_tokens: float
    num_constrained_seqs: int = 0
    """Structured-output sequences added so far."""
    num_mixed_steps: int = 0
    """Steps whose sampled rows had both constrained and free sequences."""
    grammar_cache_hits: int = 0
    grammar_cache_misses: int = 0
    max_step_adapters: int = 0
    """The most distinct LoRA adapters one step has run so far."""
    running_adapters: tuple[int, ...] = ()
    """Ids of the adapters of the running sequences."""
    waiting_adapters: tuple[int, ...] = ()
    num_spec_drafts: int = 0
    """Speculative verifications (one sequence with at least one draft token in one step)."""
    num_spec_draft_tokens: int = 0
    num_spec_accepted_tokens: int = 0
    spec_accepted_per_pos: tuple[int, ...] = ()
    """Accepted draft tokens by their position in the draft."""
    spec_acceptance_rate: float = 0.0
    """Accepted / proposed draft tokens."""
    spec_mean_acceptance_length: float = 0.0
    """Tokens emitted per verification (accepted drafts + 1)."""


@dataclass(slots=True)
class StepStats:
    """What the last step ran: for batch-size metrics."""

    num_batched_tokens: int
    num_seqs: int
    num_decodes: int


@dataclass(slots=True)
class _Launched:
    """A step whose forward ran (on a GPU: is queued) and whose sampled ids are not read back yet."""

    sampling: list[ScheduledChunk]
    """The chunks that sample, in row order."""
    sample: DeferredSample | None
    """The sampled ids, still on the device; None for a speculative verification (done at once) or no sampling."""
    verified: tuple[list[list[int]], list[list[dict[int, float] | None]]]
    """A speculative verification's tokens and logprobs per chunk."""

    def read(self) -> tuple[list[list[int]], list[list[dict[int, float] | None]]]:
        """Per sampling chunk, the tokens to append (one; or 1..d + 1 for a speculative decode) and their logprobs."""
        if self.sample is None:
            return self.verified
        result = self.sample.result()
        return [[t] for t in result.token_ids], [[lp] for lp in result.logprobs]


@dataclass(slots=True)
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detok: list[DetokState]
    metrics: RequestMetrics
    sent_prompt_logprobs: bool = False
    """A delta output has carried the prompt logprobs (they go out once, whole)."""


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = config.torch_device()
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # events, graph capture and Triton launches use the current device
        self.dtype = config.torch_dtype()
        self.model_path, self.tokenizer_path = resolve_runtime(config.model, config.tokenizer, config.needs_float(),
                                                                   config.gguf_unsupported())
        hf_config = load_hf_config(self.model_path)
        self.max_model_len = config.context_length(hf_config)
        self.tokenizer = load_tokenizer(self.tokenizer_path)
        self.eos_token_ids = _eos_ids(self.tokenizer, self.model_path)
        self.sampling_defaults = sampling_defaults(config.generation_config, config.override_generation_config,
                                                   self.model_path)
        """What requests that leave sampling parameters out get (``loom.engine.sampling_defaults``)."""
        if self.sampling_defaults.as_dict():
            override = config.override_generation_config is not None and config.override_generation_config.as_dict()
            source = config.generation_config + (" and --override-generation-config" if override else "")
            log.info("default sampling parameters (--generation-config %s): %s", source,
                     self.sampling_defaults.as_dict())
        self.decoder = FastDecode(self.tokenizer)
        self.workers: TPWorkers | None = None
        """With tensor_parallel_size > 1: the other ranks (this engine is rank 0)."""
        tp = None
        multimodal = is_multimodal(hf_config)
        if multimodal and config.tensor_parallel_size > 1:
            raise ValueError("vision models run on one rank: drop --tensor-parallel-size")
        span = getattr(hf_config, "mm_tokens_per_image", 0) if multimodal else 0
        if span > config.max_num_batched_tokens:  # Gemma 3: an image's tokens, attended both ways, in one step
            raise ValueError(f"an image's {span} tokens attend to each other both ways, so they are computed in one "
                             f"step: max_num_batched_tokens must be at least {span}, got "
                             f"{config.max_num_batched_tokens}")
        if config.tensor_parallel_size > 1:
            head_shard(LlamaConfig.from_hf(hf_config), 0, config.tensor_parallel_size)  # can it split? before starting
            threads = threads_per_rank(config.tensor_parallel_size)
            torch.set_num_threads(threads)
            self.workers = TPWorkers(RankSpec(config, str(self.model_path), self.max_model_len, threads))
            tp = TensorParallel(0, config.tensor_parallel_size, shm=self.workers.shm)
        try:
            self.model = build_model(self.model_path, config, self.device, self.max_model_len, tp)
        except BaseException:
            self.shutdown()
            raise
        self.vision: Encoder | None = None
        """A vision-language model's image encoder (``loom.models.vision``); None for a text model."""
        if multimodal:
            self.vision = vision_encoder(self.model_path, hf_config, self.tokenizer, config.encoder_dtype(),
                                         self.device, config.load_format != "dummy", config.mm_processor_kwargs)
            log.info("vision model: %s tower, %s", hf_config.vision_config.model_type, self.vision.tokens.describe())
        self.lora = None
        if config.enable_lora:  # wraps the (packed) projections, so after ops.prepare
            self.lora = LoRAManager(self.model, config.max_loras, config.max_lora_rank, config.max_cpu_loras,
                                    self.dtype, self.device)
        num_blocks = self._num_blocks()
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        mcfg = self.model.config
        window = mcfg.sliding_window if len(mcfg.sliding_layers) == mcfg.num_hidden_layers else None
        sched_cfg = SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, config.enable_chunked_prefill,
                                    max_loras=config.max_loras if config.enable_lora else None, sliding_window=window,
                                    policy=config.scheduling_policy, max_num_encoder_tokens=(
                                        config.max_num_encoder_tokens or config.max_num_batched_tokens))
        self.scheduler = Scheduler(sched_cfg, self.block_manager)
        if self.workers is not None:
            self.workers.join(num_blocks)
        graphs = (self.device.type == "cuda" and not config.enforce_eager and no_host_syncs(self.model)
                  and self.lora is None and self.workers is None)
        # with graphs, one block past the pool (never handed out) takes the padded rows' writes
        kv = allocate_kv_caches(self.model, num_blocks + (1 if graphs else 0), config.block_size, self.dtype,
                                self.device)
        decode_graphs = DecodeGraphs(self.model, kv, self.device, config.max_num_seqs,
                                     -(-self.max_model_len // config.block_size), config.block_size,
                                     scratch_block=num_blocks) if graphs else None
        self.runner = ModelRunner(self.model, kv, self.block_manager, self.device, self.lora, peers=self.workers,
                                  graphs=decode_graphs)
        if decode_graphs is not None:  # at start, as vLLM: a capture inside serving stalls the first steps of a size
            started = time.perf_counter()
            decode_graphs.capture_all()
            log.info("captured decode graphs for %d batch sizes in %.1f s", len(decode_graphs.graphs),
                     time.perf_counter() - started)
        self.generator = torch.Generator().manual_seed(config.seed)
        """Draws the seed of each sequence whose request gives none (the sampler's uniforms hash a seed)."""
        self.requests: dict[str, _Request] = {}
        self._seq_ids = itertools.count()
        self._num_steps = self._num_prompt_tokens = self._num_generation_tokens = self._batched_tokens = 0
        self._slots_used = self._slots_held = 0
        self.last_step: StepStats | None = None
        think = think_tokens(self.tokenizer, config.reasoning_parser)
        if config.reasoning_parser is not None and think is None:
            log.warning("reasoning_parser %s: %s and %s are not single tokens of this tokenizer, so structured outputs "
                        "are enforced from the first token (not after the thinking block)", config.reasoning_parser,
                        REASONING_TAGS[config.reasoning_parser].start, REASONING_TAGS[config.reasoning_parser].end)
        self.structured = StructuredOutputs(self.tokenizer, self.model.config.vocab_size, self.eos_token_ids,
                                            think=think)
        self._num_constrained = self._num_mixed_steps = self._max_step_adapters = 0
        spec = config.speculative_config
        self.spec = SpecDecoder(spec, self.max_model_len) if spec is not None else None
        self._in_flight: _Launched | None = None
        """Async scheduling: the step queued last, whose tokens are read back during the next ``step()``."""
        self._failed: set[str] = set()
        """Requests a step ended by a failure of their own (the vision tower's on their pictures), reported with the
        next outputs."""

    # --- public API -----------------------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: str | None = None,
        params: SamplingParams | None = None,
        prompt_token_ids: list[int] | None = None,
        arrival_time: float | None = None,
        lora_request: LoRARequest | None = None,
        priority: int = 0,
        multi_modal_data: dict | None = None,
    ) -> None:
        """``priority``: lower is served first, with ``scheduling_policy="priority"`` only (a ValueError otherwise,
        as vLLM refuses it). ``multi_modal_data``: a vision model's images, vLLM's shape ``{"image": PIL image or a
        list of them}``, one image token in the prompt per image, in order (or each already repeated
        ``image_tokens.count`` times)."""
        params = params or SamplingParams()
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        if priority != 0 and self.config.scheduling_policy != "priority":
            raise ValueError(f"priority {priority} needs priority scheduling: start the server with "
                             "--scheduling-policy priority (or leave priority 0)")
        if prompt_token_ids is None:
            if not isinstance(prompt, str):
                raise ValueError("a prompt is a string or {'prompt_token_ids': [...]}")
            prompt_token_ids = self.tokenizer.encode(prompt)  # with the tokenizer's BOS where it adds one, as vLLM
        images = self._images(multi_modal_data)
        if self.vision is not None:
            prompt_token_ids = self.vision.tokens.place(prompt_token_ids, [(im.width, im.height) for im in images])
        params = self._validate(prompt_token_ids, params)
        image_input = self.vision.image_input(prompt_token_ids, images) if images else None
        if image_input is not None and image_input.spans is not None and len(image_input.spans):
            longest = int((image_input.spans[:, 1] - image_input.spans[:, 0]).max())
            if longest > self.config.max_num_batched_tokens:  # it could never be scheduled whole
                raise ValueError(f"the prompt's image tokens side by side make one span of {longest} tokens, "
                                 "attended both ways and so computed in one step, past max_num_batched_tokens "
                                 f"{self.config.max_num_batched_tokens}: put each image's markers around its "
                                 "tokens (or expand none and let the engine do it)")
        adapter = self._adapter(lora_request)
        now = arrival_time or time.time()
        seqs = [
            Sequence(next(self._seq_ids), request_id, i, prompt_token_ids, params, now, seed=self._seed(params, i),
                     priority=priority, lora_id=lora_request.lora_int_id if lora_request else 0, lora=adapter)
            for i in range(params.n)
        ]
        for seq in seqs:
            seq.images = image_input
        if params.prompt_logprobs is not None:  # scored on the first sequence only (the prompt is the request's)
            seqs[0].prompt_logprobs, seqs[0].prompt_ranks = [None], [None]
        if params.structured_outputs is not None:  # StructuredOutputError (a ValueError) when it does not compile
            for seq in seqs:
                seq.matcher = self.structured.new_matcher(params.structured_outputs, prompt_token_ids)
            self._num_constrained += len(seqs)
        detok = [new_state(prompt_token_ids) for _ in seqs]
        self.requests[request_id] = _Request(
            request_id, prompt, prompt_token_ids, params, seqs, detok, RequestMetrics(now)
        )
        for seq in seqs:
            self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> bool:
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        self.scheduler.abort(request_id)
        return True

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        """New values for every weight, named as in an HF checkpoint (a training model's ``state_dict().items()``):
        written in place (``loom.models.loader.load_weights``), and the prefix cache emptied, since its blocks hold
        keys and values of the old weights. What vLLM's ``load_weights`` + ``reset_prefix_cache`` do for an RL
        trainer's rollouts (``loom finetune --method grpo``). Only between requests; not with tensor parallelism,
        LoRA adapters or quantized weights. Returns how many checkpoint tensors were written."""
        if self.has_unfinished_requests():
            raise RuntimeError("update_weights while requests are running: finish or abort them first")
        if self.workers is not None:
            raise ValueError("update_weights: not with tensor parallelism (the other ranks hold their own shards)")
        if self.lora is not None:
            raise ValueError("update_weights: not on an engine with enable_lora (the adapters wrap the projections)")
        if self.vision is not None:
            raise ValueError("update_weights: not on a vision model yet (its image tower would keep the old weights)")
        written = load_weights(self.model, weights)
        self.reset_prefix_cache()
        return written

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (vLLM's ``reset_prefix_cache``); blocks in use stay with their sequences."""
        self.block_manager.reset_prefix_cache()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished or self._in_flight is not None

    def step(self) -> list[RequestOutput]:
        """Schedule and run one step; returns the outputs of the requests it advanced. With async scheduling, the step
        is queued on the device and the outputs returned are those of the step before it, read back meanwhile."""
        if self.config.async_scheduling:
            return self._step_ahead()
        out = self._schedule()
        if out.is_empty:
            return self._failed_outputs()
        logits, sampling = self._forward(out, None)
        return self._resolve(self._sample_step(out, logits, sampling))

    def _step_ahead(self) -> list[RequestOutput]:
        """Async scheduling (vLLM v1's, SGLang's overlap scheduler): step N + 1 is scheduled and queued while the
        device still runs step N, counting N's sampled tokens as pending (their ids reach N + 1's inputs on the
        device); then N's ids are read back and its outputs made while N + 1 runs. A sequence that N ends (a stop,
        EOS) wastes its row of N + 1, which is dropped; one whose pending tokens reach max_tokens is not scheduled
        again. A row of N + 1 that needs N's token on the host to be sampled (a grammar to advance, penalties to
        count) has N read back between N + 1's forward and its sampling, as vLLM does for structured outputs: the
        forward still overlaps."""
        prev, self._in_flight = self._in_flight, None
        out = self._schedule()
        if out.is_empty:
            return self._resolve(prev) if prev is not None else self._failed_outputs()
        logits, sampling = self._forward(out, prev)
        outputs: list[RequestOutput] = []
        if prev is not None and self._needs_tokens(sampling):
            outputs, prev = self._resolve(prev), None
        self._in_flight = self._sample_step(out, logits, sampling)
        if prev is not None:
            outputs = self._resolve(prev)
        return outputs

    def _schedule(self):
        """The scheduler's next step; the requests whose pictures the vision tower failed on end ("abort", the error
        logged), reported with this step's outputs."""
        out = self.scheduler.schedule()
        for seq in out.failed:
            if not seq.is_finished:
                self._finish(seq, "abort", None)
                self._failed.add(seq.request_id)
        return out

    def _failed_outputs(self) -> list[RequestOutput]:
        """The final outputs of requests ended by a failure, when no step runs to carry them."""
        return [self._request_output(req) for req in self._append_tokens([], [], []).values()]

    def _forward(self, out, prev: _Launched | None) -> tuple[torch.Tensor, list[ScheduledChunk]]:
        """Run a scheduled step's forward (``prev``: the step in flight before it, whose ids feed this one)."""
        self._record_schedule(out)
        in_flight = None
        if prev is not None and prev.sample is not None:
            in_flight = prev.sample.tokens, {c.seq.seq_id: i for i, c in enumerate(prev.sampling)}
        try:
            logits, sampling = self.runner.execute(out, in_flight)
        except RuntimeError as exc:
            if self.workers is None or isinstance(exc, EngineFatalError):
                raise
            raise self.workers.explain(exc) from exc  # a collective with a dead rank
        self.scheduler.update(out)
        return logits, sampling

    def _sample_step(self, out, logits: torch.Tensor, sampling: list[ScheduledChunk]) -> _Launched:
        """Queue the sampling of a step whose forward ran."""
        rows = [self._sampling_row(c.seq) for c in sampling]
        self._apply_grammars(logits, sampling)
        launched = self._sample(logits, sampling, rows)
        for chunk in sampling:
            chunk.seq.num_pending += 1
        self._count(out)
        used, held = self._kv_slots()
        self._slots_used += used
        self._slots_held += held
        return launched

    def _resolve(self, launched: _Launched) -> list[RequestOutput]:
        """Read a launched step's tokens back and append them through the stop checks."""
        token_ids, logprobs = launched.read()
        for chunk in launched.sampling:
            chunk.seq.num_pending -= 1
        touched = self._append_tokens(launched.sampling, token_ids, logprobs)
        if self.spec is not None:
            self.spec.propose([c.seq for c in launched.sampling], len(self.scheduler.running))
        return [self._request_output(req) for req in touched.values()
                if req.params.output_kind != "final_only" or all(s.is_finished for s in req.seqs)]

    @staticmethod
    def _needs_tokens(sampling: list[ScheduledChunk]) -> bool:
        """Whether a row to sample needs its sequence's pending token on the host first (its grammar advanced
        through it, or its penalties counting it)."""
        return any(c.seq.num_pending and not c.seq.is_finished
                   and (c.seq.matcher is not None or has_token_penalty(c.seq.params)) for c in sampling)

    def shutdown(self) -> None:
        """Stop the other tensor-parallel ranks (idempotent; nothing to do without tensor parallelism)."""
        if self.workers is not None:
            self.workers.close()

    def stats(self) -> EngineStats:
        bm, sched = self.block_manager, self.scheduler
        used_slots, held = self._kv_slots()
        return EngineStats(
            num_running=len(sched.running),
            num_waiting=len(sched.waiting),
            kv_usage=bm.usage,
            prefix_hit_rate=bm.prefix_hit_rate,
            num_preemptions=sched.num_preemptions,
            kv_waste=(used_slots - held) / used_slots if used_slots else 0.0,
            kv_waste_mean=1 - self._slots_held / self._slots_used if self._slots_used else 0.0,
            num_kv_blocks=bm.num_blocks,
            num_steps=self._num_steps,
            num_prompt_tokens=self._num_prompt_tokens,
            num_generation_tokens=self._num_generation_tokens,
            mean_batch_tokens=self._batched_tokens / self._num_steps if self._num_steps else 0.0,
            num_constrained_seqs=self._num_constrained,
            num_mixed_steps=self._num_mixed_steps,
            grammar_cache_hits=self.structured.num_cache_hits,
            grammar_cache_misses=self.structured.num_cache_misses,
            **self._lora_stats(),
            **self._spec_stats(),
        )

    # --- internals ------------------------------------------------------------------------------------------
    def _adapter(self, lora_request: LoRARequest | None):
        if lora_request is None:
            return None
        if self.lora is None:
            raise ValueError(f"adapter {lora_request.lora_name!r} asked for, but this engine serves no LoRA adapters; "
                             "start it with enable_lora=True (--enable-lora)")
        return self.lora.get(lora_request)

    def _sample(self, logits, sampling, rows) -> _Launched:
        """The step's sampling: queued on the device, or (a speculative verification) done at once."""
        if self.spec is not None and any(c.draft_token_ids for c in sampling):
            return _Launched(sampling, None, self.spec.verify(logits, sampling, rows, self.scheduler))
        return _Launched(sampling, sample_deferred(logits, rows) if rows else None, ([], []))

    def _lora_stats(self) -> dict:
        """Only with LoRA on: the server asks for stats every step, and the waiting queue may be long."""
        if self.lora is None:
            return {}
        sched = self.scheduler
        return dict(max_step_adapters=self._max_step_adapters,
                    running_adapters=tuple(sorted({s.lora_id for s in sched.running if s.lora_id})),
                    waiting_adapters=tuple(sorted({s.lora_id for s in sched.waiting if s.lora_id})))

    def _spec_stats(self) -> dict:
        if self.spec is None:
            return {}
        s = self.spec.stats
        return dict(num_spec_drafts=s.num_drafts, num_spec_draft_tokens=s.num_draft_tokens,
                    num_spec_accepted_tokens=s.num_accepted_tokens,
                    spec_accepted_per_pos=tuple(s.num_accepted_tokens_per_pos),
                    spec_acceptance_rate=s.acceptance_rate, spec_mean_acceptance_length=s.mean_acceptance_length)

    def _apply_grammars(self, logits, sampling) -> None:
        """Mask the rows of constrained sequences (only those) to what their grammars allow next."""
        rows = [i for i, c in enumerate(sampling) if c.seq.matcher is not None and not c.seq.is_finished]
        if not rows:
            return
        if len(rows) < len(sampling):
            self._num_mixed_steps += 1
        self.structured.apply(logits, rows, [sampling[i].seq.matcher for i in rows])

    def _kv_slots(self) -> tuple[int, int]:
        """(slots in the running sequences' blocks, slots of those that hold a token)."""
        bs, used, held = self.block_manager.block_size, 0, 0
        for seq in self.scheduler.running:
            released = self.block_manager.released.get(seq.seq_id, 0) * bs  # slots given back behind a window
            capacity = len(self.block_manager.block_table(seq.seq_id)) * bs - released
            used += capacity
            held += min(seq.num_computed_tokens - released, capacity)
        return used, held

    def _num_blocks(self) -> int:
        cfg = self.config
        if cfg.num_kv_blocks is not None:
            return cfg.num_kv_blocks
        per_block = kv_bytes_per_block(self.model, cfg.block_size, self.dtype)
        if cfg.kv_cache_memory_gb is not None:
            budget = cfg.kv_cache_memory_gb * 2**30
        elif self.device.type == "cuda":
            budget = self._profile_gpu_budget()
        else:
            budget = 4 * 2**30
        # Never more blocks than max_num_seqs sequences of full context could use.
        cap = cfg.max_num_seqs * -(-self.max_model_len // cfg.block_size)
        blocks = max(1, min(int(budget // per_block), cap))
        log.info("KV cache: %d blocks of %d tokens, %.2f GiB", blocks, cfg.block_size, blocks * per_block / 2**30)
        return blocks

    def _profile_gpu_budget(self) -> float:
        """vLLM's rule: run a forward at the largest step (max_num_batched_tokens prompt tokens, into a throw-away
        cache), then the KV pool gets gpu_memory_utilization of the GPU minus that peak and what others hold."""
        cfg = self.config
        tokens = min(cfg.max_num_batched_tokens, self.max_model_len)
        blocks = -(-tokens // cfg.block_size)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        kv = allocate_kv_caches(self.model, blocks, cfg.block_size, self.dtype, self.device)
        runner = ModelRunner(self.model, kv, None, self.device, block_size=cfg.block_size)
        ids = list(range(tokens))
        with torch.inference_mode():
            runner.forward(StepInputs([0] * tokens, ids, ids, [], [], [(0, tokens, 0, list(range(blocks)))],
                                      [tokens - 1]))
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        del kv, runner
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        return kv_budget_bytes(total, free, torch.cuda.memory_reserved(self.device), peak,
                               cfg.gpu_memory_utilization)

    @property
    def image_tokens(self) -> ImageTokens | None:
        """A vision model's image token and how many of them an image takes; None for a text model."""
        return None if self.vision is None else self.vision.tokens

    def _images(self, multi_modal_data: dict | None) -> list:
        """The request's images, checked: a vision model, vLLM's {"image": ...} shape, PIL images (or images the
        server prepared, ``PreparedImage``, of this model's shapes), the limit."""
        if not multi_modal_data:
            return []
        if not isinstance(multi_modal_data, dict) or set(multi_modal_data) - {"image"}:
            raise ValueError('multi_modal_data is {"image": a PIL image or a list of them}; other kinds are not '
                             "supported")
        if self.vision is None:
            raise ValueError(f"{self.config.model} is a text model: it takes no images; {SERVE_A_VISION_MODEL}")
        from PIL import Image  # local: only vision requests need Pillow

        images = multi_modal_data.get("image")
        if images is None or isinstance(images, Image.Image | PreparedImage):
            images = [] if images is None else [images]
        elif isinstance(images, list | tuple):
            images = list(images)
        else:
            raise ValueError("multi_modal_data['image'] holds PIL images (PIL.Image.Image), one or a list")
        for image in images:
            if not isinstance(image, Image.Image | PreparedImage):  # prepared ones: shapes checked by image_input
                raise ValueError("multi_modal_data['image'] holds PIL images (PIL.Image.Image)")
        limit = (self.config.limit_mm_per_prompt or MultiModalLimits()).image
        if len(images) > limit:
            raise ValueError(f"{len(images)} images in one prompt; the limit is {limit} (--limit-mm-per-prompt)")
        return images

    def _validate(self, prompt_token_ids: list[int], params: SamplingParams) -> SamplingParams:
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("the prompt is empty; give at least one token")
        vocab = self.model.config.vocab_size
        if any(t < 0 or t >= vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        for name, ids in (("logit_bias", params.logit_bias or ()),
                          ("allowed_token_ids", params.allowed_token_ids or ())):
            outside = [t for t in ids if t >= vocab]
            if outside:
                raise ValueError(f"{name} names token id {outside[0]}, outside the vocabulary [0, {vocab})")
        if params.allowed_token_ids and params.min_tokens:
            stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
            if set(params.allowed_token_ids) <= stops:
                raise ValueError("allowed_token_ids holds only stop tokens, which min_tokens masks: no token could "
                                 "be sampled; allow another token or drop min_tokens")
        if n >= self.max_model_len:
            raise ValueError(
                f"prompt has {n} tokens but the model's context is {self.max_model_len}; "
                "shorten it or raise max_model_len"
            )
        room = self.max_model_len - n
        if params.max_tokens is None or params.max_tokens > room:
            if params.max_tokens is not None and params.max_tokens > room:
                raise ValueError(
                    f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) exceeds the model's context "
                    f"({self.max_model_len}); lower max_tokens to at most {room}"
                )
            params = params.clone(max_tokens=room if params.default_max_tokens is None
                                  else min(room, params.default_max_tokens))
        pool = self.block_manager.num_blocks * self.block_manager.block_size
        if n + params.max_tokens > pool:
            raise ValueError(
                f"the request needs up to {n + params.max_tokens} tokens of KV cache but the whole pool holds {pool}; "
                "raise kv_cache_memory_gb or lower max_tokens"
            )
        if not self.config.enable_chunked_prefill and n + params.max_tokens > self.config.max_num_batched_tokens:
            raise ValueError(
                f"without chunked prefill a sequence of up to {n + params.max_tokens} tokens cannot fit a step of "
                f"{self.config.max_num_batched_tokens}; enable chunked prefill or raise max_num_batched_tokens"
            )
        return params

    def _sampling_row(self, seq: Sequence) -> SamplingRow:
        """The sequence's row, built at its first sample and kept: it holds the sequence's own token lists, so its
        position and penalties follow them (rebuilt only if those lists were replaced)."""
        row = seq.sampling_row
        if row is None or row.output_token_ids is not seq.output_token_ids or row.prompt_token_ids is not \
                seq.prompt_token_ids:
            p = seq.params
            stop_ids = frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else self.eos_token_ids)
            row = seq.sampling_row = SamplingRow(SamplingSettings.of(p), seq.prompt_token_ids, seq.output_token_ids,
                                                 seq.seed, stop_ids)
        row.num_pending = seq.num_pending
        return row

    def _seed(self, params: SamplingParams, index: int) -> int:
        """Sibling ``index``'s seed: the request's seed + index, or one drawn from the engine's generator."""
        if params.seed is not None:
            return (params.seed + index) % 2**63  # any integer: the sampler hashes it as a 64-bit one
        return int(torch.randint(0, 2**62, (1,), generator=self.generator))

    def _record_schedule(self, out) -> None:
        now = time.time()
        for chunk in out.chunks:
            req = self.requests.get(chunk.seq.request_id)
            if req is not None and req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = now
        num_decodes = sum(1 for c in out.chunks if c.is_decode)
        self.last_step = StepStats(out.num_batched_tokens, len(out.chunks), num_decodes)
        if self.lora is not None:
            adapters = len({c.seq.lora_id for c in out.chunks if c.seq.lora_id})
            self._max_step_adapters = max(self._max_step_adapters, adapters)

    def _count(self, out) -> None:
        self._num_steps += 1
        self._batched_tokens += out.num_batched_tokens
        for chunk in out.chunks:
            n_prompt = max(0, min(chunk.end, chunk.seq.num_prompt_tokens) - chunk.start)
            self._num_prompt_tokens += n_prompt

    def _append_tokens(self, sampling, token_ids, logprobs) -> dict[str, _Request]:
        """Append each chunk's tokens in order through the stop checks; tokens after a stop are dropped."""
        touched: dict[str, _Request] = {}
        now = time.time()
        for request_id in self._failed:  # ended by a failure in the step: their last output says so
            if (req := self.requests.get(request_id)) is not None:
                touched[request_id] = req
        self._failed.clear()
        for chunk, tokens, token_logprobs in zip(sampling, token_ids, logprobs):
            seq = chunk.seq
            req = self.requests.get(seq.request_id)
            if req is None or seq.is_finished:  # aborted; or ended by the step before (async scheduling)
                continue
            if req.metrics.first_token_time is None:
                req.metrics.first_token_time = now
            touched[req.request_id] = req
            for token, lp in zip(tokens, token_logprobs):
                self._append_token(seq, req.detok[seq.index], token, lp)
                if seq.is_finished:
                    break
        for req in touched.values():
            if all(s.is_finished for s in req.seqs):
                req.metrics.finished_time = now
                del self.requests[req.request_id]
        return touched

    def _append_token(self, seq: Sequence, detok: DetokState, token: int, logprobs: dict[int, float] | None) -> None:
        seq.output_token_ids.append(token)
        self._num_generation_tokens += 1
        if logprobs is not None:
            seq.output_logprobs.append(logprobs)
            seq.cumulative_logprob += logprobs[token]
        if seq.matcher is not None and not seq.matcher.consume_token(token):
            return self._finish(seq, "abort", None)  # the mask forbids this; only a matcher error gets here
        return self._check_stop(seq, detok, token)

    def _check_stop(self, seq: Sequence, detok: DetokState, token: int) -> None:
        p = seq.params
        can_stop = seq.num_output_tokens > p.min_tokens  # stop ids were masked for the first min_tokens
        is_eos = can_stop and not p.ignore_eos and token in self.eos_token_ids
        is_stop_id = can_stop and token in p.stop_token_ids
        # NOTE: a token that ends the output adds no text unless asked (as in vLLM); with skip_special_tokens off the
        # text would otherwise end in "<|im_end|>", and a tool-call parser would read it as content.
        keep = not (is_eos or is_stop_id) or p.include_stop_str_in_output
        delta = detokenize_next(self.decoder, detok, token, p.skip_special_tokens) if keep and p.detokenize else ""
        if is_eos or is_stop_id:
            reason, stop_reason = "stop", token if is_stop_id else None
        elif seq.matcher is not None and seq.matcher.is_stopped():  # the grammar is complete
            reason, stop_reason = "stop", None
        elif can_stop and p.stop and delta and (hit := find_stop(detok.text, len(delta), p.stop)) is not None:
            stop, idx = hit
            detok.text = detok.text[: idx + len(stop)] if p.include_stop_str_in_output else detok.text[:idx]
            return self._finish(seq, "stop", stop)
        elif seq.num_output_tokens >= p.max_tokens or seq.num_known_tokens >= self.max_model_len:
            reason, stop_reason = "length", None
        else:
            return None
        if p.detokenize:
            detokenize_flush(self.decoder, detok, p.skip_special_tokens)  # an output that ends inside a character
        return self._finish(seq, reason, stop_reason)

    def _finish(self, seq: Sequence, reason: str, stop_reason) -> None:
        seq.stop_reason = stop_reason
        self.scheduler.finish(seq, reason)

    def _request_output(self, req: _Request) -> RequestOutput:
        delta = req.params.output_kind == "delta"
        outputs = [self._completion(seq, req.detok[seq.index], delta) for seq in req.seqs]
        finished = all(o.finished for o in outputs)
        cached = req.seqs[0].num_cached_prompt_tokens
        prompt_logprobs, prompt_ranks = req.seqs[0].prompt_logprobs, req.seqs[0].prompt_ranks
        if prompt_logprobs is not None and (len(prompt_logprobs) < len(req.prompt_token_ids)
                                            or delta and req.sent_prompt_logprobs):
            prompt_logprobs = prompt_ranks = None  # not complete yet, or (a delta) sent already
        elif prompt_logprobs is not None:
            req.sent_prompt_logprobs = True
            prompt_logprobs, prompt_ranks = list(prompt_logprobs), list(prompt_ranks)
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outputs, finished, cached, req.metrics,
                             prompt_logprobs, prompt_ranks)

    @staticmethod
    def _completion(seq: Sequence, detok: DetokState, delta: bool) -> CompletionOutput:
        """The sequence's output so far, or (``delta``) what is new since its last one: a delta advances the
        sequence's sent marks, so each step builds it once (a second call returns nothing new)."""
        text = detok.text
        end = len(text)
        if not seq.is_finished and seq.params.stop:
            # Hold back text that may be the start of a stop string, so a stream never shows part of one. The text
            # shown only grows: a stop found later starts at or after what was shown (find_stop looks back only
            # len(stop) - 1 characters from the new text).
            end = max(0, end - (max(len(s) for s in seq.params.stop) - 1))
        wants_logprobs = seq.params.logprobs is not None
        if delta:
            tokens, chars = seq.num_sent_tokens, seq.num_sent_chars
            seq.num_sent_tokens, seq.num_sent_chars = len(seq.output_token_ids), end
            text, token_ids = text[chars:end], seq.output_token_ids[tokens:]
            logprobs = seq.output_logprobs[tokens:] if wants_logprobs else None
        else:
            text, token_ids = text[:end], list(seq.output_token_ids)
            logprobs = list(seq.output_logprobs) if wants_logprobs else None
        cumulative = seq.cumulative_logprob if wants_logprobs and seq.output_logprobs else None
        return CompletionOutput(seq.index, text, token_ids, cumulative, logprobs, seq.finish_reason, seq.stop_reason)


def kv_budget_bytes(total: int, free: int, reserved: int, peak: int, utilization: float) -> float:
    """Bytes for the KV pool: ``utilization`` of the device, less the profiled peak of this process's tensors
    (weights + the largest step's activations) and less what other processes and non-torch allocations hold
    (total - free - this process's reserved pool). 0 when nothing is left."""
    others = max(0, total - free - reserved)
    return max(0.0, utilization * total - peak - others)


def no_host_syncs(model) -> bool:
    """Whether a forward never asks the host for a value, so a decode step can be captured in a CUDA graph: a mixture
    of experts counts its tokens per expert on the host unless its backend runs them in grouped matmuls
    (``ops.fused_moe`` over stacked experts)."""
    layers = [m for m in model.modules() if isinstance(m, SparseMoE)]
    return not layers or model.ops.fused_moe is not None and all(m.stacked is not None for m in layers)


def _eos_ids(tokenizer, path) -> frozenset[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if str(path).endswith(".gguf"):  # the tokenizer from the file's metadata names its EOS
        return frozenset(ids)
    try:
        # local: transformers takes ~1 s to import; `loom serve --help` and `loom generate --help` load this module
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(str(path)).eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    except OSError:
        pass
    return frozenset(ids)
