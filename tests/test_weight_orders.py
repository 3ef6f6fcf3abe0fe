"""Weight orders in the dispatch tables (issue 18): one per tuned shape, entries looked up in the order a
layer was packed in, the tuner's choice of order, and the CUTLASS W4A16 path's CPU-side contracts."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.kernels import dispatch
from lowbit.kernels.config import CutlassConfig, TileConfig


def _entry(N, K, M, order, us, fp16_us=None, kernel="triton", config=None):
    return {"N": N, "K": K, "M": M, "order": order, "kernel": kernel, "us": us, "fp16_us": fp16_us,
            "config": config}


PER_SHAPE = {"weight_order": {"w4a16": {"default": "fragment", "shapes": [
    {"N": 28672, "K": 4096, "order": "cutlass"}, {"N": 6144, "K": 4096, "order": "fragment"}]}}}


def test_a_table_order_is_the_nearest_tuned_shapes():
    assert dispatch.table_order(PER_SHAPE, "w4a16", 28672, 4096) == "cutlass"
    assert dispatch.table_order(PER_SHAPE, "w4a16", 57344, 8192) == "cutlass"  # nearest: 28672 x 4096
    assert dispatch.table_order(PER_SHAPE, "w4a16", 4096, 4096) == "fragment"  # nearest: 6144 x 4096
    assert dispatch.table_order(PER_SHAPE, "w4a16") == "fragment"  # no shape: the default
    assert dispatch.table_order({"weight_order": {"w4a16": "fragment"}}, "w4a16", 1, 1) == "fragment"  # older
    assert dispatch.table_order({}, "w4a8", 4096, 4096) == "rows"
    with pytest.raises(LowbitError, match="weight order 'columns'"):
        dispatch.table_order({"weight_order": {"w4a16": {"default": "rows", "shapes": [
            {"N": 1, "K": 1, "order": "columns"}]}}}, "w4a16", 1, 1)


def test_entries_are_looked_up_in_the_order_the_weights_are_in():
    cut = CutlassConfig(128, 64, stream_k=True, splits=2)
    table = {**PER_SHAPE, "entries": {"w4a16": [
        _entry(28672, 4096, 64, "cutlass", 40.0, kernel="cutlass", config=cut.as_dict()),
        _entry(28672, 4096, 64, "fragment", 50.0, kernel="wgmma", config=TileConfig(64, 128).as_dict()),
        {"N": 6144, "K": 4096, "M": 64, "kernel": "gemv", "us": 9.0, "config": None},  # no order: the default
    ]}}
    cutlass = dispatch.order_entries(table, "w4a16", "cutlass")
    assert [e["kernel"] for e in cutlass] == ["cutlass"]
    assert [e["kernel"] for e in dispatch.order_entries(table, "w4a16", "fragment")] == ["wgmma", "gemv"]
    choice = dispatch.entry_choice(dispatch.lookup_entry(cutlass, 32, 28672, 4096))
    assert choice == dispatch.Choice("cutlass", cut) and choice.config_str() == "bn128 bm64 c1 coop streamk s2"
    assert isinstance(dispatch.entry_choice(table["entries"]["w4a16"][1]).config, TileConfig)
    assert dispatch.order_entries(table, "w4a16", "rows") == []


def test_the_tuner_packs_each_shape_in_the_order_that_loses_least_over_all_batches():
    entries = []
    for M, frag, cut in ((1, 10.0, 12.0), (16, 11.0, 11.5), (256, 80.0, 40.0), (4096, 900.0, 800.0)):
        entries += [_entry(28672, 4096, M, "fragment", frag), _entry(28672, 4096, M, "cutlass", cut)]
    # a narrow layer: CUTLASS 2x slower at decode, 5% faster at large M
    for M, frag, cut in ((1, 5.0, 10.0), (16, 5.0, 10.0), (256, 40.0, 38.0), (4096, 400.0, 380.0)):
        entries += [_entry(6144, 4096, M, "fragment", frag), _entry(6144, 4096, M, "cutlass", cut)]
    entries.append(_entry(4096, 4096, 1, "fragment", 3.0))  # one order only
    assert dispatch.pick_weight_orders(entries) == {(28672, 4096): "cutlass", (6144, 4096): "fragment",
                                                    (4096, 4096): "fragment"}
    # orders timed in different runs are compared as measured: a baseline outlier in one run does
    # not count for or against an order
    runs = [_entry(1, 1, 1, "fragment", 20.0, 40.0), _entry(1, 1, 1, "cutlass", 12.0, 20.0)]
    assert dispatch.pick_weight_orders(runs) == {(1, 1): "cutlass"}
    with pytest.raises(LowbitError, match="share no batch size"):
        dispatch.pick_weight_orders([_entry(1, 1, 1, "fragment", 1.0), _entry(1, 1, 2, "cutlass", 1.0)])


def test_only_the_packed_orders_entries_are_judged_against_fp16():
    table = {**PER_SHAPE, "entries": {"w4a16": [
        _entry(28672, 4096, 256, "fragment", 90.0, 60.0),  # never run at this shape: not judged
        _entry(28672, 4096, 256, "cutlass", 70.0, 60.0),
        _entry(6144, 4096, 256, "fragment", 30.0, 40.0)]}}
    assert dispatch.slower_than_fp16(table) == [
        "w4a16 N=28672 K=4096 M=256: triton 70.0 us > fp16 60.0 us (0.86x)"]


def test_tuner_orders_and_candidates():
    from bench.tune_kernels import cutlass_candidates, order_spec

    from lowbit.kernels.cutlass_w4a16 import TILES, config_index

    for M in (1, 16, 64, 512, 4096):
        cands = cutlass_candidates(M)
        assert cands and all(c.kernel == "cutlass" for c in cands)
        for c in cands:
            config_index(torch.float16, c.config)  # every candidate is a compiled kernel
        assert len({c.config for c in cands}) == len(cands)
    assert max(c.config.tile_m for c in cutlass_candidates(1)) <= 64
    assert min(c.config.tile_m for c in cutlass_candidates(4096)) >= 64
    assert len(cutlass_candidates(64)) == sum(3 if t.stream_k else 1 for t in TILES)
    spec = order_spec([_entry(8, 8, 1, "cutlass", 1.0), _entry(8, 8, 1, "fragment", 2.0)], "fragment")
    assert spec == {"default": "fragment", "shapes": [{"N": 8, "K": 8, "order": "cutlass"}]}
    assert dispatch.table_order({"weight_order": {"w4a16": spec}}, "w4a16", 8, 8) == "cutlass"


def test_cutlass_ordered_weights_refuse_the_cpu():
    from lowbit.kernels import ops

    x = torch.randn(2, 256, dtype=torch.float16)
    with pytest.raises(LowbitError, match="CUDA devices only"):
        ops.w4a16_cutlass(x, torch.zeros(128 * 128, dtype=torch.uint8), torch.ones(2, 128).half(), None, 128, 256, 128)


def test_prepare_kernels_records_the_activation_dtype_and_a_move_forgets_it():
    from lowbit.formats import ActivationFormat, WeightFormat
    from lowbit.model.qlinear import QuantLinear
    from lowbit.quant.gptq import rtn_quantize

    fmt = WeightFormat(bits=4, group_size=128, method="rtn")
    lin = QuantLinear.from_quantized(rtn_quantize(torch.randn(64, 256), fmt), ActivationFormat(), in_features=256,
                                     dtype=torch.float16)
    assert not lin.prepare_kernels(torch.bfloat16)  # the CPU: no kernel, but the dtype is kept
    assert lin.kernel_dtype == torch.bfloat16
    lin.to(torch.float16)
    assert lin.kernel_dtype is None


def test_pick_weight_orders_is_a_geometric_mean():
    """Two orders each 2x faster at one batch size tie; the tie goes to the first name in sorted order."""
    entries = [_entry(1, 1, 1, "fragment", 1.0), _entry(1, 1, 1, "cutlass", 2.0),
               _entry(1, 1, 2, "fragment", 4.0), _entry(1, 1, 2, "cutlass", 2.0)]
    assert dispatch.pick_weight_orders(entries) == {(1, 1): "cutlass"}


def test_the_workload_picks_the_order_from_the_batch_sizes_it_serves(monkeypatch):
    """A narrow layer whose fragment-order kernels win at decode batches and whose CUTLASS ones win from
    M = 64: "latency" packs it in the fragment order, "throughput" in CUTLASS's, "balanced" takes what
    the tuner recorded for all batch sizes."""
    entries = []
    for M, frag, cut in ((1, 10.0, 16.0), (16, 12.0, 16.0), (64, 19.0, 18.0), (256, 40.0, 26.0)):
        entries += [_entry(6144, 4096, M, "fragment", frag), _entry(6144, 4096, M, "cutlass", cut)]
    table = {"weight_order": {"w4a16": {"default": "fragment", "shapes": [
        {"N": 6144, "K": 4096, "order": "fragment"}]}}, "entries": {"w4a16": entries}}
    assert dispatch.table_order(table, "w4a16", 4096, 4096, "latency") == "fragment"
    assert dispatch.table_order(table, "w4a16", 4096, 4096, "throughput") == "cutlass"
    assert dispatch.table_order(table, "w4a16", 4096, 4096, "balanced") == "fragment"
    # a shape tuned in one order only keeps it whatever the workload
    one = {"weight_order": {"w4a16": "fragment"}, "entries": {"w4a16": [_entry(8, 8, 256, "fragment", 1.0)]}}
    assert dispatch.table_order(one, "w4a16", 8, 8, "throughput") == "fragment"
    monkeypatch.setenv(dispatch.WORKLOAD_ENV, "throughput")
    assert dispatch.workload() == "throughput"
    monkeypatch.setenv(dispatch.WORKLOAD_ENV, "fast")
    with pytest.raises(LowbitError, match="LOWBIT_WORKLOAD='fast'"):
        dispatch.workload()


def test_cli_workload_reaches_the_packer_and_bad_values_are_refused(monkeypatch, tmp_path, capsys):
    from lowbit.cli import build_parser, main

    monkeypatch.delenv(dispatch.WORKLOAD_ENV, raising=False)
    # a command that fails fast after parsing: the workload is set before it runs
    assert main(["bench", "e2e", "--workload", "throughput", "--from-json", str(tmp_path / "none.json")]) != 0
    assert dispatch.workload() == "throughput"
    for cmd in (["generate", "m", "-p", "hi"], ["serve", "m"], ["eval", "m"]):
        assert build_parser().parse_args(cmd + ["--workload", "latency"]).workload == "latency"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "m", "--workload", "fast"])
    assert "invalid choice" in capsys.readouterr().err


def test_w4a8_ops_take_the_cutlass_order_too():
    from bench.tune_kernels import ORDERED_OPS, candidates

    from lowbit.kernels.cutlass_w4a8 import config_index

    for op, adtype in (("w4a8", "int"), ("w4a8-fp8", "fp8_e4m3")):
        assert "cutlass" in ORDERED_OPS[op] and "cutlass" in dispatch.KERNELS[op]
        for M in (1, 16, 256, 4096):
            cands = candidates(op, M, 4096, 128, "cutlass", 4096)
            assert cands and all(c.kernel == "cutlass" for c in cands)
            for c in cands:
                config_index(adtype, torch.float16, c.config)


def test_rows_ordered_w4a8_layers_look_up_rows_entries_only(monkeypatch):
    """A W4A8 layer packed in rows order (PackedInt4) must be served by an entry tuned in rows order,
    whatever order the table packs its shape in: on the H200 with --workload latency, a rows layer
    of a shape whose balanced order is CUTLASS's got a CutlassConfig and crashed in the Triton kernel."""
    from types import SimpleNamespace

    from lowbit.kernels import ops

    seen = []

    def fake_choose(op, M, N, K, device, order=None):
        seen.append((op, order))
        return dispatch.Choice("triton", TileConfig(16, 64))

    monkeypatch.setattr(dispatch, "choose", fake_choose)
    w = SimpleNamespace(N=4096, K=4096, half=64)
    for group, adtype, op in ((0, "int8", "w4a8"), (0, "fp8_e4m3", "w4a8-fp8"), (128, "int8", "w4a8-g128")):
        ops._w4a8_choice(w, group, adtype, 3, torch.device("cpu"))
        assert seen[-1] == (op, "rows")


