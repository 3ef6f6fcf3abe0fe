"""Picking the device and dtype a model runs in.

Defaults: the first CUDA GPU if there is one, else the CPU; bf16 on GPUs that support it (Ampere and
newer), fp16 on older GPUs, fp32 on the CPU (bf16 matmuls on CPUs without AMX are slow). Nothing here
runs at import time, so importing lowbit never touches the GPU.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from lowbit.errors import LowbitError

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def pick_device(requested: str | torch.device | None = None) -> torch.device:
    if requested is None or str(requested) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise LowbitError(f"unknown device {str(requested)!r}; use cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise LowbitError("--device cuda was asked for, but PyTorch sees no CUDA GPU; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise LowbitError(f"there is no {device}; this machine has {torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu":
        raise LowbitError(f"device type {device.type!r} is not supported; use cpu or cuda")
    return device


def pick_dtype(requested: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(requested, torch.dtype):
        if requested not in DTYPES.values():
            raise LowbitError(f"dtype {requested} is not supported; use fp32, fp16 or bf16")
        return requested
    if requested is None or requested == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if requested not in DTYPES:
        raise LowbitError(f"unknown dtype {requested!r}; use one of fp32, fp16, bf16")
    return DTYPES[requested]


@lru_cache(maxsize=8)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device, otherwise: int) -> int:
    """SMs of a CUDA device (queried once per GPU: kernel wrappers ask on every call); ``otherwise``
    for any other device (Triton's interpreter), where kernels only need a plausible launch size."""
    if device.type != "cuda":
        return otherwise
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
