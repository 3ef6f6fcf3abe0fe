"""Typed model configuration for the Llama family (Llama 2/3, Mistral, Qwen2, SmolLM).

Built from a Hugging Face ``config.json`` (transformers 4.x keys ``rope_theta``/``rope_scaling`` and
5.x key ``rope_parameters`` both accepted) or from GGUF metadata (see ``lowbit.model.gguf``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from lowbit.errors import LowbitError

RopeKind = Literal["default", "linear", "llama3"]

# model_type -> (default rope_theta, default max_position_embeddings, q/k/v bias), from each
# architecture's transformers config class; used only where config.json leaves the field out.
_ARCH_DEFAULTS: dict[str, tuple[float, int, bool]] = {
    "llama": (10000.0, 2048, False),
    "mistral": (10000.0, 131072, False),
    "qwen2": (10000.0, 32768, True),
}
SUPPORTED_ARCHITECTURES = tuple(_ARCH_DEFAULTS)
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding: ``theta`` base and the frequency scaling, if any.

    ``llama3`` is Llama 3.1's piecewise scaling of the inverse frequencies; ``linear`` divides them by
    ``factor`` (position interpolation).
    """

    theta: float = 10000.0
    kind: RopeKind = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """Shape and options of a Llama-family decoder."""

    architecture: str  # one of SUPPORTED_ARCHITECTURES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    rope: RopeConfig = field(default_factory=RopeConfig)
    qkv_bias: bool = False  # Qwen2 has a bias on q, k and v (not on o)
    o_bias: bool = False  # Llama's `attention_bias` puts one on o as well
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # Mistral v0.1: each query sees at most this many keys
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise LowbitError(
                f"unsupported architecture {self.architecture!r}; lowbit supports "
                f"{', '.join(SUPPORTED_ARCHITECTURES)} (Llama 2/3, Mistral, Qwen2, SmolLM)"
            )
        if self.num_heads % self.num_kv_heads:
            raise LowbitError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}"
            )

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "ModelConfig":
        """Build from the dict of a Hugging Face ``config.json``."""
        model_type = cfg.get("model_type")
        if model_type is None:
            raise LowbitError("config.json has no 'model_type'; is this a Hugging Face causal-LM checkpoint?")
        if model_type not in _ARCH_DEFAULTS:
            raise LowbitError(
                f"unsupported architecture {model_type!r} in config.json; lowbit supports "
                f"{', '.join(SUPPORTED_ARCHITECTURES)} (Llama 2/3, Mistral, Qwen2, SmolLM)"
            )
        missing = [k for k in _REQUIRED if k not in cfg]
        if missing:
            raise LowbitError(f"config.json lacks required field(s) {', '.join(missing)}; the file is incomplete")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise LowbitError(f"hidden_act={act!r} is not supported (Llama-family models use 'silu')")
        theta_default, max_pos_default, qkv_bias_default = _ARCH_DEFAULTS[model_type]
        heads = int(cfg["num_attention_heads"])
        attention_bias = bool(cfg.get("attention_bias", False))
        qkv_bias = qkv_bias_default or attention_bias
        sliding = cfg.get("sliding_window")
        if model_type == "qwen2" and not cfg.get("use_sliding_window", False):
            sliding = None  # Qwen2 stores a window size but leaves it off unless use_sliding_window
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            architecture=model_type,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", max_pos_default)),
            rope=_rope_from_hf(cfg, theta_default),
            qkv_bias=qkv_bias,
            o_bias=attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            sliding_window=int(sliding) if sliding else None,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


    def to_hf(self) -> dict[str, Any]:
        """A Hugging Face ``config.json`` dict (transformers 4.x rope keys, which 5.x also reads)."""
        d: dict[str, Any] = {
            "model_type": self.architecture,
            "architectures": [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                               "qwen2": "Qwen2ForCausalLM"}[self.architecture]],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope.theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
        }
        if self.rope.kind == "linear":
            d["rope_scaling"] = {"rope_type": "linear", "factor": self.rope.factor}
        elif self.rope.kind == "llama3":
            r = self.rope
            d["rope_scaling"] = {"rope_type": "llama3", "factor": r.factor, "low_freq_factor": r.low_freq_factor,
                                 "high_freq_factor": r.high_freq_factor,
                                 "original_max_position_embeddings": r.original_max_position_embeddings}
        if self.architecture != "qwen2":
            d["attention_bias"] = self.o_bias
        if self.mlp_bias:
            d["mlp_bias"] = True
        d["sliding_window"] = self.sliding_window
        if self.architecture == "qwen2":
            d["use_sliding_window"] = self.sliding_window is not None
        return d


def _rope_from_hf(cfg: dict[str, Any], theta_default: float) -> RopeConfig:
    # transformers 5 folds theta and scaling into `rope_parameters`; 4.x has `rope_theta` + `rope_scaling`.
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    params = {**scaling, **params}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", theta_default)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return RopeConfig(theta=theta)
    if kind == "linear":
        return RopeConfig(theta=theta, kind="linear", factor=float(params["factor"]))
    if kind == "llama3":
        return RopeConfig(
            theta=theta,
            kind="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    raise LowbitError(f"rope scaling {kind!r} is not supported yet (supported: default, linear, llama3)")
