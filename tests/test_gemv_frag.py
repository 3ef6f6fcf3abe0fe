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

def _cfg(block_n, block_k=128, split_k=1, num_stages=1):
    return TileConfig(block_m=16, block_n=block_n, block_k=block_k, split_k=split_k, num_warps=8,
                      num_stages=num_stages)


# (M, K, group, symmetric, configs): each case with the default (bn32, 2 tiles per step, the weights
# loaded a step ahead), and configs that reach the kernel's other branches: one tile per step and
# none ahead; splits that end inside a step (K = 300, 3 tiles, 2 per step: splits of 2 and 1; K = 520,
# 5 tiles, 8 per step: one split of 5; K = 640 at the default: 5 tiles, 2 per step); splits of whole
# steps (K = 1000, 8 tiles: 3 splits of 3, 3, 2 at one tile per step, 2 of 4 at four). Interpreted in
# CI, so each case runs a few configs rather than all of them.
_CASES = [
    (1, 640, 128, True, (None, _cfg(16))),
    (3, 300, 64, False, (None, _cfg(32, 256, 2, 2))),
    (2, 1000, None, False, (_cfg(32, split_k=3), _cfg(16, 512, 3, 2))),
    (4, 520, 256, True, (None, _cfg(64, 1024, 1, 2))),
    (1, 128, None, True, (None, _cfg(32, 256, 2))),
]


@pytest.mark.parametrize("M, K, group, symmetric, configs", _CASES)
def test_matches_reference(M, K, group, symmetric, configs):
    """fp32 arithmetic on exactly decoded nibbles: the reference to its fp16 rounding. N = 300: rows
    past the last full 16-row group; K not a multiple of the tile; the bias with the first config."""
    N = 300
    qw, s, z, p = _weights(N, K, group, symmetric, seed=M + K)
    f = FragmentInt4.from_packed(p, int8=False)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(DEVICE).half()
    ref = w4a16_reference(x.float(), qw, s, z, group, K)  # fp32: the sum before its fp16 rounding
    bias = torch.randn(N, generator=torch.Generator().manual_seed(K)).to(DEVICE).half()
    for cfg in configs:
        y = w4a16_frag_gemv(x, f, config=cfg)
        assert y.shape == (M, N) and y.dtype == torch.float16
        _assert_fp16_rounding_of(y, ref, cfg)
    _assert_fp16_rounding_of(w4a16_frag_gemv(x, f, bias, config=configs[0]), ref + bias.float(), configs[0])


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
