"""Sequential, layer-by-layer quantization of a Llama-family model.

Only one decoder layer is on the execution device at a time (the rest can stay on the CPU), so a
model larger than GPU memory can be quantized. Each layer:

1. runs the calibration inputs through the float layer, with hooks that gather, for each group of
   Linears sharing an input, the per-channel absmax, the Hessian 2 X^T X / n and a token sample;
2. smooths (SmoothQuant, alpha searched per group) where the scheme says so, folding the factors
   into the preceding RMSNorm (q/k/v, gate/up) or up_proj's rows (down_proj), and keeping them as a
   run-time divisor where nothing can absorb them (o_proj);
3. picks QUIK outlier columns and COMET FMPQ blocks from the activation statistics, searches
   clipping ratios, and runs GPTQ (or RTN), then swaps each nn.Linear for a QuantLinear;
4. runs the calibration inputs through the now quantized layer to produce the next layer's inputs,
   so later layers calibrate on what they will really see.

Algorithms live in their own modules (gptq, smooth, clip, outliers, fmpq, kv); this module only
sequences them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from lowbit.errors import LowbitError
from lowbit.formats import ActivationFormat, QuantScheme, WeightFormat, get_scheme
from lowbit.model.llama import DecoderLayer, Transformer
from lowbit.model.qlinear import QuantLinear
from lowbit.numerics.quantized import QuantizedWeight
from lowbit.numerics import kv
from lowbit.quant import clip, fmpq, gptq, outliers, smooth


@dataclass(frozen=True)
class CalibrationConfig:
    samples: int = 128  # calibration windows
    seq_len: int = 512  # tokens per window
    batch_size: int = 8  # windows per forward pass
    smooth_tokens: int = 2048  # tokens kept per input group for the smoothing-alpha search
    damp: float = 0.01  # GPTQ dampening, fraction of the mean Hessian diagonal
    seed: int = 0
    # The dtype the calibration forwards compute in. None: float64 for an fp32 model, else the model's
    # dtype. Why float64: the recipe's decisions (GPTQ's codes, the smoothing alpha, clipping ratios)
    # are discrete and each layer calibrates on the quantized layers before it, so fp32 sums that
    # differ in their last bits between CPU BLAS and cuBLAS (~1e-7) moved the default model's w4a8
    # perplexity by 1.5% between CPU and GPU, as much as 1e-7 noise on the activations does
    # (docs/quantization.md). At ~1e-16 no decision moves. On Hopper float64 costs what fp32 does
    # (67 TFLOPS on the FP64 tensor cores, 67 on the FP32 cores without TF32; H100 SXM datasheet);
    # on a CPU about twice the fp32 time.
    compute_dtype: torch.dtype | None = None


# Linears that share an input, and what can absorb a smoothing factor on that input.
_GROUPS: tuple[tuple[tuple[str, ...], str | None], ...] = (
    (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm"),
    (("self_attn.o_proj",), None),
    (("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm"),
    (("mlp.down_proj",), "mlp.up_proj"),
)


def calibration_windows(ids: torch.Tensor, cfg: CalibrationConfig) -> torch.Tensor:
    """(samples, seq_len) int64 windows drawn at seeded random offsets from a token stream (n,)."""
    n = ids.numel()
    if n < cfg.seq_len + 1:
        raise LowbitError(
            f"calibration text too short: {n} tokens, need at least {cfg.seq_len + 1} for --seq-len {cfg.seq_len}"
        )
    gen = torch.Generator().manual_seed(cfg.seed)
    starts = torch.randint(0, n - cfg.seq_len, (cfg.samples,), generator=gen)
    return torch.stack([ids[s : s + cfg.seq_len] for s in starts.tolist()])


class _GroupStats:
    """Statistics of one Linear input: absmax (K,) fp32, Hessian (K, K) float64 and a token sample (<= T, K) fp32."""

    def __init__(self, K: int, device: torch.device, keep_tokens: int, hessian: bool = True) -> None:
        self.absmax = torch.zeros(K, device=device)
        # only GPTQ and the clipping search read the Hessian; RTN schemes skip its (K, K) float64 products
        self.H = gptq.make_empty_hessian(K, device) if hessian else None
        self.n = 0
        self.sample: list[torch.Tensor] = []
        self.keep_tokens = keep_tokens

    def add(self, x: torch.Tensor, where: str) -> None:
        half = x.dtype in (torch.float16, torch.bfloat16)
        raw = x.reshape(-1, x.shape[-1])  # the Hessian takes these (float64 ones unrounded)
        x = raw.float()
        if not torch.isfinite(x).all():
            # the layers before `where` overflowed: in fp16 / bf16 that is usually range, not a bug
            fp32 = "quantize in fp32 (--dtype fp32), " if half else ""
            raise LowbitError(
                f"NaN/Inf in the activations entering {where} during calibration; {fp32}check that the "
                "checkpoint's weights are sane (an overflow in an earlier layer), or calibrate on other text (--calib)"
            )
        self.absmax = torch.maximum(self.absmax, x.abs().amax(0))
        if self.H is not None:
            self.H, self.n = gptq.accumulate_hessian(self.H, raw, self.n)
        have = sum(s.shape[0] for s in self.sample)
        if have < self.keep_tokens:
            step = max(1, x.shape[0] // 64)  # spread the sample over the window, not its first tokens
            self.sample.append(x[::step][: self.keep_tokens - have])

    def tokens(self) -> torch.Tensor:
        return torch.cat(self.sample)

    def rescale(self, s: torch.Tensor) -> None:
        """Statistics of x / s, exactly: absmax / s, H / (s s^T), sample / s."""
        self.absmax = self.absmax / s
        if self.H is not None:
            s64 = s.to(self.H.dtype)  # s s^T in the Hessian's float64: an fp32 product would round it
            self.H = self.H / (s64[:, None] * s64[None, :])
        self.sample = [t / s for t in self.sample]


def _get(module: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def _set(module: nn.Module, path: str, value: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(module, parent) if parent else module, name, value)


def _layer_inputs(model: Transformer, ids: torch.Tensor, dev: torch.device, dtype: torch.dtype) -> torch.Tensor:
    emb_dev = model.embed_tokens.weight.device
    with torch.no_grad():
        return model.embed_tokens(ids.to(emb_dev)).to(dev, dtype)


def _run_layer(model: Transformer, layer: DecoderLayer, hidden: torch.Tensor, cfg: CalibrationConfig) -> torch.Tensor:
    """hidden (n, L, H) through ``layer`` in batches; returns the outputs (same shape)."""
    n, L, _ = hidden.shape
    out = torch.empty_like(hidden)
    positions = torch.arange(L, device=hidden.device)[None]
    for b in range(0, n, cfg.batch_size):
        x = hidden[b : b + cfg.batch_size]
        cos, sin = model.rope(positions.expand(x.shape[0], L), x.dtype)
        mask = model.attention_mask(x.shape[0], L, 0, None, x.device)
        out[b : b + cfg.batch_size] = layer(x, cos, sin, mask, None, 0, 0)
    return out


@torch.no_grad()
def quantize_model(
    model: Transformer,
    scheme: QuantScheme | str,
    calib_ids: torch.Tensor,
    cfg: CalibrationConfig = CalibrationConfig(),
    *,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> Transformer:
    """Quantize ``model`` in place with ``scheme``, calibrating on ``calib_ids`` (samples, seq_len) int64.

    ``device``: where each layer is quantized (default: where the model is). Returns the model, with
    ``model.quant_scheme`` set.
    """
    scheme = get_scheme(scheme)
    home = model.embed_tokens.weight.device
    dev = torch.device(device) if device is not None else home
    dtype = model.embed_tokens.weight.dtype
    compute = cfg.compute_dtype or (torch.float64 if dtype == torch.float32 else dtype)
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise LowbitError(f"the model's weight {name} holds NaN/Inf; the checkpoint is broken")
    hidden = _layer_inputs(model, calib_ids, dev, compute)
    bar = tqdm(model.layers, desc=f"quantizing ({scheme.name})", unit="layer", disable=not progress)
    for i, layer in enumerate(bar):
        layer.to(dev, compute)  # float64 (the default for fp32 models) holds every model dtype exactly
        _quantize_layer(model, layer, i, hidden, scheme, cfg, dtype)
        hidden = _run_layer(model, layer, hidden, cfg)
        layer.to(home, dtype)  # QuantLinear keeps its codes, scales and factors as they are
    if scheme.lm_head:
        _quantize_head(model, hidden, scheme, cfg, dev, home, dtype)
    model.quant_scheme = scheme
    return model


def _quantize_head(model: Transformer, hidden: torch.Tensor, scheme: QuantScheme, cfg: CalibrationConfig,
                   dev: torch.device, home: torch.device, dtype: torch.dtype) -> None:
    """Quantize ``model.lm_head`` (``QuantScheme.lm_head``) on the final norm's outputs of ``hidden``.

    A head tied to the embedding is untied first: the embedding stays float (a row gather reads a few
    rows per token), and smoothing may then fold into the final norm, which only the head reads.
    """
    wfmt, afmt = scheme.for_layer("lm_head")
    if model.lm_head.weight is model.embed_tokens.weight:
        head = nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=False,
                         device=home, dtype=model.lm_head.weight.dtype)
        head.weight.copy_(model.embed_tokens.weight)
        model.lm_head = head
    model.norm.to(dev, hidden.dtype)
    model.lm_head.to(dev, hidden.dtype)
    st = _GroupStats(model.lm_head.in_features, dev, cfg.smooth_tokens, _needs_hessian(wfmt))
    for b in range(0, hidden.shape[0], cfg.batch_size):
        st.add(model.norm(hidden[b : b + cfg.batch_size]), "lm_head")
    runtime = None
    if scheme.smooth and afmt.bits is not None:
        runtime = _smooth_group(model, ("lm_head",), "norm", st, wfmt, afmt, dtype)
    model.lm_head = _quantize_linear(model.lm_head, st, wfmt, afmt, cfg, runtime, "lm_head", dtype).to(home)
    model.norm.to(home, dtype)


def _needs_hessian(wfmt: WeightFormat) -> bool:
    return wfmt.method == "gptq" or wfmt.clip_search


def _collect(model, layer, i, hidden, cfg, scheme) -> tuple[dict[str, _GroupStats], dict[str, torch.Tensor]]:  # noqa: ANN001
    """Run the float layer once with hooks: stats per input group, per-head K/V absmax."""
    stats: dict[str, _GroupStats] = {}
    kv_absmax: dict[str, torch.Tensor] = {}
    hooks = []
    attn = layer.self_attn
    hd = attn.head_dim
    for names, _ in _GROUPS:
        first = names[0]
        lin = _get(layer, first)
        hessian = any(_needs_hessian(scheme.for_layer(f"layers.{i}.{n}")[0]) for n in names)
        stats[first] = _GroupStats(lin.in_features, hidden.device, cfg.smooth_tokens, hessian)
        where = f"layers.{i}.{first}"
        hooks.append(lin.register_forward_pre_hook(lambda m, a, s=stats[first], w=where: s.add(a[0], w)))

    def head_absmax(which: str, out: torch.Tensor) -> None:
        t = out.float().reshape(-1, attn.num_kv_heads, hd)
        if which == "k":  # rope rotates dims (j, j + hd/2) as pairs: their norm bounds the rotated absmax
            t = torch.sqrt(t[..., : hd // 2] ** 2 + t[..., hd // 2 :] ** 2)
        m = t.abs().amax(dim=(0, 2))
        kv_absmax[which] = torch.maximum(kv_absmax[which], m) if which in kv_absmax else m

    hooks.append(attn.k_proj.register_forward_hook(lambda m, a, o: head_absmax("k", o)))
    hooks.append(attn.v_proj.register_forward_hook(lambda m, a, o: head_absmax("v", o)))
    try:
        _run_layer(model, layer, hidden, cfg)
    finally:
        for h in hooks:
            h.remove()
    return stats, kv_absmax


def _smooth_group(layer: DecoderLayer, names: Sequence[str], absorber: str | None, st: _GroupStats,
                  wfmt: WeightFormat, afmt: ActivationFormat, dtype: torch.dtype) -> torch.Tensor | None:
    """Search and fold SmoothQuant factors for one input group; returns the run-time divisor if unfoldable.

    ``dtype``: the model's; a norm that absorbs the factors is rounded to it at once, so that the
    calibration forwards (perhaps in float64) see the gain the quantized model will store."""
    linears = [_get(layer, n) for n in names]
    _, s = smooth.search_smooth_alpha(st.tokens(), [lin.weight.float() for lin in linears], wfmt, afmt)
    for lin in linears:
        lin.weight.mul_(s.to(lin.weight.dtype)[None, :])
    st.rescale(s)
    if absorber is None:
        return s
    target = _get(layer, absorber)
    if isinstance(target, nn.Linear):  # up_proj feeds down_proj through an elementwise product
        target.weight.div_(s.to(target.weight.dtype)[:, None])
        if target.bias is not None:
            target.bias.div_(s.to(target.bias.dtype))
    else:  # RMSNorm
        target.weight.div_(s.to(target.weight.dtype))
        target.weight.copy_(target.weight.to(dtype))
    return None


def _quantize_linear(lin: nn.Linear, st: _GroupStats, wfmt: WeightFormat, afmt: ActivationFormat,
                     cfg: CalibrationConfig, runtime_smooth: torch.Tensor | None, name: str,
                     dtype: torch.dtype) -> QuantLinear:
    """``name`` (``layers.3.self_attn.q_proj``) goes into GPTQ's warnings and errors."""
    return _quantize_linears([lin], st, wfmt, afmt, cfg, runtime_smooth, name, dtype)[0]


