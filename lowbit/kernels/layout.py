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
