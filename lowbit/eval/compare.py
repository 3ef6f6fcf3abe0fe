"""``lowbit compare``: what quantization cost, shown side by side.

A float model (BASE) and a lowbit checkpoint quantized from it (QUANT) are each put through the two
paths a user would take one at a time, and the results are printed together:

- perplexity on the same held-out windows, computed as ``lowbit eval`` computes it
  (``lowbit.eval.perplexity``: the windows of ``evaluation_windows``, scored by ``perplexity``), on the
  model as loaded, before anything is fused or repacked for inference;
- a greedy answer to each prompt, generated as ``lowbit generate MODEL --prompt PROMPT`` generates it:
  the prompt through the chat template (``encode_prompt``), the model set up by
  ``prepare_for_inference``, decoded by the engine (``lowbit.engine.generate.generate``) with the
  model's own stop tokens, each prompt alone (so an answer does not depend on the other prompts).

Both models must read the same tokens, or neither number means anything beside the other: the
vocabularies, the evaluation windows and every prompt's token ids are checked to be equal (a
LowbitError otherwise). A QUANT whose shape is not BASE's draws a warning: it was not quantized
from BASE, so the difference is more than quantization.

``format_comparison`` lays the two answers out in two columns of a given width (the CLI passes the
terminal's). Widths are counted in characters, so text in wide (East Asian) characters may not line up.
"""

from __future__ import annotations

import datetime
import json
import os
import textwrap
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from itertools import zip_longest
from pathlib import Path
from typing import Any

import torch

from lowbit import __version__
from lowbit.assets import resolve_model
from lowbit.errors import LowbitError
from lowbit.report_files import write_json as write_json_file

