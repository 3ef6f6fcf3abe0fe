"""Decode steps replayed from CUDA graphs: one captured graph per batch size.

A decode step of a 7-8B model launches ~1000 kernels (GEMMs, norms, rotary, cache writes,
attention), each a few microseconds of CPU time in eager PyTorch, while the GPU needs only
milliseconds for the whole step at small batch: eager decode is launch-bound. A CUDA graph replays
the recorded launches with one call. It needs fixed shapes and addresses, so:
- the step's inputs (token ids, positions, cache slots) live in static tensors, filled before replay;
- a batch of ``b`` rows runs the graph of the smallest captured size ``B >= b``; the ``B - b``
  padding rows write to a spare cache slot (``pad_slot``) that no request owns;
- attention runs the decode kernel over the ``SlotKVCache`` in place, with a split count fixed per
  size (``splits_for``), so nothing reads the GPU from the host inside the step.

Greedy decoding also runs without the host between steps. Each graph ends with the greedy tokens
(``greedy_tokens``) written over its own input ids, and each real row's position advanced by one,
so the next replay continues the sequences by itself (``launch_next``). The tokens travel to pinned
host memory asynchronously (``collect`` waits for one step's). A serving loop then enqueues step
i + 1 before it reads step i's tokens, and the GPU never waits for Python: measured on the H100 at
batch 1 (bench/profile_decode.py), the host's part of a step (argmax launches, reading the tokens,
building the next inputs) was 120-380 us of idle GPU per step, 5-13% of a 4-bit Llama-3-8B step.

The graphs share one memory pool and are captured largest first, after every size ran once eagerly
(Triton compiles, dispatch memoizes its choices, workspaces reach their size).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch

from lowbit.model.kv_cache import SlotKVCache
from lowbit.errors import LowbitError
from lowbit.model.llama import Transformer


@lru_cache(maxsize=None)
def _warmup_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for every engine's warm-up. PyTorch keeps a cuBLAS workspace (32 MiB
    on Hopper) for each stream that ever ran a cuBLAS call, for the life of the process: a new stream
    per engine leaked one workspace at every engine rebuild (measured on the H200: +33.5 MB each)."""
    return torch.cuda.Stream(device)


def default_batch_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, ... up to ``max_batch`` (included): at most 2x padding, few graphs to capture."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch]


