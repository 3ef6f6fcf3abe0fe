"""Launch configuration of a GEMM kernel: tile sizes, split-K, warps, pipelining depth, orientation."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class TileConfig:
    """How one GEMM launch is cut into programs.

    block_m, block_n: output tile (rows of x, rows of W). block_k: K columns per loop step (the
    int4 kernels always step by one packed tile of 128 and ignore it). split_k: programs sharing
    one output tile's K loop (``lowbit.kernels.splitk``). swap: compute (W @ x^T)^T, so the weight
    tile is the MMA's M side (>= 64 rows) and the few activation rows its N side (16): at small
    batch the tensor core then does 16x less padded work than with x as the M side.
    """

    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    swap: bool = False

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise LowbitError(f"TileConfig.{name} must be a power of two >= 16, got {v}")
        if self.split_k < 1 or self.num_warps not in (1, 2, 4, 8, 16) or self.num_stages < 1:
            raise LowbitError(f"invalid TileConfig {self}")

    def as_dict(self) -> dict:
        return asdict(self)
