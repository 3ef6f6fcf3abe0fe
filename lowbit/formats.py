"""QuantScheme: the typed description of a quantization format, and the named presets.

One scheme object travels from the CLI to the algorithms, the checkpoint (``to_dict`` /
``from_dict`` in ``config.json``'s ``quantization_config``) and, later, the kernels.

Conventions (the numerics, bit for bit, are in ``lowbit.numerics.primitives``):

- Weights are quantized along the input dimension K, one scale per output channel and group of
  ``group_size`` consecutive input channels (``None`` = one group spanning K, "per-channel"). When
  K is not a multiple of the group size the last group is shorter, as in GPTQ and
  compressed-tensors: SmolLM2-135M's hidden size 576 is not a multiple of 128.
- Activations are quantized dynamically, one scale per token (row), at run time.
- Hopper has no INT4 tensor cores (measured ``mma.sync`` s4: 52 TOPS vs 1194 for s8), so 4-bit
  activations are a storage and bandwidth format here; kernels widen them to int8 before the MMA.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from lowbit.errors import LowbitError

FORMAT_VERSION = 1
WeightDType = Literal["int", "fp8_e4m3"]
KVDType = Literal["fp16", "fp8_e4m3", "int8", "int4"]
_GROUPS = (32, 64, 128, 256)


@dataclass(frozen=True)
class WeightFormat:
    """How a Linear's weight (N out x K in) is stored and how it is quantized."""

    bits: int = 4
    dtype: WeightDType = "int"
    symmetric: bool = True
    group_size: int | None = 128  # None = per output channel
    method: Literal["rtn", "gptq"] = "gptq"
    act_order: bool = False  # GPTQ: quantize columns by decreasing Hessian diagonal
    static_groups: bool = False  # with act_order: groups fixed in the original column order (no g_idx shuffle)
    clip_search: bool = False  # per-output-channel clipping ratio minimizing the layer's output error
    sparsity: Literal["2:4"] | None = None  # SparseGPT 2:4, pruned jointly with quantization

    def __post_init__(self) -> None:
        if self.dtype == "fp8_e4m3":
            if self.bits != 8 or not self.symmetric:
                raise LowbitError("fp8_e4m3 weights are 8-bit and symmetric")
        elif self.bits not in (4, 8):
            raise LowbitError(f"weight bits must be 4 or 8, got {self.bits}")
        if self.group_size is not None and self.group_size not in _GROUPS:
            raise LowbitError(f"group size must be one of {_GROUPS} or per-channel, got {self.group_size}")
        if self.static_groups and not self.act_order:
            raise LowbitError("static_groups only applies with act_order")
        if self.method == "rtn" and (self.act_order or self.sparsity):
            raise LowbitError("act_order and 2:4 sparsity need method='gptq'")

    def bits_per_weight(self) -> float:
        """Storage cost including fp16 scales (and zero points), for tables."""
        per_group = 16 + (0 if self.symmetric else self.bits)
        bits = self.bits + (per_group / self.group_size if self.group_size else 0.0)
        if self.sparsity == "2:4":
            bits = bits / 2 + 2 / 2  # half the values, plus 2-bit positions for each kept value
        return bits


@dataclass(frozen=True)
class ActivationFormat:
    """How a Linear's input activations are quantized at run time (``bits=None``: kept in fp16/bf16)."""

    bits: int | None = None
    dtype: WeightDType = "int"
    outlier_columns: int = 0  # QUIK: input channels kept in fp16, picked from calibration statistics
    fmpq_block: int | None = None  # COMET FMPQ: channels per block; blocks holding outliers use 8 bits
    fmpq_high_fraction: float = 0.0  # COMET: at most this share of blocks at 8 bits, the others at `bits`

    def __post_init__(self) -> None:
        if self.bits is None:
            if self.outlier_columns or self.fmpq_block:
                raise LowbitError("outlier columns and FMPQ blocks need quantized activations (bits=4 or 8)")
            return
        if self.dtype == "fp8_e4m3" and self.bits != 8:
            raise LowbitError("fp8_e4m3 activations are 8-bit")
        if self.bits not in (4, 8):
            raise LowbitError(f"activation bits must be 4 or 8, got {self.bits}")
        if self.outlier_columns < 0 or not 0.0 <= self.fmpq_high_fraction <= 1.0:
            raise LowbitError("outlier_columns must be >= 0 and fmpq_high_fraction in [0, 1]")
        if self.fmpq_block is not None and self.fmpq_block not in _GROUPS:
            raise LowbitError(f"FMPQ block must be one of {_GROUPS}, got {self.fmpq_block}")


