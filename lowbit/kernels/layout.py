"""The int4 weight layout the kernels read, repacked once at load time from the checkpoint's layout.

Checkpoint layout (``lowbit.numerics.primitives.pack_int4``): ``qweight`` (N, ceil(K/2)) uint8, columns
2j and 2j+1 in the low and high nibble of byte j, signed codes as 4-bit two's complement; ``scales``
(N, G) fp16; ``zeros`` (N, G) uint8 for asymmetric formats; ``g_idx`` for act-order.

Kernel layout (``PackedInt4``), chosen so that a K tile of 128 unpacks with no register shuffle:
- ``qweight`` (N, Kp/2) uint8 with Kp = K rounded up to a multiple of ``TILE_K`` = 128. Tile t
  (columns 128t .. 128t+127) is bytes 64t .. 64t+63 of the row: byte 64t + j holds column 128t + j
  in its low nibble and column 128t + 64 + j in its high nibble. So ``byte & 0xF`` is the first half
  of the tile and ``byte >> 4`` the second, each a contiguous block of 64 columns that pairs with a
  contiguous (.., 64) slice of the activations in ``tl.dot``. The checkpoint's even/odd pairing
  would need a join + reshape (a cross-lane shuffle) per tile, measured at 0.6 TB/s in kernel v1/v2
  (docs/kernels-notes.md).
  Each row's tile is 64 contiguous bytes: four 16-byte loads.
- Codes are stored **unsigned**: q + 8 for symmetric formats (so every format dequantizes as
  ``(u - zero) * scale`` with zero = 8 for symmetric), the code itself for asymmetric ones. Unsigned
  nibbles become fp16 with one bit operation (``u | 0x6400`` is the fp16 number 1024 + u), and
  integer MMA can take ``u`` as int8 directly and subtract ``zero * rowsum(x)`` once per tile.
- Padding columns (K .. Kp) hold code ``zero`` (value 0); the kernels also mask the activations.
- ``scales`` (G, N) fp16 and ``zeros`` (G, N) uint8, transposed so that the scales of one group for
  a block of output rows are contiguous (one coalesced load per tile instead of N strided ones).
- ``FragmentInt4``: the same bytes reordered for the Gluon wgmma kernel (see its docstring); dispatch
  tables name it per op (``weight_order``), and the layer then holds only that order.
- act-order with ``g_idx``: columns are sorted by group (``perm``) so that groups are contiguous;
  the kernel wrapper gathers ``x[:, perm]`` first (as exllama and Marlin do).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.numerics.primitives import num_groups, unpack_int4

TILE_K = 128  # K columns per packed tile (default); each half (64) pairs with one MMA operand
TILE_CHOICES = (128, 256)


@dataclass
class PackedInt4:
    """int4 weights (N out x K in) in the kernel layout (module docstring)."""

    qweight: torch.Tensor  # (N, Kp // 2) uint8, tile-interleaved nibbles, unsigned codes
    scales: torch.Tensor  # (G, N) fp16
    zeros: torch.Tensor | None  # (G, N) uint8, asymmetric only (symmetric: implicit 8)
    group_size: int | None  # None = per output channel (G = 1)
    K: int  # logical input features
    perm: torch.Tensor | None = None  # (K,) int64 act-order gather for x, or None
    tile_k: int = TILE_K  # K columns per packed tile: the low nibbles hold its first half

    @property
    def half(self) -> int:
        return self.tile_k // 2

    @property
    def N(self) -> int:
        return self.qweight.shape[0]

    @property
    def Kp(self) -> int:
        return self.qweight.shape[1] * 2

    def nbytes(self) -> int:
        """Bytes a GEMM must read for the weights (codes + scales + zeros)."""
        n = self.qweight.numel() + self.scales.numel() * 2
        return n + (self.zeros.numel() if self.zeros is not None else 0)


# Where each byte of a 16-row x 64-byte tile lies in FragmentInt4: bit b of a byte's offset in the
# tile's 1024 bytes moves it by FRAG_BASES[int8][b] (rows, byte columns). The first five bits are the
# register bits of Hopper wgmma's register operand in lowbit.kernels.mixed_wgmma (DotOperandLayout; ``gl.to_linear_layout`` prints them:
# fp16 k_width 2 [k+1, row+8, k+8, k+16, k+32], int8 k_width 4 [k+1, k+2, row+8, k+16, k+32]), then
# its lane bits [2 along k, 3 along rows]: so each thread's bytes of a step are 32 contiguous bytes
# (two 16-byte shared loads) and a warp's are 512 contiguous bytes (no bank conflicts).
FRAG_BASES = {
    False: ((0, 1), (8, 0), (0, 8), (0, 16), (0, 32), (0, 2), (0, 4), (1, 0), (2, 0), (4, 0)),
    True: ((0, 1), (0, 2), (8, 0), (0, 16), (0, 32), (0, 4), (0, 8), (1, 0), (2, 0), (4, 0)),
}


@dataclass
class FragmentInt4:
    """PackedInt4's int4 weights (128-column tiles) reordered for the register operand of Hopper's wgmma
    (``lowbit.kernels.mixed_wgmma``): its packed weights reach shared memory as they lie and each thread
    reads its bytes 16 at a time (PackedInt4's rows there: 2 at a time).

    ``qweight`` (ceil(N / 16), n_tiles * 1024) uint8: row g holds rows 16g .. 16g + 15 of the weight,
    tile t (columns 128t .. 128t + 127) is bytes 1024t .. 1024t + 1023 of it, and within a tile the byte
    of (row 16g + r, tile byte j) (PackedInt4's byte j: column j in the low nibble, j + 64 in the high)
    lies at the offset whose bits pick ``FRAG_BASES[int8]`` summing to (r, j). Rows past N are zero.
    ``scales``, ``zeros``, ``group_size``, ``K`` as in PackedInt4. The order differs for fp16 and int8
    MMAs (``int8``)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    group_size: int | None
    K: int
    N: int
    int8: bool
    perm: None = None
    tile_k: int = TILE_K

    @property
    def Kp(self) -> int:
        return self.qweight.shape[1] // 1024 * self.tile_k

    def nbytes(self) -> int:
        n = self.qweight.numel() + self.scales.numel() * 2
        return n + (self.zeros.numel() if self.zeros is not None else 0)

    @classmethod
    def from_packed(cls, w: PackedInt4, int8: bool) -> "FragmentInt4":
        if w.tile_k != TILE_K or w.perm is not None:
            raise LowbitError(f"FragmentInt4 takes 128-column tiles without act-order, got tile {w.tile_k}, "
                              f"act-order {w.perm is not None}")
        N, n_tiles = w.N, w.Kp // w.tile_k
        q = torch.nn.functional.pad(w.qweight, (0, 0, 0, -N % 16))  # (N16 * 16, n_tiles * 64)
        # (g, r, t, j) with r and j split into their bits, MSB first -> (g, t, offset bits, MSB first)
        q = q.view(-1, *[2] * 4, n_tiles, *[2] * 6)
        q = q.permute(0, 5, *[_FRAG_DIM_OF_BIT[int8][b] for b in range(9, -1, -1)])
        return cls(q.reshape(-1, n_tiles * 1024).contiguous(), w.scales, w.zeros, w.group_size, w.K, N, int8)

    def to_packed(self) -> PackedInt4:
        """The same weights back in PackedInt4's row order (exactly: ``from_packed``'s inverse)."""
        n_tiles = self.qweight.shape[1] // 1024
        q = self.qweight.view(-1, n_tiles, *[2] * 10)  # (g, t, offset bits MSB first)
        src = _FRAG_BIT_OF_DIM[self.int8]
        q = q.permute(0, *[2 + 9 - src[d] for d in range(4)], 1, *[2 + 9 - src[d] for d in range(4, 10)])
        q = q.reshape(-1, n_tiles * 64)[: self.N].contiguous()
        return PackedInt4(q, self.scales, self.zeros, self.group_size, self.K, None, TILE_K)


def _bit_maps(bases) -> tuple[dict[int, int], list[int]]:
    """For the (row, byte) view of a tile, split into bits MSB first (rows 8 4 2 1, then bytes 32 16 8 4
    2 1: view dims 1-4 and 6-11 of (g, r bits, t, j bits)): the view dim each offset bit comes from,
    and for each of the 10 (row, byte) bits the offset bit that holds it."""
    dims = {(8, 0): 1, (4, 0): 2, (2, 0): 3, (1, 0): 4, (0, 32): 6, (0, 16): 7, (0, 8): 8, (0, 4): 9, (0, 2): 10,
            (0, 1): 11}
    dim_of_bit = {b: dims[tuple(v)] for b, v in enumerate(bases)}
    order = [(8, 0), (4, 0), (2, 0), (1, 0), (0, 32), (0, 16), (0, 8), (0, 4), (0, 2), (0, 1)]
    bit_of_dim = [next(b for b, v in enumerate(bases) if tuple(v) == o) for o in order]
    return dim_of_bit, bit_of_dim


# offset bit b of the fragment order <- this dim of the (g, r bits, t, j bits) view (from_packed), and
# the offset bit holding each (row, byte) bit, MSB first (to_packed): both orders are bit permutations,
# so the repacking is one strided copy (a gather of bytes through an index ran at ~90 GB/s on the H200)
_FRAG_DIM_OF_BIT = {k: _bit_maps(v)[0] for k, v in FRAG_BASES.items()}
_FRAG_BIT_OF_DIM = {k: _bit_maps(v)[1] for k, v in FRAG_BASES.items()}


def _interleave(u: torch.Tensor, tile_k: int) -> torch.Tensor:
    """(N, Kp) uint8 codes in [0, 15] -> (N, Kp/2) bytes in the tile-interleaved order."""
    N, Kp = u.shape
    t = u.view(N, Kp // tile_k, 2, tile_k // 2)
    return (t[:, :, 0] | (t[:, :, 1] << 4)).reshape(N, Kp // 2)


def pack_for_kernels(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int | None,
    K: int,
    g_idx: torch.Tensor | None = None,
    tile_k: int = TILE_K,
) -> PackedInt4:
    """Repack checkpoint-layout int4 weights (module docstring) into ``PackedInt4``.

    qweight (N, ceil(K/2)) uint8; scales (N, G) fp16; zeros (N, G) uint8 or None (symmetric);
    g_idx (K,) int group of each column (act-order without static groups) or None.
    """
    N = qweight.shape[0]
    G = num_groups(K, group_size)
    if tile_k not in TILE_CHOICES:
        raise LowbitError(f"int4 kernel tile must be one of {TILE_CHOICES}, got {tile_k}")
    if qweight.dtype != torch.uint8 or qweight.shape != (N, (K + 1) // 2):
        raise LowbitError(f"int4 qweight must be uint8 ({N}, {(K + 1) // 2}), got {qweight.dtype} {tuple(qweight.shape)}")
    if scales.dtype != torch.float16 or scales.shape != (N, G):
        raise LowbitError(f"int4 scales must be fp16 ({N}, {G}), got {scales.dtype} {tuple(scales.shape)}")
    if zeros is not None and (zeros.dtype != torch.uint8 or zeros.shape != (N, G)):
        raise LowbitError(f"int4 zeros must be uint8 ({N}, {G}), got {zeros.dtype} {tuple(zeros.shape)}")
    symmetric = zeros is None
    codes = unpack_int4(qweight, K, signed=symmetric).to(torch.int16)
    u = (codes + 8) if symmetric else codes  # unsigned, value = (u - zero) * scale
    perm = None
    if g_idx is not None:
        g_idx = g_idx.to(torch.long).to(qweight.device)
        natural = torch.arange(K, device=g_idx.device) // group_size
        if not torch.equal(g_idx, natural):
            perm = torch.sort(g_idx, stable=True).indices
            if not torch.equal(g_idx[perm], natural):
                raise LowbitError("act-order g_idx must give every group exactly group_size columns")
            u = u[:, perm]
    Kp = -(-K // tile_k) * tile_k
    pad_code = 8 if symmetric else 0
    full = torch.full((N, Kp), pad_code, dtype=torch.int16, device=qweight.device)
    full[:, :K] = u
    if not symmetric:  # padding must dequantize to 0: code = that row's last-group zero
        full[:, K:] = zeros[:, -1:].to(torch.int16)
    packed = _interleave(full.to(torch.uint8), tile_k)
    return PackedInt4(
        qweight=packed.contiguous(),
        scales=scales.t().contiguous(),
        zeros=None if zeros is None else zeros.t().contiguous(),
        group_size=group_size,
        K=K,
        perm=perm,
        tile_k=tile_k,
    )


def checkpoint_qweight(p: PackedInt4) -> torch.Tensor:
    """The checkpoint-layout ``qweight`` (N, ceil(K/2)) uint8 that ``pack_for_kernels`` packed into
    ``p``: the kernel codes de-interleaved, put back in natural column order (undoing ``perm``), and
    made signed again for symmetric formats. What a model that keeps only its kernel layout saves."""
    from lowbit.numerics.primitives import pack_int4

    u = unpack_kernel_codes(p)
    if p.perm is not None:
        natural = torch.empty_like(u)
        natural[:, p.perm] = u
        u = natural
    codes = (u - 8).to(torch.int8) if p.zeros is None else u.to(torch.uint8)
    return pack_int4(codes)


def unpack_kernel_codes(p: PackedInt4) -> torch.Tensor:
    """Inverse of the interleave, for tests: (N, K) int16 unsigned codes in natural (post-perm) order."""
    N, half = p.qweight.shape
    b = p.qweight.view(N, half // p.half, p.half).to(torch.int16)
    u = torch.stack([b & 0xF, b >> 4], dim=2).reshape(N, -1)
    return u[:, : p.K]
