"""Tile sweep of the Gluon wgmma kernels against cuBLAS fp16 and what dispatch runs today (issue 18).

For each layer shape and M, times (CUDA-graph replay, weights rotated past L2, ``lowbit.bench.kernels``):
cuBLAS fp16, the dispatched path of the same format, and the wgmma kernel at every tile of ``CONFIGS``
that fits M; prints one line per cell (best tile and its ratio) and writes every timing as JSON.

    python bench/wgmma_sweep.py [--paths w4a16-wgmma,...] [--m 32,64,128,256] [--shapes llama3-8b] [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from lowbit.bench.kernels import build, parse_shapes, time_us
from lowbit.kernels.config import TileConfig
from lowbit.kernels.dispatch import Choice

# the first design (w4a16_wgmma.py): (block_m, block_n, num_warps); block_m is the MMA's N side
CONFIGS = [(bm, bn, w) for bm in (32, 64, 128, 256) for bn, w in ((64, 4), (128, 4), (128, 8), (256, 8))]
# the pipelined kernels (mixed_wgmma.py): mixed_wgmma.wgmma_candidates at these stage counts
PIPE_STAGES = [4]  # --stages
# the format each wgmma path stands in for: timed as dispatch runs it today
BASE = {"w4a16-wgmma": "w4a16", "w4a16-wgmma-direct": "w4a16", "w4a16-wgmma-pipe": "w4a16",
        "w4a8-wgmma-pipe": "w4a8", "w4a16-wgmma-frag": "w4a16", "w4a8-wgmma-frag": "w4a8"}


def fits(M: int, bm: int, least: int = 32) -> bool:
    """Tiles no taller than needed: the smallest block_m >= M (at least ``least``), and up to 2 smaller."""
    top = max(least, 1 << (M - 1).bit_length())
    return bm <= top and bm * 4 >= min(top, 256)


def candidates(path: str, M: int, N: int, K: int) -> list[TileConfig]:
    if not path.endswith(("-pipe", "-frag")):
        return [TileConfig(block_m=bm, block_n=bn, num_warps=w) for bm, bn, w in CONFIGS if fits(M, bm)]
    from lowbit.kernels.mixed_wgmma import wgmma_candidates

    return wgmma_candidates(M, N, K, 132, tuple(PIPE_STAGES))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--paths", default="w4a16-wgmma-frag,w4a8-wgmma-frag")
    ap.add_argument("--m", default="32,64,128,256")
    ap.add_argument("--shapes", default="llama3-8b,llama3-70b")
    ap.add_argument("--stages", default="4", help="shared-memory slots to try, comma separated")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    PIPE_STAGES[:] = [int(v) for v in args.stages.split(",")]
    dev = torch.device("cuda")
    rows = []
    print(f"GPU {torch.cuda.get_device_name(dev)}; ratio = cuBLAS fp16 us / path us", flush=True)
    for name, N, K in parse_shapes(args.shapes):
        for M in map(int, args.m.split(",")):
            fp16 = time_us(build("fp16", N, K, M, dev)[0]()[0])
            line = [f"{name} M={M}: fp16 {fp16:.1f} us"]
            for path in args.paths.split(","):
                base = BASE[path]
                fn, how = build(base, N, K, M, dev)[0]()
                t_base = time_us(fn)
                make = build(path, N, K, M, dev)[0]
                best = None
                for cfg in candidates(path, M, N, K):
                    try:
                        t = time_us(make(Choice("triton", cfg))[0])
                    except Exception as exc:  # a tile the compiler rejects (shared memory, registers)
                        print(f"  {path} {Choice('triton', cfg).config_str()}: {type(exc).__name__}: "
                              f"{str(exc)[:160]}", flush=True)
                        continue
                    rows.append(dict(shape=name, N=N, K=K, M=M, path=path, config=cfg.as_dict(), us=t, fp16_us=fp16))
                    if best is None or t < best[0]:
                        best = (t, Choice("triton", cfg).config_str())
                rows.append(dict(shape=name, N=N, K=K, M=M, path=base, how=how, us=t_base, fp16_us=fp16))
                line.append(f"{base} ({how.strip()}) {fp16 / t_base:.2f}x")
                if best:
                    line.append(f"{path} {fp16 / best[0]:.2f}x ({best[1]})")
            print(" | ".join(line), flush=True)
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