@dataclass(frozen=True)
class KVCacheFormat:
    dtype: KVDType = "fp16"
    group_size: int | None = None  # int4/int8: scale per (token, head, group of head_dim); None = whole head

    def __post_init__(self) -> None:
        if self.group_size is not None and self.dtype not in ("int4", "int8"):
            raise LowbitError("a KV group size applies to int4/int8 caches only")

    @property
    def bits(self) -> int:
        return {"fp16": 16, "fp8_e4m3": 8, "int8": 8, "int4": 4}[self.dtype]


@dataclass(frozen=True)
class LayerOverride:
    """Formats for the Linear layers whose name matches ``pattern`` (fnmatch, e.g. ``*.down_proj``)."""

    pattern: str
    weights: WeightFormat | None = None
    activations: ActivationFormat | None = None


@dataclass(frozen=True)
class QuantScheme:
    """A whole model's format: default weight and activation formats, per-layer overrides, KV cache."""

    name: str
    weights: WeightFormat = field(default_factory=WeightFormat)
    activations: ActivationFormat = field(default_factory=ActivationFormat)
    kv_cache: KVCacheFormat = field(default_factory=KVCacheFormat)
    smooth: bool = False  # SmoothQuant: migrate activation outliers into the weights (alpha searched per layer)
    overrides: tuple[LayerOverride, ...] = ()
    # Quantize the lm_head too, in ``for_layer("lm_head")``'s formats (the scheme's, unless an override
    # names it). Off by default, as in GPTQ/AWQ/QUIK: the head is 1.05 of the 4.5 GB that a Llama-3-8B
    # W4 decode step reads, but its error lands directly on the logits (docs/engine.md has the cost).
    lm_head: bool = False
    version: int = FORMAT_VERSION

    def for_layer(self, name: str) -> tuple[WeightFormat, ActivationFormat]:
        """The formats of the Linear called ``name`` (the last matching override wins)."""
        w, a = self.weights, self.activations
        for o in self.overrides:
            if fnmatch.fnmatch(name, o.pattern):
                w, a = o.weights or w, o.activations or a
        return w, a

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantScheme":
        version = d.get("version")
        if version != FORMAT_VERSION:
            raise LowbitError(
                f"checkpoint quantization format version {version} is not readable by this lowbit "
                f"(it reads version {FORMAT_VERSION}); upgrade lowbit or re-quantize the model"
            )
        try:
            return cls(
                name=d["name"],
                weights=WeightFormat(**d["weights"]),
                activations=ActivationFormat(**d["activations"]),
                kv_cache=KVCacheFormat(**d["kv_cache"]),
                smooth=d["smooth"],
                overrides=tuple(
                    LayerOverride(
                        o["pattern"],
                        WeightFormat(**o["weights"]) if o.get("weights") else None,
                        ActivationFormat(**o["activations"]) if o.get("activations") else None,
                    )
                    for o in d["overrides"]
                ),
                lm_head=bool(d.get("lm_head", False)),  # absent in checkpoints written before the option
                version=version,
            )
        except (KeyError, TypeError) as exc:
            raise LowbitError(f"malformed quantization_config ({exc}); the checkpoint is corrupt") from exc


