"""Continuous batching: requests that join, wait, prefill in chunks and leave give exactly the greedy
tokens each prompt gets alone; cancellation frees slots; bad requests are refused."""

from __future__ import annotations

import pytest
import torch

from lowbit.engine.reference import reference_generate as generate  # what the engine must match
from lowbit.engine.sampling import SamplingParams
from lowbit.engine.scheduler import Engine
from lowbit.model.kv_cache import SlotKVCache
from lowbit.errors import LowbitError
from lowbit.formats import KVCacheFormat
from lowbit.model.loader import load_model
from tests.tiny_models import make_hf_model


@pytest.fixture(scope="module", params=["llama2", "mistral", "qwen2"])
def model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    make_hf_model(request.param).save_pretrained(path)
    return load_model(path, device="cpu", dtype="fp32", with_tokenizer=False).model


def _prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 97, (n,), generator=g).tolist() for n in (5, 1, 13, 8, 21, 2)]


def test_continuous_batching_matches_one_by_one(model):
    prompts = _prompts()
    lengths = [7, 12, 3, 9, 5, 10]  # different budgets: requests leave at different steps
    # 2 slots for 6 requests: four wait, then join as others leave; 4-token chunks split long prompts
    engine = Engine(model, max_slots=2, max_len=64, prefill_chunk=4)
    ids = [engine.add(p, SamplingParams(max_new_tokens=n)) for p, n in zip(prompts, lengths)]
    out = engine.run()
    for rid, p, n in zip(ids, prompts, lengths):
        alone = generate(model, [p], SamplingParams(max_new_tokens=n))[0].token_ids
        assert out[rid] == (alone, "length"), rid


def test_stop_tokens_and_sampling_seeds(model):
    p = _prompts()[2]
    first = generate(model, [p], SamplingParams(max_new_tokens=12))[0].token_ids
    # stop at the first token that did not appear before it (the greedy output may repeat tokens)
    i = next((i for i in range(1, len(first)) if first[i] not in first[:i]), None)
    if i is None:
        pytest.skip("greedy output repeats one token")
    engine = Engine(model, max_slots=3, max_len=64)
    rid = engine.add(p, SamplingParams(max_new_tokens=12, stop_token_ids=(first[i],)))
    s1 = engine.add(p, SamplingParams(max_new_tokens=6, temperature=1.0, seed=7))
    s2 = engine.add(p, SamplingParams(max_new_tokens=6, temperature=1.0, seed=7))
    out = engine.run()
    assert out[rid] == (first[:i], "stop")
    assert out[s1] == out[s2]  # same seed, same tokens, whatever else shares the batch


def test_cancel_frees_the_slot(model):
    engine = Engine(model, max_slots=1, max_len=64)
    a = engine.add([5, 6, 7], SamplingParams(max_new_tokens=50))
    b = engine.add([8, 9], SamplingParams(max_new_tokens=3))
    engine.step()
    engine.cancel(a)
    out = engine.run()
    assert out[a][1] == "cancelled" and out[b][1] == "length" and len(out[b][0]) == 3


def test_engine_refuses_requests_that_cannot_fit(model):
    engine = Engine(model, max_slots=1, max_len=16)
    with pytest.raises(LowbitError, match="context is 16"):
        engine.add(list(range(3, 20)), SamplingParams())
    with pytest.raises(LowbitError, match="at least one token"):
        engine.add([], SamplingParams())
    with pytest.raises(LowbitError, match="exceeds the model's context"):
        Engine(model, max_len=10**6)
    rid = engine.add(list(range(3, 13)), SamplingParams(max_new_tokens=100))  # cut to the context
    assert len(engine.run()[rid][0]) == 6


@pytest.mark.parametrize("kv", [KVCacheFormat("int8"), KVCacheFormat("int4", group_size=16),
                                KVCacheFormat("fp8_e4m3"), "fp8-static"])
def test_quantized_kv_cache_matches_the_fake_quant_reference(model, kv):
    """The engine stores real codes and scales; generate() fake-quantizes: the same greedy tokens."""
    if kv == "fp8-static":
        kv = KVCacheFormat("fp8_e4m3")
        g = torch.Generator().manual_seed(1)
        for layer in model.layers:
            h = model.config.num_kv_heads
            layer.self_attn.k_scale = torch.rand(h, generator=g) * 0.02 + 0.005
            layer.self_attn.v_scale = torch.rand(h, generator=g) * 0.02 + 0.005
    for layer in model.layers:
        layer.self_attn.kv_format = kv
    try:
        engine = Engine(model, max_slots=2, max_len=64, prefill_chunk=4)
        assert engine.cache.quantized and engine.cache.keys.dtype != torch.float32
        prompts = _prompts()[:4]
        ids = [engine.add(p, SamplingParams(max_new_tokens=6)) for p in prompts]
        out = engine.run()
        for rid, p in zip(ids, prompts):
            assert out[rid][0] == generate(model, [p], SamplingParams(max_new_tokens=6))[0].token_ids
    finally:
        for layer in model.layers:
            layer.self_attn.kv_format = None
            layer.self_attn.k_scale = layer.self_attn.v_scale = None


