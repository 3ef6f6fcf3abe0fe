"""The streaming half of reading another tool's quantized checkpoint into lowbit's layer tensors.

A reader (``compressed_tensors.CompressedTensorsReader``, ``awq.AwqReader``) names, per quantized
layer, the tensors its format stores (``parts``) and how they become lowbit's native ones
(``_layer``); this base class groups the checkpoint's tensor stream by layer, hands each layer over
once all its parts have arrived (so at most the layers still arriving are held), passes every other
tensor through, and lists the names the translated stream will carry (for
``model.native_checkpoint.QuantizedLayerStager``, which then checks and installs them).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping

import torch

from lowbit.errors import LowbitError


class LayerTranslator:
    """Base of the readers (module docstring). ``names``: every tensor name of the checkpoint -> its
    file; ``quantized``: the prefixes of its quantized layers; ``parts``: their tensors' last name
    parts, the first of which every layer must have; ``tool``: the format's name, for messages."""

    tool = "this"

    def __init__(self, names: Mapping[str, str], quantized: set[str], parts: tuple[str, ...]) -> None:
        self._files = dict(names)
        self._parts = parts
        self._expected: dict[str, set[str]] = {}
        for key in names:
            prefix, _, part = key.rpartition(".")
            if prefix in quantized and part in parts:
                self._expected.setdefault(prefix, set()).add(part)
        missing = [p for p in quantized if parts[0] not in self._expected.get(p, ())]
        if missing:
            raise LowbitError(f"layer '{missing[0]}' of this {self.tool} checkpoint has no {parts[0]}; "
                              "the checkpoint is incomplete")
        self._staged: dict[str, dict[str, torch.Tensor]] = {}
        self.rounded_scales = 0

    @property
    def quantized_layers(self) -> set[str]:
        return set(self._expected)

    def _native_parts(self, prefix: str, parts: set[str]) -> tuple[str, ...]:
        """The lowbit tensor names (last parts) one layer becomes."""
        raise NotImplementedError

    def _layer(self, prefix: str, own: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        raise NotImplementedError

    def native_names(self) -> dict[str, str]:
        """The checkpoint's tensor names as the translated stream will carry them -> their file."""
        out = {k: f for k, f in self._files.items() if k.rpartition(".")[0] not in self._expected
               or k.rpartition(".")[2] not in self._parts}
        for prefix, parts in self._expected.items():
            f = self._files[f"{prefix}.{self._parts[0]}"]
            out.update({f"{prefix}.{p}": f for p in self._native_parts(prefix, parts)})
        return out

    def translate(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """The stream with each quantized layer's tensors replaced by lowbit's, once all have arrived."""
        for key, t in tensors:
            prefix, _, part = key.rpartition(".")
            if prefix not in self._expected or part not in self._parts:
                yield key, t
                continue
            own = self._staged.setdefault(prefix, {})
            own[part] = t
            if own.keys() == self._expected[prefix]:
                yield from self._layer(prefix, self._staged.pop(prefix))
        if self.rounded_scales:
            warnings.warn(f"{self.rounded_scales} quantization scales of this {self.tool} checkpoint are not exact in "
                          "fp16 (lowbit's kernels read fp16 scales) and were rounded", stacklevel=2)

    def _required(self, prefix: str, own: dict[str, torch.Tensor], parts: tuple[str, ...],
                  int32: tuple[str, ...] = ()) -> list[torch.Tensor]:
        """``own``'s tensors named ``parts``, in that order: a LowbitError names the first missing one,
        or one of ``int32`` (packed words) that is not 2-D int32."""
        where = self._where(prefix)
        missing = [p for p in parts if p not in own]
        if missing:
            raise LowbitError(f"{where}: {self.tool} layer '{prefix}' has no {missing[0]}; the checkpoint is incomplete")
        for name in int32:
            t = own[name]
            if t.dtype != torch.int32 or t.ndim != 2:
                raise LowbitError(f"{where}: '{prefix}.{name}' is {t.dtype} {tuple(t.shape)}, expected 2-D int32")
        return [own[p] for p in parts]

    def _scales(self, scale: torch.Tensor) -> torch.Tensor:
        """``scale`` in fp16, counting the values fp16 does not hold exactly."""
        s16 = scale.to(torch.float16)
        self.rounded_scales += int((s16.to(scale.dtype) != scale).sum())
        return s16

    def _where(self, prefix: str) -> str:
        return self._files[f"{prefix}.{self._parts[0]}"]
