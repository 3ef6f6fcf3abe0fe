"""Launch a Triton kernel without the JIT's per-call work once it is compiled for this specialization.

``kernel[grid](*args, **kw)`` binds every argument, specializes it, hashes the specialization
with the options into a cache key and canonicalizes the grid on every call: measured on an H200's
host (``bench/host_time.py --profile``, 2026-12-02) that is most of the 80-190 us an eager lowbit
GEMM spent on the CPU, against ~8 us for the compiled launcher itself. ``triton_launch`` keys its own
cache on what Triton 3.x specializes on, computed in a few tuple operations:

- a tensor: its dtype and whether its address is 16-byte aligned (Triton's ``tt.divisibility=16``);
- an int: whether it is 1 (then a constexpr), divisible by 16, and which integer type it needs
  (i32, i64 or u64);
- a bool, None or any other object: the value itself (a finer key than Triton's, so still exact);
- a float: its type (passed as an fp32 runtime argument, never specialized);
- the keyword arguments (constexprs and options such as ``num_warps``) by value.

The first call with a new key goes through the JIT, which compiles (or finds) the kernel and
launches it; later calls hand the arguments straight to the compiled launcher. The key is at least
as fine as Triton's own, so the kernel launched is the one the JIT would pick. Where a profiler
hook is set (``triton.knobs.runtime.launch_enter_hook``, e.g. Proton) every call takes the JIT
path, which builds the metadata those hooks read; so does the CPU interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from lowbit.requirements import require_triton

require_triton()
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

_I32 = 1 << 31
_I64 = 1 << 63
_Tensor = torch.Tensor
_Parameter = torch.nn.Parameter


def cdiv(a: int, b: int) -> int:
    """Ceiling division of host ints. ``triton.cdiv`` is a constexpr function: on the host each call
    unwraps its arguments through Triton's language layer, 1-2 us apiece (bench/host_time.py)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The least power of two >= n, in plain Python (see ``cdiv``); 0 for n <= 0, as Triton's."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def _spec(a: object) -> object:
    """One argument's part of the key (``_key`` inlines the same rules for speed)."""
    return _key((a,))[0]


def _key(args: tuple) -> tuple:
    # one list comprehension: a function call per argument costs 3x as much on the host
    # (``isinstance`` against torch.Tensor goes through its metaclass: last, for subclasses only)
    return tuple([
        (a == 1, not a & 15, -_I32 <= a < _I32, a < _I64) if type(a) is int
        else (a.dtype, not a.data_ptr() & 15) if type(a) is _Tensor or type(a) is _Parameter
        else float if type(a) is float
        else (a.dtype, not a.data_ptr() & 15) if isinstance(a, _Tensor)
        else a
        for a in args
    ])


class _Compiled:
    """One compiled specialization: the launcher, its function handle and the constexpr tail."""

    __slots__ = ("run", "function", "metadata", "tail")

    def __init__(self, compiled, tail: tuple) -> None:  # noqa: ANN001
        self.run = compiled.run
        self.function = compiled.function
        self.metadata = compiled.packed_metadata
        self.tail = tail


# kernel -> {key: _Compiled | None}; None marks a specialization that always takes the JIT path
_CACHE: dict[object, dict[tuple, _Compiled | None]] = {}
_RECORD: list | None = None
_DRY = False
_JIT_ONLY: dict = {}


@contextmanager
def record_launches(launch: bool = True) -> Iterator[list]:
    """Collect ``(kernel, grid, args, kwargs)`` of every launch inside the block (``bench/host_time.py``
    times each one three ways; a test can see which kernels one call runs). ``launch=False``: record
    only, launch nothing (``scripts/kernel_ptx.py`` compiles what a wrapper would launch, for a GPU
    this machine need not have; outputs stay unwritten)."""
    global _RECORD, _DRY
    outer = _RECORD, _DRY
    _RECORD, _DRY = [], not launch
    try:
        yield _RECORD
    finally:
        _RECORD, _DRY = outer


