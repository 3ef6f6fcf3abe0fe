"""The CI fault and load test (tests/test_serve_faults.py::test_fault_and_load) on any model and device:
an in-process server, concurrent streaming clients of which a share hang up, one bad request of each
kind, and an engine fault injected once enough requests are in flight. Prints the load report and
its one-line summary; exit code 0 when it passed.

    python scripts/random_checkpoint.py /tmp/rand1b
    python bench/fault_load.py /tmp/rand1b --device cuda --dtype fp16 --max-slots 32 --max-len 1024

The fault is a RuntimeError raised by ``Engine.step`` at the ``--fault-step``-th step after
``--fault-after`` requests are in flight, on whichever engine is serving then.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lowbit.bench.load import LoadConfig, format_report, run_load  # noqa: E402
from lowbit.serve.app import load_app  # noqa: E402
from lowbit.serve.runner import BackgroundServer  # noqa: E402

FAULT = "injected fault (bench/fault_load.py)"


class _Fault:
    """Makes ``engine.step`` raise once, at its ``at``-th call from now."""

    def __init__(self, engine, at: int) -> None:  # noqa: ANN001
        self.step, self.at, self.calls = engine.step, at, 0
        engine.step = self

    def __call__(self):  # noqa: ANN204
        self.calls += 1
        if self.calls == self.at:
            raise RuntimeError(FAULT)
        return self.step()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-slots", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--prompts", default=None, help="one prompt per line (default: MODEL/prompts.txt)")
    ap.add_argument("--fault-after", type=int, default=24, help="requests in flight before the fault is armed")
    ap.add_argument("--fault-step", type=int, default=3, help="engine steps after arming until it raises")
    ap.add_argument("--timeout", type=float, default=240.0)
    args = ap.parse_args()
    prompts_file = Path(args.prompts or Path(args.model) / "prompts.txt")
    prompts = [line for line in prompts_file.read_text().splitlines() if line.strip()][:16]
    app = load_app(args.model, device=args.device, dtype=args.dtype, name="model", max_slots=args.max_slots,
                   max_len=args.max_len, max_queue=args.clients + 16)
    loop = app.state.served.loop

    def arm() -> None:
        while loop.in_flight < args.fault_after:
            time.sleep(0.005)
        _Fault(loop.engine, args.fault_step)

    with BackgroundServer(app) as url:
        threading.Thread(target=arm, daemon=True).start()
        cfg = LoadConfig(url=url, model="model", clients=args.clients, requests=args.requests,
                         max_tokens=args.max_tokens, timeout_s=args.timeout, prompts=prompts, disconnect_share=0.25,
                         bad_requests=True, expected_error=FAULT)
        report = asyncio.run(run_load(cfg))
        restarts, state = loop.restarts, loop.state
    print(format_report(report))
    print(f"engine restarts: {restarts}, engine {state}")
    return 0 if report.passed and restarts == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
