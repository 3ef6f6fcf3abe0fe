"""`lowbit bench e2e` pieces that run without a GPU: the random-weight model and its RTN schemes,
the weight bytes a decode step reads, the report's table and JSON; and, on a GPU, graphed decode."""

from __future__ import annotations

import json

import pytest
import torch

from lowbit.bench import e2e
from lowbit.bench.synthetic import LLAMA3_8B, quantize_rtn, random_model
from lowbit.cli import main
from lowbit.engine.reference import reference_generate as generate
from lowbit.engine.sampling import SamplingParams
from lowbit.engine.scheduler import Engine
from lowbit.errors import LowbitError
from lowbit.model.config import ModelConfig
from lowbit.model.qlinear import QuantLinear
from lowbit.report_files import write_json

TINY = {**LLAMA3_8B, "vocab_size": 97, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 128}
CUDA = torch.cuda.is_available()


def test_llama3_8b_shape():
    cfg = ModelConfig.from_hf(LLAMA3_8B)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim) == \
        (4096, 14336, 32, 8, 128)
    # ~7.5e9 parameters in the decoder and lm_head (8.0e9 with the embedding table)
    n = cfg.num_layers * (4096 * (4096 + 2 * 1024 + 4096) + 3 * 4096 * 14336) + 2 * 128256 * 4096
    assert 7.9e9 < n < 8.1e9


@pytest.mark.parametrize("scheme", ["w4a16", "w4a8", "w8a8-int8"])
def test_rtn_random_model_in_the_schemes_formats(scheme):
    model = random_model(TINY, "cpu", torch.float32)
    assert model.layers[0].mlp.up_proj.weight.std().item() == pytest.approx(0.02, rel=0.2)
    before = e2e.weight_bytes_per_step(model)
    quantize_rtn(model, scheme, progress=False)
    q = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(q) == 7 * 2 and model.quant_scheme.name == scheme
    assert all(m.kernel_format() is not None for m in q)  # every layer has a GPU kernel
    after = e2e.weight_bytes_per_step(model)
    lm_head = model.lm_head.weight.nbytes
    bits = 4 if scheme.startswith("w4") else 8
    # fp32 decoder weights -> bits/32 of their bytes plus scales
    assert (before - lm_head) * bits / 32 < after - lm_head < (before - lm_head) * (bits / 32) * 1.3
    out = model(torch.tensor([[1, 2, 3]]))
    assert out.shape == (1, 3, 97) and torch.isfinite(out).all()
    with pytest.raises(LowbitError, match="already quantized"):
        quantize_rtn(model, scheme, progress=False)


def test_rtn_quantizes_the_head_with_head_modifier():
    model = random_model(TINY, "cpu", torch.float32)
    head_bytes = model.lm_head.weight.nbytes
    before = e2e.weight_bytes_per_step(model)
    quantize_rtn(model, "w4a8+head", progress=False)
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.kernel_format() is not None
    assert not isinstance(model.embed_tokens, QuantLinear)
    # every Linear, the head included, now reads ~4/32 of its fp32 bytes
    assert e2e.weight_bytes_per_step(model) < (before - head_bytes) * 4 / 32 * 1.3 + head_bytes * 4 / 32 * 1.3
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]]))).all()


@pytest.mark.parametrize("scheme", ["w4a4-quik", "w4a4", "w4a4kv4-comet", "w4a16-2:4"])
def test_rtn_builds_the_calibrated_formats(scheme):
    """Outliers, FMPQ blocks and 2:4 masks get synthetic choices (tests/test_bench_new_formats.py checks
    them); whether their layers have GPU kernels is checked by e2e.run on CUDA, not here."""
    model = quantize_rtn(random_model(TINY, "cpu", torch.float32), scheme, progress=False)
    assert len([m for m in model.modules() if isinstance(m, QuantLinear)]) == 7 * 2
    out = model(torch.tensor([[1, 2, 3]]))
    assert out.shape == (1, 3, 97) and torch.isfinite(out).all()
    with pytest.raises(LowbitError, match="have no GPU kernel"):  # on the CPU, no layer has one
        e2e.require_kernels(model, scheme)


def _report() -> e2e.E2EReport:
    rep = e2e.E2EReport("NVIDIA H100 80GB HBM3", "2026-11-21", "2.11", "llama3-8b-random", 3000.0)
    rep.rows = [e2e.E2ERow("transformers", "fp16", "fp16", 1, 512, 30.0, 33.3, 5000.0, 16e9, 480.0, 0.16, 16.5),
                e2e.E2ERow("lowbit", "fp16", "fp16", 1, 512, 150.0, 6.67, 9000.0, 16e9, 2400.0, 0.8, 16.6),
                e2e.E2ERow("lowbit", "w4a8", "fp16", 1, 512, 360.0, 2.78, 8000.0, 5e9, 1800.0, 0.6, 6.0)]
    return rep


