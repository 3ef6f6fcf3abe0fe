"""Option groups shared by several ``lowbit`` commands (argparse), and the parsing of their values."""

from __future__ import annotations

import argparse

from lowbit.errors import LowbitError


def add_placement(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument(
        "--dtype", default="auto", help="fp32, fp16 or bf16 (default: bf16 on GPUs that have it, fp32 on CPU)"
    )
    add_workload(p)


def add_workload(p: argparse.ArgumentParser) -> None:
    from lowbit.kernels.dispatch import WORKLOAD_ENV, WORKLOADS

    p.add_argument("--workload", choices=tuple(WORKLOADS), default=None,
                   help="the batch sizes to pack int4 weights for, where the GPU's kernel table has more than one "
                   "weight order for a layer (H200 W4A16 and W4A8): latency (1-16 sequences), throughput (64 and up) or "
                   f"balanced (all; the default, or ${WORKLOAD_ENV})")


def add_calibration(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", default="wiki", help="calibration text: wiki (default corpus, calib split) or a .txt/.jsonl file")
    p.add_argument("--samples", type=int, default=128, help="calibration windows (default: 128)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window (default: 512)")
    p.add_argument("--seed", type=int, default=0, help="seed for drawing calibration windows (default: 0)")


def add_report_files(p: argparse.ArgumentParser, plot: str) -> None:
    """--json, --plot and --from-json of the benchmark commands."""
    p.add_argument("--json", metavar="FILE", help="write every measurement as JSON")
    p.add_argument("--plot", metavar="FILE", help=f"write a PNG (matplotlib): {plot}")
    p.add_argument("--from-json", metavar="FILE", help="no GPU: re-print the table (and --plot) from a saved --json")


def int_list(value: str, flag: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError as exc:
        raise LowbitError(f"{flag} takes comma-separated integers, got {value!r}") from exc
    if not out or min(out) < 1:
        raise LowbitError(f"{flag} needs integers >= 1, got {value!r}")
    return out
