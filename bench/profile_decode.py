"""Where a graphed decode step spends its time: GPU kernel time per kernel family, and GEMM times in graphs.

    python bench/profile_decode.py [--schemes fp16,w4a8] [--batch 1] [--context 512] [--steps 8]

Two measurements on a Llama-3-8B-shaped model with random weights (``lowbit.bench.synthetic``):

1. The engine's CUDA-graph decode step under ``torch.profiler``: kernel time per step grouped by kernel
   name, the sum of kernel times against the step's wall time (the gap is idle GPU time between
   kernels), for each scheme.
2. Each Llama-3-8B GEMM at M = ``--batch``, timed as 50 calls replayed from one CUDA graph (no launch
   overhead, as in the engine), split into the activation quantization and the GEMM kernel, beside
   cuBLAS fp16 (``lowbit.bench.kernels.time_us``).
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch


def _family(name: str) -> str:
    """A short name for a kernel: Triton kernels by function name, cuBLAS/cutlass and others by a stem."""
    for pat, fam in (("cutlass", "CUTLASS GEMM"), ("gemm|gemv|sm90_|sm80_|cublas|nvjet", "cuBLAS GEMM"), ("elementwise|vectorized", "torch elementwise"),
                     ("reduce", "torch reduce"), ("Memcpy|memcpy", "memcpy"), ("Memset|memset", "memset")):
        if re.search(pat, name) and not name.startswith("_"):
            return fam
    return name.split("(")[0][:48]


def profile_step(model, batch: int, context: int, steps: int) -> tuple[float, dict[str, tuple[int, float]]]:
    """(wall ms per step, {kernel family: (launches per step, us per step)}) of graphed decode."""
    from lowbit.bench.e2e import _decode, _fill_random
    from lowbit.engine.scheduler import Engine

    engine = Engine(model, max_slots=batch, max_len=context + 4 * steps + 16, prefill_chunk=16,
                    graph_batch_sizes=[batch])
    _fill_random(engine.cache)
    slots = list(range(batch))
    vocab = model.config.vocab_size
    tokens = torch.randint(0, vocab, (batch,)).tolist()

    def decode(n: int, start: int) -> None:  # as the engine runs a steady greedy batch (lowbit.bench.e2e._decode)
        _decode(engine, slots, tokens, context + start, n)

    decode(3, 0)
    torch.cuda.synchronize()
    t = time.perf_counter()
    decode(steps, 3)
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t) / steps * 1e3
    graph = engine.graphs.graphs[batch]  # the step alone: replays back to back, no argmax, no host sync
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        graph.replay()
    torch.cuda.synchronize()
    replay_ms = (time.perf_counter() - t) / steps * 1e3
    print(f"  graph replays back to back: {replay_ms:.3f} ms/step (the engine's loop adds "
          f"{(wall_ms - replay_ms) * 1e3:.0f} us per step)")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        decode(steps, 3 + steps)
        torch.cuda.synchronize()
    fams: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            f = fams[_family(e.name)]
            f[0] += 1
            f[1] += e.time_range.elapsed_us()
    return wall_ms, {k: (round(v[0] / steps), v[1] / steps) for k, v in fams.items()}


def gemm_rows(M: int) -> list[tuple[str, str, float, float]]:
    """(shape, path, us per call in a graph, GB/s of weights) for the 8B GEMMs at M: fp16, w4a16 and
    w4a8 as dispatch runs them, then the w4a8 path's two kernels apart (the activation quantization,
    and the GEMM in the weight order this GPU's table packs the shape in: "w4a8-gemm" rows order,
    "w4a8-cutlass" CUTLASS's)."""
    from lowbit.bench.kernels import _copies, _random_cutlass_w4a8, _random_int4, _rotating, build, time_us
    from lowbit.kernels.act_quant import quantize_activations
    from lowbit.kernels.dispatch import choose, layout_tile, weight_order
    from lowbit.kernels.w4a8 import w4a8_matmul

    shapes = {"qkv": (6144, 4096), "o": (4096, 4096), "gateup": (28672, 4096), "down": (4096, 14336)}
    rows = []
    dev = torch.device("cuda")
    for sname, (N, K) in shapes.items():
        order = weight_order(dev, "w4a8", N, K)
        for path in ("fp16", "w4a16", "w4a8", "act-quant", "w4a8-gemm" if order == "rows" else "w4a8-cutlass"):
            if path in ("w4a8-gemm", "w4a8-cutlass", "act-quant"):  # the two kernels of the w4a8 path, apart
                x = torch.randn(M, K, device=dev, dtype=torch.float16)
                xq, xs = quantize_activations(x)
                cfg = choose("w4a8", M, N, K, dev, order).config
                if path == "act-quant":
                    fn, nbytes = (lambda x=x: quantize_activations(x)), x.nbytes
                elif path == "w4a8-cutlass":
                    from lowbit.kernels.cutlass_w4a8 import w4a8_cutlass

                    packs = [_random_cutlass_w4a8(N, K, dev, "int") for _ in range(_copies(N * K // 2))]
                    fn = _rotating(lambda p, xq=xq, xs=xs, cfg=cfg: w4a8_cutlass(xq, xs, p, cfg), packs)
                    nbytes = packs[0].nbytes()
                else:
                    tile = layout_tile(dev, "w4a8")
                    packs = [_random_int4(N, K, None, dev, tile) for _ in range(_copies(N * K // 2))]
                    fn = _rotating(lambda p, xq=xq, xs=xs, cfg=cfg: w4a8_matmul(xq, xs, p, torch.float16, None, cfg), packs)
                    nbytes = packs[0].nbytes()
            else:
                make, nbytes = build(path, N, K, M, dev)
                fn, _ = make()
            us = time_us(fn)
            rows.append((sname, path, us, nbytes / us / 1e3))
    return rows


def main() -> None:
    from lowbit.bench.synthetic import LLAMA3_8B, quantize_rtn, random_model
    from lowbit.engine.inference import prepare_for_inference

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schemes", default="fp16,w4a8")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--no-gemms", action="store_true", help="skip the per-GEMM graph timings")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__)
    if not args.no_gemms:
        print(f"\n8B GEMMs at M={args.batch}, 50 calls replayed from a CUDA graph")
        print(f"{'shape':<8} {'path':<10} {'us':>8} {'GB/s':>7}")
        for sname, path, us, gbps in gemm_rows(args.batch):
            print(f"{sname:<8} {path:<10} {us:8.2f} {gbps:7.0f}")
    for scheme in args.schemes.split(","):
        model = random_model(LLAMA3_8B, "cuda", torch.float16)
        if scheme != "fp16":
            quantize_rtn(model, scheme, progress=False)
        torch.cuda.empty_cache()
        prepare_for_inference(model)
        wall, fams = profile_step(model, args.batch, args.context, args.steps)
        busy = sum(us for _, us in fams.values())
        print(f"\n{scheme} batch {args.batch}: {wall:.3f} ms/step wall, {busy / 1e3:.3f} ms of kernels "
              f"({sum(n for n, _ in fams.values())} launches)")
        for name, (n, us) in sorted(fams.items(), key=lambda kv: -kv[1][1])[:14]:
            print(f"  {us:8.1f} us {n:5d}x  {us / max(n, 1):6.2f} us each  {name}")
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
