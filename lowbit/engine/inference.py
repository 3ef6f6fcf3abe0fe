"""Building a model for inference, in one place, for every entry point: ``lowbit generate`` and
``lowbit.generate()``, ``lowbit serve``, ``lowbit bench e2e`` and the profiler.

``prepare_for_inference`` makes a loaded model what the engine runs on its device: on CUDA, q/k/v and
gate/up fused into one GEMM each (``lowbit.model.fuse``), then every quantized layer repacked for its
GPU kernel; a layer no kernel takes keeps the reference path, with its dequantized weight cached.
``engine_for`` keeps one idle engine per model so that repeated ``generate`` calls do not allocate a
KV cache and capture CUDA graphs every time; it is rebuilt when the model's modules or tensors change
(graphs replay the buffers they were captured with).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from lowbit.engine.scheduler import Engine, plan_slots
from lowbit.model.llama import Transformer
from lowbit.model.qlinear import QuantLinear, cache_dequantized_weights


@dataclass(frozen=True)
class InferenceSetup:
    """What ``prepare_for_inference`` did."""

    fused_groups: int  # q/k/v and gate/up groups now one GEMM each
    kernel_layers: int  # quantized layers on a GPU kernel
    quantized_layers: int  # quantized layers in all (the rest run the reference path)
    released_bytes: int = 0  # checkpoint-layout int4 weights dropped: the kernel layout is the one copy

    def describe(self) -> str:
        if not self.quantized_layers:
            return ""
        return f"{self.kernel_layers}/{self.quantized_layers} quantized layers on GPU kernels"


def prepare_for_inference(model: Transformer, *, kernels: bool = True) -> InferenceSetup:
    """Fuse and repack ``model`` in place for the engine on its device (module docstring).

    ``kernels=False`` keeps every quantized layer on the reference path (``lowbit generate
    --reference``). On the CPU nothing is fused: the reference numerics stay exactly those of the
    checkpoint's layers. Layers whose kernel layout gives their int4 codes back exactly drop the
    checkpoint copy (``QuantLinear.release_checkpoint_layout``). Idempotent. A fused model is not saved
    or re-quantized.
    """
    fused = released = 0
    on_cuda = model.embed_tokens.weight.device.type == "cuda"
    if on_cuda:
        from lowbit.model.fuse import fuse_projections

        fused = fuse_projections(model)
    on, total = 0, 0
    if model.quant_scheme is not None:
        for m in model.modules():
            if not isinstance(m, QuantLinear):
                continue
            total += 1
            if on_cuda and kernels and m.prepare_kernels(model.embed_tokens.weight.dtype):
                on += 1
                # one copy of the int4 weights on the GPU (the checkpoint layout is rebuilt to save),
                # dropped as each layer is packed: packing them all first held two copies of the model's
                # int4 weights at once (peak 1.79x the checkpoint on the H200, bench/load_memory.py)
                released += m.release_checkpoint_layout()
            else:  # left on the reference path: its dequantized weight kept between steps
                m.use_packed(None)
                cache_dequantized_weights(m)
        if released and on_cuda:
            torch.cuda.empty_cache()
    return InferenceSetup(fused, on, total, released)


_ENGINES: weakref.WeakKeyDictionary[Transformer, tuple[tuple, Engine]] = weakref.WeakKeyDictionary()


def _fingerprint(model: Transformer) -> tuple:
    """What an engine's CUDA graphs depend on: every module, its packed kernel weights, and where each
    parameter and buffer lives. Changed by fusion, repacking, quantization or a device move; not by
    in-place writes to the weights (a replay reads them where they are)."""
    mods = tuple((id(m), id(m.kernel if isinstance(m, QuantLinear) else None)) for m in model.modules())
    tensors = tuple(t.data_ptr() for t in (*model.parameters(), *model.buffers()))
    return mods, tensors


def engine_for(model: Transformer, requests: int, max_len: int) -> Engine:
    """An idle engine over ``model`` for ``requests`` prompts of up to ``max_len`` tokens each (prompt
    and output): the cached one when it is large enough and the model unchanged, else a new one.

    Slots: ``requests`` rounded up to a power of two, at most what fits in memory (``plan_slots``);
    more requests wait in the engine's queue. ``max_len`` is rounded up to a multiple of 256 (at most
    the model's context), so that calls of similar lengths share one engine.
    """
    context = model.config.max_position_embeddings
    max_len = min(context, -(-max_len // 256) * 256)
    slots = min(1 << max(0, requests - 1).bit_length(), plan_slots(model, max_len))
    key = _fingerprint(model)
    cached = _ENGINES.get(model)
    if cached is not None:
        old_key, engine = cached
        if old_key == key and not engine.has_work and engine.num_slots >= slots and engine.max_len >= max_len:
            return engine
        engine.close()  # its KV cache and graphs go before the new ones are allocated
        del _ENGINES[model]
    engine = Engine(model, max_slots=slots, max_len=max_len)
    _ENGINES[model] = (key, engine)
    return engine


def release_engine(model: Transformer) -> None:
    """Free the engine ``generate`` keeps for ``model`` (its KV cache and CUDA graphs)."""
    cached = _ENGINES.pop(model, None)
    if cached is not None:
        cached[1].close()  # which also hands the freed CUDA memory back
