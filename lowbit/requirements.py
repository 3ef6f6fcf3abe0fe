"""The oldest torch and Triton lowbit runs on, in one place (pyproject.toml's floors must equal these:
tests/test_requirements.py checks it), and the checks that say so instead of an obscure failure.

Why these versions:
- torch 2.5: ``F.scaled_dot_product_attention(..., enable_gqa=...)`` (lowbit.model.kv_cache) first
  appeared in torch 2.5; older versions raise a TypeError at the first attention call.
- Triton 3.4: ``triton.language.extra.cuda.gdc_wait`` / ``gdc_launch_dependents`` and the ``launch_pdl``
  launch option (lowbit.kernels.pdl) came with triton-lang/triton#6394 (merged April 2025, after the
  3.3 branch cut); the triton 3.3.1 wheel has neither, the 3.4.0 wheel has both.

The checks read version strings only: no GPU query, so they are safe at import time.
"""

from __future__ import annotations

import re
from functools import lru_cache

from lowbit.errors import LowbitError

MIN_TORCH = "2.5"
MIN_TRITON = "3.4"


def parse_version(version: str) -> tuple[int, ...]:
    """The leading release numbers of a version string: "2.13.0+cpu" -> (2, 13, 0), "3.4" -> (3, 4).

    Pre-release and local tags are ignored, so a nightly "2.5.0a0+git..." counts as 2.5.0: nightlies
    of a release already carry its features.
    """
    m = re.match(r"\d+(?:\.\d+)*", version.strip())
    if m is None:
        raise LowbitError(f"cannot read the version string {version!r}")
    return tuple(int(p) for p in m.group().split("."))


def check_version(package: str, installed: str, minimum: str, needed_for: str) -> None:
    """Raise a LowbitError with the upgrade command when ``installed`` is older than ``minimum``."""
    have, need = parse_version(installed), parse_version(minimum)
    width = max(len(have), len(need))  # compare (3, 4) with (3, 4, 0) as equal
    if have + (0,) * (width - len(have)) < need + (0,) * (width - len(need)):
        raise LowbitError(
            f"{package} {installed} is too old: lowbit needs {package}>={minimum} for {needed_for}; "
            f"upgrade it with: pip install -U '{package}>={minimum}'"
        )


@lru_cache(maxsize=1)
def require_torch() -> None:
    """torch is at least MIN_TORCH (cached: the answer cannot change within a process)."""
    import torch

    check_version("torch", torch.__version__, MIN_TORCH, "scaled_dot_product_attention(enable_gqa=...)")


@lru_cache(maxsize=1)
def require_triton() -> None:
    """Triton is at least MIN_TRITON (call before importing anything newer from it)."""
    import triton

    check_version("triton", triton.__version__, MIN_TRITON,
                  "programmatic dependent launch (gdc_wait / gdc_launch_dependents, launch_pdl)")
