"""Build and load the CUTLASS kernels (``lowbit/kernels/cutlass_src``) as one shared library per source.

CUTLASS is a header library; the kernels are compiled with ``nvcc`` for sm_90a, one object file per
tile configuration (compiled in parallel: a CUTLASS Hopper kernel takes minutes), linked into a
shared library with a C ABI, and loaded with :mod:`ctypes`. No PyTorch headers are involved, so the
library builds on any machine with ``nvcc`` (a CPU-only one too) and runs beside any PyTorch build
of the same CUDA major version.

Where the pieces come from:
- ``LOWBIT_CUTLASS_DIR``: a CUTLASS checkout (or its ``include`` and ``tools/util/include``), 4.x.
  CUTLASS's util headers include ``curand_kernel.h``; where the CUDA toolkit lacks cuRAND's headers,
  put them in ``$LOWBIT_CUTLASS_DIR/curand``.
- ``nvcc`` on ``PATH`` (or ``$CUDA_HOME/bin``).
- The built library is cached in ``<lowbit cache>/kernels/`` under a name that hashes the source and
  the headers beside it, the configurations, the flags and the compiler's version, written to a
  temporary file then renamed.
  ``python -m lowbit.kernels.cutlass_prebuild`` builds them ahead of time (``--help``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from lowbit.errors import LowbitError

SOURCE_DIR = Path(__file__).parent / "cutlass_src"
CUTLASS_ENV = "LOWBIT_CUTLASS_DIR"
# sm_90a: wgmma and setmaxnreg exist only on the "a" target; the -gencode form (HOPPER.md).
ARCH_FLAGS = ("-gencode=arch=compute_90a,code=sm_90a",)
FLAGS = ("-std=c++17", "-O3", "-DNDEBUG", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC",
         "-cudart", "shared", "-diag-suppress", "20012")


@dataclass(frozen=True)
class Part:
    """One object file of a library: its index (the C symbols' suffix) and its ``-D`` macros."""

    index: int
    defines: tuple[tuple[str, str], ...]


def unavailable() -> str | None:
    """None when the CUTLASS libraries can be loaded or built here (``LOWBIT_CUTLASS_DIR`` and nvcc), else
    why not, in one line (a table naming CUTLASS's order then falls back to the Gluon/Triton orders)."""
    try:
        cutlass_includes()
        nvcc_path()
    except LowbitError as exc:
        return str(exc)
    return None


def nvcc_path() -> str:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    for cand in ([str(Path(cuda_home) / "bin" / "nvcc")] if cuda_home else []) + [shutil.which("nvcc") or ""]:
        if cand and Path(cand).exists():
            return cand
    raise LowbitError("the CUTLASS kernels are compiled with nvcc, which is not on PATH; install the CUDA "
                      "toolkit (12.4 or newer for sm_90a) or set CUDA_HOME")


def cutlass_includes() -> list[str]:
    root = os.environ.get(CUTLASS_ENV)
    if not root:
        raise LowbitError(f"the CUTLASS kernels need CUTLASS's headers: set {CUTLASS_ENV} to a CUTLASS 4.x "
                          "checkout (git clone https://github.com/NVIDIA/cutlass)")
    root_path = Path(root).expanduser()
    dirs = [root_path / "include", root_path / "tools" / "util" / "include"]
    missing = [str(d) for d in dirs if not (d / "cutlass").is_dir()]
    if missing:
        raise LowbitError(f"{CUTLASS_ENV}={root} has no CUTLASS headers in {', '.join(missing)}")
    extra = root_path / "curand"
    return [str(d) for d in dirs + ([extra] if extra.is_dir() else [])]


def _nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()[-1]


def library_path(name: str, parts: list[Part], cache: Path | None = None) -> Path:
    """Where the library for ``name``.cu with these parts is (or will be) cached."""
    from lowbit.assets import cache_dir

    nvcc = nvcc_path()
    h = hashlib.sha256()
    for src in sorted(SOURCE_DIR.iterdir()):  # the source and every header it may include
        if src.suffix in (".cu", ".hpp", ".h") and (src.suffix != ".cu" or src.stem == name):
            h.update(src.name.encode() + src.read_bytes())
    h.update(repr((parts, FLAGS, ARCH_FLAGS, _nvcc_version(nvcc))).encode())
    root = cutlass_includes()[0]
    version = Path(root) / "cutlass" / "version.h"
    if version.exists():
        h.update(version.read_bytes())
    return (cache or cache_dir()) / "kernels" / f"{name}-{h.hexdigest()[:16]}.so"


def build(name: str, parts: list[Part], jobs: int | None = None, verbose: bool = False) -> Path:
    """Compile ``cutlass_src/<name>.cu`` once per part plus the shared part (index -1), link, cache.

    Returns the cached library's path; a library already built for the same inputs is reused."""
    out = library_path(name, parts)
    if out.exists():
        return out
    nvcc, includes = nvcc_path(), cutlass_includes()
    src = SOURCE_DIR / f"{name}.cu"
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{name}-build-") as tmp:
        def compile_part(part: Part) -> Path:
            obj = Path(tmp) / f"part{part.index + 1}.o"
            defs = [f"-D{k}={v}" for k, v in (("LB_PART", str(part.index)),) + part.defines]
            cmd = [nvcc, *FLAGS, *ARCH_FLAGS, *[f"-I{d}" for d in includes], *defs, "-c", "-o", str(obj), str(src)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise LowbitError(f"nvcc failed on {src.name} part {part.index} ({' '.join(defs)}):\n"
                                  + res.stderr[-4000:])
            if verbose:
                print(f"built {src.name} part {part.index}", flush=True)
            return obj

        all_parts = [Part(-1, ())] + list(parts)
        bar = tqdm(total=len(all_parts), desc=f"nvcc {name} (once; cached in {out.parent})", unit="part",
                   disable=verbose)

        def compile_counted(part: Part) -> Path:
            obj = compile_part(part)
            bar.update()
            return obj

        with ThreadPoolExecutor(max_workers=jobs or max(1, min(len(all_parts), os.cpu_count() or 1))) as pool:
            objs = list(pool.map(compile_counted, all_parts))
        bar.close()
        lib = Path(tmp) / "lib.so"
        res = subprocess.run([nvcc, "-shared", "-cudart", "shared", *ARCH_FLAGS, "-o", str(lib), *map(str, objs)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise LowbitError(f"linking {name} failed:\n{res.stderr[-4000:]}")
        os.replace(lib, out)  # atomic: a crash leaves no half-written library under the cached name
    return out


_LOADED: dict[str, ctypes.CDLL] = {}
_WORKSPACE: dict[int, "torch.Tensor"] = {}  # noqa: F821
_WORKSPACE_BYTES: dict[tuple, int] = {}


def workspace(key: tuple, query: Callable[[ctypes.c_size_t], int], what: str, device) -> "torch.Tensor":  # noqa: F821
    """A scratch buffer for one call, shared by every CUTLASS call on ``device`` (calls on one stream
    run in order; stream-K keeps partial tiles in it). ``query(size)`` is the library's workspace
    function for this call, asked once per ``key``; a non-zero status (CUTLASS's can_implement
    refused the shape) raises a LowbitError saying ``what`` cannot run."""
    import torch

    if key not in _WORKSPACE_BYTES:
        size = ctypes.c_size_t(0)
        rc = query(size)
        if rc:
            raise LowbitError(f"{what} cannot run (status {rc})")
        _WORKSPACE_BYTES[key] = size.value
    idx = device.index if device.index is not None else torch.cuda.current_device()
    buf = _WORKSPACE.get(idx)
    need = max(_WORKSPACE_BYTES[key], 16)
    if buf is None or buf.numel() < need:
        if torch.cuda.is_current_stream_capturing():
            raise LowbitError("a CUTLASS kernel's workspace must grow inside a CUDA-graph capture; run the layer "
                              "once at this batch size before capturing")
        buf = _WORKSPACE[idx] = torch.empty(need, dtype=torch.uint8, device=device)
    return buf


def reorder_int4(reorder: Callable[[int, int, int, int], int], qweight: "torch.Tensor", K: int,  # noqa: F821
                 kernel: str) -> "torch.Tensor":  # noqa: F821
    """Checkpoint-layout int4 codes ``qweight`` (N, K / 2) uint8 on a CUDA device, reordered by the
    library's ``reorder(src, dst, N, K)`` into a new (N * K / 2,) uint8 buffer (once, at load)."""
    import torch

    N = qweight.shape[0]
    if qweight.device.type != "cuda":
        raise LowbitError(f"the {kernel} kernel runs on CUDA devices only; move the weights to the GPU first")
    if qweight.dtype != torch.uint8 or tuple(qweight.shape) != (N, K // 2):
        raise LowbitError(f"qweight must be (N, K/2) = ({N}, {K // 2}) uint8, got {tuple(qweight.shape)} {qweight.dtype}")
    dst = torch.empty(N * K // 2, dtype=torch.uint8, device=qweight.device)
    return _copy(reorder, qweight.contiguous(), dst, N, K, f"reordering the {kernel} weights")


def _copy(fn: Callable[[int, int, int, int], int], src: "torch.Tensor", dst: "torch.Tensor", N: int, K: int,  # noqa: F821
          what: str) -> "torch.Tensor":  # noqa: F821
    """``fn(src, dst, N, K)``, a library copy between weight orders; it runs on the default stream, so
    the caller's pending work is waited for first. Returns ``dst``."""
    import torch

    with torch.cuda.device(src.device):
        torch.cuda.synchronize()
        rc = fn(src.data_ptr(), dst.data_ptr(), N, K)
    if rc:
        raise RuntimeError(f"{what} failed with CUDA error {rc}")
    return dst


def unreorder_int4(unreorder: Callable[[int, int, int, int], int], packed: "torch.Tensor", N: int, K: int,  # noqa: F821
                   kernel: str) -> "torch.Tensor":  # noqa: F821
    """The inverse of ``reorder_int4``: the library's ``unreorder(src, dst, N, K)`` on a reordered
    (N * K / 2,) uint8 buffer gives back the checkpoint-layout codes, (N, K / 2) uint8."""
    import torch

    if packed.device.type != "cuda" or packed.dtype != torch.uint8 or packed.numel() != N * K // 2:
        raise LowbitError(f"the {kernel} weights must be {N * K // 2} uint8 bytes on a CUDA device, got "
                          f"{packed.numel()} {packed.dtype} on {packed.device}")
    dst = torch.empty(N, K // 2, dtype=torch.uint8, device=packed.device)
    return _copy(unreorder, packed, dst, N, K, f"restoring the {kernel} weights' checkpoint order")


def load(name: str, parts: list[Part]) -> ctypes.CDLL:
    """The library for ``name``, built on first use (minutes) and loaded once per process."""
    if name not in _LOADED:
        path = build(name, parts)
        # PyTorch's CUDA runtime must be loaded first so that the library binds to the same one.
        import torch

        torch.cuda.init()
        _LOADED[name] = ctypes.CDLL(str(path))
    return _LOADED[name]
