"""The QUIK / COMET / 2:4 formats in the benchmarks, on the CPU: the synthetic RTN presets of
`lowbit bench e2e` (buffers, shared calibration choices, the reference forward), the new
`lowbit bench kernels` paths (in Triton's interpreter, tests/conftest.py), their table, and the
tuner's candidates for the new ops."""

from __future__ import annotations

import functools
import json
import re

import pytest
import torch

from lowbit.bench import e2e
from lowbit.bench import kernels as kb
from lowbit.bench.synthetic import (
    INPUT_GROUPS,
    LLAMA3_8B,
    prune_2of4,
    quantize_rtn,
    random_model,
)
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.kernels import dispatch
from lowbit.kernels.config import TileConfig
from lowbit.model.qlinear import QuantLinear
from lowbit.numerics.primitives import fake_quantize_weight
from lowbit.quant.sparse import is_2of4
from lowbit.report_files import write_json

# K = 512 and 1024: whole 128-channel blocks, so COMET's 25% is exact (1 of 4, 2 of 8 blocks), and
# QUIK's 256 outlier columns leave 256 quantized ones (a 64-wide model would keep 1)
SMALL = {**LLAMA3_8B, "vocab_size": 97, "hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 128, "max_position_embeddings": 128}
NEW_PRESETS = ("w4a4-quik", "w4a4", "w4a4kv4-comet", "w4a16-2:4")
IDS = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))


@functools.cache
def _quantized(scheme: str, seed: int = 0):
    """The SMALL model quantized with ``scheme``, built once per module run: tests only read it."""
    return quantize_rtn(random_model(SMALL, "cpu", torch.float32), scheme, progress=False, seed=seed)


@functools.cache
def _fp():
    """The float SMALL model (the same random weights as every _quantized one), read only."""
    return random_model(SMALL, "cpu", torch.float32)


def _linears(layer) -> dict[str, torch.nn.Module]:
    return {p: getattr(getattr(layer, p.split(".")[0]), p.split(".")[1]) for g in INPUT_GROUPS for p in g}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ---- synthetic RTN presets ------------------------------------------------------------------------

def test_quik_outliers_shared_per_input_and_weights_exact():
    fp = _linears(_fp().layers[0])
    q = _linears(_quantized("w4a4-quik").layers[0])
    qkv = [q[p] for p in INPUT_GROUPS[0]]
    gate_up = [q[p] for p in INPUT_GROUPS[2]]
    for group in (qkv, gate_up):
        assert all(torch.equal(m.outlier_idx, group[0].outlier_idx) for m in group)  # concatenable
    assert not torch.equal(qkv[0].outlier_idx, gate_up[0].outlier_idx)  # drawn per input
    for path, m in q.items():
        if path == "mlp.down_proj":  # the preset's override: W8A8 int8 per channel, no outliers
            assert (m.wfmt.bits, m.wfmt.group_size, m.afmt.bits, m.outlier_idx) == (8, None, 8, None)
            continue
        assert m.outlier_idx.numel() == 256 and m.quantized_in_features == m.in_features - 256
        assert (m.outlier_idx.diff() > 0).all()
        assert (m.wfmt.bits, m.wfmt.group_size, m.afmt.bits) == (4, None, 4)
        W = fp[path].weight
        torch.testing.assert_close(m.outlier_weight, W[:, m.outlier_idx], rtol=0, atol=0)
        # the library's RTN on the kept columns, bit for bit
        torch.testing.assert_close(m.dequantized_weight(), fake_quantize_weight(W[:, m.kept_idx()], m.wfmt),
                                   rtol=0, atol=0)


def test_plain_w4a4_has_no_outliers():
    for m in _linears(_quantized("w4a4").layers[1]).values():
        assert m.outlier_idx is None and m.act_perm is None
        assert (m.wfmt.bits, m.wfmt.group_size, m.afmt.bits) == (4, None, 4)


