"""``lowbit.generate``: batched generation through the engine, the one inference path.

The prompts go to the continuous-batching engine (``lowbit.engine.scheduler``) that ``lowbit serve``
runs: on CUDA its decode steps replay CUDA graphs and read the KV cache in place, so a Python call
decodes as fast as the server does. The eager forward (``lowbit.engine.reference``) is what the
engine is tested against, not a path users take.

Each prompt is its own engine request: with sampling and a ``seed``, prompt ``i`` draws from a
generator seeded with ``seed + i`` (the same answer for the same call; different prompts do not share
one random stream), and without a seed from the OS's entropy.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from lowbit.engine.inference import engine_for
from lowbit.engine.reference import Completion
from lowbit.engine.sampling import SamplingParams
from lowbit.engine.text import decode, encode_prompt
from lowbit.errors import LowbitError
from lowbit.model.llama import Transformer

__all__ = ["Completion", "GeneratedToken", "generate", "generate_stream", "generate_text"]


@dataclass(frozen=True)
class GeneratedToken:
    """One token of one prompt, as the engine makes it."""

    index: int  # which prompt
    token: int | None  # None when the request ended without a token
    finish_reason: str | None  # "stop" (a stop token: ``token`` is it), "length", or None while it goes on


def generation_length(model: Transformer, prompts: Sequence[Sequence[int]], params: SamplingParams) -> int:
    """The longest prompt + output, at most the model's context (what an engine for these prompts needs).
    Raises LowbitError for an empty prompt or one that fills the context."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise LowbitError("every prompt must have at least one token")
    context = model.config.max_position_embeddings
    longest = max(len(p) for p in prompts)
    if longest >= context:
        raise LowbitError(f"the prompt has {longest} tokens, but the model's context is {context}; shorten the prompt")
    return min(context, longest + params.max_new_tokens)


@torch.inference_mode()
def generate_stream(model: Transformer, prompts: Sequence[Sequence[int]],
                    params: SamplingParams) -> Iterator[GeneratedToken]:
    """Yield each prompt's tokens as the engine makes them (prompts interleave; a stop token is yielded
    with ``finish_reason="stop"``, and nothing of that prompt after it). Closing the iterator early
    cancels what still runs."""
    max_len = generation_length(model, prompts, params)
    longest = max(len(p) for p in prompts)
    if longest + params.max_new_tokens > max_len:
        warnings.warn(f"max_new_tokens cut to {max_len - longest} to stay within the model's context of {max_len}",
                      stacklevel=2)
    engine = engine_for(model, len(prompts), max_len)
    index = {}
    for i, p in enumerate(prompts):
        own = params if params.seed is None or params.greedy else replace(params, seed=params.seed + i)
        index[engine.add(list(p), own)] = i
    done: set[int] = set()
    try:
        while engine.has_work:
            for ev in engine.step():
                if ev.finish_reason is not None:
                    done.add(ev.request_id)
                yield GeneratedToken(index[ev.request_id], ev.token, ev.finish_reason)
    finally:
        if len(done) < len(index):  # closed early: leave the cached engine idle
            for rid in set(index) - done:
                engine.cancel(rid)
            while engine.has_work:
                engine.step()


def generate(model: Transformer, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Completion]:
    """Generate for every prompt (token ids) through the engine; returns the completions in prompt order."""
    outs: list[list[int]] = [[] for _ in prompts]
    reasons = ["length"] * len(prompts)
    for ev in generate_stream(model, prompts, params):
        if ev.finish_reason == "stop":
            reasons[ev.index] = "stop"
        elif ev.token is not None:
            outs[ev.index].append(ev.token)
    return [Completion(len(p), o, r) for p, o, r in zip(prompts, outs, reasons)]


def generate_text(
    loaded: Any, prompts: Sequence[str], params: SamplingParams | None = None, *, chat: bool = True
) -> list[str]:
    """Text in, text out, for a ``LoadedModel``: the model's stop tokens are used unless ``params`` names some."""
    if loaded.tokenizer is None:
        raise LowbitError(f"{loaded.path} ships no tokenizer; generation needs tokenizer files beside the weights")
    params = params or SamplingParams()
    if not params.stop_token_ids:
        params = replace(params, stop_token_ids=loaded.stop_token_ids)
    ids = [encode_prompt(loaded.tokenizer, p, chat=chat) for p in prompts]
    return [decode(loaded.tokenizer, c.token_ids) for c in generate(loaded.model, ids, params)]
