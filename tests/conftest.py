from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter; the variable must be set before
# triton is first imported (the @triton.jit decorators read it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.tiny_models import TINY_ARCHS, make_hf_model, save_tiny_tokenizer


@pytest.fixture(params=sorted(TINY_ARCHS))
def arch(request) -> str:
    return request.param


@dataclass
class TinyServer:
    loaded: object  # LoadedModel
    engine: object  # Engine
    url: str  # http://127.0.0.1:PORT


@pytest.fixture(scope="session")
def tiny_server(tmp_path_factory):
    """`lowbit serve` on loopback with a tiny llama2 model (word-level tokenizer "w3".."w96"), served as
    "tiny" by an engine of 2 KV slots of 64 tokens, so that a few clients already queue."""
    pytest.importorskip("uvicorn")
    from lowbit.engine.scheduler import Engine
    from lowbit.model.loader import load_model
    from lowbit.serve.app import BackgroundServer, create_app

    path = tmp_path_factory.mktemp("served")
    make_hf_model("llama2").save_pretrained(path)
    save_tiny_tokenizer(path)
    loaded = load_model(path, device="cpu", dtype="fp32")
    engine = Engine(loaded.model, max_slots=2, max_len=64, prefill_chunk=8)
    with BackgroundServer(create_app(loaded, engine, "tiny")) as url:
        yield TinyServer(loaded, engine, url)