def test_comet_blocks_quarter_shared_and_weights_in_act_perm_order():
    fp = _linears(_fp().layers[1])
    q = _linears(_quantized("w4a4kv4-comet").layers[1])
    for group in INPUT_GROUPS:
        first = q[group[0]]
        for p in group:
            m = q[p]
            assert torch.equal(m.act_perm, first.act_perm) and torch.equal(m.fmpq_high, first.fmpq_high)
            K = m.in_features
            assert torch.equal(m.act_perm.sort().values, torch.arange(K))
            n_blocks = K // 128
            assert m.fmpq_high.shape == (n_blocks,) and int(m.fmpq_high.sum()) == n_blocks // 4  # 25%
            assert m.fmpq_high[: n_blocks // 4].all()  # a prefix: the W4Ax kernel needs the 8-bit blocks first
            assert (m.wfmt.group_size, m.afmt.fmpq_block) == (128, 128)
            torch.testing.assert_close(m.dequantized_weight(), fake_quantize_weight(fp[p].weight[:, m.act_perm], m.wfmt),
                                       rtol=0, atol=0)
    assert not torch.equal(q["self_attn.q_proj"].act_perm, q["mlp.gate_proj"].act_perm)
    assert not torch.equal(q["self_attn.q_proj"].act_perm, torch.arange(512))  # random, not the identity


def test_synthetic_choices_follow_the_seed():
    def perm(seed: int) -> torch.Tensor:
        return _quantized("w4a4kv4-comet", seed).layers[0].self_attn.q_proj.act_perm

    assert torch.equal(perm(3), perm(3)) and not torch.equal(perm(3), perm(4))


def test_2of4_mask_keeps_the_two_largest_of_every_four():
    fp = _linears(_fp().layers[0])
    for path, m in _linears(_quantized("w4a16-2:4").layers[0]).items():
        W = fp[path].weight
        N, K = W.shape
        codes = m.codes()
        assert m.wfmt.sparsity == "2:4" and m.wfmt.group_size == 128 and is_2of4(codes)
        # non-zeros only where the weight is among its group's 2 largest magnitudes
        top2 = torch.zeros(N, K // 4, 4, dtype=torch.bool).scatter_(2, W.abs().view(N, K // 4, 4).topk(2, -1).indices, True)
        assert not (codes.view(N, K // 4, 4).ne(0) & ~top2).any()
        # a kept weight rounds to code 0 only when it is under half a step (|w| < absmax / 15 of its
        # group): rare for the larger half of Gaussian weights, so nearly every group keeps exactly 2
        exactly_two = (codes.view(N, K // 4, 4).ne(0).sum(-1) == 2).float().mean().item()
        assert exactly_two > 0.95
        torch.testing.assert_close(m.dequantized_weight(), fake_quantize_weight(prune_2of4(W), m.wfmt), rtol=0, atol=0)
    with pytest.raises(LowbitError, match="multiple of 4"):
        prune_2of4(torch.randn(4, 6))


@pytest.mark.parametrize("scheme", NEW_PRESETS)
def test_reference_forward_stays_close_to_the_float_model(scheme):
    """Bounds from a noise estimate (K = 512): RTN int4 per channel leaves ~12% relative weight noise
    (step absmax / 7.5, absmax ~3 sigma, noise step / sqrt(12)), 4-bit tokens ~12% more, ~17% per
    Linear; this residual stack of random layers amplifies a per-Linear error ~2.4x into the logits
    (w8a8-int8: ~1% per Linear -> 2.4%), so w4a4 ~ 0.41 (measured 0.42). 0.6 leaves margin while a
    layout error (columns out of act_perm order, outlier weights of other columns) decorrelates a
    layer and lands near the 1.36 between two independent random models."""
    fp_logits = _fp()(IDS)
    model = _quantized(scheme)
    logits = model(IDS)
    assert logits.shape == (2, 16, 97) and torch.isfinite(logits).all()
    err = _rel(logits, fp_logits)
    if scheme == "w4a16-2:4":
        # pruning itself removes 13.5% of a Gaussian row's energy (err ~0.77 by itself); against the
        # pruned float model only the int4 g128 rounding remains, which w4a16 holds to ~0.25
        pruned = random_model(SMALL, "cpu", torch.float32)
        with torch.no_grad():
            for layer in pruned.layers:
                for lin in _linears(layer).values():
                    lin.weight.copy_(prune_2of4(lin.weight))
        assert _rel(logits, pruned(IDS)) < 0.35 and err < 1.0
        return
    assert err < 0.6
    if scheme != "w4a4":  # outliers in fp16 (half the columns here) or g128 + 8-bit blocks: less noise
        assert err < _rel(_quantized("w4a4")(IDS), fp_logits)


def test_e2e_refuses_layers_without_kernels_and_counts_outlier_bytes():
    model = _quantized("w4a4-quik")
    # on the CPU no layer has a kernel: the check e2e.run makes after use_kernels names the first one
    with pytest.raises(LowbitError, match=r"have no GPU kernel \(first: layers\.0\.self_attn\.q_proj"):
        e2e.require_kernels(model, "w4a4-quik")
    plain = _quantized("w4a4")
    # 256 fp16 outlier columns per quantized input instead of int4 codes: 2 - 0.5 bytes more per weight
    extra = sum(1.5 * m.out_features * 256 for m in model.modules()
                if isinstance(m, QuantLinear) and m.outlier_idx is not None)
    quik_bytes, plain_bytes = e2e.weight_bytes_per_step(model), e2e.weight_bytes_per_step(plain)
    assert quik_bytes - plain_bytes > 0.9 * extra


def test_weight_bytes_count_the_kernel_layout():
    """With a kernel prepared, a step reads its layout: 2:4 compresses the checkpoint's dense int4 codes
    (4.125 -> 3.125 bits per weight with group-128 scales, sparse24's module docstring)."""
    from lowbit.kernels.sparse24 import pack_sparse24

    one_layer = {**SMALL, "num_hidden_layers": 1}
    model = quantize_rtn(random_model(one_layer, "cpu", torch.float32), "w4a16-2:4", progress=False)
    dense = e2e.weight_bytes_per_step(model)
    saved = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            layout = pack_sparse24(m.qweight, m.scales, m.in_features, 128)
            saved += m.qweight.nbytes + m.scales.nbytes - layout.nbytes()
            m.use_packed(layout)
    assert e2e.weight_bytes_per_step(model) == dense - saved and saved > 0


def test_cli_accepts_the_new_presets_up_to_the_gpu_check(capsys):
    if torch.cuda.is_available():
        pytest.skip("on a GPU this would run the benchmark")
    assert main(["bench", "e2e", "--schemes", "w4a4-quik,w4a4,w4a4kv4-comet,w4a16-2:4+kv4"]) != 0
    assert "needs a CUDA GPU" in capsys.readouterr().err  # the names passed get_scheme
    assert main(["bench", "e2e", "--schemes", "w4a4-comet"]) != 0
    assert "unknown scheme" in capsys.readouterr().err


# ---- `lowbit bench kernels` paths -----------------------------------------------------------------

def _reference(path: str, x: torch.Tensor, w) -> torch.Tensor:
    from lowbit.kernels import sparse24, w4a4, w4ax

    if path.startswith("w4a4"):
        return w4a4.w4a4_reference(w4a4.split_quantize_reference(x, w), w, x.dtype)
    if path == "w4ax":
        return w4ax.w4ax_gemm_reference(w4ax.quantize_mixed_reference(x, w.perm, w.n_hi), w, x.dtype)
    return sparse24.sparse24_reference(x, w)


@pytest.mark.parametrize("path", list(kb.PRESET_PATHS))
def test_new_paths_run_their_kernels(path):
    """The path's layer in its preset's format, through its kernel (the interpreter on the CPU) against
    the kernel module's reference; then ``build`` as the benchmark uses it."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    N, K, M = 40, 512, 3
    w = kb.preset_weights(path, N, K, dev)
    if path == "w4a4-quik":
        assert w.n_out == 256 and kb.preset_weights(path, N, 200, dev).n_out == 199  # at least 1 kept column
    elif path == "w4a4":
        assert w.n_out == 0
    elif path == "w4ax":
        assert (w.n_blocks, w.n_hi) == (4, 1)  # 25% of the blocks at 8 bits
    x = torch.randn(M, K, device=dev).half()
    torch.testing.assert_close(kb.run_preset(path, x, w).float(), _reference(path, x, w).float(),
                               rtol=1e-3, atol=1e-3)
    make, nbytes = kb.build(path, N, K, M, dev)
    fn, how = make()
    y1, y2 = fn(), fn()  # two weight copies: equal values in other memory
    assert y1.shape == (M, N) and torch.isfinite(y1).all() and y1.abs().sum() > 0
    # the same up to the order of split-K's fp32 atomic adds on the GPU (exact in the interpreter)
    torch.testing.assert_close(y1, y2, rtol=1e-3, atol=1e-3)
    assert how.startswith("triton bm") and nbytes == w.nbytes()
    if dev == "cpu":
        assert "kernel default" in how
    fn, how = make(dispatch.Choice("triton", TileConfig(16, 64, split_k=2, swap=True)))  # a tuner candidate
    assert fn().shape == (M, N) and how == "triton bm16 bn64 bk128 sk2 w4 s3 swap"


def test_2of4_path_reads_three_quarters_of_the_dense_bytes():
    dense = kb._random_int4(256, 4096, 128, "cpu", 128).nbytes()
    sparse = kb.preset_weights("w4a16-2:4", 256, 4096, "cpu").nbytes()
    assert sparse / dense == pytest.approx(3.125 / 4.125, rel=1e-3)  # sparse24's module docstring
    with pytest.raises(LowbitError, match="multiple of 4"):
        kb.preset_weights("w4a16-2:4", 8, 130, "cpu")
    with pytest.raises(LowbitError, match="128-channel blocks"):
        kb.preset_weights("w4ax", 8, 256, "cpu", tile_k=256)


def test_config_from_dispatch_only_when_it_knows_the_op(monkeypatch):
    fallback = TileConfig(16, 32)
    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    monkeypatch.setattr(dispatch, "OPS", tuple(op for op in dispatch.OPS if op != "w4ax"))
    assert kb.pick_choice("w4ax", 1, 4096, 4096, cuda, lambda: fallback) == (dispatch.Choice("triton", fallback), False)
    stub = dispatch.Choice("triton", TileConfig(16, 128, split_k=4, swap=True))
    monkeypatch.setattr(dispatch, "OPS", dispatch.OPS + ("w4ax",))
    monkeypatch.setattr(dispatch, "choose", lambda op, M, N, K, device: stub)
    assert kb.pick_choice("w4ax", 1, 4096, 4096, cuda, lambda: fallback) == (stub, True)
    # the interpreter never asks dispatch (which refuses non-CUDA devices)
    assert kb.pick_choice("w4ax", 1, 4096, 4096, torch.device("cpu"), lambda: fallback)[1] is False


def test_parse_paths_table_and_json_with_the_new_paths(tmp_path, capsys):
    assert kb.parse_paths("w4ax,w4a16-2:4,w4ax") == ["fp16", "w4ax", "w4a16-2:4"]
    assert kb.parse_paths(None) == list(kb.PATHS)
    with pytest.raises(LowbitError, match="unknown kernel path.*w4a2"):
        kb.parse_paths("w4a4-quik,w4a2")
    rep = kb.KernelReport("NVIDIA H100 80GB HBM3", "2026-11-21", "2.11", "3.6")
    t = {"fp16": 20.0, "w4a8": 8.0, "w4a4-quik": 10.0, "w4a4": 8.0, "w4ax": 9.0, "w4a16-2:4": 7.0}
    rep.rows = [kb.Measurement("llama3-8b gateup", 28672, 4096, 1, p, us, 1 << 20, "triton") for p, us in t.items()]
    table = kb.format_table(rep)
    assert "| w4a8 | w4a4-quik | w4a4 | w4ax | w4a16-2:4 |" in table  # PATHS order
    assert "| llama3-8b gateup (28672x4096) | 1 | 20.0 | 2.50x | 2.00x | 2.50x | 2.22x | 2.86x |" in table
    path = tmp_path / "k.json"
    write_json(path, rep.to_json())
    assert kb.KernelReport.from_json(json.loads(path.read_text())) == rep
    assert main(["bench", "kernels", "--from-json", str(path)]) == 0
    assert "2.86x" in capsys.readouterr().out
    assert main(["bench", "kernels", "--paths", "w4a4,w4a2"]) != 0  # before any GPU check
    assert "unknown kernel path(s) w4a2" in capsys.readouterr().err
    pytest.importorskip("matplotlib")
    kb.plot(rep, str(tmp_path / "k.png"))
    assert (tmp_path / "k.png").stat().st_size > 1000


def test_cli_help_lists_every_path(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # one line per option: argparse would break "w4a16-2:4" at its hyphen
    with pytest.raises(SystemExit):
        main(["bench", "kernels", "--help"])
    help_text = capsys.readouterr().out
    assert all(re.search(rf"\b{re.escape(p)}\b", help_text) for p in kb.PATHS)
    with pytest.raises(SystemExit):
        main(["bench", "e2e", "--help"])
    help_text = capsys.readouterr().out
    assert all(s in help_text for s in NEW_PRESETS)


# ---- the tuner ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tuner():
    # a script beside the package, imported as tests/test_dispatch.py does
    from bench import tune_kernels

    return tune_kernels


@pytest.mark.parametrize("op", ["w4a4", "w4ax", "w4a16-2:4"])
@pytest.mark.parametrize("M", [1, 16, 32, 64, 128, 4096])
def test_tuner_candidates_for_the_new_ops(tuner, op, M):
    assert op in tuner.ALL_OPS and tuner.OP_PATH[op] in kb.PRESET_PATHS
    for K, tile_k in ((4096, None), (4096, 128), (384, None)):
        all_cands = tuner.candidates(op, M, K, tile_k)
        # 2:4 and W4Ax from M = 64 also time their cuBLAS path (dispatch's large-M one); QUIK has Triton tiles only
        assert {c.kernel for c in all_cands} == ({"triton", "dequant-cublas"} if op != "w4a4" and M >= 64
                                                 else {"triton"})
        cands = [c for c in all_cands if c.kernel == "triton"]
        assert cands and all(c.config is not None for c in cands)
        tk = tuner.layout_tile(op, tile_k)
        steps = -(-K // (128 if op == "w4ax" else tk))
        assert all(c.config.split_k <= steps for c in cands)
        if op == "w4a16-2:4":  # each thread expands 4 groups (sparse24_matmul's check)
            assert all(c.config.block_n * tk // 8 >= 128 * c.config.num_warps for c in cands)
        if M <= 64:
            assert any(c.config.swap for c in cands)  # small M: weights on the MMA's wide side
    assert tuner.layout_tile("w4ax", 256) == 128 and tuner.layout_tile("w4a16-2:4", None) == 256
    assert tuner.layout_tile("w4a4", None) == 128 and tuner.layout_tile("w4a8", 256) == 256
    assert not tuner.accepts("w4a16-2:4", TileConfig(16, 32, num_warps=8), None, 128)


def test_tuner_keeps_the_old_ops_candidates(tuner):
    for op in (op for op in dispatch.OPS if op not in tuner.NEW_OPS):
        for M in (1, 16, 32, 64, 128, 256, 4096):
            assert tuner.candidates(op, M) == tuner.candidates(op, M, 384, 256)  # K, tile_k only prune new ops
    assert any(c.kernel == "widen-w8a8" for c in tuner.candidates("w4a8", 256))
