from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter; the variable must be set before
# triton is first imported (the @triton.jit decorators read it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.tiny_models import TINY_ARCHS


@pytest.fixture(params=sorted(TINY_ARCHS))
def arch(request) -> str:
    return request.param
