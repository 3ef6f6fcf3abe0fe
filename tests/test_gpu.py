"""The same model code on a CUDA GPU (skipped without one): parity, cache decode, batching, half precision."""

from __future__ import annotations

import pytest
import torch

from lowbit.engine.reference import reference_generate as generate
from lowbit.model.kv_cache import KVCache
from lowbit.engine.sampling import SamplingParams
from lowbit.model.loader import load_model
from tests.tiny_models import make_hf_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture
def pair(arch, tmp_path):
    ref = make_hf_model(arch)
    ref.save_pretrained(tmp_path)
    return ref, tmp_path


def test_fp32_logits_on_gpu_match_transformers_on_cpu(pair):
    ref, path = pair
    ours = load_model(path, device="cuda", dtype="fp32", with_tokenizer=False).model
    ids = torch.randint(3, 97, (3, 19))
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids.cuda()).cpu()
    torch.testing.assert_close(got, expected, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_cache_decode_on_gpu(pair, dtype):
    _, path = pair
    ours = load_model(path, device="cuda", dtype=dtype, with_tokenizer=False).model
    ids = torch.randint(3, 97, (2, 12), device="cuda")
    with torch.no_grad():
        full = ours(ids).float()
        cache = KVCache(ours.config, 2, 12, device="cuda", dtype=ours.embed_tokens.weight.dtype)
        steps = [ours(ids[:, :5], cache=cache)] + [ours(ids[:, t : t + 1], cache=cache, start=t) for t in range(5, 12)]
    stepped = torch.cat(steps, 1).float()
    rel = (stepped - full).norm() / full.norm()
    assert torch.isfinite(stepped).all() and rel < 2e-2


def test_batched_generation_on_gpu_matches_one_by_one(pair):
    _, path = pair
    ours = load_model(path, device="cuda", dtype="fp32", with_tokenizer=False).model
    prompts = [torch.randint(3, 97, (n,)).tolist() for n in (3, 17, 1)]
    params = SamplingParams(max_new_tokens=8)
    for prompt, got in zip(prompts, generate(ours, prompts, params)):
        assert got.token_ids == generate(ours, [prompt], params)[0].token_ids


@pytest.mark.asset
def test_default_model_on_gpu(capsys):
    ours = load_model("smollm2-135m", device="cuda", dtype="fp32")
    cpu = load_model("smollm2-135m", device="cpu", dtype="fp32", with_tokenizer=False)
    ids = ours.tokenizer("Quantization trades a little accuracy for a lot of speed.", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(ours.model(ids.cuda()).cpu(), cpu.model(ids), rtol=1e-3, atol=1e-3)
