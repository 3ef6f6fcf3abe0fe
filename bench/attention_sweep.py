"""Time decode attention over each KV cache format at one shape, for a few block sizes and warp counts.

    python bench/attention_sweep.py [--batch 64] [--context 4096]

Prints microseconds per call (medians of triton.testing.do_bench) and the cache bytes read per second.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402

from lowbit.kernels.attention import decode_attention, quantize_kv, splits_for  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=4096)
    args = ap.parse_args()
    B, L, Hkv, Hq, D = args.batch, args.context, 8, 32, 128
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    q = torch.randn(B, Hq, D, device=dev, dtype=torch.float16)
    lengths = torch.full((B,), L, dtype=torch.int32, device=dev)
    slots = torch.arange(B, dtype=torch.int32, device=dev)
    print(f"{torch.cuda.get_device_name(dev)}: B={B} context={L} heads {Hq}/{Hkv} head_dim {D}")
    for fmt, group in (("fp16", None), ("int8", None), ("int4", None), ("int4", 32), ("fp8_e4m3", None)):
        t = torch.randn(B, Hkv, L, D, device=dev, dtype=torch.float16)
        k = quantize_kv(t, fmt, group)
        v = quantize_kv(t.flip(2), fmt, group)
        nbytes = 2 * (k.codes.nbytes + (k.scales.nbytes if k.scales.ndim > 1 else 0))
        del t
        for block_s in (32, 64, 128):
            for warps in (2, 4, 8):
                n = splits_for(B, Hkv, L, sms, block_s)
                try:
                    us = triton.testing.do_bench(lambda: decode_attention(
                        q, k, v, lengths, slots, block_s=block_s, n_splits=n, check=False, num_warps=warps)) * 1e3
                except Exception as exc:  # a config the compiler rejects
                    print(f"{fmt}/{group} block {block_s} warps {warps}: {type(exc).__name__}")
                    continue
                print(f"{fmt:<9} g{group or D:<4} block_s {block_s:<4} warps {warps}  {us:9.1f} us  "
                      f"{nbytes / us / 1e3:7.0f} GB/s", flush=True)
        del k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
