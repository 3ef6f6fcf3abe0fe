"""Our Transformer against transformers' implementation, on random tiny models of every architecture."""

from __future__ import annotations

import pytest
import torch

from lowbit.engine.generate import generate
from lowbit.model.kv_cache import KVCache
from lowbit.engine.sampling import SamplingParams
from lowbit.model.loader import load_model
from tests.tiny_models import make_hf_model

TOL = dict(rtol=1e-4, atol=1e-4)  # fp32 on CPU: differences are summation-order rounding only


@pytest.fixture
def pair(arch, tmp_path):
    """(transformers model, our model loaded from its save_pretrained directory, sharded)."""
    ref = make_hf_model(arch)
    ref.save_pretrained(tmp_path, max_shard_size="100KB")  # several shards + index.json
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = load_model(tmp_path, device="cpu", dtype="fp32", with_tokenizer=False)
    return ref, ours.model


def test_logits_match_transformers(pair):
    ref, ours = pair
    torch.manual_seed(1)
    ids = torch.randint(3, 97, (3, 17))
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, **TOL)


def test_kv_cache_decode_matches_full_forward(pair):
    """Prefill 7 tokens, then feed one token at a time through the cache: same logits as one pass."""
    _, ours = pair
    torch.manual_seed(2)
    ids = torch.randint(3, 97, (2, 13))
    with torch.no_grad():
        full = ours(ids)
        cache = KVCache(ours.config, 2, 13, device="cpu", dtype=torch.float32)
        steps = [ours(ids[:, :7], cache=cache, start=0)]
        for t in range(7, 13):
            steps.append(ours(ids[:, t : t + 1], cache=cache, start=t))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **TOL)


def test_greedy_generation_matches_transformers(pair):
    ref, ours = pair
    torch.manual_seed(3)
    prompt = torch.randint(3, 97, (1, 9))
    with torch.no_grad():
        expected = ref.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = generate(ours, [prompt[0].tolist()], SamplingParams(max_new_tokens=12))[0]
    assert got.token_ids == expected[0, 9:].tolist()
    assert got.finish_reason == "length"


def test_batched_prompts_of_different_lengths_match_one_by_one(pair):
    """Left padding must not change any prompt's greedy continuation."""
    _, ours = pair
    torch.manual_seed(4)
    prompts = [torch.randint(3, 97, (n,)).tolist() for n in (1, 9, 4, 16)]
    params = SamplingParams(max_new_tokens=10)
    batched = generate(ours, prompts, params)
    for prompt, got in zip(prompts, batched):
        alone = generate(ours, [prompt], params)[0]
        assert got.token_ids == alone.token_ids


def test_stop_token_ends_only_its_row(pair):
    _, ours = pair
    torch.manual_seed(5)
    prompts = [torch.randint(3, 97, (n,)).tolist() for n in (5, 8)]
    free = generate(ours, prompts, SamplingParams(max_new_tokens=8))
    stop = free[0].token_ids[2]  # make row 0's third token a stop token
    stopped = generate(ours, prompts, SamplingParams(max_new_tokens=8, stop_token_ids=(stop,)))
    assert stopped[0].token_ids == free[0].token_ids[: free[0].token_ids.index(stop)]
    assert stopped[0].finish_reason == "stop"
    if stop not in free[1].token_ids:
        assert stopped[1].token_ids == free[1].token_ids
