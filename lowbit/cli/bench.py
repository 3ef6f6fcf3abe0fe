"""``lowbit bench``: its sub-commands (kernels, e2e, serve) and their handlers.

Heavy imports happen inside the handlers, so ``lowbit bench --help`` needs no torch.
"""

from __future__ import annotations

import argparse
import sys

from lowbit.cli.arguments import add_report_files, add_workload, int_list
from lowbit.errors import LowbitError


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``bench`` and its sub-commands to the top-level sub-parsers ``sub``."""
    b = sub.add_parser(
        "bench",
        help="benchmark kernels on the GPU",
        description="Speed measurements on the GPU. 'lowbit bench kernels' times every quantized GEMM path "
        "against cuBLAS fp16 and fp8 on real layer shapes.",
    )
    bsub = b.add_subparsers(dest="bench_command", required=True, metavar="WHAT")
    k = bsub.add_parser(
        "kernels",
        help="quantized GEMMs vs cuBLAS fp16 (torch.matmul) and fp8 (torch._scaled_mm), per layer shape and M",
        description="Time each kernel path as dispatch runs it (activation quantization included for 8- and 4-bit "
        "activations), against torch.matmul fp16, torch._scaled_mm fp8 (row-wise) and torch._int_mm in the same "
        "process: each the median of 5 replays of a CUDA graph of 50 calls (kernel time without Python launch "
        "overhead, as in graphed decode), random data, weights rotated past L2. Prints a table of "
        "speed-ups over fp16 (last), and optionally writes JSON (with GB/s and TFLOP/s) and a PNG plot.",
    )
    k.add_argument("--shapes", default="llama3-8b,llama3-70b",
                   help="comma-separated: llama3-8b, llama3-70b, MODEL:LAYER (e.g. llama3-70b:gateup) or NxK "
                   "(default: llama3-8b,llama3-70b)")
    k.add_argument("--m", default="1,16,32,64,128,256,1024,4096", help="batch sizes M (tokens), comma-separated")
    k.add_argument("--paths", default=None, help="kernel paths to time, comma-separated (default: all): "
                   "fp16, fp8-cublas, int8-cublas, w4a16, w4a8, w4a8-g128, w4a8-fp8, w8a8-int8, w8a8-fp8, "
                   "w4a4-quik (QUIK, 256 fp16 outlier columns), w4a4 (the same kernel without outliers), "
                   "w4ax (COMET, 25%% of activation blocks at 8 bits), w4a16-2:4 (2:4-sparse int4)")
    add_report_files(k, "speed-up over fp16 vs M, one line per path")
    k.set_defaults(func=_cmd_bench_kernels)
    e = bsub.add_parser(
        "e2e",
        help="whole-model prefill and decode tokens/s: our engine per scheme vs transformers fp16 generate",
        description="Decode tokens/s, time per output token, achieved weight bandwidth (and its share of this GPU's "
        "measured copy bandwidth), prefill tokens/s and peak memory, for our engine (CUDA-graph decode, "
        "decode-attention kernel) in fp16 and each scheme, and for Hugging Face transformers fp16 generate, at "
        "each batch size. The default model has Llama-3-8B's shape and random weights (speed does not depend on "
        "weight values; schemes are applied by round-to-nearest in their formats, with QUIK outlier columns, COMET "
        "FMPQ blocks and 2:4 masks drawn at random with a fixed seed); decode is timed with --context "
        "random tokens already in every sequence's KV cache. Prints a table last; --json and --plot save it.",
    )
    e.add_argument("--model", default="llama3-8b-random",
                   help="llama3-8b-random (default), or a checkpoint directory / GGUF file / known model name")
    e.add_argument("--schemes", default="fp16,w4a16,w4a8,w8a8-fp8",
                   help="comma-separated: fp16 and presets (w4a16, w4a16-rtn, w4a8, w4a8-g128, w8a8-fp8, w8a8-int8, "
                   "w4a4-quik, w4a4, w4a4kv4-comet, w4a16-2:4), each optionally +kv8, +kv4, +kv4-head or +kvfp8 and +head; a scheme with "
                   "a layer that has no GPU kernel is refused (default: fp16,w4a16,w4a8,w8a8-fp8)")
    e.add_argument("--batch", default="1,4,16,64,256", help="batch sizes, comma-separated (default: 1,4,16,64,256)")
    e.add_argument("--kv", default="fp16", help="KV cache formats, comma-separated: fp16, int8, int4 (scales per 32 "
                   "channels, as +kv4), int4-head (one scale per token and head, as COMET and +kv4-head), fp8 "
                   "(default: fp16)")
    e.add_argument("--context", type=int, default=512, help="tokens in each sequence's cache during decode (default: 512)")
    e.add_argument("--prompt-len", type=int, default=512, help="prefill length in tokens (default: 512)")
    e.add_argument("--steps", type=int, default=32, help="decode steps timed per configuration (default: 32)")
    e.add_argument("--no-transformers", action="store_true", help="skip the transformers fp16 generate baseline")
    add_workload(e)
    add_report_files(e, "decode tokens/s vs batch, one line per engine/scheme")
    e.set_defaults(func=_cmd_bench_e2e)
    from lowbit.bench.load import add_arguments as add_load_arguments

    ld = bsub.add_parser(
        "serve",
        help="load test of an OpenAI-compatible server: concurrent streaming clients, throughput, p50/p99 latency",
        description="Send --requests greedy streaming completions from --clients concurrent clients to a running "
        "server (--url) or to MODEL served in this process on a free loopback port; report throughput, time to "
        "first token, inter-token and end-to-end latency (p50/p99), and check that no request is lost or mixed "
        "up: each response must equal the same prompt run alone. Bounded by --timeout. Exit code 1 if any "
        "request failed, was not sent, or was mixed up.",
    )
    add_load_arguments(ld)
    ld.set_defaults(func=_cmd_bench_serve)


def _cmd_bench_serve(args: argparse.Namespace) -> int:
    from lowbit.bench import load

    return load.main(args)


def _read_report(path: str, report_class: type, what: str):  # noqa: ANN202 - an instance of report_class
    """A saved --json report (``--from-json``), or a LowbitError naming ``what``."""
    from lowbit.report_files import read_json

    data = read_json(path, what)
    try:
        return report_class.from_json(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise LowbitError(f"cannot read {what} from {path}: {exc}") from exc


def _cmd_bench_e2e(args: argparse.Namespace) -> None:
    from lowbit.bench import e2e
    from lowbit.report_files import write_json

    if args.from_json:
        report = _read_report(args.from_json, e2e.E2EReport, "an e2e report")
    else:
        kv = tuple(k.strip() for k in args.kv.split(",") if k.strip())
        unknown = [k for k in kv if k not in e2e.KV_FORMATS]
        if unknown:
            raise LowbitError(f"unknown --kv {', '.join(unknown)}; known: {', '.join(e2e.KV_FORMATS)}")
        schemes = tuple(s.strip() for s in args.schemes.split(",") if s.strip())
        from lowbit.formats import get_scheme

        for s in schemes:
            if s != "fp16":
                get_scheme(s)  # an unknown name fails here, before any GPU work
        cfg = e2e.E2EConfig(model=args.model, schemes=schemes, batches=int_list(args.batch, "--batch"), kv=kv,
                            context=args.context, prompt_len=args.prompt_len, steps=args.steps,
                            transformers=not args.no_transformers)
        report = e2e.run(cfg, log=lambda line: print(line, file=sys.stderr, flush=True))
        if args.json:
            write_json(args.json, report.to_json())
    if args.plot:
        e2e.plot(report, args.plot)
    print(e2e.format_table(report))


def _cmd_bench_kernels(args: argparse.Namespace) -> None:
    from lowbit.bench import kernels as kb
    from lowbit.report_files import write_json

    if args.from_json:
        report = _read_report(args.from_json, kb.KernelReport, "a kernel report")
    else:
        ms = list(int_list(args.m, "--m"))
        shapes = kb.parse_shapes(args.shapes)
        paths = kb.parse_paths(args.paths)  # fp16 first: every ratio is over it
        total = len(shapes) * len(ms) * len(paths)
        import torch
        from tqdm import tqdm

        if not torch.cuda.is_available():
            raise LowbitError("lowbit bench kernels needs a CUDA GPU (or --from-json FILE to re-print a saved run)")

        with tqdm(total=total, desc="timing", unit="run", file=sys.stderr) as bar:
            report = kb.run(shapes, ms, paths, progress=lambda r: bar.update(1))
        if args.json:
            write_json(args.json, report.to_json())
    if args.plot:
        kb.plot(report, args.plot)
    print(kb.format_table(report))
