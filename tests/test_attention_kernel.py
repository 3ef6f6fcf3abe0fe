"""Decode attention over a quantized KV cache: the Triton kernel against its reference, and the cache
layout against the KV fake-quant numerics of issue 3 (lowbit.numerics.kv)."""

from __future__ import annotations

import re

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats import KVCacheFormat
from lowbit.numerics.kv import fake_quantize_kv

triton = pytest.importorskip("triton")
from lowbit.kernels.attention import (  # noqa: E402
    decode_attention,
    decode_attention_reference,
    dequantize_kv,
    quantize_kv,
    splits_for,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP8 = pytest.param("fp8_e4m3", None, marks=pytest.mark.skipif(DEVICE == "cpu", reason="NumPy has no fp8; GPU only"))


@pytest.mark.parametrize("dtype, group", [("int8", None), ("int4", 32), ("int4", None), ("fp8_e4m3", None)])
def test_cache_layout_reproduces_fake_quant_numerics(dtype, group):
    t = torch.randn(3, 2, 17, 64, generator=torch.Generator().manual_seed(0)) * 2
    bits_fmt = KVCacheFormat(dtype=dtype, group_size=group) if dtype != "fp8_e4m3" else KVCacheFormat(dtype=dtype)
    assert torch.allclose(dequantize_kv(quantize_kv(t, dtype, group)), fake_quantize_kv(t, bits_fmt), atol=1e-6)


FP8_STATIC = pytest.param("fp8_e4m3", "static", marks=FP8.marks)


@pytest.mark.parametrize("dtype, group", [("int8", None), ("int4", 32), ("int4", None), ("fp16", None), FP8,
                                          FP8_STATIC])
@pytest.mark.parametrize("Hq, Hkv", [(4, 2), (8, 1)])
def test_decode_attention_matches_reference(dtype, group, Hq, Hkv):
    gen = torch.Generator().manual_seed(Hq)
    S, L, D = 3, 100, 64

    def cache(t):
        if dtype == "fp16":
            return quantize_kv(t.to(DEVICE, torch.float16), dtype)
        if group == "static":
            return quantize_kv(t.to(DEVICE), dtype, static_scale=t.abs().amax(dim=(0, 2, 3)).to(DEVICE) / 448)
        return quantize_kv(t.to(DEVICE), dtype, group)

    k = cache(torch.randn(S, Hkv, L, D, generator=gen))
    v = cache(torch.randn(S, Hkv, L, D, generator=gen))
    q = torch.randn(3, Hq, D, generator=gen).to(DEVICE, torch.float16)
    lengths = torch.tensor([1, 37, 100], dtype=torch.int32, device=DEVICE)
    slots = torch.tensor([2, 0, 1], dtype=torch.int32, device=DEVICE)
    ref = decode_attention_reference(q, k, v, lengths, slots, D ** -0.5)
    for split in (512, 32):  # one split, and several merged
        out = decode_attention(q, k, v, lengths, slots, block_s=16, tokens_per_split=split)
        assert out.shape == q.shape and out.dtype == q.dtype
        rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        assert rel < 5e-3, (split, rel)
    # a fixed split count (the CUDA-graph form: no host read of lengths)
    out = decode_attention(q, k, v, lengths, slots, block_s=16, n_splits=3, check=False)
    rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert rel < 5e-3, ("n_splits=3", rel)


def test_splits_for_fills_the_gpu_without_empty_blocks():
    assert splits_for(1, 8, 4096, 132) == 33  # 264 programs for 8 heads
    assert splits_for(64, 8, 4096, 132) == 1
    assert splits_for(1, 8, 100, 132) == 2  # no split shorter than a 64-token block


def test_static_fp8_scales_reference():
    t = torch.randn(2, 2, 5, 32)
    s = torch.tensor([0.01, 0.02])
    kv = quantize_kv(t, "fp8_e4m3", static_scale=s)
    assert kv.scales.shape == (2,)
    assert torch.allclose(dequantize_kv(kv), fake_quantize_kv(t, KVCacheFormat(dtype="fp8_e4m3"), s))


def test_decode_attention_errors():
    k = quantize_kv(torch.randn(1, 1, 8, 64).to(DEVICE), "int8")
    q = torch.randn(1, 2, 64).to(DEVICE, torch.float16)
    one = torch.ones(1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(LowbitError, match="fp16/bf16"):
        decode_attention(q.float(), k, k, one, one * 0)
    with pytest.raises(LowbitError, match=r"lengths must be in \[1, 8\]"):
        decode_attention(q, k, k, one * 9, one * 0)
    with pytest.raises(LowbitError, match="heads must divide"):
        decode_attention(torch.randn(1, 3, 64).to(DEVICE, torch.float16), quantize_kv(torch.randn(1, 2, 8, 64).to(DEVICE), "int8"),
                         quantize_kv(torch.randn(1, 2, 8, 64).to(DEVICE), "int8"), one, one * 0)
    with pytest.raises(LowbitError, match="KV cache dtype"):
        quantize_kv(torch.randn(1, 1, 2, 64), "int2")
    with pytest.raises(LowbitError, match="query's dtype"):
        plain = quantize_kv(torch.randn(1, 1, 8, 64, dtype=torch.bfloat16).to(DEVICE), "fp16")
        decode_attention(q, plain, plain, one, one * 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 and fp8: GPU only")
@pytest.mark.parametrize("dtype", ["int8", "int4", "fp8_e4m3", "fp16"])
def test_decode_attention_with_bf16_queries(dtype):
    """bf16 queries take the conversions of their own dtype (int4: the 128 + u bit pattern; int8: the
    cvt path), against the same reference."""
    gen = torch.Generator().manual_seed(7)
    S, L, D, Hq, Hkv = 2, 80, 128, 8, 2
    k, v = (quantize_kv(torch.randn(S, Hkv, L, D, generator=gen).cuda().to(torch.bfloat16 if dtype == "fp16" else
                                                                          torch.float32), dtype) for _ in range(2))
    q = torch.randn(2, Hq, D, generator=gen).cuda().bfloat16()
    lengths = torch.tensor([80, 33], dtype=torch.int32, device="cuda")
    slots = torch.tensor([1, 0], dtype=torch.int32, device="cuda")
    ref = decode_attention_reference(q, k, v, lengths, slots, D ** -0.5)
    out = decode_attention(q, k, v, lengths, slots)
    assert out.dtype == torch.bfloat16
    assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 2e-2


_PTX = """
import json, re, torch
from lowbit.kernels.aot import compile_launch
from lowbit.kernels.attention import decode_attention, quantize_kv
from lowbit.kernels.launch import record_launches
out = {}
for dtype, qdt in [("int4", torch.float16), ("int8", torch.float16), ("fp16", torch.float16), ("int4", torch.bfloat16)]:
    t = torch.randn(2, 8, 256, 128)
    k, v = (quantize_kv(t.to(qdt) if dtype == "fp16" else t, dtype) for _ in range(2))
    with record_launches(launch=False) as rec:
        decode_attention(torch.randn(2, 32, 128).to(qdt), k, v, torch.tensor([256, 100], dtype=torch.int32),
                         torch.tensor([0, 1], dtype=torch.int32), check=False, n_splits=2)
    kernel, grid, args, kwargs = rec[0]
    ptx = compile_launch(kernel, args, kwargs).asm["ptx"]
    out[f"{dtype} {qdt}"] = sorted(set(re.findall(r"cvt[.a-z0-9]*", ptx)))
print(json.dumps(out))
"""


def test_ptx_converts_no_cache_value_through_a_cvt():
    """sm_90a PTX of the per-token int4 / int8 and the plain fp16 cache kernels: the cache values reach
    the MMA's dtype by their bits, with no int -> float or float -> float cvt per value (those run at a
    quarter of the SM's rate; with them the int4 cache decoded slower than fp16, issue 18). The only
    float cvts left pack the fp32 probabilities for the PV product."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, "-c", _PTX], capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    for case, cvts in json.loads(run.stdout.strip().splitlines()[-1]).items():
        per_value = [c for c in cvts if re.fullmatch(r"cvt\.rn\.b?f16\.[su](8|16|32)|cvt\.f32\.b?f16|cvt\.rn\.f32\.[su]\d+", c)]
        assert per_value == [], (case, cvts)
        assert set(cvts) <= {"cvt.u64.u32", "cvt.s64.s32", "cvt.rn.f16x2.f32", "cvt.rn.bf16x2.f32"}, (case, cvts)
