"""2:4-sparse W4A16 (lowbit.kernels.sparse24): the compressed layout bit for bit, the PTX expansion on a
CPU model of its instructions, the Triton kernel against its reference and QuantLinear.forward, errors.

Runs in Triton's interpreter on CPU machines (tests/conftest.py sets TRITON_INTERPRET), where the
plain-Triton expansion runs; on the GPU the PTX one does, and is also compared with the plain one.
bf16 needs the GPU (NumPy has no bf16).
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats import ActivationFormat, WeightFormat
from lowbit.kernels.config import TileConfig
from lowbit.kernels.layout import pack_for_kernels
from lowbit.model.qlinear import QuantLinear
from lowbit.numerics.primitives import num_groups, pack_int4
from lowbit.numerics.quantized import QuantizedWeight
from lowbit.quant.sparse import is_2of4

triton = pytest.importorskip("triton")
from lowbit.kernels.sparse24 import (
    PATTERNS,
    PackedSparse24,
    default_config,
    expansion_asm,
    pack_sparse24,
    sparse24_matmul,
    sparse24_reference,
    unpack_sparse24,
    widen_sparse24,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GPU_ONLY = pytest.mark.skipif(DEVICE == "cpu", reason="NumPy (Triton's interpreter) has no bf16; GPU only")
BF16 = pytest.param(torch.bfloat16, marks=GPU_ONLY)
# small tiles so that the interpreter's runs stay short while N, K still end mid-tile
SMALL = TileConfig(block_m=16, block_n=32)
SMALL_SPLIT = TileConfig(block_m=16, block_n=32, swap=True, split_k=3)
# In the interpreter, split-K's last program (lowbit.kernels.splitk.finish) also adds and casts the
# masked-out lanes of its atomic read, whose values are undefined; they are never stored.
pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered in add:RuntimeWarning")]


def _codes(N: int, K: int, seed: int) -> torch.Tensor:
    """(N, K) int8 codes in [-8, 7], 2:4 sparse: 2 random positions per group of 4 kept (a kept code
    may itself be 0), and every 5th group of row 0 all zeros."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (N, K), generator=g, dtype=torch.int8)
    kept = torch.rand(N, K // 4, 4, generator=g).argsort(-1) < 2
    kept[0, ::5] = False
    return q * kept.reshape(N, K).to(torch.int8)


def _layer(N: int, K: int, group: int | None, seed: int = 0, tile_k: int = 256):
    q = _codes(N, K, seed)
    s = (torch.rand(N, num_groups(K, group), generator=torch.Generator().manual_seed(seed)) * 0.02 + 0.002).half()
    qw = pack_int4(q).to(DEVICE)
    return q, qw, s.to(DEVICE), pack_sparse24(qw, s.to(DEVICE), K, group, tile_k)


def _x(M: int, K: int, seed: int, dtype=torch.float16) -> torch.Tensor:
    return torch.randn(M, K, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def _rel(y, ref) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


# ---- layout -----------------------------------------------------------------------------------

def test_layout_literal_bits():
    """Values: first kept code low nibble, second high (two's complement); patterns index PATTERNS."""
    row = [0, 3, 0, -2, 5, 0, 0, 0, 0, 0, 0, 0, -8, 7, 0, 0, 0, 0, 0, 1]
    K = len(row)
    s = torch.ones(1, 1, dtype=torch.float16)
    p = pack_sparse24(pack_int4(torch.tensor([row], dtype=torch.int8)), s, K, None, tile_k=128)
    assert p.data.shape == (1, 48) and p.Kp == 128  # one tile: 32 value bytes, 16 pattern bytes
    # (1,3): 3, -2 | (0,1): 5, 0 | zeros keep (0,1) | (0,1): -8, 7 | (0,3): 0, 1
    assert p.data[0, :6].tolist() == [0xE3, 0x05, 0x00, 0x78, 0x10, 0x00]
    assert PATTERNS[4] == (1, 3) and PATTERNS[2] == (0, 3)
    assert p.data[0, 32:38].tolist() == [4, 0, 0, 0, 2, 0]  # high nibbles: groups 16.. (padding, 0)
    assert not p.data[0, 6:32].any() and not p.data[0, 38:].any()


@pytest.mark.parametrize("K, group", [(200, 128), (520, 32), (4, None), (256, 64)])
@pytest.mark.parametrize("tile_k", [128, 256])
def test_layout_round_trips_codes(K, group, tile_k):
    q, _, s, p = _layer(24, K, group, seed=K, tile_k=tile_k)
    assert is_2of4(q) and (q == 0).float().mean() > 0.5
    assert torch.equal(unpack_sparse24(p).cpu(), q)
    assert p.Kp % tile_k == 0 and p.data.shape == (24, 3 * p.Kp // 8) and p.scales.shape == (s.shape[1], 24)
    hg = tile_k // 8
    meta = p.data.view(24, -1, 3 * hg)[:, :, 2 * hg:].to(torch.int16)
    assert int((meta & 0xF).max()) < len(PATTERNS) and int((meta >> 4).max()) < len(PATTERNS)


def test_layout_round_trips_every_possible_group():
    """All 6 position pairs x 16 x 16 code pairs (kept zeros included), each once."""
    groups = []
    for p0, p1 in itertools.combinations(range(4), 2):
        for a, b in itertools.product(range(-8, 8), repeat=2):
            g = [0, 0, 0, 0]
            g[p0], g[p1] = a, b
            groups.append(g)
    q = torch.tensor(groups, dtype=torch.int8).reshape(-1, 64)
    p = pack_sparse24(pack_int4(q), torch.ones(q.shape[0], 1, dtype=torch.float16), 64, None, tile_k=128)
    assert torch.equal(unpack_sparse24(p), q)


def test_layout_byte_ratio_against_dense_int4():
    """3.125 bits per weight against 4.125 (group 128): the ratio the module docstring states."""
    N, K = 64, 4096
    _, qw, s, p = _layer(N, K, 128)
    dense = pack_for_kernels(qw, s, None, 128, K)
    assert p.nbytes() == N * K * 3 // 8 + N * (K // 128) * 2
    assert abs(p.nbytes() / dense.nbytes() - 3.125 / 4.125) < 1e-9


def test_layout_rejects_bad_inputs():
    q = _codes(4, 16, 0)
    q[1, 4:8] = torch.tensor([1, 2, 3, 0], dtype=torch.int8)
    s = torch.ones(4, 1, dtype=torch.float16)
    with pytest.raises(LowbitError, match=r"not 2:4 sparse: row 1, input columns 4\.\.7 hold 3 .*sparsity='2:4'"):
        pack_sparse24(pack_int4(q), s, 16, None)
    ok = pack_int4(_codes(4, 16, 0))
    with pytest.raises(LowbitError, match="multiple of 4"):
        pack_sparse24(pack_int4(_codes(4, 16, 0)[:, :14]), s, 14, None)
    with pytest.raises(LowbitError, match="qweight must be uint8"):
        pack_sparse24(ok.to(torch.int8), s, 16, None)
    with pytest.raises(LowbitError, match="qweight must be uint8"):
        pack_sparse24(ok, s, 20, None)
    with pytest.raises(LowbitError, match="scales must be fp16"):
        pack_sparse24(ok, s.float(), 16, None)
    with pytest.raises(LowbitError, match="tile must be one of"):
        pack_sparse24(ok, s, 16, None, tile_k=64)


# ---- the PTX expansion, on a CPU model of its instructions -------------------------------------

_MASK = 0xFFFFFFFF


def _prmt(a: int, b: int, c: int) -> int:
    """PTX prmt.b32, default mode: selector nibble i picks byte (nibble & 7) of {b, a}; bit 3
    replicates that byte's sign instead."""
    pool, out = a | (b << 32), 0
    for i in range(4):
        sel = (c >> 4 * i) & 0xF
        byte = (pool >> 8 * (sel & 7)) & 0xFF
        if sel & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << 8 * i
    return out


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    """PTX lop3.b32: bit i of the result is bit (a_i << 2 | b_i << 1 | c_i) of ``lut``."""
    out = 0
    for idx in range(8):
        if lut >> idx & 1:
            out |= ((a if idx & 4 else ~a) & (b if idx & 2 else ~b) & (c if idx & 1 else ~c)) & _MASK
    return out


def _run_ptx(src: str, regs: dict[str, int]) -> dict[str, int]:
    ops = {"and.b32": lambda a, b: a & b, "or.b32": lambda a, b: a | b, "shr.b32": lambda a, b: a >> b,
           "mov.b32": lambda a: a, "prmt.b32": _prmt, "lop3.b32": _lop3}
    for line in src.splitlines():
        line = line.strip().lstrip("{").strip()
        if not line or line.startswith(".reg") or line == "}":
            continue
        op, args = line.rstrip(";").split(None, 1)
        dst, *srcs = (a.strip() for a in args.split(","))
        assert op in ops, f"instruction {op} is not modelled here"
        regs[dst] = ops[op](*(regs[s] if s in regs else int(s, 0) for s in srcs)) & _MASK
    return regs


@pytest.mark.parametrize("hi", [False, True])
@pytest.mark.parametrize("fp16", [True, False])
def test_expansion_asm_on_cpu_model(hi, fp16):
    """Every output half = BASE bits | (code ^ 8), code = the kept nibble at that column or 0; the
    other half's pattern nibbles (random here, even >= 8) must not matter."""
    src, base, rng = expansion_asm(hi, fp16), (0x6400 if fp16 else 0x4300), random.Random(int(hi) * 2 + fp16)
    for _ in range(400):
        vbytes = [rng.randrange(256) for _ in range(4)]
        pats = [rng.randrange(len(PATTERNS)) for _ in range(4)]
        junk = [rng.randrange(16) for _ in range(4)]
        meta = [(p << 4 | j) if hi else (j << 4 | p) for p, j in zip(pats, junk)]
        regs = _run_ptx(src, {"$8": sum(v << 8 * i for i, v in enumerate(vbytes)),
                              "$9": sum(m << 8 * i for i, m in enumerate(meta))})
        for i in range(4):
            p0, p1 = PATTERNS[pats[i]]
            for c in range(4):
                code = vbytes[i] & 0xF if c == p0 else vbytes[i] >> 4 if c == p1 else 0
                got = regs[f"${2 * c + i // 2}"] >> 16 * (i % 2) & 0xFFFF
                assert got == base | (code ^ 8), (i, c, vbytes, pats)


# ---- the kernel ---------------------------------------------------------------------------------

@pytest.mark.parametrize("M", [1, 3, 17])
@pytest.mark.parametrize("K, group, tile_k", [(200, 128, 256), (200, 128, 128), (520, 32, 256), (264, 32, 128),
                                              (96, None, 256)])
@pytest.mark.parametrize("dtype", [torch.float16, BF16])
def test_sparse24_matches_reference(M, K, group, tile_k, dtype):
    N = 72  # not a multiple of the N tile
    _, _, _, p = _layer(N, K, group, seed=M + K, tile_k=tile_k)
    x = _x(M, K, M, dtype)
    ref = sparse24_reference(x, p)
    for cfg in (SMALL, SMALL_SPLIT):
        y = sparse24_matmul(x, p, config=cfg)
        assert y.shape == (M, N) and y.dtype == dtype
        assert _rel(y, ref) < (1e-2 if dtype == torch.bfloat16 else 2e-3), cfg
    if DEVICE == "cuda":  # the PTX expansion makes the same operands as the plain one
        assert torch.equal(sparse24_matmul(x, p, config=SMALL), sparse24_matmul(x, p, config=SMALL, asm=False))


def test_sparse24_large_m_and_default_config():
    _, _, _, p = _layer(40, 300, 128, seed=5)
    x = _x(127, 300, 5)
    assert _rel(sparse24_matmul(x, p, config=TileConfig(block_m=64, block_n=32)), sparse24_reference(x, p)) < 2e-3
    assert _rel(sparse24_matmul(x[:2], p), sparse24_reference(x[:2], p)) < 2e-3  # default_config
    small, big = default_config(1, 28672, 4096), default_config(256, 28672, 4096)
    assert small.swap and small.block_m == 16 and small.split_k >= 1 and not big.swap
    assert default_config(1, 64, 256).split_k == 1  # never more splits than tiles


@pytest.mark.parametrize("K, group, tile_k", [(200, 128, 256), (264, 32, 128), (96, None, 256)])
@pytest.mark.parametrize("dtype", [torch.float16, BF16])
def test_widen_sparse24_matches_dequantized_reference(K, group, tile_k, dtype):
    """The large-M path's widening: every dense weight, zeros included, equals dequantize_sparse24's
    fp32 value rounded to the dtype; K ends mid-tile, N mid-block."""
    from lowbit.kernels.sparse24 import dequantize_sparse24

    _, _, _, p = _layer(72, K, group, seed=K, tile_k=tile_k)
    w = widen_sparse24(p, dtype)
    assert w.shape == (72, K) and w.dtype == dtype
    assert torch.equal(w, dequantize_sparse24(p).to(dtype))
    if DEVICE == "cuda":
        assert torch.equal(w, widen_sparse24(p, dtype, asm=False))  # PTX and plain expansion agree
    with pytest.raises(LowbitError, match="fp16 or bf16"):
        widen_sparse24(p, torch.float32)


def test_dispatch_widens_2of4_weights_at_large_m():
    """dispatch's sparse24 choice: the fused kernel at small M, widen + matmul from M = 128, both
    within fp16 rounding of the reference."""
    from lowbit.kernels import dispatch, run

    _, _, _, p = _layer(40, 300, 128, seed=6)
    assert dispatch.default_choice("w4a16-2:4", 16, 40, 300, 132).kernel == "triton"
    big = dispatch.default_choice("w4a16-2:4", 128, 40, 300, 132)
    assert big == dispatch.Choice("dequant-cublas")
    x = _x(130, 300, 6)
    bias = _x(1, 40, 7)[0]
    y = run.run_sparse24(x, p, big, bias)
    assert y.shape == (130, 40) and y.dtype == x.dtype
    assert _rel(y, sparse24_reference(x, p, bias)) < 2e-3
    # a bias kept in another dtype (a layer packed in fp16, called in bf16) must not promote the output
    assert run.run_sparse24(x, p, big, bias.to(torch.bfloat16)).dtype == x.dtype


@pytest.mark.parametrize("M", [1, 3, 17])
def test_sparse24_matches_quantlinear_forward(M):
    """The reference equals QuantLinear's reference forward (the library's spec) bit for bit, and
    the kernel is close to it, for a layer built from a w4a16-2:4 QuantizedWeight."""
    N, K = 48, 264
    q, _, s, _ = _layer(N, K, 128, seed=11)
    bias = torch.randn(N, generator=torch.Generator().manual_seed(3)).half()
    qw = QuantizedWeight(WeightFormat(sparsity="2:4"), q, s.cpu())
    layer = QuantLinear.from_quantized(qw, ActivationFormat(), in_features=K, dtype=torch.float16, bias=bias)
    layer = layer.to(DEVICE)
    p = pack_sparse24(layer.qweight, layer.scales, layer.quantized_in_features, layer.wfmt.group_size)
    x = _x(M, K, 20 + M)
    spec = layer(x)
    assert torch.equal(sparse24_reference(x, p, layer.bias), spec)
    y = sparse24_matmul(x, p, layer.bias, config=SMALL_SPLIT)
    assert _rel(y, spec) < 2e-3


def test_sparse24_split_k_leaves_workspace_clean():
    """Two launches in a row: the second would double-count if the first left partial sums behind."""
    _, _, _, p = _layer(50, 640, 128, seed=2)
    x = _x(3, 640, 2)
    ref = sparse24_reference(x, p)
    cfg = TileConfig(block_m=16, block_n=32, swap=True, split_k=4)
    for _ in range(2):
        assert _rel(sparse24_matmul(x, p, config=cfg), ref) < 2e-3


def test_sparse24_errors():
    _, qw, s, p = _layer(16, 64, 32)
    with pytest.raises(LowbitError, match="fp16 or bf16"):
        sparse24_matmul(torch.randn(2, 64, device=DEVICE), p)
    with pytest.raises(LowbitError, match=r"x must be \(M, 64\)"):
        sparse24_matmul(_x(2, 96, 0), p)
    with pytest.raises(LowbitError, match="PackedSparse24 from pack_sparse24"):
        sparse24_matmul(_x(2, 64, 0), pack_for_kernels(qw, s, None, 32, 64))
    with pytest.raises(LowbitError, match=r"bias must be \(16,\)"):
        sparse24_matmul(_x(2, 64, 0), p, torch.zeros(8, device=DEVICE, dtype=torch.float16))
    with pytest.raises(LowbitError, match="each thread expands 4 groups"):
        sparse24_matmul(_x(2, 64, 0), p, config=TileConfig(block_n=16, num_warps=8))
    if DEVICE == "cpu":
        with pytest.raises(LowbitError, match="PTX expansion needs a GPU"):
            sparse24_matmul(_x(2, 64, 0), p, asm=True)
    corrupt = PackedSparse24(p.data | 0x0F, p.scales, p.group_size, p.K, p.tile_k)
    with pytest.raises(LowbitError, match="corrupt 2:4 layout"):
        unpack_sparse24(corrupt)