GAP = " | "  # between the two answer columns
MIN_WIDTH = 40  # narrower terminals get this many columns anyway
DEFAULT_WIDTH = 100  # when the output is not a terminal
_SHAPE_FIELDS = ("architecture", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim")


@dataclass(frozen=True)
class CompareSettings:
    """What both models are measured on. Checked when made, before any model is loaded."""

    dataset: str = "wiki"  # "wiki" (the default corpus's held-out split) or a .txt/.jsonl file
    eval_seq_len: int = 512  # tokens per evaluation window
    max_chunks: int | None = None  # evaluate only the first N windows (None: all)
    max_new_tokens: int = 128  # tokens per answer at most
    chat: bool = True  # prompts through the chat template (when the tokenizer has one)
    system: str | None = None  # system message for the chat template

    def __post_init__(self) -> None:
        if self.eval_seq_len < 2:
            raise LowbitError(f"--eval-seq-len must be at least 2, got {self.eval_seq_len}")
        if self.max_chunks is not None and self.max_chunks < 1:
            raise LowbitError(f"--max-chunks must be at least 1, got {self.max_chunks}")
        if self.max_new_tokens < 1:
            raise LowbitError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")


@dataclass(frozen=True)
class Answer:
    """One model's greedy answer to one prompt."""

    text: str  # decoded as ``lowbit generate`` prints it (special tokens dropped)
    token_ids: tuple[int, ...]  # generated tokens, without the stop token
    finish_reason: str  # "stop" (the model ended it) or "length" (cut at max_new_tokens)


@dataclass(frozen=True)
class ModelResult:
    """One side of the comparison."""

    name: str  # the model as given (a known name or a path)
    path: str  # where it was loaded from
    label: str  # "unquantized", or the scheme's name
    bits_per_weight: float  # decoder Linear layers, scales and outliers included (as in lowbit eval)
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token, in nats
    answers: tuple[Answer, ...]  # one per prompt, in order


@dataclass(frozen=True)
class Comparison:
    """BASE and QUANT on the same windows and prompts; ``meta`` says what was measured where."""

    prompts: tuple[str, ...]
    base: ModelResult
    quant: ModelResult
    meta: dict[str, Any]  # dataset, eval_seq_len, windows, tokens, device, dtype, max_new_tokens, chat, ...

    @property
    def ppl_ratio(self) -> float:
        """QUANT's perplexity over BASE's (1.0: nothing lost)."""
        return self.quant.ppl / self.base.ppl

    @property
    def ppl_increase_pct(self) -> float:
        return 100 * (self.ppl_ratio - 1)

    def shared_prefix(self, i: int) -> int:
        """How many tokens prompt ``i``'s two answers have in common from their start."""
        n = 0
        for a, b in zip(self.base.answers[i].token_ids, self.quant.answers[i].token_ids):
            if a != b:
                break
            n += 1
        return n

    def to_json(self) -> dict[str, Any]:
        sides = {k: {f: v for f, v in asdict(side).items() if f != "answers"}
                 for k, side in (("base", self.base), ("quant", self.quant))}
        answers = [
            {"prompt": p, "base": asdict(self.base.answers[i]), "quant": asdict(self.quant.answers[i]),
             "shared_prefix_tokens": self.shared_prefix(i)}
            for i, p in enumerate(self.prompts)
        ]
        return {"meta": self.meta, **sides, "ppl_ratio": self.ppl_ratio, "ppl_increase_pct": self.ppl_increase_pct,
                "answers": answers}


# ------------------------------------------------------------------ checks


def _raw_config(path: Path) -> dict[str, Any] | None:
    """A model directory's config.json, or None for anything else (a GGUF file: always float)."""
    cfg = path / "config.json"
    if not (path.is_dir() and cfg.is_file()):
        return None
    try:
        return json.loads(cfg.read_text())
    except (OSError, ValueError):
        return None  # the loader names the broken file


def check_arguments(base: str | os.PathLike, quant: str | os.PathLike) -> None:
    """The checks that need no weights: QUANT is a lowbit quantized directory, BASE is not one.

    Runs before the (slow) loads; raises LowbitError saying which argument is wrong and what to pass."""
    from lowbit.checkpoint.native import scheme_from_config

    base_cfg = _raw_config(resolve_model(base))
    if base_cfg is not None and scheme_from_config(base_cfg) is not None:
        raise LowbitError(f"BASE {str(base)!r} is a quantized checkpoint; pass the float model it was quantized from "
                          "first, then the quantized directory (lowbit compare FLOAT_MODEL QUANTIZED_DIR)")
    quant_path = resolve_model(quant)
    quant_cfg = _raw_config(quant_path)
    if quant_cfg is None or scheme_from_config(quant_cfg) is None:
        raise LowbitError(f"QUANT {str(quant)!r} is not a lowbit quantized checkpoint; make one with "
                          f"'lowbit quantize {base} --scheme w4a8 -o DIR' and pass DIR")


def _check_pair(base: Any, quant: Any) -> None:
    """Both loaded models have a tokenizer and the same vocabulary; a shape mismatch warns."""
    for role, loaded in (("BASE", base), ("QUANT", quant)):
        if loaded.tokenizer is None:
            raise LowbitError(f"{role} {loaded.path} ships no tokenizer; comparing needs tokenizer files beside "
                              "the weights")
    if base.config.vocab_size != quant.config.vocab_size or base.tokenizer.get_vocab() != quant.tokenizer.get_vocab():
        raise LowbitError(
            f"BASE and QUANT have different vocabularies ({base.config.vocab_size} and {quant.config.vocab_size} "
            f"embeddings, {len(base.tokenizer)} and {len(quant.tokenizer)} tokens): their perplexities cannot be "
            "compared. Pass QUANT quantized from BASE (lowbit quantize BASE --scheme ... -o QUANT)")
    differ = [f"{f} {getattr(base.config, f)} vs {getattr(quant.config, f)}" for f in _SHAPE_FIELDS
              if getattr(base.config, f) != getattr(quant.config, f)]
    if differ:
        warnings.warn(f"QUANT was not quantized from BASE ({', '.join(differ)}): the difference shown is more than "
                      "quantization", stacklevel=3)


def _tokenizer_mismatch(what: str, fix: str) -> LowbitError:
    return LowbitError(f"BASE's and QUANT's tokenizers turn {what} into different tokens, so the two models would "
                       f"not read the same input; {fix}")


# ------------------------------------------------------------------ measuring


def _measure(loaded: Any, name: str, windows: torch.Tensor, prompt_ids: list[list[int]], settings: CompareSettings,
             log: Callable[[str], None]) -> ModelResult:
    """Perplexity as ``lowbit eval`` takes it, then greedy answers as ``lowbit generate`` makes them."""
    from lowbit.engine.generate import generate
    from lowbit.engine.inference import prepare_for_inference, release_engine
    from lowbit.engine.sampling import SamplingParams
    from lowbit.engine.text import decode
    from lowbit.eval.perplexity import perplexity
    from lowbit.model.qlinear import linear_bits_per_weight

    scheme = loaded.model.quant_scheme
    label = scheme.name if scheme is not None else "unquantized"
    log(f"[{label} ({name}): perplexity on {windows.shape[0]} windows]")
    ppl = perplexity(loaded.model, windows)  # before any fusion: the numerics lowbit eval measures
    bits = linear_bits_per_weight(loaded.model)
    setup = prepare_for_inference(loaded.model)
    how = setup.describe()
    log(f"[{label} ({name}): answering {len(prompt_ids)} prompt(s){', ' + how if how else ''}]")
    params = SamplingParams(max_new_tokens=settings.max_new_tokens, stop_token_ids=loaded.stop_token_ids)
    # one prompt at a time: an answer is what `lowbit generate MODEL -p PROMPT` prints, whatever the other
    # prompts (in a batch, float rounding differs with the batch size, and a near-tie can turn the other way)
    completions = [generate(loaded.model, [ids], params)[0] for ids in prompt_ids]
    release_engine(loaded.model)  # its KV cache goes before the other model's engine is built
    answers = tuple(Answer(decode(loaded.tokenizer, c.token_ids), tuple(c.token_ids), c.finish_reason)
                    for c in completions)
    return ModelResult(name, str(loaded.path), label, bits, ppl.ppl, ppl.nll, answers)


def run_compare(
    base: str | os.PathLike,
    quant: str | os.PathLike,
    prompts: Sequence[str],
    settings: CompareSettings = CompareSettings(),
    *,
    device: str | None = None,
    dtype: str | None = None,
    log: Callable[[str], None] = lambda line: None,
) -> Comparison:
    """Load BASE (a float model) and QUANT (a lowbit checkpoint quantized from it) on one device and dtype,
    check they read the same tokens, and measure both (module docstring). ``log`` gets progress lines."""
    from lowbit.engine.text import encode_prompt
    from lowbit.eval.perplexity import evaluation_windows
    from lowbit.model.loader import load_model

    if not prompts:
        raise LowbitError("give at least one --prompt")
    check_arguments(base, quant)
    log(f"[loading {base} and {quant}]")
    base_loaded = load_model(base, device=device, dtype=dtype)
    quant_loaded = load_model(quant, device=device, dtype=dtype)
    _check_pair(base_loaded, quant_loaded)

    args = (settings.dataset, settings.eval_seq_len, settings.max_chunks)
    windows = evaluation_windows(base_loaded, *args)
    other = evaluation_windows(quant_loaded, *args)
    if windows.shape != other.shape or not torch.equal(windows, other):
        raise _tokenizer_mismatch(f"the {settings.dataset} evaluation text", "pass QUANT quantized from BASE "
                                  "(lowbit quantize saves BASE's tokenizer beside the weights)")
    ids = []
    for i, p in enumerate(prompts):
        one, two = (encode_prompt(m.tokenizer, p, chat=settings.chat, system=settings.system)
                    for m in (base_loaded, quant_loaded))
        if one != two:
            raise _tokenizer_mismatch(f"prompt {i + 1}", "their chat templates may differ: try --no-chat")
        ids.append(one)

    base_result = _measure(base_loaded, str(base), windows, ids, settings, log)
    del base_loaded  # BASE's weights (and fused copies, on CUDA) go before QUANT's engine is built
    quant_result = _measure(quant_loaded, str(quant), windows, ids, settings, log)
    dev = quant_loaded.device
    meta = {
        "dataset": settings.dataset, "eval_seq_len": settings.eval_seq_len, "max_chunks": settings.max_chunks,
        "windows": int(windows.shape[0]), "tokens": int(windows.shape[0] * (windows.shape[1] - 1)),
        "max_new_tokens": settings.max_new_tokens, "chat": settings.chat, "system": settings.system,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "dtype": str(quant_loaded.model.embed_tokens.weight.dtype).removeprefix("torch."),
        "date": datetime.date.today().isoformat(), "lowbit": __version__,
    }
    return Comparison(tuple(prompts), base_result, quant_result, meta)


# ------------------------------------------------------------------ printing


def wrap(text: str, width: int) -> list[str]:
    """``text`` as lines of at most ``width`` characters: each of its lines wrapped on its own (so the
    model's line breaks stay), a word longer than ``width`` broken."""
    out: list[str] = []
    for line in text.strip("\n").splitlines() or [""]:
        out.extend(textwrap.wrap(line, width, drop_whitespace=True) or [""])
    return out


def two_columns(left: str, right: str, width: int) -> list[str]:
    """``left`` and ``right`` wrapped side by side in lines of at most ``width`` characters, split by GAP."""
    col = (max(width, MIN_WIDTH) - len(GAP)) // 2
    rows = zip_longest(wrap(left, col), wrap(right, col), fillvalue="")
    return [f"{a:<{col}}{GAP}{b}".rstrip() for a, b in rows]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _ending(answer: Answer) -> str:
    why = "the model stopped" if answer.finish_reason == "stop" else "the limit"
    return f"({_plural(len(answer.token_ids), 'token')}, {why})"


def format_comparison(cmp: Comparison, width: int = DEFAULT_WIDTH) -> str:
    """The report: both perplexities and their ratio, then each prompt with the two answers side by side."""
    width = max(width, MIN_WIDTH)
    b, q, m = cmp.base, cmp.quant, cmp.meta
    label_w = max(len(b.label), len(q.label))
    lines = [
        f"BASE  {b.label:<{label_w}}  {b.bits_per_weight:5.2f} bits/w  {b.name}",
        f"QUANT {q.label:<{label_w}}  {q.bits_per_weight:5.2f} bits/w  {q.name}",
        "",
        *wrap(f"perplexity (lower is better) on {m['dataset']}'s held-out text, {_plural(m['windows'], 'window')} "
              f"of {m['eval_seq_len']} tokens, {m['device']} {m['dtype']}:", width),
        f"  {b.label:<{label_w}}  {b.ppl:9.3f}",
        f"  {q.label:<{label_w}}  {q.ppl:9.3f}  x{cmp.ppl_ratio:.3f} ({cmp.ppl_increase_pct:+.1f}%)",
    ]
    col = (width - len(GAP)) // 2
    rule = f"{'-' * col}-+-{'-' * (width - col - len(GAP))}"
    for i, prompt in enumerate(cmp.prompts):
        ba, qa = b.answers[i], q.answers[i]
        shared = cmp.shared_prefix(i)
        if ba.token_ids == qa.token_ids:
            same = "the same answer"
        elif shared == 0:
            same = "the answers differ from the first token on"
        else:
            same = f"the answers agree on their first {_plural(shared, 'token')}"
        lines += ["", "=" * width, *wrap(f"[{i + 1}/{len(cmp.prompts)}] {prompt}", width), "-" * width]
        lines += [*two_columns(b.label, q.label, width), rule, *two_columns(ba.text, qa.text, width), rule]
        lines += two_columns(_ending(ba), _ending(qa), width)
        lines += wrap(f"greedy decoding, at most {m['max_new_tokens']} tokens: {same}", width)
    return "\n".join(lines)


def write_json(path: str | os.PathLike, cmp: Comparison) -> None:
    """The comparison as JSON at ``path``, atomically (a temp file renamed into place)."""
    write_json_file(path, cmp.to_json(), indent=2)


__all__ = ["Answer", "CompareSettings", "Comparison", "ModelResult", "check_arguments", "format_comparison",
           "run_compare", "two_columns", "wrap", "write_json"]
