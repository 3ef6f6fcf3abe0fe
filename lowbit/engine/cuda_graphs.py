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

The graphs share one memory pool and are captured largest first, after every size ran once eagerly
(Triton compiles, dispatch memoizes its choices, workspaces reach their size).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lowbit.engine.kv_cache import SlotKVCache
from lowbit.errors import LowbitError
from lowbit.model.llama import Transformer


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
        # rows: token ids, positions, cache slots; padding rows read and write position 0 of pad_slot
        self.inputs = torch.zeros(3, self.sizes[-1], dtype=torch.long, device=device)
        self.inputs[2] = pad_slot
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        with torch.inference_mode():
            stream = torch.cuda.Stream(device)
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
                    self.outputs[B] = self._step(B)
                self.graphs[B] = graph
            torch.cuda.synchronize(device)

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def _step(self, B: int) -> torch.Tensor:
        ids, pos, rows = self.inputs[0, :B, None], self.inputs[1, :B, None], self.inputs[2, :B]
        self.cache.bind(rows, pos, kernel=True)
        self.cache.splits = self.splits[B]
        return self.model(ids, pos, self.cache, 0, last_only=True)[:, -1]  # (B, vocab)

    def __call__(self, slots: Sequence[int], token_ids: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
        """Logits (b, vocab) of one new token per row: row i is token_ids[i] at positions[i] of slot slots[i].

        The result is a view of the graph's output, valid until the next call.
        """
        b = len(slots)
        if not 0 < b <= self.max_batch:
            raise LowbitError(f"a graphed decode step takes 1..{self.max_batch} rows, got {b}")
        B = next(s for s in self.sizes if s >= b)
        pad = B - b
        host = torch.tensor([list(token_ids) + [0] * pad, list(positions) + [0] * pad,
                             list(slots) + [self.pad_slot] * pad], dtype=torch.long)
        self.inputs[:, :B].copy_(host)
        self.graphs[B].replay()
        return self.outputs[B][:b]
