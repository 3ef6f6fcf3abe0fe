"""Tune the dispatch table on this GPU: time candidate kernels and configs per (op, shape, M).

Writes ``lowbit/kernels/tuned/<gpu>.json`` (the data ``lowbit.kernels.dispatch`` reads) and prints
the winner of every cell. Candidates come from a fixed list per M range (below); each is timed as
``lowbit bench kernels`` times it (activation quantization included, weights rotated past L2,
medians of CUDA-graph replays: kernel time without Python launch overhead, as the engine runs it).
Each cell also times cuBLAS fp16 (``torch.matmul``) at its shape in the same run and records it as
``fp16_us``: the baseline the entry is judged against (``dispatch.slower_than_fp16`` lists the
entries that lose to it).

    python bench/tune_kernels.py [--ops w4a16,w4a8] [--shapes llama3-8b,llama3-70b:gateup] [--ms 1,16] [--out FILE]

The QUIK, COMET and 2:4 ops (``NEW_OPS``: "w4a4", "w4ax", "w4a16-2:4") are timed through their
``lowbit bench kernels`` paths (``OP_PATH``; "w4a4" with QUIK's 256 outlier columns, the preset that
uses it) on Triton tiles each kernel accepts (``accepts``), and written as the same table entries.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time

import torch

from lowbit.bench.kernels import build, default_tile, parse_shapes, time_us
from lowbit.kernels.config import TileConfig
from lowbit.kernels.dispatch import KERNELS, OPS, TUNED_DIR, WEIGHT_ORDERS, Choice, pick_weight_orders, table_order
from lowbit.kernels.gemv import GEMV_MAX_M
from lowbit.report_files import write_json

TUNE_SHAPES = "llama3-8b:qkv,llama3-8b:gateup,llama3-70b:gateup,llama3-70b:down"
# issue 18: every candidate at every decode and prefill batch a server sees, so that a batch between
# two rows takes a measured neighbour's kernel (dispatch: the smallest tuned M >= M)
TUNE_MS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
# the QUIK / COMET / 2:4 ops and the `lowbit bench kernels` path that times each
OP_PATH = {"w4a4": "w4a4-quik", "w4ax": "w4ax", "w4a16-2:4": "w4a16-2:4"}
NEW_OPS = tuple(OP_PATH)
ALL_OPS = OPS + tuple(op for op in NEW_OPS if op not in OPS)


def layout_tile(op: str, tile_k: int | None) -> int:
    """The layout tile ``op`` is tuned (and its table entries recorded) with: w4ax's is its 128-channel
    block, whatever is asked; the others take ``--tile-k``, default 128 (256 for the 2:4 kernel)."""
    if op not in OP_PATH:
        return tile_k or 128
    path = OP_PATH[op]
    return default_tile(path) if path == "w4ax" or tile_k is None else tile_k


def accepts(op: str, config: TileConfig, K: int | None = None, tile_k: int = 128) -> bool:
    """Whether ``op``'s kernel takes ``config`` for K input columns packed in tiles of ``tile_k``.

    Every kernel steps over K one packed tile at a time (w4ax: one 128-channel block), so a split-K
    deeper than the number of tiles only adds empty programs; the 2:4 kernel also needs 4 groups of
    4 columns per thread to expand (``lowbit.kernels.sparse24.sparse24_matmul``):
    block_n * tile_k / 8 >= 128 * num_warps.
    """
    if op == "w4a16-2:4" and config.block_n * (tile_k // 8) < 128 * config.num_warps:
        return False
    step = 128 if op == "w4ax" else tile_k
    return K is None or config.split_k <= -(-K // step)


def _triton_tiles(M: int) -> list[TileConfig]:
    """Triton tile configs worth timing at this M, for every int4 kernel (pruned by earlier sweeps, docs/kernels.md)."""
    out: list[TileConfig] = []
    if M <= 16:
        out += [TileConfig(16, bn, 128, sk, 4, 4, swap=True) for bn in (64, 128) for sk in (1, 2, 4, 8)]
        # small layers (8B qkv, o) have few 64-row tiles: narrower tiles and deeper splits fill the SMs
        out += [TileConfig(16, 32, 128, sk, 4, 4, swap=True) for sk in (2, 4, 8)]
        out += [TileConfig(16, 64, 128, 16, 4, 4, swap=True)]
        # x as the MMA's A side: 16-row tiles go to mma.sync (wgmma needs 64 rows), which takes the
        # dequantized weights straight from registers
        out += [TileConfig(16, 128, 128, sk, 4, 4) for sk in (1, 2, 4)]
        out += [TileConfig(16, 256, 128, sk, 8, 4) for sk in (2, 4)]
    elif M <= 64:
        out += [TileConfig(M, bn, 128, sk, 4, 4, swap=True) for bn in (64, 128) for sk in (1, 2, 4)]
        out += [TileConfig(M, 128, 128, sk, 4, 4) for sk in (1, 2)]
    else:
        out += [TileConfig(bm, bn, 128, 1, nw, ns) for bm, bn, nw, ns in (
            (64, 128, 4, 4), (128, 128, 8, 3), (128, 128, 4, 3), (128, 256, 8, 3), (64, 256, 4, 3), (128, 128, 8, 4))]
        # narrow layers (N = 4096-6144: the 8B o, qkv and down) have 32-48 tiles of 128 x 128 at M = 128
        # on 132 SMs: split-K fills the machine (the 8B down at M = 128 ran 0.49-0.76x of fp16 unsplit)
        if M <= 512:
            out += [TileConfig(bm, 128, 128, sk, nw, ns) for bm, nw, ns in ((64, 4, 4), (128, 8, 3)) for sk in (2, 4)]
    return out


def _gemv_tiles() -> list[TileConfig]:
    """``lowbit.kernels.gemv`` launches: 16 or 32 words of weights per thread and loop step (fewer
    leave too few bytes in flight; more spill), every split-K from 1 to 16; and for the 8- and 16-word
    shapes, two or three steps loaded ahead (``num_stages``: register buffers, more bytes in flight)."""
    shapes = ((16, 1024, 4), (32, 512, 4), (32, 1024, 4), (64, 256, 4), (64, 512, 4), (128, 256, 4),
              (64, 1024, 8), (128, 512, 8))
    out = [TileConfig(16, bn, bk, sk, nw, 1) for bn, bk, nw in shapes for sk in (1, 2, 4, 8, 16)]
    out += [TileConfig(16, bn, bk, sk, 4, ahead) for bn, bk in ((16, 1024), (32, 512), (16, 512), (64, 256))
            for sk in (1, 2, 4) for ahead in (2, 3)]
    return out


# the ops whose layers can be packed in more than one weight order, and those orders
ORDERED_OPS = {"w4a16": ("rows", "fragment", "cutlass"), "w4a8": ("rows", "cutlass"), "w4a8-fp8": ("rows", "cutlass")}


def cutlass_candidates(M: int, op: str = "w4a16") -> list[Choice]:
    """The CUTLASS kernels of ``op`` (``cutlass_w4a16.TILES`` / ``cutlass_w4a8.TILES``) worth timing at M
    tokens: token tiles of at most 64 at decode batches (M <= 32) and of at least 64 from M = 512;
    stream-K tiles at 1 (CUTLASS's heuristic), 2 and 4 splits (1 and 2 from M = 1024)."""
    from lowbit.kernels import cutlass_w4a8, cutlass_w4a16

    tiles = cutlass_w4a16.TILES if op == "w4a16" else cutlass_w4a8.TILES
    out = []
    for t in tiles:
        if (M <= 32 and t.tile_m > 64) or (M >= 512 and t.tile_m < 64):
            continue
        for splits in ((1, 2, 4) if M < 1024 else (1, 2)) if t.stream_k else (1,):
            out.append(Choice("cutlass", dataclasses.replace(t, splits=splits)))
    return out


def candidates(op: str, M: int, K: int | None = None, tile_k: int | None = None, order: str = "rows",
               N: int | None = None) -> list[Choice]:
    """Kernels and tile configs worth timing for this op at this M.

    W4A16 in the "fragment" weight order (``--order``) has the Gluon wgmma kernel
    (``mixed_wgmma.wgmma_candidates``, 4 and 6 stages up to M = 32; N and K given), the fragment GEMV
    up to its 4 rows, and from M = 256 dequant-cublas.

    The QUIK / COMET / 2:4 ops (``NEW_OPS``) have their Triton kernel (the tiles of the int4 kernels
    that it ``accepts`` for K columns, when given, in its layout tile: ``layout_tile``) and, for 2:4
    at M >= 64, the widen-then-cuBLAS path.
    """
    if order == "cutlass":
        return cutlass_candidates(M, op)
    if order == "fragment":
        from lowbit.kernels.mixed_wgmma import wgmma_candidates

        from lowbit.kernels.gemv_frag import FRAG_GEMV_MAX_M, default_frag_gemv_config

        sms = torch.cuda.get_device_properties(0).multi_processor_count
        out = [Choice("wgmma", c) for c in wgmma_candidates(M, N, K, sms, (4, 6) if M <= 32 else (4,))]
        if M <= FRAG_GEMV_MAX_M:  # the fragment GEMV: 1-4 row groups and 1-8 tiles per step, split-K
            # around its default, the weights loaded one step ahead (stages 2) or not
            split = default_frag_gemv_config(N, K, sms).split_k
            out += [Choice("gemv", TileConfig(block_m=16, block_n=bn, block_k=bk, split_k=sk, num_warps=8,
                                              num_stages=st))
                    for bn in (16, 32, 64) for bk, st in ((128, 2), (256, 1), (256, 2), (512, 2), (1024, 2))
                    for sk in sorted({max(1, split // 2), split, 2 * split})]
        return out + ([Choice("dequant-cublas")] if M >= 256 else [])
    if op in NEW_OPS:
        tk = layout_tile(op, tile_k)
        out = [Choice("triton", c) for c in _triton_tiles(M) if accepts(op, c, K, tk)]
        if M >= 64 and "dequant-cublas" in KERNELS[op]:  # 2:4: widened once, then cuBLAS fp16
            out.append(Choice("dequant-cublas"))
        return out
    out = [Choice("triton", c) for c in _triton_tiles(M)]
    if "gemv" in KERNELS[op] and M <= GEMV_MAX_M:
        out += [Choice("gemv", c) for c in _gemv_tiles()]
    if "w4a16-fakequant" in KERNELS[op]:  # the W4A16 kernel on dequantized 8-bit activations
        out += [Choice("w4a16-fakequant", c.config) for c in out if c.kernel == "triton"][:2]
    if "cublas" in KERNELS[op]:
        out.append(Choice("cublas"))
    if M >= 64 and "dequant-cublas" in KERNELS[op]:
        out.append(Choice("dequant-cublas"))
    if M >= 128 and "widen-w8a8" in KERNELS[op]:
        out.append(Choice("widen-w8a8"))  # cuBLAS int8
        out.append(Choice("widen-w8a8", TileConfig(128, 128, 128, 1, 8, 3)))
    return out


def tune_cells(op: str, name: str, N: int, K: int, order: str, ms: list[int], tile_k: int, dev: torch.device,
               top: int = 1) -> list[dict]:
    """Time every candidate of ``op`` at one shape, in one weight order, at each M; one table entry per
    M (the fastest candidate, with cuBLAS fp16 timed beside it as ``fp16_us``), printed as it is made."""
    entries = []
    for M in ms:
        fp16_make, _ = build("fp16", N, K, M, dev)
        fp16_us = time_us(fp16_make()[0])
        del fp16_make
        make, nbytes = build(OP_PATH.get(op, op), N, K, M, dev, tile_k=tile_k, order=order)
        results = []
        for c in candidates(op, M, K, tile_k, order, N):
            try:
                fn, _ = make(c)
                results.append((time_us(fn), c))
            except Exception as exc:  # noqa: BLE001 - configs the compiler rejects raise many types
                print(f"  skip {op} {name} M={M} {c.kernel} {c.config_str()}: {type(exc).__name__}: "
                      f"{str(exc).splitlines()[0][:120]}", file=sys.stderr)
        if not results:
            print(f"{op:<10} {name:<18} {order:<8} M={M:<5} no candidate ran", flush=True)
            continue
        results.sort(key=lambda r: r[0])
        t, best = results[0]
        entries.append({"N": N, "K": K, "M": M, "order": order, "kernel": best.kernel, "us": round(t, 2),
                        "gbps": round(nbytes / t / 1e3, 1), "fp16_us": round(fp16_us, 2),
                        "config": best.config.as_dict() if best.config else None})
        print(f"{op:<10} {name:<18} {order:<8} M={M:<5} {t:9.1f} us {nbytes / t / 1e3:7.0f} GB/s  "
              f"{fp16_us / t:5.2f}x fp16  {best.kernel} {best.config_str()}", flush=True)
        for tt, c in results[1:top]:
            print(f"{'':>49}{tt:9.1f} us  {c.kernel} {c.config_str()}", flush=True)
        del make
    return entries


def order_spec(entries: list[dict], default: str) -> dict:
    """The table's ``weight_order`` for one op: per tuned shape, the order ``pick_weight_orders`` picks
    from all its entries; shapes tuned in none: ``default``."""
    picked = pick_weight_orders(entries)
    return {"default": default,
            "shapes": [{"N": N, "K": K, "order": o} for (N, K), o in sorted(picked.items())]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", default=",".join(ALL_OPS), help=f"comma-separated, of {', '.join(ALL_OPS)}")
    ap.add_argument("--shapes", default=TUNE_SHAPES)
    ap.add_argument("--ms", default=",".join(map(str, TUNE_MS)))
    ap.add_argument("--out", default=None, help="table to write (default: lowbit/kernels/tuned/<gpu>.json)")
    ap.add_argument("--tile-k", type=int, default=None, choices=(128, 256),
                    help="int4 layout tile (PackedInt4.tile_k) to tune the int4 ops for, default 128 (sparse24: 256; "
                    "w4ax always 128); recorded per op in the table")
    ap.add_argument("--order", default="rows",
                    help="int4 weight order(s) to tune in, comma-separated: rows (PackedInt4, every kernel), "
                    "fragment (FragmentInt4, the Gluon wgmma kernel, Hopper; w4a16), cutlass (the CUTLASS "
                    "kernels, Hopper; w4a16, w4a8 and w4a8-fp8). Each shape then packs in the order that loses least over all batch sizes "
                    "(dispatch.pick_weight_orders), compared with the orders the table (--merge) already has "
                    "there; recorded in the table's weight_order")
    ap.add_argument("--top", type=int, default=1, help="print the N fastest candidates of each cell")
    ap.add_argument("--merge", action="store_true",
                    help="keep the existing table's entries for the cells not tuned now: those of --out if it "
                    "exists, else of this GPU's shipped table")
    args = ap.parse_args()
    dev = torch.device("cuda")
    gpu = torch.cuda.get_device_name(dev)
    key = "h200" if "H200" in gpu else "h100" if "H100" in gpu else gpu.lower().replace(" ", "-")
    out = args.out or str(TUNED_DIR / f"{key}.json")
    table = {"gpu": gpu, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
             "source": "bench/tune_kernels.py", "tile_k": {}, "entries": {}}
    # merging into a new file starts from the shipped table: a table missing the other ops' entries
    # would send them to the heuristic default
    base = out if os.path.exists(out) else str(TUNED_DIR / f"{key}.json")
    if args.merge and os.path.exists(base):
        with open(base) as f:
            old = json.load(f)
        table["entries"], table["tile_k"] = old["entries"], old.get("tile_k", {})
        table["weight_order"] = old.get("weight_order", {})
    shapes = parse_shapes(args.shapes)
    ms = [int(m) for m in args.ms.split(",")]
    ops = args.ops.split(",")
    orders = [o.strip() for o in args.order.split(",") if o.strip()]
    if not orders or any(o not in WEIGHT_ORDERS for o in orders):
        ap.error(f"--order takes {', '.join(WEIGHT_ORDERS)} (comma-separated), got {args.order!r}")
    odd = [op for op in ops for o in orders if o not in ORDERED_OPS.get(op, ("rows",))]
    if odd:
        ap.error(f"--order {args.order} does not apply to {', '.join(sorted(set(odd)))}: orders per op are "
                 + "; ".join(f"{op} {', '.join(o)}" for op, o in ORDERED_OPS.items()) + " (others: rows)")
    unknown = [op for op in ops if op not in ALL_OPS]
    if unknown:
        ap.error(f"unknown op(s) {', '.join(unknown)}; ops: {', '.join(ALL_OPS)}")
    print(f"tuning on {gpu}: ops {args.ops}, {len(shapes)} shapes, M {ms}", flush=True)
    for op in ops:
        t_op = time.time()
        tile_k = layout_tile(op, args.tile_k)
        # each shape's cells replace their old entries once that shape is tuned; other shapes and
        # other M keep theirs, so a run stopped by a time limit loses none of the old table
        # every entry names the weight order it was timed in (older entries: their op's default order)
        entries = [{**e, "order": e.get("order", table_order(table, op, e["N"], e["K"]))}
                   for e in table["entries"].get(op, [])]
        default_order = table_order(table, op) if op in table.get("weight_order", {}) else orders[0]
        for name, N, K in shapes:
            for order in orders if op in ORDERED_OPS else ["rows"]:
                entries = [e for e in entries
                           if (e["N"], e["K"]) != (N, K) or e["M"] not in ms or e["order"] != order]
                entries += tune_cells(op, name, N, K, order, ms, tile_k, dev, args.top)
            torch.cuda.empty_cache()
            # written after every shape (write_json: a temp file, then a rename), so that a run stopped
            # by a time limit keeps the cells it finished
            table["entries"][op] = list(entries)
            table["tile_k"][op] = tile_k  # the int4 layout these entries were timed with
            if op in ORDERED_OPS:
                table.setdefault("weight_order", {})[op] = order_spec(entries, default_order)
            write_json(out, table)
        print(f"-- {op} tuned in {time.time() - t_op:.0f} s; wrote {out}", flush=True)


if __name__ == "__main__":
    main()
