"""What Triton makes of each quantized GEMM kernel for Hopper (sm_90a), on a machine without a GPU.

    python scripts/kernel_ptx.py [--shape 28672x4096] [--ms 1,16,64,128,256] [--ops w4a16,w4a8,w8a8-fp8]

For each op and M: the kernel and tile the shipped H100 table (``lowbit/kernels/tuned/h100.json``)
picks for the shape, the wrapper called on CPU tensors with launches recorded and not run
(``kernels.launch.record_launches(launch=False)``), each recorded launch compiled ahead of time for
sm_90 with the specialization the JIT would give it (``lowbit.kernels.aot``), and from its PTX
and ``ptxas -v``:
- the MMA instructions (``wgmma.mma_async`` and its shape, or ``mma.sync``);
- ``wgmma.wait_group N`` (N = 0 after every K step: the next step's loads and int4 conversion do
  not overlap the tensor cores);
- ``cp.async`` (Ampere-style async copies) and ``cp.async.bulk`` (TMA);
- shared memory, registers and spills.
Triton is the same 3.6 here as on the device machine, so the PTX is the one the H200 runs. Paths the
table sends to cuBLAS (``dequant-cublas``, ``widen-w8a8``, ``cublas``) are named, not compiled.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":  # the kernels must be JITFunctions to compile them
    sys.exit("run without TRITON_INTERPRET=1: this script compiles for sm_90 instead of interpreting")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402

from lowbit.kernels.aot import compile_launch, ptx_summary, ptxas_usage  # noqa: E402


def _layer(op: str, M: int, N: int, K: int):  # noqa: ANN202
    """CPU tensors for one GEMM of ``op`` (random; their values do not matter for compiling)."""
    from lowbit.bench.kernels import _random_int4
    from lowbit.kernels.act_quant import empty_codes

    x = torch.randn(M, K, dtype=torch.float16)
    if op.startswith("w8a8"):
        q, s = empty_codes(M, K, "fp8_e4m3" if op == "w8a8-fp8" else "int", x.device)
        wq = torch.empty(N, K, dtype=q.dtype)
        return x, (q, s, wq, torch.ones(N))
    group = 128 if op in ("w4a16", "w4a8-g128") else None
    w = _random_int4(N, K, group, torch.device("cpu"), 128)
    if op == "w4a16":
        return x, (w,)
    q, s = empty_codes(M, K, "fp8_e4m3" if op == "w4a8-fp8" else "int", x.device)
    return x, (q, s, w)


def record(op: str, M: int, N: int, K: int, entry: dict) -> list:
    from lowbit.kernels.config import TileConfig
    from lowbit.kernels.launch import record_launches

    cfg = TileConfig(**entry["config"]) if entry.get("config") else None
    x, t = _layer(op, M, N, K)
    with record_launches(launch=False) as rec:
        if op == "w4a16":
            from lowbit.kernels.w4a16 import w4a16_matmul

            w4a16_matmul(x, t[0], config=cfg)
        elif op.startswith("w8a8"):
            from lowbit.kernels.w8a8 import w8a8_matmul

            w8a8_matmul(*t, torch.float16, config=cfg)
        elif entry["kernel"] == "gemv":
            from lowbit.kernels.gemv import w4a8_gemv

            w4a8_gemv(t[0], t[1], t[2], torch.float16, None, cfg)
        else:
            from lowbit.kernels.w4a8 import w4a8_matmul

            w4a8_matmul(*t, torch.float16, config=cfg)
    return rec


def main() -> None:
    from lowbit.kernels.dispatch import TUNED_DIR, lookup_entry

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="28672x4096", help="N x K of the layer (default: Llama-3-8B gate+up)")
    ap.add_argument("--ms", default="1,16,64,128,256")
    ap.add_argument("--ops", default="w4a16,w4a8,w4a8-g128,w8a8-int8,w8a8-fp8")
    args = ap.parse_args()
    N, K = (int(v) for v in args.shape.split("x"))
    table = json.loads((TUNED_DIR / "h100.json").read_text())["entries"]
    rows = []
    for op in args.ops.split(","):
        for M in (int(m) for m in args.ms.split(",")):
            entry = lookup_entry(table.get(op, []), M, N, K)
            if entry is None or entry["kernel"] not in ("triton", "gemv"):
                rows.append((op, M, entry["kernel"] if entry else "no entry", {}, "-", "-"))
                continue
            cfg = entry.get("config") or {}
            tile = (f"bm{cfg.get('block_m')} bn{cfg.get('block_n')} split{cfg.get('split_k')} w{cfg.get('num_warps')} "
                    f"s{cfg.get('num_stages')}{' swap' if cfg.get('swap') else ''}") if cfg else "default"
            for kernel, _grid, a, kw in record(op, M, N, K, entry):
                compiled = compile_launch(kernel, a, kw)
                ptx = compiled.asm["ptx"]
                info = ptx_summary(ptx)
                info["smem"] = f"{compiled.metadata.shared // 1024} KiB"
                regs, spilled = ptxas_usage(ptx)
                rows.append((op, M, f"{entry['kernel']} {kernel.fn.__name__} {tile}", info,
                             f"{regs} regs, {spilled} B spilled", ""))
    print(f"Triton {triton.__version__}, target sm_90a, layer {N}x{K}, tiles from lowbit/kernels/tuned/h100.json")
    print("| op | M | kernel and tile | MMA | wgmma waits | cp.async | TMA | smem | ptxas |")
    print("|---|---|---|---|---|---|---|---|---|")
    for op, M, what, info, usage, _ in rows:
        print(f"| {op} | {M} | {what} | {info.get('mma', '-')} | {info.get('wgmma waits', '-')} | "
              f"{info.get('cp.async', '-')} | {info.get('TMA', '-')} | {info.get('smem', '-')} | {usage} |")


if __name__ == "__main__":
    main()