def test_table_ratios_and_json_round_trip(tmp_path, capsys):
    rep = _report()
    table = e2e.format_table(rep)
    assert "NVIDIA H100 80GB HBM3" in table
    assert "| lowbit | w4a8 | fp16 | 1 | 360.0 | 2.78 | 1800 (60%) | 8000 | 6.0 | 12.00x | 2.40x |" in table
    path = tmp_path / "e2e.json"
    write_json(path, rep.to_json())
    assert e2e.E2EReport.from_json(json.loads(path.read_text())) == rep
    assert main(["bench", "e2e", "--from-json", str(path)]) == 0
    assert "12.00x" in capsys.readouterr().out
    pytest.importorskip("matplotlib")
    e2e.plot(rep, str(tmp_path / "e2e.png"))
    assert (tmp_path / "e2e.png").stat().st_size > 1000


def test_cli_errors_before_any_gpu_work(capsys):
    assert main(["bench", "e2e", "--kv", "int2"]) != 0
    assert "unknown --kv int2" in capsys.readouterr().err
    assert main(["bench", "e2e", "--batch", "0,4"]) != 0
    assert "--batch needs integers >= 1" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("scheme, kv", [("fp16", "fp16"), ("w4a8", "int4"), ("w4a16", "fp8")])
def test_graphed_decode_gives_the_tokens_of_eager_decode(scheme, kv):
    """CUDA-graph replay (padded batches, a spare slot) against the same engine eager, and the
    reference generate() for the fp16 model: the same greedy tokens."""
    model = random_model({**TINY, "hidden_size": 256, "num_attention_heads": 4, "head_dim": 64,
                          "intermediate_size": 512}, "cuda", torch.float16)
    if scheme != "fp16":
        quantize_rtn(model, scheme, progress=False)
    if scheme == "w4a8":  # the fused projections on the kernels, as lowbit serve runs them
        from lowbit.model.fuse import fuse_projections

        assert fuse_projections(model) == 2 * len(model.layers)
    if scheme != "fp16":
        from lowbit.model.qlinear import use_kernels

        use_kernels(model)
    e2e._set_kv(model, kv)
    prompts = [[5, 6, 7, 8], [9], [10, 11, 12, 13, 14, 15], [16, 17], [18, 19, 20]]
    outs = {}
    for graphs in (False, True):
        engine = Engine(model, max_slots=4, max_len=64, prefill_chunk=3, cuda_graphs=graphs,
                        graph_batch_sizes=[1, 2, 4] if graphs else None)
        assert (engine.graphs is not None) == graphs
        ids = [engine.add(p, SamplingParams(max_new_tokens=9)) for p in prompts]
        res = engine.run()
        outs[graphs] = [res[i][0] for i in ids]
    assert outs[True] == outs[False]
    if scheme == "fp16" and kv == "fp16":
        alone = [generate(model, [p], SamplingParams(max_new_tokens=9))[0].token_ids for p in prompts]
        # the kernel's fp16 products and SDPA may round differently: most rows agree token for token
        assert sum(a == b for a, b in zip(alone, outs[True])) >= 4


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_decode_one_step_ahead_keeps_tokens_stops_and_budgets():
    """Greedy rows on graphs run one step ahead of the host (GraphedDecode.launch_next): requests that
    stop on a token or reach their budget mid-batch, and one that waits for a slot, give the tokens and
    finish reasons of the same engine eager."""
    model = random_model({**TINY, "hidden_size": 256, "num_attention_heads": 4, "head_dim": 64,
                          "intermediate_size": 512}, "cuda", torch.float16)
    prompts = [[5, 6, 7, 8], [9], [10, 11, 12, 13, 14, 15], [16, 17], [18, 19, 20]]
    first = Engine(model, max_slots=4, max_len=64, cuda_graphs=False)
    row0 = first.add(prompts[0], SamplingParams(max_new_tokens=12))
    stop = first.run()[row0][0][4]  # a token row 0 generates: rows stop at it wherever it comes
    budgets = [12, 3, 12, 7, 5]
    outs = {}
    for graphs in (False, True):
        engine = Engine(model, max_slots=4, max_len=64, prefill_chunk=3, cuda_graphs=graphs,
                        graph_batch_sizes=[1, 2, 4] if graphs else None)
        ahead = 0
        if graphs:
            launch_next = engine.graphs.launch_next

            def counted(launch_next=launch_next):
                nonlocal ahead
                ahead += 1
                launch_next()
            engine.graphs.launch_next = counted
        ids = [engine.add(p, SamplingParams(max_new_tokens=n, stop_token_ids=(stop,))) for p, n in zip(prompts, budgets)]
        res = engine.run()
        outs[graphs] = [res[i] for i in ids]
        assert ahead > 0 or not graphs, "the steady batch must run one step ahead"
    assert outs[True] == outs[False]
    assert {reason for _, reason in outs[True]} == {"stop", "length"}
