"""FormatMethod: what one weight/activation format does on the GPU, in one object.

A QuantLinear (``lowbit.model.qlinear``) stores its checkpoint buffers and holds the method the
registry (``lowbit.methods.registry``) picks for them; the method says whether its kernel takes the
layer, packs the buffers into its kernel layout once (at load), runs the layer, and says how the
fused norm / gate kernels before it may hand it activations already quantized. Nothing else in the
library switches on format names. (The same seam as vLLM's ``QuantizeMethodBase`` and torchao's
module handlers, in our own words: the layer owns tensors, the method owns behaviour.)

Methods import no Triton at module level: the kernel modules are imported when a layer is packed or
run, so ``import lowbit`` stays free of Triton and of GPU queries.
"""

from __future__ import annotations

import importlib.util
from typing import Any, ClassVar, Protocol

import torch

from lowbit.errors import LowbitError
from lowbit.formats import ActivationFormat, WeightFormat
from lowbit.kernels.activations import ActQuantSpec, QuantizedActivations


class QuantTensors(Protocol):
    """The buffers a method reads from its layer (``lowbit.model.qlinear``'s module docstring has
    their dtypes and shapes): a QuantLinear, seen from below without importing it."""

    in_features: int
    out_features: int
    wfmt: WeightFormat
    afmt: ActivationFormat
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    g_idx: torch.Tensor | None
    bias: torch.Tensor | None
    smooth: torch.Tensor | None
    outlier_idx: torch.Tensor | None
    outlier_weight: torch.Tensor | None
    act_perm: torch.Tensor | None
    fmpq_high: torch.Tensor | None
    # the dtype activations will reach the kernels in (fp16 / bf16), where the caller of
    # ``prepare_kernels`` said; None: unknown (layouts that depend on it are then not chosen)
    kernel_dtype: torch.dtype | None

    @property
    def quantized_in_features(self) -> int: ...


def have_triton() -> bool:
    """Triton-only kernel modules (their format checks too) need it; without it no kernel runs."""
    return importlib.util.find_spec("triton") is not None


class FormatMethod:
    """One GPU format. Subclasses set ``name`` (the one name the CLI, bench paths, dispatch tables and
    docs use) and implement ``takes``, ``pack`` and ``apply``; instances are stateless singletons."""

    name: ClassVar[str]
    # the least compute capability its kernels run on: Triton's int8 / bf16 MMAs need Ampere (sm_80);
    # FP8 tensor cores exist from sm_89 (Ada, Hopper)
    min_capability: ClassVar[tuple[int, int]] = (8, 0)
    # the dispatch table op whose tuned tile the layout is packed with (None: the layout has no choice)
    table_op: ClassVar[str | None] = None
    needs_triton: ClassVar[bool] = False

    def takes(self, layer: QuantTensors) -> bool:
        """Whether this method's kernel runs ``layer``'s formats and buffers."""
        raise NotImplementedError

    def pack(self, layer: QuantTensors, tile_k: int | None = None) -> Any:
        """``layer``'s weights in the kernel layout, on the device its buffers are on (CPU too: tests run
        the kernels in Triton's interpreter). ``tile_k``: the packed tile where the layout has a
        choice (None: its default)."""
        raise NotImplementedError

    def apply(self, layer: QuantTensors, packed: Any, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) fp16/bf16 -> (..., N) in x's dtype, through the kernel (CPU tensors: the op's
        PyTorch reference)."""
        raise NotImplementedError

    def checkpoint_qweight(self, layer: QuantTensors, packed: Any) -> torch.Tensor | None:
        """The checkpoint-layout ``qweight`` rebuilt from the packed layout, or None where this method's
        layout cannot give it back (then the layer keeps both: ``QuantLinear.release_checkpoint_layout``)."""
        return None

    def weight_bytes(self, layer: QuantTensors, packed: Any) -> int:
        """Bytes of weight-side tensors one GEMM reads (what bounds it at decode); every packed layout
        has ``nbytes()``."""
        return packed.nbytes()

    def input_quant(self, layer: QuantTensors, packed: Any) -> ActQuantSpec | None:
        """How the fused kernel producing this layer's input may quantize it instead (None: it may not)."""
        return None

    def apply_quantized(self, layer: QuantTensors, packed: Any, x: QuantizedActivations) -> torch.Tensor:
        """The GEMM on activations quantized as ``input_quant`` asked."""
        raise LowbitError(f"pre-quantized activations reached a {self.name} layer, whose kernel quantizes its own")

    def check_device(self, device: torch.device) -> None:
        """Raise LowbitError when ``device`` cannot run this method's kernels."""
        if device.type != "cuda":
            return
        cap = torch.cuda.get_device_capability(device)
        if cap < self.min_capability:
            need = ".".join(map(str, self.min_capability))
            raise LowbitError(f"{self.name} kernels need compute capability {need}+; "
                              f"{torch.cuda.get_device_name(device)} has {cap[0]}.{cap[1]}. Use a scheme "
                              "without FP8 on this GPU (w4a8, w8a8-int8, w4a16)")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"
