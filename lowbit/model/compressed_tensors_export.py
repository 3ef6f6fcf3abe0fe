"""Write a lowbit-quantized model as a compressed-tensors checkpoint (what vLLM loads; issue 19, item 3).

The format mapping and the library calls are ``lowbit.checkpoint.compressed_tensors`` (``export_scheme``,
``compress_layer``, ``write_config``); this module walks the model: every QuantLinear is compressed
from its dequantized weight and its own scales and zero points, every other tensor is written as it
is, and the directory is written atomically (``checkpoint.native.write_checkpoint``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from lowbit.checkpoint import compressed_tensors as ct
from lowbit.checkpoint.native import hf_name, write_checkpoint
from lowbit.errors import LowbitError
from lowbit.model.llama import Transformer
from lowbit.model.qlinear import QuantLinear


def save_compressed_tensors(model: Transformer, out: str | os.PathLike, *, tokenizer: Any = None,
                            overwrite: bool = False) -> Path:
    """Write ``model`` (quantized by ``lowbit.quantize`` or loaded from a lowbit checkpoint, on any
    device, not fused for serving) to the directory ``out`` in compressed-tensors format."""
    scheme = model.quant_scheme
    if scheme is None:
        raise LowbitError("this model is not quantized; quantize it first (lowbit quantize / lowbit.quantize)")
    if scheme.kv_cache.dtype != "fp16":
        raise LowbitError(f"a quantized KV cache ({scheme.kv_cache.dtype}) is not written to compressed-tensors yet; "
                          "export the scheme without its +kv modifier")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    if any(name.endswith("qkv_proj") or name.endswith("gate_up_proj") for name in layers):
        raise LowbitError("this model's projections are fused for serving; export the model as loaded, "
                          "before prepare_for_inference")
    formats = {(m.wfmt, m.afmt) for m in layers.values()}
    if len(formats) != 1:
        raise LowbitError(f"this model mixes {len(formats)} layer formats (per-layer overrides); lowbit writes "
                          "compressed-tensors checkpoints of one format")
    (wfmt, afmt), = formats
    fmt, ct_scheme = ct.export_scheme(wfmt, afmt)
    tensors: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        owner = name.rpartition(".")[0]
        if owner not in layers:
            tensors[hf_name(name)] = t
    for name, m in layers.items():
        if m.smooth is not None or m.outlier_idx is not None:
            raise LowbitError(f"layer {name} divides its input by SmoothQuant factors at run time, which "
                              "compressed-tensors has no place for; quantize without smoothing to export")
        with torch.no_grad():
            own = ct.compress_layer(fmt, ct_scheme, m.dequantized_weight().float(), m.scales, m.zeros)
        prefix = hf_name(name)
        tensors.update({f"{prefix}.{k}": v for k, v in own.items()})
        if m.bias is not None:
            tensors[f"{prefix}.bias"] = m.bias
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    hf = model.config.to_hf()
    hf["torch_dtype"] = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
    config = ct.write_config(hf, fmt, ct_scheme, head_quantized="lm_head" in layers)
    return write_checkpoint(out, config, tensors, tokenizer=tokenizer, overwrite=overwrite,
                            quant_method=ct.QUANT_METHOD)
