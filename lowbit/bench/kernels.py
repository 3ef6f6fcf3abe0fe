"""Kernel benchmark: every GEMM path against cuBLAS fp16 and fp8, on real layer shapes, in one run.

Each path is timed as a user would run it: activation quantization included where the scheme
quantizes activations, the configuration that dispatch picks (or one given by the tuner), random
data (never zeros), weights rotated over enough copies that L2 (50 MB on H100/H200) cannot serve
them. Each time is the median over 5 replays of a CUDA graph holding 50 back-to-back calls, after a
warm-up: what a kernel costs inside the engine's graphed decode. (``triton.testing.do_bench`` launches
each call from Python; a kernel of a few microseconds then measures the launch, not the kernel:
the 8B o_proj W4A8 path read 14.8 us that way on the H100 and 10.1 us in a graph, against cuBLAS fp16
at 15.6 us in a graph, bench/profile_decode.py.) Speed is reported as a ratio over ``torch.matmul``
fp16 measured in the same process, plus achieved weight bandwidth and TFLOP/s.

The QUIK, COMET and 2:4 paths (``PRESET_PATHS``) time one layer in their preset's formats: QUIK's
int4 per-channel weights with 256 fp16 outlier columns (``w4a4-quik``) or none (``w4a4``), split and
4-bit quantization of x included; COMET's group-128 int4 weights with a quarter of the 128-channel
activation blocks at 8 bits (``w4ax``), the mixed 4/8-bit quantization of x included; 2:4-sparse
int4 group-128 weights on fp16 activations (``w4a16-2:4``). Their configuration is dispatch's where its
table has the op, else the kernel module's own ``default_config`` (the ``how`` column says which).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from lowbit.device import sm_count
from lowbit.errors import LowbitError
from lowbit.report_files import pyplot, save_figure

# (layer, N out, K in) of the models users run; 70B's qkv/o are there for dispatch coverage
SHAPES: dict[str, list[tuple[str, int, int]]] = {
    "llama3-8b": [("qkv", 6144, 4096), ("o", 4096, 4096), ("gateup", 28672, 4096), ("down", 4096, 14336)],
    "llama3-70b": [("qkv", 10240, 8192), ("o", 8192, 8192), ("gateup", 57344, 8192), ("down", 8192, 28672)],
}
DEFAULT_MS = (1, 16, 32, 64, 128, 256, 1024, 4096)
L2_FLUSH_BYTES = 200 << 20  # rotate copies until they span 4x the 50 MB L2
# paths measured by `lowbit bench kernels`; the first three are the baselines
PATHS = ("fp16", "fp8-cublas", "int8-cublas", "w4a16", "w4a8", "w4a8-g128", "w4a8-fp8", "w8a8-int8", "w8a8-fp8",
         "w4a4-quik", "w4a4", "w4ax", "w4a16-2:4")
# kernels not yet in dispatch, timed only when asked for by name (``--paths``): the Gluon W4A16 wgmma
# kernel (``lowbit.kernels.w4a16_wgmma``, Hopper only, g128 weights, its default 128 x 128 tile), with
# its weights loaded 16 bytes at a time ("w4a16-wgmma") or straight into the operand layout ("-direct")
# and the pipelined Gluon kernels (``lowbit.kernels.mixed_wgmma``: W4A16 g128, W4A8 int8 per channel
# with its activation quantization), at their default tile, on PackedInt4 ("-pipe") or on weights in
# the MMA's fragment order ("-frag", FragmentInt4)
EXTRA_PATHS = ("w4a16-wgmma", "w4a16-wgmma-direct", "w4a16-wgmma-pipe", "w4a8-wgmma-pipe", "w4a16-wgmma-frag",
               "w4a8-wgmma-frag")
# paths of the QUIK / COMET / 2:4 kernels: path -> (dispatch op, preset whose formats the path times)
PRESET_PATHS: dict[str, tuple[str, str]] = {
    "w4a4-quik": ("w4a4", "w4a4-quik"),
    "w4a4": ("w4a4", "w4a4"),
    "w4ax": ("w4ax", "w4a4kv4-comet"),
    "w4a16-2:4": ("w4a16-2:4", "w4a16-2:4"),
}


@dataclass
class Measurement:
    shape: str  # e.g. "llama3-8b gateup"
    N: int
    K: int
    M: int
    path: str
    us: float
    weight_bytes: int
    how: str = ""  # which kernel / config dispatch ran

    @property
    def tflops(self) -> float:
        return 2 * self.M * self.N * self.K / (self.us * 1e-6) / 1e12

    @property
    def gbps(self) -> float:
        return self.weight_bytes / (self.us * 1e-6) / 1e9


@dataclass
class KernelReport:
    gpu: str
    date: str
    torch: str
    triton: str
    rows: list[Measurement] = field(default_factory=list)

    def speedup(self, shape: str, M: int, path: str, over: str = "fp16") -> float | None:
        t = {r.path: r.us for r in self.rows if r.shape == shape and r.M == M}
        return t[over] / t[path] if path in t and over in t else None

    def to_json(self) -> dict:
        d = asdict(self)
        for r, row in zip(self.rows, d["rows"]):
            row.update(tflops=round(r.tflops, 2), gbps=round(r.gbps, 1),
                       speedup_vs_fp16=self.speedup(r.shape, r.M, r.path),
                       speedup_vs_fp8=self.speedup(r.shape, r.M, r.path, "fp8-cublas"))
        return d

    @classmethod
    def from_json(cls, d: dict) -> KernelReport:
        keys = set(Measurement.__dataclass_fields__)
        rows = [Measurement(**{k: v for k, v in r.items() if k in keys}) for r in d["rows"]]
        return cls(d["gpu"], d["date"], d["torch"], d["triton"], rows)


def parse_shapes(spec: str) -> list[tuple[str, int, int]]:
    """'llama3-8b,llama3-70b' or 'llama3-8b:gateup' or explicit 'NxK' items, comma separated."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        model, _, layer = item.partition(":")
        if model in SHAPES:
            layers = [s for s in SHAPES[model] if not layer or s[0] == layer]
            if not layers:
                raise LowbitError(f"{model} has no layer {layer!r}; layers: {', '.join(s[0] for s in SHAPES[model])}")
            out += [(f"{model} {n}", N, K) for n, N, K in layers]
        elif "x" in item and all(p.isdigit() for p in item.split("x")) and item.count("x") == 1:
            N, K = map(int, item.split("x"))
            out.append((f"{N}x{K}", N, K))
        else:
            raise LowbitError(f"unknown shape {item!r}: use {', '.join(SHAPES)}, MODEL:LAYER or NxK")
    return out


