"""lowbit: low-bit LLM inference for NVIDIA GPUs.

Importing lowbit is cheap and never touches the GPU; the public API is loaded on first use:

    import lowbit
    loaded = lowbit.load_model("smollm2-135m")          # or a HF directory / .gguf path
    print(lowbit.generate_text(loaded, ["What is the capital of France?"])[0])
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load": "lowbit.model.loader",  # load(path): a float or a lowbit-quantized checkpoint
    "load_model": "lowbit.model.loader",
    "LoadedModel": "lowbit.model.loader",
    "ModelConfig": "lowbit.model.config",
    "Transformer": "lowbit.model.llama",
    "SamplingParams": "lowbit.engine.sampling",
    "generate": "lowbit.engine.generate",
    "generate_text": "lowbit.engine.generate",
    "prepare_for_inference": "lowbit.engine.inference",
    "LowbitError": "lowbit.errors",
    "quantize": "lowbit.eval.calibration",
    "QuantScheme": "lowbit.formats",
    "get_scheme": "lowbit.formats",
    "save_quantized": "lowbit.model.native_checkpoint",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), "load_model" if name == "load" else name)
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")
