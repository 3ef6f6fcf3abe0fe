"""Host time of one eager lowbit GEMM call, beside ``torch.matmul`` fp16, in one run.

    python bench/host_time.py [--schemes w4a16,w4a8,...] [--shape 6144x4096] [--ms 1,16] [--profile]

For each scheme one Llama-3-8B-shaped Linear (qkv: N 6144 x K 4096 by default) is quantized by
round-to-nearest (``lowbit.bench.synthetic.rtn_linear``), its kernels prepared, and called eagerly
(no CUDA graph), as prefill and every eager user call run it. Three figures per (scheme, M):
- ``host us``: wall time per call of 300 back-to-back calls without synchronizing (the GPU queue
  never fills), i.e. what Python, the dispatcher and the launches cost on the CPU per call;
- ``do_bench us``: ``triton.testing.do_bench`` median (max of host and GPU time per call);
- ``matmul us``: the same two for ``torch.matmul`` on the fp16 weight.
``--profile`` prints the ten functions with the most own time under cProfile for each scheme.
A second table splits one M=1 call per scheme into its kernel launches and times each three ways:
through Triton's JIT (``kernel[grid](...)``), through ``lowbit.kernels.launch.triton_launch`` (the
path the wrappers take), and through the compiled launcher alone (the floor); what is left of the
call's host time is the wrappers' Python (checks, allocations, dispatch).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch


def host_us(fn, calls: int = 300) -> float:  # noqa: ANN001
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


def main() -> None:
    import triton.testing

    from lowbit.bench.synthetic import input_choices, rtn_linear
    from lowbit.formats import get_scheme

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--schemes", default="w4a16,w4a8,w4a8-g128,w8a8-fp8,w8a8-int8,w4a4,w4a4kv4-comet,w4a16-2:4")
    ap.add_argument("--shape", default="6144x4096")
    ap.add_argument("--ms", default="1,16")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    N, K = (int(v) for v in args.shape.split("x"))
    dev = torch.device("cuda")
    lin = torch.nn.Linear(K, N, bias=False, device=dev, dtype=torch.float16)
    rows, launches = [], []
    for M in (int(m) for m in args.ms.split(",")):
        x = torch.randn(M, K, device=dev, dtype=torch.float16)
        mm = lambda: torch.matmul(x, lin.weight.t())  # noqa: E731
        rows.append(("fp16 torch.matmul", M, host_us(mm), triton.testing.do_bench(mm, return_mode="median") * 1e3))
        with torch.inference_mode():  # the module call, as a lowbit layer is called
            rows.append(("fp16 nn.Linear", M, host_us(lambda: lin(x)),
                         triton.testing.do_bench(lambda: lin(x), return_mode="median") * 1e3))
        for name in args.schemes.split(","):
            scheme = get_scheme(name)
            wfmt, afmt = scheme.for_layer("layers.0.self_attn.qkv_proj")
            q = rtn_linear(lin, wfmt, afmt, input_choices(K, afmt, torch.Generator().manual_seed(0)),
                           smooth=scheme.smooth)
            if not q.prepare_kernels():
                rows.append((name, M, float("nan"), float("nan")))
                continue
            call = lambda: q(x)  # noqa: E731
            with torch.inference_mode():
                rows.append((name, M, host_us(call), triton.testing.do_bench(call, return_mode="median") * 1e3))
                if M == 1:
                    launches.extend(split_launches(name, call))
                if args.profile and M == 1:
                    prof = cProfile.Profile()
                    prof.enable()
                    for _ in range(200):
                        call()
                    prof.disable()
                    torch.cuda.synchronize()
                    s = io.StringIO()
                    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(10)
                    print(f"--- {name} M={M}: cProfile of 200 calls, by own time")
                    print("\n".join(s.getvalue().splitlines()[6:20]))
    print(f"\nGPU: {torch.cuda.get_device_name()}; layer {N}x{K}; eager calls")
    print("| path | M | host us/call | do_bench us |")
    print("|---|---|---|---|")
    for name, M, h, d in rows:
        print(f"| {name} | {M} | {h:.1f} | {d:.1f} |")
    print("\nM=1, host us per launch: Triton JIT | triton_launch | compiled launcher alone")
    print("| path | kernel | JIT | triton_launch | launcher |")
    print("|---|---|---|---|---|")
    for name, kname, jit, fast, floor in launches:
        print(f"| {name} | {kname} | {jit:.1f} | {fast:.1f} | {floor:.1f} |")


def split_launches(name: str, call) -> list[tuple]:  # noqa: ANN001
    """Each kernel launch of one ``call()``, timed through the JIT, ``triton_launch`` and the launcher."""
    from lowbit.kernels.launch import compiled_launcher, record_launches, triton_launch

    with record_launches() as rec:
        call()
    out = []
    for kernel, grid, a, kw in rec:
        floor = compiled_launcher(kernel, grid, a, kw)
        out.append((name, kernel.fn.__name__, host_us(lambda: kernel[grid](*a, **kw)),
                    host_us(lambda: triton_launch(kernel, grid, *a, **kw)),
                    host_us(floor) if floor else float("nan")))
    return out


if __name__ == "__main__":
    main()