def parse_paths(spec: str | None) -> list[str]:
    """'w4a8,w4ax' -> ["fp16", "w4a8", "w4ax"]: known paths in the given order, fp16 first (every
    ratio is over it); None = all of ``PATHS``."""
    paths = list(PATHS) if spec is None else list(dict.fromkeys(p.strip() for p in spec.split(",") if p.strip()))
    unknown = [p for p in paths if p not in PATHS + EXTRA_PATHS]
    if unknown:
        raise LowbitError(f"unknown kernel path(s) {', '.join(unknown)}; paths: {', '.join(PATHS + EXTRA_PATHS)}")
    if "fp16" not in paths:
        paths.insert(0, "fp16")
    return paths


# ---- building one path's inputs and callable ----------------------------------------------------

def _copies(nbytes: int) -> int:
    return max(1, min(16, math.ceil(L2_FLUSH_BYTES / max(nbytes, 1))))


def _random_cutlass_w4a8(N: int, K: int, device, adtype: str):
    """Random per-channel int4 weights reordered for the CUTLASS W4A8 kernels on ``adtype`` activations
    ("int" or "fp8_e4m3"), as a loaded layer's are (``CutlassInt4PerChannel``)."""
    from lowbit.kernels.cutlass_w4a8 import pack_cutlass_w4a8

    return pack_cutlass_w4a8(_random_codes(N, K, device), _random_scales(N, 1, device), K, adtype)