class GraphedDecode:
    """``model``'s one-token decode step over ``cache``, captured for each of ``batch_sizes``."""

    def __init__(self, model: Transformer, cache: SlotKVCache, batch_sizes: Sequence[int], pad_slot: int) -> None:
        device = cache.keys.device
        if device.type != "cuda":
            raise LowbitError("CUDA graphs need the model and its KV cache on a CUDA device")
        if not 0 <= pad_slot < cache.slots:
            raise LowbitError(f"pad_slot {pad_slot} is not a slot of the cache (0..{cache.slots - 1})")
        self.model, self.cache, self.pad_slot = model, cache, pad_slot
        self.sizes = sorted(set(batch_sizes))
        if not self.sizes or self.sizes[0] < 1:
            raise LowbitError(f"batch sizes must be >= 1, got {list(batch_sizes)}")
        from lowbit.kernels.attention import splits_for

        sms = torch.cuda.get_device_properties(device).multi_processor_count
        heads = model.config.num_kv_heads
        self.splits = {B: splits_for(B, heads, cache.max_len, sms) for B in self.sizes}
        # rows: token ids, positions, cache slots, and the step each position advances after a replay
        # (1 for real rows; padding rows read and write position 0 of pad_slot, always)
        self.inputs = torch.zeros(4, self.sizes[-1], dtype=torch.long, device=device)
        self.inputs[2] = pad_slot
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.next_tokens: dict[int, torch.Tensor] = {}  # per size: (B,) int64 greedy tokens of the last replay
        # greedy tokens on their way to the host: two pinned buffers, so step i + 1 copies while step i is read
        self._host = torch.zeros(2, self.sizes[-1], dtype=torch.long, pin_memory=True)
        self._inflight: list[tuple[torch.cuda.Event, int, int]] = []  # (copied, buffer, rows), oldest first
        self._copies = 0
        self._last: tuple[int, int] | None = None  # (graph size, rows) of the last launch
        with torch.inference_mode():
            stream = _warmup_stream(device)  # the cache's device: "cuda:N", with its index
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for B in self.sizes:  # warm-up (capture may not compile or allocate workspaces)
                    self._step(B)
            torch.cuda.current_stream(device).wait_stream(stream)
            torch.cuda.synchronize(device)
            pool = torch.cuda.graph_pool_handle()
            for B in reversed(self.sizes):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[B], self.next_tokens[B] = self._step(B)
                self.graphs[B] = graph
            torch.cuda.synchronize(device)

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def _step(self, B: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One captured step: (logits (B, vocab), greedy tokens (B,)); the tokens and the advanced
        positions become the inputs of the next replay (module docstring)."""
        from lowbit.engine.sampling import greedy_tokens

        ids, pos, rows = self.inputs[0, :B, None], self.inputs[1, :B, None], self.inputs[2, :B]
        self.cache.bind(rows, pos, kernel=True)
        self.cache.splits = self.splits[B]
        logits = self.model(ids, pos, self.cache, 0, last_only=True)[:, -1]
        tokens = greedy_tokens(logits)
        self.inputs[0, :B].copy_(tokens)
        self.inputs[1, :B].add_(self.inputs[3, :B])
        return logits, tokens

    def __call__(self, slots: Sequence[int], token_ids: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
        """Logits (b, vocab) of one new token per row: row i is token_ids[i] at positions[i] of slot slots[i].

        The result is a view of the graph's output, valid until the next call.
        """
        B, b = self._replay_from_host(slots, token_ids, positions)
        return self.outputs[B][:b]

    def _replay_from_host(self, slots: Sequence[int], token_ids: Sequence[int],
                          positions: Sequence[int]) -> tuple[int, int]:
        b = len(slots)
        if not 0 < b <= self.max_batch or len(token_ids) != b or len(positions) != b:
            raise LowbitError(f"a graphed decode step takes 1..{self.max_batch} rows (one token id, position and "
                              f"slot each), got {b} slots, {len(token_ids)} tokens, {len(positions)} positions")
        B = next(s for s in self.sizes if s >= b)
        pad = B - b
        host = torch.tensor([list(token_ids) + [0] * pad, list(positions) + [0] * pad,
                             list(slots) + [self.pad_slot] * pad, [1] * b + [0] * pad], dtype=torch.long)
        self.inputs[:, :B].copy_(host)
        self.graphs[B].replay()
        self._last = (B, b)
        return B, b

    def launch(self, slots: Sequence[int], token_ids: Sequence[int], positions: Sequence[int]) -> None:
        """Enqueue one greedy step from host inputs (as ``__call__``); its tokens come from ``collect``."""
        self._replay_from_host(slots, token_ids, positions)
        self._copy_tokens()

    def launch_next(self) -> None:
        """Enqueue the next greedy step of the rows of the last launch, each at its next position, fed
        with the tokens of the step before it on the GPU (no host input). The caller guarantees that
        every row's next position is inside the cache (``max_len``)."""
        if self._last is None:
            raise LowbitError("launch_next continues a launch: call launch first")
        self.graphs[self._last[0]].replay()
        self._copy_tokens()

    def _copy_tokens(self) -> None:
        B, b = self._last
        if len(self._inflight) == len(self._host):
            raise LowbitError("two greedy steps are already in flight: collect one first")
        buf = self._copies % len(self._host)
        self._copies += 1
        self._host[buf, :b].copy_(self.next_tokens[B][:b], non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self._inflight.append((done, buf, b))

    def collect(self) -> list[int]:
        """The greedy tokens of the oldest launched step not yet collected (waits for that step only)."""
        if not self._inflight:
            raise LowbitError("no launched greedy step to collect")
        done, buf, b = self._inflight.pop(0)
        done.synchronize()
        return self._host[buf, :b].tolist()

