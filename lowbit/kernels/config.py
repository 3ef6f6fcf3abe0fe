"""Launch configurations of GEMM kernels: Triton tiles (sizes, split-K, warps, stages, orientation) and CUTLASS kernels."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

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


@dataclass(frozen=True)
class CutlassConfig:
    """One compiled CUTLASS kernel (``lowbit.kernels.cutlass_build``) and how it is launched: ``tile_n``
    weight rows x ``tile_m`` tokens per CTA, ``cluster_n`` CTAs along the weight rows sharing each
    activation tile (TMA multicast), the cooperative (two consumer warpgroups on one tile) or ping-pong
    (one tile each) schedule, and a stream-K tile scheduler or the persistent data-parallel one.

    ``splits`` is a launch argument, not part of the compiled kernel: with stream-K, > 1 splits every
    tile's K loop that many ways, 1 lets CUTLASS's heuristic choose; others take 1 only.
    """

    tile_n: int
    tile_m: int
    cluster_n: int = 1
    cooperative: bool = True
    stream_k: bool = False
    splits: int = 1

    def __post_init__(self) -> None:
        if self.splits < 1 or (self.splits > 1 and not self.stream_k):
            raise LowbitError(f"CutlassConfig splits must be 1, or >= 1 with stream_k; got {self}")

    def name(self) -> str:
        """The compiled kernel's name (no splits)."""
        return (f"bn{self.tile_n} bm{self.tile_m} c{self.cluster_n} {'coop' if self.cooperative else 'pingpong'}"
                + (" streamk" if self.stream_k else ""))

    def label(self) -> str:
        """``name()`` and, for stream-K, its splits: what tables and benchmarks print."""
        return self.name() + (f" s{self.splits}" if self.stream_k else "")

    def compiled(self) -> "CutlassConfig":
        """This kernel without its launch argument: the key of the compiled set."""
        return replace(self, splits=1)

    def defines(self) -> tuple[tuple[str, str], ...]:
        b = lambda v: "true" if v else "false"  # noqa: E731
        return (("LB_TILE_N", str(self.tile_n)), ("LB_TILE_M", str(self.tile_m)),
                ("LB_CLUSTER_N", str(self.cluster_n)), ("LB_COOPERATIVE", b(self.cooperative)),
                ("LB_STREAM_K", b(self.stream_k)))

    def as_dict(self) -> dict:
        return asdict(self)
