"""The custom ops (lowbit::w4a16, w4a8, w8a8): schema and fake implementations (opcheck), torch.compile
with fullgraph, CPU reference parity, QuantLinear routing, and on the GPU the kernel path against the
reference forward of real quantized layers. lowbit::w4a4, w4ax and sparse24: tests/test_new_format_ops.py."""

from __future__ import annotations

import pytest
import torch

from lowbit.formats import ActivationFormat, WeightFormat
from lowbit.kernels import ops
from lowbit.kernels.layout import pack_for_kernels
from lowbit.model.qlinear import QuantLinear, use_kernels
from lowbit.quant.gptq import rtn_quantize

CUDA = torch.cuda.is_available()


def _layer(wfmt: WeightFormat, afmt: ActivationFormat, N=48, K=256, seed=0, bias=True, smooth=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g)
    qw = rtn_quantize(w, wfmt)
    return QuantLinear.from_quantized(
        qw, afmt, in_features=K, dtype=torch.float16,
        bias=torch.randn(N, generator=g) if bias else None,
        smooth=(torch.rand(K, generator=g) + 0.5) if smooth else None,
    )


def _int4_args(K=256, group=128, seed=0):
    layer = _layer(WeightFormat(bits=4, group_size=group, method="rtn"), ActivationFormat(), K=K, seed=seed)
    p = pack_for_kernels(layer.qweight, layer.scales, layer.zeros, group, K)
    return layer, p


def test_opcheck_all_ops():
    _, p = _int4_args()
    x = torch.randn(3, 256, dtype=torch.float16)
    bias = torch.randn(p.N, dtype=torch.float16)
    torch.library.opcheck(ops.w4a16, (x, p.qweight, p.scales, None, None, bias, 128, 256, 128))
    torch.library.opcheck(ops.w4a8, (x, p.qweight, p.scales, None, None, None, bias, 128, 256, 128, "int"))
    wq = torch.randint(-127, 128, (40, 256), dtype=torch.int8)
    torch.library.opcheck(ops.w8a8, (x, wq, torch.rand(40) + 0.1, None, None))
    xq = torch.randint(-127, 128, (3, 256), dtype=torch.int8)
    xs = torch.rand(3) + 0.01
    torch.library.opcheck(ops.w4a8_quantized, (xq, xs, p.qweight, p.scales, None, bias, 128, 256, 128, "int",
                                               torch.float16))
    torch.library.opcheck(ops.w8a8_quantized, (xq, xs, wq, torch.rand(40) + 0.1, None, torch.float16))


@pytest.mark.parametrize("op", ["w4a8", "w8a8"])
def test_pre_quantized_ops_equal_the_ops_that_quantize(op):
    """lowbit::w4a8_quantized / w8a8_quantized on quantize_activation's codes give what lowbit::w4a8 / w8a8
    give on the unquantized input (the fused norm / SiLU kernels hand them those codes)."""
    from lowbit.numerics.primitives import quantize_activation

    wfmt = WeightFormat(bits=4 if op == "w4a8" else 8, group_size=None, method="rtn")
    layer = _layer(wfmt, ActivationFormat(bits=8), smooth=True)
    x = torch.randn(5, 256).half()
    q, s = quantize_activation(x.float() / layer.smooth, 8, "int")
    q = q.to(torch.int8)
    if op == "w4a8":
        p = pack_for_kernels(layer.qweight, layer.scales, None, None, 256)
        want = ops.w4a8(x, p.qweight, p.scales, None, None, layer.smooth, layer.bias, 0, 256, 128, "int")
        got = ops.w4a8_quantized(q, s[:, 0], p.qweight, p.scales, None, layer.bias, 0, 256, 128, "int",
                                 torch.float16)
    else:
        w_scale = layer.scales[:, 0].float()
        want = ops.w8a8(x, layer.qweight, w_scale, layer.smooth, layer.bias)
        got = ops.w8a8_quantized(q, s[:, 0], layer.qweight, w_scale, layer.bias, torch.float16)
    assert got.dtype == torch.float16 and torch.equal(got, want)


