"""Dispatch's table lookup and defaults, the benchmark's shape parsing and report rendering (no GPU)."""

from __future__ import annotations

import json

import pytest

from lowbit.bench import kernels as kb
from lowbit.errors import LowbitError
from lowbit.kernels import dispatch
from lowbit.kernels.config import TileConfig
from lowbit.report_files import write_json


def test_shipped_tables_are_complete_and_valid():
    keys = [p.stem for p in dispatch.TUNED_DIR.glob("*.json")]
    assert {"h100", "h200"} <= set(keys)
    for key in keys:
        table = dispatch.load_table(key)
        # every op but the not-yet-tuned ones (which always get default_choice), and no unknown op
        assert set(dispatch.OPS) - set(dispatch.UNTUNED_OPS) <= set(table["entries"]) <= set(dispatch.OPS), key
        for op, entries in table["entries"].items():
            # the partly tuned ops: small M at least; beyond 4x the largest tuned M, default_choice
            assert {e["M"] for e in entries} >= ({1, 16} if op in dispatch.UNTUNED_OPS else {1, 16, 256, 4096}), \
                (key, op)
            for e in entries:
                assert e["kernel"] in dispatch.KERNELS[op], (op, e)
                dispatch.entry_choice(e)  # raises if the stored config is invalid
        assert set(table["tile_k"].values()) <= {128, 256}


# Where the shipped tables may name a kernel slower than cuBLAS fp16 (issue 18, open), as (first M, last M)
# per op, every loss measured on the H200 (docs/kernels.md, "Where each format still loses"):
# - W4A16 from M = 64, where the GEMM turns compute-bound and every int4-weight kernel of ours (Triton,
#   the Gluon wgmma kernel, widening then cuBLAS) measured below fp16;
# - W4A8 (int8 and fp8 tensor cores) at M = 128-512 on the narrow layers (8B qkv, o, down: 0.52-0.98x),
#   W4A8-g128 at M = 512 (dequant-cublas, 0.43-0.66x);
# - W8A8 on the 8B qkv and o at M = 128-256 (0.89-0.99x): 14-17 us layers, where the separate activation
#   quantization launch is what cuBLAS fp16 does not pay.
# None of these formats holds an fp16 copy of its weights to fall back on. Any other loss fails the test.
KNOWN_LOSSES = {"w4a16": [(64, 4096)], "w4a8": [(128, 512)], "w4a8-fp8": [(128, 512)], "w4a8-g128": [(512, 512)],
                "w8a8-int8": [(128, 256)], "w8a8-fp8": [(128, 256)]}
# LOWBIT_WORKLOAD=throughput packs the narrow 8B layers in CUTLASS's order for batches of 64 and up,
# where it is 0.8-0.94x of fp16 against 0.53-0.89x for the fragment order; at decode batches of 2-32
# that order then runs 0.96-0.98x of fp16 on the 8B qkv (the fragment order's kernels: 1.2-1.5x)
# The H200 table of 2026-12-04 packs the 8B qkv (6144 x 4096) for w4a8-fp8 in CUTLASS's order (it wins
# there from M = 128 on, 1.3-1.8x of fp16 from M = 512); at M = 8-64 that order ran 0.90-0.98x of fp16
# (16.2-18.0 us against 15.6-16.3), where the rows order's Triton kernels were faster (10.4 us at M = 8)
# (--workload throughput packs the 8B qkv in that order for w4a8 too: 0.98-1.00x of fp16 at M = 2-64)
KNOWN_WORKLOAD_LOSSES = {"throughput": {"w4a16": [(1, 32)], "w4a8": [(2, 64)], "w4a8-fp8": [(8, 64)]},
                         "balanced": {"w4a8-fp8": [(8, 64)]}}


