"""Accuracy ablations behind docs/quantization.md: which part of a scheme costs the perplexity.

Runs ``lowbit.eval.report.run_eval`` on the default model with schemes built in code (variants of
the presets), prints the table and writes JSON. Not run in CI (it needs minutes on a GPU):

    python bench/ablate_accuracy.py --device cuda --json ablation.json

Variants:
- w4-asym-g32-rtn: re-quantizing on the grid the GGUF weights already lie on (Q4_1: 4-bit, group
  32, a scale and an offset per group). Near-zero loss here shows the pipeline itself is sound.
- fp8 weights only / fp8 activations only: which half of w8a8-fp8 costs.
- w4a16 (GPTQ) at group 32 / 64 / 128 / per-channel: the cost of coarser groups on this model.
- w4a4 with 32 / 64 / 128 / 256 outlier columns: QUIK's accuracy against its bits.
- COMET's FMPQ without the 4-bit KV cache, and with it.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from lowbit.eval.report import EvalSettings, format_table, run_eval, write_json
from lowbit.formats import PRESETS, ActivationFormat, KVCacheFormat, QuantScheme, WeightFormat


def variants() -> list[QuantScheme]:
    w4a16 = PRESETS["w4a16"]
    quik = PRESETS["w4a4-quik"]
    comet = PRESETS["w4a4kv4-comet"]
    out = [
        QuantScheme("w4-asym-g32-rtn", WeightFormat(symmetric=False, group_size=32, method="rtn")),
        QuantScheme("w8fp8-a16", WeightFormat(bits=8, dtype="fp8_e4m3", group_size=None, method="rtn")),
        QuantScheme("w8int-a8fp8", WeightFormat(bits=8, group_size=None, method="rtn"),
                    ActivationFormat(bits=8, dtype="fp8_e4m3")),
        QuantScheme("w8int-a8int", WeightFormat(bits=8, group_size=None, method="rtn"), ActivationFormat(bits=8)),
    ]
    for g in (32, 64, None):
        out.append(replace(w4a16, name=f"w4a16-g{g or 'channel'}", weights=replace(w4a16.weights, group_size=g)))
    for n in (32, 64, 128):
        out.append(replace(quik, name=f"w4a4-quik-{n}", activations=replace(quik.activations, outlier_columns=n)))
    out.append(replace(comet, name="w4a4-comet-kv16", kv_cache=KVCacheFormat()))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--max-chunks", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    rows, meta = run_eval(["smollm2-135m"], variants(), EvalSettings(max_chunks=args.max_chunks),
                          device=args.device, dtype=args.dtype)
    print(format_table(rows, meta))
    if args.json:
        write_json(args.json, rows, meta)


if __name__ == "__main__":
    main()
