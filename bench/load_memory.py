"""Peak GPU memory while loading a W4 checkpoint, against the checkpoint's bytes (issue 17, item 3).

    python bench/load_memory.py [--scheme w4a16-rtn] [--dir /tmp/lowbit-8b-w4]

Writes (once) a random-weight Llama-3-8B-shaped checkpoint quantized by round-to-nearest in
``--scheme`` (``lowbit.bench.synthetic``), then, in a fresh process state, loads it with
``lowbit.load_model(device="cuda")`` and prints ``torch.cuda.max_memory_allocated`` during the load
beside the checkpoint's size (target: at most 1.1x), and the same after the inference set-up
(``prepare_for_inference``: fusion and kernel packing). The 70B figure is the 8B ratio applied to a
70B W4 checkpoint's size (~38 GB).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _write(out: Path, scheme: str) -> None:
    import torch

    from lowbit.bench.synthetic import LLAMA3_8B, quantize_rtn, random_model
    from lowbit.model.native_checkpoint import save_quantized

    model = quantize_rtn(random_model(LLAMA3_8B, "cuda", torch.float16), scheme)
    save_quantized(model.cpu(), out, overwrite=True)


def _load(out: Path) -> None:
    import time

    import torch

    from lowbit.engine.inference import prepare_for_inference
    from lowbit.model.loader import load_model

    ckpt = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    loaded = load_model(out, device="cuda", dtype="fp16", with_tokenizer=False)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    peak_load = torch.cuda.max_memory_allocated()
    held = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    prepare_for_inference(loaded.model)
    torch.cuda.synchronize()
    peak_prep, after = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
    gb = 1e9
    print(f"GPU: {torch.cuda.get_device_name()}; checkpoint {ckpt / gb:.2f} GB ({out})")
    print("| stage | peak allocated GB | x checkpoint | held after GB |")
    print("|---|---|---|---|")
    print(f"| load_model ({load_s:.1f} s) | {peak_load / gb:.2f} | {peak_load / ckpt:.2f} | {held / gb:.2f} |")
    print(f"| + prepare_for_inference | {peak_prep / gb:.2f} | {peak_prep / ckpt:.2f} | {after / gb:.2f} |")
    print(f"implied for a 70B W4 checkpoint (38 GB): load peak {38 * peak_load / ckpt:.1f} GB, "
          f"after set-up {38 * after / ckpt:.1f} GB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scheme", default="w4a16-rtn")
    ap.add_argument("--dir", default="/tmp/lowbit-8b-w4")
    ap.add_argument("--stage", choices=("all", "write", "load"), default="all")
    args = ap.parse_args()
    out = Path(args.dir)
    if args.stage in ("all", "write") and not (out / "config.json").is_file():
        _write(out, args.scheme)
    if args.stage == "all":  # the load in a process of its own: nothing of the write left allocated
        subprocess.run([sys.executable, __file__, "--dir", str(out), "--stage", "load"], check=True)
    elif args.stage == "load":
        _load(out)


if __name__ == "__main__":
    main()
