"""The torch / Triton floors: stated once (lowbit.requirements), equal in pyproject.toml, true of what is installed."""

from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from packaging.requirements import Requirement
from packaging.version import Version

from lowbit import requirements
from lowbit.errors import LowbitError
from lowbit.requirements import MIN_TORCH, MIN_TRITON, check_version, parse_version

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _requirements(group: str | None = None) -> dict[str, Requirement]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    lines = project["dependencies"] if group is None else project["optional-dependencies"][group]
    return {r.name: r for r in map(Requirement, lines)}


def test_pyproject_floors_are_the_package_constants():
    deps = _requirements()
    assert str(deps["torch"].specifier) == f">={MIN_TORCH}"
    assert str(deps["triton"].specifier) == f">={MIN_TRITON}"  # a runtime dependency, not only dev
    assert str(deps["triton"].marker) == 'platform_system == "Linux"'  # Triton ships Linux wheels only
    pin = _requirements("dev")["triton"]  # CI's interpreter runs pinned; the pin must satisfy the floor
    assert str(pin.specifier) == "==3.6.0" and Version("3.6.0") >= Version(MIN_TRITON)


def test_installed_versions_have_the_features_the_floors_stand_for():
    check_version("torch", torch.__version__, MIN_TORCH, "test")
    q, kv = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8)  # 4 query heads share 2 KV heads
    out = F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
    ref = F.scaled_dot_product_attention(q, kv.repeat_interleave(2, 1), kv.repeat_interleave(2, 1))
    torch.testing.assert_close(out, ref)

    triton = pytest.importorskip("triton")
    check_version("triton", triton.__version__, MIN_TRITON, "test")
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401

    # launch_pdl is a launcher option of the CUDA backend (no GPU needed to read its source)
    driver = importlib.util.find_spec("triton.backends.nvidia.driver")
    assert driver is not None and "launch_pdl" in Path(driver.origin).read_text()


@pytest.mark.parametrize(("installed", "minimum", "ok"), [
    ("2.13.0+cpu", "2.5", True),  # numerically, not as strings ("2.13" < "2.5")
    ("2.5.0", "2.5", True),
    ("2.5", "2.5.0", True),
    ("2.5.0a0+git1234", "2.5", True),  # a nightly of the release
    ("2.4.1+cu121", "2.5", False),
    ("3.3.1", "3.4", False),
])
def test_check_version(installed, minimum, ok):
    if ok:
        check_version("torch", installed, minimum, "x")
    else:
        expected = re.escape(f"torch {installed} is too old") + ".*" + re.escape(f"pip install -U 'torch>={minimum}'")
        with pytest.raises(LowbitError, match=expected):
            check_version("torch", installed, minimum, "x")
    assert parse_version("2.13.0+cpu") == (2, 13, 0)


def test_require_raises_for_an_older_install(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.4.0")
    requirements.require_torch.cache_clear()
    try:
        with pytest.raises(LowbitError, match=r"torch 2\.4\.0 is too old: lowbit needs torch>=2\.5 for .*enable_gqa"):
            requirements.require_torch()
        triton = pytest.importorskip("triton")
        monkeypatch.setattr(triton, "__version__", "3.3.1")
        requirements.require_triton.cache_clear()
        with pytest.raises(LowbitError, match=r"triton 3\.3\.1 is too old.*pip install -U 'triton>=3\.4'"):
            requirements.require_triton()
    finally:  # the cached "fine" answers must be recomputed with the real versions
        requirements.require_torch.cache_clear()
        requirements.require_triton.cache_clear()


def test_model_construction_checks_torch(monkeypatch):
    """The check runs where SDPA is needed: building a Transformer (no GPU, no forward)."""
    from lowbit.model.config import ModelConfig
    from lowbit.model.llama import Transformer

    monkeypatch.setattr(torch, "__version__", "2.4.0")
    requirements.require_torch.cache_clear()
    try:
        config = ModelConfig.from_hf(dict(model_type="llama", vocab_size=11, hidden_size=8, intermediate_size=16,
                                          num_hidden_layers=1, num_attention_heads=2))
        with pytest.raises(LowbitError, match="torch 2.4.0 is too old"):
            Transformer(config)
    finally:
        requirements.require_torch.cache_clear()
