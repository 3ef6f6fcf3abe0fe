"""Projection fusion for inference: q, k, v in one GEMM, gate and up in one GEMM.

The three attention projections read the same input, as do the two MLP input projections. One
GEMM over the concatenated weights reads the activations once, quantizes them once (8-bit
activation schemes), launches once instead of three or two times, and gives the kernel a wider N,
which small-batch GEMMs need to fill the GPU (k_proj and v_proj of Llama-3-8B are 1024 x 4096:
too small for 132 SMs on their own).

For serving and benchmarks only: a fused model keeps ``qkv_proj`` / ``gate_up_proj`` and drops the
separate projections (so the weights are not held twice), so it is not saved or re-quantized.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.model.llama import Transformer
from lowbit.model.qlinear import QuantLinear


def concat_linears(mods: list[nn.Module]) -> nn.Module | None:
    """One module computing ``torch.cat([m(x) for m in mods], -1)``, or None if they cannot be merged
    (mixed types or formats, different smoothing factors, act-order, outlier columns or FMPQ blocks)."""
    if all(type(m) is nn.Linear for m in mods):
        biases = [m.bias for m in mods]
        if any(b is None for b in biases) and not all(b is None for b in biases):
            return None
        w = mods[0].weight
        out = nn.Linear(w.shape[1], sum(m.out_features for m in mods), bias=biases[0] is not None,
                        device=w.device, dtype=w.dtype)
        with torch.no_grad():
            out.weight.copy_(torch.cat([m.weight for m in mods]))
            if out.bias is not None:
                out.bias.copy_(torch.cat(biases))
        return out
    if all(isinstance(m, QuantLinear) for m in mods):
        return QuantLinear.concat(mods)
    return None


def fuse_projections(model: Transformer) -> int:
    """Fuse q/k/v and gate/up of every layer in place (module docstring); returns how many groups were fused.

    Call before ``use_kernels`` (the kernel layout is derived from the fused weights).
    """
    fused = 0
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if attn.qkv_proj is None:
            qkv = concat_linears([attn.q_proj, attn.k_proj, attn.v_proj])
            if qkv is not None:
                attn.qkv_proj, attn.q_proj, attn.k_proj, attn.v_proj = qkv, None, None, None
                fused += 1
        if mlp.gate_up_proj is None:
            gu = concat_linears([mlp.gate_proj, mlp.up_proj])
            if gu is not None:
                mlp.gate_up_proj, mlp.gate_proj, mlp.up_proj = gu, None, None
                fused += 1
    return fused
