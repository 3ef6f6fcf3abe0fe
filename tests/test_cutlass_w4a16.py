"""The CUTLASS W4A16 kernel: shape checks, build errors and configuration naming on any machine;
numerics against ``w4a16_reference`` on Hopper (with ``LOWBIT_CUTLASS_DIR`` set, since the library is
compiled from CUTLASS's headers)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.kernels import cutlass_build
from lowbit.kernels.config import CutlassConfig
from lowbit.kernels.cutlass_w4a16 import (BF16_TILES, CONFIGS, TILES, check_shape, config_index, default_config,
                                          for_dtype, parts, takes)
from lowbit.kernels.reference import w4a16_reference
from lowbit.numerics.primitives import pack_int4


@pytest.mark.parametrize("N, K, group, needle", [
    (256, 4160, 64, "K a multiple of 128"),  # measured wrong on the H200 (cutlass_w4a16's docstring)
    (136, 4096, 128, "N a multiple of 128"),
    (256, 4096, 32, "group size"),
    (256, 4096, 96, "group size"),
])
def test_shapes_it_cannot_take_are_named(N, K, group, needle):
    with pytest.raises(LowbitError, match=needle):
        check_shape(N, K, group)


def test_shapes_it_takes():
    for N, K, g in [(256, 4096, 128), (6144, 4096, 64), (128, 4224, 64), (4096, 14336, None)]:
        check_shape(N, K, g)


def test_parts_name_each_config_once():
    ps = parts()
    assert [p.index for p in ps] == list(range(len(CONFIGS)))
    assert len({p.defines for p in ps}) == len(CONFIGS) == len(TILES) + len(BF16_TILES)
    assert {d for d, _ in CONFIGS} == {"fp16", "bf16"}
    assert not any(t.stream_k for t in BF16_TILES)  # measured wrong (inf) in bf16: cutlass_w4a16.BF16_TILES
    assert all(("LB_BF16", "1" if d == "bf16" else "0") in p.defines for (d, _), p in zip(CONFIGS, ps))
    # ping-pong runs one consumer warpgroup per tile: 64-row tiles; cooperative splits 128 rows in two
    assert all(c.tile_n == (128 if c.cooperative else 64) for c in TILES)


def test_configs_are_found_by_dtype_and_tile_whatever_their_splits():
    for dtype, tiles in ((torch.float16, TILES), (torch.bfloat16, BF16_TILES)):
        seen = {config_index(dtype, dataclasses.replace(t, splits=3 if t.stream_k else 1)) for t in tiles}
        assert len(seen) == len(tiles)
    assert config_index(torch.float16, TILES[0]) != config_index(torch.bfloat16, TILES[0])
    with pytest.raises(LowbitError, match="with bf16 activations"):
        config_index(torch.bfloat16, CutlassConfig(128, 64, stream_k=True))
    # what a table tuned in fp16 names runs in bf16 on the plain tile of as many tokens
    for t in TILES:
        config_index(torch.bfloat16, for_dtype(dataclasses.replace(t, splits=2 if t.stream_k else 1), torch.bfloat16))
    with pytest.raises(LowbitError, match="fp16 or bf16"):
        config_index(torch.float32, TILES[0])
    with pytest.raises(LowbitError, match="no CUTLASS W4A16 kernel is compiled for bn128 bm8"):
        config_index(torch.float16, CutlassConfig(128, 8))
    with pytest.raises(LowbitError, match="splits"):
        CutlassConfig(128, 16, splits=2)  # splits need the stream-K scheduler


@pytest.mark.parametrize("M", [1, 2, 16, 17, 32, 33, 64, 65, 256, 257, 4096])
@pytest.mark.parametrize("N", [4096, 57344])
def test_default_config_is_compiled_and_its_tile_covers_small_batches(M, N):
    for dtype in (torch.float16, torch.bfloat16):
        cfg = default_config(M, N, dtype=dtype)
        config_index(dtype, cfg)  # raises if it is not a compiled tile
        assert cfg.tile_m >= min(M, 64) or cfg.tile_m == 256  # no 16-token tile for a batch of 100


def test_takes_names_the_constraint_it_misses():
    assert takes(4096, 4096, 128) is None and takes(4096, 14336, None) is None
    assert "N a multiple of 128" in takes(4100, 4096, 128)
    assert "group size" in takes(4096, 4096, 32)


def test_build_without_cutlass_says_what_to_set(monkeypatch, tmp_path):
    monkeypatch.delenv(cutlass_build.CUTLASS_ENV, raising=False)
    with pytest.raises(LowbitError, match=cutlass_build.CUTLASS_ENV):
        cutlass_build.cutlass_includes()
    monkeypatch.setenv(cutlass_build.CUTLASS_ENV, str(tmp_path))
    with pytest.raises(LowbitError, match="no CUTLASS headers"):
        cutlass_build.cutlass_includes()


def test_build_without_nvcc_says_so(monkeypatch):
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(LowbitError, match="nvcc"):
        cutlass_build.nvcc_path()


def test_unavailable_says_why(monkeypatch):
    monkeypatch.delenv(cutlass_build.CUTLASS_ENV, raising=False)
    assert cutlass_build.CUTLASS_ENV in cutlass_build.unavailable()


def test_build_cli_help():
    out = subprocess.run([sys.executable, "-m", "lowbit.kernels.cutlass_prebuild", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "sm_90a" in out and "--library" in out


# ---- on Hopper ----------------------------------------------------------------------------------

def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


gpu = pytest.mark.skipif(not _hopper() or not os.environ.get(cutlass_build.CUTLASS_ENV),
                         reason="needs an sm_90 GPU and LOWBIT_CUTLASS_DIR")


def _rel(y, ref):
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def _layer(N, K, group, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(-8, 8, (N, K), generator=gen, dtype=torch.int8)
    G = 1 if group is None else K // group
    scales = (torch.rand(N, G, generator=gen) * 0.02 + 1e-3).half()
    return pack_int4(codes), scales


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 3, 17, 127, 256])
@pytest.mark.parametrize("N, K, group", [(256, 512, 128), (128, 4224, 64), (384, 1024, None)])
def test_every_config_matches_the_reference(M, N, K, group, dtype):
    from lowbit.kernels.cutlass_w4a16 import pack_cutlass, w4a16_cutlass

    qw, s = _layer(N, K, group, seed=M + N)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(dtype)
    ref = w4a16_reference(x.cuda().float(), qw.cuda(), s.cuda(), None, group, K).float()
    w = pack_cutlass(qw.cuda(), s.cuda(), K, group, dtype)
    tol = 2e-3 if dtype == torch.float16 else 1e-2  # bf16: scales and output rounded to bf16
    wrong, refused = [], []
    tiles = TILES if dtype == torch.float16 else BF16_TILES
    for tile in tiles:
        for splits in ((1, 3) if tile.stream_k else (1,)):
            cfg = dataclasses.replace(tile, splits=splits)
            try:
                y = w4a16_cutlass(x.cuda(), w, cfg).float()
            except LowbitError as e:  # CUTLASS's can_implement refused the shape: named, never a wrong result
                assert "cannot run" in str(e)
                refused.append(cfg.name())
                continue
            err = ((y - ref).norm() / ref.norm()).item()
            if not err < tol:
                wrong.append((cfg.name(), splits, round(err, 4)))
    print(f"{dtype} M={M} N={N} K={K} g={group}: wrong {wrong}, refused {refused}")
    assert not wrong
    assert len(refused) < len(tiles)


@gpu
def test_graph_replay_equals_eager():
    from lowbit.kernels.cutlass_w4a16 import pack_cutlass, w4a16_cutlass

    qw, s = _layer(512, 2048, 128, seed=1)
    w = pack_cutlass(qw.cuda(), s.cuda(), 2048, 128)
    x = torch.randn(64, 2048, device="cuda", dtype=torch.float16)
    for tile in TILES:
        cfg = dataclasses.replace(tile, splits=2 if tile.stream_k else 1)
        try:
            eager = w4a16_cutlass(x, w, cfg)
        except LowbitError:
            continue
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = w4a16_cutlass(x, w, cfg)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager), cfg.name()


@gpu
def test_bad_inputs_raise():
    from lowbit.kernels.cutlass_w4a16 import pack_cutlass, w4a16_cutlass

    qw, s = _layer(256, 512, 128, seed=2)
    with pytest.raises(LowbitError, match="CUDA"):
        pack_cutlass(qw, s, 512, 128)
    w = pack_cutlass(qw.cuda(), s.cuda(), 512, 128)
    with pytest.raises(LowbitError, match="packed for torch.float16 activations"):
        w4a16_cutlass(torch.randn(4, 512, device="cuda"), w)
    with pytest.raises(LowbitError, match="packed for torch.float16 activations"):
        w4a16_cutlass(torch.randn(4, 512, device="cuda", dtype=torch.bfloat16), w)
    with pytest.raises(LowbitError, match="features"):
        w4a16_cutlass(torch.randn(4, 256, device="cuda").half(), w)


@gpu
@pytest.mark.parametrize("N, K, group", [(256, 512, 128), (6144, 4096, 128), (4096, 14336, None)])
def test_unpack_gives_back_the_checkpoint_bytes(N, K, group):
    """The inverse reordering: what a loaded layer saves (state_dict, export) is the checkpoint's qweight."""
    from lowbit.kernels.cutlass_w4a16 import pack_cutlass, unpack_cutlass

    qw, s = _layer(N, K, group, seed=N)
    w = pack_cutlass(qw.cuda(), s.cuda(), K, group)
    assert not torch.equal(w.qweight.view(N, K // 2).cpu(), qw)  # reordered
    assert torch.equal(unpack_cutlass(w).cpu(), qw)


@gpu
@pytest.mark.parametrize("M", [1, 17, 300])
def test_bf16_kernels_match_the_reference_and_add_the_bias(M):
    from lowbit.kernels.cutlass_w4a16 import pack_cutlass, w4a16_cutlass

    N, K, group = 384, 1024, 128
    qw, s = _layer(N, K, group, seed=M)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(N, device="cuda", dtype=torch.bfloat16)
    ref = w4a16_reference(x.float(), qw.cuda(), s.cuda(), None, group, K).float() + bias.float()
    w = pack_cutlass(qw.cuda(), s.cuda(), K, group, torch.bfloat16)
    y = w4a16_cutlass(x, w, bias=bias)
    assert y.dtype == torch.bfloat16
    assert ((y.float() - ref).norm() / ref.norm()).item() < 1e-2  # bf16 scales and output


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layers_of_a_cutlass_table_run_the_cutlass_kernel_and_match_the_rows_path(dtype, use_kernel_table, monkeypatch):
    """A table naming weight order "cutlass" at a shape packs W4A16 layers of that shape as CutlassInt4
    for the model's dtype; they give what the rows path gives, keep one copy of their int4 weights and
    rebuild the checkpoint's qweight exactly. Layers it refuses (asymmetric codes, no dtype given) take
    the rows or fragment order."""
    from lowbit.formats import ActivationFormat, WeightFormat
    from lowbit.kernels.cutlass_w4a16 import CutlassInt4
    from lowbit.model.qlinear import QuantLinear
    from lowbit.quant.gptq import rtn_quantize

    g = torch.Generator().manual_seed(0)

    def layer(K, symmetric=True):
        fmt = WeightFormat(bits=4, group_size=128, symmetric=symmetric, method="rtn")
        return QuantLinear.from_quantized(rtn_quantize(torch.randn(256, K, generator=g), fmt), ActivationFormat(),
                                          in_features=K, dtype=dtype, bias=torch.randn(256, generator=g)).cuda()

    use = use_kernel_table
    cfg = CutlassConfig(128, 64, stream_k=True, splits=2).as_dict()

    def cutlass_at(N, K):
        return {"weight_order": {"w4a16": {"default": "rows", "shapes": [{"N": N, "K": K, "order": "cutlass"}]}},
                "entries": {"w4a16": [{"N": N, "K": K, "M": 64, "order": "cutlass", "kernel": "cutlass",
                                       "us": 1.0, "config": cfg}]}}

    # refused: K = 576 (not a multiple of 128), asymmetric codes; they keep a Triton/Gluon order
    use(cutlass_at(256, 576))
    narrow = layer(576)
    assert narrow.prepare_kernels(dtype) and not isinstance(narrow.kernel, CutlassInt4)
    asym = layer(1024, symmetric=False)
    use(cutlass_at(256, 1024))
    assert asym.prepare_kernels(dtype) and not isinstance(asym.kernel, CutlassInt4)

    lin = layer(1024)
    qweight = lin.qweight.clone()
    use({"entries": {}})
    assert lin.prepare_kernels(dtype)
    xs = [torch.randn(M, 1024, device="cuda", dtype=dtype) for M in (1, 17, 300)]
    want = [lin(x) for x in xs]
    use(cutlass_at(256, 1024))
    assert lin.prepare_kernels(dtype) and isinstance(lin.kernel, CutlassInt4) and lin.kernel.dtype == dtype
    tol = 2e-3 if dtype == torch.float16 else 1e-2
    for x, ref in zip(xs, want):
        y = lin(x)
        assert y.dtype == dtype and ((y.float() - ref.float()).norm() / ref.float().norm()).item() < tol
    assert lin.release_checkpoint_layout() > 0
    assert torch.equal(lin.state_dict()["qweight"], qweight)
    # without the model's dtype the CUTLASS order is not chosen
    lin.kernel_dtype = None
    assert lin.prepare_kernels() and not isinstance(lin.kernel, CutlassInt4)
    # where CUTLASS cannot be built (no LOWBIT_CUTLASS_DIR), the layer runs the other kernels, said once
    from lowbit.methods import int4_dense

    monkeypatch.delenv(cutlass_build.CUTLASS_ENV)
    monkeypatch.setattr(int4_dense, "_NOTED", set())  # said once per process: another test may have said it
    with pytest.warns(UserWarning, match="cannot be built here"):
        assert lin.prepare_kernels(dtype) and not isinstance(lin.kernel, CutlassInt4)
    assert _rel(lin(xs[1]), want[1]) < tol
