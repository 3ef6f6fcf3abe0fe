"""The fused rotary + quantized KV-cache write (``lowbit.kernels.kv_store``) against the reference path
(``rope_store_reference``, then ``quantize_kv``), in the Triton interpreter on CPU and compiled on a GPU;
odd batch and head counts, distinct slots in any order, the engine path through ``SlotKVCache``, errors."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError

pytest.importorskip("triton")
from lowbit.kernels import fused  # noqa: E402
from lowbit.kernels.attention import quantize_kv  # noqa: E402
from lowbit.kernels.kv_store import rope_quant_store  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])  # NumPy has no bf16
KV_DTYPES = ["int8", "int4"] + (["fp8_e4m3"] if DEVICE == "cuda" else [])  # nor fp8


def _rand(*shape, dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 2).to(DEVICE, dtype)


def _empty_cache(kv_dtype, slots, hkv, L, hd, seed):
    """A layer's cache holding random earlier tokens (codes and scales), as quantize_kv lays it out."""
    kv = quantize_kv(_rand(slots, hkv, L, hd, seed=seed).float(), kv_dtype)
    return kv.codes.contiguous(), kv.scales.contiguous()


def _inputs(B, hq, hkv, hd, dtype, L):
    qkv = _rand(B, 1, (hq + 2 * hkv) * hd, dtype=dtype)  # views of a fused QKV output, as in decode
    q = qkv[..., : hq * hd].view(B, 1, hq, hd)
    k = qkv[..., hq * hd: (hq + hkv) * hd].view(B, 1, hkv, hd)
    v = qkv[..., (hq + hkv) * hd:].view(B, 1, hkv, hd)
    ang = torch.rand(B, 1, hd // 2, generator=torch.Generator().manual_seed(4)) * 6
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(DEVICE, dtype)
    sin = torch.cat([ang.sin(), ang.sin()], -1).to(DEVICE, dtype)
    g = torch.Generator().manual_seed(5)
    slots = 2 * B + 3
    slot = torch.randperm(slots, generator=g)[:B].to(DEVICE, torch.int32)  # distinct slots, in any order
    pos = torch.randint(0, L, (B,), generator=g).to(DEVICE)
    return q, k, v, cos, sin, slot, pos, slots


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, hq, hkv", [(1, 4, 2), (3, 6, 3), (17, 2, 1)])
def test_rope_quant_store_matches_reference(kv_dtype, dtype, B, hq, hkv):
    hd, L = 32, 9
    q, k, v, cos, sin, slot, pos, slots = _inputs(B, hq, hkv, hd, dtype, L)
    kc, ks = _empty_cache(kv_dtype, slots, hkv, L, hd, seed=6)
    vc, vs = _empty_cache(kv_dtype, slots, hkv, L, hd, seed=7)
    before = [t.clone() for t in (kc, ks, vc, vs)]
    out = rope_quant_store(q, k, v, cos, sin, kc, ks, vc, vs, slot, pos, kv_dtype)

    # the reference: rotate and store in the activation dtype, then quantize what was stored
    plain_k = torch.zeros(slots, hkv, L, hd, dtype=dtype, device=DEVICE)
    plain_v = torch.zeros_like(plain_k)
    ref_q = fused.rope_store_reference(q, k, v, cos, sin, plain_k, plain_v, slot, pos)
    rows, p = slot.long(), pos.long()
    exact = DEVICE == "cpu"
    # Compiled, a rotary product may round one step of the activation dtype apart from PyTorch's
    # (test_fused_kernels tolerates it); when the products nearly cancel, that step is large against
    # the rotated key itself, and it can move the head's absmax and so every code of the head. On a
    # GPU the keys are therefore checked against the same quantization of the key that the rotary
    # kernel ``fused.rope`` produces (H200, 2026-12-03: 121 of 544 rotated fp16 keys one step apart,
    # the stored codes equal to quantize_kv of fused.rope's keys in every case); values are not rotated
    # and must match the reference everywhere.
    keys = plain_k[rows, :, p] if exact else fused.rope(k, cos, sin)[:, 0]
    ref = {}
    for name, plain in (("k", keys), ("v", plain_v[rows, :, p])):
        r = quantize_kv(plain[:, :, None], kv_dtype)  # (B, hkv, 1, ...)
        ref[name] = (r.codes[:, :, 0], r.scales[:, :, 0])
    assert out.shape == (B, hq, hd) and out.is_contiguous()
    if exact:
        assert torch.equal(out, ref_q)
    else:
        torch.testing.assert_close(out, ref_q, rtol=1e-2, atol=1e-2)
    for name, codes, scales in (("k", kc, ks), ("v", vc, vs)):
        got_c, got_s = codes[rows, :, p], scales[rows, :, p]
        want_c, want_s = ref[name]
        assert torch.equal(got_c.view(torch.uint8), want_c.view(torch.uint8)), f"{name} codes"
        assert torch.equal(got_s, want_s), f"{name} scales"
    # nothing else in the cache moved
    written = torch.zeros(slots, L, dtype=torch.bool, device=DEVICE)
    written[rows, p] = True
    for now, was in zip((kc, ks, vc, vs), before):
        keep = ~written[:, None, :].expand(slots, hkv, L)
        assert torch.equal(now[keep].view(torch.uint8), was[keep].view(torch.uint8))


@pytest.mark.parametrize("kv_dtype", ["int8", "int4"])
def test_slot_cache_decode_uses_the_fused_write(kv_dtype):
    """SlotKVCache.attend_rotary on a quantized per-token cache gives what the unfused path gives
    (rotary, ``_store`` through quantize_kv, attention) on the same cache."""
    from lowbit.model.config import ModelConfig
    from lowbit.formats import KVCacheFormat
    from lowbit.model.kv_cache import SlotKVCache

    if DEVICE != "cuda":
        pytest.skip("the decode-attention kernel's engine path runs on a GPU")
    cfg = ModelConfig(architecture="llama", vocab_size=64, hidden_size=128, intermediate_size=256,
                      num_layers=1, num_heads=4, num_kv_heads=2, head_dim=32)
    B, L, hd = 3, 16, 32
    caches = [SlotKVCache(cfg, 4, L, device=DEVICE, dtype=torch.float16, kv=KVCacheFormat(kv_dtype))
              for _ in range(2)]
    q, k, v, cos, sin, _, _, _ = _inputs(B, 4, 2, hd, torch.float16, L)
    slot = torch.tensor([2, 0, 3], device=DEVICE)
    pos = torch.tensor([[5], [0], [11]], device=DEVICE)
    for c in caches:
        c.bind(slot, pos, kernel=True)
    fused_out = caches[0].attend_rotary(0, 0, q, k, v, cos, sin)
    assert fused_out is not None
    qr, kr = fused.rope_reference(q, cos, sin), fused.rope_reference(k, cos, sin)
    plain_out = caches[1].attend(0, 0, qr.transpose(1, 2), kr.transpose(1, 2), v.transpose(1, 2), None)
    for a, b in ((caches[0].keys, caches[1].keys), (caches[0].values, caches[1].values)):
        assert (a.view(torch.uint8).int() - b.view(torch.uint8).int()).abs().max() <= (1 if kv_dtype == "int8" else 17)
    torch.testing.assert_close(fused_out, plain_out, rtol=2e-2, atol=2e-2)


def test_rope_quant_store_errors():
    q, k = _rand(2, 1, 4, 32), _rand(2, 1, 2, 32)
    cos = _rand(2, 1, 32)
    codes, scales = _empty_cache("int8", 3, 2, 5, 32, seed=1)
    idx = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(LowbitError, match="int8, int4 or fp8_e4m3"):
        rope_quant_store(q, k, k, cos, cos, codes, scales, codes, scales, idx, idx, "int2")
    with pytest.raises(LowbitError, match="one token per row"):
        rope_quant_store(_rand(2, 2, 4, 32), k, k, cos, cos, codes, scales, codes, scales, idx, idx, "int8")
    with pytest.raises(LowbitError, match="key codes must be contiguous"):  # int8 codes for an int4 cache
        rope_quant_store(q, k, k, cos, cos, codes, scales, codes, scales, idx, idx, "int4")
    grouped = torch.ones(3, 2, 5, 2, device=DEVICE)  # two scales per token and head: the reference path's
    with pytest.raises(LowbitError, match="one per token and head"):
        rope_quant_store(q, k, k, cos, cos, codes, grouped, codes, grouped, idx, idx, "int8")
