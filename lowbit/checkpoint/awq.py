"""Reading AutoAWQ checkpoints (``quant_method: "awq"``, the GEMM packing vLLM and transformers load).

AutoAWQ's GEMM layout, per quantized Linear (N outputs, K inputs, G = K / group_size):

| AWQ                                             | lowbit (``model/qlinear.py``)                  |
|---|---|
| ``qweight`` (K, N/8) int32, packed along N       | ``qweight`` (N, ceil(K/2)) uint8 (``pack_int4``) |
| ``qzeros`` (G, N/8) int32, packed the same way   | ``zeros`` (N, G) uint8                          |
| ``scales`` (G, N) fp16                           | ``scales`` (N, G) fp16                          |

Both dequantize to ``(q - zero) * scale`` with unsigned 4-bit codes and zero points. In each int32
the 4-bit field i (bits 4i..4i+3) holds output column 8c + ``_ORDER[i]`` of its block of eight: AWQ
interleaves even and odd columns so that its kernel converts two at a time with one shift. The
codes are unpacked with PyTorch bit operations here; nothing of AutoAWQ is needed to read.

Read: ``version: "gemm"``, 4 bits, ``zero_point: true``, lowbit's group sizes. Other versions (GEMV,
Marlin, ExLlama) and symmetric AWQ raise an error that names them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from lowbit.checkpoint.translate import LayerTranslator
from lowbit.errors import LowbitError
from lowbit.formats import ActivationFormat, QuantScheme, WeightFormat
from lowbit.numerics.primitives import pack_int4

QUANT_METHOD = "awq"
_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_PARTS = ("qweight", "qzeros", "scales")


def is_awq(config: Mapping[str, Any]) -> bool:
    """Whether a ``config.json`` describes an AutoAWQ checkpoint."""
    return (config.get("quantization_config") or {}).get("quant_method") == QUANT_METHOD


def weight_format(config: Mapping[str, Any]) -> WeightFormat:
    """The lowbit WeightFormat of an AWQ ``quantization_config``; a LowbitError names what is not read."""
    qc = config["quantization_config"]
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm":
        raise LowbitError(f"AWQ version {version!r} is not read; lowbit reads the GEMM packing (version 'gemm')")
    bits = int(qc.get("bits", qc.get("w_bit", 4)))
    if bits != 4:
        raise LowbitError(f"AWQ with {bits}-bit weights is not read; lowbit reads 4-bit AWQ")
    if not qc.get("zero_point", True):
        raise LowbitError("AWQ without zero points is not read; lowbit reads AWQ with zero points (the default)")
    group = int(qc.get("group_size", qc.get("q_group_size", 128)))
    try:
        return WeightFormat(bits=4, symmetric=False, group_size=None if group == -1 else group, method="rtn")
    except LowbitError as exc:
        raise LowbitError(f"AWQ group size {group}: {exc}") from exc


def unpack_columns(packed: torch.Tensor) -> torch.Tensor:
    """(R, C/8) int32 in AWQ's column order -> (R, C) uint8 codes in natural column order."""
    R, C8 = packed.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    fields = (packed[:, :, None] >> shifts) & 0xF  # (R, C/8, 8): field i of each word
    out = torch.empty_like(fields)
    out[:, :, list(_ORDER)] = fields  # field i is column 8c + _ORDER[i]
    return out.reshape(R, C8 * 8).to(torch.uint8)


class AwqReader(LayerTranslator):
    """AutoAWQ's GEMM tensors -> lowbit's native quantized-layer tensors, as the checkpoint streams."""

    tool = "AWQ"

    def __init__(self, config: Mapping[str, Any], names: Mapping[str, str]) -> None:
        self.wfmt = weight_format(config)
        super().__init__(names, {k.rpartition(".")[0] for k in names if k.endswith(".qzeros")}, _PARTS)

    @property
    def scheme(self) -> QuantScheme:
        return QuantScheme(name="awq-w4a16", weights=self.wfmt, activations=ActivationFormat(),
                           lm_head="lm_head" in self.quantized_layers)

    def _native_parts(self, prefix: str, parts: set[str]) -> tuple[str, ...]:
        return ("qweight", "scales", "zeros")

    def _layer(self, prefix: str, own: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        where = self._where(prefix)
        qweight, qzeros, scales = self._required(prefix, own, _PARTS, int32=("qweight", "qzeros"))
        N = scales.shape[1]
        if qweight.shape[1] * 8 != N or qzeros.shape != (scales.shape[0], N // 8):
            raise LowbitError(f"{where}: AWQ layer '{prefix}' has qweight {tuple(qweight.shape)}, qzeros "
                              f"{tuple(qzeros.shape)} and scales {tuple(scales.shape)}, which do not fit together")
        codes = unpack_columns(qweight).t().contiguous()  # (N, K)
        yield f"{prefix}.qweight", pack_int4(codes)
        yield f"{prefix}.zeros", unpack_columns(qzeros).t().contiguous()  # (N, G)
        yield f"{prefix}.scales", self._scales(scales.t().contiguous())
