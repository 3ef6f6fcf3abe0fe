"""bench/gptq_speed.py on a tiny Llama shape on the CPU: every phase is timed, the per-layer time is
extrapolated to the model's depth, the quantize hooks are restored afterwards, and --json is written."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

from lowbit.bench.synthetic import LLAMA3_8B
from lowbit.errors import LowbitError
from lowbit.quant import calibrate, clip, gptq, smooth

TINY = {**LLAMA3_8B, "vocab_size": 97, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 128}
PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "gptq_speed.py")


@pytest.fixture()
def bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("gptq_speed_bench", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "SHAPES", {"llama3-8b": TINY})
    return mod


def test_phases_and_extrapolation(bench):
    hooks = [calibrate._run_layer, calibrate._GroupStats.add, smooth.search_smooth_alpha, clip.search_clip,
             gptq._inverse_hessian_cholesky, gptq._gptq_blocks]
    row = bench.run("llama3-8b", "w4a8", layers=2, samples=4, seq_len=16, device="cpu", dtype="fp32")
    assert [calibrate._run_layer, calibrate._GroupStats.add, smooth.search_smooth_alpha, clip.search_clip,
            gptq._inverse_hessian_cholesky, gptq._gptq_blocks] == hooks
    assert row["layers_timed"] == 2 and row["depth"] == 3 and row["extrapolated"]
    assert row["model_s"] == pytest.approx(row["per_layer_s"] * 3)
    assert row["measured_s"] == pytest.approx(sum(row["phases_per_layer_s"].values()) * 2)
    # w4a8 runs every phase: smoothing search, clipping search, Hessian, Cholesky, GPTQ sweep
    assert {"forward", "hessian", "smooth", "clip", "cholesky", "sweep", "other"} <= set(row["phases_per_layer_s"])
    assert all(v >= 0 for v in row["phases_per_layer_s"].values())


def test_layers_out_of_range(bench):
    with pytest.raises(LowbitError, match="--layers must be in 1..3"):
        bench.run("llama3-8b", "w4a16", layers=4, samples=2, seq_len=8, device="cpu", dtype="fp32")


def test_cli_json(bench, tmp_path, monkeypatch, capsys):
    out = tmp_path / "rows.json"
    monkeypatch.setattr(sys, "argv", ["gptq_speed.py", "--schemes", "w4a16", "--samples", "2", "--seq-len", "8",
                                      "--device", "cpu", "--dtype", "fp32", "--json", str(out)])
    bench.main()
    rows = json.loads(out.read_text())
    assert [r["scheme"] for r in rows] == ["w4a16"] and not rows[0]["extrapolated"]
    assert "| llama3-8b | w4a16 | 3/3 |" in capsys.readouterr().out
