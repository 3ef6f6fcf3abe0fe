"""Writing result files (JSON reports, PNG plots) so that a crash never leaves a half-written one:
each is written beside its destination under a temporary name, then renamed into place."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError


def write_json(path: str | os.PathLike, data: Any, *, indent: int = 1) -> None:
    """``data`` as JSON at ``path`` (parent directories created), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(data, indent=indent))
    os.replace(tmp, path)


def read_json(path: str | os.PathLike, what: str) -> Any:
    """The JSON at ``path``; a LowbitError naming ``what`` (e.g. "a kernel report") if it cannot be read."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise LowbitError(f"cannot read {what} from {path}: {exc}") from exc


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend, or a LowbitError saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise LowbitError("--plot needs matplotlib: pip install 'lowbit[bench]'") from exc
    return plt


def save_figure(fig: Any, path: str | os.PathLike, *, dpi: int) -> None:
    """A matplotlib figure as a PNG at ``path``, atomically; the figure is closed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial.png")
    fig.savefig(tmp, dpi=dpi)
    pyplot().close(fig)
    os.replace(tmp, path)
