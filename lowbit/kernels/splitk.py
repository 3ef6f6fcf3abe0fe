"""Split-K in one launch: fp32 partial sums meet in a persistent workspace, the last program writes.

A small-M GEMM has few (M, N) output tiles, so the K loop is split over ``split_k`` programs per
tile to keep every SM streaming weights (kernels v2, docs/kernels-notes.md). Each program adds its
fp32 partial sum into ``workspace`` by atomic add and then bumps the tile's counter in ``locks``;
the program that arrives last reads the sum back (an atomic add of 0, served by L2), zeroes it, writes the
output in its dtype and resets the counter. The workspace and counters are therefore zero again
after every launch, so they are allocated once per device and reused, with no memset or cast kernel
around the GEMM (two launches fewer than "zero a buffer, atomically add, cast").

Kernels on one stream run one after another, so one workspace per device is enough. Allocate it
before capturing a CUDA graph (``reserve``), so the captured kernels point at memory that outlives
the capture.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_WORKSPACES: dict[tuple[str, int | None], tuple[torch.Tensor, torch.Tensor]] = {}
# Workspaces replaced by larger ones are kept, not freed: a CUDA graph captured earlier still points at them.
_RETIRED: list[tuple[torch.Tensor, torch.Tensor]] = []


def reserve(device: torch.device, elements: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The device's (workspace fp32 (>= elements,), locks int32 (>= tiles,)), zeroed, grown as needed."""
    key = (device.type, device.index)
    ws, locks = _WORKSPACES.get(key, (None, None))
    if ws is None or ws.numel() < elements or locks.numel() < tiles:
        if ws is not None:
            _RETIRED.append((ws, locks))
        size = max(elements, 0 if ws is None else ws.numel(), 1 << 16)
        n_locks = max(tiles, 0 if locks is None else locks.numel(), 1 << 12)
        ws = torch.zeros(size, dtype=torch.float32, device=device)
        locks = torch.zeros(n_locks, dtype=torch.int32, device=device)
        _WORKSPACES[key] = (ws, locks)
    return ws, locks


@triton.jit
def finish(acc, extra, y_ptrs, ws_ptrs, mask, lock_ptr, SPLIT_K: tl.constexpr):
    """Write ``acc + extra`` (``extra``: bias or 0, added once) to ``y_ptrs``, reducing split-K partials first."""
    if SPLIT_K == 1:
        tl.store(y_ptrs, (acc + extra).to(y_ptrs.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(ws_ptrs, acc, mask=mask, sem="relaxed")
        # every thread's partial sums are performed before one thread publishes the arrival
        tl.debug_barrier()
        count = tl.atomic_add(lock_ptr, 1, sem="acq_rel")
        if count == SPLIT_K - 1:
            # read the sum at L2 (an atomic add of 0: never a stale L1 line), then leave zeros behind
            total = tl.atomic_add(ws_ptrs, tl.zeros_like(acc), mask=mask, sem="relaxed")
            tl.store(ws_ptrs, tl.zeros_like(acc), mask=mask)
            tl.store(y_ptrs, (total + extra).to(y_ptrs.dtype.element_ty), mask=mask)
            tl.store(lock_ptr, 0)


@triton.jit
def store_tile(acc, rm, rn, M, N, b_ptr, y_ptr, ws_ptr, lock_ptr, stride_ym,
               HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """The GEMM kernels' common epilogue: ``acc`` (BLOCK_M, BLOCK_N) fp32, already scaled, for rows
    ``rm`` and columns ``rn`` of y (M, N); the bias (N,) added once (``HAS_BIAS``), rows and columns
    past M, N left alone, split-K partials reduced by ``finish`` with this (pid_m, pid_n) tile's lock."""
    n_ok = rn < N
    extra = 0.0
    if HAS_BIAS:
        extra = tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = rm[:, None] * stride_ym + rn[None, :]
    finish(acc, extra, y_ptr + out, ws_ptr + out, (rm[:, None] < M) & n_ok[None, :],
           lock_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), SPLIT_K)
