"""Time the fused activation quantization (``lowbit.kernels.act_quant``) per row width and warp count.

On the GPU: for each (M, K) and num_warps, 50 calls replayed from a CUDA graph over inputs rotated past
L2, against a plain copy of the same bytes (``torch.Tensor.copy_`` of the fp16 input) in the same run.
Prints a table last. Issue 18: at M = 128 the 70B down's quantization took 9.2 us (ncu) on a 79.5 us
cuBLAS fp8 GEMM.

    python bench/act_quant_sweep.py [--shapes 128x28672,128x4096] [--warps 4,8,16,32] [--dtype int|fp8_e4m3]
"""

from __future__ import annotations

import argparse

import torch

from lowbit.kernels.act_quant import _act_quant_kernel, empty_codes, quant_constants
from lowbit.kernels.launch import next_power_of_2, triton_launch
from lowbit.kernels.pdl import launch_options


def graph_us(fn, calls: int = 50) -> float:
    """One graph of ``calls`` calls, replayed 5 times, us per call (the median replay)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn(0)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(i)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="1x4096,16x4096,128x4096,128x14336,128x28672,256x14336,1024x4096")
    ap.add_argument("--warps", default="4,8,16,32")
    ap.add_argument("--dtype", default="fp8_e4m3", choices=["int", "fp8_e4m3"])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("act_quant_sweep times CUDA kernels: run it on a GPU")
    consts = quant_constants(args.dtype)
    rows = []
    for shape in args.shapes.split(","):
        M, K = (int(v) for v in shape.split("x"))
        n = max(2, (256 << 20) // (M * K * 2))  # inputs rotated past L2 (>= 256 MB in all)
        xs = [torch.randn(M, K, device="cuda", dtype=torch.float16) for _ in range(n)]
        q, s = empty_codes(M, K, args.dtype, torch.device("cuda"))
        dst = torch.empty_like(xs[0])
        copy = graph_us(lambda i: dst.copy_(xs[i % n]))
        block = next_power_of_2(K)
        row = [f"{M}x{K}", f"{copy:.2f}"]
        for w in (int(v) for v in args.warps.split(",")):
            def run(i, w=w):
                x = xs[i % n]
                triton_launch(_act_quant_kernel, (M,), x, s, q, s, K, x.stride(0), q.stride(0),
                              HAS_SMOOTH=False, BLOCK_K=block, num_warps=w, **consts,
                              **launch_options(x.device))
            row.append(f"{graph_us(run):.2f}")
        rows.append(row)
    print(f"\n{torch.cuda.get_device_name()}, {args.dtype}, us per call (50 graph-replayed calls, inputs past L2)")
    print("| M x K | fp16 copy | " + " | ".join(f"{w} warps" for w in args.warps.split(",")) + " |")
    print("|---" * (2 + len(args.warps.split(","))) + "|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
