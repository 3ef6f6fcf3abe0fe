"""Models with random weights in a real model's shape, for speed measurements.

Decode and prefill speed depend on shapes, formats and kernels, not on weight values, so a
Llama-3-8B-shaped model with random weights times what a real Llama-3-8B would, without a 16 GB
download. Quantized variants are made by round-to-nearest in the scheme's own formats (codes,
scales, group size, per-channel or grouped, 8-bit activations): the same tensors, layouts and
kernels as a calibrated checkpoint; only the numbers differ. Calibration-only choices that do not
change the layout (GPTQ, clipping search, the SmoothQuant alpha) are skipped. The w4a16 preset's
act-order uses static groups, which keeps natural-order groups in the checkpoint, so its layout is
the same as RTN's.
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.formats import QuantScheme, get_scheme
from lowbit.model.config import ModelConfig
from lowbit.model.llama import Transformer

# Meta's Llama-3-8B config.json, the fields our loader and transformers' LlamaConfig read
LLAMA3_8B: dict[str, Any] = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192,
    "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128001,
}
SYNTHETIC = {"llama3-8b-random": LLAMA3_8B}

_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


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


@torch.no_grad()
def quantize_rtn(model: Transformer, scheme: QuantScheme | str, progress: bool = True) -> Transformer:
    """Replace every decoder Linear by a QuantLinear in ``scheme``'s formats, by round-to-nearest, in place.

    For speed measurements (module docstring). Formats the GPU kernels do not take (outlier columns,
    FMPQ blocks, 2:4 sparsity, 4-bit activations) are refused: they would time the reference path.
    """
    from lowbit.model.qlinear import QuantLinear
    from lowbit.quant.gptq import rtn_quantize

    scheme = get_scheme(scheme)
    if getattr(model, "quant_scheme", None) is not None:
        raise LowbitError("the model is already quantized")
    for i, layer in enumerate(tqdm(model.layers, desc=f"RTN {scheme.name}", unit="layer", disable=not progress)):
        for path in _LINEARS:
            parent_name, attr = path.split(".")
            parent = getattr(layer, parent_name)
            lin = getattr(parent, attr)
            wfmt, afmt = scheme.for_layer(f"layers.{i}.{path}")
            if afmt.outlier_columns or afmt.fmpq_block or wfmt.sparsity or afmt.bits == 4:
                raise LowbitError(f"{scheme.name} has no GPU kernel yet ({path}); it would time the reference path")
            qw = rtn_quantize(lin.weight.float(), wfmt)
            # SmoothQuant schemes carry per-channel smoothing factors into the activation quantization
            smooth = torch.ones(lin.in_features, device=lin.weight.device) if scheme.smooth else None
            q = QuantLinear.from_quantized(qw, afmt, in_features=lin.in_features, dtype=lin.weight.dtype,
                                           bias=lin.bias, smooth=smooth)
            setattr(parent, attr, q)
            del lin, qw
    for layer in model.layers:
        layer.self_attn.kv_format = scheme.kv_cache if scheme.kv_cache.dtype != "fp16" else None
    model.quant_scheme = scheme
    return model
