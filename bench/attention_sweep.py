"""Time decode attention over each KV cache format at one shape, for a few block sizes and warp counts.

    python bench/attention_sweep.py [--batch 64] [--context 4096]

Prints microseconds per call and the cache bytes read per second: replayed from a CUDA graph (as the
engine's decode step runs it) over enough copies of the cache that each call reads it from HBM, not
from L2 (``--eager``: medians of triton.testing.do_bench on one cache, launch overhead included).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402

from lowbit.bench.kernels import _copies, _rotating, time_us  # noqa: E402
from lowbit.kernels.attention import decode_attention, quantize_kv, splits_for  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--formats", default="fp16,int8,int4,int4/32,fp8_e4m3",
                    help="cache formats to time; int4/32: int4 with scales per 32 channels")
    ap.add_argument("--blocks", default="32,64,128", help="tokens per loop step (block_s)")
    ap.add_argument("--warps", default="2,4,8")
    ap.add_argument("--splits", default="",
                    help="multiples of splits_for()'s split count to try, e.g. 1,2,4,8 (default: 1 only); more "
                    "splits = more programs per SM to hide the cache's load latency")
    ap.add_argument("--stages", default="", help="num_stages values to try (default: Triton's)")
    ap.add_argument("--eager", action="store_true", help="time eager calls with do_bench instead of graph replays")
    args = ap.parse_args()
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    B, L, Hkv, Hq, D = args.batch, args.context, 8, 32, 128
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    q = torch.randn(B, Hq, D, device=dev, dtype=torch.float16)
    lengths = torch.full((B,), L, dtype=torch.int32, device=dev)
    print(f"{torch.cuda.get_device_name(dev)}: B={B} context={L} heads {Hq}/{Hkv} head_dim {D}")
    formats = [(f.split("/")[0], int(f.split("/")[1]) if "/" in f else None) for f in args.formats.split(",")]
    best: dict[str, tuple[float, str]] = {}
    for fmt, group in formats:
        probe = quantize_kv(torch.randn(1, Hkv, L, D, device=dev, dtype=torch.float16), fmt, group)
        nbytes = 2 * B * (probe.codes.nbytes + (probe.scales.nbytes if probe.scales.ndim > 1 else 0))
        copies = 1 if args.eager else _copies(nbytes)  # slots of several batches: each call reads new bytes
        t = torch.randn(B * copies, Hkv, L, D, device=dev, dtype=torch.float16)
        k = quantize_kv(t, fmt, group)
        v = quantize_kv(t.flip(2), fmt, group)
        del t
        slot_sets = [torch.arange(c * B, (c + 1) * B, dtype=torch.int32, device=dev) for c in range(copies)]
        for block_s in ints(args.blocks):
            for warps in ints(args.warps):
                for mult in ints(args.splits) or [1]:
                    for stages in ints(args.stages) or [None]:
                        n = splits_for(B, Hkv, L, sms, block_s) * mult
                        n = min(n, -(-L // block_s))
                        how = f"block_s {block_s:<4} warps {warps} splits {n:<3} stages {stages or '-'}"
                        def attend(slots, n=n, block_s=block_s, warps=warps, stages=stages, k=k, v=v):
                            return decode_attention(q, k, v, lengths, slots, block_s=block_s, n_splits=n, check=False,
                                                    num_warps=warps, num_stages=stages)

                        call = _rotating(attend, slot_sets)
                        try:
                            us = triton.testing.do_bench(call) * 1e3 if args.eager else time_us(call)
                        except Exception as exc:  # a config the compiler rejects
                            print(f"{fmt}/{group} {how}: {type(exc).__name__}")
                            continue
                        print(f"{fmt:<9} g{group or D:<4} {how}  {us:9.1f} us  {nbytes / us / 1e3:7.0f} GB/s", flush=True)
                        key = f"{fmt} g{group or D}"
                        if key not in best or us < best[key][0]:
                            best[key] = (us, how)
        del k, v
        torch.cuda.empty_cache()
    print("\n| cache | best us per layer | config |\n|---|---|---|")
    for key, (us, how) in best.items():
        print(f"| {key} | {us:.1f} | {how} |")


if __name__ == "__main__":
    main()
