"""Which kernels one CUTLASS W4A8 call launches and how long each runs, for every compiled tile.

    python scripts/cutlass_probe.py [--shapes 6144x4096,28672x4096] [--m 1,16,64]

On the GPU, with ``LOWBIT_CUTLASS_DIR`` set (the libraries are loaded or built as the kernels do).
Each cell: 16 eager calls over 8 weight copies (past L2) under torch.profiler, the median duration
of each kernel the call launched (the GEMM, and for stream-K tiles the workspace memset). These are
kernel times alone, without the activation quantization.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from lowbit.bench.kernels import _random_cutlass_w4a8  # noqa: E402
from lowbit.kernels.act_quant import quantize_activations  # noqa: E402
from lowbit.kernels.config import CutlassConfig  # noqa: E402
from lowbit.kernels.cutlass_w4a8 import TILES, w4a8_cutlass  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="6144x4096,28672x4096", help="N x K of the weights")
    ap.add_argument("--m", default="1,16,64", help="tokens per call")
    args = ap.parse_args()
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(dev))
    configs = TILES + (CutlassConfig(128, 16, stream_k=True, splits=2), CutlassConfig(128, 16, stream_k=True, splits=4))
    for shape in args.shapes.split(","):
        N, K = (int(v) for v in shape.split("x"))
        w = [_random_cutlass_w4a8(N, K, dev, "int") for _ in range(8)]
        for M in (int(m) for m in args.m.split(",")):
            xq, xs = quantize_activations(torch.randn(M, K, device=dev, dtype=torch.float16))
            for cfg in configs:
                try:
                    for i in range(3):
                        w4a8_cutlass(xq, xs, w[i], cfg)
                    torch.cuda.synchronize()
                    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                        for i in range(16):
                            w4a8_cutlass(xq, xs, w[i % 8], cfg)
                        torch.cuda.synchronize()
                except Exception as exc:  # noqa: BLE001 - a tile CUTLASS refuses at this shape: say so, go on
                    print(f"{N}x{K} M={M:<3} {cfg.label():<28} failed: {str(exc)[:80]}")
                    continue
                kernels: dict[str, list[float]] = {}
                for e in prof.events():
                    if e.device_type == torch.autograd.DeviceType.CUDA:
                        kernels.setdefault(e.name[:40], []).append(e.time_range.elapsed_us())
                desc = "; ".join(f"{n} x{len(v) // 16} {sorted(v)[len(v) // 2]:.1f}us" for n, v in kernels.items())
                print(f"{N}x{K} M={M:<3} {cfg.label():<28} {desc}", flush=True)


if __name__ == "__main__":
    main()
