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

from lowbit.bench.kernels import _rotating, time_us
from lowbit.kernels.act_quant import quantize_activations


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="1x4096,16x4096,128x4096,128x14336,128x28672,256x14336,1024x4096")
    ap.add_argument("--warps", default="4,8,16,32")
    ap.add_argument("--dtype", default="fp8_e4m3", choices=["int", "fp8_e4m3"])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("act_quant_sweep times CUDA kernels: run it on a GPU")
    rows = []
    for shape in args.shapes.split(","):
        M, K = (int(v) for v in shape.split("x"))
        n = max(2, (256 << 20) // (M * K * 2))  # inputs rotated past L2 (>= 256 MB in all)
        xs = [torch.randn(M, K, device="cuda", dtype=torch.float16) for _ in range(n)]
        dst = torch.empty_like(xs[0])
        row = [f"{M}x{K}", f"{time_us(_rotating(dst.copy_, xs)):.2f}"]
        for w in (int(v) for v in args.warps.split(",")):
            quant = _rotating(lambda x, w=w: quantize_activations(x, args.dtype, num_warps=w), xs)
            row.append(f"{time_us(quant):.2f}")
        rows.append(row)
    print(f"\n{torch.cuda.get_device_name()}, {args.dtype}, us per call (50 graph-replayed calls, inputs past L2)")
    print("| M x K | fp16 copy | " + " | ".join(f"{w} warps" for w in args.warps.split(",")) + " |")
    print("|---" * (2 + len(args.warps.split(","))) + "|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
