"""End-to-end speed: prefill and decode tokens/s of a whole model, ours against transformers.

For each scheme (fp16 and the quantized ones), KV-cache format and batch size:
- **decode**: the engine's decode step (CUDA graph replay, decode-attention kernel over the slot
  cache, argmax and the copy of the new tokens to the host, as ``Engine`` runs it) for ``steps``
  steps with ``context`` tokens already in every sequence's cache. The cache is filled with random
  values instead of a real prefill: attention reads the same bytes whatever they hold, and 64
  prompts of 4096 tokens would otherwise take most of the run.
- **prefill**: ``batch`` prompts of ``prompt_len`` tokens through the engine (``Engine.run``, one
  token each): its chunked prefill batches equal chunks, up to 16 prompts per forward here, as
  transformers prefills the whole batch in one forward.
- tokens/s, time per output token, the weight bytes one decode step reads, that divided by the
  step time (achieved weight bandwidth) and as a fraction of this GPU's device-to-device copy
  bandwidth measured in the same run, and the peak memory allocated.

The baseline is Hugging Face transformers' ``generate`` in fp16 (eager, its default dynamic
cache) on the same shapes: decode time per token from the difference between two generation
lengths, prefill from a one-token generation.
"""

from __future__ import annotations

import datetime
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import torch

from lowbit.errors import LowbitError
from lowbit.formats import KV_FORMATS  # --kv takes these names
from lowbit.report_files import pyplot, save_figure


@dataclass
class E2EConfig:
    model: str = "llama3-8b-random"  # or a checkpoint directory / GGUF / known name
    schemes: tuple[str, ...] = ("fp16", "w4a16", "w4a8", "w8a8-fp8")
    batches: tuple[int, ...] = (1, 4, 16, 64, 256)
    kv: tuple[str, ...] = ("fp16",)  # KV_FORMATS keys
    context: int = 512  # tokens in each sequence's cache while decode is timed
    prompt_len: int = 512  # prefill length
    steps: int = 32  # decode steps timed
    transformers: bool = True  # time the transformers fp16 baseline too


@dataclass
class E2ERow:
    engine: str  # "lowbit" or "transformers"
    scheme: str
    kv: str
    batch: int
    context: int
    decode_tok_s: float
    tpot_ms: float  # time per output token (one decode step)
    prefill_tok_s: float | None
    weight_bytes: int  # bytes of weights one decode step reads (all Linear layers incl. lm_head)
    weight_gbps: float
    bw_fraction: float  # weight_gbps / the measured copy bandwidth
    peak_mem_gib: float


