"""Load a Llama-family model from a Hugging Face directory or a GGUF file into our Transformer.

- HF directory: ``config.json`` + ``*.safetensors`` (one file, or shards listed in
  ``model.safetensors.index.json``), tokenizer files beside them.
- GGUF file: metadata gives the config and the tokenizer (converted by transformers once, then cached
  under the lowbit cache), weights are dequantized (see ``lowbit.model.gguf``).

The model is built on the meta device and materialized directly on the target device and dtype,
so nothing is allocated twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lowbit.assets import cache_dir, resolve_model
from lowbit.checkpoint import awq, compressed_tensors, fp8, gptq
from lowbit.checkpoint.native import scheme_from_config
from lowbit.model.native_checkpoint import QuantizedLayerStager
from lowbit.device import pick_device, pick_dtype
from lowbit.errors import LowbitError
from lowbit.model import gguf as gguf_format
from lowbit.model.config import ModelConfig
from lowbit.model.llama import Transformer

# Other tools' quantized checkpoints, recognized from config.json, and the reader of each
# (lowbit.checkpoint.translate: their layers' tensors become lowbit's as the checkpoint streams)
_COMMUNITY = ((compressed_tensors.is_compressed_tensors, compressed_tensors.CompressedTensorsReader),
              (awq.is_awq, awq.AwqReader), (gptq.is_gptq, gptq.GptqReader), (fp8.is_fp8, fp8.Fp8Reader))
# Checkpoint entries that carry no parameter of ours (old checkpoints saved rotary tables).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Any | None  # a transformers tokenizer, or None when the checkpoint ships none
    config: ModelConfig
    path: Path
    stop_token_ids: tuple[int, ...]  # end-of-sequence ids from config, generation config and tokenizer

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device


def load_model(
    name_or_path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    with_tokenizer: bool = True,
) -> LoadedModel:
    """Load a model by known name (``smollm2-135m``) or path; device and dtype default to the best available."""
    path = resolve_model(name_or_path)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LowbitError(f"{path} has no config.json; pass a Hugging Face model directory or a .gguf file")
        raw_config = _read_json(path / "config.json")
        config = ModelConfig.from_hf(raw_config)
        files = _safetensors_files(path)
        located = _safetensors_tensors(files)
        community = None  # a checkpoint of another tool, translated to lowbit's layer tensors as it streams
        reader = next((r for is_format, r in _COMMUNITY if is_format(raw_config)), None)
        if reader is not None:
            community = reader(raw_config, {k: str(f) for f, k in _safetensors_names(files)})
            scheme = community.scheme
            located = ((f, k, t) for f, (k, t) in _with_file(located, community))
        else:
            scheme = scheme_from_config(raw_config)
        tensors: Iterable[tuple[str, torch.Tensor]] = ((k, t) for _, k, t in located)
        # errors name the weights file itself, unless the checkpoint is sharded
        source = str(files[0]) if len(files) == 1 else str(path)
        tokenizer = _hf_tokenizer(path) if with_tokenizer else None
        extra_eos = _generation_eos(path)
    elif path.is_file() and gguf_format.is_gguf(path):
        reader = gguf_format.open_gguf(path)
        config = gguf_format.gguf_config(reader)
        tensors = gguf_format.gguf_tensors(reader, config)
        tokenizer = _gguf_tokenizer(path) if with_tokenizer else None
        extra_eos = ()
        scheme = None
        source = str(path)
    elif path.suffix == ".safetensors":
        raise LowbitError(f"pass the directory that holds {path.name} and config.json, not the weights file")
    else:
        raise LowbitError(f"{path} is neither a model directory (config.json + *.safetensors) nor a GGUF file")

    # Built on the meta device, each tensor then placed on ``dev`` as it is read: peak memory is the
    # checkpoint's bytes (a W4 model never passes through an fp16 allocation of its Linears)
    model = build_meta(config, dt)
    if scheme is not None:  # a lowbit quantized checkpoint: QuantLinears built as their tensors arrive
        names = community.native_names() if community else {k: str(f) for f, k in _safetensors_names(files)}
        stager = QuantizedLayerStager(model, scheme, names, dt, dev)
        tensors = ((k, t) for _, k, t in located if not stager.take(k, t))
    load_hf_weights(model, tensors, source=source, device=dev)
    if scheme is not None:
        stager.finish()
    model.eval()
    stops = list(config.eos_token_ids) + list(extra_eos)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        stops.append(int(tokenizer.eos_token_id))
    return LoadedModel(model, tokenizer, config, path, tuple(dict.fromkeys(stops)))


def build_meta(config: ModelConfig, dtype: torch.dtype) -> Transformer:
    """A Transformer on the meta device in ``dtype`` (no memory): ``load_hf_weights`` places each
    parameter on the target device as its tensor is read."""
    with torch.device("meta"):
        return Transformer(config).to(dtype)


def build_empty(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> Transformer:
    """A Transformer with uninitialized weights on ``device``/``dtype`` (rotary tables stay fp32)."""
    model = build_meta(config, dtype)
    model.to_empty(device=device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.reset_buffers()
    return model


@torch.no_grad()
def load_hf_weights(model: Transformer, tensors: Iterable[tuple[str, torch.Tensor]], source: str,
                    device: torch.device | None = None) -> None:
    """Load tensors named as in Hugging Face's Llama (``model.layers.0...``, ``lm_head.weight``) into ``model``.

    A parameter on the meta device (``build_meta``) becomes the tensor itself, moved to ``device`` in
    the parameter's dtype (no copy when it is there already); others are copied into. Then the
    rotary tables are made on ``device`` and a tied head is tied again. Every parameter must be
    given exactly once with the right shape; anything unknown is an error (it usually means a
    checkpoint quantized in another format).
    """
    params = dict(model.named_parameters())  # tied lm_head is listed once, as embed_tokens
    tied = model.config.tie_word_embeddings
    loaded: set[str] = set()
    for hf_name, tensor in tensors:
        if hf_name.endswith(_IGNORED_SUFFIXES):
            continue
        name = hf_name.removeprefix("model.")
        if tied and name == "lm_head.weight":
            continue  # some tied checkpoints store the head too; it is the embedding
        param = params.get(name)
        if param is None:
            raise LowbitError(
                f"{source} has a tensor lowbit does not know: {hf_name!r}. Is it a checkpoint quantized "
                "in another format, or a different architecture?"
            )
        if tuple(tensor.shape) != tuple(param.shape):
            raise LowbitError(
                f"{source}: tensor {hf_name!r} has shape {tuple(tensor.shape)}, but the config implies "
                f"{tuple(param.shape)}; config.json and the weights disagree"
            )
        if param.is_meta:
            parent, _, attr = name.rpartition(".")
            module = model.get_submodule(parent)
            module._parameters[attr] = torch.nn.Parameter(tensor.to(device=device, dtype=param.dtype),
                                                          requires_grad=param.requires_grad)
        else:
            param.copy_(tensor)
        loaded.add(name)
    # asked of the model as it is now: quantized layers swapped in while the tensors streamed have no
    # float weight to miss
    now = {n for n, _ in model.named_parameters() if not (tied and n == "lm_head.weight")}
    missing = [n if n.startswith("lm_head.") else f"model.{n}" for n in sorted(now - loaded)]
    if missing:  # named as in the file, where the user would look for them
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise LowbitError(f"{source} lacks tensor {', '.join(repr(n) for n in missing[:3])}{more}; "
                          "the checkpoint is incomplete")
    if tied:
        model.lm_head.weight = model.embed_tokens.weight
    model.reset_buffers(device)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LowbitError(f"{path} is not valid JSON ({exc}); the file is corrupt") from exc


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise LowbitError(f"{index} has no 'weight_map'; the file is corrupt")
        files = [directory / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise LowbitError(f"shard {f.name} listed in {index.name} is missing from {directory}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
            raise LowbitError(
                f"{directory} holds only PyTorch pickle weights (*.bin); lowbit reads safetensors. "
                "Re-save the model with save_pretrained(..., safe_serialization=True)"
            )
        raise LowbitError(f"{directory} has config.json but no *.safetensors weights")
    return files


def _with_file(located: Iterable[tuple[Path, str, torch.Tensor]], reader: Any) -> Iterator[tuple[Path, tuple]]:
    """``reader.translate`` over (name, tensor) pairs, each result with the file of the tensor that
    completed it (the stream's (file, name, tensor) shape)."""
    current: list[Path] = [Path()]

    def pairs() -> Iterator[tuple[str, torch.Tensor]]:
        for f, k, t in located:
            current[0] = f
            yield k, t

    for k, t in reader.translate(pairs()):
        yield current[0], (k, t)


def _safetensors_names(files: list[Path]) -> Iterator[tuple[Path, str]]:
    """(file, name) for every tensor of ``files``, from their headers (no data read)."""
    from safetensors import SafetensorError, safe_open

    for f in files:
        try:
            with safe_open(f, framework="pt", device="cpu") as st:
                yield from ((f, name) for name in st.keys())
        except (SafetensorError, OSError) as exc:
            raise LowbitError(f"{f} is corrupt or truncated{_cut_tensors(f)} ({exc}); download or re-create it") from exc


def _safetensors_tensors(files: list[Path]) -> Iterator[tuple[Path, str, torch.Tensor]]:
    """(file, name, tensor) for every tensor of ``files``, read one at a time."""
    from safetensors import SafetensorError, safe_open

    for f in files:
        key = None
        try:
            with safe_open(f, framework="pt", device="cpu") as st:
                for name in st.keys():
                    key = name
                    tensor = st.get_tensor(name)
                    key = None
                    yield f, name, tensor
        except (SafetensorError, OSError) as exc:
            # safetensors checks the header and the data length when it opens a file, so truncation
            # and a garbled header fail here; garbage inside the data is caught by the value checks
            at = f" at tensor {key!r}" if key is not None else _cut_tensors(f)
            raise LowbitError(f"{f} is corrupt or truncated{at} ({exc}); download or re-create it") from exc


def _cut_tensors(f: Path) -> str:
    """Which tensors a truncated safetensors file lost, read from its header (when that is intact).

    The format: an 8-byte little-endian header length, a JSON header giving each tensor's
    ``data_offsets`` relative to the end of the header, then the data.
    """
    size = f.stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        if not 0 < n <= size - 8:
            return ""
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return ""
    if not isinstance(header, dict):
        return ""
    spans = {k: v.get("data_offsets") for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}
    cut = sorted((k for k, o in spans.items() if isinstance(o, list) and len(o) == 2 and 8 + n + o[1] > size),
                 key=lambda k: spans[k][0])
    if not cut:
        return ""
    more = f" and {len(cut) - 1} more" if len(cut) > 1 else ""
    return f": only {size} bytes, tensor {cut[0]!r}{more} past the end"


def _generation_eos(directory: Path) -> tuple[int, ...]:
    gen = directory / "generation_config.json"
    if not gen.is_file():
        return ()
    eos = _read_json(gen).get("eos_token_id")
    if eos is None:
        return ()
    return tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))


def _hf_tokenizer(directory: Path) -> Any | None:
    if not any((directory / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def _gguf_tokenizer(path: Path) -> Any:
    """Tokenizer from a GGUF file's metadata; built by transformers once (seconds), then cached."""
    from transformers import AutoTokenizer

    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:20]
    cached = cache_dir() / "tokenizers" / key
    if (cached / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(cached)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cached.parent, prefix=".tmp-"))
    try:
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, cached)
    except OSError as exc:
        # Another process won the race, or the disk is full: the tokenizer in memory is still good,
        # only the cache entry is skipped (and the next load converts again).
        shutil.rmtree(tmp, ignore_errors=True)
        if not (cached / "tokenizer_config.json").is_file():
            warnings.warn(f"could not cache the tokenizer in {cached} ({exc}); it will be rebuilt next time", stacklevel=2)
    return tokenizer
