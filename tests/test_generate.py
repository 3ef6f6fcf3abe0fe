"""``lowbit.generate`` runs through the engine (the path ``lowbit serve`` takes) and gives the tokens of
the eager reference; its engine is kept between calls and rebuilt when the model changes."""

from __future__ import annotations

import pytest
import torch

from lowbit.engine import inference
from lowbit.engine.generate import generate, generate_stream
from lowbit.engine.reference import reference_generate
from lowbit.engine.sampling import SamplingParams
from lowbit.errors import LowbitError
from tests.test_scheduler import _prompts, model  # noqa: F401 - the same tiny models (a fixture) and prompts


def test_engine_generate_gives_the_reference_tokens(model):
    prompts = _prompts()
    for params in (SamplingParams(max_new_tokens=9), SamplingParams(max_new_tokens=9, stop_token_ids=(7, 11, 40))):
        got = generate(model, prompts, params)
        want = reference_generate(model, prompts, params)
        assert [(c.token_ids, c.finish_reason, c.prompt_tokens) for c in got] == \
            [(c.token_ids, c.finish_reason, c.prompt_tokens) for c in want]


def test_seeded_sampling_is_repeatable_and_prompts_draw_apart(model):
    p = _prompts()[2]
    params = SamplingParams(max_new_tokens=10, temperature=1.5, seed=3)
    a = generate(model, [p, p], params)
    b = generate(model, [p, p], params)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert a[0].token_ids != a[1].token_ids  # seed + i per prompt: not one random stream copied
    assert generate(model, [p], params)[0].token_ids == a[0].token_ids


def test_the_engine_is_kept_and_rebuilt_when_the_model_changes(model):
    inference.release_engine(model)
    generate(model, [[5, 6]], SamplingParams(max_new_tokens=3))
    first = inference._ENGINES[model][1]
    generate(model, [[5, 6, 7]], SamplingParams(max_new_tokens=4))
    assert inference._ENGINES[model][1] is first  # same sizes: reused
    generate(model, _prompts(), SamplingParams(max_new_tokens=4))
    bigger = inference._ENGINES[model][1]
    assert bigger is not first and bigger.num_slots >= 5 and first.cache is None  # the old one was closed
    saved = model.norm
    model.norm = type(saved)(saved.weight.shape[0], saved.eps)  # a module swapped: graphs would be stale
    with torch.no_grad():
        model.norm.weight.copy_(saved.weight)
    try:
        generate(model, [[5, 6]], SamplingParams(max_new_tokens=3))
        assert inference._ENGINES[model][1] is not bigger
    finally:
        model.norm = saved
        inference.release_engine(model)
    assert model not in inference._ENGINES


def test_closing_a_stream_early_cancels_and_leaves_the_engine_idle(model):
    stream = generate_stream(model, _prompts()[:3], SamplingParams(max_new_tokens=20))
    first = next(stream)
    assert first.token is not None
    stream.close()
    engine = inference._ENGINES[model][1]
    assert not engine.has_work and engine.stats().slots_used == 0
    assert generate(model, [[5, 6]], SamplingParams(max_new_tokens=3))[0].token_ids  # and serves again


def test_errors_and_the_context_warning(model):
    with pytest.raises(LowbitError, match="at least one token"):
        generate(model, [[5], []], SamplingParams())
    with pytest.raises(LowbitError, match="shorten the prompt"):
        generate(model, [[5] * 128], SamplingParams())
    with pytest.warns(UserWarning, match="max_new_tokens cut to 28"):
        out = generate(model, [[5] * 100], SamplingParams(max_new_tokens=50))
    assert len(out[0].token_ids) <= 28
