"""Time calibration (GPTQ, clipping and smoothing searches) on a random-weight model of a real shape.

    python bench/gptq_speed.py --shape llama3-8b --schemes w4a16,w4a8            # all 32 layers
    python bench/gptq_speed.py --shape llama3-70b --layers 2 --schemes w4a16     # 2 of 80, extrapolated

The model lives on the CPU (bf16 by default) and ``lowbit.quant.calibrate.quantize_model`` moves one
decoder layer at a time to ``--device``, as it does for a real checkpoint; calibration inputs are
random token ids (``--samples`` windows of ``--seq-len``). Every layer of one shape does the same
work, so with ``--layers L`` below the model's depth the time per layer is measured on L layers and
multiplied by the depth (printed as "extrapolated"); the embedding and the head are not quantized by
these presets.

Time is split by phase, exclusive of nested phases, each phase ending in a device synchronize:
``forward`` (the calibration inputs through the float or the quantized layer; the Hessian, absmax
and sample hooks run inside the first pass and are ``hessian``), ``smooth`` (SmoothQuant alpha
search), ``clip`` (clipping search), ``cholesky`` (dampened inverse), ``sweep`` (GPTQ's column loop),
``other`` (the rest: moving layers, packing QuantLinears).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import contextmanager

import torch

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # after $PYTHONPATH: GPTQ_OLD can win

from lowbit.bench.synthetic import LLAMA3_8B, LLAMA3_70B, random_model  # noqa: E402
from lowbit.errors import LowbitError  # noqa: E402
from lowbit.quant import calibrate, clip, gptq, smooth  # noqa: E402

SHAPES = {"llama3-8b": LLAMA3_8B, "llama3-70b": LLAMA3_70B}
TARGET_S = {"llama3-8b": 5 * 60, "llama3-70b": 60 * 60}  # issue 21 item 3, one H200


class PhaseTimer:
    """Exclusive wall time per phase; nested phases are subtracted from their parent."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.totals: dict[str, float] = {}
        self._stack: list[list[float]] = []  # [start, child time]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def phase(self, name: str):  # noqa: ANN201
        self._sync()
        frame = [time.perf_counter(), 0.0]
        self._stack.append(frame)
        try:
            with torch.profiler.record_function(f"phase:{name}"):  # labels the phase in --profile's table
                yield
        finally:
            self._sync()
            elapsed = time.perf_counter() - frame[0]
            self._stack.pop()
            self.totals[name] = self.totals.get(name, 0.0) + elapsed - frame[1]
            if self._stack:
                self._stack[-1][1] += elapsed

    def wrap(self, module, attr: str, name: str) -> None:  # noqa: ANN001
        fn = getattr(module, attr)

        def timed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            with self.phase(name):
                return fn(*args, **kwargs)

        setattr(module, attr, timed)


def _instrument(timer: PhaseTimer) -> None:
    timer.wrap(calibrate, "_run_layer", "forward")
    timer.wrap(calibrate._GroupStats, "add", "hessian")
    timer.wrap(smooth, "search_smooth_alpha", "smooth")
    timer.wrap(clip, "search_clip", "clip")
    timer.wrap(gptq, "_inverse_hessian_cholesky", "cholesky")
    timer.wrap(gptq, "_gptq_blocks", "sweep")


