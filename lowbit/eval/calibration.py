"""Calibration text and ``lowbit.quantize``, the one entry point from a loaded model, a scheme and
calibration text to a quantized model.

It lives here, above ``lowbit.quant`` (the algorithms, which take token windows), because the text
comes from this package's corpora (``lowbit.eval.corpus``) and tokenization (``lowbit.eval.perplexity``).
"""

from __future__ import annotations

from typing import Any

import torch

from lowbit.errors import LowbitError
from lowbit.eval.corpus import load_texts
from lowbit.eval.perplexity import tokenize_corpus
from lowbit.formats import QuantScheme, get_scheme
from lowbit.model.llama import Transformer
from lowbit.quant.calibrate import CalibrationConfig, calibration_windows, quantize_model


def quantize(
    model: Any,
    scheme: QuantScheme | str,
    calib: str | torch.Tensor = "wiki",
    *,
    samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> Transformer:
    """Quantize a model in place and return it.

    ``model``: a ``LoadedModel`` (from ``lowbit.load_model``) or a bare ``Transformer``.
    ``calib``: ``"wiki"`` (the default corpus's calibration split), a path to a .txt/.jsonl file, or
    token ids: a (n,) stream or (samples, seq_len) windows. Text needs a LoadedModel (its tokenizer).
    """
    scheme = get_scheme(scheme)
    transformer = getattr(model, "model", model)
    if not isinstance(transformer, Transformer):
        raise LowbitError("quantize() takes a LoadedModel (lowbit.load_model) or a lowbit Transformer")
    if transformer.quant_scheme is not None:
        raise LowbitError("this model is already quantized; load the float model again to quantize it differently")
    cfg = CalibrationConfig(samples=samples, seq_len=seq_len, seed=seed)
    if isinstance(calib, torch.Tensor):
        ids = calib.long()
        windows = ids if ids.ndim == 2 else calibration_windows(ids, cfg)
    else:
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is None:
            raise LowbitError("calibration from text needs the model's tokenizer: pass a LoadedModel or token ids")
        windows = calibration_windows(tokenize_corpus(tokenizer, load_texts(calib, split="calib")), cfg)
    return quantize_model(transformer, scheme, windows, cfg, device=device, progress=progress)
