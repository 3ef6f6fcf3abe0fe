"""Print what Triton made of each kernel on this GPU: registers, spills, shared memory, and the
instructions that matter for a memory-bound GEMM (async copies, vector loads, MMA kinds, local memory).

    python scripts/kernel_asm.py          (on the device machine; METHOD.md's "look at the SASS")
"""

from __future__ import annotations

import re

import torch

from lowbit.bench.kernels import _random_int4
from lowbit.kernels.act_quant import quantize_activations
from lowbit.kernels.config import TileConfig
from lowbit.kernels.w4a8 import _w4a8_kernel, w4a8_matmul
from lowbit.kernels.w4a16 import _w4a16_kernel, w4a16_matmul
from lowbit.kernels.w8a8 import _w8a8_kernel, w8a8_matmul


def sass_histogram(cubin: bytes, top: int = 28) -> str:
    """Opcode counts of the kernel's SASS (nvdisasm), most frequent first."""
    import collections
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(["nvdisasm", "-c", f.name], capture_output=True, text=True, check=True).stdout
    ops = collections.Counter()
    for line in text.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", line)
        if m:
            ops[m.group(1).split(".")[0]] += 1
    return " ".join(f"{op}={n}" for op, n in ops.most_common(top))


def report(name: str, kernel) -> None:
    for k in list(kernel.device_caches[0][0].values()):
        ttgir, ptx = k.asm.get("ttgir", ""), k.asm.get("ptx", "")
        counts = {
            "async_copy(ttgir)": ttgir.count("async_copy_global_to_local"),
            "tma(ttgir)": ttgir.count("async_tma_copy"),
            "ld.global.v4": len(re.findall(r"ld\.global[.\w]*\.v4", ptx)),
            "ld.global": len(re.findall(r"ld\.global", ptx)),
            "cp.async": ptx.count("cp.async"),
            "wgmma": ptx.count("wgmma.mma_async"),
            "mma.sync": ptx.count("mma.sync"),
            "ld.local": ptx.count("ld.local"),
            "cvt": ptx.count("cvt."),
            "lop3": ptx.count("lop3"),
        }
        print(f"{name}: regs {k.n_regs} spills {k.n_spills} smem {k.metadata.shared} | "
              + " ".join(f"{a}={b}" for a, b in counts.items()), flush=True)
        print("   SASS opcodes:", sass_histogram(k.asm["cubin"]), flush=True)


def main() -> None:
    dev = torch.device("cuda")
    N, K = 28672, 4096
    p = _random_int4(N, K, 128, dev, 128)
    x = torch.randn(16, K, device=dev, dtype=torch.float16)
    w4a16_matmul(x[:1], p, config=TileConfig(16, 128, 128, 2, 4, 4))
    report("w4a16 (x as A, mma.sync)", _w4a16_kernel)
    xq, xs = quantize_activations(x, "int")
    w4a8_matmul(xq, xs, _random_int4(N, K, None, dev, 128), torch.float16, config=TileConfig(16, 128, 128, 1, 4, 4, swap=True))
    report("w4a8 int8 swap", _w4a8_kernel)
    xq8, xs8 = quantize_activations(x, "fp8_e4m3")
    wq = torch.randn(N, K, device=dev).to(torch.float8_e4m3fn)
    w8a8_matmul(xq8, xs8, wq, torch.ones(N, device=dev), torch.float16, config=TileConfig(16, 64, 128, 1, 4, 4, swap=True))
    report("w8a8 fp8 swap", _w8a8_kernel)


if __name__ == "__main__":
    main()
