"""The format registry (lowbit.methods): one method per GPU format, one set of names, each preset's
layers matched to the method the docs say, and the device check."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from lowbit.bench.kernels import PATHS
from lowbit.bench.synthetic import input_choices, rtn_linear
from lowbit.errors import LowbitError
from lowbit.formats import PRESETS, get_scheme
from lowbit.kernels import dispatch, ops
from lowbit.methods.registry import METHODS, get_method, method_for

PRESET_METHOD = {  # preset -> (format method of its attention projections, of down_proj)
    "w4a16": ("w4a16", "w4a16"), "w4a16-rtn": ("w4a16", "w4a16"), "w8a8-fp8": ("w8a8-fp8", "w8a8-fp8"),
    "w8a8-int8": ("w8a8-int8", "w8a8-int8"), "w4a8": ("w4a8", "w4a8"), "w4a8-g128": ("w4a8-g128", "w4a8-g128"),
    "w4a4-quik": ("w4a4", "w8a8-int8"), "w4a4": ("w4a4", "w4a4"), "w4a4kv4-comet": ("w4ax", "w4ax"),
    "w4a16-2:4": ("w4a16-2:4", "w4a16-2:4"),
}


def test_one_set_of_names():
    """A method's name is its dispatch-table op and its `lowbit bench kernels` path."""
    assert set(PRESET_METHOD) == set(PRESETS)
    for name, m in METHODS.items():
        assert m.name == name and name in dispatch.OPS and name in PATHS
        assert m.table_op is None or m.table_op == name
    assert set(dispatch.OPS) == set(METHODS)
    with pytest.raises(LowbitError, match="unknown kernel format 'w3a16'; formats: w4ax, w4a4"):
        get_method("w3a16")


def _layer(scheme_name: str, path: str, K: int = 512, N: int = 64):
    scheme = get_scheme(scheme_name)
    wfmt, afmt = scheme.for_layer(f"layers.0.{path}")
    if scheme_name == "w4a4-quik":  # 256 outlier columns of 512 leave the kept ones few but valid
        afmt = type(afmt)(bits=afmt.bits, outlier_columns=32) if afmt.bits == 4 else afmt
    lin = torch.nn.Linear(K, N, bias=False)
    return rtn_linear(lin, wfmt, afmt, input_choices(K, afmt, torch.Generator().manual_seed(0)), smooth=scheme.smooth)


@pytest.mark.parametrize("preset", sorted(PRESET_METHOD))
def test_each_preset_meets_its_method(preset):
    attn, down = PRESET_METHOD[preset]
    q, d = _layer(preset, "self_attn.q_proj"), _layer(preset, "mlp.down_proj")
    assert q.kernel_format() == attn and method_for(q) is METHODS[attn]
    assert d.kernel_format() == down
    # on the CPU the layer stays on the reference, with nothing packed
    assert not q.prepare_kernels() and q.kernel is None


def test_the_layer_runs_through_its_method_on_packed_weights():
    """``use_packed`` + ``kernel_forward`` is what prepare_kernels sets up on the GPU; on CPU tensors the
    op's PyTorch reference runs, which equals the layer's reference forward."""
    layer = _layer("w4a8", "self_attn.q_proj").half()
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(1)).half()
    with pytest.raises(LowbitError, match="no kernel prepared"):
        layer.kernel_forward(x)
    layer.use_packed(layer.pack_kernels())
    y = layer.kernel_forward(x)
    ref = layer(x)  # CPU tensors: forward() keeps the reference path even with a kernel packed
    assert y.shape == ref.shape == (3, 64) and torch.allclose(y.float(), ref.float(), atol=2e-2, rtol=1e-2)
    assert layer.input_quant() is not None  # W4A8 without act-order: a fused producer may quantize for it


