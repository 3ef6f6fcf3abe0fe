"""lowbit's native checkpoint: a Hugging Face style directory holding a quantized model.

Layout of ``OUT/``:
  config.json          the model config (transformers keys) plus ``quantization_config``:
                       {"quant_method": "lowbit", "format_version": 1, "scheme": QuantScheme.to_dict()}
  model.safetensors    every tensor under Hugging Face names: float parameters (norms, embeddings,
                       unquantized layers) and, for each quantized Linear ``model.layers.N.<proj>``,
                       its QuantLinear buffers ``<proj>.qweight``, ``.scales``, ... (see
                       ``lowbit.model.qlinear`` for dtypes, shapes and the int4 nibble order), and
                       static KV scales ``model.layers.N.self_attn.k_scale`` / ``v_scale`` (fp8 caches)
  tokenizer files      as the tokenizer saves them

The directory is written to a temporary sibling and renamed into place, so a crash or an interrupt
leaves either the previous state or the whole checkpoint, never a partial one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lowbit.errors import LowbitError
from lowbit.formats import QuantScheme
from lowbit.model.llama import Transformer
from lowbit.model.qlinear import QuantLinear

QUANT_METHOD = "lowbit"


def save_quantized(model: Transformer, out: str | os.PathLike, *, tokenizer: Any = None, overwrite: bool = False) -> Path:
    """Write ``model`` (quantized by ``lowbit.quantize``) to the directory ``out``."""
    out = Path(out)
    scheme: QuantScheme | None = getattr(model, "quant_scheme", None)
    if scheme is None:
        raise LowbitError("this model is not quantized; run lowbit.quantize(model, scheme, calib) first")
    if out.exists() and not overwrite:
        raise LowbitError(f"{out} already exists; choose another output directory or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the checkpoint gets ordinary permissions
    try:
        config = model.config.to_hf()
        config["torch_dtype"] = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
        config["quantization_config"] = {"quant_method": QUANT_METHOD, "format_version": scheme.version,
                                         "scheme": scheme.to_dict()}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tensors = {_hf_name(k): v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            tensors.pop("lm_head.weight", None)
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt", "quant_method": QUANT_METHOD})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out.exists():  # overwrite: swap, then delete the old one
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _hf_name(name: str) -> str:
    return name if name.startswith("lm_head.") else f"model.{name}"


def scheme_from_config(config: dict[str, Any]) -> QuantScheme | None:
    """The QuantScheme of a checkpoint's config.json, or None for an unquantized checkpoint."""
    qc = config.get("quantization_config")
    if qc is None:
        return None
    if qc.get("quant_method") != QUANT_METHOD:
        raise LowbitError(
            f"checkpoint quantized with {qc.get('quant_method')!r}; lowbit reads its own format and float "
            "checkpoints (GPTQ/AWQ/compressed-tensors import is planned)"
        )
    return QuantScheme.from_dict(qc.get("scheme") or {})


def install_quantized_layers(
    model: Transformer, scheme: QuantScheme, tensors: dict[str, torch.Tensor], dtype: torch.dtype
) -> None:
    """Swap each Linear that has ``<name>.qweight`` in ``tensors`` for a QuantLinear built from them.

    The tensors it consumes are removed from ``tensors``; the rest are float parameters.
    """
    for name, module in list(model.named_modules()):
        prefix = _hf_name(f"{name}.")  # model.layers.N.<proj>. or, for a quantized head, lm_head.
        if not isinstance(module, torch.nn.Linear) or f"{prefix}qweight" not in tensors:
            continue
        own = {k[len(prefix):]: tensors.pop(k) for k in [k for k in tensors if k.startswith(prefix)]}
        wfmt, afmt = scheme.for_layer(name)
        for k in ("bias", "outlier_weight"):  # these follow the model's dtype
            if k in own:
                own[k] = own[k].to(dtype)
        qlin = QuantLinear.from_tensors(own, module.in_features, wfmt, afmt)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, qlin)
    if scheme.kv_cache.dtype != "fp16":
        for i, layer in enumerate(model.layers):
            layer.self_attn.kv_format = scheme.kv_cache
            for which in ("k_scale", "v_scale"):
                t = tensors.pop(f"model.layers.{i}.self_attn.{which}", None)
                if t is not None:
                    setattr(layer.self_attn, which, t)
    model.quant_scheme = scheme