def test_no_table_entry_is_slower_than_the_fp16_baseline_it_was_tuned_against():
    """Issue 18: a cell whose best kernel lost to cuBLAS fp16 in the same tuning run is a defect of
    the kernels, named here. Shipped tables tuned before the baseline was recorded (no ``fp16_us``)
    are not judged; the synthetic table shows what is. The losses still measured are ``KNOWN_LOSSES``
    (op: the range of M they lie in)."""
    synthetic = {"entries": {"w4a16": [
        {"N": 4096, "K": 4096, "M": 1, "kernel": "triton", "us": 10.0, "fp16_us": 30.0},
        {"N": 4096, "K": 4096, "M": 256, "kernel": "dequant-cublas", "us": 80.0, "fp16_us": 60.0},
        {"N": 4096, "K": 4096, "M": 16, "kernel": "triton", "us": 12.0},  # an older entry: no baseline
    ]}}
    assert dispatch.slower_than_fp16(synthetic) == [
        "w4a16 N=4096 K=4096 M=256: dequant-cublas 80.0 us > fp16 60.0 us (0.75x)"]
    for key in (p.stem for p in dispatch.TUNED_DIR.glob("*.json")):
        table = dispatch.load_table(key)
        for workload in dispatch.WORKLOADS:  # the entries of the order each workload packs a shape in
            extra = KNOWN_WORKLOAD_LOSSES.get(workload, {})
            known = {op: KNOWN_LOSSES.get(op, []) + extra.get(op, []) for op in table["entries"]}
            unexpected = [
                e for op, entries in table["entries"].items() for e in entries
                if e.get("order", "rows") == dispatch.table_order(table, op, e["N"], e["K"], workload)
                and e.get("fp16_us") is not None and e["us"] > e["fp16_us"]
                and not any(lo <= e["M"] <= hi for lo, hi in known.get(op, []))]
            assert unexpected == [], (key, workload, unexpected)


