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
    served: object  # lowbit.serve.app.Served
    url: str  # http://127.0.0.1:PORT

    @property
    def engine(self):  # noqa: ANN201 - the engine now serving (a new one after a restart)
        return self.served.loop.engine


def tiny_model_dir(path, **config) -> None:  # noqa: ANN001
    """A tiny llama2 checkpoint with the word-level test tokenizer, written to ``path``."""
    make_hf_model("llama2", **config).save_pretrained(path)
    save_tiny_tokenizer(path)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("served")
    tiny_model_dir(path)
    return path


@pytest.fixture(scope="session")
def tiny_server(tiny_model_path):
    """`lowbit serve` on loopback with a tiny llama2 model (word-level tokenizer "w3".."w96"), served as
    "tiny" by an engine of 2 KV slots of 64 tokens, so that a few clients already queue."""
    pytest.importorskip("uvicorn")
    from lowbit.engine.scheduler import Engine
    from lowbit.model.loader import load_model
    from lowbit.serve.app import create_app
    from lowbit.serve.runner import BackgroundServer

    loaded = load_model(tiny_model_path, device="cpu", dtype="fp32")
    engine = Engine(loaded.model, max_slots=2, max_len=64, prefill_chunk=8)
    app = create_app(loaded, engine, "tiny")
    with BackgroundServer(app) as url:
        yield TinyServer(loaded, app.state.served, url)


@pytest.fixture
def serve_tiny(tiny_model_path):
    """A factory: ``with serve_tiny(slots=2, max_len=64, **create_app_kwargs) as server`` serves the tiny
    model on a free loopback port with its own engine (``server.url``, ``.served``, ``.background``)."""
    pytest.importorskip("uvicorn")
    import contextlib

    from lowbit.engine.scheduler import Engine
    from lowbit.model.loader import load_model
    from lowbit.serve.app import create_app
    from lowbit.serve.runner import BackgroundServer

    loaded = load_model(tiny_model_path, device="cpu", dtype="fp32")

    @contextlib.contextmanager
    def start(slots: int = 2, max_len: int = 64, prefill_chunk: int = 8, name="tiny", drain_timeout_s: float = 30.0,
              **kwargs):
        engine = Engine(loaded.model, max_slots=slots, max_len=max_len, prefill_chunk=prefill_chunk)
        app = create_app(loaded, engine, name, **kwargs)
        background = BackgroundServer(app, drain_timeout_s=drain_timeout_s)
        with background as url:
            server = TinyServer(loaded, app.state.served, url)
            server.background = background
            yield server

    return start


@pytest.fixture
def use_kernel_table(tmp_path, monkeypatch):
    """``use(table)``: make ``table`` (a dict in the tuned-table format) the dispatch table for this test
    (``LOWBIT_KERNEL_TABLE``), with dispatch's caches cleared."""
    import json

    from lowbit.kernels import dispatch

    def use(table: dict) -> None:
        path = tmp_path / f"kernel-table-{len(list(tmp_path.glob('kernel-table-*')))}.json"
        path.write_text(json.dumps(table))
        monkeypatch.setenv("LOWBIT_KERNEL_TABLE", str(path))
        dispatch.load_table.cache_clear()
        dispatch._choose_cached.cache_clear()

    return use
