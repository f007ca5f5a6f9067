"""Turns a ``SchedulerOutput`` into one forward pass: flat token batch, positions, cache slots, attention
metadata; returns logits only for the rows that sample (the last token of each chunk that reaches its end, and each
draft token of a speculative decode)."""

from __future__ import annotations

import importlib.util
import itertools
import os
from dataclasses import dataclass

import numpy as np
import torch

from loom.distributed.parallel import TensorParallel
from loom.engine.block_manager import BlockManager
from loom.engine.config import EngineConfig
from loom.engine.lora import LoRAManager
from loom.engine.scheduler import ScheduledChunk, SchedulerOutput
from loom.engine.sequence import PENDING, Sequence
from loom.models.gguf import is_gguf
from loom.models.llama import LlamaForCausalLM
from loom.models.loader import integer_quantization, load_model
from loom.ops.attention import AttentionMetadata, PrefillChunk
from loom.ops.layers import TorchOps
from loom.ops.quantized import quantize_int8


def build_model(path, config: EngineConfig, device: torch.device, max_model_len: int,
                tp: TensorParallel | None = None) -> LlamaForCausalLM:
    """Load the model (``tp``: this rank's shard), quantize it if ``config.quantization`` asks, and point it at the
    ops of ``config.attention_backend``. Quantized weights (a GGUF file, ``--quantization int8``) are multiplied by
    the C++ kernels on CPU and by Triton's on CUDA (or on CPU with the triton backend, under its interpreter)."""
    kernels = quantized_kernels(config.attention_backend, device)
    if config.quantization:
        if is_gguf(path):
            raise ValueError(f"{path} is a GGUF file, already quantized: drop --quantization {config.quantization}")
        if (method := integer_quantization(path)) is not None:
            raise ValueError(f"{path} holds {method.upper()} weights, already quantized (and run quantized): drop "
                             f"--quantization {config.quantization}")
        if kernels == "cpu" and config.torch_dtype() != torch.float32:
            raise ValueError(f"--quantization {config.quantization} runs on CPU in float32 (got "
                             f"{config.torch_dtype()})")
    model = load_model(path, config.torch_dtype(), device, max_model_len, tp, kernels,
                       row_amax=config.quantization is not None,
                       dummy_seed=config.seed if config.load_format == "dummy" else None)
    if config.quantization == "int8":
        if kernels == "triton":
            from loom.ops.triton.quantized import TritonQuantLinear  # local: imports triton

            quantize_int8(model, TritonQuantLinear.from_float)
        else:
            quantize_int8(model)
    model.ops = choose_ops(config.attention_backend, device)
    model.ops.prepare(model)
    return model


def quantized_kernels(backend: str, device: torch.device) -> str:
    """"triton" on CUDA or with the triton backend, else "cpu"."""
    if device.type == "cpu" and backend != "triton":
        return "cpu"
    if not _has_triton():
        raise ValueError("quantized weights on a GPU run with Triton kernels: pip install triton, or serve the float "
                         "weights")
    return "triton"


def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def choose_ops(backend: str, device: torch.device):
    """The fused C++ kernels on CPU when they build ("auto"), Triton's paged decode on CUDA ("auto" where triton is
    installed, or "triton"; on CPU only under TRITON_INTERPRET=1, for tests), the plain-PyTorch reference otherwise
    or on request."""
    if backend == "triton" or (backend == "auto" and device.type == "cuda" and _has_triton()):
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("attention_backend triton runs on CUDA (or on CPU under TRITON_INTERPRET=1, for tests)")
        from loom.ops.triton_ops import TritonOps  # local: imports triton

        return TritonOps()
    if backend == "torch" or device.type != "cpu":
        return TorchOps()
    try:
        from loom.ops.cpu_kernels import CpuOps  # local: importing it builds the C++ kernels, or raises ImportError
    except ImportError:
        if backend == "cpp":
            raise
        return TorchOps()
    return CpuOps()


