"""The Gluon W4A16 wgmma kernel: its sm_90a PTX on any machine, its errors, its numerics on a Hopper GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from lowbit.errors import LowbitError  # noqa: E402
from lowbit.kernels.config import TileConfig  # noqa: E402
from lowbit.kernels.reference import w4a16_reference  # noqa: E402
from lowbit.kernels.w4a16_wgmma import w4a16_wgmma_matmul  # noqa: E402
from tests.test_kernels import _rel, _weights  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

# compiled in a process of its own: conftest turns on Triton's interpreter here, and the kernel must
# be a JITFunction to be compiled; tensors stay on the CPU (record_launches(launch=False))
_COMPILE = """
import json, sys, torch
from lowbit.bench.kernels import _random_int4
from lowbit.kernels.aot import compile_launch, mma_overlap, ptx_summary, ptxas_usage
from lowbit.kernels.config import TileConfig
from lowbit.kernels.launch import record_launches
from lowbit.kernels.w4a16_wgmma import w4a16_wgmma_matmul
out = []
for group, bm, bn, warps, vec_w in json.loads(sys.argv[1]):
    w = _random_int4(300, 640, group, torch.device("cpu"), 128)
    with record_launches(launch=False) as rec:
        w4a16_wgmma_matmul(torch.randn(37, 640, dtype=torch.float16), w, config=TileConfig(bm, bn, num_warps=warps),
                           vec_w=vec_w)
    (kernel, grid, args, kwargs), = rec
    ptx = compile_launch(kernel, args, kwargs).asm["ptx"]
    regs, spilled = ptxas_usage(ptx)
    out.append(dict(grid=list(grid), summary=ptx_summary(ptx), overlap=mma_overlap(ptx), regs=regs, spilled=spilled))
print(json.dumps(out))
"""


def test_ptx_issues_wgmma_and_overlaps_the_next_tile_with_it():
    """Per channel (128 x 128 tile, 8 warps) and grouped (64 x 128, 4 warps), both weight-load designs:
    wgmma with the weight tile as the 64-row side, one wait per K step, and between a step's last MMA
    and that wait the next tile's global loads and its int4 -> fp16 conversion (``mma_overlap``: the
    magic-number conversion is OR then add, on b16); no register spills."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cases = [[None, 128, 128, 8, True], [128, 64, 128, 4, True], [None, 128, 128, 8, False]]
    run = subprocess.run([sys.executable, "-c", _COMPILE, json.dumps(cases)], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    for (group, bm, bn, _, _), r in zip(cases, got):
        assert r["grid"] == [-(-37 // bm), -(-300 // bn)]
        assert r["summary"]["mma"].startswith(f"wgmma m64n{bm}k16"), r
        assert r["summary"]["wgmma waits"] == "0:x1", r  # one wait, in the K loop
        assert r["overlap"]["ld.global"] > 0 and r["overlap"]["or.b16"] > 0 and r["overlap"]["add.f16"] > 0, r
        if r["spilled"] is not None:
            assert r["spilled"] == 0, r


def test_errors_name_what_the_kernel_takes():
    _, _, _, p = _weights(64, 256, 128)
    x = torch.randn(3, 256, dtype=torch.float16, device=p.qweight.device)
    with pytest.raises(LowbitError, match="fp16 activations"):
        w4a16_wgmma_matmul(x.bfloat16(), p)
    _, _, _, p32 = _weights(64, 256, 32)
    with pytest.raises(LowbitError, match="multiple of 64"):
        w4a16_wgmma_matmul(x, p32)
    _, _, _, p256 = _weights(64, 256, 128, tile_k=256)
    with pytest.raises(LowbitError, match="128-column tiles"):
        w4a16_wgmma_matmul(x, p256)
    with pytest.raises(LowbitError, match="block_n >= 16 x num_warps"):
        w4a16_wgmma_matmul(x, p, config=TileConfig(block_m=64, block_n=64, num_warps=8))
    with pytest.raises(LowbitError, match=r"must be \(M, 256\)"):
        w4a16_wgmma_matmul(x[:, :128], p)


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="wgmma needs a Hopper GPU")
@pytest.mark.parametrize("M", [1, 3, 17, 127, 200])
@pytest.mark.parametrize("K, group, symmetric", [(640, None, True), (300, 128, True), (520, 64, False),
                                                 (256, None, False)])
def test_matches_reference_on_hopper(M, K, group, symmetric):
    N = 300  # not a multiple of the N tile
    qw, s, z, p = _weights(N, K, group, symmetric, seed=M + K)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).cuda().half()
    ref = w4a16_reference(x, qw, s, z, group, K)
    for cfg in (TileConfig(block_m=128, block_n=128, num_warps=8), TileConfig(block_m=64, block_n=64, num_warps=4),
                TileConfig(block_m=32, block_n=128, num_warps=4)):
        for vec_w in (True, False):
            y = w4a16_wgmma_matmul(x, p, config=cfg, vec_w=vec_w)
            assert y.shape == (M, N) and y.dtype == torch.float16
            assert _rel(y, ref) < 2e-3, (cfg, vec_w)
    bias = torch.randn(N, device="cuda", dtype=torch.float16)
    y = w4a16_wgmma_matmul(x, p, bias)
    assert _rel(y, ref.float() + bias.float()) < 2e-3


def test_bench_times_it_only_when_named():
    from lowbit.bench.kernels import parse_paths

    assert "w4a16-wgmma" not in parse_paths(None)
    assert parse_paths("w4a16,w4a16-wgmma") == ["fp16", "w4a16", "w4a16-wgmma"]
