"""``lowbit advise``: memory arithmetic, the prediction's ranking against the measured one, the CLI."""

from __future__ import annotations

import json

import pytest

from lowbit.bench.advise import GPUS, advise, bits_per_weight, read_accuracy, recommend
from lowbit.bench.synthetic import LLAMA3_8B, LLAMA3_70B
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.formats import get_scheme
from lowbit.model.config import ModelConfig

CFG_8B = ModelConfig.from_hf(LLAMA3_8B)


def test_weight_memory_is_the_layers_bits_plus_fp16_embedding_and_head():
    by = {a.scheme: a for a in advise(CFG_8B, GPUS["h200"], context=512)}
    linear = 32 * (6144 * 4096 + 4096 * 4096 + 28672 * 4096 + 4096 * 14336)  # 6.98e9 decoder weights
    head = 2 * 128256 * 4096 * 2
    assert by["fp16"].weight_gb == pytest.approx((head + linear * 2) / 1e9)
    assert bits_per_weight(get_scheme("w4a16"), 4096) == 4 + 16 / 128
    assert by["w4a16"].weight_gb == pytest.approx((head + linear * (4 + 16 / 128) / 8) / 1e9)
    assert by["w8a8-fp8"].weight_gb < by["fp16"].weight_gb


def test_70b_in_fp16_does_not_fit_an_h200_and_w4_does():
    by = {a.scheme: a for a in advise(ModelConfig.from_hf(LLAMA3_70B), GPUS["h200"], context=2048)}
    assert all(v is None for v in by["fp16"].decode_tok_s.values()) and by["fp16"].prefill_tok_s is None
    assert "does not fit" in by["fp16"].notes[0]
    assert by["w4a8"].decode_tok_s[1] is not None and by["w4a8"].decode_tok_s[256] is None  # KV for 256 x 2048
    scheme, why = recommend(list(by.values()), "throughput", 5.0)
    assert scheme != "fp16" and "batch 64" in why


def test_predicted_ranking_agrees_with_the_measured_one_on_the_h200():
    """bench e2e on the H200, 2026-12-01, Llama-3-8B shape, context 512 (issue 18's table): decode over
    our fp16 at batch 1 w4a8 2.05x > w4a16 1.25x > fp16; at batch 64 w4a8 1.30x > fp16 > w4a16 0.92x;
    at batch 256 w8a8-fp8 1.16x > fp16 > w4a16 0.72x (w4a8 1.00x, a tie with fp16, is left out).
    The advisor reads the table those kernels ran on (tests/data: the H200 table of 2026-11-21); the
    shipped table's W4A16 entries have since moved to the Gluon kernels, not yet measured end to end."""
    from dataclasses import replace
    from pathlib import Path

    then = replace(GPUS["h200"], table=str(Path(__file__).parent / "data" / "h200_table_2026-11-21.json"))
    by = {a.scheme: a.decode_tok_s for a in advise(CFG_8B, then, context=512)}
    rank = lambda B, names: sorted(names, key=lambda s: -by[s][B])  # noqa: E731
    assert rank(1, ["fp16", "w4a16", "w4a8"]) == ["w4a8", "w4a16", "fp16"]
    assert rank(64, ["fp16", "w4a16", "w4a8"]) == ["w4a8", "fp16", "w4a16"]
    assert rank(256, ["fp16", "w4a16", "w8a8-fp8"]) == ["w8a8-fp8", "fp16", "w4a16"]


def test_accuracy_limits_the_recommendation(tmp_path):
    rows = [{"label": "w4a8", "delta_pct": 9.0}, {"label": "w4a16", "delta_pct": 2.0}, {"label": "fp16", "delta_pct": 0.0}]
    f = tmp_path / "eval.json"
    f.write_text(json.dumps({"meta": {}, "rows": rows}))
    acc = read_accuracy(f)
    advice = advise(CFG_8B, GPUS["h200"], context=512, accuracy=acc)
    assert recommend(advice, "latency", 5.0)[0] != "w4a8"
    assert recommend(advice, "latency", 10.0)[0] == "w4a8"
    with pytest.raises(LowbitError, match="not a `lowbit eval --json` file"):
        read_accuracy(tmp_path / "missing.json")


def test_cli_prints_the_table_and_a_recommendation_per_workload(capsys):
    assert main(["advise", "llama3-8b", "--gpu", "h200", "--context", "512"]) == 0
    out = capsys.readouterr().out
    assert "| w4a8 |" in out and "latency: w4a8:" in out and "throughput: " in out
    assert main(["advise", "no/such/dir", "--gpu", "h200"]) == 2
    assert "neither a model directory" in capsys.readouterr().err


def test_cli_auto_gpu_without_one_says_what_to_pass(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["advise", "llama3-8b"]) == 2
    assert "pass --gpu h100 or --gpu h200" in capsys.readouterr().err
