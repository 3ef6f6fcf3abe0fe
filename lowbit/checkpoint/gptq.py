"""Reading GPTQ checkpoints (``quant_method: "gptq"``: GPTQModel, AutoGPTQ, AutoRound's ``auto_gptq`` export).

The GPTQ layout, per quantized Linear (N outputs, K inputs, b bits, G groups, f = 32 / b fields a word):

| GPTQ                                                  | lowbit (``model/qlinear.py``)                      |
|---|---|
| ``qweight`` (K / f, N) int32, packed along K           | ``qweight`` (N, ceil(K/2)) uint8 (4 bits) or (N, K) int8/uint8 |
| ``qzeros`` (G, N / f) int32, packed along N            | ``zeros`` (N, G) uint8, asymmetric formats only     |
| ``scales`` (G, N) fp16                                 | ``scales`` (N, G) fp16                              |
| ``g_idx`` (K,) int32, the group of each input column    | ``g_idx`` (K,) int32, kept only for act-order      |

Field i of word r (bits b*i .. b*i+b-1) holds input row f*r + i of ``qweight`` and output column
f*c + i of ``qzeros``. Both dequantize to ``(q - zero) * scale`` with unsigned codes. In the v1
format (``checkpoint_format`` "gptq", the default) ``qzeros`` stores ``zero - 1``; in "gptq_v2" the
zero itself. A symmetric checkpoint (``sym: true``) has zero 2^(b-1) everywhere: it becomes lowbit's
symmetric format (signed codes ``q - 2^(b-1)``), and a layer whose zeros differ is an error.

A ``g_idx`` equal to ``k // group_size`` (what GPTQ writes without act-order) is dropped, so that the
layer takes the kernels; any other (``desc_act: true``) is kept: lowbit's act-order layers read it.
Read: 4 and 8 bits, groups lowbit has (32, 64, 128, 256) or per channel (-1). Other bit widths and
checkpoint formats (Marlin, BitBLAS) raise an error that names them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from lowbit.checkpoint.translate import LayerTranslator
from lowbit.errors import LowbitError
from lowbit.formats import ActivationFormat, QuantScheme, WeightFormat
from lowbit.numerics.primitives import pack_int4

QUANT_METHOD = "gptq"
_PARTS = ("qweight", "qzeros", "scales", "g_idx")
_FORMATS = ("gptq", "gptq_v2")


def is_gptq(config: Mapping[str, Any]) -> bool:
    """Whether a ``config.json`` describes a GPTQ checkpoint."""
    return (config.get("quantization_config") or {}).get("quant_method") == QUANT_METHOD


def weight_format(config: Mapping[str, Any]) -> tuple[WeightFormat, bool]:
    """The lowbit WeightFormat of a GPTQ ``quantization_config`` and whether its zeros are stored minus
    one (v1); a LowbitError names what is not read."""
    qc = config["quantization_config"]
    fmt = str(qc.get("checkpoint_format", qc.get("format", "gptq"))).lower()
    if fmt not in _FORMATS:
        raise LowbitError(f"GPTQ checkpoint format {fmt!r} is not read; lowbit reads {' and '.join(_FORMATS)} "
                          "(GPTQModel can convert: save with format='gptq')")
    bits = int(qc.get("bits", 4))
    if bits not in (4, 8):
        raise LowbitError(f"GPTQ with {bits}-bit weights is not read; lowbit reads 4- and 8-bit GPTQ")
    group = int(qc.get("group_size", 128))
    desc_act = bool(qc.get("desc_act", False))
    try:
        wfmt = WeightFormat(bits=bits, symmetric=bool(qc.get("sym", True)),
                            group_size=None if group == -1 else group, method="gptq", act_order=desc_act)
    except LowbitError as exc:
        raise LowbitError(f"GPTQ group size {group}: {exc}") from exc
    return wfmt, fmt == "gptq"


def unpack_fields(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """(R, C) int32 -> (R, C * 32 / bits) int16 unsigned fields, field i of word c at index c * f + i."""
    f = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    fields = (packed[..., None] >> shifts) & ((1 << bits) - 1)  # arithmetic shift: the mask drops the sign
    return fields.reshape(*packed.shape[:-1], packed.shape[-1] * f).to(torch.int16)


class GptqReader(LayerTranslator):
    """GPTQ's tensors -> lowbit's native quantized-layer tensors, as the checkpoint streams."""

    tool = "GPTQ"

    def __init__(self, config: Mapping[str, Any], names: Mapping[str, str]) -> None:
        self.wfmt, self.zeros_minus_one = weight_format(config)
        self.act_order_layers = 0
        quantized = {k.rpartition(".")[0] for k in names if k.endswith(".qzeros")}
        if not quantized:
            raise LowbitError("config.json says quant_method 'gptq' but no tensor is a GPTQ layer's qzeros; "
                              "the checkpoint is in another format than its config says")
        super().__init__(names, quantized, _PARTS)

    @property
    def scheme(self) -> QuantScheme:
        return QuantScheme(name=f"gptq-w{self.wfmt.bits}a16", weights=self.wfmt, activations=ActivationFormat(),
                           lm_head="lm_head" in self.quantized_layers)

    def _native_parts(self, prefix: str, parts: set[str]) -> tuple[str, ...]:
        # g_idx may be dropped (trivial) or kept: the stager treats it as optional either way
        return ("qweight", "scales") + (() if self.wfmt.symmetric else ("zeros",)) + \
            (("g_idx",) if self.wfmt.act_order else ())

    def _layer(self, prefix: str, own: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        where, bits = self._where(prefix), self.wfmt.bits
        qweight, qzeros, scales = self._required(prefix, own, _PARTS[:3], int32=("qweight", "qzeros"))
        f = 32 // bits
        G, N = scales.shape
        K = qweight.shape[0] * f
        if qweight.shape[1] != N or qzeros.shape != (G, N // f):
            raise LowbitError(f"{where}: GPTQ layer '{prefix}' has qweight {tuple(qweight.shape)}, qzeros "
                              f"{tuple(qzeros.shape)} and scales {tuple(scales.shape)}, which do not fit together "
                              f"for {bits}-bit weights")
        codes = unpack_fields(qweight.t(), bits)  # (N, K) unsigned
        zeros = unpack_fields(qzeros, bits).t() + (1 if self.zeros_minus_one else 0)  # (N, G)
        mid = 1 << (bits - 1)
        if self.wfmt.symmetric:
            bad = zeros != mid
            if bool(bad.any()):
                raise LowbitError(f"{where}: GPTQ layer '{prefix}' is marked sym but {int(bad.sum())} of its zero "
                                  f"points differ from {mid}; the checkpoint's quantization_config is wrong")
            signed = (codes - mid).to(torch.int8)
            yield f"{prefix}.qweight", pack_int4(signed) if bits == 4 else signed.contiguous()
        else:
            if int(zeros.max()) >= 1 << bits:
                raise LowbitError(f"{where}: GPTQ layer '{prefix}' has zero points above {(1 << bits) - 1}")
            u = codes.to(torch.uint8)
            yield f"{prefix}.qweight", pack_int4(u) if bits == 4 else u.contiguous()
            yield f"{prefix}.zeros", zeros.to(torch.uint8).contiguous()
        yield f"{prefix}.scales", self._scales(scales.t().contiguous())
        g_idx = own.get("g_idx")
        if g_idx is not None:
            g_idx = g_idx.to(torch.int32)
            group = K if self.wfmt.group_size is None else self.wfmt.group_size
            trivial = torch.arange(K, dtype=torch.int32, device=g_idx.device) // group
            if g_idx.shape != (K,):
                raise LowbitError(f"{where}: '{prefix}.g_idx' has shape {tuple(g_idx.shape)}, expected ({K},)")
            if not torch.equal(g_idx, trivial):
                if not self.wfmt.act_order:
                    raise LowbitError(f"{where}: GPTQ layer '{prefix}' has a permuted g_idx but desc_act is false; "
                                      "the checkpoint's quantization_config is wrong")
                self.act_order_layers += 1
                yield f"{prefix}.g_idx", g_idx.contiguous()
            elif self.wfmt.act_order:
                yield f"{prefix}.g_idx", g_idx.contiguous()
