"""The pipelined Gluon wgmma kernels (W4A16, W4A8 int8): sm_90a PTX on any machine, errors, numerics on Hopper."""

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
from lowbit.kernels.layout import FRAG_BASES, FragmentInt4  # noqa: E402
from lowbit.kernels.mixed_wgmma import default_wgmma_config, w4a8_mixed_wgmma, w4a16_mixed_wgmma  # noqa: E402
from lowbit.kernels.reference import w4a8_reference, w4a16_reference  # noqa: E402
from tests.test_kernels import _rel, _weights  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

# compiled in a process of its own: conftest turns on Triton's interpreter here, and the kernel must
# be a JITFunction to be compiled; tensors stay on the CPU (record_launches(launch=False))
_COMPILE = """
import json, re, sys, torch
from lowbit.bench.kernels import _random_int4
from lowbit.kernels.aot import compile_launch, ptx_summary, ptxas_report
from lowbit.kernels.config import TileConfig
from lowbit.kernels.launch import record_launches
from lowbit.kernels.mixed_wgmma import w4a8_mixed_wgmma, w4a16_mixed_wgmma
out = []
from lowbit.kernels.layout import FragmentInt4
for int8, group, bm, bn, warps, stages, split, frag, bk in json.loads(sys.argv[1]):
    w = _random_int4(300, 1280, group, torch.device("cpu"), 128)
    if frag:
        w = FragmentInt4.from_packed(w, int8)
    cfg = TileConfig(bm, bn, block_k=bk, num_warps=warps, num_stages=stages, split_k=split)
    with record_launches(launch=False) as rec:
        if int8:
            w4a8_mixed_wgmma(torch.ones(37, 1280, dtype=torch.int8), torch.ones(37), w, torch.float16, config=cfg)
        else:
            w4a16_mixed_wgmma(torch.randn(37, 1280, dtype=torch.float16), w, config=cfg)
    (kernel, grid, args, kwargs), = rec
    ptx = compile_launch(kernel, args, kwargs).asm["ptx"]
    shared = sorted(set(re.findall(r"ld\\.shared[.a-z0-9]*", ptx)))
    out.append(dict(grid=list(grid), summary=ptx_summary(ptx), ptxas=ptxas_report(ptx), shared=shared))
print(json.dumps(out))
"""