def compiled_launcher(kernel, grid: tuple, args: tuple, kwargs: dict):  # noqa: ANN001, ANN201
    """A function of no arguments that launches this already-compiled specialization through its
    launcher alone: the floor ``triton_launch`` is measured against. None where it has no entry."""
    dev = torch._C._cuda_getDevice()
    hit = _CACHE.get(kernel, {}).get((dev, _key(args), tuple(kwargs.items())))
    if not hit:
        return None
    g = tuple(grid) + (1,) * (3 - len(grid))
    stream = torch._C._cuda_getCurrentRawStream(dev)
    return lambda: hit.run(*g, stream, hit.function, hit.metadata, None, None, None, *args, *hit.tail)


def _constexpr_tail(kernel, n_args: int, kwargs: dict) -> tuple | None:  # noqa: ANN001
    """Values for the kernel's parameters after the positional ones, in signature order, or None
    when one of them is a runtime parameter (the fast path passes only positional runtime args)."""
    rest = kernel.params[n_args:]
    if not all(p.is_constexpr for p in rest):
        return None
    # the compiled launcher parses a constexpr as an object and ignores it (its value is in the binary)
    return tuple(kwargs.get(p.name) for p in rest)


def _hooked() -> bool:
    """Whether a launch hook is installed. Triton 3.6 keeps an always-present, usually empty
    ``HookChain``; older releases hold None or the function."""
    hook = knobs.runtime.launch_enter_hook
    return hook is not None and bool(getattr(hook, "calls", True))


def triton_launch(kernel, grid: tuple, *args, **kwargs):  # noqa: ANN001, ANN201
    """``kernel[grid](*args, **kwargs)``, with the per-call work done once per specialization.

    ``grid``: a tuple of 1-3 ints. Runtime arguments go positionally, constexprs and launch
    options (``num_warps``, ``num_stages``, ``launch_pdl``) by keyword.
    """
    if torch.compiler.is_compiling():  # Dynamo traces ``kernel[grid](...)`` into the graph itself
        return kernel[grid](*args, **kwargs)
    if _RECORD is not None:
        _RECORD.append((kernel, grid, args, kwargs))
        if _DRY:
            return None
    entries = _CACHE.get(kernel)
    if entries is None:
        # under TRITON_INTERPRET=1 ``triton.jit`` made an InterpretedFunction: no compiled launcher
        entries = _CACHE[kernel] = {} if isinstance(kernel, JITFunction) else _JIT_ONLY
    if entries is _JIT_ONLY or _hooked():
        return kernel[grid](*args, **kwargs)
    # a compiled kernel's function handle belongs to one device's context: the device is in the key
    dev = torch._C._cuda_getDevice()
    key = (dev, _key(args), tuple(kwargs.items()))
    try:
        hit = entries.get(key, False)
    except TypeError:  # an unhashable keyword value: this call site keeps the JIT's own binding
        return kernel[grid](*args, **kwargs)
    if hit:
        g = len(grid)
        stream = torch._C._cuda_getCurrentRawStream(dev)
        hit.run(grid[0], grid[1] if g > 1 else 1, grid[2] if g > 2 else 1, stream, hit.function, hit.metadata,
                None, None, None, *args, *hit.tail)
        return None
    compiled = kernel[grid](*args, **kwargs)
    if hit is False:
        tail = _constexpr_tail(kernel, len(args), kwargs)
        entries[key] = _Compiled(compiled, tail) if tail is not None and compiled is not None else None
    return None


def cached_specializations(kernel) -> int:  # noqa: ANN001
    """How many specializations of ``kernel`` ``triton_launch`` holds (tests and diagnostics)."""
    return sum(1 for v in _CACHE.get(kernel, {}).values() if v is not None)


__all__ = ["cdiv", "next_power_of_2", "triton_launch", "cached_specializations", "compiled_launcher",
           "record_launches", "triton"]