def test_choose_without_an_order_follows_the_workload_the_layers_were_packed_for(monkeypatch):
    """choose(order=None) looks in the order weight_order packs the shape in for $LOWBIT_WORKLOAD, not
    the balanced one: the H200 table packs the 8B gate+up's w4a8 in CUTLASS's order for "balanced" and
    in rows order for "latency"."""
    monkeypatch.setattr(dispatch, "_device_info", lambda index: ("NVIDIA H200", 132, (9, 0)))
    monkeypatch.delenv("LOWBIT_KERNEL_TABLE", raising=False)
    h200 = dispatch.load_table("h200")
    dev = torch.device("cuda", 0)
    dispatch._choose_cached.cache_clear()
    try:
        for workload in ("balanced", "latency"):
            monkeypatch.setenv(dispatch.WORKLOAD_ENV, workload)
            order = dispatch.weight_order(dev, "w4a8", 28672, 4096)
            want = dispatch.lookup_entry(dispatch.order_entries(h200, "w4a8", order), 1, 28672, 4096)
            assert dispatch.choose("w4a8", 1, 28672, 4096, dev) == dispatch.entry_choice(want)
        assert {dispatch.table_order(h200, "w4a8", 28672, 4096, w) for w in ("balanced", "latency")} == {
            "cutlass", "rows"}
    finally:
        dispatch._choose_cached.cache_clear()