def test_ptx_pipelines_wgmma_behind_cp_async_without_serializing():
    """fp16 grouped and per channel, int8 per channel, with and without split-K, one or two tiles per
    copy group: wgmma of the weight tile's 64-row side, cp.async copies, one wait keeping a tile's MMAs
    in flight (2) and the final one (0), and ptxas neither serializes the wgmmas (C7515, what one tile
    per loop iteration caused) nor spills registers at these tiles."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cases = [[False, 128, 64, 128, 8, 4, 1, False, 128], [False, None, 128, 128, 8, 4, 1, False, 128],
             [True, None, 128, 128, 8, 4, 1, False, 128], [False, 128, 32, 64, 4, 6, 4, False, 128],
             [True, None, 32, 64, 4, 6, 4, False, 128], [False, 128, 64, 128, 8, 4, 1, True, 128],
             [True, None, 64, 128, 8, 4, 1, True, 128], [False, 128, 32, 64, 4, 4, 2, True, 128],
             [False, 128, 32, 128, 8, 3, 1, True, 256], [True, None, 32, 128, 8, 3, 1, True, 256]]
    run = subprocess.run([sys.executable, "-c", _COMPILE, json.dumps(cases)], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    for (int8, _, bm, bn, _, _, split, frag, bk), r in zip(cases, got):
        assert r["grid"] == [-(-37 // bm), -(-300 // bn), split]
        k = 32 if int8 else 16
        assert r["summary"]["mma"].startswith(f"wgmma m64n{bm}k{k}"), r
        # 3 inlined tiles (a peeled one, two per iteration), or 2 with two tiles per copy group; one final wait
        assert r["summary"]["wgmma waits"] == ("0:x1 2:x3" if bk == 128 else "0:x1 2:x2"), r
        assert int(r["summary"]["cp.async"]) > 0, r
        if frag:  # the fragment order's point: 16-byte shared loads of the weights, no byte-wise ones
            assert "ld.shared.v4.b32" in r["shared"], r
            assert not [s for s in r["shared"] if s.endswith(("8", "16"))], r
        if r["ptxas"] is not None:
            assert r["ptxas"]["error"] is None, r  # ptxas itself failed: its message says why
            assert not r["ptxas"]["serialized"], r
            assert r["ptxas"]["spilled"] == 0, r


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("N, K", [(300, 640), (16, 128), (33, 1000)])
def test_fragment_order_holds_every_byte_where_its_bases_say(int8, N, K):
    """FragmentInt4 is a permutation of PackedInt4's bytes: byte (16g + r, tile t, j) sits at the
    offset of g, t and the FRAG_BASES bits that sum to (r, j); rows past N are zero; ``to_packed``
    gives PackedInt4's bytes back exactly."""
    _, _, _, p = _weights(N, K, None, seed=N)
    f = FragmentInt4.from_packed(p, int8)
    n_tiles = p.Kp // 128
    assert f.qweight.shape == (-(-N // 16), n_tiles * 1024) and f.N == N and f.Kp == p.Kp and f.int8 == int8
    q = f.qweight.view(-1, n_tiles, 1024)
    rows = torch.nn.functional.pad(p.qweight, (0, 0, 0, -N % 16))
    gen = torch.Generator().manual_seed(K)
    for off in torch.randint(0, 1024, (64,), generator=gen).tolist() + [0, 1023]:
        r = sum(dr for b, (dr, _) in enumerate(FRAG_BASES[int8]) if off >> b & 1)
        j = sum(dj for b, (_, dj) in enumerate(FRAG_BASES[int8]) if off >> b & 1)
        for g in range(q.shape[0]):
            for t in range(n_tiles):
                assert q[g, t, off] == rows[16 * g + r, 64 * t + j]
    assert sorted(q.flatten().tolist()) == sorted(rows.flatten().tolist())
    back = f.to_packed()
    assert torch.equal(back.qweight, p.qweight) and back.K == p.K and back.tile_k == p.tile_k


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("N, K, group, symmetric", [(37, 200, None, True), (64, 384, 128, False), (50, 256, 64, True)])
def test_widening_reads_the_fragment_order_in_place(int8, N, K, group, symmetric):
    """widen_int4 on a FragmentInt4 (the large-M dequant-cublas path, no repacking into rows first)
    writes exactly what it writes from the PackedInt4 the fragment order came from: fp16 and bf16
    weights, and int8 codes for per-channel weights; N not a multiple of 16, K not one of 128."""
    from lowbit.kernels.widen import widen_int4

    _, _, _, p = _weights(N, K, group, symmetric, seed=N + K)
    f = FragmentInt4.from_packed(p, int8)
    for dtype in (torch.float16, torch.bfloat16) + ((torch.int8,) if group is None else ()):
        got, want = widen_int4(f, dtype), widen_int4(p, dtype)
        assert got.shape == (N, K) and got.dtype == dtype
        assert torch.equal(got, want), dtype


def test_errors_name_what_the_kernel_takes():
    _, _, _, p = _weights(64, 256, 128)
    x = torch.randn(3, 256, dtype=torch.float16, device=p.qweight.device)
    with pytest.raises(LowbitError, match="fp16 or bf16 activations"):
        w4a16_mixed_wgmma(x.float(), p)
    _, _, _, p32 = _weights(64, 256, 32)
    with pytest.raises(LowbitError, match="multiple of 64"):
        w4a16_mixed_wgmma(x, p32)
    _, _, _, p256 = _weights(64, 256, 128, tile_k=256)
    with pytest.raises(LowbitError, match="128-column tiles"):
        w4a16_mixed_wgmma(x, p256)
    with pytest.raises(LowbitError, match="multiple of 16 x num_warps"):
        w4a16_mixed_wgmma(x, p, config=TileConfig(block_m=64, block_n=64, num_warps=8))
    with pytest.raises(LowbitError, match="num_stages >= 2"):
        w4a16_mixed_wgmma(x, p, config=TileConfig(block_m=64, block_n=64, num_stages=1))
    with pytest.raises(LowbitError, match=r"must be \(M, 256\)"):
        w4a16_mixed_wgmma(x[:, :128], p)
    xq = torch.ones(3, 256, dtype=torch.int8, device=p.qweight.device)
    with pytest.raises(LowbitError, match="per-channel"):
        w4a8_mixed_wgmma(xq, torch.ones(3, device=xq.device), p, torch.float16)
    _, _, _, pc = _weights(64, 256, None)
    with pytest.raises(LowbitError, match="x_scale must be"):
        w4a8_mixed_wgmma(xq, torch.ones(3, device=xq.device).half(), pc, torch.float16)


def test_default_config_splits_k_only_when_tiles_are_few():
    small = default_wgmma_config(32, 4096, 14336, 132)  # 8B down at M = 32: 32 output tiles
    assert small.block_m == 32 and small.split_k > 1
    big = default_wgmma_config(256, 28672, 4096, 132)  # 8B gate+up at M = 256: 448 tiles
    assert big.block_m == 128 and big.split_k == 1


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


_CONFIGS = (TileConfig(block_m=128, block_n=128, num_warps=8, num_stages=4),
            TileConfig(block_m=64, block_n=64, num_warps=4, num_stages=3, split_k=3),
            TileConfig(block_m=32, block_n=128, num_warps=8, num_stages=6, split_k=2),
            TileConfig(block_m=16, block_n=64, num_warps=4, num_stages=2),
            # two tiles per copy group: odd tile counts end on a tile past K (zero activations)
            TileConfig(block_m=32, block_n=128, block_k=256, num_warps=8, num_stages=3, split_k=2),
            TileConfig(block_m=64, block_n=64, block_k=256, num_warps=4, num_stages=2, split_k=3))


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="wgmma needs a Hopper GPU")
@pytest.mark.parametrize("M", [1, 3, 17, 127, 200])
@pytest.mark.parametrize("K, group, symmetric", [(640, None, True), (300, 128, True), (520, 64, False),
                                                 (1000, None, False)])
@pytest.mark.parametrize("frag", [False, True])
def test_w4a16_matches_reference_on_hopper(M, K, group, symmetric, frag):
    N = 300  # not a multiple of the N tile
    qw, s, z, p = _weights(N, K, group, symmetric, seed=M + K)
    if frag:
        p = FragmentInt4.from_packed(p, int8=False)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).cuda().half()
    ref = w4a16_reference(x, qw, s, z, group, K)
    bias = torch.randn(N, device="cuda", dtype=torch.float16)
    for cfg in _CONFIGS:
        y = w4a16_mixed_wgmma(x, p, config=cfg)
        assert y.shape == (M, N) and y.dtype == torch.float16
        assert _rel(y, ref) < 2e-3, cfg
        yb = w4a16_mixed_wgmma(x, p, bias, config=cfg)  # the bias once, also when K is split
        assert _rel(yb, ref.float() + bias.float()) < 2e-3, cfg
    assert _rel(w4a16_mixed_wgmma(x, p), ref) < 2e-3  # the default tile


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="wgmma needs a Hopper GPU")
@pytest.mark.parametrize("M", [3, 127])
@pytest.mark.parametrize("group", [128, None])
def test_w4a16_bf16_matches_reference_on_hopper(M, group):
    N, K = 300, 520
    qw, s, z, p = _weights(N, K, group, False, seed=M)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).cuda().bfloat16()
    ref = w4a16_reference(x, qw, s, z, group, K)
    for w in (p, FragmentInt4.from_packed(p, int8=False)):
        for cfg in _CONFIGS:
            y = w4a16_mixed_wgmma(x, w, config=cfg)
            assert y.dtype == torch.bfloat16
            # bf16 products, and group scales rounded to bf16 in the operand (8 bits: 2e-3 each)
            assert _rel(y, ref) < 8e-3, cfg


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="wgmma needs a Hopper GPU")
@pytest.mark.parametrize("M", [1, 17, 127, 200])
@pytest.mark.parametrize("K, symmetric", [(640, True), (1000, False)])
@pytest.mark.parametrize("frag", [False, True])
def test_w4a8_int8_matches_reference_on_hopper(M, K, symmetric, frag):
    from lowbit.kernels.act_quant import quantize_activations

    N = 300
    qw, s, z, p = _weights(N, K, None, symmetric, seed=M + K)
    if frag:
        p = FragmentInt4.from_packed(p, int8=True)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).cuda().half()
    xq, xs = quantize_activations(x, "int")
    ref = w4a8_reference(xq, xs, qw, s, z, None, K, torch.float16)
    bias = torch.randn(N, device="cuda", dtype=torch.float16)
    for cfg in _CONFIGS:
        y = w4a8_mixed_wgmma(xq, xs, p, torch.float16, config=cfg)
        assert y.shape == (M, N) and y.dtype == torch.float16
        # int32 accumulation is exact: only the fp32 epilogue and the fp16 output round
        assert _rel(y, ref) < 1e-3, cfg
        yb = w4a8_mixed_wgmma(xq, xs, p, torch.float16, bias, config=cfg)
        assert _rel(yb, ref.float() + bias.float()) < 1e-3, cfg


