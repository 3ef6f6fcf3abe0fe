from __future__ import annotations

import pytest
import torch

from lowbit.engine.sampling import SamplingParams, sample
from lowbit.errors import LowbitError


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_greedy_is_argmax():
    logits = torch.randn(5, 50)
    assert torch.equal(sample(logits, SamplingParams(), None), logits.argmax(-1))


@pytest.mark.parametrize("V", [100, 128256, 50001])
def test_greedy_tokens_equal_argmax_with_ties(V):
    from lowbit.engine.sampling import greedy_tokens

    g = torch.Generator().manual_seed(V)
    logits = torch.randn(5, V, generator=g).half()
    logits[1] = 0.0  # all tied: index 0
    logits[2, [7, V - 3, V // 2]] = 20.0  # a tie between chunks: the first one
    logits[3, V - 1] = 30.0  # the last entry, in the padded chunk
    assert torch.equal(greedy_tokens(logits), logits.argmax(-1))


def test_top_k_1_and_tiny_top_p_are_greedy():
    logits = torch.randn(6, 40)
    for params in (SamplingParams(temperature=1.3, top_k=1), SamplingParams(temperature=1.3, top_p=1e-6)):
        assert torch.equal(sample(logits, params, _gen(0)), logits.argmax(-1))


def test_seeded_sampling_is_reproducible_and_varies():
    logits = torch.randn(4, 30)
    params = SamplingParams(temperature=1.0)
    a, b = sample(logits, params, _gen(7)), sample(logits, params, _gen(7))
    assert torch.equal(a, b)
    draws = {tuple(sample(logits, params, _gen(s)).tolist()) for s in range(20)}
    assert len(draws) > 1


def test_frequencies_follow_softmax_at_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    params = SamplingParams(temperature=0.5)
    draws = sample(logits.expand(40000, 4), params, _gen(1))
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    expected = (logits[0] / 0.5).softmax(-1)
    torch.testing.assert_close(freq, expected, atol=0.01, rtol=0)


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[3.0, 2.9, 0.0, -0.5, -1.0]])
    many = logits.expand(5000, 5)
    assert set(sample(many, SamplingParams(temperature=5.0, top_k=2), _gen(2)).tolist()) == {0, 1}
    # probs at T=1: ~[.50, .45, .03, .02, .01]: top_p=0.9 keeps the first two only
    assert set(sample(many, SamplingParams(temperature=1.0, top_p=0.9), _gen(3)).tolist()) == {0, 1}


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_k=-3), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
    ],
)
def test_invalid_params(kwargs, msg):
    with pytest.raises(LowbitError, match=msg):
        SamplingParams(**kwargs)
