"""``lowbit advise``: which format to serve a model in on a GPU, predicted from measured kernel times.

For each scheme with GPU kernels, from the model's layer shapes alone (no weights are read):
- **weight memory**: every decoder Linear at its format's bits per weight with its fp16 scales, plus
  the fp16 embedding table and lm_head;
- **KV room**: how many tokens of fp16 KV cache fit beside the weights in ``--memory`` (90% of it, as
  the engine plans its slots);
- **decode tok/s** at batch 1, 16, 64 and 256 (context ``--context``): one step is the engine's four
  GEMMs per layer (q/k/v and gate/up fused, ``prepare_for_inference``) timed from this GPU's tuned
  kernel table (``lowbit/kernels/tuned/<gpu>.json``: CUDA-graph replays of the kernel dispatch picks,
  activation quantization included), the fp16 lm_head, and reading the KV cache at the GPU's measured
  copy bandwidth;
- **prefill tok/s** of one ``--prompt`` prompt: the same GEMMs at M = prompt length, plus causal
  attention at the GPU's measured fp16 matmul rate;
- **accuracy**: the perplexity change ``lowbit eval --json FILE`` measured, when ``--accuracy FILE``
  is given.

Where the table has no entry (fp16, which the table does not hold, and the lm_head), a GEMM is timed
by the roofline of the GPU's measured ceilings (``shared/PERF.md``, 2026-11-21): the larger of its
bytes over the copy bandwidth and its FLOPs over the bf16 matmul rate, divided by the efficiency
cuBLAS was measured at on these shapes (``CUBLAS_EFFICIENCY``). A table entry tuned at another
shape is scaled by the weight count, and past its largest tuned M by M. Norms, RoPE, sampling and
launch gaps are left out, so absolute tok/s run high; the ranking is what the recommendation uses
(``docs/quantization.md`` sets it beside the measured ``bench e2e`` ranking).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError
from lowbit.formats import QuantScheme, get_scheme
from lowbit.kernels import dispatch
from lowbit.model.config import ModelConfig


@dataclass(frozen=True)
class GpuSpec:
    """Measured ceilings of one GPU (``shared/PERF.md``, 2026-11-21) and its tuned table."""

    name: str
    memory_gb: float
    copy_tbps: float  # device-to-device copy, bytes read + written per second / 1e12
    matmul_tflops: float  # bf16 matmul 8192^3
    table: str


GPUS = {
    "h100": GpuSpec("NVIDIA H100 80GB HBM3", 80.0, 3.0, 798.0, "h100"),
    "h200": GpuSpec("NVIDIA H200", 141.0, 4.3, 790.0, "h200"),
}
# the schemes whose every decoder GEMM has a tuned dispatch-table op, and that op
ADVISED = {"fp16": None, "w4a16": "w4a16", "w4a8": "w4a8", "w4a8-g128": "w4a8-g128", "w8a8-fp8": "w8a8-fp8",
           "w8a8-int8": "w8a8-int8"}
BATCHES = (1, 16, 64, 256)


@dataclass
class Advice:
    scheme: str
    weight_gb: float
    kv_tokens: int  # fp16 KV tokens that fit beside the weights
    decode_tok_s: dict[int, float | None]  # batch -> predicted tok/s (None: the batch's KV does not fit)
    prefill_tok_s: float | None  # None: not even one prompt's KV fits beside the weights
    ppl_delta_pct: float | None = None
    notes: list[str] = field(default_factory=list)


def layer_gemms(cfg: ModelConfig) -> list[tuple[str, int, int]]:
    """(name, N, K) of one decoder layer's GEMMs as the engine runs them (q/k/v and gate/up fused)."""
    q = cfg.num_heads * cfg.head_dim
    kv = cfg.num_kv_heads * cfg.head_dim
    return [("qkv", q + 2 * kv, cfg.hidden_size), ("o", cfg.hidden_size, q),
            ("gate_up", 2 * cfg.intermediate_size, cfg.hidden_size), ("down", cfg.hidden_size, cfg.intermediate_size)]


