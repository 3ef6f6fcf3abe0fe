"""Time every CUTLASS configuration of an op (``lowbit.kernels.cutlass_w4a16`` / ``cutlass_w4a8``) beside
cuBLAS fp16 (and cuBLAS fp8 for W4A8) and the path dispatch runs today, per layer and M, in one run
(issue 18).

On the GPU: 50 calls replayed from one CUDA graph, weights rotated past L2 (``lowbit.bench.kernels``).
W4A16: g128 symmetric weights. W4A8: per-channel weights, the activation quantization
(``quantize_activations``) included as in dispatch's path; cuBLAS fp8 is ``torch._scaled_mm`` on
activations already quantized. Needs ``LOWBIT_CUTLASS_DIR`` (the library is built on first use).
Writes the rows as JSON with ``--json`` and prints a table last.

    python bench/cutlass_sweep.py [--op w4a16|w4a8-fp8|w4a8] [--shapes llama3-8b,llama3-70b] [--m 1,16,64,...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from lowbit.bench.kernels import _copies, _rotating, build, parse_shapes, time_us
from lowbit.kernels import cutlass_w4a8, cutlass_w4a16
from lowbit.kernels.act_quant import quantize_activations
from lowbit.numerics.primitives import pack_int4


def _weights(op: str, N: int, K: int, n: int) -> tuple[list, tuple[torch.Tensor, torch.Tensor]]:
    """``n`` packed copies (rotated past L2) and the first one's codes (N, K) int8 and scales, which
    the candidates are checked against."""
    out, first = [], None
    for _ in range(n):
        c8 = torch.randint(-8, 8, (N, K), dtype=torch.int8, device="cuda")
        codes = pack_int4(c8)
        if op == "w4a16":
            scales = (torch.rand(N, K // 128, device="cuda") * 0.02 + 1e-3).half()
            out.append(cutlass_w4a16.pack_cutlass(codes, scales, K, 128))
        else:
            scales = torch.rand(N, device="cuda") * 0.02 + 1e-3
            out.append(cutlass_w4a8.pack_cutlass_w4a8(codes, scales, K, "fp8_e4m3" if op == "w4a8-fp8" else "int"))
        first = first or (c8, scales)
    return out, first


def _candidates(op: str, x: torch.Tensor, splits: list[int]):
    """(label, fn(weights)) for every compiled configuration of ``op`` at these activations."""
    if op == "w4a16":
        for tile in cutlass_w4a16.TILES:
            for s in (splits if tile.stream_k else [1]):
                cfg = dataclasses.replace(tile, splits=s)
                yield cfg.label(), lambda w, cfg=cfg: cutlass_w4a16.w4a16_cutlass(x, w, cfg)
        return
    adtype = "fp8_e4m3" if op == "w4a8-fp8" else "int"
    for tile in cutlass_w4a8.TILES:
        for s in (splits if tile.stream_k else [1]):
            cfg = dataclasses.replace(tile, splits=s)
            yield cfg.label(), lambda w, cfg=cfg: cutlass_w4a8.w4a8_cutlass(*quantize_activations(x, adtype), w, cfg)


def _reference(op: str, x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp32 y of the first weight copy, dequantized in PyTorch from its codes and scales, with the
    activation quantization the kernels do."""
    if op == "w4a16":
        wf = codes.float() * scales.float().repeat_interleave(128, dim=1)
        return x.float() @ wf.t()
    xq, xs = quantize_activations(x, "fp8_e4m3" if op == "w4a8-fp8" else "int")
    return (xq.float() * xs[:, None]) @ (codes.float() * scales.float()[:, None]).t()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--op", default="w4a16", choices=["w4a16", "w4a8-fp8", "w4a8"])
    ap.add_argument("--shapes", default="llama3-8b,llama3-70b")
    ap.add_argument("--m", default="1,16,32,64,128,256,512,1024,4096")
    ap.add_argument("--splits", default="1,2,4", help="splits tried on the stream-K configurations")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("cutlass_sweep times CUDA kernels: run it on a GPU")
    ms = [int(m) for m in args.m.split(",")]
    splits = [int(s) for s in args.splits.split(",")]
    rows = []
    for name, N, K in parse_shapes(args.shapes):
        packs, first = _weights(args.op, N, K, _copies(N * K // 2))
        for M in ms:
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            fp16 = time_us(build("fp16", N, K, M, "cuda")[0]()[0])
            fp8 = time_us(build("fp8-cublas", N, K, M, "cuda")[0]()[0]) if args.op != "w4a16" else None
            make, _ = build(args.op, N, K, M, torch.device("cuda"))
            fn, how = make()
            ours = time_us(fn)
            best = (float("inf"), "")
            per = {}
            ref = _reference(args.op, x, *first)
            for label, cand in _candidates(args.op, x, splits):
                try:
                    y = cand(packs[0]).float()
                    err = ((y - ref).norm() / ref.norm()).item()
                    if not err < 2e-3:  # a wrong result is reported, never timed as the best
                        per[label] = f"wrong: rel err {err:.3g}"
                        continue
                    t = time_us(_rotating(cand, packs))
                except Exception as e:  # a config that cannot run this shape is reported, not fatal
                    per[label] = f"error: {str(e).splitlines()[0][:80]}"
                    continue
                per[label] = t
                best = min(best, (t, label))
            rows.append({"layer": name, "N": N, "K": K, "M": M, "fp16_us": fp16, "fp8_cublas_us": fp8,
                         "dispatch_us": ours, "dispatch": how, "cutlass_us": best[0], "cutlass": best[1], "all": per})
            print(f"{name} M={M}: fp16 {fp16:.1f} us, dispatch {ours:.1f} ({how}), cutlass {best[0]:.1f} "
                  f"({best[1]})", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "op": args.op, "rows": rows}, f, indent=1)
    print(f"\n{torch.cuda.get_device_name()}, {args.op}, ratio over cuBLAS fp16 (50 graph-replayed calls, weights past L2)")
    print("| layer | M | fp16 us | cuBLAS fp8 x | dispatch x | CUTLASS x | CUTLASS / dispatch | best CUTLASS config |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        f8 = f"{r['fp16_us'] / r['fp8_cublas_us']:.2f}" if r["fp8_cublas_us"] else ""
        print(f"| {r['layer']} | {r['M']} | {r['fp16_us']:.1f} | {f8} | {r['fp16_us'] / r['dispatch_us']:.2f} | "
              f"{r['fp16_us'] / r['cutlass_us']:.2f} | {r['dispatch_us'] / r['cutlass_us']:.2f} | {r['cutlass']} |")


if __name__ == "__main__":
    main()
