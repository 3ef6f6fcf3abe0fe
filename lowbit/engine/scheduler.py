"""Continuous batching: requests join and leave the running batch between decode steps.

Each request owns one slot of a ``SlotKVCache`` while it runs. An engine step:
1. admits waiting requests into free slots (a request that does not fit waits in the queue: the
   engine never fails for lack of memory, it only waits);
2. prefills one chunk (``prefill_chunk`` tokens) of the first admitted request, together with the
   next chunk of every other admitted request whose chunk has the same start and length, up to
   ``prefill_tokens`` tokens in all: one batched forward, so that a burst of equal-length prompts
   prefills at large-M GEMM efficiency; a long prompt is spread over several steps while the running
   requests keep streaming;
3. runs one decode step for every running request at once, each at its own position (a ragged
   batch: per-row rotary positions, per-row cache positions, a per-row attention mask);
4. retires requests that hit a stop token, their token budget or were cancelled, freeing slots.

``Engine.step`` returns ``TokenEvent``s; the server turns them into streamed chunks. ``add`` and
``cancel`` may be called from other threads (they only touch a lock-protected inbox).

Greedy rows on CUDA graphs decode one step ahead of the host (``GraphedDecode.launch_next``): while
the batch stays the same (nobody waits, prefills, is cancelled or reaches its token budget), a step
enqueues the next decode step first, then reads the tokens of the previous one, so the GPU does not
wait for Python between steps. A row that hits a stop token has then computed one token too many,
which is dropped (its cache slot is freed anyway).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

import torch

from lowbit.model.kv_cache import SlotKVCache
from lowbit.engine.sampling import SamplingParams, greedy_tokens, request_generator, sample
from lowbit.errors import LowbitError
from lowbit.formats import KVCacheFormat
from lowbit.model.llama import Transformer

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass
class TokenEvent:
    request_id: int
    token: int | None  # the new token (None when the request ends without one: cancelled)
    finish_reason: FinishReason | None = None  # set on the request's last event


@dataclass(frozen=True)
class EngineStats:
    waiting: int  # queued for a KV slot (not yet admitted)
    prefilling: int  # admitted, prompt not yet fully in the cache
    running: int  # decoding
    slots_used: int
    slots_total: int


@dataclass
class _Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    max_new: int
    generator: torch.Generator | None
    slot: int = -1
    prefilled: int = 0  # prompt tokens already in the cache
    generated: list[int] = field(default_factory=list)
    last_logits: torch.Tensor | None = None  # (vocab,) logits that pick the next token


def plan_slots(model: Transformer, max_len: int, *, memory_fraction: float = 0.9, cap: int = 256,
               kv: KVCacheFormat | None = None) -> int:
    """How many sequences of ``max_len`` tokens fit in the KV cache (of format ``kv``, fp16 by default).

    CUDA: from free device memory (``torch.cuda.mem_get_info``) after the weights, times
    ``memory_fraction`` (the rest is left for activations and CUDA graphs); CPU: 8. At most ``cap``;
    at least 1.
    """
    p = model.embed_tokens.weight
    if p.device.type != "cuda":
        return min(8, cap)
    free, _ = torch.cuda.mem_get_info(p.device)
    per_slot = SlotKVCache.bytes_per_slot(model.config, max_len, p.dtype, kv)
    return max(1, min(cap, int(free * memory_fraction // per_slot)))


def model_kv_format(model: Transformer) -> tuple[KVCacheFormat, list[tuple[torch.Tensor | None, torch.Tensor | None]]]:
    """The KV cache format the model was quantized for (fp16 if none) and each layer's static fp8 scales."""
    attn = [layer.self_attn for layer in model.layers]
    fmt = model.kv_format or KVCacheFormat()
    return fmt, [(a.k_scale, a.v_scale) for a in attn]


