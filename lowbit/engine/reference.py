"""The reference generation: the eager forward, batched over a preallocated KV cache, no engine.

What the engine path (``lowbit.engine.generate``) is tested against: same model, no scheduler, no
CUDA graphs, no decode-attention kernel. Not an entry point for users.

Prompts of different lengths are left-padded to the longest, so one prefill call fills the cache and
every decode step writes the same cache slot for the whole batch; ``key_valid`` hides the padding and
rotary positions restart at 0 for each prompt, so a padded prompt computes what it computes alone.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from lowbit.model.kv_cache import KVCache
from lowbit.engine.sampling import SamplingParams, request_generator, sample
from lowbit.errors import LowbitError
from lowbit.model.llama import Transformer


@dataclass
class Completion:
    prompt_tokens: int
    token_ids: list[int]  # generated tokens, without the stop token
    finish_reason: Literal["stop", "length"]


@torch.inference_mode()
def reference_generate_stream(
    model: Transformer, prompts: Sequence[Sequence[int]], params: SamplingParams
) -> Iterator[list[int | None]]:
    """Yield, at each decode step, one entry per prompt: the new token id, or None once that prompt stopped.

    A stop token is yielded (so callers see why a row ended) and nothing after it.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise LowbitError("every prompt must have at least one token")
    config = model.config
    device = model.embed_tokens.weight.device
    lengths = [len(p) for p in prompts]
    longest = max(lengths)
    context = config.max_position_embeddings
    if longest >= context:
        raise LowbitError(
            f"the prompt has {longest} tokens, but the model's context is {context}; shorten the prompt"
        )
    max_new = params.max_new_tokens
    if longest + max_new > context:
        max_new = context - longest
        warnings.warn(f"max_new_tokens cut to {max_new} to stay within the model's context of {context}", stacklevel=2)

    B = len(prompts)
    pads = torch.tensor([longest - n for n in lengths], device=device)
    input_ids = torch.zeros(B, longest, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        input_ids[i, longest - len(p) :] = torch.tensor(list(p), dtype=torch.long)
    slots = torch.arange(longest + max_new, device=device)
    key_valid = slots[None, :] >= pads[:, None]  # (B, S): False on left padding
    positions = (slots[None, :longest] - pads[:, None]).clamp(min=0)  # (B, T)

    cache = KVCache(config, B, longest + max_new, device=device, dtype=model.embed_tokens.weight.dtype)
    generator = None if params.greedy else request_generator(device, params.seed)
    stops = torch.tensor(params.stop_token_ids or [-1], device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)

    logits = model(input_ids, positions, cache, 0, key_valid, last_only=True)
    next_pos = positions[:, -1:] + 1
    for step in range(max_new):
        tokens = sample(logits[:, -1], params, generator)  # (B,)
        out = tokens.tolist()
        yield [None if d else t for t, d in zip(out, done.tolist())]
        done |= torch.isin(tokens, stops)
        if bool(done.all()) or step == max_new - 1:
            return
        logits = model(tokens[:, None], next_pos, cache, longest + step, key_valid)
        next_pos = next_pos + 1


def reference_generate(model: Transformer, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Completion]:
    """Generate for every prompt (token ids) with the eager forward; the completions in prompt order."""
    outs: list[list[int]] = [[] for _ in prompts]
    stopped = [False] * len(prompts)
    stops = set(params.stop_token_ids)
    for step in reference_generate_stream(model, prompts, params):
        for i, t in enumerate(step):
            if t is None or stopped[i]:
                continue
            if t in stops:
                stopped[i] = True
            else:
                outs[i].append(t)
    return [
        Completion(len(p), o, "stop" if s else "length") for p, o, s in zip(prompts, outs, stopped)
    ]
