"""The accuracy table of ``lowbit eval``: perplexity of models and of quantization schemes, side by side.

Rows: each model as given (float or a lowbit quantized directory), then the first model quantized
with each scheme. Deltas are against the first row.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import os
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch

from lowbit import __version__
from lowbit.eval.perplexity import evaluate
from lowbit.formats import QuantScheme
from lowbit.model.loader import load_model
from lowbit.eval.calibration import quantize
from lowbit.model.qlinear import linear_bits_per_weight
from lowbit.report_files import write_json as write_json_file


class Stopwatch:
    """Wall time of a block, for the CLI's reports."""

    def __enter__(self) -> "Stopwatch":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


@dataclass
class EvalRow:
    label: str  # scheme name, "unquantized", or the model's name
    bits_per_weight: float  # decoder Linear layers, scales and outliers included
    ppl: float
    nll: float
    tokens: int
    quantize_seconds: float | None
    delta: float = 0.0
    delta_pct: float = 0.0


@dataclass(frozen=True)
class EvalSettings:
    dataset: str = "wiki"
    eval_seq_len: int = 512
    max_chunks: int | None = None
    calib: str = "wiki"
    samples: int = 128
    seq_len: int = 512
    seed: int = 0


def run_eval(
    models: list[str], schemes: list[QuantScheme], settings: EvalSettings, *, device: str | None, dtype: str | None,
    on_row: Callable[[list[EvalRow], dict[str, Any]], None] | None = None,
) -> tuple[list[EvalRow], dict[str, Any]]:
    """Evaluate every model, then the first one quantized with each scheme. Returns rows and metadata.

    ``on_row(rows, meta)`` is called after every row with all rows so far (deltas filled in), so a
    long run (a CPU calibration of every preset takes hours) can keep what it has measured.
    """
    rows: list[EvalRow] = []
    first = None
    meta: dict[str, Any] = {}

    def add(row: EvalRow) -> None:
        rows.append(row)
        row.delta = row.ppl - rows[0].ppl
        row.delta_pct = 100 * (row.ppl / rows[0].ppl - 1)
        if not meta:
            meta.update(_meta(first, settings, rows[0].tokens))
        if on_row is not None:
            on_row(rows, meta)

    for name in models:
        loaded = load_model(name, device=device, dtype=dtype)
        scheme = loaded.model.quant_scheme
        label = scheme.name if scheme else "unquantized"
        if first is None:
            first = loaded
            pristine = copy.deepcopy(loaded.model) if schemes else None
        add(_row(label if len(models) == 1 else f"{label} ({loaded.path.name})", loaded, None, settings))
        if loaded is not first:
            del loaded
    for scheme in schemes:
        model = copy.deepcopy(pristine)
        candidate = dataclasses.replace(first, model=model)
        with Stopwatch() as sw:
            quantize(candidate, scheme, settings.calib, samples=settings.samples, seq_len=settings.seq_len,
                     seed=settings.seed)
        add(_row(scheme.name, candidate, sw.seconds, settings))
        del model, candidate
    return rows, meta


def _meta(first: Any, settings: EvalSettings, tokens: int) -> dict[str, Any]:
    dev = first.device
    return {
        "model": str(first.path), "dataset": settings.dataset, "eval_seq_len": settings.eval_seq_len,
        "max_chunks": settings.max_chunks, "calib": settings.calib, "samples": settings.samples,
        "seq_len": settings.seq_len, "tokens": tokens,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "dtype": str(first.model.embed_tokens.weight.dtype).removeprefix("torch."),
        "date": datetime.date.today().isoformat(), "lowbit": __version__,
    }


def _row(label: str, loaded: Any, seconds: float | None, s: EvalSettings) -> EvalRow:
    res = evaluate(loaded, s.dataset, seq_len=s.eval_seq_len, max_chunks=s.max_chunks)
    return EvalRow(label, linear_bits_per_weight(loaded.model), res.ppl, res.nll, res.tokens, seconds)


def format_table(rows: list[EvalRow], meta: dict[str, Any]) -> str:
    head = (f"{Path(meta['model']).name} | {meta['dataset']} | windows of {meta['eval_seq_len']} | "
            f"{meta['tokens']} tokens | {meta['device']} {meta['dtype']}")
    width = max(18, *(len(r.label) for r in rows))
    lines = [head, f"{'scheme':<{width}} {'bits/w':>7} {'ppl':>9} {'delta':>8} {'delta %':>8} {'quant s':>8}"]
    for r in rows:
        q = f"{r.quantize_seconds:.0f}" if r.quantize_seconds is not None else "-"
        lines.append(f"{r.label:<{width}} {r.bits_per_weight:>7.2f} {r.ppl:>9.3f} {r.delta:>+8.3f} "
                     f"{r.delta_pct:>+7.2f}% {q:>8}")
    return "\n".join(lines)


def write_json(path: str | os.PathLike, rows: list[EvalRow], meta: dict[str, Any]) -> None:
    """Atomic write: a temp file renamed into place."""
    write_json_file(path, {"meta": meta, "rows": [dataclasses.asdict(r) for r in rows]}, indent=2)
