"""``lowbit.quantize``: one entry point from a loaded model, a scheme and calibration text to a quantized model."""

from __future__ import annotations

import time
from typing import Any

import torch

from lowbit.errors import LowbitError
from lowbit.formats import QuantScheme, get_scheme
from lowbit.model.llama import Transformer
from lowbit.model.qlinear import QuantLinear
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
        from lowbit.eval.corpus import load_texts
        from lowbit.eval.perplexity import tokenize_corpus

        windows = calibration_windows(tokenize_corpus(tokenizer, load_texts(calib, split="calib")), cfg)
    return quantize_model(transformer, scheme, windows, cfg, device=device, progress=progress)


def linear_bits_per_weight(model: Transformer) -> float:
    """Average storage bits per weight of the decoder's Linear layers (scales, zeros, outliers included)."""
    bits = weights = 0.0
    for module in model.layers.modules():
        if isinstance(module, QuantLinear):
            n, kq = module.out_features, module.quantized_in_features
            bits += n * kq * module.wfmt.bits_per_weight() + 16 * n * (module.in_features - kq)
            weights += n * module.in_features
        elif isinstance(module, torch.nn.Linear):
            bits += 16 * module.weight.numel()
            weights += module.weight.numel()
    return bits / weights


class Stopwatch:
    """Wall time of a block, for the CLI's reports."""

    def __enter__(self) -> "Stopwatch":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