def test_ops_compile_fullgraph_and_match_reference_forward():
    """The CPU path of each op equals QuantLinear's reference forward, also under torch.compile."""
    cases = [
        (WeightFormat(bits=4, group_size=128, method="rtn"), ActivationFormat(), "w4a16"),
        (WeightFormat(bits=4, group_size=None, symmetric=False, method="rtn"), ActivationFormat(bits=8), "w4a8"),
        (WeightFormat(bits=8, group_size=None, method="rtn"), ActivationFormat(bits=8), "w8a8-int8"),
    ]
    for wfmt, afmt, op in cases:
        layer = _layer(wfmt, afmt, smooth=afmt.bits is not None)
        assert layer.kernel_format() == op
        t = layer
        x = torch.randn(2, 3, 256).half()
        ref = layer(x)
        for tile in (128, 256):  # the op must read the layout the weights were packed in
            p = None
            if op != "w8a8-int8":
                p = pack_for_kernels(t.qweight, t.scales, t.zeros, wfmt.group_size, 256, tile_k=tile)

            # defaults bind this iteration's values (the function is called within the iteration anyway)
            def f(x, op=op, p=p, t=t, tile=tile, g=wfmt.group_size or 0):
                if op == "w4a16":
                    return ops.w4a16(x, p.qweight, p.scales, p.zeros, None, t.bias, g, 256, tile)
                if op == "w4a8":
                    return ops.w4a8(x, p.qweight, p.scales, p.zeros, None, t.smooth, t.bias, g, 256, tile, "int")
                return ops.w8a8(x, t.qweight, t.scales[:, 0].float(), t.smooth, t.bias)

            eager = f(x)
            compiled = torch.compile(f, fullgraph=True, backend="eager")(x)
            assert eager.shape == (2, 3, 48) and eager.dtype == torch.float16
            assert torch.allclose(eager.float(), ref.float(), atol=2e-2, rtol=2e-3), (op, tile)
            assert torch.equal(compiled, eager)


