"""Record every decision a quantization recipe makes, per layer, to compare two devices (issue 21, item 1).

    python bench/recipe_trace.py MODEL --scheme w4a8 --device cpu --out /tmp/trace-cpu.pt [--samples 128]
    python bench/recipe_trace.py MODEL --scheme w4a8 --perturb 1e-7 --out /tmp/trace-cpu-noise.pt
    python bench/recipe_trace.py MODEL --scheme w4a8 --perturb 1e-7 --noise-seed 3 --eval --out /tmp/t3.pt
    python bench/recipe_trace.py --compare /tmp/trace-cpu.pt /tmp/trace-cuda.pt
    python bench/recipe_trace.py --spread /tmp/t*.pt

The first form quantizes MODEL (fp32, on ``--device``) as ``lowbit eval`` does (the wiki calibration
split, ``--samples`` windows of 512, seed 0) and writes, in call order: each smoothing search's alpha
and factors, each clipping search's per-row ratios, each GPTQ / RTN call's codes (one hash and one
count of zeros per output row) and scales, and the hidden states leaving each decoder layer (float64
sums, and the first 16 tokens of the first window). Nothing
in the library changes: the recipe's own functions are wrapped while it runs.

The second form prints, per layer, where the two traces part: alphas that differ, rows whose clipping
ratio differs, the fraction of codes that differ, and how far the layer's output hidden states are
apart, so the first layer (and step) where two devices choose differently is named.

``--eval`` adds the quantized model's perplexity on the wiki eval split (every window of 512, as
``lowbit eval``) to the trace; ``--noise-seed`` draws another perturbation. ``--spread`` prints the
perplexities of several traces and their spread: how far a recipe's result moves under rounding-
sized noise alone, the yardstick for a difference between two devices.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402


def _row_hashes(codes: torch.Tensor) -> torch.Tensor:
    """(N,) int64: one number per output row of the integer codes (N, K), equal for equal rows (a
    weighted sum with fixed pseudo-random weights), so traces stay small (no codes are stored)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randint(1, 1 << 20, (codes.shape[1],), generator=g, dtype=torch.int64)
    return (codes.detach().cpu().long() * w[None, :]).sum(1)


def record(model_name: str, scheme: str, device: str, samples: int, perturb: float = 0.0, noise_seed: int = 0,
           evaluate_ppl: bool = False) -> dict:
    from lowbit import load_model
    from lowbit.eval.calibration import quantize
    from lowbit.quant import calibrate, clip, gptq, smooth

    calls: list[dict] = []
    originals = {
        (smooth, "search_smooth_alpha"): smooth.search_smooth_alpha,
        (clip, "search_clip"): clip.search_clip,
        (gptq, "gptq_quantize"): gptq.gptq_quantize,
        (gptq, "rtn_quantize"): gptq.rtn_quantize,
        (calibrate, "_run_layer"): calibrate._run_layer,
    }

    def smooth_alpha(x, weights, *a, **k):  # noqa: ANN001, ANN202
        alpha, s = originals[(smooth, "search_smooth_alpha")](x, weights, *a, **k)
        calls.append({"kind": "smooth", "alpha": float(alpha), "s": s.detach().double().cpu().clone(),
                      "x_sum": float(x.double().sum())})
        return alpha, s

    def search_clip(w, H, *a, **k):  # noqa: ANN001, ANN202
        ratio = originals[(clip, "search_clip")](w, H, *a, **k)
        calls.append({"kind": "clip", "ratio": ratio.detach().float().cpu().clone(), "H_trace": float(H.double().diagonal().sum()),
                      "w_sum": float(w.double().sum())})
        return ratio

    def quantized(kind):  # noqa: ANN001, ANN202
        def run(w, *a, **k):  # noqa: ANN001, ANN202
            out = originals[(gptq, kind)](w, *a, **k)
            qw = out[0] if isinstance(out, tuple) else out  # GPTQ also returns the outlier columns, RTN does not
            calls.append({"kind": kind, "name": k.get("name", ""), "rows": _row_hashes(qw.codes),
                          "zeros": (qw.codes == 0).sum(1).cpu(), "scale": qw.scale.detach().float().cpu().clone()})
            return out
        return run

    def run_layer(model, layer, hidden, cfg):  # noqa: ANN001, ANN202
        out = originals[(calibrate, "_run_layer")](model, layer, hidden, cfg)
        if perturb:  # rounding-sized noise on what the next layer sees: which decisions does it flip?
            # drawn on the CPU: the same noise on every device (a CUDA generator draws other numbers)
            g = torch.Generator().manual_seed(len(calls) + 1_000_003 * noise_seed)
            out = out * (1 + perturb * torch.randn(out.shape, generator=g, dtype=out.dtype).to(out.device))
        calls.append({"kind": "hidden", "sum": float(out.double().sum()), "abs_sum": float(out.double().abs().sum()),
                      "first": out[0, :16].detach().float().cpu().clone()})
        return out

    wrappers = {(smooth, "search_smooth_alpha"): smooth_alpha, (clip, "search_clip"): search_clip,
                (gptq, "gptq_quantize"): quantized("gptq_quantize"), (gptq, "rtn_quantize"): quantized("rtn_quantize"),
                (calibrate, "_run_layer"): run_layer}
    loaded = load_model(model_name, device=device, dtype="fp32")
    for (mod, attr), fn in wrappers.items():
        setattr(mod, attr, fn)
    try:
        quantize(loaded, scheme, "wiki", samples=samples, seq_len=512, seed=0)
    finally:
        for (mod, attr), fn in originals.items():
            setattr(mod, attr, fn)
    ppl = None
    if evaluate_ppl:
        from lowbit.eval.perplexity import evaluate
        ppl = evaluate(loaded, "wiki", seq_len=512).ppl
    if device.startswith("cuda"):
        device += f" ({torch.cuda.get_device_name()})"
    return {"model": model_name, "scheme": scheme, "device": device, "perturb": perturb, "noise_seed": noise_seed,
            "samples": samples, "torch": torch.__version__, "ppl": ppl, "calls": calls}


