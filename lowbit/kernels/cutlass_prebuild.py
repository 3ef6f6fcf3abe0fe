"""``python -m lowbit.kernels.cutlass_prebuild``: compile lowbit's CUTLASS libraries ahead of time.

The kernel modules (``cutlass_w4a16``, ``cutlass_w4a8``) build their library on first use; this
builds them into the cache at once, so that the first GEMM does not wait minutes for nvcc
(``lowbit.kernels.cutlass_build`` says where the pieces come from).
"""

from __future__ import annotations

import argparse

from lowbit.kernels import cutlass_w4a8, cutlass_w4a16
from lowbit.kernels.cutlass_build import CUTLASS_ENV, build

LIBRARIES = {cutlass_w4a16.LIBRARY: cutlass_w4a16.parts, cutlass_w4a8.LIBRARY: cutlass_w4a8.parts}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m lowbit.kernels.cutlass_prebuild",
        description="Compile lowbit's CUTLASS kernels for sm_90a (H100/H200) into the lowbit cache, so that "
                    f"the first GEMM does not wait for nvcc. Needs nvcc and {CUTLASS_ENV}.")
    ap.add_argument("--library", choices=sorted(LIBRARIES), action="append",
                    help="which library to build (default: all)")
    ap.add_argument("--jobs", type=int, default=None, help="parallel nvcc processes (default: one per CPU)")
    args = ap.parse_args(argv)
    for name in args.library or sorted(LIBRARIES):
        print(build(name, LIBRARIES[name](), jobs=args.jobs, verbose=True))


if __name__ == "__main__":
    main()
