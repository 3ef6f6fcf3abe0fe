"""Next-token selection: greedy, or temperature / top-k / top-p sampling with a seeded generator."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop.

    ``temperature == 0`` is greedy decoding (argmax), which is deterministic and what the parity
    tests compare. ``top_k == 0`` and ``top_p == 1`` switch those filters off.
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise LowbitError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:  # also rejects NaN
            raise LowbitError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise LowbitError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise LowbitError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def request_generator(device: torch.device, seed: int | None) -> torch.Generator:
    """A sampling request's own random generator: seeded with ``seed``, or from the OS's entropy when
    None. The global RNG is neither read nor reseeded (``torch.seed()`` would reseed it for every
    process-wide user of ``torch.manual_seed``)."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()  # this generator only, from a non-deterministic source
    else:
        gen.manual_seed(seed)
    return gen


_CHUNK = 2048  # vocabulary entries per first-stage row of greedy_tokens


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(-1)`` for (B, vocab) logits, in two stages when the vocabulary is wide.

    PyTorch reduces each row of a (B, 128256) argmax in one thread block: 36 us at B = 1 on the H100
    (bench/profile_decode.py), ~1% of a 4-bit Llama-3-8B decode step. Maxima over chunks of
    ``_CHUNK`` entries spread the row over many blocks; the first-maximum tie rule of ``argmax`` is
    kept (the first chunk holding the maximum, then the first index inside it). NaNs count as maxima,
    as in ``argmax``.
    """
    B, V = logits.shape
    if V <= 4 * _CHUNK:
        return logits.argmax(dim=-1)
    pad = (-V) % _CHUNK
    if pad:
        logits = torch.nn.functional.pad(logits, (0, pad), value=float("-inf"))
    values, idx = logits.view(B, -1, _CHUNK).max(dim=-1)  # (B, chunks)
    best = values.argmax(dim=-1, keepdim=True)  # (B, 1)
    return (best * _CHUNK + idx.gather(1, best))[:, 0]


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Pick one token per row. ``logits``: (B, vocab), any float dtype. Returns (B,) int64."""
    if params.greedy:
        return greedy_tokens(logits)
    logits = logits.float() / params.temperature
    if params.top_k:
        k = min(params.top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p; the best one always stays
        drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
