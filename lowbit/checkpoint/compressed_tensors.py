"""compressed-tensors checkpoints (llm-compressor's format, which vLLM loads), read and written.

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

The 8-bit formats keep their codes as they are: ``int-quantized`` (W8A8 int8) and ``float-quantized``
(FP8 W8A8) store ``weight`` (N, K) int8 / float8_e4m3fn and ``weight_scale`` per channel (N, 1) or
per tensor (one value, repeated per channel here), which become ``qweight`` and ``scales`` (N, 1).

Read today:
- ``pack-quantized`` int4 weights with 16-bit activations (W4A16) or 8-bit int / fp8 activations
  per token, dynamic (W4A8: lowbit's w4a8 / w4a8-g128 / w4a8-fp8 layers), per channel or per group
  (lowbit's group sizes), symmetric or not, without act-order;
- ``int-quantized`` int8 weights per channel with int8 activations per token, dynamic (W8A8 int8);
- ``float-quantized`` fp8 e4m3 weights per channel or tensor with fp8 activations per token, dynamic.
Every other compressed-tensors format or scheme raises an error that names it (act-order, static
activation scales and weight-only FP8 are issue 19's next steps).

Writing (``export_scheme`` and ``compress_layer``; ``model/compressed_tensors_export.py`` walks the
model) is the same mapping backwards, through the library's own compressors
(``PackedQuantizationCompressor`` / ``NaiveQuantizationCompressor``), for the lowbit formats that have
a compressed-tensors form: W4A16 and W4A8 (int4 per group or channel, without a g_idx), W8A8 int8 and FP8
(per channel, dynamic per-token activations). The library re-quantizes each layer's dequantized
weight with lowbit's own scales and zero points, which gives back lowbit's codes exactly: a code
times an fp16 scale is exact in fp32, and so is its quotient by the same scale.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from lowbit.errors import LowbitError
from lowbit.formats import ActivationFormat, QuantScheme, WeightFormat
from lowbit.checkpoint.translate import LayerTranslator
from lowbit.numerics.primitives import pack_int4

QUANT_METHOD = "compressed-tensors"
_READ = ("pack-quantized", "int-quantized", "float-quantized")
# a quantized layer's tensors, per format (a layer is quantized when it has a weight_scale)
_PARTS = {
    "pack-quantized": ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape"),
    "int-quantized": ("weight", "weight_scale", "weight_zero_point", "input_scale", "input_zero_point"),
    "float-quantized": ("weight", "weight_scale", "weight_zero_point", "input_scale", "input_zero_point"),
}


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


def _value(x: Any) -> Any:
    return getattr(x, "value", x)


def _token_activations(a: Any, fmt: str) -> ActivationFormat:
    """lowbit's ActivationFormat for compressed-tensors activation args: 8-bit int or fp8, symmetric,
    per token, dynamic (what lowbit computes at run time); a LowbitError for anything else."""
    kind = {"int": "int", "float": "fp8_e4m3"}.get(_value(a.type))
    if a.num_bits != 8 or kind is None or _value(a.strategy) != "token" or not a.dynamic or not a.symmetric:
        raise LowbitError(f"compressed-tensors activations {_value(a.type)}{a.num_bits} {_value(a.strategy)} "
                          f"(dynamic={a.dynamic}) in {fmt} are not read; lowbit quantizes activations to 8 bits "
                          "per token at run time")
    return ActivationFormat(bits=8, dtype=kind)


def formats(config: Mapping[str, Any]) -> tuple[str, WeightFormat, ActivationFormat]:
    """(compression format, lowbit WeightFormat, ActivationFormat) of a compressed-tensors
    ``quantization_config``, parsed and validated by the library; a LowbitError names what is not read."""
    QuantizationConfig, _ = _library()
    qc = QuantizationConfig.model_validate(dict(config["quantization_config"]))
    fmt = _value(qc.format) or "dense"
    if fmt not in _READ:
        raise LowbitError(f"compressed-tensors format {fmt!r} is not read yet; lowbit reads "
                          f"{', '.join(repr(f) for f in _READ)} (see lowbit/checkpoint/compressed_tensors.py)")
    schemes = list(qc.config_groups.values())
    described = {(s.weights.model_dump_json() if s.weights is not None else None,
                  s.input_activations.model_dump_json() if s.input_activations is not None else None) for s in schemes}
    if len(described) != 1 or schemes[0].weights is None:
        raise LowbitError("this compressed-tensors checkpoint mixes formats across config groups; "
                          "lowbit reads one weight and activation format per model")
    w, a = schemes[0].weights, schemes[0].input_activations
    strategy = _value(w.strategy)
    if w.actorder is not None:  # g_idx translation: no producer-made fixture tests it yet
        raise LowbitError("compressed-tensors weights with act-order are not read yet")
    if fmt == "pack-quantized":
        afmt = ActivationFormat() if a is None else _token_activations(a, fmt)
        if w.num_bits != 4 or _value(w.type) != "int":
            raise LowbitError(f"compressed-tensors {_value(w.type)}{w.num_bits} pack-quantized weights are not read; "
                              "lowbit reads int4")
        if strategy not in ("group", "channel"):
            raise LowbitError(f"compressed-tensors weight strategy {strategy!r} is not read; lowbit reads "
                              "'group' and 'channel'")
        group = w.group_size if strategy == "group" else None
        try:
            return fmt, WeightFormat(bits=4, symmetric=bool(w.symmetric), group_size=group, method="gptq"), afmt
        except LowbitError as exc:
            raise LowbitError(f"compressed-tensors weights of group size {group}: {exc}") from exc
    # int-quantized / float-quantized: 8-bit weights per channel (or tensor), 8-bit dynamic tokens
    kind = "int" if fmt == "int-quantized" else "fp8_e4m3"
    want = "int" if kind == "int" else "float"
    if w.num_bits != 8 or _value(w.type) != want or not w.symmetric or strategy not in ("channel", "tensor"):
        raise LowbitError(f"compressed-tensors {fmt} weights must be symmetric 8-bit {want} per channel or tensor "
                          f"to be read; got {_value(w.type)}{w.num_bits} {strategy}, symmetric={w.symmetric}")
    if a is None:
        raise LowbitError(f"compressed-tensors {fmt} weights with 16-bit activations are not read yet")
    if _value(a.type) != want:
        raise LowbitError(f"compressed-tensors {fmt} weights with {_value(a.type)} activations are not read")
    _token_activations(a, fmt)
    return fmt, WeightFormat(bits=8, dtype=kind, group_size=None, method="rtn"), ActivationFormat(bits=8, dtype=kind)


class CompressedTensorsReader(LayerTranslator):
    """Turns a compressed-tensors checkpoint's tensor stream into lowbit's native quantized-layer
    tensors (module docstring), one layer at a time as its tensors arrive (``translate.LayerTranslator``).

    ``names``: every tensor name in the checkpoint (the files' headers) -> its file.
    """

    tool = "compressed-tensors"

    def __init__(self, config: Mapping[str, Any], names: Mapping[str, str]) -> None:
        self.format, self.wfmt, self.afmt = formats(config)
        _, self._unpack = _library()
        # a layer is quantized when it has a weight_scale
        super().__init__(names, {k.rpartition(".")[0] for k in names if k.endswith(".weight_scale")},
                         _PARTS[self.format])

    @property
    def scheme(self) -> QuantScheme:
        name = {"pack-quantized": "w4a16" if self.afmt.bits is None else "w4a8", "int-quantized": "w8a8-int8",
                "float-quantized": "w8a8-fp8"}[self.format]
        return QuantScheme(name=f"compressed-tensors-{name}", weights=self.wfmt, activations=self.afmt,
                           lm_head="lm_head" in self.quantized_layers)

    def _native_parts(self, prefix: str, parts: set[str]) -> tuple[str, ...]:
        return ("qweight", "scales") + (("zeros",) if "weight_zero_point" in parts and not self.wfmt.symmetric else ())

    def _layer(self, prefix: str, own: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        if self.format != "pack-quantized":
            yield from self._layer_8bit(prefix, own)
            return
        where = self._where(prefix)
        packed, scale = own["weight_packed"], own["weight_scale"]
        if packed.dtype != torch.int32 or packed.ndim != 2:
            raise LowbitError(f"{where}: '{prefix}.weight_packed' is {packed.dtype} {tuple(packed.shape)}, "
                              "expected 2-D int32 (pack-quantized)")
        if "weight_shape" in own:
            N, K = (int(v) for v in own["weight_shape"].tolist())
        else:  # older checkpoints: the packed width and the scales give the shape (8 codes per int32)
            N, K = packed.shape[0], packed.shape[1] * 8
        codes = self._unpack(packed, 4, torch.Size((N, K)))  # int8 in [-8, 7]: q, dequantized as (q - zp) * s
        yield f"{prefix}.scales", self._scales(scale)
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

    def _layer_8bit(self, prefix: str, own: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        where = self._where(prefix)
        for part in ("input_scale", "input_zero_point", "weight_zero_point"):
            if part in own:
                raise LowbitError(f"{where}: '{prefix}.{part}' is not read (lowbit's 8-bit formats are symmetric, "
                                  "with activation scales computed per token at run time)")
        weight, scale = own["weight"], own["weight_scale"]
        dtype = torch.int8 if self.format == "int-quantized" else torch.float8_e4m3fn
        if weight.dtype != dtype or weight.ndim != 2:
            raise LowbitError(f"{where}: '{prefix}.weight' is {weight.dtype} {tuple(weight.shape)}, expected 2-D "
                              f"{str(dtype).removeprefix('torch.')} for {self.format}")
        N = weight.shape[0]
        if scale.numel() == 1:  # per tensor: the same scale for every channel
            scale = scale.reshape(1, 1).expand(N, 1)
        elif scale.numel() == N:
            scale = scale.reshape(N, 1)
        else:
            raise LowbitError(f"{where}: '{prefix}.weight_scale' has shape {tuple(scale.shape)}, expected one per "
                              f"channel ({N}) or one per tensor")
        yield f"{prefix}.qweight", weight
        yield f"{prefix}.scales", self._scales(scale.contiguous())


def _export_library():  # noqa: ANN202
    _library()
    from compressed_tensors.compressors.naive_quantized.base import NaiveQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    return QuantizationArgs, QuantizationScheme, QuantizationConfig, PackedQuantizationCompressor, \
        NaiveQuantizationCompressor


def export_scheme(wfmt: WeightFormat, afmt: ActivationFormat) -> tuple[str, Any]:
    """(compression format, the library's QuantizationScheme) for one lowbit layer format; a
    LowbitError names formats that have no compressed-tensors form lowbit writes."""
    QuantizationArgs, QuantizationScheme, *_ = _export_library()
    plain = not (afmt.outlier_columns or afmt.fmpq_block or wfmt.sparsity)
    if plain and wfmt.bits == 4 and wfmt.dtype == "int" and afmt.bits in (None, 8):
        if wfmt.act_order and not wfmt.static_groups:
            raise LowbitError("int4 weights with act-order (a g_idx) are not written to compressed-tensors yet; "
                              "quantize with static groups (the w4a16 preset) to export")
        group = wfmt.group_size
        args = QuantizationArgs(num_bits=4, type="int", symmetric=wfmt.symmetric,
                                strategy="group" if group else "channel", group_size=group)
        acts = None if afmt.bits is None else QuantizationArgs(
            num_bits=8, type="int" if afmt.dtype == "int" else "float", symmetric=True, strategy="token", dynamic=True)
        return "pack-quantized", QuantizationScheme(targets=["Linear"], weights=args, input_activations=acts)
    if plain and wfmt.bits == 8 and afmt.bits == 8 and wfmt.group_size is None and wfmt.dtype == afmt.dtype:
        kind = "int" if wfmt.dtype == "int" else "float"
        weights = QuantizationArgs(num_bits=8, type=kind, symmetric=True, strategy="channel")
        acts = QuantizationArgs(num_bits=8, type=kind, symmetric=True, strategy="token", dynamic=True)
        return ("int-quantized" if kind == "int" else "float-quantized"), \
            QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts)
    a = "16-bit" if afmt.bits is None else f"{afmt.bits}-bit {afmt.dtype}"
    raise LowbitError(f"lowbit's {wfmt.bits}-bit {wfmt.dtype} weights (group {wfmt.group_size}) with {a} activations"
                      f"{'' if plain else ', outlier columns, FMPQ blocks or 2:4 sparsity'} have no compressed-tensors "
                      "form lowbit writes; it writes W4A16 and W4A8 (int4 per group or channel), W8A8 int8 "
                      "and FP8 W8A8")


def compress_layer(fmt: str, scheme: Any, weight: torch.Tensor, scales: torch.Tensor,
                   zeros: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """One layer's compressed-tensors tensors (without the module prefix), from lowbit's: ``weight``
    (N, K) fp32 dequantized, ``scales`` (N, G) fp16, ``zeros`` (N, G) uint8 or None (symmetric)."""
    *_, Packed, Naive = _export_library()
    state = {"weight": weight, "weight_scale": scales}
    if fmt == "pack-quantized":
        if zeros is not None:  # lowbit stores unsigned codes and zero points; compressed-tensors signed
            state["weight_zero_point"] = (zeros.to(torch.int16) - 8).to(torch.int8)
        return dict(Packed.compress(state, scheme))
    return dict(Naive.compress(state, scheme))


def write_config(hf_config: dict[str, Any], fmt: str, scheme: Any, head_quantized: bool) -> dict[str, Any]:
    """config.json for a compressed-tensors checkpoint: the model's own keys plus the
    ``quantization_config`` vLLM reads (``quant_method``, ``format``, ``config_groups``, ``ignore``)."""
    *_, QuantizationConfig, _, _ = _export_library()
    qc = QuantizationConfig(config_groups={"group_0": scheme}, format=fmt, quantization_status="compressed",
                            ignore=[] if head_quantized else ["lm_head"])
    return {**hf_config, "quantization_config": qc.model_dump(mode="json", exclude_none=True)}
