"""A compact Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM) that we own.

Module and parameter names follow Hugging Face's (``embed_tokens``, ``layers.N.self_attn.q_proj``, ...,
without the ``model.`` prefix), so checkpoints map one to one. Every projection is a plain
``nn.Linear`` attribute: quantization swaps it for a quantized module with the same call signature.

Numerics follow transformers' implementation (RMSNorm in fp32, rotary tables in fp32 cast to the
activation dtype, SDPA attention), which the parity tests check.

Shapes: B batch, T tokens in this call, S key slots so far, H hidden, nh/nkv heads, hd head_dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.model.kv_cache import KVCache, SlotKVCache, sdpa
from lowbit.formats import KVCacheFormat, QuantScheme
from lowbit.kernels.activations import ActQuantSpec, QuantizedActivations
from lowbit.model.config import ModelConfig, RopeConfig
from lowbit.model.qlinear import input_quant
from lowbit.requirements import require_torch


def _fused_kernels(x: torch.Tensor) -> bool:
    """Whether the fused Triton kernels take ``x``: on CUDA, except float64 (calibration of an fp32
    model computes in float64 for device-independent results, lowbit.quant.calibrate; it runs the
    PyTorch path, the same arithmetic on every device)."""
    return x.is_cuda and x.dtype != torch.float64


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.promote_types(dtype, torch.float32))  # fp32 at least; float64 stays float64
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor | None,
                    quant: ActQuantSpec | None = None) -> tuple[torch.Tensor | QuantizedActivations, torch.Tensor]:
        """(norm(x + residual), x + residual): the residual stream's addition fused with the next norm.

        On CUDA one Triton kernel (``lowbit.kernels.fused``), which with ``quant`` (the next layer's
        ``input_quant``) also quantizes the output for that layer's 8-bit GEMM; elsewhere the same
        arithmetic in PyTorch, unquantized (the next layer then quantizes it itself).
        """
        if _fused_kernels(x):
            from lowbit.kernels.fused import add_rmsnorm

            return add_rmsnorm(x, residual, self.weight, self.eps, quant)
        h = x if residual is None else x + residual
        return self(h), h


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse rotary frequencies, fp32, shape (head_dim // 2,)."""
    inv = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.kind == "linear":
        return inv / rope.factor
    if rope.kind == "llama3":
        # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth blend between.
        old = rope.original_max_position_embeddings
        low_wavelen, high_wavelen = old / rope.low_freq_factor, old / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, blended, scaled)
    return inv


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hd, nh, nkv, h = config.head_dim, config.num_heads, config.num_kv_heads, config.hidden_size
        self.num_heads, self.num_kv_heads, self.head_dim = nh, nkv, hd
        self.q_proj = nn.Linear(h, nh * hd, bias=config.qkv_bias)
        self.k_proj = nn.Linear(h, nkv * hd, bias=config.qkv_bias)
        self.v_proj = nn.Linear(h, nkv * hd, bias=config.qkv_bias)
        self.o_proj = nn.Linear(nh * hd, h, bias=config.o_bias)
        # set by lowbit.model.fuse.fuse_projections (inference): one GEMM for q, k and v, which then are None
        self.qkv_proj: nn.Module | None = None
        # Quantized KV cache, reference path: keys and values are quantized and dequantized as they
        # enter the cache, so attention sees exactly what a quantized cache would give back.
        # k_scale / v_scale (nkv,) fp32 are static per-head scales (fp8 caches), from calibration.
        self.kv_format: KVCacheFormat | None = None
        self.register_buffer("k_scale", None)
        self.register_buffer("v_scale", None)

    def forward(
        self,
        x: torch.Tensor | QuantizedActivations,  # (B, T, H), or quantized for qkv_proj (add_forward)
        cos: torch.Tensor,  # (B, T, hd)
        sin: torch.Tensor,
        mask: torch.Tensor,  # (B, 1, T, S) bool, True = may attend
        cache: KVCache | SlotKVCache | None,
        layer: int,
        start: int,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k, v = q.view(B, T, nh, hd), k.view(B, T, nkv, hd), v.view(B, T, nkv, hd)
        fake_kv = self.kv_format is not None and self.kv_format.dtype != "fp16" and not (
            cache is not None and cache.quantized)
        if cache is not None and not fake_kv:
            # decode on the GPU: rotary embedding and cache write in one kernel, where the cache has one
            out = cache.attend_rotary(layer, start, q, k, v, cos, sin)
            if out is not None:
                return self.o_proj(out.transpose(1, 2).reshape(B, T, nh * hd))
        if _fused_kernels(q):  # one kernel each instead of five elementwise ops (same roundings)
            from lowbit.kernels.fused import rope

            q, k = rope(q, cos, sin).transpose(1, 2), rope(k, cos, sin).transpose(1, 2)  # (B, heads, T, hd)
        else:
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            c, s = cos.unsqueeze(1), sin.unsqueeze(1)
            q = q * c + rotate_half(q) * s
            k = k * c + rotate_half(k) * s
        v = v.transpose(1, 2)
        if fake_kv:
            from lowbit.numerics.kv import fake_quantize_kv

            k = fake_quantize_kv(k, self.kv_format, self.k_scale)
            v = fake_quantize_kv(v, self.kv_format, self.v_scale)
        if cache is None:
            out = sdpa(q, k, v, mask)  # (B, nh, T, hd)
        else:  # the cache stores k, v (quantizing them if it is a quantized cache) and attends
            out = cache.attend(layer, start, q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, nh * hd))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h, i, b = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=b)
        self.up_proj = nn.Linear(h, i, bias=b)
        self.down_proj = nn.Linear(i, h, bias=b)
        self.gate_up_proj: nn.Module | None = None  # fuse_projections: gate and up in one GEMM
        self.intermediate_size = i

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).split([self.intermediate_size] * 2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        if _fused_kernels(gate):
            from lowbit.kernels.fused import silu_mul

            return self.down_proj(silu_mul(gate, up, input_quant(self.down_proj)))
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, cache, layer, start):  # noqa: ANN001 - see Attention.forward
        out, residual = self.residual_forward(x, None, cos, sin, mask, cache, layer, start)
        return residual + out

    def residual_forward(self, x, residual, cos, sin, mask, cache, layer, start):  # noqa: ANN001
        """(MLP output, residual stream before adding it): x is the previous layer's MLP output, not yet
        added to ``residual`` (None for the first layer); each addition is fused with the norm after it."""
        # the norms quantize for the fused q/k/v and gate/up GEMMs when those take 8-bit activations
        h, residual = self.input_layernorm.add_forward(x, residual, input_quant(self.self_attn.qkv_proj))
        h, residual = self.post_attention_layernorm.add_forward(
            self.self_attn(h, cos, sin, mask, cache, layer, start), residual, input_quant(self.mlp.gate_up_proj))
        return self.mlp(h), residual


