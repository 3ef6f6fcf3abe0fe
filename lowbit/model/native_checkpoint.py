"""The model side of lowbit's native checkpoint (``lowbit.checkpoint.native`` has the format): the
quantized layers installed from a checkpoint's tensors on load, and a quantized model's config and
tensors collected for saving. It sits beside the loader because it builds modules; the checkpoint
package below it knows files, names and the scheme, not modules."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lowbit.checkpoint.native import hf_name, quantization_config, write_checkpoint
from lowbit.errors import LowbitError
from lowbit.formats import QuantScheme
from lowbit.model.llama import Transformer
from lowbit.model.qlinear import QuantLinear


def save_quantized(model: Transformer, out: str | os.PathLike, *, tokenizer: Any = None, overwrite: bool = False) -> Path:
    """Write ``model`` (quantized by ``lowbit.quantize``) to the directory ``out`` (atomically)."""
    scheme: QuantScheme | None = model.quant_scheme
    if scheme is None:
        raise LowbitError("this model is not quantized; run lowbit.quantize(model, scheme, calib) first")
    config = model.config.to_hf()
    config["torch_dtype"] = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
    config["quantization_config"] = quantization_config(scheme)
    tensors = {hf_name(k): v for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    return write_checkpoint(out, config, tensors, tokenizer=tokenizer, overwrite=overwrite)


class QuantizedLayerStager:
    """Builds a quantized model's QuantLinears while its checkpoint streams past, one tensor at a time.

    ``take(name, tensor)`` keeps the tensors of each quantized Linear (``<layer>.qweight``,
    ``.scales``, ...) until the layer has all that the checkpoint holds for it, then builds the
    QuantLinear (every buffer checked, ``QuantLinear.from_tensors``), moves it to ``device`` and swaps it
    in for the (meta-device) Linear: at most the layers whose tensors are still arriving are held on
    the CPU, one in a checkpoint written in name order. It returns False for the tensors that are
    not a quantized layer's (float parameters), which the caller loads.

    ``names``: every tensor name of the checkpoint (from the files' headers), to know when a layer is
    complete; ``files`` maps names to their file, for the errors.
    """

    def __init__(self, model: Transformer, scheme: QuantScheme, names: Mapping[str, str | os.PathLike],
                 dtype: torch.dtype, device: torch.device) -> None:
        self.model, self.scheme, self.files, self.dtype, self.device = model, scheme, names, dtype, device
        self._expected: dict[str, set[str]] = {}  # tensor-name prefix -> the buffer names it has
        self._module: dict[str, str] = {}  # prefix -> module name
        for name, module in model.named_modules():
            prefix = hf_name(f"{name}.")  # model.layers.N.<proj>. or, for a quantized head, lm_head.
            if isinstance(module, torch.nn.Linear) and any(f"{prefix}{k}" in names for k in ("qweight", "scales")):
                self._module[prefix] = name
        for key in names:
            prefix = self._prefix_of(key)
            if prefix is not None:
                self._expected.setdefault(prefix, set()).add(key[len(prefix):])
        self._staged: dict[str, dict[str, torch.Tensor]] = {}
        self.kv_scales = 0

    def _prefix_of(self, key: str) -> str | None:
        prefix = key.rpartition(".")[0] + "."
        return prefix if prefix in self._module else None

    def take(self, key: str, tensor: torch.Tensor) -> bool:
        """Consume ``tensor`` if it belongs to a quantized layer (or is a static KV scale)."""
        prefix = self._prefix_of(key)
        if prefix is None:
            return self._take_kv_scale(key, tensor)
        own = self._staged.setdefault(prefix, {})
        own[key[len(prefix):]] = tensor
        if own.keys() == self._expected[prefix]:
            self._install(prefix, self._staged.pop(prefix))
        return True

    def _take_kv_scale(self, key: str, tensor: torch.Tensor) -> bool:
        head, _, which = key.rpartition(".")
        if which not in ("k_scale", "v_scale") or not head.endswith(".self_attn") or self.scheme.kv_cache.dtype == "fp16":
            return False
        attn = self.model.get_submodule(head.removeprefix("model."))
        setattr(attn, which, tensor.to(self.device))
        self.kv_scales += 1
        return True

    def _install(self, prefix: str, own: dict[str, torch.Tensor]) -> None:
        name = self._module[prefix]
        module = self.model.get_submodule(name)
        home = next((self.files[f"{prefix}{k}"] for k in own if f"{prefix}{k}" in self.files), "checkpoint")

        def describe(k: str) -> str:
            return f"{self.files.get(prefix + k, home)}: tensor '{prefix}{k}'"

        wfmt, afmt = self.scheme.for_layer(name)
        qlin = QuantLinear.from_tensors(own, module.in_features, wfmt, afmt, out_features=module.out_features,
                                        describe=describe)
        for k in ("bias", "outlier_weight"):  # these follow the model's dtype (checked as floats first)
            if getattr(qlin, k) is not None:
                setattr(qlin, k, getattr(qlin, k).to(self.dtype))
        qlin.to(self.device)  # a device move only: QuantLinear keeps its buffers' dtypes
        parent, _, attr = name.rpartition(".")
        setattr(self.model.get_submodule(parent), attr, qlin)

    def finish(self) -> None:
        """After the stream: every quantized layer complete (a truncated stream names what is missing),
        the KV formats and the scheme set on the model."""
        if self._staged:  # only reachable when ``names`` listed tensors the stream did not deliver
            prefix, own = next(iter(self._staged.items()))
            missing = sorted(self._expected[prefix] - own.keys())
            raise LowbitError(f"{self.files.get(prefix + missing[0], 'checkpoint')}: tensor '{prefix}{missing[0]}' "
                              "was listed but never read; the checkpoint is incomplete")
        self.model.kv_format = self.scheme.kv_cache
        self.model.quant_scheme = self.scheme
