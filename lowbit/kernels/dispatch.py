"""Which kernel runs a quantized GEMM, for a given (op, M, N, K, GPU): a tuned table kept as data.

Hardware facts this file acts on (measured: ../shared/PERF.md, docs/kernels.md):
- Hopper (sm_90) has no int4 tensor cores: ``mma.sync`` s4 runs at 52 TOPS (emulated, two IMMA.S8
  per s4 MMA in SASS) against 1194 TOPS for s8. So no path here runs a 4-bit MMA: 4-bit weights (and
  the 4-bit activations of W4A4 and W4Ax) are widened in registers and the MMA is 16-bit (W4A16,
  2:4-sparse W4A16) or 8-bit (W4A8, W8A8, W4A4, W4Ax).
- FP8 tensor cores exist from sm_89 (Ada, Hopper); fp8 paths refuse older GPUs.
- At small M every GEMM is bound by the bytes of its weights, so W4 paths win ~3-4x there; at large
  M it is bound by MMA throughput, where 8-bit MMAs run at twice the 16-bit rate. The same int4
  weights therefore serve a W4A8 scheme through whichever kernel the table says is fastest at that M.

The table (``lowbit/kernels/tuned/<gpu>.json``, written by ``bench/tune_kernels.py`` on that GPU)
lists, per op and tuned (N, K, M), the fastest kernel and its ``TileConfig`` (a ``CutlassConfig`` for
the CUTLASS kernels), and the int4 weight order each shape's layers are packed in (``weight_order``:
one for the op, or one per tuned shape, picked by the tuner with ``pick_weight_orders``). A layer
holds one order (its memory is the point), so its entries are looked up among those of its order. A lookup takes the
tuned shape nearest in log N and log K, then the smallest tuned M >= M (the largest if none; none
at all past 4x the largest). GPUs
without a table get ``default_choice``, a heuristic that is correct everywhere and fast on Hopper.
The QUIK W4A4, COMET W4Ax and 2:4-sparse ops (``UNTUNED_OPS``) are tuned in the H100 table only (at
M = 1 and 16 on the 8B/70B layers; W4A4 and W4Ax also at 64-4096 and 2:4 at 64 and 256 on four of
them), not in the H200 one: elsewhere they get ``default_choice`` (for W4Ax and 2:4 the kernel
module's own ``default_config`` or, at large M, their cuBLAS path), as does any M more than 4x the
largest M a table tuned for the nearest shape.
On the CPU, ``lowbit.model.qlinear`` keeps its PyTorch reference path and never comes here.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.kernels.config import CutlassConfig, TileConfig

TUNED_DIR = Path(__file__).with_name("tuned")
OPS = ("w4a16", "w4a8", "w4a8-g128", "w4a8-fp8", "w8a8-int8", "w8a8-fp8", "w4a4", "w4ax", "w4a16-2:4")
# ops the shipped tables cover partly (small M, H100) or not at all: default_choice for the rest
UNTUNED_OPS = ("w4a4", "w4ax", "w4a16-2:4")
# kernels each op may be run by
KERNELS = {
    # wgmma: lowbit.kernels.mixed_wgmma on FragmentInt4 weights (Hopper; tables with weight_order
    # "fragment" for w4a16 name it, the fragment GEMV (lowbit.kernels.gemv_frag) at 1..4 rows, or
    # dequant-cublas, at every M); cutlass: lowbit.kernels.cutlass_w4a16 on CutlassInt4 weights (Hopper;
    # weight_order "cutlass")
    "w4a16": ("triton", "dequant-cublas", "wgmma", "gemv", "cutlass"),
    # gemv: lowbit.kernels.gemv (dp4a, no tensor cores) for 1..4 rows of int8 activations, per channel
    # cutlass (w4a8, w4a8-fp8): lowbit.kernels.cutlass_w4a8 on CutlassInt4PerChannel weights (Hopper;
    # weight_order "cutlass")
    "w4a8": ("triton", "gemv", "w4a16-fakequant", "widen-w8a8", "dequant-cublas", "cutlass"),
    "w4a8-g128": ("triton", "w4a16-fakequant", "dequant-cublas"),
    "w4a8-fp8": ("triton", "cutlass"),
    "w8a8-int8": ("triton", "cublas"),
    "w8a8-fp8": ("triton", "cublas"),
    "w4a4": ("triton",),  # lowbit.kernels.w4a4: split_quantize + the W4A4 GEMM (QUIK)
    # lowbit.kernels.w4ax: quantize_mixed + the W4Ax GEMM (COMET); large M: lowbit.kernels.w4ax_dequant
    "w4ax": ("triton", "dequant-cublas"),
    "w4a16-2:4": ("triton", "dequant-cublas"),  # lowbit.kernels.sparse24; large M: widened once, cuBLAS
}
# the packed tile of ops whose layout default is not lowbit.kernels.layout.TILE_K: the 2:4 kernel's
# TILE_K (a half tile of 128 columns is one group-128 scale group); kept here so that asking for a
# layout never imports a Triton module
_DEFAULT_TILE = {"w4a16-2:4": 256}


@dataclass(frozen=True)
class Choice:
    kernel: str  # one of KERNELS[op]
    config: TileConfig | CutlassConfig | None = None  # None for cuBLAS; CutlassConfig for "cutlass"

    def config_str(self) -> str:
        c = self.config
        if c is None:
            return ""
        if isinstance(c, CutlassConfig):
            return c.label()
        return (f"bm{c.block_m} bn{c.block_n} bk{c.block_k} sk{c.split_k} w{c.num_warps} s{c.num_stages}"
                + (" swap" if c.swap else ""))


def table_key(gpu_name: str) -> str | None:
    """'NVIDIA H200' -> 'h200'; the longest known key contained in the name, or None.

    ``$LOWBIT_KERNEL_TABLE`` (a JSON file from bench/tune_kernels.py) overrides the shipped tables.
    """
    if os.environ.get("LOWBIT_KERNEL_TABLE"):
        return os.environ["LOWBIT_KERNEL_TABLE"]
    return next((k for k in _shipped_keys() if k.upper() in gpu_name.upper()), None)


@lru_cache(maxsize=1)
def _shipped_keys() -> tuple[str, ...]:
    """Names of the shipped tables, longest first (read once: dispatch runs on every GEMM call)."""
    return tuple(sorted((p.stem for p in TUNED_DIR.glob("*.json")), key=len, reverse=True))


@lru_cache(maxsize=8)
def load_table(key: str) -> dict:
    path = Path(key) if key.endswith(".json") else TUNED_DIR / f"{key}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LowbitError(f"cannot read the tuned kernel table {path}: {exc}") from exc


@lru_cache(maxsize=8)
def _device_info(index: int) -> tuple[str, int, tuple[int, int]]:
    p = torch.cuda.get_device_properties(index)
    return p.name, p.multi_processor_count, (p.major, p.minor)


def _device_table(device: torch.device) -> tuple[str, int, tuple[int, int], dict]:
    """(GPU name, SM count, compute capability, its tuned table or {}) for a CUDA device."""
    name, sms, cap = _device_info(device.index if device.index is not None else torch.cuda.current_device())
    key = table_key(name)
    return name, sms, cap, load_table(key) if key is not None else {}


def lookup_entry(entries: list[dict], M: int, N: int, K: int) -> dict | None:
    """The table entry of one op that serves (M, N, K): the tuned shape nearest in log N + log K, then
    its smallest tuned M >= M (its largest, up to 4x past it); None beyond, or without entries."""
    if not entries:
        return None
    dist = lambda e: _shape_distance(e, N, K)  # noqa: E731
    best = min(dist(e) for e in entries)
    near = sorted((e for e in entries if dist(e) == best), key=lambda e: e["M"])
    if M > 4 * near[-1]["M"]:
        # far beyond the tuned range (a table tuned at small M only): a small-M tile (split-K, 16 rows)
        # would be the worst choice there; default_choice's large tiles are what the tuner picks
        return None
    return next((e for e in near if e["M"] >= M), near[-1])


def layout_tile(device: torch.device, op: str) -> int:
    """The int4 layout tile (``PackedInt4.tile_k``) this GPU's table tuned ``op`` with (default 128).

    The layout is fixed when a layer is loaded, so it is chosen per op: W4A8 with per-channel scales
    measured ~12% faster at small M with 256-wide tiles on the H200, W4A16 slower (docs/kernels.md).
    Ops the table does not list get their layout's default (256 for ``sparse24``).
    """
    from lowbit.kernels.layout import TILE_K

    default = _DEFAULT_TILE.get(op, TILE_K)
    if device.type != "cuda":
        return default
    return int(_device_table(device)[3].get("tile_k", {}).get(op, default))


# the int4 weight orders a table may name per op (``weight_order``): PackedInt4's rows, FragmentInt4 for
# the Gluon wgmma kernel, CutlassInt4 for the CUTLASS kernels
WEIGHT_ORDERS = ("rows", "fragment", "cutlass")


def _shape_distance(e: dict, N: int, K: int) -> float:
    return abs(math.log2(e["N"] / N)) + abs(math.log2(e["K"] / K))


def _op_orders(table: dict, op: str) -> tuple[str, list[dict]]:
    """(the op's default weight order, its per-shape orders [{"N", "K", "order"}]) from a table whose
    ``weight_order[op]`` is one order for every shape (a string) or ``{"default": .., "shapes": [..]}``."""
    spec = table.get("weight_order", {}).get(op, "rows")
    default, shapes = (spec, []) if isinstance(spec, str) else (spec.get("default", "rows"), spec.get("shapes", []))
    for order in [default] + [sh["order"] for sh in shapes]:
        if order not in WEIGHT_ORDERS:
            raise LowbitError(f"the tuned kernel table names weight order {order!r} for {op}; known: "
                              f"{', '.join(WEIGHT_ORDERS)}")
    return default, shapes


# The batch sizes a weight order is picked for (``LOWBIT_WORKLOAD``): a layer holds one order, and on
# the H200 the order fastest at decode batches of 1-16 is not the one fastest from 64 on for every
# layer (docs/kernels.md). "balanced" takes every tuned M alike (what the tuner records per shape).
WORKLOADS = {"balanced": (1, 1 << 30), "latency": (1, 16), "throughput": (64, 1 << 30)}
WORKLOAD_ENV = "LOWBIT_WORKLOAD"


def workload() -> str:
    """``$LOWBIT_WORKLOAD`` (default "balanced"), checked."""
    w = os.environ.get(WORKLOAD_ENV, "balanced") or "balanced"
    if w not in WORKLOADS:
        raise LowbitError(f"{WORKLOAD_ENV}={w!r}: use one of {', '.join(WORKLOADS)} (the batch sizes the int4 "
                          "weight order of each layer is chosen for: 1-16, 64 and up, or all)")
    return w


def table_order(table: dict, op: str, N: int | None = None, K: int | None = None,
                workload: str = "balanced") -> str:
    """The weight order ``table`` packs ``op``'s N x K layers in: for "balanced", the order recorded for
    the tuned shape nearest (N, K) (as entries are looked up), else the op's default order; for
    "latency" / "throughput", the order ``pick_weight_orders`` picks from that shape's entries at the
    workload's batch sizes (``WORKLOADS``), where the table has entries of more than one order there."""
    default, shapes = _op_orders(table, op)
    if N is None or K is None:
        return default
    if workload != "balanced":
        entries = table.get("entries", {}).get(op, [])
        if entries:
            near = min(_shape_distance(e, N, K) for e in entries)
            lo, hi = WORKLOADS[workload]
            here = [{**e, "order": e.get("order", default)} for e in entries
                    if _shape_distance(e, N, K) == near and lo <= e["M"] <= hi]
            if len({e["order"] for e in here}) > 1:
                return next(iter(pick_weight_orders(here).values()))
    if not shapes:
        return default
    return min(shapes, key=lambda sh: _shape_distance(sh, N, K))["order"]


def weight_order(device: torch.device, op: str, N: int | None = None, K: int | None = None) -> str:
    """The int4 weight order this GPU's table packs ``op``'s N x K layers in, for ``$LOWBIT_WORKLOAD``:
    "rows" (PackedInt4, every kernel), "fragment" (FragmentInt4, the wgmma kernel and dequant-cublas
    only) or "cutlass" (CutlassInt4, the CUTLASS kernels only). Fixed when a layer is loaded, like
    ``layout_tile``; "rows" without a table or on the CPU."""
    if device.type != "cuda":
        return "rows"
    return table_order(_device_table(device)[3], op, N, K, workload())


def order_entries(table: dict, op: str, order: str) -> list[dict]:
    """The entries of ``op`` tuned on weights in ``order`` (an entry without ``"order"`` has the op's
    default order)."""
    default, _ = _op_orders(table, op)
    return [e for e in table.get("entries", {}).get(op, []) if e.get("order", default) == order]


def pick_weight_orders(entries: list[dict]) -> dict[tuple[int, int], str]:
    """For each tuned (N, K) of one op, the weight order to pack its layers in, from entries of several
    orders at the same batch sizes: the order whose time over the best order's, multiplied over the
    batch sizes every order was tuned at, is least (a geometric mean: M = 1 and M = 4096 count alike).
    Times of orders tuned in different runs are compared as measured, not over each run's fp16
    baseline: on the H200 two runs' baselines differed by 11% at one cell (70B gate+up, M = 1: 240.8
    against 214 us) where the kernels' own times repeated within 1-2%. Ties go to the first name."""
    by_shape: dict[tuple[int, int], dict[str, dict[int, float]]] = {}
    for e in entries:
        t = e["us"]
        by_shape.setdefault((e["N"], e["K"]), {}).setdefault(e.get("order", "rows"), {})[e["M"]] = t
    out = {}
    for shape, orders in by_shape.items():
        ms = set.intersection(*(set(t) for t in orders.values()))
        if not ms:
            raise LowbitError(f"weight orders {sorted(orders)} at N={shape[0]} K={shape[1]} share no batch size")
        best = {m: min(t[m] for t in orders.values()) for m in ms}
        cost = {o: sum(math.log(t[m] / best[m]) for m in ms) for o, t in orders.items()}
        out[shape] = min(sorted(cost), key=lambda o: cost[o])
    return out


def default_choice(op: str, M: int, N: int, K: int, sms: int) -> Choice:
    """Heuristic for GPUs without a tuned table: swapped split-K tiles at small M, big tiles above.

    W4Ax and 2:4 take their kernel module's ``default_config`` (pure functions of the shape and the SM
    count): W4Ax caps split-K at its number of 128-blocks and uses 64 x 128 tiles at large M (what the
    H100 table picks for W4A8 g128, whose per-group int32 partial is the same), 2:4 caps split-K at
    its number of 256-column tiles. W4A4's own default (``lowbit.kernels.w4a4.default_config``) is
    this heuristic.
    """
    if op == "w4ax":
        from lowbit.kernels.w4ax import BLOCK
        from lowbit.kernels.w4ax import default_config as w4ax_config

        if M >= 1024:
            # measured on the H100 (docs/kernels.md): from M = 1024 the per-block epilogue makes the
            # W4Ax kernel 1.3-1.7x slower than fake-quantized activations on cuBLAS (w4ax_dequant)
            return Choice("dequant-cublas")
        return Choice("triton", w4ax_config(M, N, -(-K // BLOCK), sms))
    if op == "w4a16-2:4":
        from lowbit.kernels.sparse24 import default_config as sparse24_config

        if M >= 128:
            # measured on the H100 (docs/kernels.md): the fused kernel falls to 0.2-0.35x of fp16 from
            # M = 256, where widening the weights once and running cuBLAS fp16 costs little more than fp16
            return Choice("dequant-cublas")

        # its split cap uses the default tile (256): with 128-wide tiles it only leaves splits unused
        return Choice("triton", sparse24_config(M, N, K, sms))
    if op == "w4a8" and M == 1:
        # measured on the H100 and H200 at every Llama-3 8B/70B shape (docs/kernels.md): the dp4a GEMV
        # beats the tensor-core kernel at one row by 1.08-1.34x in the same tuning run
        from lowbit.kernels.gemv import default_gemv_config

        return Choice("gemv", default_gemv_config(N, K, sms))
    if M <= 64:
        block_n = 64 if M <= 16 else 128
        tiles = math.ceil(N / block_n)
        split = max(1, min(16, round(2 * sms / tiles)))
        return Choice("triton", TileConfig(block_m=max(16, 1 << (M - 1).bit_length()), block_n=block_n,
                                           split_k=split, num_warps=4, num_stages=4, swap=True))
    if op.startswith("w8a8"):
        return Choice("cublas")
    return Choice("triton", TileConfig(block_m=128, block_n=128, block_k=128, num_warps=8, num_stages=3))


def slower_than_fp16(table: dict) -> list[str]:
    """The entries of a tuned table whose kernel ran slower than cuBLAS fp16 at the same shape in the
    same tuning run (``fp16_us``, recorded by bench/tune_kernels.py since issue 18), one line each.
    Entries of older tables carry no baseline and are not judged; neither are those of a weight order
    the table does not pack their shape in (kept for layers the chosen order's kernels refuse)."""
    out = []
    for op, entries in table.get("entries", {}).items():
        default, _ = _op_orders(table, op)
        for e in entries:
            if e.get("order", default) != table_order(table, op, e["N"], e["K"]):
                continue
            if e.get("fp16_us") is not None and e["us"] > e["fp16_us"]:
                out.append(f"{op} N={e['N']} K={e['K']} M={e['M']}: {e['kernel']} {e['us']} us > fp16 "
                           f"{e['fp16_us']} us ({e['fp16_us'] / e['us']:.2f}x)")
    return out


def entry_choice(e: dict) -> Choice:
    """The Choice a table entry names (its config a CutlassConfig for the "cutlass" kernel)."""
    cfg = e.get("config")
    if not cfg:
        return Choice(e["kernel"])
    return Choice(e["kernel"], CutlassConfig(**cfg) if e["kernel"] == "cutlass" else TileConfig(**cfg))


def choose(op: str, M: int, N: int, K: int, device: torch.device, order: str | None = None) -> Choice:
    """The kernel and configuration for this GEMM on this CUDA device, for weights in ``order`` (None:
    the order the table packs this shape in for ``$LOWBIT_WORKLOAD``, as ``weight_order`` packs it):
    only entries tuned in that order are looked at."""
    if op not in OPS:
        raise LowbitError(f"unknown op {op!r}; ops: {', '.join(OPS)}")
    if device.type != "cuda":
        raise LowbitError("kernel dispatch is for CUDA devices; on the CPU the reference path runs")
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _choose_cached(op, M, N, K, index, order, os.environ.get("LOWBIT_KERNEL_TABLE"), workload())


@lru_cache(maxsize=4096)
def _choose_cached(op: str, M: int, N: int, K: int, index: int, order: str | None, table_env: str | None,
                   workload_name: str) -> Choice:
    """``choose`` memoized per GEMM shape: every layer calls it on every forward (``table_env`` keys
    the cache on the table override, which ``table_key`` reads)."""
    name, sms, cap, table = _device_table(torch.device("cuda", index))
    if "fp8" in op and cap < (8, 9):
        raise LowbitError(f"{op} needs FP8 tensor cores (compute capability 8.9+); {name} has {cap[0]}.{cap[1]}")
    e = lookup_entry(order_entries(table, op, order or table_order(table, op, N, K, workload_name)), M, N, K)
    if e is not None:
        return entry_choice(e)
    return default_choice(op, M, N, K, sms)
