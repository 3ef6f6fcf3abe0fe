"""The format registry: every GPU format method, in the order they are asked whether they take a layer.

``method_for(layer)`` is the one place a layer's formats are matched to a kernel. Adding a format is
a module with its ``FormatMethod`` subclass and one line in ``_METHODS``. Layers no method takes
(group-wise W4A4 without FMPQ, 8-bit weights with 4-bit or FMPQ activations, outlier columns beside
8/16-bit activations, ...) run ``QuantLinear.forward``'s reference.
"""

from __future__ import annotations

from lowbit.errors import LowbitError
from lowbit.methods.base import FormatMethod, QuantTensors
from lowbit.methods.int4_dense import W4A8, W4A16, W4A8FP8, W4A8Grouped
from lowbit.methods.sparse24 import Sparse24
from lowbit.methods.w4a4 import W4A4
from lowbit.methods.w4ax import W4Ax
from lowbit.methods.w8a8 import W8A8, W8A8FP8

# Order: the specific before the general. COMET's and QUIK's activation formats first; 2:4 before
# the dense int4 methods (its codes are int4 codes: with 8-bit activations W4A8 takes them).
_METHODS: tuple[FormatMethod, ...] = (W4Ax(), W4A4(), Sparse24(), W4A8(), W4A8Grouped(), W4A8FP8(), W4A16(),
                                      W8A8(), W8A8FP8())
METHODS: dict[str, FormatMethod] = {m.name: m for m in _METHODS}


def method_for(layer: QuantTensors) -> FormatMethod | None:
    """The method whose kernel runs ``layer``, or None (the reference path only)."""
    return next((m for m in _METHODS if m.takes(layer)), None)


def get_method(name: str) -> FormatMethod:
    """A method by its format name (``METHODS``)."""
    try:
        return METHODS[name]
    except KeyError:
        raise LowbitError(f"unknown kernel format {name!r}; formats: {', '.join(METHODS)}") from None