@dataclass
class E2EReport:
    gpu: str
    date: str
    torch: str
    model: str
    copy_gbps: float  # device-to-device copy, bytes read + written per second / 1e9
    rows: list[E2ERow] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> E2EReport:
        return cls(**{**d, "rows": [E2ERow(**r) for r in d["rows"]]})

    def find(self, engine: str, scheme: str, batch: int, kv: str = "fp16") -> E2ERow | None:
        return next((r for r in self.rows if (r.engine, r.scheme, r.batch, r.kv) == (engine, scheme, batch, kv)), None)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """GB/s of a device-to-device copy (bytes read + written), median of 10 after warm-up."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    times = []
    for i in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    del a, b
    return 2 * nbytes / statistics.median(times) / 1e9


def weight_bytes_per_step(model: torch.nn.Module) -> int:
    """Bytes of the weights a decode step reads: what each Linear's forward reads (the kernel layout
    for layers on kernels), the lm_head, not the embedding table (a gather of a few rows)."""
    from lowbit.model.qlinear import QuantLinear

    total = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            if m.kernel is not None:  # the kernel layout, as its format method counts it
                total += m._method.weight_bytes(m, m.kernel)
            else:  # the checkpoint buffers (QUIK's fp16 outlier columns too)
                parts = [m.qweight, m.scales, m.zeros, m.outlier_weight]
                total += sum(t.nbytes for t in parts if t is not None)
        elif isinstance(m, torch.nn.Linear):
            total += m.weight.nbytes
    return total


def require_kernels(model: torch.nn.Module, scheme: str) -> None:
    """Prepare ``model`` as every entry point does (``prepare_for_inference``), or raise a LowbitError
    naming the first layer that has none: it would run the emulated reference path (dequantize, fp32
    matmul), and its timing would say nothing about the format. The one check for ``run``."""
    from lowbit.engine.inference import prepare_for_inference
    from lowbit.model.qlinear import QuantLinear

    setup = prepare_for_inference(model)  # as lowbit serve and generate run it: fused, on the kernels
    on, total = setup.kernel_layers, setup.quantized_layers
    if on < total:
        name, m = next((n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.kernel is None)
        raise LowbitError(
            f"{total - on} of {total} quantized layers of {scheme} have no GPU kernel (first: {name}, "
            f"{m.extra_repr()}); timing them would measure the reference path. Pick schemes whose formats "
            "have kernels (lowbit.methods.registry), on a CUDA device")


def _fill_random(cache: Any) -> None:
    """Random codes (and scales of 0.01) everywhere in a SlotKVCache: the bytes attention reads."""
    for t in (cache.keys, cache.values):
        if t.dtype == torch.uint8:
            t.random_(0, 256)
        elif t.dtype == torch.int8:
            t.random_(-127, 128)
        elif t.dtype == torch.float8_e4m3fn:
            t.copy_(torch.randn(t.shape, device=t.device, dtype=torch.float16))
        else:
            t.normal_()
    for s in (cache.key_scales, cache.value_scales):
        if s.numel():
            s.fill_(0.01)


def _set_kv(model: Any, kv: str) -> None:
    if kv not in KV_FORMATS:
        raise LowbitError(f"unknown KV format {kv!r}; known: {', '.join(KV_FORMATS)}")
    model.kv_format = KV_FORMATS[kv]
    for layer in model.layers:
        layer.self_attn.k_scale = layer.self_attn.v_scale = None


def _release_memory() -> None:
    """Free the previous configuration's GPU memory: a model holds reference cycles (its modules), which
    only the cycle collector frees, and it does not know that they hold gigabytes of GPU memory."""
    gc.collect()
    torch.cuda.empty_cache()


def _timed(fn: Callable[[], Any], repeat: int = 3) -> float:
    """Median seconds of ``fn`` over ``repeat`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _prefill_all(engine: Any, prompts: list[list[int]]) -> None:
    """Each prompt prefilled and its first token picked, as ``Engine.step`` batches equal chunks."""
    from lowbit.engine.sampling import SamplingParams

    for p in prompts:
        engine.add(p, SamplingParams(max_new_tokens=1))
    engine.run()


def _decode(engine: Any, slots: list[int], tokens: list[int], context: int, n: int) -> None:
    """``n`` greedy decode steps of every slot from graph replays, positions from ``context`` on, as
    the engine runs a steady batch (``Engine.step``): step i + 1 is enqueued (fed with step i's tokens
    on the GPU) before the host reads step i's tokens."""
    graphs = engine.graphs
    graphs.launch(slots, tokens, [context] * len(slots))
    for _ in range(n - 1):
        graphs.launch_next()
        graphs.collect()
    graphs.collect()


def _hf_generate(model: Any, ids: torch.Tensor, n: int) -> None:
    """transformers greedy ``generate`` of exactly ``n`` new tokens after ``ids`` (B, L)."""
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                   do_sample=False, pad_token_id=0)


def time_lowbit(model: Any, scheme: str, cfg: E2EConfig, copy_gbps: float, log: Callable[[str], None]) -> list[E2ERow]:
    """Rows for one (already quantized, kernels prepared) model over cfg.kv x cfg.batches."""
    from lowbit.engine.scheduler import Engine

    device = model.embed_tokens.weight.device
    wbytes = weight_bytes_per_step(model)
    vocab = model.config.vocab_size
    rows = []
    max_len = max(cfg.context, cfg.prompt_len) + cfg.steps + 8
    for kv in cfg.kv:
        _set_kv(model, kv)
        for B in cfg.batches:
            _release_memory()
            torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            engine = Engine(model, max_slots=B, max_len=max_len, prefill_chunk=cfg.prompt_len,
                            prefill_tokens=max(cfg.prompt_len, min(B, 16) * cfg.prompt_len), graph_batch_sizes=[B])
            start_s = time.perf_counter() - t0
            # B prompts of prompt_len through the engine's batched prefill (one token each, no decode)
            prompts = torch.randint(0, vocab, (B, cfg.prompt_len)).tolist()
            prefill = B * cfg.prompt_len / _timed(partial(_prefill_all, engine, prompts))
            _fill_random(engine.cache)
            slots = list(range(B))
            tokens = torch.randint(0, vocab, (B,)).tolist()
            _decode(engine, slots, tokens, cfg.context, 3)
            torch.cuda.synchronize()
            t = time.perf_counter()
            _decode(engine, slots, tokens, cfg.context, cfg.steps)
            torch.cuda.synchronize()
            step_s = (time.perf_counter() - t) / cfg.steps
            peak = torch.cuda.max_memory_allocated(device) / 2**30
            row = E2ERow("lowbit", scheme, kv, B, cfg.context, B / step_s, step_s * 1e3, prefill, wbytes,
                         wbytes / step_s / 1e9, wbytes / step_s / 1e9 / copy_gbps, peak)
            rows.append(row)
            log(f"lowbit {scheme:<13} kv={kv:<5} B={B:<4} {row.decode_tok_s:9.1f} tok/s  {row.tpot_ms:7.2f} ms/step  "
                f"{row.weight_gbps:6.0f} GB/s ({row.bw_fraction:4.0%})  prefill {prefill:8.0f} tok/s  "
                f"peak {peak:5.1f} GiB  (engine start {start_s:.1f} s, of which prefill warm-up "
                f"{engine.prefill_warmup_s:.1f} s)")
            del engine
    _set_kv(model, "fp16")
    return rows


def time_transformers(hf_config: dict[str, Any], cfg: E2EConfig, copy_gbps: float, device: torch.device,
                      log: Callable[[str], None]) -> list[E2ERow]:
    """transformers fp16 ``generate`` (greedy, eager) on a random model of ``hf_config``'s shape."""
    import transformers

    conf = transformers.AutoConfig.for_model(**hf_config)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(conf, torch_dtype=torch.float16).eval()
    wbytes = sum(m.weight.nbytes for m in model.modules() if isinstance(m, torch.nn.Linear))
    rows = []
    for B in cfg.batches:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        ids = torch.randint(0, conf.vocab_size, (B, cfg.context), device=device)

        try:
            t_short = _timed(partial(_hf_generate, model, ids, 8), repeat=1)
            t_long = _timed(partial(_hf_generate, model, ids, 8 + cfg.steps), repeat=1)
            t_one = _timed(partial(_hf_generate, model, ids, 1), repeat=1)
        except torch.OutOfMemoryError:
            log(f"transformers B={B}: out of memory, skipped")
            continue
        step_s = (t_long - t_short) / cfg.steps
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        row = E2ERow("transformers", "fp16", "fp16", B, cfg.context, B / step_s, step_s * 1e3,
                     B * cfg.context / t_one, wbytes, wbytes / step_s / 1e9, wbytes / step_s / 1e9 / copy_gbps, peak)
        rows.append(row)
        log(f"transformers fp16 B={B:<4} {row.decode_tok_s:9.1f} tok/s  {row.tpot_ms:7.2f} ms/step  "
            f"{row.weight_gbps:6.0f} GB/s ({row.bw_fraction:4.0%})  peak {peak:5.1f} GiB")
    del model
    _release_memory()
    return rows


def run(cfg: E2EConfig, log: Callable[[str], None] = print) -> E2EReport:
    """Every measurement of ``cfg`` in one process (module docstring)."""
    from lowbit.bench.synthetic import SYNTHETIC, quantize_rtn, random_model

    if not torch.cuda.is_available():
        raise LowbitError("lowbit bench e2e needs a CUDA GPU")
    device = torch.device("cuda")
    if min(cfg.batches) < 1 or cfg.steps < 1 or cfg.context < 1 or cfg.prompt_len < 1:
        raise LowbitError("batch sizes, --steps, --context and --prompt-len must be >= 1")
    report = E2EReport(torch.cuda.get_device_name(device), datetime.date.today().isoformat(), torch.__version__,
                       cfg.model, copy_bandwidth(device))
    log(f"{report.gpu}: device-to-device copy {report.copy_gbps:.0f} GB/s")
    synthetic = cfg.model in SYNTHETIC
    if synthetic:
        hf_config = SYNTHETIC[cfg.model]
    else:
        from lowbit.model.loader import load_model

        loaded = load_model(cfg.model, device="cpu", dtype="fp16", with_tokenizer=False)
        hf_config = loaded.config.to_hf()
        del loaded
    if cfg.transformers:
        report.rows += time_transformers(hf_config, cfg, report.copy_gbps, device, log)
    for scheme in cfg.schemes:
        if synthetic:
            model = random_model(hf_config, device, torch.float16)
        else:
            from lowbit.model.loader import load_model

            model = load_model(cfg.model, device=device, dtype="fp16", with_tokenizer=False).model
        if model.quant_scheme is not None:
            if scheme != model.quant_scheme.name:
                raise LowbitError(f"{cfg.model} is quantized with {model.quant_scheme.name}; pass --schemes "
                                  f"{model.quant_scheme.name}")
        elif scheme != "fp16":
            quantize_rtn(model, scheme)
        torch.cuda.empty_cache()
        require_kernels(model, scheme)
        report.rows += time_lowbit(model, scheme, cfg, report.copy_gbps, log)
        del model
        _release_memory()
    return report


def format_table(report: E2EReport) -> str:
    """A markdown table; the speed-up columns are over transformers and over our fp16 at the same batch."""
    lines = [(f"{report.gpu}, {report.date}, torch {report.torch}, model {report.model}, "
              f"copy bandwidth {report.copy_gbps:.0f} GB/s"), "",
             ("| engine | scheme | KV | batch | decode tok/s | ms/token | weight GB/s (of copy bw) | prefill tok/s "
              "| peak GiB | vs transformers | vs our fp16 |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report.rows:
        hf = report.find("transformers", "fp16", r.batch)
        ours = report.find("lowbit", "fp16", r.batch, r.kv)
        vs_hf = f"{r.decode_tok_s / hf.decode_tok_s:.2f}x" if hf else "-"
        vs_ours = f"{r.decode_tok_s / ours.decode_tok_s:.2f}x" if ours and r.engine == "lowbit" else "-"
        prefill = f"{r.prefill_tok_s:.0f}" if r.prefill_tok_s else "-"
        lines.append(f"| {r.engine} | {r.scheme} | {r.kv} | {r.batch} | {r.decode_tok_s:.1f} | {r.tpot_ms:.2f} | "
                     f"{r.weight_gbps:.0f} ({r.bw_fraction:.0%}) | {prefill} | {r.peak_mem_gib:.1f} | {vs_hf} | {vs_ours} |")
    return "\n".join(lines)


def plot(report: E2EReport, path: str) -> None:
    """Decode tokens/s against batch size, one line per (engine, scheme, KV), log-log; written to ``path``."""
    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    keys = dict.fromkeys((r.engine, r.scheme, r.kv) for r in report.rows)
    for engine, scheme, kv in keys:
        rs = sorted((r for r in report.rows if (r.engine, r.scheme, r.kv) == (engine, scheme, kv)), key=lambda r: r.batch)
        label = f"{engine} {scheme}" + (f" kv {kv}" if kv != "fp16" else "")
        ax.plot([r.batch for r in rs], [r.decode_tok_s for r in rs], marker="o", label=label,
                linestyle="--" if engine == "transformers" else "-")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch (sequences decoding at once)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"{report.model}, context {report.rows[0].context if report.rows else '?'}: {report.gpu}, {report.date}",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