class Transformer(nn.Module):
    """Decoder-only causal LM. ``forward`` returns logits (B, T, vocab) or (B, 1, vocab) with ``last_only``."""

    def __init__(self, config: ModelConfig) -> None:
        require_torch()  # attention needs SDPA's enable_gqa: say so now, not at the first forward
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(config.rope, config.head_dim), persistent=False)
        # the scheme its QuantLinears were made with (lowbit.quantize, or a quantized checkpoint); None: float
        self.quant_scheme: QuantScheme | None = None

    @property
    def kv_format(self) -> KVCacheFormat | None:
        """The KV cache format of every attention layer: None keeps keys and values in the model's
        dtype; set it for all layers at once (an fp16 format is stored as None)."""
        return self.layers[0].self_attn.kv_format

    @kv_format.setter
    def kv_format(self, fmt: KVCacheFormat | None) -> None:
        for layer in self.layers:
            layer.self_attn.kv_format = None if fmt is None or fmt.dtype == "fp16" else fmt

    def reset_buffers(self, device: torch.device | None = None) -> None:
        """Recompute non-persistent buffers on ``device`` (default: where they are), after building on
        the meta device."""
        self.inv_freq = rope_inv_freq(self.config.rope, self.config.head_dim).to(device or self.inv_freq.device)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T) int64
        positions: torch.Tensor | None = None,  # (B, T) int64 rotary positions; default 0..T-1
        cache: KVCache | SlotKVCache | None = None,
        start: int = 0,  # first cache slot this chunk is written to
        key_valid: torch.Tensor | None = None,  # (B, >= start+T) bool: False for padding slots
        last_only: bool = False,
        mask: torch.Tensor | None = None,  # (B, 1, T, S) bool: overrides the mask built from the above
    ) -> torch.Tensor:
        B, T = input_ids.shape
        device = input_ids.device
        if positions is None:
            positions = torch.arange(start, start + T, device=device).expand(B, T)
        x = self.embed_tokens(input_ids)
        cos, sin = self.rope(positions, x.dtype)
        if cache is None and start != 0:
            raise ValueError("start > 0 needs a KV cache holding the earlier slots")
        if mask is None and (cache is None or cache.needs_mask):
            mask = self.attention_mask(B, T, start, key_valid, device)
        residual = None
        for i, layer in enumerate(self.layers):
            x, residual = layer.residual_forward(x, residual, cos, sin, mask, cache, i, start)
        if last_only:
            x, residual = x[:, -1:], (None if residual is None else residual[:, -1:])
        # a quantized head with an 8-bit-activation kernel takes its input quantized by the final norm
        return self.lm_head(self.norm.add_forward(x, residual, input_quant(self.lm_head))[0])

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B, T, hd) for rotary positions (B, T); computed in fp32 as in transformers, or in
        float64 for a float64 ``dtype`` (calibration: CPU and CUDA cosines of fp32 angles may differ in
        their last bit, float64 ones round to the same fp32 value almost always)."""
        # inv_freq follows the positions: calibration runs one layer on the GPU while the model (and
        # this buffer) stays on the CPU (lowbit.quant.calibrate); a no-op when they share a device
        acc = torch.promote_types(dtype, torch.float32)
        freqs = positions[..., None].to(acc) * self.inv_freq.to(positions.device, acc)  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def attention_mask(self, B, T, start, key_valid, device) -> torch.Tensor:  # noqa: ANN001
        """(B, 1, T, S=start+T) bool: causal in slot order, padding keys hidden, sliding window if any."""
        S = start + T
        q_slot = torch.arange(start, S, device=device)[:, None]  # (T, 1)
        k_slot = torch.arange(S, device=device)[None, :]  # (1, S)
        allowed = k_slot <= q_slot
        window = self.config.sliding_window
        if window is not None:
            allowed = allowed & (q_slot - k_slot < window)
        allowed = allowed.expand(B, T, S)
        if key_valid is not None:
            # A padding query would see no key at all and SDPA would return NaN, which then flows into
            # later layers' keys; letting every query see itself keeps padding rows finite.
            allowed = (allowed & key_valid[:, None, :S]) | (k_slot == q_slot)
        return allowed[:, None]