def _row_slice(qw: QuantizedWeight, a: int, b: int) -> QuantizedWeight:
    """Output channels ``a:b`` of ``qw``: every GPTQ / RTN / clipping choice is made per row."""
    zero = None if qw.zero is None else qw.zero[a:b].contiguous()
    return QuantizedWeight(qw.fmt, qw.codes[a:b].contiguous(), qw.scale[a:b].contiguous(), zero, qw.g_idx)


def _quantize_linears(lins: Sequence[nn.Linear], st: _GroupStats, wfmt: WeightFormat, afmt: ActivationFormat,
                      cfg: CalibrationConfig, runtime_smooth: torch.Tensor | None, name: str,
                      dtype: torch.dtype) -> list[QuantLinear]:
    """Quantize Linears that read one input (statistics ``st``) and share formats, as one matrix.

    ``dtype``: the model's (bias and outlier weights), whatever dtype the calibration computes in.

    Their weights are stacked along the output channels: GPTQ, RTN and the clipping search treat each
    row on its own and depend on the input only through ``st`` (the Hessian is the input's), so one
    factorization of the Hessian and one column sweep over the stacked (sum N_i, K) weights give every
    Linear the result it would get alone (up to the reduction order of GPTQ's block updates, a matmul
    over more rows), in a third of the sweeps for q/k/v. ``name`` goes into GPTQ's warnings and errors.
    """
    W = torch.cat([lin.weight.float() for lin in lins]) if len(lins) > 1 else lins[0].weight.float()
    K = W.shape[1]
    out_idx = None
    if afmt.outlier_columns:
        out_idx = outliers.select_outlier_columns(st.absmax, min(afmt.outlier_columns, K - 1))
        kept, out_idx = outliers.split_columns(K, out_idx)
    else:
        kept = torch.arange(K, device=W.device)
    perm = high = None
    if afmt.fmpq_block:
        perm, high = fmpq.assign_fmpq_blocks(st.absmax[kept], afmt.fmpq_block, afmt.fmpq_high_fraction, afmt.bits)
        kept = kept[perm]
    # Columns in stored order: the quantized ones (kept, permuted), then the outliers, which GPTQ
    # processes last so that they absorb the quantization error of all the others (QUIK).
    order = kept if out_idx is None else torch.cat([kept, out_idx])
    Wo = W[:, order]
    Ho = None if st.H is None else st.H[order][:, order]
    Kq = kept.numel()
    ratio = clip.search_clip(Wo[:, :Kq], Ho[:Kq, :Kq], wfmt) if wfmt.clip_search else None
    if wfmt.method == "gptq":
        keep = None if out_idx is None else torch.arange(Kq, K, device=W.device)
        qw, outlier_w = gptq.gptq_quantize(Wo, Ho, wfmt, damp=cfg.damp, clip=ratio, keep_columns=keep, name=name)
    else:
        qw, outlier_w = gptq.rtn_quantize(Wo[:, :Kq], wfmt, clip=ratio), (None if out_idx is None else Wo[:, Kq:])
    result, row = [], 0
    for j, lin in enumerate(lins):
        n = lin.out_features

        def own(t: torch.Tensor | None) -> torch.Tensor | None:
            # every Linear its own copy of the input's choices: a checkpoint stores each layer's tensors
            # (safetensors refuses tensors that share memory)
            return t if t is None or j == 0 else t.clone()

        sl = _row_slice(qw, row, row + n)
        sl.g_idx = own(sl.g_idx)
        result.append(QuantLinear.from_quantized(
            sl, afmt, in_features=K, dtype=dtype, bias=lin.bias,
            smooth=own(runtime_smooth), outlier_idx=own(out_idx),
            outlier_weight=None if outlier_w is None else outlier_w[row : row + n].contiguous(),
            act_perm=own(perm), fmpq_high=own(high),
        ))
        row += n
    return result


