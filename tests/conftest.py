from __future__ import annotations

import pytest

from tests.tiny_models import TINY_ARCHS


@pytest.fixture(params=sorted(TINY_ARCHS))
def arch(request) -> str:
    return request.param
