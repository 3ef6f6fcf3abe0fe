"""Programmatic dependent launch (PDL): let a decode step's next kernel start before this one ends.

At batch 1 a Llama decode step is ~470 kernels, most of them small: a norm or a SiLU-gate runs on
one SM for 3-8 us while the other SMs and the memory system idle, and each int4 GEMM then pays its
own launch and first-load latency (5-7 us of fixed cost on an 8 MB layer: docs/engine.md). Hopper
(sm_90) can overlap them: a kernel launched with the *programmatic stream serialization* attribute
may start as soon as every program of the kernel before it has executed ``griddepcontrol.launch_dependents``
(or exited), and it must execute ``griddepcontrol.wait`` (which returns once that kernel has completed
and its writes are visible) before it reads anything that kernel wrote. CUDA graphs keep the edge.

How lowbit uses it (the Triton kernels of the decode path, ``launch_pdl`` when ``enabled``):
- *Small kernels* (norm, SiLU-gate, rotary + KV write, attention, activation quantization) call
  ``launch_dependents`` first, then ``wait``, then work: the kernel after them is launched and
  resident while they run, so its launch latency is hidden.
- *GEMMs* only ``wait`` at their start and trigger their dependents by exiting, so at most the small
  kernels after a GEMM, never the next GEMM, wait ahead of it.
- Torch kernels (cuBLAS, index ops) launch normally: the chain simply restarts after them.

Measured (H100, Llama-3-8B shape, W4A8, batch 1, graphed decode; docs/engine.md): 3.23 -> 2.97 ms
per step. Two variants measured no better and were dropped: GEMMs prefetching their weight tiles into
L2 before ``wait`` (24 MB budget: 3.01 ms; 48 MB: 3.07 ms; the int4 GEMMs are issue-bound, not
waiting on DRAM) and GEMMs triggering their dependents right after ``wait`` (3.18 ms: the next
GEMM's programs then wait resident beside the running one).

Ordering stays exact: ``wait`` in kernel i+1 returns only when kernel i has completed, and kernel i
completes only after its own ``wait``, so every kernel sees all earlier kernels' writes.

``enabled`` is False off CUDA, in Triton's interpreter, before sm_90, and with ``LOWBIT_PDL=0``;
the kernels then compile without the instructions (the ``PDL`` constexpr) and launch as before.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch
import triton
import triton.language as tl

from lowbit.requirements import require_triton

require_triton()  # before the import below, which an older Triton fails with a bare ImportError
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: E402


@lru_cache(maxsize=8)
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def enabled(device: torch.device) -> bool:
    """Whether kernels on ``device`` launch with PDL (see the module docstring)."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get("LOWBIT_PDL") == "0":
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


def launch_options(device: torch.device) -> dict:
    """Keyword arguments for ``kernel[grid](...)``: the ``PDL`` constexpr and, when on, ``launch_pdl``."""
    on = enabled(device)
    return {"PDL": on, "launch_pdl": True} if on else {"PDL": False}


@triton.jit
def start_small(PDL: tl.constexpr):
    """A small kernel's first step under PDL: let the next kernel launch, then wait for the previous one."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()


@triton.jit
def wait(PDL: tl.constexpr):
    """``griddepcontrol.wait`` under PDL: the kernel before has completed and its writes are visible."""
    if PDL:
        gdc_wait()
