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
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lowbit.errors import LowbitError
from lowbit.formats import QuantScheme

QUANT_METHOD = "lowbit"


def write_checkpoint(out: str | os.PathLike, config: dict[str, Any], tensors: dict[str, torch.Tensor], *,
                     tokenizer: Any = None, overwrite: bool = False, quant_method: str = QUANT_METHOD) -> Path:
    """Write ``config`` (config.json), ``tensors`` (model.safetensors, under the names given) and the
    tokenizer's files to the directory ``out``, atomically (module docstring). Tensors are made
    contiguous CPU copies here. ``lowbit.model.native_checkpoint.save_quantized`` builds both from a model
    (``model.compressed_tensors_export`` too, with ``quant_method`` "compressed-tensors" in the metadata)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise LowbitError(f"{out} already exists; choose another output directory or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f"{_partial_prefix(out)}{_host()}-{os.getpid()}-"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the checkpoint gets ordinary permissions
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / "model.safetensors",
                  metadata={"format": "pt", "quant_method": quant_method})
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


def quantization_config(scheme: QuantScheme) -> dict[str, Any]:
    """config.json's ``quantization_config`` for ``scheme`` (read back by ``scheme_from_config``)."""
    return {"quant_method": QUANT_METHOD, "format_version": scheme.version, "scheme": scheme.to_dict()}


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


def hf_name(name: str) -> str:
    """The checkpoint (Hugging Face) name of a lowbit module's tensor: ``layers.0.x`` -> ``model.layers.0.x``."""
    return name if name.startswith("lm_head.") else f"model.{name}"


def scheme_from_config(config: dict[str, Any]) -> QuantScheme | None:
    """The QuantScheme of a checkpoint's config.json, or None for an unquantized checkpoint."""
    qc = config.get("quantization_config")
    if qc is None:
        return None
    if qc.get("quant_method") != QUANT_METHOD:
        raise LowbitError(
            f"checkpoint quantized with {qc.get('quant_method')!r}; lowbit reads its own format, "
            "compressed-tensors (W4A16, W4A8, W8A8 int8, FP8), GPTQ, AutoAWQ (GEMM), plain FP8 and float "
            "checkpoints"
        )
    return QuantScheme.from_dict(qc.get("scheme") or {})