def _label(t: dict) -> str:
    """The trace's device, and its perturbation if any."""
    return t["device"] + (f" perturb {t['perturb']:g} seed {t['noise_seed']}" if t.get("perturb") else "")


def _layers(calls: list[dict]) -> list[list[dict]]:
    """The calls split at each layer's end: the first "hidden" record after its weights were quantized
    (the statistics pass runs the layer too, before)."""
    out, cur = [], []
    for c in calls:
        cur.append(c)
        if c["kind"] == "hidden" and any(x["kind"] in ("gptq_quantize", "rtn_quantize") for x in cur):
            out.append(cur)
            cur = []
    if cur:
        out.append(cur)
    return out


def layer_diffs(a: dict, b: dict) -> list[dict]:
    """Per layer of two traces: the smoothing alphas of each, how many clipping rows and how many
    quantized rows (codes) differ out of how many, and the distance of the layer's output hidden states
    (``hidden_rel``: of the float64 sums, relative to A's sum of |h|; ``first_rel``: max |A - B| over
    max |A| of the stored tokens)."""
    out = []
    for ca, cb in zip(_layers(a["calls"]), _layers(b["calls"])):
        clip_a = [c for c in ca if c["kind"] == "clip"]
        clip_b = [c for c in cb if c["kind"] == "clip"]
        qa = [c for c in ca if c["kind"] in ("gptq_quantize", "rtn_quantize")]
        qb = [c for c in cb if c["kind"] in ("gptq_quantize", "rtn_quantize")]
        ha = next((c for c in reversed(ca) if c["kind"] == "hidden"), None)
        hb = next((c for c in reversed(cb) if c["kind"] == "hidden"), None)
        both = ha is not None and hb is not None
        out.append({
            "alphas_a": [c["alpha"] for c in ca if c["kind"] == "smooth"],
            "alphas_b": [c["alpha"] for c in cb if c["kind"] == "smooth"],
            "clip_rows_differ": sum(int((x["ratio"] != y["ratio"]).sum()) for x, y in zip(clip_a, clip_b)),
            "clip_rows": sum(x["ratio"].numel() for x in clip_a),
            "code_rows_differ": sum(int((x["rows"] != y["rows"]).sum()) for x, y in zip(qa, qb)),
            "code_rows": sum(x["rows"].numel() for x in qa),
            "hidden_rel": abs(ha["sum"] - hb["sum"]) / max(abs(ha["abs_sum"]), 1e-30) if both else float("nan"),
            "first_rel": ((ha["first"] - hb["first"]).abs().max() / ha["first"].abs().max()).item()
            if both else float("nan"),
        })
    return out