def prefill_warmup_shapes(chunk: int, tokens: int, slots: int) -> list[tuple[int, int]]:
    """(rows, T) of the prefill forwards that reach each kernel a prompt may run (GEMMs see M = rows x T).

    The dispatch tables pick a kernel config per power-of-two M bucket (``kernels/dispatch.py``) and
    Triton compiles one specialization per integer argument divisible by 16 or not (and == 1). One
    row warms each bucket up to ``chunk`` with its top length 2**k and with 2**k - 1, and ``chunk`` and
    ``chunk - 1`` themselves; batched chunks (``_prefill_group``) warm the buckets above, up to
    ``tokens`` and ``slots`` rows, with rows of ``chunk`` and of ``chunk - 1`` tokens."""
    lengths = {1}
    p = 2
    while p <= chunk:
        lengths |= {p, p - 1}
        p *= 2
    lengths |= {chunk, max(1, chunk - 1)}
    shapes = [(1, T) for T in sorted(lengths)]
    rows = 2
    while rows * chunk <= tokens and rows <= slots:
        shapes += [(rows, chunk)] + ([(rows, chunk - 1)] if chunk > 1 else [])
        rows *= 2
    return shapes


class Engine:
    """Continuous-batching generation over one model (module docstring)."""

    def __init__(self, model: Transformer, *, max_slots: int | None = None, max_len: int | None = None,
                 prefill_chunk: int = 256, decode_kernel: bool | None = None, cuda_graphs: bool | None = None,
                 graph_batch_sizes: list[int] | None = None, warm_prefill: bool | None = None,
                 prefill_tokens: int = 4096) -> None:
        """``decode_kernel``: decode attention by the Triton kernel reading the cache in place (default:
        on CUDA, unless a sliding window shorter than ``max_len`` needs the masked path).
        ``cuda_graphs``: replay decode steps from CUDA graphs (default: on CUDA with the decode
        kernel), captured for ``graph_batch_sizes`` (default 1, 2, 4, ... up to the slot count).
        ``warm_prefill``: run one prefill forward of each ``prefill_warmup_shapes`` shape now, so that the
        first prompts of each length do not pay for compiling kernels (default: on CUDA).
        ``prefill_tokens``: the most prompt tokens one step prefills, over the requests it batches
        (at least one chunk of one request).
        """
        if prefill_chunk < 1:
            raise LowbitError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        if prefill_tokens < 1:
            raise LowbitError(f"prefill_tokens must be >= 1, got {prefill_tokens}")
        # what rebuilt() needs to make a fresh engine over the same model
        self._settings = dict(max_slots=max_slots, max_len=max_len, prefill_chunk=prefill_chunk,
                              decode_kernel=decode_kernel, cuda_graphs=cuda_graphs,
                              graph_batch_sizes=graph_batch_sizes, warm_prefill=warm_prefill,
                              prefill_tokens=prefill_tokens)
        self.model = model
        self.device, self.dtype = model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
        self.max_len = max_len or model.config.max_position_embeddings
        if self.max_len > model.config.max_position_embeddings:
            raise LowbitError(f"max_len {self.max_len} exceeds the model's context {model.config.max_position_embeddings}")
        on_cuda = self.device.type == "cuda"
        window, hd = model.config.sliding_window, model.config.head_dim
        # the kernel has no sliding window, and takes power-of-two head sizes from 32
        kernel_ok = (window is None or window >= self.max_len) and hd >= 32 and hd & (hd - 1) == 0
        if decode_kernel and not kernel_ok:
            raise LowbitError(f"the decode-attention kernel cannot run this model (sliding window {window} < max_len "
                              f"{self.max_len}, or head_dim {hd} not a power of two >= 32)")
        self.decode_kernel = kernel_ok and on_cuda if decode_kernel is None else decode_kernel
        if cuda_graphs and not (on_cuda and self.decode_kernel):
            raise LowbitError("CUDA graphs need the model on a CUDA device and the decode-attention kernel")
        use_graphs = self.decode_kernel and on_cuda if cuda_graphs is None else cuda_graphs
        kv, static_scales = model_kv_format(model)
        slots = max_slots or plan_slots(model, self.max_len, kv=kv)
        # one spare slot for the padding rows of a graphed batch (GraphedDecode)
        self.cache = SlotKVCache(model.config, slots + use_graphs, self.max_len, device=self.device,
                                 dtype=self.dtype, kv=kv, static_scales=static_scales)
        self.prefill_chunk, self.prefill_tokens = prefill_chunk, prefill_tokens
        self.graphs = None
        if use_graphs:
            from lowbit.engine.cuda_graphs import GraphedDecode, default_batch_sizes

            sizes = [b for b in graph_batch_sizes or default_batch_sizes(slots) if b <= slots]
            self.graphs = GraphedDecode(model, self.cache, sizes, pad_slot=slots)
        self.num_slots = slots
        self._free = list(range(slots))[::-1]
        self._waiting: deque[_Request] = deque()
        self._prefilling: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._next_id = 0
        self._lock = threading.Lock()
        self._inbox: list[_Request] = []
        self._cancelled: set[int] = set()
        # rows of the greedy graph step(s) launched but not yet collected (GraphedDecode.launch)
        self._pending: list[_Request] = []
        self.prefill_warmup_s = 0.0
        if on_cuda if warm_prefill is None else warm_prefill:
            self._warm_up_prefill()

    @torch.inference_mode()
    def _warm_up_prefill(self) -> None:
        """One prefill forward of each ``prefill_warmup_shapes`` shape into the first slots (free until
        the first requests, which overwrite what this writes: a row attends only to positions it has
        written itself)."""
        t0 = time.perf_counter()
        vocab = self.model.config.vocab_size
        chunk = min(self.prefill_chunk, self.max_len - 1)
        for rows, T in prefill_warmup_shapes(chunk, self.prefill_tokens, self.num_slots):
            ids = torch.randint(0, vocab, (rows, T), device=self.device)
            pos = torch.arange(T, device=self.device)[None].expand(rows, T)
            self._forward(list(range(rows)), ids, pos, contiguous=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.prefill_warmup_s = time.perf_counter() - t0

    # ---- called from any thread ------------------------------------------------------------------
    def add(self, prompt: list[int], params: SamplingParams, *, request_id: int | None = None) -> int:
        """Queue a request; returns its id. Raises LowbitError if it can never fit.

        ``request_id``: keep an id given by an earlier engine (``unstarted`` of a failed one, re-queued
        in its ``rebuilt`` successor, whose own ids start past the old ones)."""
        self.check_prompt(prompt)
        max_new = min(params.max_new_tokens, self.max_len - len(prompt))
        gen = None if params.greedy else request_generator(self.device, params.seed)
        with self._lock:
            if request_id is None:
                request_id = self._take_id()
            req = _Request(request_id, list(prompt), params, max_new, gen)
            self._inbox.append(req)
        return req.id

    def check_prompt(self, prompt: list[int]) -> None:
        """Raise LowbitError if ``prompt`` can never run here (what ``add`` refuses)."""
        if not prompt:
            raise LowbitError("a prompt needs at least one token")
        if len(prompt) >= self.max_len:
            raise LowbitError(f"the prompt has {len(prompt)} tokens; this engine's context is {self.max_len}")

    def reserve_id(self) -> int:
        """A request id no request of this engine (or of its ``rebuilt`` successor) will get, for a
        request to ``add`` later under it: what a server hands out while the engine is being rebuilt."""
        with self._lock:
            return self._take_id()

    def continue_ids(self, after: Engine) -> None:
        """Give out only ids past every id ``after`` gave out or reserved."""
        with self._lock:
            self._next_id = max(self._next_id, after._next_id)

    def _take_id(self) -> int:
        rid, self._next_id = self._next_id, self._next_id + 1
        return rid

    def cancel(self, request_id: int) -> None:
        """Stop a request (queued or running); its slot is freed at the next step."""
        with self._lock:
            self._cancelled.add(request_id)

    def stats(self) -> EngineStats:
        """Requests and KV slots now (read without stopping the engine: a snapshot, not a transaction)."""
        with self._lock:
            inbox = len(self._inbox)
        return EngineStats(waiting=inbox + len(self._waiting), prefilling=len(self._prefilling),
                           running=len(self._running), slots_used=self.num_slots - len(self._free),
                           slots_total=self.num_slots)

    def rebuilt(self) -> Engine:
        """A new engine over the same model with the same settings: empty queues, every KV slot free,
        CUDA graphs captured again. What a server does after ``step`` raised (its state is then unknown).
        Its request ids continue this engine's, so that ``unstarted`` requests keep theirs."""
        new = Engine(self.model, **self._settings)
        new.continue_ids(self)
        return new

    def unstarted(self) -> list[tuple[int, list[int], SamplingParams]]:
        """(id, prompt, params) of the requests still queued: not admitted, nothing of them computed.
        After a failed ``step`` these are the requests that can be re-queued in a rebuilt engine."""
        with self._lock:
            queued = list(self._inbox)
        queued += [r for r in self._waiting if r.slot < 0 and r.prefilled == 0]
        return [(r.id, r.prompt, r.params) for r in queued]

    def close(self) -> None:
        """Drop every request, the KV cache and the CUDA graphs, so that their memory can go to a rebuilt
        engine; this engine cannot step again."""
        with self._lock:
            self._inbox.clear()
            self._cancelled.clear()
        self._waiting.clear()
        self._prefilling.clear()
        self._running.clear()
        self._pending = []
        self.graphs = None
        self.cache = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- the engine loop -------------------------------------------------------------------------
    @property
    def has_work(self) -> bool:
        with self._lock:
            inbox = bool(self._inbox)
        return inbox or bool(self._waiting or self._prefilling or self._running)

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        events: list[TokenEvent] = []
        with self._lock:
            self._waiting.extend(self._inbox)
            self._inbox.clear()
            cancelled, self._cancelled = self._cancelled, set()
        if self._pending and not cancelled and not self._waiting and not self._prefilling \
                and self._pending == self._running and all(len(r.generated) + 2 <= r.max_new for r in self._running):
            # the same batch again: the next step first, then the tokens of the one before it
            self.graphs.launch_next()
            return self._append_tokens(self._pending, self.graphs.collect())
        if self._pending:
            events += self._append_tokens(self._pending, self.graphs.collect())
            self._pending = []
        if cancelled:
            events += self._drop(cancelled)
        while self._waiting and self._free:  # admit
            req = self._waiting.popleft()
            req.slot = self._free.pop()
            self._prefilling.append(req)
        if self._prefilling:
            group = self._prefill_group()
            self._prefill_chunks(group)
            for req in group:
                if req.prefilled == len(req.prompt):
                    self._prefilling.remove(req)
                    self._running.append(req)
        ready = [r for r in self._running if r.last_logits is not None]
        if ready:
            events += self._emit(ready)
        decoding = [r for r in self._running if r.last_logits is None]
        if decoding:
            self._decode(decoding)
        return events

    def run(self) -> dict[int, tuple[list[int], FinishReason]]:
        """Step until every request ended; returns id -> (generated tokens without the stop token, reason)."""
        out: dict[int, tuple[list[int], FinishReason]] = {}
        tokens: dict[int, list[int]] = {}
        while self.has_work:
            for ev in self.step():
                if ev.token is not None and ev.finish_reason != "stop":
                    tokens.setdefault(ev.request_id, []).append(ev.token)
                if ev.finish_reason is not None:
                    out[ev.request_id] = (tokens.pop(ev.request_id, []), ev.finish_reason)
        return out

    # ---- internals -------------------------------------------------------------------------------
    def _drop(self, ids: set[int]) -> list[TokenEvent]:
        events = []
        for queue in (self._waiting, self._prefilling):
            for req in [r for r in queue if r.id in ids]:
                queue.remove(req)
                self._release(req)
                events.append(TokenEvent(req.id, None, "cancelled"))
        for req in [r for r in self._running if r.id in ids]:
            self._running.remove(req)
            self._release(req)
            events.append(TokenEvent(req.id, None, "cancelled"))
        return events

    def _release(self, req: _Request) -> None:
        if req.slot >= 0:
            self._free.append(req.slot)
            req.slot = -1

    def _forward(self, slots: list[int], ids: torch.Tensor, positions: torch.Tensor,
                 contiguous: bool = False) -> torch.Tensor:
        """Ragged forward: row b is slot slots[b], tokens ids[b] at positions[b] (B, T). Returns last logits (B, vocab).
        ``contiguous``: every row writes the same positions span - T .. span - 1 and attends to
        exactly those and its earlier ones (prefill chunks of equal start and length)."""
        slot_t = torch.tensor(slots, dtype=torch.long, device=self.device)
        if self.decode_kernel and positions.shape[1] == 1:  # the kernel limits each row to its own tokens
            self.cache.bind(slot_t, positions, kernel=True)
            return self.model(ids, positions, self.cache, 0, last_only=True)[:, -1]
        window = self.model.config.sliding_window
        if contiguous and (window is None or window >= self.max_len):
            # a prefill chunk: keys and values are views of the slot, and causality is SDPA's own
            # (lower-right aligned: the chunk's queries are the span's last T positions), so it runs
            # a fused flash / memory-efficient kernel instead of applying a (1, 1, T, S) bool mask
            from torch.nn.attention.bias import causal_lower_right

            span = self.cache.bind(slot_t, positions, contiguous=True, slot=slots[0] if len(slots) == 1 else None)
            T = positions.shape[1]
            return self.model(ids, positions, self.cache, span - T, mask=causal_lower_right(T, span),
                              last_only=True)[:, -1]
        span = self.cache.bind(slot_t, positions)
        k_pos = torch.arange(span, device=self.device)
        allowed = k_pos[None, None, :] <= positions[:, :, None]  # (B, T, S): each row's own history
        if window is not None:
            allowed &= positions[:, :, None] - k_pos[None, None, :] < window
        logits = self.model(ids, positions, self.cache, span - positions.shape[1], mask=allowed[:, None],
                            last_only=True)
        return logits[:, -1]

    def _chunk(self, req: _Request) -> tuple[int, int]:
        """(start, end) of ``req``'s next prefill chunk."""
        return req.prefilled, min(len(req.prompt), req.prefilled + self.prefill_chunk)

    def _prefill_group(self) -> list[_Request]:
        """The first prefilling request and those whose next chunk has the same start and length, in
        queue order, while the group holds at most ``prefill_tokens`` tokens."""
        first = self._prefilling[0]
        a, b = self._chunk(first)
        rows = max(1, self.prefill_tokens // (b - a))
        same = [r for r in self._prefilling if r is first or self._chunk(r) == (a, b)]
        return same[:rows]

    def _prefill_chunks(self, reqs: list[_Request]) -> None:
        """One forward over the next chunk of each of ``reqs`` (all at the same start and length)."""
        a, b = self._chunk(reqs[0])
        ids = torch.tensor([r.prompt[a:b] for r in reqs], dtype=torch.long, device=self.device)
        pos = torch.arange(a, b, device=self.device)[None].expand(len(reqs), b - a)
        logits = self._forward([r.slot for r in reqs], ids, pos, contiguous=True)
        for r, lg in zip(reqs, logits):
            r.prefilled = b
            if b == len(r.prompt):
                r.last_logits = lg

    def _decode(self, reqs: list[_Request]) -> None:
        slots = [r.slot for r in reqs]
        tokens = [r.generated[-1] for r in reqs]
        positions = [len(r.prompt) + len(r.generated) - 1 for r in reqs]
        if self.graphs is not None and len(reqs) <= self.graphs.max_batch and all(r.params.greedy for r in reqs):
            self.graphs.launch(slots, tokens, positions)  # tokens picked on the GPU, collected next step
            self._pending = list(reqs)
            return
        if self.graphs is not None:
            step = self.graphs.max_batch
            parts = []
            for i in range(0, len(reqs), step):
                out = self.graphs(slots[i:i + step], tokens[i:i + step], positions[i:i + step])
                # each call's logits are a view of its graph's output: copied when another call follows
                parts.append(out if len(reqs) <= step else out.clone())
            logits = parts[0] if len(parts) == 1 else torch.cat(parts)
        else:
            ids = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]
            pos = torch.tensor(positions, dtype=torch.long, device=self.device)[:, None]
            logits = self._forward(slots, ids, pos)
        for r, lg in zip(reqs, logits):
            r.last_logits = lg

    def _emit(self, reqs: list[_Request]) -> list[TokenEvent]:
        """Pick each request's next token from its logits; retire the ones that end."""
        greedy = [r for r in reqs if r.params.greedy]
        # one argmax and one device-to-host copy for every greedy row, not one per request
        picked = dict(zip((r.id for r in greedy), greedy_tokens(torch.stack([r.last_logits for r in greedy])).tolist())) \
            if greedy else {}
        tokens = [picked[r.id] if r.params.greedy else int(sample(r.last_logits[None], r.params, r.generator)[0])
                  for r in reqs]
        for r in reqs:
            r.last_logits = None
        return self._append_tokens(reqs, tokens)

    def _append_tokens(self, reqs: list[_Request], tokens: list[int]) -> list[TokenEvent]:
        """Each request's next token; retire the ones that end. Rows no longer running (ended or
        cancelled while their step was in flight) are skipped."""
        events = []
        for r, token in zip(reqs, tokens):
            if r not in self._running:
                continue
            r.generated.append(token)
            reason: FinishReason | None = None
            if token in r.params.stop_token_ids:
                reason = "stop"
            elif len(r.generated) >= r.max_new:
                reason = "length"
            events.append(TokenEvent(r.id, token, reason))
            if reason is not None:
                self._running.remove(r)
                self._release(r)
        return events