def _random_int4(N: int, K: int, group: int | None, device, tile_k: int):
    """Random int4 weights with realistic scales, packed for the kernels (``PackedInt4``)."""
    from lowbit.kernels.layout import pack_for_kernels

    G = 1 if group is None else -(-K // group)
    qw = torch.randint(0, 256, (N, (K + 1) // 2), dtype=torch.uint8, device=device)
    s = (torch.rand(N, G, device=device) * 0.02 + 1e-3).half()
    return pack_for_kernels(qw, s, None, group, K, tile_k=tile_k)


def build(path: str, N: int, K: int, M: int, device, tile_k: int | None = None,
          order: str | None = None) -> tuple[Callable, int]:
    """Inputs for one path at one shape: ``(make, weight bytes)``.

    ``make(choice)`` returns ``(fn, description)``; ``fn()`` runs the GEMM once, rotating weight
    copies. ``choice`` None = what dispatch picks (``PRESET_PATHS``: the kernel's default config while
    dispatch has no such op, ``pick_choice``); the tuner passes its candidates (and ``tile_k``, the
    int4 layout tile it tunes for; default: the one this GPU's table was tuned with, else the kernel's;
    and for "w4a16", "w4a8" and "w4a8-fp8" the weight ``order``, "rows", "fragment" (w4a16) or
    "cutlass": default, the table's ``weight_order`` at this shape).
    The weight bytes are what one call reads of the weight side (codes, scales, zero points, and for
    ``PRESET_PATHS`` fp16 outlier columns, weight sums, 2:4 patterns).
    """
    from lowbit.kernels import dispatch, run

    x16 = torch.randn(M, K, device=device, dtype=torch.float16)
    if path == "fp16":
        ws = [torch.randn(N, K, device=device, dtype=torch.float16) for _ in range(_copies(2 * N * K))]
        return (lambda choice=None: (_rotating(lambda w: x16 @ w.t(), ws), "torch.matmul")), 2 * N * K
    if path in ("fp8-cublas", "int8-cublas"):
        adtype = "fp8_e4m3" if path == "fp8-cublas" else "int"
        xq, xs = _quant_ref(torch.randn(max(M, 17) if adtype == "int" else M, K, device=device), adtype)
        wq = [_quant_ref(torch.randn(N, K, device=device), adtype)[0] for _ in range(_copies(N * K))]
        wsc = torch.rand(N, device=device) + 0.5
        if adtype == "fp8_e4m3":  # cuBLAS alone: row-wise scales, bf16 out, no activation quantization
            fn = lambda w: torch._scaled_mm(xq, w.t(), scale_a=xs[:, None], scale_b=wsc[None, :],
                                           out_dtype=torch.bfloat16)
            return (lambda choice=None: (_rotating(fn, wq), "torch._scaled_mm row-wise")), N * K
        how = "torch._int_mm" + (" (M padded to 17)" if M < 17 else "")
        return (lambda choice=None: (_rotating(lambda w: torch._int_mm(xq, w.t()), wq), how)), N * K
    if path in PRESET_PATHS:
        return _build_preset(path, x16, N, K, device, tile_k)

    def pick(choice):
        return dispatch.choose(path, M, N, K, device) if choice is None else choice

    if path.startswith("w8a8"):
        adtype = "fp8_e4m3" if path == "w8a8-fp8" else "int"
        wq = [_quant_ref(torch.randn(N, K, device=device), adtype)[0] for _ in range(_copies(N * K))]
        wsc = (torch.rand(N, device=device) + 0.5).half()

        def make(choice=None):
            c = pick(choice)
            return _rotating(lambda w: run.run_w8a8(x16, w, wsc, adtype, c), wq), f"{c.kernel} {c.config_str()}"

        return make, N * K + 2 * N
    groups = {"w4a16": 128, "w4a8": None, "w4a8-g128": 128, "w4a8-fp8": None, "w4a16-wgmma": 128,
              "w4a16-wgmma-direct": 128, "w4a16-wgmma-pipe": 128, "w4a8-wgmma-pipe": None,
              "w4a16-wgmma-frag": 128, "w4a8-wgmma-frag": None}
    if path not in groups:
        raise LowbitError(f"unknown kernel path {path!r}; paths: {', '.join(PATHS)}")
    tile_k = 128 if "-wgmma" in path else tile_k or dispatch.layout_tile(torch.device(device), path)
    if path in ("w4a16", "w4a8", "w4a8-fp8"):
        order = order or dispatch.weight_order(torch.device(device), path, N, K)
    adtype = "fp8_e4m3" if path == "w4a8-fp8" else "int"
    if order == "cutlass" and path == "w4a16":
        from lowbit.kernels.cutlass_w4a16 import pack_cutlass

        # random signed codes in the checkpoint layout, reordered as a loaded layer's are
        packs = [pack_cutlass(_random_codes(N, K, device), _random_scales(N, K // 128, device), K, 128)
                 for _ in range(_copies(N * K // 2))]
    elif order == "cutlass" and path in ("w4a8", "w4a8-fp8"):
        packs = [_random_cutlass_w4a8(N, K, device, adtype) for _ in range(_copies(N * K // 2))]
    else:
        packs = [_random_int4(N, K, groups[path], device, tile_k) for _ in range(_copies(N * K // 2))]

    if path.endswith(("-wgmma-pipe", "-wgmma-frag")):
        from lowbit.kernels.act_quant import quantize_activations
        from lowbit.kernels.mixed_wgmma import FragmentInt4, w4a8_mixed_wgmma, w4a16_mixed_wgmma

        if path.endswith("-frag"):
            packs = [FragmentInt4.from_packed(p, path.startswith("w4a8")) for p in packs]

        def make(choice=None):
            cfg = None if choice is None else choice.config
            if path.startswith("w4a16"):
                fn = lambda p: w4a16_mixed_wgmma(x16, p, config=cfg)
            else:
                fn = lambda p: w4a8_mixed_wgmma(*quantize_activations(x16, "int"), p, torch.float16, config=cfg)
            return _rotating(fn, packs), \
                f"gluon wgmma {path.rsplit('-', 1)[1]} {'default' if cfg is None else dispatch.Choice('triton', cfg).config_str()}"

        return make, packs[0].nbytes()
    if path.startswith("w4a16-wgmma"):
        from lowbit.kernels.w4a16_wgmma import w4a16_wgmma_matmul

        vec_w = path == "w4a16-wgmma"

        def make(choice=None):
            cfg = None if choice is None else choice.config
            return _rotating(lambda p: w4a16_wgmma_matmul(x16, p, config=cfg, vec_w=vec_w), packs), \
                f"gluon wgmma {'default' if cfg is None else dispatch.Choice('triton', cfg).config_str()}"

        return make, packs[0].nbytes()

    if path == "w4a16" and order == "fragment":
        from lowbit.kernels.layout import FragmentInt4

        packs = [FragmentInt4.from_packed(p, int8=False) for p in packs]

    def make(choice=None):
        c = dispatch.choose(path, M, N, K, device, order) if choice is None and order else pick(choice)
        if path == "w4a16":
            fn = lambda p: run.run_w4a16(x16, p, c)
        else:
            fn = lambda p: run.run_w4a8(x16, p, adtype, c)
        return _rotating(fn, packs), f"{c.kernel} {c.config_str()}"

    return make, packs[0].nbytes()


# ---- the QUIK / COMET / 2:4 paths ---------------------------------------------------------------

def _random_codes(N: int, K: int, device) -> torch.Tensor:
    """(N, ceil(K/2)) uint8: random int4 codes in the checkpoint layout (``pack_int4``), any nibble valid."""
    return torch.randint(0, 256, (N, (K + 1) // 2), dtype=torch.uint8, device=device)


def _random_scales(N: int, G: int, device) -> torch.Tensor:
    """(N, G) fp16 scales of N(0, 0.02)-sized weights' magnitude, never 0."""
    return (torch.rand(N, G, device=device) * 0.02 + 1e-3).half()


def _random_2of4_codes(N: int, K: int, device) -> torch.Tensor:
    """(N, ceil(K/2)) uint8 packed signed codes, 2 non-zero (|q| in 1..7) in every 4 columns at random positions."""
    from lowbit.kernels.sparse24 import PATTERNS
    from lowbit.numerics.primitives import pack_int4

    if K % 4:
        raise LowbitError(f"the 2:4 path needs K a multiple of 4 (groups of 4 input columns), got {K}")
    masks = torch.zeros(len(PATTERNS), 4, dtype=torch.bool, device=device)
    for i, kept in enumerate(PATTERNS):
        masks[i, list(kept)] = True
    keep = masks[torch.randint(0, len(PATTERNS), (N, K // 4), device=device)].view(N, K)
    mag = torch.randint(1, 8, (N, K), dtype=torch.int8, device=device)
    sign = torch.randint(0, 2, (N, K), dtype=torch.int8, device=device) * 2 - 1
    return pack_int4(mag * sign * keep)


def default_tile(path: str) -> int:
    """The layout tile a preset path's kernel packs with when the dispatch table names none."""
    from lowbit.kernels import layout, sparse24, w4ax

    return {"w4ax": w4ax.BLOCK, "w4a16-2:4": sparse24.TILE_K}.get(path, layout.TILE_K)


def _table_tile(device: torch.device, op: str, default: int) -> int:
    """The tile this GPU's dispatch table tuned ``op`` with, else ``default`` (the kernel's own)."""
    from lowbit.kernels import dispatch

    if device.type != "cuda":
        return default
    key = dispatch.table_key(torch.cuda.get_device_name(device))
    tiles = dispatch.load_table(key).get("tile_k", {}) if key is not None else {}
    return int(tiles.get(op, default))


def preset_weights(path: str, N: int, K: int, device, tile_k: int | None = None) -> Any:
    """One (N out x K in) layer in ``path``'s preset formats (``PRESET_PATHS``), random codes and scales,
    in its kernel's layout: ``PackedQuik`` (w4a4-quik, w4a4), ``PackedW4Ax`` (w4ax) or ``PackedSparse24``.

    QUIK: ``outlier_columns`` of the preset (at most K - 1) random outlier columns, fp16 N(0, 0.02)
    weights; COMET: a random ``act_perm``, the preset's share of 8-bit blocks as a prefix (the kernel
    needs them first, as ``lowbit.quant.fmpq.assign_fmpq_blocks`` orders them); 2:4: random patterns.
    """
    from lowbit.formats import get_scheme

    if path not in PRESET_PATHS:
        raise LowbitError(f"{path!r} is not a preset path; those are {', '.join(PRESET_PATHS)}")
    device = torch.device(device)
    tile_k = tile_k or default_tile(path)
    scheme = get_scheme(PRESET_PATHS[path][1])
    wfmt, afmt = scheme.weights, scheme.activations
    if PRESET_PATHS[path][0] == "w4a4":
        from lowbit.kernels.w4a4 import pack_quik

        n_out = min(afmt.outlier_columns, K - 1)
        out_idx = torch.randperm(K, device=device)[:n_out].sort().values if n_out else None
        ow = (torch.randn(N, n_out, device=device) * 0.02).half() if n_out else None
        return pack_quik(_random_codes(N, K - n_out, device), _random_scales(N, 1, device), K, out_idx, ow,
                         tile_k=tile_k)
    if path == "w4ax":
        from lowbit.kernels.w4ax import BLOCK, pack_w4ax

        if tile_k != BLOCK:
            raise LowbitError(f"w4ax packs in its {BLOCK}-channel blocks; a layout tile of {tile_k} does not apply")
        G = -(-K // afmt.fmpq_block)
        # the preset's ceiling, counted as assign_fmpq_blocks counts it (8 of 32 blocks at K = 4096)
        n_hi = min(G, math.ceil(afmt.fmpq_high_fraction * G - 1e-9))
        high = torch.arange(G) < n_hi
        return pack_w4ax(_random_codes(N, K, device), _random_scales(N, G, device), torch.randperm(K, device=device),
                         high, in_features=K, group_size=wfmt.group_size, block=afmt.fmpq_block)
    from lowbit.kernels.sparse24 import pack_sparse24
    from lowbit.numerics.primitives import num_groups

    return pack_sparse24(_random_2of4_codes(N, K, device), _random_scales(N, num_groups(K, wfmt.group_size), device),
                         K, wfmt.group_size, tile_k)


def run_preset(path: str, x: torch.Tensor, w: Any, choice=None) -> torch.Tensor:
    """x (M, K) fp16 -> (M, N) fp16 through ``path``'s kernel, activation quantization included;
    ``choice`` a ``dispatch.Choice`` (None: the kernel's default)."""
    from lowbit.kernels import dispatch, run

    choice = choice or dispatch.Choice("triton")
    if PRESET_PATHS[path][0] == "w4a4":
        from lowbit.kernels.w4a4 import quik_matmul

        return quik_matmul(x, w, None, choice.config)
    if path == "w4ax":
        return run.run_w4ax(x, w, choice)
    return run.run_sparse24(x, w, choice)


def kernel_default(path: str, M: int, N: int, K: int, w: Any, device) -> Any:
    """The ``TileConfig`` ``path``'s kernel module picks by itself (its ``default_config``)."""
    from lowbit.kernels import sparse24, w4a4, w4ax

    device = torch.device(device)
    if PRESET_PATHS[path][0] == "w4a4":
        return w4a4.default_config(M, N, w.Kq, device)
    if path == "w4ax":
        return w4ax.default_config(M, N, w.n_blocks, sm_count(device, 132))
    return sparse24.default_config(M, N, K, sm_count(device, 132), w.tile_k)


def pick_choice(op: str, M: int, N: int, K: int, device, fallback: Callable[[], Any]) -> tuple[Any, bool]:
    """``(Choice, from dispatch?)``: dispatch's choice where its table knows ``op`` on a CUDA device, else
    the kernel's own ``fallback()`` config (an op not wired into dispatch yet, or the interpreter)."""
    from lowbit.kernels import dispatch

    device = torch.device(device)
    if op in dispatch.OPS and device.type == "cuda":
        return dispatch.choose(op, M, N, K, device), True
    return dispatch.Choice("triton", fallback()), False


def _fresh_copy(obj: Any) -> Any:
    """A packed-weight dataclass with every tensor (nested ones too) cloned: same values, new memory."""
    changes = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, torch.Tensor):
            changes[f.name] = v.clone()
        elif dataclasses.is_dataclass(v):
            changes[f.name] = _fresh_copy(v)
    return dataclasses.replace(obj, **changes)


def _build_preset(path: str, x16: torch.Tensor, N: int, K: int, device, tile_k: int | None) -> tuple[Callable, int]:
    """``build`` for ``PRESET_PATHS``: one random layer, cloned to rotate past L2 (values need not differ)."""
    op = PRESET_PATHS[path][0]
    device = torch.device(device)
    tile_k = tile_k or _table_tile(device, op, default_tile(path))
    first = preset_weights(path, N, K, device, tile_k)
    packs = [first] + [_fresh_copy(first) for _ in range(_copies(first.nbytes()) - 1)]
    M = x16.shape[0]

    def make(choice=None):
        c, dispatched = (choice, True) if choice is not None else pick_choice(
            op, M, N, K, device, lambda: kernel_default(path, M, N, K, first, device))
        if c.kernel != "triton" and op not in ("w4a16-2:4", "w4ax"):
            raise LowbitError(f"lowbit bench kernels runs {op} on its Triton kernel only; dispatch chose {c.kernel!r}")
        how = f"{c.kernel} {c.config_str()}" + ("" if dispatched else " (kernel default: no dispatch entry)")
        return _rotating(lambda w: run_preset(path, x16, w, c), packs), how

    return make, first.nbytes()


def _quant_ref(x: torch.Tensor, adtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    from lowbit.numerics.primitives import quantize_activation

    q, s = quantize_activation(x, 8, adtype)
    return q, s[:, 0].float()


def _rotating(fn: Callable, items: list) -> Callable[[], torch.Tensor]:
    state = [0]

    def run() -> torch.Tensor:
        state[0] = (state[0] + 1) % len(items)
        return fn(items[state[0]])

    return run


def time_us(fn: Callable[[], torch.Tensor], calls: int = 50, repeat: int = 5) -> float:
    """Median microseconds per call of ``fn``, replayed ``calls`` times from one CUDA graph (module docstring).

    ``fn`` runs once before the capture, so that compilation errors (a config the compiler rejects)
    and workspace allocations happen outside it.
    """
    fn()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # a side-stream warm-up, as torch.cuda.graph's docs ask
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    del graph
    return sorted(times)[len(times) // 2]


def run(shapes: list[tuple[str, int, int]], ms: list[int], paths: list[str], progress=None) -> KernelReport:
    """Time every (shape, M, path) on the current CUDA device."""
    import datetime

    import triton

    if not torch.cuda.is_available():
        raise LowbitError("lowbit bench kernels needs a CUDA GPU; this machine has none")
    parse_paths(",".join(paths))  # unknown names fail before any timing
    dev = torch.device("cuda")
    report = KernelReport(torch.cuda.get_device_name(dev), datetime.date.today().isoformat(),
                          torch.__version__, triton.__version__)
    for name, N, K in shapes:
        for M in ms:
            for path in paths:
                make, nbytes = build(path, N, K, M, dev)
                fn, how = make()
                report.rows.append(Measurement(name, N, K, M, path, time_us(fn), nbytes, how))
                if progress:
                    progress(report.rows[-1])
            torch.cuda.empty_cache()
    return report


def format_table(report: KernelReport) -> str:
    """Markdown: one row per (shape, M), speed-up over fp16 per path, fp16 microseconds first."""
    paths = [p for p in PATHS if any(r.path == p for r in report.rows)]
    head = "| layer (N x K) | M | fp16 us | " + " | ".join(p for p in paths if p != "fp16") + " |"
    lines = [(f"{report.gpu}, {report.date}, torch {report.torch}, triton {report.triton}. "
             "Speed-up over cuBLAS fp16 (torch.matmul); activation quantization included for A8 and A4 paths."),
             "", head, "|" + "---|" * (2 + len(paths))]
    keys = dict.fromkeys((r.shape, r.N, r.K, r.M) for r in report.rows)
    for shape, N, K, M in keys:
        t16 = next((r.us for r in report.rows if (r.shape, r.M, r.path) == (shape, M, "fp16")), None)
        cells = []
        for p in paths:
            if p == "fp16":
                continue
            s = report.speedup(shape, M, p)
            cells.append(f"{s:.2f}x" if s is not None else "")
        lines.append(f"| {shape} ({N}x{K}) | {M} | {t16:.1f} | " + " | ".join(cells) + " |" if t16 else "")
    return "\n".join(line for line in lines if line is not None)


def plot(report: KernelReport, path: str) -> None:
    """PNG: speed-up over fp16 vs M (log2 x axis), one line per kernel path, one panel per layer."""
    plt = pyplot()
    shapes = list(dict.fromkeys(r.shape for r in report.rows))
    paths = [p for p in PATHS if p != "fp16" and any(r.path == p for r in report.rows)]
    cols = min(3, len(shapes))
    rows = math.ceil(len(shapes) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    for ax, shape in zip(axes.flat, shapes):
        ms = sorted({r.M for r in report.rows if r.shape == shape})
        for p in paths:
            ys = [report.speedup(shape, m, p) for m in ms]
            if any(y is not None for y in ys):
                # one colour per path in every panel (the default cycle repeats after 10): tab20's 10 dark
                # hues first, then its light ones
                i = 2 * PATHS.index(p)
                ax.plot(ms, [float("nan") if y is None else y for y in ys], marker="o", ms=3, label=p,
                        color=plt.cm.tab20(i % 20 + i // 20), ls="--" if p.endswith("cublas") else "-")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(shape, fontsize=10)
        ax.set_xlabel("M (tokens in the batch)")
        ax.set_ylabel("speed-up over cuBLAS fp16")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(shapes):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"lowbit kernels on {report.gpu} ({report.date})", fontsize=11)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