_INT8_ACT = ActivationFormat(bits=8)
PRESETS: dict[str, QuantScheme] = {
    s.name: s
    for s in (
        # MARLIN's format: GPTQ int4, symmetric, group 128, act-order with static groups.
        QuantScheme("w4a16", WeightFormat(act_order=True, static_groups=True)),
        QuantScheme("w4a16-rtn", WeightFormat(method="rtn")),
        # "Give me BF16 or give me death": FP8 weights per channel, FP8 activations per token.
        QuantScheme(
            "w8a8-fp8",
            WeightFormat(bits=8, dtype="fp8_e4m3", group_size=None, method="rtn"),
            ActivationFormat(bits=8, dtype="fp8_e4m3"),
        ),
        # SmoothQuant W8A8 int8: per-channel weights, per-token activations.
        QuantScheme("w8a8-int8", WeightFormat(bits=8, group_size=None, method="rtn"), _INT8_ACT, smooth=True),
        # OdysseyLLM W4A8: per-channel int4 weights (FastGEMM), int8 tokens; smoothing + GPTQ + clipping search.
        QuantScheme("w4a8", WeightFormat(group_size=None, clip_search=True), _INT8_ACT, smooth=True),
        QuantScheme("w4a8-g128", WeightFormat(group_size=128, clip_search=True), _INT8_ACT, smooth=True),
        # QUIK: int4 weights and activations, 256 fp16 outlier columns, down_proj at int8.
        QuantScheme(
            "w4a4-quik",
            WeightFormat(group_size=None),
            ActivationFormat(bits=4, outlier_columns=256),
            overrides=(LayerOverride("*down_proj", WeightFormat(bits=8, group_size=None), _INT8_ACT),),
        ),
        # The same without outliers: what QUIK's outlier columns buy.
        QuantScheme("w4a4", WeightFormat(group_size=None), ActivationFormat(bits=4)),
        # COMET: W4Ax, activation blocks of 128 channels at 4 or 8 bits (FMPQ), 4-bit KV cache.
        QuantScheme(
            "w4a4kv4-comet",
            WeightFormat(group_size=128),
            ActivationFormat(bits=4, fmpq_block=128, fmpq_high_fraction=0.25),
            KVCacheFormat("int4", group_size=None),
        ),
        # Sparse-Marlin / QUIK: 2:4 pruning jointly with 4-bit GPTQ.
        QuantScheme("w4a16-2:4", WeightFormat(sparsity="2:4")),
    )
}
# The named KV cache formats: ``bench e2e --kv`` takes these names, the ``+kv...`` modifiers map to
# them. int4 is grouped (32 head_dim channels per scale, as KIVI); int4-head has one scale per token
# and head (COMET's 4-bit cache, the w4a4kv4-comet preset's).
KV_FORMATS: dict[str, KVCacheFormat] = {
    "fp16": KVCacheFormat(),
    "int8": KVCacheFormat("int8"),
    "int4": KVCacheFormat("int4", group_size=32),
    "int4-head": KVCacheFormat("int4", group_size=None),
    "fp8": KVCacheFormat("fp8_e4m3"),
}
KV_MODIFIERS: dict[str, KVCacheFormat] = {
    "kv8": KV_FORMATS["int8"],
    "kv4": KV_FORMATS["int4"],
    "kv4-head": KV_FORMATS["int4-head"],
    "kvfp8": KV_FORMATS["fp8"],
}


HEAD_MODIFIER = "head"  # +head: the lm_head quantized too (QuantScheme.lm_head)
MODIFIERS = tuple(KV_MODIFIERS) + (HEAD_MODIFIER,)


def get_scheme(spec: str | QuantScheme) -> QuantScheme:
    """A preset by name, with optional ``+kv8`` / ``+kv4`` / ``+kv4-head`` / ``+kvfp8`` and ``+head`` (e.g. ``w4a8+kv4+head``)."""
    if isinstance(spec, QuantScheme):
        return spec
    base, *mods = spec.strip().split("+")
    known = ", ".join("+" + m for m in MODIFIERS)
    if base not in PRESETS:
        raise LowbitError(f"unknown scheme {base!r}; known: {', '.join(PRESETS)} (optionally {known})")
    scheme = PRESETS[base]
    for mod in mods:
        if mod == HEAD_MODIFIER:
            scheme = replace(scheme, name=f"{scheme.name}+{mod}", lm_head=True)
        elif mod in KV_MODIFIERS:
            scheme = replace(scheme, name=f"{scheme.name}+{mod}", kv_cache=KV_MODIFIERS[mod])
        else:
            raise LowbitError(f"unknown scheme modifier '+{mod}'; known: {known}")
    return scheme