def test_eager_calls_skip_the_custom_op_layer():
    """Outside torch.compile, run_op calls the op's Python body (same result, no dispatcher); inside,
    the custom op (the traced graph needs it)."""
    layer = _layer("w4a16", "self_attn.q_proj").half()
    p = layer.pack_kernels()
    x = torch.randn(2, 512).half()
    args = (x, p.qweight, p.scales, p.zeros, p.perm, None, p.group_size or 0, p.K, p.tile_k)
    with mock.patch.dict(ops.EAGER, {ops.w4a16: mock.Mock(wraps=ops.EAGER[ops.w4a16])}) as eager:
        y = ops.run_op(ops.w4a16, *args)
        assert eager[ops.w4a16].call_count == 1
    assert torch.equal(y, ops.w4a16(*args))
    compiled = torch.compile(lambda x: ops.run_op(ops.w4a16, x, *args[1:]), fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), y)


def test_fp8_methods_refuse_gpus_without_fp8_tensor_cores():
    m = METHODS["w8a8-fp8"]
    with mock.patch("torch.cuda.get_device_capability", return_value=(8, 0)), \
            mock.patch("torch.cuda.get_device_name", return_value="NVIDIA A100"):
        with pytest.raises(LowbitError, match=r"w8a8-fp8 kernels need compute capability 8\.9\+; NVIDIA A100 has 8\.0"):
            m.check_device(torch.device("cuda", 0))
        METHODS["w8a8-int8"].check_device(torch.device("cuda", 0))  # int8 runs there
    m.check_device(torch.device("cpu"))  # the reference path runs anywhere


@pytest.mark.parametrize("preset, tile", [("w4a16-rtn", 128), ("w4a8", 256), ("w4a8-g128", 128)])
@pytest.mark.parametrize("K", [512, 301])  # K not a multiple of the tile, and odd (a padding nibble)
def test_the_checkpoint_qweight_comes_back_from_the_kernel_layout(preset, tile, K):
    from lowbit.kernels.layout import checkpoint_qweight, pack_for_kernels
    from lowbit.numerics.primitives import pack_int4

    layer = _layer(preset, "self_attn.q_proj", K=K)
    p = pack_for_kernels(layer.qweight, layer.scales, layer.zeros, layer.wfmt.group_size, K, tile_k=tile)
    assert torch.equal(checkpoint_qweight(p), layer.qweight)
    # asymmetric codes, and act-order columns (g_idx shuffled across groups: the layout permutes them)
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 16, (8, 256), generator=g, dtype=torch.uint8)
    zeros = torch.randint(0, 16, (8, 2), generator=g, dtype=torch.uint8)
    g_idx = torch.randperm(256, generator=g) // 128
    p = pack_for_kernels(pack_int4(codes), torch.rand(8, 2).half(), zeros, 128, 256, g_idx=g_idx.int())
    assert p.perm is not None and torch.equal(checkpoint_qweight(p), pack_int4(codes))


def test_a_released_layer_keeps_one_copy_and_gives_the_checkpoint_back():
    """After release_checkpoint_layout the int4 codes live only in the kernel layout; qweight, the
    state dict, the reference forward and a dtype move all get the exact checkpoint tensor back."""
    layer = _layer("w4a8", "self_attn.q_proj").half()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(4)).half()
    ref = layer(x)
    layer.use_packed(layer.pack_kernels())
    assert layer.release_checkpoint_layout() == before["qweight"].nbytes
    assert layer._buffers["qweight"] is None and layer.release_checkpoint_layout() == 0
    saved = layer.state_dict()
    assert saved.keys() == before.keys() and all(torch.equal(saved[k], before[k]) for k in before)
    assert layer._buffers["qweight"] is None  # saving rebuilt a copy and kept none
    assert torch.equal(layer.kernel_forward(x), layer.kernel_forward(x))  # the kernel path never needs it
    assert torch.equal(layer(x), ref)  # the reference forward: qweight rebuilt on first use
    assert torch.equal(layer._buffers["qweight"], before["qweight"])
    layer.use_packed(layer.pack_kernels())
    layer.release_checkpoint_layout()
    moved = layer.to(torch.float32)  # a move drops the kernel layout: qweight comes back first
    assert moved.kernel is None and torch.equal(moved.qweight, before["qweight"])
    w8 = _layer("w8a8-int8", "self_attn.q_proj")
    w8.use_packed(w8.pack_kernels())
    assert w8.release_checkpoint_layout() == 0  # its kernel reads the codes as stored