def test_formats_with_and_without_kernels():
    """QUIK W4A4, COMET W4Ax and 2:4 W4A16 now have kernels (tests/test_new_format_ops.py runs them);
    formats no kernel takes keep kernel_format() None, and prepare_kernels leaves them on the reference."""
    from lowbit.quant.fmpq import assign_fmpq_blocks

    w4a4 = _layer(WeightFormat(bits=4, group_size=None, method="rtn"), ActivationFormat(bits=4))
    assert w4a4.kernel_format() == "w4a4"
    absmax = torch.rand(256, generator=torch.Generator().manual_seed(0)) + 0.5
    absmax[3] = 50.0  # one outlier channel: its block (the first after sorting) is 8-bit
    perm, high = assign_fmpq_blocks(absmax, 128, 0.25)
    assert high.tolist() == [True, False]

    def fmpq(wfmt, afmt):
        qw = rtn_quantize(torch.randn(48, 256, generator=torch.Generator().manual_seed(1))[:, perm], wfmt)
        return QuantLinear.from_quantized(qw, afmt, in_features=256, dtype=torch.float16, act_perm=perm,
                                          fmpq_high=high)

    comet = ActivationFormat(bits=4, fmpq_block=128, fmpq_high_fraction=0.25)
    assert fmpq(WeightFormat(bits=4, group_size=128, method="rtn"), comet).kernel_format() == "w4ax"
    no_kernel = {
        # W4A4 with group-wise weights: the W4A4 kernel takes per-channel scales only, and without
        # FMPQ the activations are quantized over the whole row, which the W4Ax kernel does not do
        "w4a4-g128": _layer(WeightFormat(bits=4, group_size=128, method="rtn"), ActivationFormat(bits=4)),
        "w4a4-asym": _layer(WeightFormat(bits=4, group_size=None, symmetric=False, method="rtn"),
                            ActivationFormat(bits=4)),
        "w8a4": _layer(WeightFormat(bits=8, group_size=None, method="rtn"), ActivationFormat(bits=4)),
        "w8a8-g128": _layer(WeightFormat(bits=8, group_size=128, method="rtn"), ActivationFormat(bits=8)),
        # FMPQ with 8-bit weights, or with weight groups / blocks other than the kernel's 128
        "w8-fmpq": fmpq(WeightFormat(bits=8, group_size=128, method="rtn"), comet),
        "w4g64-fmpq": fmpq(WeightFormat(bits=4, group_size=64, method="rtn"), comet),
        "fmpq-block64": fmpq(WeightFormat(bits=4, group_size=128, method="rtn"),
                             ActivationFormat(bits=4, fmpq_block=64, fmpq_high_fraction=0.25)),
    }
    for name, layer in no_kernel.items():
        assert layer.kernel_format() is None, name
        assert not layer.prepare_kernels() and layer.kernel is None, name
    # 8-bit blocks that are not a prefix of the blocks: the W4Ax kernel's two-phase loop cannot run them
    scattered = fmpq(WeightFormat(bits=4, group_size=128, method="rtn"), comet)
    scattered.fmpq_high = torch.tensor([False, True])
    assert scattered.kernel_format() is None
    assert not w4a4.prepare_kernels()  # CPU tensors: the reference path, kernel or not


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("M", [1, 3, 17, 127])
@pytest.mark.parametrize("scheme", ["w4a16", "w4a16-asym-g64", "w4a8", "w4a8-g128", "w8a8-int8", "w8a8-fp8"])
def test_kernel_path_matches_reference_on_gpu(scheme, M):
    wfmt, afmt = {
        "w4a16": (WeightFormat(bits=4, group_size=128, method="rtn"), ActivationFormat()),
        "w4a16-asym-g64": (WeightFormat(bits=4, group_size=64, symmetric=False, method="rtn"), ActivationFormat()),
        "w4a8": (WeightFormat(bits=4, group_size=None, method="rtn"), ActivationFormat(bits=8)),
        "w4a8-g128": (WeightFormat(bits=4, group_size=128, method="rtn"), ActivationFormat(bits=8)),
        "w8a8-int8": (WeightFormat(bits=8, group_size=None, method="rtn"), ActivationFormat(bits=8)),
        "w8a8-fp8": (WeightFormat(bits=8, dtype="fp8_e4m3", group_size=None, method="rtn"),
                     ActivationFormat(bits=8, dtype="fp8_e4m3")),
    }[scheme]
    layer = _layer(wfmt, afmt, N=200, K=384, smooth=afmt.bits is not None).cuda()
    model = torch.nn.Sequential(layer)
    x = torch.randn(M, 384, device="cuda", dtype=torch.float16)
    ref = layer(x)
    assert use_kernels(model) == (1, 1)
    y = layer(x)
    rel = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
    assert rel < 5e-3, rel


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("scheme", ["w4a16", "w4a8", "w4a8-g128", "w8a8-int8", "w8a8-fp8", "w4a8+head"])
def test_quantized_model_on_kernels_matches_reference_and_captures_in_a_cuda_graph(scheme, tmp_path):
    """A tiny quantized Llama in fp16 on the GPU: kernels vs reference logits, torch.compile, CUDA graph."""
    import lowbit
    from lowbit.model.loader import load_model
    from tests.tiny_models import make_hf_model

    make_hf_model("llama-bias", hidden_size=256, intermediate_size=512).save_pretrained(tmp_path)
    loaded = load_model(tmp_path, device="cpu", dtype="fp32", with_tokenizer=False)
    calib = torch.randint(3, 97, (8, 32), generator=torch.Generator().manual_seed(0))
    model = lowbit.quantize(loaded, scheme, calib, progress=False).to("cuda", torch.float16)
    ids = torch.randint(3, 97, (3, 11), device="cuda")
    with torch.no_grad():
        ref = model(ids).float()
        on, total = use_kernels(model)
        assert on == total > 0
        assert isinstance(model.lm_head, QuantLinear) == scheme.endswith("+head")
        out = model(ids).float()
        # fp8: cuBLAS's row-wise fp8 GEMM returns bf16 (8-bit mantissa), and fp8 activation codes
        # flip at rounding boundaries when inputs differ in the last bit; both compound over layers
        # (an e4m3 step is 6-12% of a value, so one flip weighs far more than an int8 one)
        tol = 1e-1 if "fp8" in scheme else 2e-2
        assert ((out - ref).norm() / ref.norm()).item() < tol
        # inductor fuses the norms and rounds fp16 differently; 8-bit activation rounding amplifies that
        compiled = torch.compile(model)(ids).float()
        assert ((compiled - out).norm() / out.norm()).item() < (1e-1 if "fp8" in scheme else 5e-2)
        layer = next(m for m in model.modules() if isinstance(m, QuantLinear))
        x = torch.randn(5, layer.in_features, device="cuda", dtype=torch.float16)
        assert torch.allclose(torch.compile(layer, fullgraph=True)(x), layer(x))  # the op never breaks a graph
        # capture one forward (after a warm-up run, which allocates the split-K workspace) and replay
        static = ids.clone()
        model(static)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = model(static)
        static.copy_(torch.randint(3, 97, (3, 11), device="cuda"))
        graph.replay()
        assert torch.allclose(captured.float(), model(static).float(), atol=1e-2, rtol=1e-2)