def test_kv_bytes_per_slot_counts_codes_and_scales(model):
    cfg = model.config
    plain = SlotKVCache.bytes_per_slot(cfg, 100, torch.float16)
    assert plain == 2 * cfg.num_layers * cfg.num_kv_heads * 100 * cfg.head_dim * 2
    int4 = SlotKVCache.bytes_per_slot(cfg, 100, torch.float16, KVCacheFormat("int4", group_size=16))
    assert int4 == 2 * cfg.num_layers * cfg.num_kv_heads * 100 * (cfg.head_dim // 2 + 4 * cfg.head_dim // 16)
    cache = SlotKVCache(cfg, 3, 100, device="cpu", dtype=torch.float16, kv=KVCacheFormat("int4", group_size=16))
    assert cache.nbytes == 3 * int4


@pytest.mark.parametrize("kv", [None, KVCacheFormat("int4", group_size=16)])
def test_decode_kernel_mode_matches_the_masked_path(kv):
    """Decode attention by the Triton kernel over the slot cache in place (interpreter on CPU), against
    the gather + SDPA path, on an fp16 model: same logits within fp16 rounding."""
    pytest.importorskip("triton")
    import os

    if not os.environ.get("TRITON_INTERPRET") and not torch.cuda.is_available():
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
    from lowbit.model.config import ModelConfig
    from lowbit.model.llama import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig("llama", vocab_size=61, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=32, max_position_embeddings=64)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    m = Transformer(cfg).to(dev, torch.float16)
    for layer in m.layers:
        layer.self_attn.kv_format = kv
    logits = {}
    for kernel in (False, True):
        engine = Engine(m, max_slots=3, max_len=40, prefill_chunk=5, decode_kernel=kernel, cuda_graphs=False)
        reqs = [[3, 4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15]]
        for p in reqs:
            engine.add(p, SamplingParams(max_new_tokens=4))
        seen = []
        orig = engine._decode

        def spy(rs, orig=orig, seen=seen):
            orig(rs)
            seen.append(torch.stack([r.last_logits.float() for r in rs]).cpu())
        engine._decode = spy
        engine.run()
        logits[kernel] = seen
    assert len(logits[True]) == len(logits[False]) > 0
    for a, b in zip(logits[True], logits[False]):
        assert torch.allclose(a, b, atol=2e-2, rtol=2e-2), (a - b).abs().max()


def test_engine_option_errors(model):
    with pytest.raises(LowbitError, match="CUDA graphs need"):
        Engine(model, max_slots=1, max_len=16, cuda_graphs=True)


def test_unseeded_sampling_leaves_the_global_rng_alone(model):
    """Each sampled request draws from its own generator; the process-wide RNG (what a user's
    torch.manual_seed controls) is neither reseeded nor advanced."""
    torch.manual_seed(1234)
    before = torch.random.get_rng_state()
    params = SamplingParams(max_new_tokens=4, temperature=0.9)
    engine = Engine(model, max_slots=2, max_len=64)
    engine.add(_prompts()[0], params)
    engine.add(_prompts()[1], params)
    engine.run()
    generate(model, [_prompts()[2]], params)
    assert torch.equal(torch.random.get_rng_state(), before)
    # unseeded requests still differ from each other (entropy from the OS, per request)
    draws = {tuple(generate(model, [_prompts()[2]], SamplingParams(max_new_tokens=8, temperature=2.0))[0].token_ids)
             for _ in range(4)}
    assert len(draws) > 1


def _cuda_model():
    from lowbit.model.config import ModelConfig
    from lowbit.model.llama import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig("llama", vocab_size=61, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=32, max_position_embeddings=64)
    return Transformer(cfg).to("cuda", torch.float16).eval()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_rebuilt_engine_on_cuda_graphs_frees_the_old_one_and_serves_the_queued_requests():
    """What the server does after a failed step, on the real path (CUDA graphs, decode kernel): the old
    engine's cache and graphs are freed, the rebuilt one captures its own, and the requests that were
    only queued complete under their ids with the tokens they get alone."""
    m = _cuda_model()
    engine = Engine(m, max_slots=2, max_len=48, prefill_chunk=4)
    assert engine.graphs is not None
    prompts = [[3, 4, 5, 6, 7], [10, 11], [12, 13, 14], [20, 21, 22, 23]]
    ids = [engine.add(p, SamplingParams(max_new_tokens=6)) for p in prompts]
    engine.step()
    engine.step()  # two admitted and running, two waiting
    carried = engine.unstarted()
    assert [rid for rid, _, _ in carried] == ids[2:]
    import gc

    def allocated() -> int:
        gc.collect()
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()

    before, cache_bytes = allocated(), engine.cache.nbytes
    engine.close()
    closed = allocated()
    new = engine.rebuilt()
    del engine
    rebuilt = allocated()
    print(f"allocated: {before} with the engine, {closed} closed, {rebuilt} rebuilt; cache {cache_bytes}")
    assert closed <= before - cache_bytes  # the old cache is gone before the new one is allocated
    assert rebuilt <= before + (1 << 20)  # and the rebuilt engine takes no more than the first did
    for rid, p, params in carried:
        assert new.add(p, params, request_id=rid) == rid
    fresh = new.add(prompts[0], SamplingParams(max_new_tokens=6))
    assert fresh > max(ids)  # new ids continue past the old engine's
    out = new.run()
    # a never-failed engine given the same requests in the same order computes the same batches
    reference = Engine(m, max_slots=2, max_len=48, prefill_chunk=4)
    ref_ids = [reference.add(p, SamplingParams(max_new_tokens=6)) for p in [*prompts[2:], prompts[0]]]
    ref_out = reference.run()
    assert [out[rid] for rid in [*ids[2:], fresh]] == [ref_out[rid] for rid in ref_ids]
    assert all(len(out[rid][0]) > 0 for rid in out) and new.stats().slots_used == 0


def test_prefill_warmup_shapes_reach_every_bucket():
    from lowbit.engine.scheduler import prefill_warmup_shapes

    assert prefill_warmup_shapes(1, 1, 4) == [(1, 1)]
    one_row = [1, 2, 3, 4, 7, 8, 15, 16, 31, 32, 63, 64, 127, 128, 255, 256]
    assert prefill_warmup_shapes(256, 256, 8) == [(1, T) for T in one_row]
    assert prefill_warmup_shapes(256, 4096, 8) == [(1, T) for T in one_row] + [
        (2, 256), (2, 255), (4, 256), (4, 255), (8, 256), (8, 255)]  # 16 rows: more than the slots
    assert [T for _, T in prefill_warmup_shapes(100, 100, 1)] == [1, 2, 3, 4, 7, 8, 15, 16, 31, 32, 63, 64, 99, 100]


def test_prefill_warm_up_runs_each_length_and_changes_no_answer(model, monkeypatch):
    """The warm-up prefills slot 0 at every warm-up length; a request that then lands in slot 0 gets
    the tokens it gets alone (its own prefill overwrites what the warm-up wrote)."""
    seen: list[int] = []
    forward = Engine._forward

    def spy(self, slots, ids, positions, contiguous=False):  # noqa: ANN001, ANN202
        seen.append(ids.shape[1])
        assert slots == list(range(ids.shape[0]))
        return forward(self, slots, ids, positions, contiguous)

    monkeypatch.setattr(Engine, "_forward", spy)
    engine = Engine(model, max_slots=2, max_len=64, prefill_chunk=16, warm_prefill=True)
    assert seen == [1, 2, 3, 4, 7, 8, 15, 16, 16, 15] and engine.prefill_warmup_s > 0  # then 2 rows of 16, of 15
    assert Engine(model, max_slots=2, max_len=64, prefill_chunk=16).prefill_warmup_s == 0  # CPU: off by default
    p = _prompts()[4]
    rid = engine.add(p, SamplingParams(max_new_tokens=9))
    alone = generate(model, [p], SamplingParams(max_new_tokens=9))[0].token_ids
    assert engine.run()[rid] == (alone, "length")


def test_equal_chunks_prefill_together_and_tokens_match(model, monkeypatch):
    """Requests whose next chunk has the same start and length prefill in one forward (up to
    prefill_tokens); a different-length prompt goes on its own; every answer equals its prompt alone."""
    rows: list[int] = []
    forward = Engine._forward

    def spy(self, slots, ids, positions, contiguous=False):  # noqa: ANN001, ANN202
        if contiguous:
            rows.append(ids.shape[0])
        return forward(self, slots, ids, positions, contiguous)

    monkeypatch.setattr(Engine, "_forward", spy)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (8, 8, 8, 5, 8)]
    engine = Engine(model, max_slots=5, max_len=64, prefill_chunk=4, prefill_tokens=12)
    ids = [engine.add(p, SamplingParams(max_new_tokens=6)) for p in prompts]
    out = engine.run()
    # chunks [0, 4): the four 8-token prompts and the 5-token one match, 12 tokens = 3 rows, then 2;
    # chunks [4, 8) of the 8-token prompts: 3 rows, then 1; the 5-token prompt's last token [4, 5) alone
    assert sorted(rows, reverse=True) == [3, 3, 2, 1, 1]
    for rid, p in zip(ids, prompts):
        assert out[rid] == (generate(model, [p], SamplingParams(max_new_tokens=6))[0].token_ids, "length")
    with pytest.raises(LowbitError, match="prefill_tokens must be >= 1"):
        Engine(model, max_slots=1, max_len=64, prefill_tokens=0)
