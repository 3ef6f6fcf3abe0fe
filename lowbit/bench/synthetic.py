"""Models with random weights in a real model's shape, for speed measurements.

Decode and prefill speed depend on shapes, formats and kernels, not on weight values, so a
Llama-3-8B-shaped model with random weights times what a real Llama-3-8B would, without a 16 GB
download. Quantized variants are made by round-to-nearest in the scheme's own formats (codes,
scales, group size, per-channel or grouped, 8-bit activations): the same tensors, layouts and
kernels as a calibrated checkpoint; only the numbers differ. Calibration-only choices that do not
change the layout (GPTQ, clipping search, the SmoothQuant alpha) are skipped. The w4a16 preset's
act-order uses static groups, which keeps natural-order groups in the checkpoint, so its layout is
the same as RTN's.

Choices that do shape the layout but come from calibration statistics are made *synthetically*,
with a fixed seed, by running the library's own selection on planted activation statistics
(``synthetic_absmax``): every input channel gets an absmax near 1, a random few get
``OUTLIER_SCALE`` times that, as LLM outlier channels stand 10-100x above the median.
- QUIK (``outlier_columns``): ``lowbit.quant.outliers.select_outlier_columns`` picks the planted
  outliers, so the columns are random; int4 codes cover the kept columns, the outlier columns keep
  their fp16 weights.
- COMET (``fmpq_block``): ``lowbit.quant.fmpq.assign_fmpq_blocks`` sorts channels by absmax (the
  ``act_perm``) and marks the blocks holding outliers as 8-bit; planting ``fmpq_high_fraction`` of the
  channels as outliers fills exactly that share of blocks (25% for w4a4kv4-comet when K is a
  multiple of 512, as all of Llama-3-8B's are), made of random channels. Weights are stored in
  ``act_perm`` order.
- 2:4 (``sparsity``): the 2 largest-magnitude of every 4 weights along K are kept (SparseGPT's mask
  with an identity Hessian), then RTN quantizes the pruned weight.
Choices belong to an *input*, so the Linears reading the same input (q/k/v, gate/up) share them and
stay concatenable (``lowbit.model.fuse``), as after a real calibration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.formats import ActivationFormat, QuantScheme, WeightFormat, get_scheme
from lowbit.model.config import ModelConfig
from lowbit.model.llama import Transformer

if TYPE_CHECKING:
    from lowbit.model.qlinear import QuantLinear

# Meta's Llama-3-8B config.json, the fields our loader and transformers' LlamaConfig read
LLAMA3_8B: dict[str, Any] = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192,
    "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128001,
}
# Meta's Llama-3-70B: the same fields at 70B's shape
LLAMA3_70B: dict[str, Any] = {
    **LLAMA3_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
}
SYNTHETIC = {"llama3-8b-random": LLAMA3_8B}

# the decoder's Linears, grouped by the input they read (calibration choices are per input)
INPUT_GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",),
)
OUTLIER_SCALE = 20.0  # planted outlier channels' absmax over the others' (module docstring)


def random_model(hf_config: dict[str, Any], device: torch.device | str, dtype: torch.dtype,
                 seed: int = 0) -> Transformer:
    """A Transformer of ``hf_config``'s shape with N(0, 0.02) weights (transformers' default init), norms at 1."""
    from lowbit.model.loader import build_empty

    model = build_empty(ModelConfig.from_hf(hf_config), torch.device(device), dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    # inference only: with grad on, RTN's arithmetic on the weights would record an autograd graph that
    # keeps fp32 copies of every weight alive through the scales (measured: 34 GB on the 8B shape)
    model.requires_grad_(False)
    return model


@dataclass(frozen=True)
class InputChoices:
    """Calibration-dependent layout choices for one Linear input of K channels (module docstring).

    kept         (Kq,) int64: the input channels the quantized weight columns hold, in stored order
                 (the non-outliers ascending, then permuted by ``act_perm``)
    outlier_idx  (n_out,) int64 ascending QUIK outlier channels, or None
    act_perm     (Kq,) int64 COMET order of the non-outlier channels, or None
    fmpq_high    (ceil(Kq / fmpq_block),) bool, COMET's 8-bit blocks (a prefix), or None
    All on the CPU; the same for every Linear that reads this input.
    """

    kept: torch.Tensor
    outlier_idx: torch.Tensor | None = None
    act_perm: torch.Tensor | None = None
    fmpq_high: torch.Tensor | None = None


def synthetic_absmax(K: int, n_outliers: int, gen: torch.Generator) -> torch.Tensor:
    """(K,) fp32 per-channel activation absmax as a calibration pass would gather it, with ``n_outliers``
    planted outlier channels at random positions (``OUTLIER_SCALE`` x the others, which lie in [1, 1.5))."""
    absmax = 1.0 + 0.5 * torch.rand(K, generator=gen)
    absmax[torch.randperm(K, generator=gen)[:n_outliers]] *= OUTLIER_SCALE
    return absmax


def synthetic_choices(K: int, afmt: ActivationFormat, gen: torch.Generator) -> InputChoices:
    """QUIK outlier columns and COMET FMPQ blocks for an input of K channels, from planted statistics,
    as ``lowbit.quant.calibrate`` picks them from real ones (outliers first, FMPQ over the rest)."""
    from lowbit.quant import fmpq, outliers

    kept = torch.arange(K)
    out_idx = perm = high = None
    if afmt.outlier_columns:
        n = min(afmt.outlier_columns, K - 1)  # at least one quantized column, as calibration keeps
        out_idx = outliers.select_outlier_columns(synthetic_absmax(K, n, gen), n)
        kept, out_idx = outliers.split_columns(K, out_idx)
    if afmt.fmpq_block:
        Kq = kept.numel()
        n = math.floor(afmt.fmpq_high_fraction * Kq)
        if 2 * n >= Kq:  # fmpq.outlier_channels compares with the median, which outliers must not reach
            raise LowbitError(f"synthetic FMPQ plants outlier channels to fill the 8-bit blocks, which needs "
                              f"fmpq_high_fraction < 0.5; got {afmt.fmpq_high_fraction}")
        perm, high = fmpq.assign_fmpq_blocks(synthetic_absmax(Kq, n, gen), afmt.fmpq_block,
                                             afmt.fmpq_high_fraction, afmt.bits)
        kept = kept[perm]
    return InputChoices(kept, out_idx, perm, high)


def input_choices(K: int, afmt: ActivationFormat, gen: torch.Generator) -> InputChoices:
    """The choices of an input read in ``afmt``: natural column order, or synthetic ones for formats
    whose layout comes from calibration statistics (outlier columns, FMPQ blocks)."""
    if not afmt.outlier_columns and not afmt.fmpq_block:
        return InputChoices(torch.arange(K))
    return synthetic_choices(K, afmt, gen)


def prune_2of4(w: torch.Tensor) -> torch.Tensor:
    """w (N, K) float with the 2 smallest-magnitude of every 4 consecutive weights along K set to 0."""
    from lowbit.quant.sparse import select_n_of_m

    N, K = w.shape
    if K % 4:
        raise LowbitError(f"2:4 sparsity groups input columns by 4; this layer has {K} (not a multiple of 4)")
    # an all-ones inverse-Hessian diagonal makes SparseGPT's saliency w**2: magnitude pruning
    prune = select_n_of_m(w.reshape(-1, 4), torch.ones(4, device=w.device)).reshape(N, K)
    return w.masked_fill(prune, 0.0)


def rtn_linear(lin: torch.nn.Linear, wfmt: WeightFormat, afmt: ActivationFormat, choices: InputChoices,
               smooth: bool = False) -> QuantLinear:
    """A ``QuantLinear`` of ``lin`` in (wfmt, afmt) by round-to-nearest, with the input's ``choices``.

    ``smooth``: carry all-ones SmoothQuant factors (the scheme divides activations at run time).
    """
    from lowbit.model.qlinear import QuantLinear
    from lowbit.quant.gptq import rtn_quantize

    W = lin.weight.float()
    dev = W.device
    out_idx = None if choices.outlier_idx is None else choices.outlier_idx.to(dev)
    reordered = out_idx is not None or choices.act_perm is not None
    Wq = W[:, choices.kept.to(dev)] if reordered else W  # quantized columns in stored order
    if wfmt.sparsity == "2:4":
        Wq = prune_2of4(Wq)
    qw = rtn_quantize(Wq, wfmt)
    return QuantLinear.from_quantized(
        qw, afmt, in_features=lin.in_features, dtype=lin.weight.dtype, bias=lin.bias,
        smooth=torch.ones(lin.in_features, device=dev) if smooth else None,
        outlier_idx=out_idx, outlier_weight=None if out_idx is None else W[:, out_idx],
        act_perm=None if choices.act_perm is None else choices.act_perm.to(dev),
        fmpq_high=None if choices.fmpq_high is None else choices.fmpq_high.to(dev),
    )


@torch.no_grad()
def quantize_rtn(model: Transformer, scheme: QuantScheme | str, progress: bool = True, seed: int = 0) -> Transformer:
    """Replace every decoder Linear (and the lm_head with ``scheme.lm_head``) by a QuantLinear in
    ``scheme``'s formats, by round-to-nearest, in place.

    For speed measurements (module docstring): outlier columns, FMPQ blocks and 2:4 masks are
    synthetic, drawn from ``seed`` (the same on every device). Whether every layer then has a GPU
    kernel is the caller's check, where it times on CUDA (``lowbit.bench.e2e.require_kernels``).
    """
    scheme = get_scheme(scheme)
    if model.quant_scheme is not None:
        raise LowbitError("the model is already quantized")
    gen = torch.Generator().manual_seed(seed)
    for i, layer in enumerate(tqdm(model.layers, desc=f"RTN {scheme.name}", unit="layer", disable=not progress)):
        for group in INPUT_GROUPS:
            choices: dict[ActivationFormat, InputChoices] = {}  # per format: overrides may differ within a group
            for path in group:
                parent_name, attr = path.split(".")
                parent = getattr(layer, parent_name)
                lin = getattr(parent, attr)
                wfmt, afmt = scheme.for_layer(f"layers.{i}.{path}")
                if afmt not in choices:
                    choices[afmt] = input_choices(lin.in_features, afmt, gen)
                setattr(parent, attr, rtn_linear(lin, wfmt, afmt, choices[afmt], smooth=scheme.smooth))
                del lin
    if scheme.lm_head:
        wfmt, afmt = scheme.for_layer("lm_head")
        head = model.lm_head
        choices = input_choices(head.in_features, afmt, gen)
        model.lm_head = rtn_linear(head, wfmt, afmt, choices, smooth=scheme.smooth)  # a tied head: untied
    model.kv_format = scheme.kv_cache
    model.quant_scheme = scheme
    return model
