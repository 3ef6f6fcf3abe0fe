"""The W4A16 GEMV over FragmentInt4 (lowbit.kernels.gemv_frag): numerics against the reference (Triton's
interpreter in CI, the GPU where there is one), errors, and its place in run_w4a16."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from lowbit.errors import LowbitError  # noqa: E402
from lowbit.kernels.config import TileConfig  # noqa: E402
from lowbit.kernels.gemv_frag import default_frag_gemv_config, w4a16_frag_gemv  # noqa: E402
from lowbit.kernels.layout import FragmentInt4  # noqa: E402
from lowbit.kernels.reference import w4a16_reference  # noqa: E402
from tests.test_kernels import DEVICE, _rel, _weights  # noqa: E402

# the default; split-K over 3 programs; one program per row block; 2 and 4 tiles per loop step, with
# splits that end inside a step (K = 1000: 8 tiles in 2 splits of 4 and 4; K = 300: 3 tiles, one
# split of a step of 4); the weights loaded a step ahead
_CONFIGS = (None, TileConfig(block_m=16, block_n=32, split_k=3, num_warps=8),
            TileConfig(block_m=16, block_n=16, split_k=1, num_warps=8),
            TileConfig(block_m=16, block_n=32, block_k=256, split_k=2, num_warps=8),
            TileConfig(block_m=16, block_n=16, block_k=512, split_k=3, num_warps=8),
            TileConfig(block_m=16, block_n=32, block_k=256, split_k=2, num_warps=8, num_stages=2),
            TileConfig(block_m=16, block_n=64, block_k=1024, split_k=1, num_warps=8, num_stages=2))


@pytest.mark.parametrize("M, K, group, symmetric", [(1, 640, 128, True), (3, 300, 64, False), (2, 1000, None, False),
                                                    (4, 520, 256, True), (1, 128, None, True)])
def test_matches_reference(M, K, group, symmetric):
    """fp32 arithmetic on exact u - zero: equal to the reference to its fp16 rounding. N = 300: rows
    past the last full 16-row group; K not a multiple of the tile; split-K over 3 programs and none."""
    N = 300
    qw, s, z, p = _weights(N, K, group, symmetric, seed=M + K)
    f = FragmentInt4.from_packed(p, int8=False)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(DEVICE).half()
    ref = w4a16_reference(x.float(), qw, s, z, group, K)  # fp32: the sum before its fp16 rounding
    bias = torch.randn(N, generator=torch.Generator().manual_seed(K)).to(DEVICE).half()
    for cfg in _CONFIGS:
        y = w4a16_frag_gemv(x, f, config=cfg)
        assert y.shape == (M, N) and y.dtype == torch.float16
        _assert_fp16_rounding_of(y, ref, cfg)
        _assert_fp16_rounding_of(w4a16_frag_gemv(x, f, bias, config=cfg), ref + bias.float(), cfg)


def _assert_fp16_rounding_of(y, ref32, cfg):
    """Each fp16 output within one fp16 ulp of the fp32 sum: its rounding (half an ulp) plus the fp32
    sum taken in another order (a GPU's reductions; the interpreter's numpy), which may cross a
    rounding boundary. A wrong weight, scale or column is many ulps off."""
    ulp = torch.finfo(torch.float16).eps * ref32.abs().clamp_min(torch.finfo(torch.float16).tiny)
    err = (y.float() - ref32).abs()
    assert bool((err <= ulp + 1e-5 * ref32.abs().max()).all()), (cfg, (err / ulp).max().item())


def test_errors_name_what_it_takes():
    _, _, _, p = _weights(64, 256, 128)
    f = FragmentInt4.from_packed(p, int8=False)
    x = torch.randn(5, 256).to(DEVICE).half()
    with pytest.raises(LowbitError, match="1..4 rows"):
        w4a16_frag_gemv(x, f)
    with pytest.raises(LowbitError, match="fp16 order"):
        w4a16_frag_gemv(x[:1], FragmentInt4.from_packed(p, int8=True))
    with pytest.raises(LowbitError, match="takes fp16 or bf16"):
        w4a16_frag_gemv(x[:1].float(), f)


def test_default_config_splits_k_when_row_blocks_are_few():
    assert default_frag_gemv_config(4096, 14336, 132).split_k > 1  # 64 row blocks for 132 SMs
    assert default_frag_gemv_config(57344, 8192, 132).split_k == 1  # 896 row blocks


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_run_w4a16_takes_the_gemv_for_a_gemv_entry_and_the_wgmma_kernel_past_four_rows(dtype):
    from lowbit.kernels.dispatch import Choice
    from lowbit.kernels.run import run_w4a16

    qw, s, z, p = _weights(200, 384, 128, seed=1)
    f = FragmentInt4.from_packed(p, int8=False)
    cfg = TileConfig(block_m=16, block_n=64, split_k=2, num_warps=8)
    for M in (1, 4, 9):  # 9: a GEMV entry's M range reaching past the GEMV's rows
        x = torch.randn(M, 384, device="cuda", dtype=dtype)
        ref = w4a16_reference(x, qw, s, z, 128, 384)
        y = run_w4a16(x, f, Choice("gemv", cfg))
        assert _rel(y, ref) < (1e-3 if dtype == torch.float16 else 1e-2)