def allocate_kv_caches(
    model: LlamaForCausalLM, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One (keys, values) pair of [num_blocks, block_size, heads, width] per layer (``LlamaConfig.cache_layout``); a
    latent cache (MLA) is one tensor, both keys and values."""
    cfg = model.config
    heads, width, shared = cfg.cache_layout()
    shape = (num_blocks, block_size, heads, width)
    caches = []
    for _ in range(cfg.num_hidden_layers):
        keys = _zeros(shape, dtype, device)
        caches.append((keys, keys if shared else _zeros(shape, dtype, device)))
    return caches


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros, not empty: padded slots are masked, but garbage NaNs there would still poison 0 * NaN.
    On CPU, numpy's calloc gives zero pages lazily, so a multi-GB pool costs nothing until it is written."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    elem = torch.tensor([], dtype=dtype).element_size()
    raw = np.zeros(shape, dtype={2: np.uint16, 4: np.uint32}[elem])
    return torch.from_numpy(raw).view(dtype)


def kv_bytes_per_block(model: LlamaForCausalLM, block_size: int, dtype: torch.dtype) -> int:
    heads, width, shared = model.config.cache_layout()
    elem = torch.tensor([], dtype=dtype).element_size()
    return (1 if shared else 2) * model.config.num_hidden_layers * block_size * heads * width * elem


@dataclass(slots=True)
class TokenFeed:
    """Input tokens that the step still in flight samples (async scheduling): before the forward, on the device, row
    ``rows[i]`` of the step's flat batch takes ``tokens[sources[i]]``."""

    tokens: torch.Tensor
    """The step in flight's sampled ids [S], on the device."""
    rows: np.ndarray
    sources: np.ndarray


@dataclass(slots=True, eq=False)
class StepInputs:
    """A step's forward pass as host integers (numpy int64 arrays; lists are converted): everything a rank needs to
    run it, nothing about sequences. Rank 0 builds it from the scheduler's output with numpy gathers from the block
    manager's ``table_array``; with tensor parallelism it travels to the other ranks as one tensor (``encode`` /
    ``decode``)."""

    input_ids: np.ndarray
    positions: np.ndarray
    slots: np.ndarray
    decode_tables: np.ndarray
    """[decode rows, width]: row i's first ceil(decode_seq_lens[i] / block_size) entries are its sequence's block
    table; entries after them are padding (block ids never read)."""
    decode_seq_lens: np.ndarray
    prefills: list[tuple[int, int, int, np.ndarray | None]]
    """(first row, end row, position of the first token, block table covering the chunk's end)."""
    logit_rows: np.ndarray
    """Rows whose logits the step needs, in the order the sampler reads them."""
    feed: TokenFeed | None = None
    """Input tokens still on the device (async scheduling: their rows of ``input_ids`` hold ``PENDING``). Not part of
    ``encode``: tensor-parallel ranks never get one."""
    images: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
    """Image rows of a vision-language model's prefill chunks: (step rows [R], their input embeddings [R, hidden],
    M-RoPE positions [R, 3] or None), written over those rows' token embeddings. Not part of ``encode`` (vision models
    run on one rank)."""
    visible_through: np.ndarray | None = None
    """[T] int32: the last position each row's query sees, past its own inside a span attended both ways (Gemma 3's
    images); None: causal (``AttentionMetadata.visible_through``). Not part of ``encode`` either."""

    def __post_init__(self) -> None:
        for name in ("input_ids", "positions", "slots", "decode_seq_lens", "logit_rows"):
            setattr(self, name, _int64(getattr(self, name)))
        tables = _int64(self.decode_tables)
        self.decode_tables = tables.reshape(len(tables), -1) if tables.size else tables.reshape(len(tables), 0)
        self.prefills = [(start, end, pos, None if table is None else _int64(table))
                         for start, end, pos, table in self.prefills]

    def __eq__(self, other) -> bool:
        if not isinstance(other, StepInputs):
            return NotImplemented
        arrays = ("input_ids", "positions", "slots", "decode_tables", "decode_seq_lens", "logit_rows")
        return (all(np.array_equal(getattr(self, a), getattr(other, a)) for a in arrays)
                and self.decode_tables.shape == other.decode_tables.shape
                and len(self.prefills) == len(other.prefills)
                and all(a[:3] == b[:3] and _same_table(a[3], b[3]) for a, b in zip(self.prefills, other.prefills)))

    def encode(self) -> torch.Tensor:
        """One int64 tensor: a header of counts, then every array back to back."""
        num_decodes, width = self.decode_tables.shape
        header = [len(self.input_ids), num_decodes, width, len(self.prefills), len(self.logit_rows)]
        prefill_rows = [v for start, end, pos, table in self.prefills for v in (start, end, pos, _len(table))]
        tables = [table for *_, table in self.prefills if table is not None]
        flat = np.concatenate([np.array(header, dtype=np.int64), self.input_ids, self.positions,
                               self.slots, self.decode_tables.ravel(), self.decode_seq_lens,
                               np.array(prefill_rows, dtype=np.int64), *tables, self.logit_rows]).astype(np.int64)
        return torch.from_numpy(flat)

    @classmethod
    def decode(cls, flat: torch.Tensor) -> StepInputs:
        values = flat.numpy()
        num_tokens, num_decodes, width, num_prefills, num_rows = values[:5].tolist()
        at = 5

        def take(n: int) -> np.ndarray:
            nonlocal at
            at += n
            return values[at - n : at]

        input_ids, positions, slots = take(num_tokens), take(num_tokens), take(num_tokens)
        tables = take(num_decodes * width).reshape(num_decodes, width)
        seq_lens = take(num_decodes)
        rows = take(4 * num_prefills).reshape(num_prefills, 4).tolist()
        prefills = [(start, end, pos, take(n) if n else None) for start, end, pos, n in rows]
        return cls(input_ids, positions, slots, tables, seq_lens, prefills, take(num_rows))


def _int64(values) -> np.ndarray:
    return values if isinstance(values, np.ndarray) and values.dtype == np.int64 else np.asarray(values, np.int64)


def _len(table: np.ndarray | None) -> int:
    return 0 if table is None else len(table)


def _same_table(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    return a is None and b is None or a is not None and b is not None and np.array_equal(a, b)


@dataclass(slots=True)
class StepTensors:
    """A step's integers on the device, views into one uploaded tensor (``Uploader.upload``)."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    decode_tables: torch.Tensor
    """[decodes, width] int32."""
    decode_seq_lens: torch.Tensor
    """[decodes] int32."""
    prefill_tables: list[torch.Tensor | None]
    logit_rows: torch.Tensor


class Uploader:
    """Puts a step's integers on the device in one copy: ``StepInputs.encode`` packs them into one int64 tensor,
    staged in pinned host memory on CUDA and copied without blocking the host; the step's tensors are views into it
    (the two int32 ones are converted on the device). One host-to-device transfer a step instead of one per list;
    a pageable ``.to(cuda)`` also blocks the host until the copy is done."""

    def __init__(self, device: torch.device):
        self.device = device
        self._staging: torch.Tensor | None = None
        self._copied = None
        """A CUDA event after the latest copy out of ``_staging``: the next step waits for it before overwriting."""

    def upload(self, inputs: StepInputs) -> StepTensors:
        flat = inputs.encode()
        feed = inputs.feed
        if feed is not None:  # its rows and sources travel in the same copy, after the step's integers
            flat = torch.cat([flat, torch.from_numpy(np.concatenate([feed.rows, feed.sources]).astype(np.int64))])
        if self.device.type == "cuda":
            if self._staging is None or self._staging.numel() < flat.numel():
                self._staging = torch.empty(max(2 * flat.numel(), 4096), dtype=torch.long, pin_memory=True)
                self._copied = None
            if self._copied is not None:
                self._copied.synchronize()
            staged = self._staging[: flat.numel()]
            staged.copy_(flat)
            flat = staged.to(self.device, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        elif flat.device != self.device:
            flat = flat.to(self.device)
        step = split_step(flat, inputs)
        if feed is not None:
            n = len(feed.rows)
            indices = flat[flat.numel() - 2 * n :]
            step.input_ids[indices[:n]] = feed.tokens[indices[n:]]  # on the device: no wait for the step in flight
        return step


def split_step(flat: torch.Tensor, inputs: StepInputs) -> StepTensors:
    """The views of ``inputs.encode()``'s layout in ``flat`` (wherever it lives); counts come from ``inputs``."""
    num_tokens, (num_decodes, width) = len(inputs.input_ids), inputs.decode_tables.shape
    at = 5

    def take(n: int) -> torch.Tensor:
        nonlocal at
        at += n
        return flat[at - n : at]

    input_ids, positions, slots = take(num_tokens), take(num_tokens), take(num_tokens)
    tables = take(num_decodes * width).view(num_decodes, width).to(torch.int32)
    seq_lens = take(num_decodes).to(torch.int32)
    take(4 * len(inputs.prefills))
    prefill_tables = [None if table is None else take(len(table)) for *_, table in inputs.prefills]
    return StepTensors(input_ids, positions, slots, tables, seq_lens, prefill_tables, take(len(inputs.logit_rows)))


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        block_manager: BlockManager | None,
        device: torch.device,
        lora: LoRAManager | None = None,
        block_size: int | None = None,
        peers=None,
        graphs=None,
    ):
        """``block_manager`` is None on a tensor-parallel rank other than 0 (it only runs ``forward``); ``peers``
        (rank 0 with tensor parallelism, ``loom.engine.tensor_parallel.TPWorkers``) gets each step's inputs first."""
        self.model = model
        self.lora = lora
        self.kv_caches = kv_caches
        self.block_manager = block_manager
        self.block_size = block_size or block_manager.block_size
        self.device = device
        self.peers = peers
        self.graphs = graphs
        """``loom.engine.cuda_graphs.DecodeGraphs``: decode-only steps replayed as CUDA graphs; None: always eager."""
        self.uploader = Uploader(device)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, in_flight: tuple[torch.Tensor, dict[int, int]] | None = None,
                ) -> tuple[torch.Tensor, list[ScheduledChunk]]:
        """Run the step; returns logits [S + D, V] and the S sampling chunks in row order.

        Row i < S is the last verified token of chunk i (what plain sampling reads); the D rows after them are the
        draft tokens of speculative chunks, chunk by chunk, in order (see ``loom.engine.spec_decode``).
        ``in_flight``: the sampled ids of the step before, not read back yet, and each of its sequences' row in them
        (async scheduling): the pending tokens of this step's sequences come from there, on the device."""
        decodes = [c for c in out.chunks if c.is_decode]
        prefills = [c for c in out.chunks if not c.is_decode]
        if self.lora is not None:  # rows of one adapter side by side: one pair of LoRA matmuls per group
            decodes.sort(key=_adapter)
            prefills.sort(key=_adapter)
            self.lora.prepare_step(decodes + prefills)
        inputs, sampling, prompt_rows = self._inputs(decodes, prefills, in_flight)
        if self.peers is not None:
            self.peers.send_step(inputs, self.lora)
        if self.graphs is not None and inputs.images is None and self.graphs.can_run(inputs):
            logits = self.graphs.run(inputs)
        else:
            logits = self.forward(inputs)
        if prompt_rows:  # after the sampling rows
            num_sampled = len(inputs.logit_rows) - sum(len(targets) for _, targets in prompt_rows)
            add_prompt_logprobs(logits[num_sampled:], prompt_rows)
            logits = logits[:num_sampled]
        return (logits, sampling) if sampling else (logits.new_empty((0, 0)), [])

    @torch.inference_mode()
    def forward(self, inputs: StepInputs) -> torch.Tensor | None:
        """The model over one step's inputs -> logits of ``inputs.logit_rows`` (None on tensor-parallel ranks > 0)."""
        step = self.uploader.upload(inputs)
        meta = AttentionMetadata(
            slot_mapping=step.slots, num_decodes=len(inputs.decode_tables), decode_block_tables=step.decode_tables,
            decode_seq_lens=step.decode_seq_lens, block_size=self.block_size,
            prefills=[PrefillChunk(start, end, pos, table)
                      for (start, end, pos, _), table in zip(inputs.prefills, step.prefill_tables)],
            visible_through=None if inputs.visible_through is None else torch.from_numpy(
                inputs.visible_through).to(self.device),
        )
        hidden = self.model(step.input_ids, step.positions, self.kv_caches, meta, inputs.images)
        if not len(inputs.logit_rows):
            return hidden.new_empty((0, 0))
        return self.model.compute_logits(hidden[step.logit_rows])

    def _inputs(self, decodes: list[ScheduledChunk], prefills: list[ScheduledChunk],
                in_flight: tuple[torch.Tensor, dict[int, int]] | None = None):
        """The step's integers, decode rows first. Positions, cache slots, decode tables and context lengths are numpy
        gathers from the block manager's ``table_array`` (no per-token Python, no table lists rebuilt); only the
        token ids come from the sequences' lists.

        NOTE: a speculative decode (1 + d tokens) is 1 + d decode rows over the same blocks, row j seeing the context
        up to its own position: causal attention through the batched decode kernel, not one prefill each."""
        bm, bs = self.block_manager, self.block_size
        array = bm.table_array
        chunks = decodes + prefills
        rows = np.fromiter((bm.row_of(c.seq.seq_id) for c in chunks), np.int64, len(chunks))
        counts = np.fromiter((c.num_tokens for c in chunks), np.int64, len(chunks))
        starts = np.fromiter((c.start for c in chunks), np.int64, len(chunks))
        ends = np.cumsum(counts)
        token_rows = np.repeat(rows, counts)  # the table row of every token
        positions = np.repeat(starts - (ends - counts), counts) + np.arange(ends[-1] if len(ends) else 0)
        slots = array[token_rows, positions // bs].astype(np.int64) * bs + positions % bs
        input_ids = np.fromiter(itertools.chain.from_iterable(c.token_ids for c in chunks), np.int64, len(positions))
        num_decode_rows = int(ends[len(decodes) - 1]) if decodes else 0
        decode_positions = positions[:num_decode_rows]
        width = int(decode_positions.max()) // bs + 1 if num_decode_rows else 0
        tables = array[token_rows[:num_decode_rows], :width]
        prefill_chunks = []
        for i, c in enumerate(prefills, len(decodes)):
            first = int(ends[i] - counts[i])
            prefill_chunks.append((first, int(ends[i]), c.start, array[rows[i], : bm.blocks_needed(c.end)]))
        logit_rows, draft_rows, sampling = [], [], []
        for chunk, end in zip(chunks, ends.tolist()):
            if chunk.samples:
                num_drafts = len(chunk.draft_token_ids)
                logit_rows.append(end - 1 - num_drafts)
                draft_rows.extend(range(end - num_drafts, end))
                sampling.append(chunk)
        prompt_rows, prompt_logit_rows = [], []
        # every chunk, decodes too: a one-token chunk of a prompt (the step's budget left one, or a chunk stopped
        # before a picture) is scheduled as a decode and scores its token as any prompt chunk does
        for i, c in enumerate(chunks):
            if c.seq.prompt_logprobs is not None:  # a request's first sequence (n > 1: its siblings skip)
                rows, targets = _prompt_logprob_rows(c, int(ends[i] - counts[i]))
                if len(targets):
                    prompt_rows.append((c.seq, targets))
                    prompt_logit_rows.extend(rows)
        inputs = StepInputs(input_ids, _rope_positions(chunks, positions, ends - counts), slots, tables,
                            decode_positions + 1, prefill_chunks,
                            logit_rows + draft_rows + prompt_logit_rows, _feed(input_ids, chunks, counts, in_flight),
                            _image_rows(chunks, ends - counts, self.device),
                            _visible_through(chunks, positions, ends - counts))
        return inputs, sampling, prompt_rows


def _visible_through(chunks: list[ScheduledChunk], positions: np.ndarray, first_rows: np.ndarray,
                     ) -> np.ndarray | None:
    """``StepInputs.visible_through``: each row's own position, past it inside a span its prompt attends both ways
    (``ImageInput.spans``); None when no chunk of the step reaches one."""
    out = None
    for chunk, first in zip(chunks, first_rows.tolist()):
        images = chunk.seq.images
        if images is None or images.spans is None or chunk.start >= images.end:
            continue
        if out is None:
            out = positions.astype(np.int32)
        out[first : first + chunk.num_tokens] = images.visible_through(chunk.start, chunk.end)
    return out


def _rope_positions(chunks: list[ScheduledChunk], positions: np.ndarray, first_rows: np.ndarray) -> np.ndarray:
    """The positions the step's tokens rotate by: their cache positions, except under M-RoPE (Qwen2-VL), where a
    prompt's tokens after an image rotate by fewer (an image's rows span only its grid's longer side) and the tokens
    after the prompt by their position plus the prompt's ``rope_delta`` (``ImageInput.rope``)."""
    out = None
    for chunk, first in zip(chunks, first_rows.tolist()):
        images = chunk.seq.images
        if images is None or images.rope is None:
            continue
        if out is None:
            out = positions.copy()
        index = np.arange(chunk.start, chunk.end)
        rope = images.rope
        out[first : first + len(index)] = np.where(index < len(rope), rope[np.minimum(index, len(rope) - 1)],
                                                   index + images.rope_delta)
    return positions if out is None else out


def _image_rows(chunks: list[ScheduledChunk], first_rows: np.ndarray, device: torch.device,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """The step rows of the image tokens in the chunks (each chunk's first row in ``first_rows``), their
    embeddings, and under M-RoPE their (temporal, height, width) positions; None when no chunk has one. (A one-token
    chunk is scheduled as a decode: after a prefix hit, the prompt's last token may be an image's.) A sequence whose
    chunk reaches past its last image lets go of the images' embeddings. (The scheduler has them encoded when it
    schedules a chunk that reaches them, so a failure of the tower never gets here.)"""
    rows, embeds, mrope, done = [], [], [], []
    for chunk, first in zip(chunks, first_rows.tolist()):
        images = chunk.seq.images
        if images is None:
            continue
        offsets, index = images.rows_in(chunk.start, chunk.end)
        if len(index):
            rows.append(offsets + first)
            embeds.append(images.rows(int(index[0]), int(index[-1])))  # a chunk's image rows are consecutive
            if images.mrope is not None:
                mrope.append(images.mrope[index])
            if chunk.end >= images.end:
                done.append(images)
    for images in done:  # after the step's gathering: n > 1 siblings share them
        images.release()
    if not rows:
        return None
    return (torch.from_numpy(np.concatenate(rows)).to(device), torch.cat(embeds),
            torch.from_numpy(np.concatenate(mrope)).to(device) if mrope else None)


def _prompt_logprob_rows(chunk: ScheduledChunk, first_row: int) -> tuple[range, list[int]]:
    """The rows of a prefill chunk whose logits give prompt logprobs not known yet (the row at position p scores
    prompt token p + 1; the last prompt position's row samples, so it is not one), and the tokens they score. A
    sequence recomputed after preemption has its earlier ones already."""
    seq = chunk.seq
    prompt = seq.prompt_token_ids
    start = max(chunk.start, len(seq.prompt_logprobs) - 1)
    end = min(chunk.end, len(prompt) - 1)
    if end <= start:
        return range(0), []
    return range(first_row + start - chunk.start, first_row + end - chunk.start), prompt[start + 1 : end + 1]


def add_prompt_logprobs(logits: torch.Tensor, prompt_rows: list[tuple[Sequence, list[int]]]) -> None:
    """Append to each sequence's ``prompt_logprobs`` its rows' scores: {prompt token: log-probability, then the
    top ``params.prompt_logprobs`` tokens'} from the raw logits' log-softmax (one pass for the step's rows), and to its
    ``prompt_ranks`` each prompt token's rank: the tokens at least as likely, itself included (vLLM's count: a tie
    ranks below, a -inf token last)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    targets = torch.tensor([t for _, tokens in prompt_rows for t in tokens], device=logits.device)
    own_t = logprobs.gather(1, targets[:, None])  # [R, 1]
    ranks = (logprobs >= own_t).sum(dim=-1).tolist()
    own = own_t.squeeze(1).tolist()
    k = max(seq.params.prompt_logprobs for seq, _ in prompt_rows)
    if k:
        top_values, top_ids = (t.tolist() for t in logprobs.topk(k, dim=-1))
    else:
        top_values = top_ids = [[]] * len(own)
    row = 0
    for seq, tokens in prompt_rows:
        wanted = seq.params.prompt_logprobs
        for token in tokens:
            entry = {token: own[row]}
            for tid, value in zip(top_ids[row][:wanted], top_values[row][:wanted]):
                entry.setdefault(tid, value)
            seq.prompt_logprobs.append(entry)
            seq.prompt_ranks.append(ranks[row])
            row += 1


def _feed(input_ids: np.ndarray, chunks: list[ScheduledChunk], counts: np.ndarray,
          in_flight: tuple[torch.Tensor, dict[int, int]] | None) -> TokenFeed | None:
    """Where the step's ``PENDING`` token ids come from: the step in flight's row of each one's sequence."""
    rows = np.flatnonzero(input_ids == PENDING)
    if not len(rows):
        return None
    tokens, index = in_flight if in_flight is not None else (None, {})
    chunk_of_row = np.repeat(np.arange(len(chunks)), counts)[rows]
    seq_ids = [chunks[c].seq.seq_id for c in chunk_of_row]
    if any(seq_id not in index for seq_id in seq_ids):
        raise RuntimeError("a scheduled token is pending but no step in flight samples it")
    return TokenFeed(tokens, rows, np.fromiter((index[seq_id] for seq_id in seq_ids), np.int64, len(rows)))


def _adapter(chunk: ScheduledChunk) -> int:
    return chunk.seq.lora_id