def _quantize_layer(model: Transformer, layer: DecoderLayer, i: int, hidden: torch.Tensor,
                    scheme: QuantScheme, cfg: CalibrationConfig, dtype: torch.dtype) -> None:
    stats, kv_absmax = _collect(model, layer, i, hidden, cfg, scheme)
    # 1. smoothing for every group first: folding into up_proj must happen before up_proj is quantized
    runtime: dict[str, torch.Tensor | None] = {}
    for names, absorber in _GROUPS:
        wfmt, afmt = scheme.for_layer(f"layers.{i}.{names[0]}")
        if scheme.smooth and afmt.bits is not None:
            runtime[names[0]] = _smooth_group(layer, names, absorber, stats[names[0]], wfmt, afmt, dtype)
    # 2. quantize every Linear; those reading one input in the same formats together (_quantize_linears)
    for names, _ in _GROUPS:
        together: dict[tuple[WeightFormat, ActivationFormat], list[str]] = {}
        for name in names:
            if not torch.isfinite(_get(layer, name).weight).all():
                raise LowbitError(f"weight layers.{i}.{name} holds NaN/Inf after smoothing")
            together.setdefault(scheme.for_layer(f"layers.{i}.{name}"), []).append(name)
        for (wfmt, afmt), members in together.items():
            parent = members[0].rpartition(".")[0]  # self_attn or mlp: "layers.3.self_attn.q_proj+k_proj+v_proj"
            label = f"layers.{i}.{parent}." + "+".join(n.rpartition(".")[2] for n in members)
            qlins = _quantize_linears([_get(layer, n) for n in members], stats[names[0]], wfmt, afmt, cfg,
                                      runtime.get(names[0]), label, dtype)
            for name, qlin in zip(members, qlins):
                _set(layer, name, qlin)
    # 3. KV cache format, with static per-head scales for fp8
    if scheme.kv_cache.dtype != "fp16":
        attn = layer.self_attn
        attn.kv_format = scheme.kv_cache
        if scheme.kv_cache.dtype == "fp8_e4m3":
            attn.k_scale = kv.calibrate_kv_scales(kv_absmax["k"])
            attn.v_scale = kv.calibrate_kv_scales(kv_absmax["v"])
