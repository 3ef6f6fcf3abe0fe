"""Run one kernel path a few times, for a profiler (ncu) to look at on the device machine.

    ncu --set detailed -k regex:_w4a16 python scripts/profile_one.py w4a16 llama3-8b:gateup 1
"""

from __future__ import annotations

import sys

import torch

from lowbit.bench.kernels import build, parse_shapes

path, shape, M = sys.argv[1], sys.argv[2], int(sys.argv[3])
(_, N, K), = parse_shapes(shape)
make, _ = build(path, N, K, M, torch.device("cuda"))
fn, how = make()
print(path, shape, M, how)
for _ in range(5):
    fn()
torch.cuda.synchronize()