def compare(a: dict, b: dict) -> None:
    print(f"A: {_label(a)} torch {a['torch']}   B: {_label(b)} torch {b['torch']}   "
          f"{a['model']} {a['scheme']} samples {a['samples']}/{b['samples']}")
    na, nb = len(_layers(a["calls"])), len(_layers(b["calls"]))
    if na != nb:
        print(f"the traces have {na} and {nb} layers")
    print(f"{'layer':>5} {'alphas A':>20} {'alphas B':>20} {'clip rows differ':>17} {'code rows differ':>22} "
          f"{'hidden rel diff':>16} {'tokens max rel':>15}")
    alphas = lambda xs: ",".join(f"{x:.2f}" for x in xs) or "-"  # noqa: E731
    for i, d in enumerate(layer_diffs(a, b)):
        clip_txt = f"{d['clip_rows_differ']}/{d['clip_rows']}" if d["clip_rows"] else "-"
        pct = 100 * d["code_rows_differ"] / max(d["code_rows"], 1)
        print(f"{i:>5} {alphas(d['alphas_a']):>20} {alphas(d['alphas_b']):>20} {clip_txt:>17} "
              f"{d['code_rows_differ']:>8}/{d['code_rows']:<6} ({pct:5.1f}%) {d['hidden_rel']:16.2e} {d['first_rel']:15.2e}")


def spread(traces: list[dict]) -> None:
    """Print each trace's perplexity and, per scheme and device, the spread (max - min over the mean)."""
    groups: dict[tuple[str, str], list[float]] = {}
    for t in traces:
        ppl = t.get("ppl")
        print(f"{t['scheme']:<12} {_label(t):<44} ppl {ppl if ppl is None else f'{ppl:.3f}'}")
        if ppl is not None:
            groups.setdefault((t["scheme"], t["device"]), []).append(ppl)
    for (scheme, dev), ps in groups.items():
        mean = sum(ps) / len(ps)
        print(f"{scheme} on {dev}: {len(ps)} runs, min {min(ps):.3f} max {max(ps):.3f} mean {mean:.3f}, "
              f"spread {100 * (max(ps) - min(ps)) / mean:.2f}% of the mean")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="smollm2-135m")
    ap.add_argument("--scheme", default="w4a8")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--samples", type=int, default=128, help="calibration windows of 512 tokens")
    ap.add_argument("--perturb", type=float, default=0.0,
                    help="multiply each layer's output hidden states by 1 + PERTURB * N(0, 1) (e.g. 1e-7: a rounding-"
                    "sized difference, as another device's arithmetic makes) to see which decisions it flips")
    ap.add_argument("--noise-seed", type=int, default=0, help="which perturbation to draw (with --perturb)")
    ap.add_argument("--eval", action="store_true", help="also evaluate the quantized model's wiki perplexity")
    ap.add_argument("--spread", nargs="+", metavar="TRACE", help="print the perplexities of traces and their spread")
    ap.add_argument("--out", help="where to write the trace (torch.save; written to a temporary file, then renamed)")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), help="print where two traces part")
    args = ap.parse_args()
    if args.compare:
        compare(*(torch.load(p, weights_only=False) for p in args.compare))
        return
    if args.spread:
        spread([torch.load(p, weights_only=False) for p in args.spread])
        return
    if not args.out:
        ap.error("--out is needed to record a trace")
    trace = record(args.model, args.scheme, args.device, args.samples, args.perturb, args.noise_seed, args.eval)
    tmp = f"{args.out}.tmp"
    torch.save(trace, tmp)
    os.replace(tmp, args.out)
    ppl = f", perplexity {trace['ppl']:.3f}" if trace["ppl"] is not None else ""
    print(f"wrote {args.out}: {len(trace['calls'])} calls{ppl}")


if __name__ == "__main__":
    main()
