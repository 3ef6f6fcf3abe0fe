"""The CUTLASS W4A8 kernels (fp8 and int8 tensor cores): shapes and configurations on any machine;
numerics against ``w4a8_reference`` on Hopper with ``LOWBIT_CUTLASS_DIR`` set."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.kernels import cutlass_build
from lowbit.kernels.config import CutlassConfig
from lowbit.kernels.cutlass_w4a8 import (BF16_CONFIGS, CONFIGS, TILES, check_shape, config_index, configs_for,
                                         default_config, parts, takes, tiles_for)
from lowbit.kernels.reference import w4a8_reference
from lowbit.numerics.primitives import pack_int4, quantize_activation


@pytest.mark.parametrize("N, K, needle", [(256, 4160, "K a multiple of 128"), (136, 4096, "N a multiple of 128")])
def test_shapes_it_cannot_take_are_named(N, K, needle):
    with pytest.raises(LowbitError, match=needle):
        check_shape(N, K)


def test_each_activation_type_has_its_configs():
    assert len(configs_for("fp8_e4m3")) == len(configs_for("int")) == len(CONFIGS) // 2
    ps = parts()
    assert len({p.defines for p in ps}) == len(CONFIGS) + len(BF16_CONFIGS) == len(ps)
    assert [dict(p.defines)["LB_ACT_FP8"] for p in ps] == ["1" if a == "fp8_e4m3" else "0"
                                                          for a, _ in CONFIGS + BF16_CONFIGS]
    assert [dict(p.defines)["LB_OUT_BF16"] for p in ps] == ["0"] * len(CONFIGS) + ["1"] * len(BF16_CONFIGS)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_configs_are_found_by_activation_output_and_tile(out_dtype):
    seen = set()
    for adtype in ("fp8_e4m3", "int"):
        for t in tiles_for(out_dtype):
            seen.add(config_index(adtype, out_dtype, dataclasses.replace(t, splits=2 if t.stream_k else 1)))
        for M in (1, 16, 17, 64, 65, 300, 4096):
            config_index(adtype, out_dtype, default_config(M, 4096, out_dtype=out_dtype))
    assert len(seen) == 2 * len(tiles_for(out_dtype))
    if out_dtype == torch.bfloat16:
        with pytest.raises(LowbitError, match="bfloat16 output"):
            config_index("int", out_dtype, CutlassConfig(128, 128, stream_k=True))
    with pytest.raises(LowbitError, match="fp16 or bf16"):
        config_index("int", torch.float32, TILES[0])


def test_takes_names_what_it_misses():
    assert takes(4096, 4096, None) is None
    assert "per-channel" in takes(4096, 4096, 128)
    assert "N a multiple of 128" in takes(4100, 4096, None)


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


gpu = pytest.mark.skipif(not _hopper() or not os.environ.get(cutlass_build.CUTLASS_ENV),
                         reason="needs an sm_90 GPU and LOWBIT_CUTLASS_DIR")


@gpu
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("adtype", ["fp8_e4m3", "int"])
@pytest.mark.parametrize("M", [1, 3, 17, 127, 256])
@pytest.mark.parametrize("N, K", [(256, 512), (384, 4224)])
def test_every_config_matches_the_reference(adtype, M, N, K, out_dtype):
    from lowbit.kernels.cutlass_w4a8 import pack_cutlass_w4a8, w4a8_cutlass

    gen = torch.Generator().manual_seed(M * 7 + N)
    codes = torch.randint(-8, 8, (N, K), generator=gen, dtype=torch.int8)
    scales = torch.rand(N, 1, generator=gen) * 0.02 + 1e-3
    xq, xs = quantize_activation(torch.randn(M, K, generator=gen), 8, adtype)
    xq, xs = xq.cuda(), xs.reshape(M).float().cuda()
    qw = pack_int4(codes).cuda()
    ref = w4a8_reference(xq, xs, qw, scales.cuda(), None, None, K, torch.float32).float()
    w = pack_cutlass_w4a8(qw, scales.cuda(), K, adtype)
    tol = 2e-3 if out_dtype == torch.float16 else 1e-2
    bias = torch.randn(N, device="cuda", dtype=out_dtype)
    wrong, refused = [], []
    for tile in tiles_for(out_dtype):
        for splits in ((1, 3) if tile.stream_k else (1,)):
            cfg = dataclasses.replace(tile, splits=splits)
            try:
                y = w4a8_cutlass(xq, xs, w, cfg, out_dtype, bias)
            except LowbitError as e:
                assert "cannot run" in str(e)
                refused.append(cfg.label())
                continue
            assert y.dtype == out_dtype
            want = ref + bias.float()
            err = ((y.float() - want).norm() / want.norm()).item()
            if not err < tol:
                wrong.append((cfg.label(), round(err, 4)))
    print(f"{adtype} {out_dtype} M={M} N={N} K={K}: wrong {wrong}, refused {refused}")
    assert not wrong
    assert len(refused) < len(tiles_for(out_dtype))


@gpu
@pytest.mark.parametrize("N, K", [(256, 512), (4096, 14336)])
def test_unpack_gives_back_the_checkpoint_bytes(N, K):
    from lowbit.kernels.cutlass_w4a8 import pack_cutlass_w4a8, unpack_cutlass_w4a8

    qw = pack_int4(torch.randint(-8, 8, (N, K), dtype=torch.int8))
    w = pack_cutlass_w4a8(qw.cuda(), torch.rand(N, device="cuda"), K, "int")
    assert torch.equal(unpack_cutlass_w4a8(w).cpu(), qw)


@gpu
def test_weights_reordered_for_one_type_refuse_the_other():
    from lowbit.kernels.cutlass_w4a8 import pack_cutlass_w4a8, w4a8_cutlass

    qw = pack_int4(torch.randint(-8, 8, (256, 512), dtype=torch.int8)).cuda()
    w = pack_cutlass_w4a8(qw, torch.rand(256, device="cuda"), 512, "fp8_e4m3")
    xq = torch.randint(-127, 127, (4, 512), dtype=torch.int8, device="cuda")
    with pytest.raises(LowbitError, match="reordered for fp8_e4m3"):
        w4a8_cutlass(xq, torch.ones(4, device="cuda"), w)


@gpu
@pytest.mark.parametrize("adtype", ["int", "fp8_e4m3"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layers_of_a_cutlass_table_run_the_cutlass_kernel_and_match_the_rows_path(adtype, dtype, use_kernel_table):
    """A table packing W4A8 (int8 or fp8 activations, per-channel weights) in CUTLASS's order at a shape
    gives layers of that shape CutlassInt4PerChannel weights; they match the rows path, with their
    activations quantized by the layer or handed over quantized (a fused producer), keep one copy of
    their int4 weights and give the checkpoint's qweight back. Grouped weights keep the rows."""
    from lowbit.formats import ActivationFormat, WeightFormat
    from lowbit.kernels.act_quant import quantize_activations
    from lowbit.kernels.activations import QuantizedActivations
    from lowbit.kernels.cutlass_w4a8 import CutlassInt4PerChannel
    from lowbit.model.qlinear import QuantLinear
    from lowbit.quant.gptq import rtn_quantize

    op = "w4a8-fp8" if adtype == "fp8_e4m3" else "w4a8"
    g = torch.Generator().manual_seed(1)
    afmt = ActivationFormat(bits=8, dtype=adtype)

    def layer(group=None):
        fmt = WeightFormat(bits=4, group_size=group, method="rtn")
        return QuantLinear.from_quantized(rtn_quantize(torch.randn(256, 1024, generator=g), fmt), afmt,
                                          in_features=1024, dtype=dtype, bias=torch.randn(256, generator=g)).cuda()

    use = use_kernel_table
    lin = layer()
    qweight = lin.qweight.clone()
    use({"entries": {}})
    assert lin.prepare_kernels(dtype) and not isinstance(lin.kernel, CutlassInt4PerChannel)
    xs = [torch.randn(M, 1024, device="cuda", dtype=dtype) for M in (1, 17, 300)]
    want = [lin(x) for x in xs]
    cfg = CutlassConfig(128, 64).as_dict()
    use({"weight_order": {op: {"default": "rows", "shapes": [{"N": 256, "K": 1024, "order": "cutlass"}]}},
         "entries": {op: [{"N": 256, "K": 1024, "M": 64, "order": "cutlass", "kernel": "cutlass", "us": 1.0,
                           "config": cfg}]}})
    assert lin.prepare_kernels(dtype) and isinstance(lin.kernel, CutlassInt4PerChannel)
    tol = 5e-3 if dtype == torch.float16 else 1e-2
    rel = lambda y, r: ((y.float() - r.float()).norm() / r.float().norm()).item()  # noqa: E731
    for x, ref in zip(xs, want):
        y = lin(x)
        assert y.dtype == dtype and rel(y, ref) < tol
        spec = lin.input_quant()
        assert spec is not None
        q, s = quantize_activations(x, spec.dtype, spec.smooth)
        assert rel(lin(QuantizedActivations(q, s, x.dtype)), ref) < tol
    assert lin.release_checkpoint_layout() > 0
    assert torch.equal(lin.state_dict()["qweight"], qweight)
    if op == "w4a8-fp8":  # grouped weights: the w4a8-fp8 op takes them, the CUTLASS kernel does not
        grouped = layer(128)
        assert grouped.prepare_kernels(dtype) and not isinstance(grouped.kernel, CutlassInt4PerChannel)