def bits_per_weight(scheme: QuantScheme, K: int) -> float:
    """Stored bits per weight of a Linear with K inputs in ``scheme``: codes plus fp16 scales (and
    uint8 zero points when asymmetric)."""
    if scheme.name == "fp16":
        return 16.0
    w = scheme.weights
    per = K if w.group_size is None else w.group_size
    return w.bits + 16 / per + (0 if w.symmetric else 8 / per)


# cuBLAS fp16 on the Llama-3-8B gate+up layer of the H200 ran at 0.68-0.77 of the roofline below at
# M = 1, 64 and 256 (its times from shared/PERF.md's ratios over the H200 table's kernels; bench e2e's
# fp16 decode read its weights at 77% of the copy bandwidth, 2026-12-02): one factor for both regimes
CUBLAS_EFFICIENCY = 0.70


def _roofline_us(M: int, N: int, K: int, gpu: GpuSpec) -> float:
    """fp16 GEMM time from the GPU's ceilings (weights and activations read once, output written),
    at the efficiency cuBLAS was measured at (``CUBLAS_EFFICIENCY``)."""
    nbytes = 2 * (N * K + M * K + M * N)
    ideal = max(nbytes / (gpu.copy_tbps * 1e12), 2 * M * N * K / (gpu.matmul_tflops * 1e12))
    return ideal / CUBLAS_EFFICIENCY * 1e6


def gemm_us(op: str | None, M: int, N: int, K: int, table: dict[str, Any], gpu: GpuSpec) -> float:
    """One GEMM's predicted time: the table's entry for ``op`` in the weight order the table packs this
    shape in (module docstring), else the roofline."""
    entries = dispatch.order_entries(table, op, dispatch.table_order(table, op, N, K)) if op else []
    e = dispatch.lookup_entry(entries, M, N, K)
    if e is None:
        return _roofline_us(M, N, K, gpu)
    us = e["us"] * (N * K) / (e["N"] * e["K"])
    return us * (M / e["M"]) if M > e["M"] else us


