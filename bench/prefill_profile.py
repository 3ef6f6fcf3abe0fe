"""Where one engine prefill's time goes: GPU kernel time against wall time, and the host's top functions.

    python bench/prefill_profile.py [--lengths 512,2048] [--batch 1] [--scheme fp16]

On a random-weight Llama-3-8B-shaped model (``lowbit.bench.synthetic``) prepared for inference, an
``Engine`` prefills ``--batch`` prompts of each length, as ``lowbit bench e2e`` times it. For each
length: the median wall time of three prefills after a warm-up; the GPU's busy time in one prefill
(the sum of its CUDA kernel durations, ``torch.profiler``), so ``GPU busy / wall`` near 1 means the
GPU bounds it and far below 1 that the host does; the host time per decoder layer; and the ten
functions with the most own time under cProfile.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch


def main() -> None:
    from lowbit.bench.e2e import _prefill_all
    from lowbit.bench.synthetic import LLAMA3_8B, quantize_rtn, random_model
    from lowbit.engine.inference import prepare_for_inference
    from lowbit.engine.scheduler import Engine

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="512,2048")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--scheme", default="fp16")
    args = ap.parse_args()
    model = random_model(LLAMA3_8B, "cuda", torch.float16)
    if args.scheme != "fp16":
        model = quantize_rtn(model, args.scheme)
    prepare_for_inference(model)
    layers = model.config.num_layers
    rows = []
    for L in (int(v) for v in args.lengths.split(",")):
        B = args.batch
        engine = Engine(model, max_slots=B, max_len=L + 16, prefill_chunk=L, prefill_tokens=B * L,
                        graph_batch_sizes=[B])
        prompts = torch.randint(0, model.config.vocab_size, (B, L)).tolist()

        def run(engine: Engine = engine, prompts: list = prompts) -> None:
            _prefill_all(engine, prompts)

        run()
        walls = []
        for _ in range(3):
            torch.cuda.synchronize()
            t = time.perf_counter()
            run()
            torch.cuda.synchronize()
            walls.append(time.perf_counter() - t)
        wall = statistics.median(walls)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            run()
            torch.cuda.synchronize()
        # self time: a kernel counted once, not again under the op that launched it
        gpu_us = sum(e.self_device_time_total for e in prof.key_averages())
        pr = cProfile.Profile()
        pr.enable()
        run()
        pr.disable()
        torch.cuda.synchronize()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(10)
        print(f"--- B={B} L={L}: cProfile of one prefill, by own time")
        print("\n".join(s.getvalue().splitlines()[6:20]))
        top = sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)[:8]
        print(f"--- B={B} L={L}: the kernels with the most GPU time")
        for e in top:
            print(f"  {e.self_device_time_total / 1e3:8.2f} ms  {e.count:5d}x  {e.key[:100]}")
        rows.append((B, L, wall * 1e3, gpu_us / 1e3, B * L / wall))
        del engine, run
    print(f"\nGPU: {torch.cuda.get_device_name()}; Llama-3-8B shape, {args.scheme}, {layers} layers")
    print("| batch | prompt | wall ms | GPU busy ms | GPU busy / wall | host ms per layer (wall - busy) | tok/s |")
    print("|---|---|---|---|---|---|---|")
    for B, L, w, g, tps in rows:
        print(f"| {B} | {L} | {w:.1f} | {g:.1f} | {g / w:.2f} | {(w - g) / layers:.2f} | {tps:.0f} |")


if __name__ == "__main__":
    main()
