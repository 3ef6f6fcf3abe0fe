"""The CUTLASS W4A8 kernels (fp8 and int8 tensor cores): shapes and configurations on any machine;
numerics against ``w4a8_reference`` on Hopper with ``LOWBIT_CUTLASS_DIR`` set."""

from __future__ import annotations

import os

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.kernels import cutlass_build
from lowbit.kernels.cutlass_w4a8 import CONFIGS, check_shape, configs_for, parts
from lowbit.kernels.reference import w4a8_reference
from lowbit.numerics.primitives import pack_int4, quantize_activation


@pytest.mark.parametrize("N, K, needle", [(256, 4160, "K a multiple of 128"), (136, 4096, "N a multiple of 128")])
def test_shapes_it_cannot_take_are_named(N, K, needle):
    with pytest.raises(LowbitError, match=needle):
        check_shape(N, K)


def test_each_activation_type_has_its_configs():
    assert len(configs_for("fp8_e4m3")) == len(configs_for("int")) == len(CONFIGS) // 2
    ps = parts()
    assert len({p.defines for p in ps}) == len(CONFIGS)
    assert [dict(p.defines)["LB_ACT_FP8"] for p in ps] == ["1" if a == "fp8_e4m3" else "0" for a, _ in CONFIGS]


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


gpu = pytest.mark.skipif(not _hopper() or not os.environ.get(cutlass_build.CUTLASS_ENV),
                         reason="needs an sm_90 GPU and LOWBIT_CUTLASS_DIR")


@gpu
@pytest.mark.parametrize("adtype", ["fp8_e4m3", "int"])
@pytest.mark.parametrize("M", [1, 3, 17, 127, 256])
@pytest.mark.parametrize("N, K", [(256, 512), (384, 4224)])
def test_every_config_matches_the_reference(adtype, M, N, K):
    from lowbit.kernels.cutlass_w4a8 import pack_cutlass_w4a8, w4a8_cutlass

    gen = torch.Generator().manual_seed(M * 7 + N)
    codes = torch.randint(-8, 8, (N, K), generator=gen, dtype=torch.int8)
    scales = torch.rand(N, 1, generator=gen) * 0.02 + 1e-3
    xq, xs = quantize_activation(torch.randn(M, K, generator=gen), 8, adtype)
    xq, xs = xq.cuda(), xs.reshape(M).float().cuda()
    qw = pack_int4(codes).cuda()
    ref = w4a8_reference(xq, xs, qw, scales.cuda(), None, None, K, torch.float16).float()
    w = pack_cutlass_w4a8(qw, scales.cuda(), K, adtype)
    wrong, refused = [], []
    for i in configs_for(adtype):
        name = CONFIGS[i][1].name()
        for splits in ((1, 3) if CONFIGS[i][1].stream_k else (1,)):
            try:
                y = w4a8_cutlass(xq, xs, w, config=i, splits=splits).float()
            except LowbitError as e:
                assert "cannot run" in str(e)
                refused.append(name)
                continue
            err = ((y - ref).norm() / ref.norm()).item()
            if err >= 2e-3:
                wrong.append((name, splits, round(err, 4)))
    print(f"{adtype} M={M} N={N} K={K}: wrong {wrong}, refused {refused}")
    assert not wrong
    assert len(refused) < len(configs_for(adtype))


@gpu
def test_weights_reordered_for_one_type_refuse_the_other():
    from lowbit.kernels.cutlass_w4a8 import pack_cutlass_w4a8, w4a8_cutlass

    qw = pack_int4(torch.randint(-8, 8, (256, 512), dtype=torch.int8)).cuda()
    w = pack_cutlass_w4a8(qw, torch.rand(256, device="cuda"), 512, "fp8_e4m3")
    xq = torch.randint(-127, 127, (4, 512), dtype=torch.int8, device="cuda")
    with pytest.raises(LowbitError, match="reordered for fp8_e4m3"):
        w4a8_cutlass(xq, torch.ones(4, device="cuda"), w)
