"""Perplexity of a causal LM on a text corpus, with non-overlapping windows.

The corpus (``load_texts``) is joined into one string (``join_texts``: documents separated by a blank
line) and tokenized once, without special tokens. The token stream is cut into consecutive windows of
``seq_len`` tokens; the tail shorter than a window is dropped, so every window has the same length
and the result does not depend on the batch size. Each window is scored on its own (no context
carried over from the previous one): its first token is not predicted, the other ``seq_len - 1`` are.
Perplexity is ``exp`` of the mean negative log-likelihood over all predicted tokens of all windows.

This is the usual "non-overlapping window" perplexity (as in GPTQ/AWQ-style evaluations), not the
strided sliding-window one, so numbers are comparable across quantization schemes of one model at one
``seq_len``, but not across tokenizers or window lengths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.eval.corpus import join_texts, load_texts


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float  # exp(nll)
    nll: float  # mean negative log-likelihood per predicted token, in nats
    tokens: int  # number of predicted tokens: chunks * (seq_len - 1)
    chunks: int  # number of windows scored


def tokenize_corpus(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """The token ids (int64, shape (n_tokens,)) of ``join_texts(texts)``, tokenized in one call.

    One call over the joined string, rather than per document, keeps the ids exactly those of the
    string (tokenizers may merge the "\\n\\n" separator with neighbouring whitespace) and is fast
    (a fast tokenizer does ~0.3 M characters in well under a second). ``verbose=False`` silences
    only transformers' "sequence length is longer than the specified maximum" warning: the stream
    is cut into model-sized windows afterwards, so it does not apply.
    """
    ids = tokenizer(join_texts(texts), add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def chunk_tokens(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Consecutive non-overlapping windows of ``ids`` (n,) as an (n // seq_len, seq_len) tensor.

    The last ``n % seq_len`` tokens, too few for a full window, are dropped. Raises LowbitError when
    there is not even one full window."""
    if seq_len < 2:
        raise LowbitError(f"seq_len must be at least 2 (one context and one predicted token), got {seq_len}")
    ids = ids.reshape(-1)
    n = ids.numel()
    if n < seq_len:
        raise LowbitError(f"calibration/evaluation text too short: {n} tokens, need at least {seq_len}")
    n_chunks = n // seq_len
    return ids[: n_chunks * seq_len].reshape(n_chunks, seq_len)


def _device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.inference_mode()
def perplexity(
    model: nn.Module, chunks: torch.Tensor, *, batch_size: int = 8, progress: bool = True
) -> PerplexityResult:
    """Perplexity of ``model`` (input_ids (B, T) -> logits (B, T, V)) on ``chunks`` (n, L), each window alone.

    Windows go to the model ``batch_size`` at a time, on the model's device. Cross-entropy is taken
    per window in float32 (logits of any dtype are upcast one window at a time) and summed in
    float64, so the result does not depend on the batch size beyond float32 rounding of the logits.
    Raises LowbitError when the logits hold NaN or Inf."""
    if chunks.dim() != 2 or chunks.shape[1] < 2:
        raise LowbitError(f"chunks must be a (n_chunks, seq_len >= 2) tensor, got shape {tuple(chunks.shape)}")
    if batch_size < 1:
        raise LowbitError(f"batch_size must be at least 1, got {batch_size}")
    n, seq_len = chunks.shape
    if n == 0:
        raise LowbitError("no evaluation windows: the token stream is shorter than one window")
    device = _device(model)
    total = torch.zeros((), dtype=torch.float64, device=device)
    done = 0
    with tqdm(total=n, unit="chunk", desc="lowbit: perplexity", disable=not progress) as bar:
        for start in range(0, n, batch_size):
            batch = chunks[start : start + batch_size].to(device, non_blocking=True)
            logits = model(batch)  # (B, L, V)
            # One float32 sum is non-finite iff some logit is NaN/Inf (short of ~1e31-sized logits,
            # broken anyway), and costs a twentieth of isfinite(logits).all() on the CPU.
            if not bool(torch.isfinite(logits.sum(dtype=torch.float32))):
                raise LowbitError(
                    "the model produced NaN/Inf logits on evaluation text; the quantized weights or "
                    "activations are broken"
                )
            targets = batch[:, 1:]
            for row in range(batch.shape[0]):  # one window at a time bounds the fp32 copy to (L, V)
                nll = F.cross_entropy(logits[row, :-1].float(), targets[row], reduction="sum")
                total += nll.double()
            done += batch.shape[0]
            bar.update(batch.shape[0])
            if progress:
                bar.set_postfix(ppl=f"{math.exp(total.item() / (done * (seq_len - 1))):.3f}")
    tokens = n * (seq_len - 1)
    mean = total.item() / tokens
    return PerplexityResult(ppl=math.exp(mean), nll=mean, tokens=tokens, chunks=n)


def evaluation_windows(
    loaded: Any, dataset: str = "wiki", seq_len: int = 512, max_chunks: int | None = None
) -> torch.Tensor:
    """The (n, seq_len) held-out windows ``evaluate`` scores: ``dataset``'s eval text, tokenized by
    ``loaded``'s tokenizer and cut into windows (only the first ``max_chunks`` when given).

    No token cache: tokenizing the wiki eval split takes well under a second."""
    if loaded.tokenizer is None:
        raise LowbitError(f"{loaded.path} has no tokenizer; perplexity needs one to tokenize the text")
    limit = getattr(loaded.config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise LowbitError(f"seq_len {seq_len} is longer than the model's context ({limit} tokens); use a smaller one")
    if max_chunks is not None and max_chunks < 1:
        raise LowbitError(f"max_chunks must be at least 1, got {max_chunks}")
    ids = tokenize_corpus(loaded.tokenizer, load_texts(dataset, split="eval"))
    chunks = chunk_tokens(ids, seq_len)
    return chunks if max_chunks is None else chunks[:max_chunks]


def evaluate(
    loaded: Any,
    dataset: str = "wiki",
    seq_len: int = 512,
    max_chunks: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of a ``LoadedModel`` on ``dataset`` ("wiki": its eval split, or a .txt/.jsonl path).

    ``max_chunks`` keeps only the first windows (a quick estimate); see ``evaluation_windows``."""
    chunks = evaluation_windows(loaded, dataset, seq_len, max_chunks)
    return perplexity(loaded.model, chunks, batch_size=batch_size, progress=progress)
