"""First timing of the W4A16 Triton kernel against cuBLAS fp16 (torch.matmul), one run, on the GPU,
with the best of a small sweep of tile configurations per shape.

A stopgap until `lowbit bench kernels` (the kernels issue): medians of triton.testing.do_bench, random
data (never zeros), weights larger than L2 rotated over 4 copies so the cache does not serve them.

    python bench/w4a16_first.py
"""

from __future__ import annotations

import torch
import triton

from lowbit.kernels.w4a16 import w4a16_matmul

SHAPES = {"L3-8B gateup": (28672, 4096), "L3-70B down": (8192, 28672)}
MS = (1, 16, 64, 256)
# (block_m, block_n, block_k, num_warps, num_stages, split_k): swept to see where the kernel can go
CONFIGS = [(16, 32, 128, 4, 4, 1), (16, 32, 128, 4, 4, 4), (16, 64, 128, 4, 4, 4), (16, 64, 128, 4, 4, 8),
           (16, 128, 128, 4, 3, 8), (16, 32, 128, 4, 4, 8), (16, 64, 128, 4, 4, 16),
           (64, 128, 64, 4, 3, 1), (128, 128, 64, 8, 3, 1), (32, 128, 128, 8, 3, 2), (64, 128, 64, 4, 3, 4)]


def main() -> None:
    dev = torch.cuda.get_device_name()
    print(f"{dev} | W4A16 (first Triton version, g128) vs torch.matmul fp16 | median us")
    print(f"{'layer':<14} {'M':>5} {'fp16 us':>9} {'w4a16 us':>9} {'speed-up':>9}  best config (bm, bn, bk, warps, stages, split_k)")
    for name, (N, K) in SHAPES.items():
        copies = 4
        ws = [torch.randn(N, K, device="cuda", dtype=torch.float16) for _ in range(copies)]
        qws = [torch.randint(0, 256, (N, K // 2), device="cuda", dtype=torch.uint8) for _ in range(copies)]
        ss = [(torch.rand(N, K // 128, device="cuda") * 0.01 + 1e-3).half() for _ in range(copies)]
        for M in MS:
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            i = [0]

            def fp16():
                i[0] = (i[0] + 1) % copies
                return x @ ws[i[0]].t()

            t16 = triton.testing.do_bench(fp16, return_mode="median") * 1e3
            best = None
            for bm, bn, bk, nw, ns, sk in CONFIGS:
                def w4(bm=bm, bn=bn, bk=bk, nw=nw, ns=ns, sk=sk):
                    i[0] = (i[0] + 1) % copies
                    return w4a16_matmul(x, qws[i[0]], ss[i[0]], None, 128, K, block_m=bm, block_n=bn,
                                        block_k=bk, num_warps=nw, num_stages=ns, split_k=sk)

                t = triton.testing.do_bench(w4, return_mode="median") * 1e3
                if best is None or t < best[0]:
                    best = (t, (bm, bn, bk, nw, ns, sk))
            t4, cfg = best
            print(f"{name:<14} {M:>5} {t16:>9.1f} {t4:>9.1f} {t16 / t4:>8.2f}x  {cfg}")


if __name__ == "__main__":
    main()