def run(shape: str, scheme: str, layers: int | None, samples: int, seq_len: int, device: str, dtype: str,
        seed: int = 0, profile: bool = False) -> dict:
    cfg = dict(SHAPES[shape])
    depth = cfg["num_hidden_layers"]
    n = depth if layers is None else layers
    if not 1 <= n <= depth:
        raise LowbitError(f"--layers must be in 1..{depth} for {shape}, got {n}")
    cfg["num_hidden_layers"] = n
    dev = torch.device(device)
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    # random weights drawn on the device (fast), then kept on the CPU as a loaded checkpoint would be
    model = random_model(cfg, dev, torch_dtype, seed=seed).to("cpu")
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    ids = torch.randint(0, cfg["vocab_size"], (samples, seq_len), generator=torch.Generator().manual_seed(seed))
    timer = PhaseTimer(dev)
    saved = {(m, a): getattr(m, a) for m, a in [(calibrate, "_run_layer"), (calibrate._GroupStats, "add"),
                                                (smooth, "search_smooth_alpha"), (clip, "search_clip"),
                                                (gptq, "_inverse_hessian_cholesky"), (gptq, "_gptq_blocks")]}
    _instrument(timer)
    prof = None
    try:
        if profile:
            acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev.type == "cuda" else [])
            prof = torch.profiler.profile(activities=acts)
            prof.__enter__()
        with timer.phase("other"):
            calibrate.quantize_model(model, scheme, ids, calibrate.CalibrationConfig(samples=samples, seq_len=seq_len),
                                     device=dev, progress=True)
    finally:
        if prof is not None:
            prof.__exit__(None, None, None)
            _print_profile(prof, dev)
        for (m, a), fn in saved.items():
            setattr(m, a, fn)
    total = sum(timer.totals.values())
    per_layer = total / n
    row = {
        "shape": shape, "scheme": scheme, "layers_timed": n, "depth": depth, "samples": samples, "seq_len": seq_len,
        "dtype": dtype, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "measured_s": total, "per_layer_s": per_layer, "model_s": per_layer * depth,
        "extrapolated": n < depth, "target_s": TARGET_S[shape],
        "phases_per_layer_s": {k: v / n for k, v in sorted(timer.totals.items(), key=lambda kv: -kv[1])},
        "peak_gpu_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
    }
    del model
    return row


def _print_profile(prof, dev: torch.device) -> None:  # noqa: ANN001
    """The phases and the ops that take the most time: by device time on a GPU, by CPU time too (launch cost)."""
    ka = prof.key_averages()
    keys = (["self_device_time_total"] if dev.type == "cuda" else []) + ["self_cpu_time_total"]
    for key in keys:
        print(ka.table(sort_by=key, row_limit=30, max_name_column_width=60), flush=True)
    launches = sum(e.count for e in ka if e.key.startswith("cudaLaunchKernel") or e.key.startswith("cuLaunchKernel"))
    print(f"kernel launches: {launches}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--schemes", default="w4a16,w4a8", help="comma-separated presets (default: w4a16,w4a8)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers to build and time (default: all)")
    ap.add_argument("--samples", type=int, default=128, help="calibration windows (default: 128)")
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per window (default: 512)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    ap.add_argument("--json", help="append the rows to this JSON file")
    ap.add_argument("--profile", action="store_true",
                    help="run under torch.profiler and print the top ops by device and CPU time (slows the run)")
    a = ap.parse_args()
    rows = []
    for scheme in a.schemes.split(","):
        row = run(a.shape, scheme, a.layers, a.samples, a.seq_len, a.device, a.dtype, profile=a.profile)
        rows.append(row)
        phases = ", ".join(f"{k} {v:.2f}" for k, v in row["phases_per_layer_s"].items())
        print(f"{a.shape} {scheme}: {row['measured_s']:.1f} s for {row['layers_timed']} layers "
              f"({row['per_layer_s']:.2f} s/layer: {phases}); peak GPU {row['peak_gpu_gib'] or 0:.1f} GiB", flush=True)
    if a.json:
        old = json.load(open(a.json)) if os.path.exists(a.json) else []
        tmp = a.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(old + rows, f, indent=1)
        os.replace(tmp, a.json)
    print()
    print("| shape | scheme | layers timed | s/layer | model (s) | target (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        est = f"{r['model_s']:.0f}" + (" (extrapolated)" if r["extrapolated"] else "")
        print(f"| {r['shape']} | {r['scheme']} | {r['layers_timed']}/{r['depth']} | {r['per_layer_s']:.2f} | {est} | {r['target_s']} |")


if __name__ == "__main__":
    main()
