"""bench/recipe_trace.py's comparison (issue 21, item 1): layers split where each ends, and every kind of
difference two devices can make (an alpha, a clipping row, a quantized row, the hidden states) counted.
The recording half runs the real recipe; it is not run here (minutes on the CPU), but the functions it
wraps must exist under the names it patches."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "recipe_trace.py")


@pytest.fixture(scope="module")
def trace_mod():
    spec = importlib.util.spec_from_file_location("recipe_trace", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _layer(alpha: float, ratio: torch.Tensor, rows: torch.Tensor, first: torch.Tensor) -> list[dict]:
    return [
        {"kind": "hidden", "sum": 0.0, "abs_sum": 1.0, "first": torch.zeros(2, 3)},  # the statistics pass
        {"kind": "smooth", "alpha": alpha, "s": torch.ones(3), "x_sum": 0.0},
        {"kind": "clip", "ratio": ratio, "H_trace": 1.0, "w_sum": 0.0},
        {"kind": "gptq_quantize", "name": "q", "rows": rows, "zeros": torch.zeros(4), "scale": torch.ones(4)},
        {"kind": "hidden", "sum": float(first.double().sum()), "abs_sum": float(first.double().abs().sum()),
         "first": first},
    ]


def test_identical_traces_differ_nowhere_and_each_difference_is_counted(trace_mod):
    g = torch.Generator().manual_seed(0)
    ratio, rows, first = torch.rand(4, generator=g), torch.randint(0, 99, (4,), generator=g), torch.randn(2, 3, generator=g)
    a = {"calls": _layer(0.5, ratio, rows, first) + _layer(0.4, ratio, rows, first)}
    same = trace_mod.layer_diffs(a, a)
    assert len(same) == 2
    assert all(d["clip_rows_differ"] == 0 and d["code_rows_differ"] == 0 and d["hidden_rel"] == 0 for d in same)
    ratio_b, rows_b, first_b = ratio.clone(), rows.clone(), first.clone()
    ratio_b[1] += 0.05
    rows_b[[0, 3]] += 1
    first_b[0, 0] += 1.0
    b = {"calls": _layer(0.5, ratio, rows, first) + _layer(0.6, ratio_b, rows_b, first_b)}
    d0, d1 = trace_mod.layer_diffs(a, b)
    assert d0["clip_rows_differ"] == 0 and d0["code_rows_differ"] == 0
    assert (d1["alphas_a"], d1["alphas_b"]) == ([0.4], [0.6])
    assert (d1["clip_rows_differ"], d1["clip_rows"]) == (1, 4)
    assert (d1["code_rows_differ"], d1["code_rows"]) == (2, 4)
    assert d1["first_rel"] == pytest.approx(1.0 / first.abs().max().item())


def test_row_hashes_tell_rows_apart(trace_mod):
    codes = torch.randint(-8, 8, (5, 37), dtype=torch.int8)
    other = codes.clone()
    other[2, 36] += 1
    assert (trace_mod._row_hashes(codes) != trace_mod._row_hashes(other)).tolist() == [False, False, True, False, False]


def test_the_patched_recipe_functions_exist():
    from lowbit.quant import calibrate, clip, gptq, smooth

    for mod, name in ((smooth, "search_smooth_alpha"), (clip, "search_clip"), (gptq, "gptq_quantize"),
                      (gptq, "rtn_quantize"), (calibrate, "_run_layer")):
        assert callable(getattr(mod, name)), name
