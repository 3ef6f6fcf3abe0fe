"""Reading Llama-family GGUF files (llama.cpp's format): config from metadata, weights dequantized.

Weights are dequantized with the ``gguf`` package (any GGML type it knows: F16, Q8_0, Q4_K, ...) to
fp32 and handed out under Hugging Face names, so the rest of the loader treats both formats alike.

llama.cpp's converter permutes the rows of q and k for the ``llama`` architecture (its rotary
kernel pairs neighbouring dims, transformers pairs dim i with i + hd/2); we undo that permutation,
as transformers' own GGUF loader does. Qwen2 files are written unpermuted.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lowbit.errors import LowbitError
from lowbit.model.config import ModelConfig, RopeConfig

GGUF_MAGIC = b"GGUF"
GGUF_ARCHITECTURES = ("llama", "qwen2")  # Mistral and SmolLM GGUFs are written as "llama"

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def open_gguf(path: Path) -> Any:
    """Open a GGUF file with the ``gguf`` package; a truncated or corrupt file gives a LowbitError."""
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as exc:
        raise LowbitError(
            f"{path} is not a readable GGUF file, or it is truncated ({type(exc).__name__}: {exc}); "
            "download it again"
        ) from exc


def _field(reader: Any, key: str, default: Any = ...) -> Any:
    f = reader.fields.get(key)
    if f is None:
        if default is ...:
            raise LowbitError(f"{reader.data.filename} lacks GGUF metadata {key!r}; the file is incomplete")
        return default
    return f.contents()


def gguf_config(reader: Any) -> ModelConfig:
    """The ModelConfig described by a GGUF file's metadata."""
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise LowbitError(
            f"unsupported GGUF architecture {arch!r}; lowbit reads {', '.join(GGUF_ARCHITECTURES)} "
            "(Llama 2/3, Mistral, SmolLM are written as 'llama')"
        )
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise LowbitError(
            "this GGUF stores Llama 3.1 rope frequency factors (rope_freqs), which lowbit does not read yet; "
            "use the Hugging Face safetensors checkpoint of the model instead"
        )
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    heads = int(_field(reader, f"{arch}.attention.head_count"))
    tokens = _field(reader, "tokenizer.ggml.tokens", None)
    vocab = int(_field(reader, f"{arch}.vocab_size", len(tokens) if tokens is not None else 0))
    if vocab == 0:
        raise LowbitError(f"{reader.data.filename} gives no vocabulary size; the file is incomplete")
    scaling = _field(reader, f"{arch}.rope.scaling.type", "none")
    theta = float(_field(reader, f"{arch}.rope.freq_base", 10000.0))
    if scaling == "none":
        rope = RopeConfig(theta=theta)
    elif scaling == "linear":
        rope = RopeConfig(theta=theta, kind="linear", factor=float(_field(reader, f"{arch}.rope.scaling.factor")))
    else:
        raise LowbitError(f"GGUF rope scaling {scaling!r} is not supported yet (supported: none, linear)")
    eos = _field(reader, "tokenizer.ggml.eos_token_id", None)
    return ModelConfig(
        architecture=arch,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
        num_layers=int(_field(reader, f"{arch}.block_count")),
        num_heads=heads,
        num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(_field(reader, f"{arch}.attention.key_length", hidden // heads)),
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 2048)),
        rope=rope,
        qkv_bias="blk.0.attn_q.bias" in names,
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id", None),
        eos_token_ids=() if eos is None else (int(eos),),
    )


def hf_name(gguf_name: str) -> str:
    """Hugging Face parameter name for a GGUF tensor name (unknown names are returned unchanged)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return gguf_name


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: rows (n_head, 2, hd/2) were stored as (n_head, hd/2, 2)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(reader: Any, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (Hugging Face name, fp32 tensor) for every tensor of the file, dequantized."""
    from gguf import dequantize

    for t in reader.tensors:
        name = hf_name(t.name)
        try:
            w = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        except (ValueError, NotImplementedError) as exc:
            raise LowbitError(f"cannot dequantize GGUF tensor {t.name} of type {t.tensor_type.name}: {exc}") from exc
        if config.architecture == "llama":
            if name.endswith("q_proj.weight") or name.endswith("q_proj.bias"):
                w = unpermute_rope_rows(w, config.num_heads)
            elif name.endswith("k_proj.weight") or name.endswith("k_proj.bias"):
                w = unpermute_rope_rows(w, config.num_kv_heads)
        # F32 tensors come back as read-only views of the memory-mapped file: copy into our own memory.
        if not w.flags.writeable:
            w = w.copy()
        yield name, torch.from_numpy(np.ascontiguousarray(w))
