"""Reading plain FP8 checkpoints (``quant_method: "fp8"``: transformers' ``FineGrainedFP8Config``, the
format of DeepSeek-V3, Qwen3-FP8 and what transformers' FP8 quantizer saves).

Per quantized Linear (N outputs, K inputs, blocks of bn x bk):

| FP8 checkpoint                                              | lowbit (``model/qlinear.py``)                 |
|---|---|
| ``weight`` (N, K) float8_e4m3fn                               | ``qweight`` (N, K) float8_e4m3fn, as stored  |
| ``weight_scale_inv`` (ceil(N/bn), ceil(K/bk)) fp32, the multiplier | ``scales`` (N, G) fp16, each block's row repeated over its bn rows |

Both dequantize to ``code * scale``. ``weight_block_size`` [bn, bk] becomes lowbit's groups of bk
along K (32, 64, 128 or 256); ``null`` (one scale per tensor) becomes per channel, the format the
W8A8-FP8 kernel runs. Block-wise layers run the PyTorch reference path (no kernel takes fp8 weights
with groups yet). Scales are rounded to fp16 (counted and warned where that is not exact).

Activations: ``activation_scheme: "dynamic"`` is read as lowbit's dynamic per-token fp8 quantization.
DeepSeek-style runtimes scale activations per token *and* per group of bk channels, so logits can
differ from theirs by that rounding; ``"static"`` (a calibrated ``activation_scale``) raises an error.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from lowbit.checkpoint.translate import LayerTranslator
from lowbit.errors import LowbitError
from lowbit.formats import ActivationFormat, QuantScheme, WeightFormat

QUANT_METHOD = "fp8"
_PARTS = ("weight_scale_inv", "weight", "activation_scale")


def is_fp8(config: Mapping[str, Any]) -> bool:
    """Whether a ``config.json`` describes a plain FP8 checkpoint."""
    return (config.get("quantization_config") or {}).get("quant_method") == QUANT_METHOD


def block_size(config: Mapping[str, Any]) -> tuple[int, int] | None:
    """``weight_block_size`` as (rows, columns), or None for one scale per tensor; errors name the rest."""
    qc = config["quantization_config"]
    scheme = str(qc.get("activation_scheme", "dynamic")).lower()
    if scheme != "dynamic":
        raise LowbitError(f"FP8 checkpoints with activation_scheme {scheme!r} are not read; lowbit quantizes "
                          "activations per token at run time (activation_scheme 'dynamic')")
    if str(qc.get("scale_fmt") or "float").lower() not in ("float", "fp32", "none"):
        raise LowbitError(f"FP8 scale format {qc['scale_fmt']!r} is not read; lowbit reads fp32 weight_scale_inv")
    block = qc.get("weight_block_size")
    if block is None:
        return None
    if len(block) != 2:
        raise LowbitError(f"FP8 weight_block_size {block} is not read; expected [rows, columns]")
    return int(block[0]), int(block[1])


class Fp8Reader(LayerTranslator):
    """FP8 weights and their block scales -> lowbit's fp8 layer tensors, as the checkpoint streams."""

    tool = "FP8"

    def __init__(self, config: Mapping[str, Any], names: Mapping[str, str]) -> None:
        self.block = block_size(config)
        group = None if self.block is None else self.block[1]
        try:
            self.wfmt = WeightFormat(bits=8, dtype="fp8_e4m3", symmetric=True, group_size=group, method="rtn")
        except LowbitError as exc:
            raise LowbitError(f"FP8 weight_block_size {list(self.block)}: blocks of {group} columns are not read "
                              f"({exc})") from exc
        quantized = {k.rpartition(".")[0] for k in names if k.endswith(".weight_scale_inv")}
        if not quantized:
            raise LowbitError("config.json says quant_method 'fp8' but no tensor is an FP8 layer's weight_scale_inv; "
                              "the checkpoint is in another format than its config says")
        super().__init__(names, quantized, _PARTS)

    @property
    def scheme(self) -> QuantScheme:
        return QuantScheme(name="fp8-w8a8", weights=self.wfmt, activations=ActivationFormat(bits=8, dtype="fp8_e4m3"),
                           lm_head="lm_head" in self.quantized_layers)

    def _native_parts(self, prefix: str, parts: set[str]) -> tuple[str, ...]:
        return ("qweight", "scales")

    def _layer(self, prefix: str, own: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        where = self._where(prefix)
        if "activation_scale" in own:
            raise LowbitError(f"{where}: '{prefix}.activation_scale' (a static activation scale) is not read; "
                              "lowbit quantizes activations per token at run time")
        if "weight" not in own:
            raise LowbitError(f"{where}: FP8 layer '{prefix}' has no weight; the checkpoint is incomplete")
        weight, scale = own["weight"], own["weight_scale_inv"].float()
        if weight.dtype != torch.float8_e4m3fn or weight.ndim != 2:
            raise LowbitError(f"{where}: '{prefix}.weight' is {weight.dtype} {tuple(weight.shape)}, expected 2-D "
                              "float8_e4m3fn")
        N, K = weight.shape
        bn, bk = self.block if self.block is not None else (N, K)
        grid = (-(-N // bn), -(-K // bk))
        if scale.numel() == 1 and self.block is None:
            scale = scale.reshape(1, 1)
        elif tuple(scale.shape) != grid:
            raise LowbitError(f"{where}: '{prefix}.weight_scale_inv' has shape {tuple(scale.shape)}, expected {grid} "
                              f"for a ({N}, {K}) weight in blocks of {bn} x {bk}")
        if K % bk and self.block is not None:
            raise LowbitError(f"{where}: FP8 layer '{prefix}' has K = {K}, not a multiple of its {bk}-column blocks")
        rows = scale.repeat_interleave(bn, dim=0)[:N]  # (N, G): each block row over its bn weight rows
        yield f"{prefix}.qweight", weight.contiguous()
        yield f"{prefix}.scales", self._scales(rows.contiguous())