def test_tuner_times_every_batch_the_issue_names():
    from bench.tune_kernels import TUNE_MS

    assert TUNE_MS == (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


def test_table_key_matches_gpu_names(monkeypatch):
    monkeypatch.delenv("LOWBIT_KERNEL_TABLE", raising=False)
    assert dispatch.table_key("NVIDIA H200") == "h200"
    assert dispatch.table_key("NVIDIA H100 80GB HBM3") == "h100"
    assert dispatch.table_key("NVIDIA A100-SXM4-80GB") is None  # no table: the heuristic default
    monkeypatch.setenv("LOWBIT_KERNEL_TABLE", "/tmp/mine.json")
    assert dispatch.table_key("NVIDIA H200") == "/tmp/mine.json"


def test_lookup_takes_nearest_shape_then_smallest_tuned_m_at_or_above():
    entries = [
        {"N": 4096, "K": 4096, "M": m, "kernel": f"small-{m}"} for m in (1, 16, 256)
    ] + [{"N": 57344, "K": 8192, "M": m, "kernel": f"big-{m}"} for m in (1, 16, 256)]
    assert dispatch.lookup_entry(entries, 1, 4096, 4096)["kernel"] == "small-1"
    assert dispatch.lookup_entry(entries, 9, 6144, 4096)["kernel"] == "small-16"
    assert dispatch.lookup_entry(entries, 17, 28672, 8192)["kernel"] == "big-256"
    assert dispatch.lookup_entry(entries, 1000, 57344, 8192)["kernel"] == "big-256"  # past the largest M
    assert dispatch.lookup_entry(entries, 1025, 57344, 8192) is None  # far past it: default_choice
    assert dispatch.lookup_entry([], 1, 1, 1) is None


@pytest.mark.parametrize("op", dispatch.OPS)
@pytest.mark.parametrize("M", [1, 7, 16, 33, 64, 65, 1000])
def test_default_choice_is_a_valid_kernel(op, M):
    c = dispatch.default_choice(op, M, 6144, 4096, sms=132)
    assert c.kernel in dispatch.KERNELS[op]
    if op == "w4a8" and M == 1:  # the dp4a GEMV: 16-row blocks, enough of them to fill the SMs unsplit
        assert c.kernel == "gemv" and c.config.block_n == 16 and c.config.split_k == 1
    elif M <= 64:
        assert c.config.swap and c.config.block_m >= min(M, 64) and 1 <= c.config.split_k <= 16


def test_choose_refuses_cpu_and_unknown_ops():
    import torch

    with pytest.raises(LowbitError, match="unknown op"):
        dispatch.choose("w3a3", 1, 8, 8, torch.device("cpu"))
    with pytest.raises(LowbitError, match="CUDA devices"):
        dispatch.choose("w4a16", 1, 8, 8, torch.device("cpu"))


def test_parse_shapes():
    assert kb.parse_shapes("llama3-70b:down") == [("llama3-70b down", 8192, 28672)]
    assert len(kb.parse_shapes("llama3-8b,llama3-70b")) == 8
    assert kb.parse_shapes("100x200") == [("100x200", 100, 200)]
    for bad in ("llama3-8b:nope", "7b", "3x4x5"):
        with pytest.raises(LowbitError):
            kb.parse_shapes(bad)


def test_report_table_round_trips_through_json(tmp_path):
    rep = kb.KernelReport("NVIDIA H200", "2026-11-21", "2.11", "3.6")
    for path, us in (("fp16", 100.0), ("fp8-cublas", 60.0), ("w4a16", 40.0)):
        rep.rows.append(kb.Measurement("llama3-8b gateup", 28672, 4096, 1, path, us, 1000))
    out = tmp_path / "k.json"
    write_json(out, rep.to_json())
    d = json.loads(out.read_text())
    w4 = next(r for r in d["rows"] if r["path"] == "w4a16")
    assert w4["speedup_vs_fp16"] == 2.5 and w4["speedup_vs_fp8"] == 1.5
    table = kb.format_table(kb.KernelReport.from_json(d))
    assert "NVIDIA H200" in table and "| llama3-8b gateup (28672x4096) | 1 | 100.0 | 1.67x | 2.50x |" in table


def test_bench_cli_from_json_and_gpu_requirement(tmp_path, capsys):
    import torch

    from lowbit.cli import main

    rep = kb.KernelReport("NVIDIA H200", "2026-11-21", "2.11", "3.6",
                          [kb.Measurement("s", 8, 8, 1, "fp16", 2.0, 128), kb.Measurement("s", 8, 8, 1, "w4a16", 1.0, 32)])
    write_json(tmp_path / "r.json", rep.to_json())
    assert main(["bench", "kernels", "--from-json", str(tmp_path / "r.json")]) == 0
    assert "| s (8x8) | 1 | 2.0 | 2.00x |" in capsys.readouterr().out
    assert main(["bench", "kernels", "--from-json", str(tmp_path / "missing.json")]) == 2
    assert main(["bench", "kernels", "--m", "1,x"]) == 2
    if not torch.cuda.is_available():
        assert main(["bench", "kernels", "--m", "1"]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("op", dispatch.OPS)
def test_tuner_candidates_are_kernels_dispatch_can_run(op):
    from bench.tune_kernels import candidates

    for M in (1, 16, 32, 64, 128, 4096):
        cands = candidates(op, M)
        assert cands and all(c.kernel in dispatch.KERNELS[op] for c in cands), (op, M)


def test_choose_reads_the_gpus_table_and_refuses_fp8_before_sm89(monkeypatch):
    """choose() on a (simulated) CUDA device: the H200 table's entry, the default elsewhere, fp8 checks."""
    import torch

    gpus = {0: ("NVIDIA H200", 132, (9, 0)), 1: ("NVIDIA A100-SXM4-80GB", 108, (8, 0)),
            2: ("NVIDIA H100 80GB HBM3", 132, (9, 0))}
    monkeypatch.setattr(dispatch, "_device_info", lambda index: gpus[index])
    monkeypatch.delenv("LOWBIT_KERNEL_TABLE", raising=False)
    dispatch._choose_cached.cache_clear()
    try:
        h200 = dispatch.load_table("h200")
        order = dispatch.table_order(h200, "w4a16", 28672, 4096)
        want = dispatch.lookup_entry(dispatch.order_entries(h200, "w4a16", order), 1, 28672, 4096)
        got = dispatch.choose("w4a16", 1, 28672, 4096, torch.device("cuda", 0))
        assert got == dispatch.entry_choice(want)
        assert dispatch.choose("w4a16", 1, 28672, 4096, torch.device("cuda", 0)) is got  # memoized
        a100 = torch.device("cuda", 1)
        assert dispatch.choose("w4a16", 3, 4096, 4096, a100) == dispatch.default_choice("w4a16", 3, 4096, 4096, 108)
        with pytest.raises(LowbitError, match="compute capability 8.9"):
            dispatch.choose("w8a8-fp8", 1, 4096, 4096, a100)
        assert dispatch.layout_tile(torch.device("cuda", 0), "w4a8") == dispatch.load_table("h200")["tile_k"]["w4a8"]
        assert dispatch.layout_tile(a100, "w4a8") == 128
        h100 = dispatch.load_table("h100")
        want = dispatch.lookup_entry(h100["entries"]["w4a8"], 16, 57344, 8192)
        got = dispatch.choose("w4a8", 16, 57344, 8192, torch.device("cuda", 2))
        assert got.kernel == want["kernel"] and h100["gpu"].startswith("NVIDIA H100")
    finally:
        dispatch._choose_cached.cache_clear()


def test_new_ops_get_default_choices_and_layout_tiles(monkeypatch):
    """w4a4 / w4ax / sparse24: in OPS and KERNELS, no H200 table entries, so choose() gives there
    default_choice (W4Ax and 2:4 from their kernel module's default_config); their layout
    tiles default to the kernels' own (tests/test_new_format_ops.py runs these configs)."""
    import torch

    pytest.importorskip("triton")  # the kernel modules, for their default_config
    from lowbit.kernels import sparse24, w4a4, w4ax
    from lowbit.kernels.layout import TILE_K

    assert set(dispatch.UNTUNED_OPS) <= set(dispatch.OPS)
    for op in dispatch.UNTUNED_OPS:
        assert dispatch.KERNELS[op][0] == "triton"
    assert dispatch.KERNELS["w4a16-2:4"] == dispatch.KERNELS["w4ax"] == ("triton", "dequant-cublas")
    for M in (1, 16, 65, 1023):
        assert dispatch.default_choice("w4ax", M, 4096, 4000, 132).config == w4ax.default_config(M, 4096, 32, 132)
    # from M = 1024: fake-quantized activations on cuBLAS (lowbit.kernels.w4ax_dequant)
    assert dispatch.default_choice("w4ax", 1024, 4096, 4000, 132) == dispatch.Choice("dequant-cublas")
    for M in (1, 16, 65):  # from M = 128 the 2:4 weights are widened for cuBLAS instead
        assert dispatch.default_choice("w4a16-2:4", M, 4096, 4000, 132).config == sparse24.default_config(
            M, 4096, 4000, 132)
    assert dispatch.default_choice("w4a16-2:4", 128, 4096, 4000, 132) == dispatch.Choice("dequant-cublas")
    for M in (1, 16, 65, 4096):
        # the W4A4 kernel's own default is dispatch's heuristic (off the GPU it assumes 8 SMs)
        assert dispatch.default_choice("w4a4", M, 4096, 4000, 8).config == w4a4.default_config(
            M, 4096, 4000, torch.device("cpu"))
    assert dispatch.default_choice("w4ax", 1, 64, 300, 132).config.split_k <= 3  # never more splits than blocks
    cpu = torch.device("cpu")
    assert dispatch.layout_tile(cpu, "w4a4") == TILE_K and dispatch.layout_tile(cpu, "w4a16-2:4") == sparse24.TILE_K
    monkeypatch.setattr(dispatch, "_device_info", lambda index: ("NVIDIA H200", 132, (9, 0)))
    monkeypatch.delenv("LOWBIT_KERNEL_TABLE", raising=False)
    dispatch._choose_cached.cache_clear()
    try:
        h200 = torch.device("cuda", 0)
        for op in dispatch.UNTUNED_OPS:
            assert dispatch.choose(op, 3, 4096, 4096, h200) == dispatch.default_choice(op, 3, 4096, 4096, 132)
        assert dispatch.layout_tile(h200, "w4a16-2:4") == sparse24.TILE_K
        assert dispatch.layout_tile(h200, "w4a4") == TILE_K
    finally:
        dispatch._choose_cached.cache_clear()
