"""Reading compressed-tensors checkpoints (llm-compressor's format, which vLLM loads): W4A16 first.

A checkpoint whose ``config.json`` has ``quantization_config.quant_method == "compressed-tensors"``
is parsed with the ``compressed-tensors`` library's own ``QuantizationConfig`` and unpacked with its
own ``unpack_from_int32`` (the brief: read the format through its library, never a copy of it).
Each quantized Linear's tensors are then re-expressed as lowbit's native quantized-layer tensors,
which ``model.native_checkpoint.QuantizedLayerStager`` checks and installs as for a lowbit checkpoint:

| compressed-tensors (``pack-quantized``, int4)          | lowbit (``model/qlinear.py``)                       |
|---|---|
| ``weight_packed`` (N, ceil(K/8)) int32, q + 8 per nibble | ``qweight`` (N, ceil(K/2)) uint8 (``pack_int4``)     |
| ``weight_scale`` (N, G) fp16/bf16/fp32                 | ``scales`` (N, G) fp16                              |
| ``weight_zero_point`` (ceil(N/8), G) int32, asymmetric | ``zeros`` (N, G) uint8 = zp + 8, codes stored q + 8 |
| ``weight_shape`` (2,) int                              | the layer's (N, K)                                  |

Both dequantize to ``(q - zp) * scale`` (zp = 0 when symmetric). Scales are stored in fp16 as every
lowbit kernel reads them; a bf16 or fp32 scale that fp16 does not hold exactly is rounded, and the
load says how many were.

Read today: ``pack-quantized`` int4 weights with 16-bit activations (W4A16), per channel or per group
(lowbit's group sizes), symmetric or not, without act-order. Every other compressed-tensors format
or scheme raises an error that names it (act-order, W8A8 int8, FP8 and W4A8 are issue 19's next steps).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from lowbit.errors import LowbitError
from lowbit.formats import ActivationFormat, QuantScheme, WeightFormat
from lowbit.numerics.primitives import pack_int4

QUANT_METHOD = "compressed-tensors"
_PARTS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape")


def is_compressed_tensors(config: Mapping[str, Any]) -> bool:
    """Whether a ``config.json`` describes a compressed-tensors checkpoint."""
    return (config.get("quantization_config") or {}).get("quant_method") == QUANT_METHOD


def _library():  # noqa: ANN202
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
        from compressed_tensors.quantization import QuantizationConfig
    except ImportError as exc:
        raise LowbitError("this checkpoint is in the compressed-tensors format; reading it needs the "
                          "compressed-tensors library (>= 0.20): pip install -U compressed-tensors") from exc
    return QuantizationConfig, unpack_from_int32


def weight_format(config: Mapping[str, Any]) -> WeightFormat:
    """The lowbit WeightFormat of a compressed-tensors ``quantization_config`` (validated by the library)."""
    QuantizationConfig, _ = _library()
    qc = QuantizationConfig.model_validate(dict(config["quantization_config"]))
    fmt = qc.format or "dense"
    if fmt != "pack-quantized":
        raise LowbitError(f"compressed-tensors format {fmt!r} is not read yet; lowbit reads 'pack-quantized' "
                          "int4 weights with 16-bit activations (W4A16)")
    schemes = list(qc.config_groups.values())
    weights = {s.weights.model_dump_json() if s.weights is not None else None for s in schemes}
    if len(weights) != 1 or schemes[0].weights is None:
        raise LowbitError("this compressed-tensors checkpoint mixes weight formats across config groups; "
                          "lowbit reads one weight format per model")
    if any(s.input_activations is not None for s in schemes):
        raise LowbitError("this compressed-tensors checkpoint quantizes activations too; lowbit reads "
                          "weight-only (W4A16) pack-quantized checkpoints so far")
    w = schemes[0].weights
    if w.num_bits != 4 or w.type != "int":
        raise LowbitError(f"compressed-tensors {w.type}{w.num_bits} pack-quantized weights are not read; "
                          "lowbit reads int4")
    strategy = str(getattr(w.strategy, "value", w.strategy))
    if strategy not in ("group", "channel"):
        raise LowbitError(f"compressed-tensors weight strategy {strategy!r} is not read; lowbit reads "
                          "'group' and 'channel'")
    group = w.group_size if strategy == "group" else None
    if w.actorder is not None:  # g_idx translation is written but no producer-made fixture tests it yet
        raise LowbitError("compressed-tensors weights with act-order are not read yet")
    try:
        return WeightFormat(bits=4, symmetric=bool(w.symmetric), group_size=group, method="gptq")
    except LowbitError as exc:
        raise LowbitError(f"compressed-tensors weights of group size {group}: {exc}") from exc


class CompressedTensorsReader:
    """Turns a compressed-tensors checkpoint's tensor stream into lowbit's native quantized-layer
    tensors (module docstring), one layer at a time as its tensors arrive.

    ``names``: every tensor name in the checkpoint (the files' headers) -> its file.
    """

    def __init__(self, config: Mapping[str, Any], names: Mapping[str, str]) -> None:
        self.wfmt = weight_format(config)
        _, self._unpack = _library()
        self._expected: dict[str, set[str]] = {}
        for key in names:
            prefix, _, part = key.rpartition(".")
            if part in _PARTS:
                self._expected.setdefault(prefix, set()).add(part)
        missing = [p for p, parts in self._expected.items() if not {"weight_packed", "weight_scale"} <= parts]
        if missing:
            raise LowbitError(f"{names[next(iter(k for k in names if k.startswith(missing[0])))]}: layer "
                              f"'{missing[0]}' lacks weight_packed or weight_scale; the checkpoint is incomplete")
        self._files = dict(names)
        self._staged: dict[str, dict[str, torch.Tensor]] = {}
        self.rounded_scales = 0

    @property
    def scheme(self) -> QuantScheme:
        head = "lm_head" in self._expected
        return QuantScheme(name="compressed-tensors-w4a16", weights=self.wfmt, activations=ActivationFormat(),
                           lm_head=head)

    def native_names(self) -> dict[str, str]:
        """The checkpoint's tensor names as the translated stream will carry them -> their file."""
        out = {k: f for k, f in self._files.items() if k.rpartition(".")[0] not in self._expected
               or k.rpartition(".")[2] not in _PARTS}
        for prefix, parts in self._expected.items():
            f = self._files[f"{prefix}.weight_packed"]
            out[f"{prefix}.qweight"] = out[f"{prefix}.scales"] = f
            if "weight_zero_point" in parts and not self.wfmt.symmetric:
                out[f"{prefix}.zeros"] = f
        return out

    def translate(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """The stream with each quantized layer's tensors replaced by lowbit's, once all have arrived."""
        for key, t in tensors:
            prefix, _, part = key.rpartition(".")
            if prefix not in self._expected or part not in _PARTS:
                yield key, t
                continue
            own = self._staged.setdefault(prefix, {})
            own[part] = t
            if own.keys() == self._expected[prefix]:
                yield from self._layer(prefix, self._staged.pop(prefix))
        if self.rounded_scales:
            warnings.warn(f"{self.rounded_scales} quantization scales of this compressed-tensors checkpoint are not "
                          "exact in fp16 (lowbit's kernels read fp16 scales) and were rounded", stacklevel=2)

    def _layer(self, prefix: str, own: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        where = self._files[f"{prefix}.weight_packed"]
        packed, scale = own["weight_packed"], own["weight_scale"]
        if packed.dtype != torch.int32 or packed.ndim != 2:
            raise LowbitError(f"{where}: '{prefix}.weight_packed' is {packed.dtype} {tuple(packed.shape)}, "
                              "expected 2-D int32 (pack-quantized)")
        if "weight_shape" in own:
            N, K = (int(v) for v in own["weight_shape"].tolist())
        else:  # older checkpoints: the packed width and the scales give the shape (8 codes per int32)
            N, K = packed.shape[0], packed.shape[1] * 8
        codes = self._unpack(packed, 4, torch.Size((N, K)))  # int8 in [-8, 7]: q, dequantized as (q - zp) * s
        s16 = scale.to(torch.float16)
        self.rounded_scales += int((s16.to(scale.dtype) != scale).sum())
        yield f"{prefix}.scales", s16
        if self.wfmt.symmetric:
            yield f"{prefix}.qweight", pack_int4(codes)
        else:
            if "weight_zero_point" not in own:
                raise LowbitError(f"{where}: '{prefix}' is asymmetric but has no weight_zero_point")
            zp = self._unpack(own["weight_zero_point"], 4, torch.Size(tuple(scale.shape)), packed_dim=0)
            yield f"{prefix}.qweight", pack_int4((codes.to(torch.int16) + 8).to(torch.uint8))
            yield f"{prefix}.zeros", (zp.to(torch.int16) + 8).to(torch.uint8)
        if "weight_g_idx" in own:
            raise LowbitError(f"{where}: '{prefix}.weight_g_idx' (act-order) is not read yet")
