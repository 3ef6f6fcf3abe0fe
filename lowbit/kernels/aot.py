"""Compile a recorded kernel launch for a GPU this machine need not have, and read its PTX.

``kernels.launch.record_launches(launch=False)`` collects what a wrapper would launch; ``compile_launch``
compiles one such launch ahead of time for sm_90a (H100/H200) with the specialization Triton's JIT
would give its arguments (``native_specialize_impl``, the function the JIT's binder calls), so the
PTX is the one the GPU would run. ``scripts/kernel_ptx.py`` prints it per table tile; the tests check
structural facts of a kernel's PTX (``mma_overlap``) on CPU-only machines.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

from lowbit.errors import LowbitError
from lowbit.requirements import require_triton

require_triton()
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import native_specialize_impl  # noqa: E402

_OPTIONS = ("num_warps", "num_stages", "launch_pdl", "num_ctas", "maxnreg")
HOPPER = GPUTarget("cuda", 90, 32)


def compile_launch(kernel, args: tuple, kwargs: dict, target: GPUTarget = HOPPER):  # noqa: ANN001, ANN201
    """The ``CompiledKernel`` the JIT would build for ``kernel[grid](*args, **kwargs)`` on ``target``.
    ``kernel`` must be a JITFunction (run without ``TRITON_INTERPRET=1``); tensors may be on the CPU."""
    sig, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(kernel.params):
        if i < len(args):
            if p.is_constexpr:
                sig[p.name], constexprs[(i,)] = "constexpr", args[i]
                continue
            ty, key = native_specialize_impl(CUDABackend, args[i], p.is_const, True, True)
            sig[p.name] = ty
            if ty == "constexpr":
                constexprs[(i,)] = key
            elif key == "D":
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[p.name] = "constexpr"
            constexprs[(i,)] = kwargs.get(p.name, p.default)
    options = {k: v for k, v in kwargs.items() if k in _OPTIONS}
    if kernel.is_gluon():
        from triton.experimental.gluon._runtime import GluonASTSource

        src = GluonASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
    else:
        src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=target, options=options)


def ptxas_report(ptx: str, arch: str = "sm_90a") -> dict | None:
    """What ``ptxas -v`` (Triton's bundled ptxas, else one on PATH) says of a kernel: registers per
    thread, bytes spilled, and whether it serialized the wgmmas (warning C7515: an instruction other
    than a wgmma writes registers an in-flight wgmma uses); None without a ptxas."""
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    exe = str(ptxas) if ptxas.is_file() else shutil.which("ptxas")
    if not exe:
        return None
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "k.ptx"
        f.write_text(ptx)
        out = subprocess.run([exe, "--gpu-name", arch, "-v", str(f), "-o", str(Path(d) / "k.o")],
                             capture_output=True, text=True)
    text = out.stderr + out.stdout
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores", text)
    # ptxas's own failure (e.g. a PTX version newer than it) is reported, not read as "no data"
    error = None if out.returncode == 0 else f"{exe} exited {out.returncode}: {text.strip()[-400:]}"
    return dict(regs=int(regs.group(1)) if regs else None, spilled=int(spill.group(1)) if spill else None,
                serialized="C7515" in text, error=error)


def ptxas_usage(ptx: str, arch: str = "sm_90a") -> tuple[int | None, int | None]:
    """(registers per thread, bytes spilled) from ``ptxas_report``; (None, None) without a ptxas. Raises
    LowbitError where ptxas failed."""
    r = ptxas_report(ptx, arch)
    if r is not None and r["error"]:
        raise LowbitError(r["error"])
    return (None, None) if r is None else (r["regs"], r["spilled"])


def ptx_summary(ptx: str) -> dict[str, str]:
    """The MMA instructions, ``wgmma.wait_group`` depths, cp.async and TMA counts of a kernel's PTX."""
    shapes = Counter(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx))
    waits = Counter(re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+)", ptx))
    return {
        "mma": (" ".join(f"wgmma {s} x{n}" for s, n in shapes.items()) or
                (f"mma.sync x{len(re.findall(r'mma.sync', ptx))}" if "mma.sync" in ptx else "none")),
        "wgmma waits": " ".join(f"{k}:x{v}" for k, v in sorted(waits.items())) or "-",
        "cp.async": str(len(re.findall(r"cp\.async\.(?:ca|cg)", ptx))),
        "TMA": str(len(re.findall(r"cp\.async\.bulk", ptx))),
    }


def mma_overlap(ptx: str) -> dict[str, int]:
    """Counts of what the PTX issues between the last ``wgmma.mma_async`` before the first
    ``wgmma.wait_group`` and that wait: work that runs while the tensor cores do (global loads;
    conversions: ``cvt``, or the magic-number int4 -> fp16 steps ``or.b16`` and ``add.f16``)."""
    lines = [ln.strip() for ln in ptx.splitlines()]
    waits = [i for i, ln in enumerate(lines) if ln.startswith("wgmma.wait_group")]
    counts = {"waits": len(waits), "ld.global": 0, "cvt": 0, "or.b16": 0, "add.f16": 0}
    if not waits:
        return counts
    mmas = [i for i, ln in enumerate(lines[:waits[0]]) if ln.startswith("wgmma.mma_async")]
    for ln in lines[mmas[-1] + 1:waits[0]] if mmas else []:
        for op in ("ld.global", "cvt", "or.b16", "add.f16"):
            counts[op] += ln.startswith(op)
    return counts
