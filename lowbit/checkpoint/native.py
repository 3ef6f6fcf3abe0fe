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
leaves either the previous state or the whole checkpoint, never a partial one. A writer killed
outright (SIGKILL, OOM killer) cannot clean up, so its temporary ``.OUT.partial-HOST-PID-XXXX`` stays;
the next save of ``OUT`` removes those whose writer (same host, that pid) is gone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
import warnings
from collections.abc import Mapping
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
    scheme: QuantScheme | None = model.quant_scheme
    if scheme is None:
        raise LowbitError("this model is not quantized; run lowbit.quantize(model, scheme, calib) first")
    if out.exists() and not overwrite:
        raise LowbitError(f"{out} already exists; choose another output directory or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f"{_partial_prefix(out)}{_host()}-{os.getpid()}-"))
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


def _partial_prefix(out: Path) -> str:
    return f".{out.name}.partial-"


def _host() -> str:
    # in the name so that a checkpoint directory on a shared filesystem is never cleaned up by
    # another machine, to which the writer's pid means nothing
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "localhost"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _remove_stale_partials(out: Path) -> None:
    """Delete the temporary directories of earlier saves of ``out`` on this host whose writer has died.

    A reused pid keeps a dead writer's directory until that process ends too: erring towards keeping
    is safe, deleting a live writer's files is not. Names without a host and pid (older lowbit) are
    left alone for the same reason.
    """
    # mkdtemp's random suffix is [a-z0-9_]; _host() has no "-": the split is unambiguous
    pattern = re.compile(re.escape(_partial_prefix(out)) + r"(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)-[A-Za-z0-9_]+")
    for p in out.parent.iterdir():  # not glob(): the output name may hold glob metacharacters
        m = pattern.fullmatch(p.name)
        if m is None or m["host"] != _host() or not p.is_dir():
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or _pid_alive(pid):
            continue
        try:
            shutil.rmtree(p)
        except OSError as exc:  # not fatal to this save, but the user should know the space is taken
            warnings.warn(f"could not remove {p}, left by an interrupted save ({exc}); delete it by hand",
                          RuntimeWarning, stacklevel=3)


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
    model: Transformer,
    scheme: QuantScheme,
    tensors: dict[str, torch.Tensor],
    dtype: torch.dtype,
    files: Mapping[str, str | os.PathLike] | None = None,
) -> None:
    """Swap each Linear that has ``<name>.qweight`` (or ``.scales``) in ``tensors`` for a QuantLinear
    built from them, each buffer checked against the layer's formats (``QuantLinear.from_tensors``).

    The tensors it consumes are removed from ``tensors``; the rest are float parameters. ``files``
    maps tensor names to the file holding them, for the errors.
    """
    files = files or {}
    for name, module in list(model.named_modules()):
        prefix = _hf_name(f"{name}.")  # model.layers.N.<proj>. or, for a quantized head, lm_head.
        quantized = any(f"{prefix}{k}" in tensors for k in ("qweight", "scales"))
        if not isinstance(module, torch.nn.Linear) or not quantized:
            continue
        own = {k[len(prefix):]: tensors.pop(k) for k in [k for k in tensors if k.startswith(prefix)]}
        # a missing buffer's error names the file that holds the layer's other tensors
        home = next((files[f"{prefix}{k}"] for k in own if f"{prefix}{k}" in files), "checkpoint")

        def describe(k: str, prefix: str = prefix, home: str | os.PathLike = home) -> str:
            return f"{files.get(prefix + k, home)}: tensor '{prefix}{k}'"

        wfmt, afmt = scheme.for_layer(name)
        qlin = QuantLinear.from_tensors(own, module.in_features, wfmt, afmt, out_features=module.out_features,
                                        describe=describe)
        for k in ("bias", "outlier_weight"):  # these follow the model's dtype (checked as floats first)
            if getattr(qlin, k) is not None:
                setattr(qlin, k, getattr(qlin, k).to(dtype))
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