def advise(cfg: ModelConfig, gpu: GpuSpec, *, context: int = 2048, prompt: int = 2048,
           memory_gb: float | None = None, accuracy: dict[str, float] | None = None,
           schemes: tuple[str, ...] = tuple(ADVISED)) -> list[Advice]:
    """One ``Advice`` per scheme (module docstring)."""
    table = dispatch.load_table(gpu.table)
    memory = (memory_gb or gpu.memory_gb) * 1e9 * 0.9
    kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2  # fp16 K and V
    head = cfg.vocab_size * cfg.hidden_size * 2 * (1 if cfg.tie_word_embeddings else 2)  # embedding (+ lm_head)
    out = []
    for name in schemes:
        if name not in ADVISED:
            raise LowbitError(f"lowbit advise predicts {', '.join(ADVISED)}; {name!r} has no complete tuned table")
        op = ADVISED[name]
        scheme = QuantScheme("fp16") if name == "fp16" else get_scheme(name)
        gemms = layer_gemms(cfg)
        weight_bytes = head + cfg.num_layers * sum(N * K * bits_per_weight(scheme, K) / 8 for _, N, K in gemms)
        kv_tokens = max(0, int((memory - weight_bytes) // kv_per_token))
        decode = {}
        for B in BATCHES:
            if B * context > kv_tokens:
                decode[B] = None
                continue
            step = cfg.num_layers * sum(gemm_us(op, B, N, K, table, gpu) for _, N, K in gemms)
            step += _roofline_us(B, cfg.vocab_size, cfg.hidden_size, gpu)  # the fp16 lm_head
            step += B * context * kv_per_token / (gpu.copy_tbps * 1e12) * 1e6  # the KV cache, read once
            decode[B] = B / step * 1e6
        pre = cfg.num_layers * sum(gemm_us(op, prompt, N, K, table, gpu) for _, N, K in gemms)
        attn_flops = 2 * 2 * prompt * prompt * cfg.num_heads * cfg.head_dim / 2  # QK^T and PV, causal half
        pre += cfg.num_layers * attn_flops / (gpu.matmul_tflops * 1e12) * 1e6
        adv = Advice(name, weight_bytes / 1e9, kv_tokens, decode, prompt / pre * 1e6 if kv_tokens >= prompt else None)
        if kv_tokens < context:
            adv.notes.append(f"does not fit: {weight_bytes / 1e9:.0f} GB of weights in {memory / 1e9:.0f} GB")
        if accuracy is not None:
            adv.ppl_delta_pct = accuracy.get(name)
        out.append(adv)
    return out


def recommend(advice: list[Advice], workload: str, max_ppl_delta_pct: float) -> tuple[str, str]:
    """(scheme, one-line reason) for ``workload`` "latency" (batch 1) or "throughput" (the largest batch
    that fits), among the schemes that fit and whose measured perplexity change, when known, is within
    ``max_ppl_delta_pct``."""
    ok = [a for a in advice if a.ppl_delta_pct is None or a.ppl_delta_pct <= max_ppl_delta_pct]
    if not ok:
        raise LowbitError(f"no scheme is within {max_ppl_delta_pct}% perplexity; raise --max-ppl-delta")
    base = next((a for a in advice if a.scheme == "fp16"), None)
    if workload == "latency":
        fits = [a for a in ok if a.decode_tok_s[1] is not None]
        if not fits:
            raise LowbitError("no scheme fits one sequence of --context tokens in --memory")
        best = max(fits, key=lambda a: a.decode_tok_s[1])
        ratio = f", {best.decode_tok_s[1] / base.decode_tok_s[1]:.2f}x fp16" if base and base.decode_tok_s[1] else ""
        return best.scheme, f"fastest predicted batch-1 decode ({best.decode_tok_s[1]:.0f} tok/s{ratio})"
    batch = max((B for B in BATCHES if any(a.decode_tok_s[B] for a in ok)), default=None)
    if batch is None:
        raise LowbitError("no scheme fits one sequence of --context tokens in --memory")
    best = max((a for a in ok if a.decode_tok_s[batch]), key=lambda a: a.decode_tok_s[batch])
    return best.scheme, (f"fastest predicted decode at batch {batch}, the largest that fits "
                         f"({best.decode_tok_s[batch]:.0f} tok/s, {best.kv_tokens / 1e3:.0f}k KV tokens of room)")


def read_accuracy(path: str | Path) -> dict[str, float]:
    """scheme -> perplexity change in % from a ``lowbit eval --json`` file."""
    try:
        rows = json.loads(Path(path).read_text())["rows"]
    except (OSError, KeyError, json.JSONDecodeError) as exc:
        raise LowbitError(f"{path} is not a `lowbit eval --json` file: {exc}") from exc
    return {r["label"]: float(r["delta_pct"]) for r in rows}


def format_advice(advice: list[Advice], cfg_name: str, gpu: GpuSpec, context: int, prompt: int) -> str:
    lines = [f"{cfg_name} on {gpu.name} (table {gpu.table}.json), context {context}, prompt {prompt}; predicted",
             "| scheme | weights GB | KV room (k tokens) | " + " | ".join(f"decode b{B}" for B in BATCHES)
             + " | prefill tok/s | ppl change |",
             "|---|---|---|" + "---|" * len(BATCHES) + "---|---|"]
    for a in advice:
        dec = " | ".join("-" if a.decode_tok_s[B] is None else f"{a.decode_tok_s[B]:.0f}" for B in BATCHES)
        ppl = "not measured" if a.ppl_delta_pct is None else f"{a.ppl_delta_pct:+.1f}%"
        pre = "-" if a.prefill_tok_s is None else f"{a.prefill_tok_s:.0f}"
        lines.append(f"| {a.scheme} | {a.weight_gb:.1f} | {a.kv_tokens / 1e3:.0f} | {dec} | {pre} | {ppl} |")
    lines += [f"{a.scheme}: {note}" for a in advice for note in a.notes]
    return "\n".join(lines)