def test_fragment_op_reference_equals_the_rows_op_on_cpu():
    """lowbit::w4a16_frag on the CPU (the reference through ``to_packed``) gives lowbit::w4a16's output
    bit for bit, and its schema and fake pass opcheck."""
    from lowbit.kernels import ops

    from lowbit.kernels.layout import pack_for_kernels

    qw, sc, z, _ = _weights(300, 640, 128, symmetric=False, seed=3)
    p = pack_for_kernels(qw.cpu(), sc.cpu(), z.cpu(), 128, 640)  # on the CPU also where a GPU is
    f = FragmentInt4.from_packed(p, int8=False)
    x = torch.randn(5, 640, dtype=torch.float16)
    bias = torch.randn(300, dtype=torch.float16)
    rows = ops.w4a16(x, p.qweight, p.scales, p.zeros, None, bias, 128, 640, 128)
    frag = ops.w4a16_frag(x, f.qweight, f.scales, f.zeros, bias, 128, 640, 300)
    assert torch.equal(rows, frag)
    torch.library.opcheck(ops.w4a16_frag, (x, f.qweight, f.scales, f.zeros, bias, 128, 640, 300))


def test_table_weight_order_is_checked(tmp_path, monkeypatch):
    from lowbit.kernels import dispatch

    table = tmp_path / "t.json"
    table.write_text(json.dumps({"weight_order": {"w4a16": "columns"}, "entries": {}}))
    monkeypatch.setenv("LOWBIT_KERNEL_TABLE", str(table))
    dispatch.load_table.cache_clear()
    assert dispatch.weight_order(torch.device("cpu"), "w4a16") == "rows"  # the CPU: always rows
    if torch.cuda.is_available():
        with pytest.raises(LowbitError, match="weight order 'columns'"):
            dispatch.weight_order(torch.device("cuda"), "w4a16")


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="wgmma needs a Hopper GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layers_of_a_fragment_table_run_the_wgmma_kernel_and_match_the_rows_path(dtype, tmp_path, monkeypatch):
    """A table naming weight_order "fragment" for w4a16 packs W4A16 layers as FragmentInt4; they give
    what the rows path gives, keep one copy of their int4 weights, and rebuild the checkpoint's qweight
    exactly. A layer the wgmma kernel does not take keeps the rows and runs the Triton kernel."""
    from lowbit.formats import ActivationFormat, WeightFormat
    from lowbit.kernels import dispatch
    from lowbit.model.qlinear import QuantLinear
    from lowbit.quant.gptq import rtn_quantize

    g = torch.Generator().manual_seed(0)
    layer = QuantLinear.from_quantized(rtn_quantize(torch.randn(200, 384, generator=g),
                                                    WeightFormat(bits=4, group_size=128, method="rtn")),
                                       ActivationFormat(), in_features=384, dtype=dtype,
                                       bias=torch.randn(200, generator=g)).cuda()
    qweight = layer.qweight.clone()
    # first with a table that names no weight order (the shipped H200 table names "fragment")
    rows_table = tmp_path / "rows.json"
    rows_table.write_text(json.dumps({"entries": {}}))
    monkeypatch.setenv("LOWBIT_KERNEL_TABLE", str(rows_table))
    dispatch.load_table.cache_clear()
    dispatch._choose_cached.cache_clear()
    assert layer.prepare_kernels()
    rows_kernel = layer.kernel
    xs = [torch.randn(M, 384, device="cuda", dtype=dtype) for M in (1, 17, 300)]
    want = [layer(x) for x in xs]
    table = tmp_path / "frag.json"
    # one entry, for every M up to 2048: the wgmma kernel at a tile the Triton kernel could not take
    cfg = dict(block_m=64, block_n=256, block_k=128, split_k=2, num_warps=8, num_stages=4, swap=False)
    table.write_text(json.dumps({"weight_order": {"w4a16": "fragment"}, "entries": {"w4a16": [
        {"N": 200, "K": 384, "M": 512, "kernel": "wgmma", "us": 1.0, "config": cfg}]}}))
    monkeypatch.setenv("LOWBIT_KERNEL_TABLE", str(table))
    dispatch.load_table.cache_clear()
    dispatch._choose_cached.cache_clear()
    assert layer.prepare_kernels()
    assert isinstance(layer.kernel, FragmentInt4) and not isinstance(rows_kernel, FragmentInt4)
    tol = 2e-3 if dtype == torch.float16 else 1e-2  # bf16: scales rounded to bf16 in the operand
    for x, ref in zip(xs, want):
        assert _rel(layer(x), ref) < tol
    assert layer.release_checkpoint_layout() > 0
    assert torch.equal(layer.state_dict()["qweight"], qweight)
    # groups of 32: the wgmma kernel does not take them; the layer keeps the rows and the table's
    # wgmma entries fall back to the Triton kernel
    small = QuantLinear.from_quantized(rtn_quantize(torch.randn(200, 384, generator=g),
                                                    WeightFormat(bits=4, group_size=32, method="rtn")),
                                       ActivationFormat(), in_features=384, dtype=dtype).cuda()
    ref = small(xs[1])
    assert small.prepare_kernels() and not isinstance(small.kernel, FragmentInt4)
    assert _rel(small(xs[1]), ref) < tol
