"""First GPU timings of the issue-6 kernels (QUIK W4A4, COMET W4Ax, 2:4-sparse W4A16) beside W4A8 and W8A8-fp8.

    python bench/new_formats_sweep.py [--shapes llama3-8b:gateup,llama3-8b:down] [--ms 1,16,256,4096]

Before these kernels have dispatch entries and rows in ``lowbit bench kernels``, this times each one
with its default tile configuration (untuned), as ``lowbit.bench.kernels.time_us`` times the others:
medians of CUDA-graph replays, random weights rotated past L2, activation quantization included.
Formats: QUIK with 256 fp16 outlier columns; W4Ax with 25% of its 128-channel blocks at 8 bits
(the w4a4kv4-comet preset's ceiling); 2:4 W4A16 against dense W4A16 (group 128 both).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from lowbit.bench.kernels import _copies, _rotating, build, parse_shapes, time_us
from lowbit.quant.primitives import pack_int4


def _codes(N: int, K: int, dev, sparse: bool = False) -> torch.Tensor:
    c = torch.randint(-8, 8, (N, K), device=dev, dtype=torch.int8)
    if sparse:  # keep 2 of every 4 (random positions)
        keep = torch.rand(N, K // 4, 4, device=dev).argsort(-1) < 2
        c = (c.view(N, K // 4, 4) * keep).view(N, K)
    return pack_int4(c)


def _scales(N: int, G: int, dev) -> torch.Tensor:
    return (torch.rand(N, G, device=dev) * 0.02 + 1e-3).half()


def builders(N: int, K: int, M: int, dev):
    """{path: (fn, weight bytes)} for the new kernels at one shape."""
    from lowbit.kernels.sparse24 import pack_sparse24, sparse24_matmul
    from lowbit.kernels.w4a4 import pack_quik, quik_matmul
    from lowbit.kernels.w4ax import pack_w4ax, w4ax_matmul

    x = torch.randn(M, K, device=dev, dtype=torch.float16)
    n_out = 256
    out_idx = torch.randperm(K, device=dev)[:n_out].sort().values
    quik = [pack_quik(_codes(N, K - n_out, dev), _scales(N, 1, dev), K, out_idx,
                      torch.randn(N, n_out, device=dev).half()) for _ in range(_copies(N * K // 2))]
    G = K // 128
    high = torch.arange(G, device=dev) < G // 4
    comet = [pack_w4ax(_codes(N, K, dev), _scales(N, G, dev), torch.randperm(K, device=dev), high, in_features=K)
             for _ in range(_copies(N * K // 2))]
    sparse = [pack_sparse24(_codes(N, K, dev, sparse=True), _scales(N, G, dev), K, 128)
              for _ in range(_copies(N * K // 4))]
    return {
        "w4a4-quik": (_rotating(lambda p: quik_matmul(x, p), quik), quik[0].weight.nbytes() + N * n_out * 2),
        "w4ax-comet": (_rotating(lambda p: w4ax_matmul(x, p), comet), comet[0].nbytes()),
        "w4a16-2:4": (_rotating(lambda p: sparse24_matmul(x, p), sparse), sparse[0].nbytes()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="llama3-8b:gateup,llama3-8b:down,llama3-70b:gateup")
    ap.add_argument("--ms", default="1,16,256,4096")
    args = ap.parse_args()
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(dev), torch.__version__)
    print(f"{'shape':<18} {'M':>5} {'path':<12} {'us':>9} {'vs fp16':>8} {'GB/s':>7}")
    for name, N, K in parse_shapes(args.shapes):
        for M in (int(m) for m in args.ms.split(",")):
            rows = {}
            for path in ("fp16", "w8a8-fp8", "w4a8", "w4a16"):
                make, nbytes = build(path, N, K, M, dev)
                rows[path] = (time_us(make()[0]), nbytes)
            for path, (fn, nbytes) in builders(N, K, M, dev).items():
                try:
                    rows[path] = (time_us(fn), nbytes)
                except Exception as exc:  # report and go on: these kernels are new on the GPU
                    print(f"{name:<18} {M:>5} {path:<12} failed: {type(exc).__name__}: {str(exc)[:200]}")
            base = rows["fp16"][0]
            for path, (us, nbytes) in rows.items():
                print(f"{name:<18} {M:>5} {path:<12} {us:9.1f} {base / us:7.2f}x {nbytes / us / 1e3:7.0f}")
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
