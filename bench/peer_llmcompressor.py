"""Peer check: llm-compressor's GPTQ W4A16 on lowbit's default model, data and metric.

Not part of lowbit and not run in CI: a one-off recipe that reproduces the peer number quoted in the
docs. It runs llm-compressor (vllm-project/llm-compressor) GPTQ with the weights of its W4A16 preset
(int4 symmetric, group 128, static activation order, lm_head left in full precision) on
SmolLM2-135M-Instruct, calibrated on exactly lowbit's 128 x 512 calibration windows, and scores it
with lowbit's perplexity (wiki eval split, 140 non-overlapping windows of 512 tokens, the first
token of each window not predicted, exp of the mean token NLL).

Two modes, two virtual environments (llm-compressor pins its own transformers, so it does not live
in lowbit's venv):

1. ``--prepare``, in lowbit's venv: converts the default GGUF model to an fp32 HF safetensors copy
   (transformers + gguf), and saves lowbit's calibration windows and evaluation windows as tensors.

       .venv/bin/python bench/peer_llmcompressor.py --prepare

2. ``--run``, in a separate venv with llm-compressor (no lowbit import): scores the unquantized copy
   (sanity check against lowbit's unquantized number), runs oneshot GPTQ, saves the compressed
   model, reloads it from disk, scores it and prints one result line.

       python3 -m venv /tmp/llmc-venv
       /tmp/llmc-venv/bin/pip install torch==2.13.0          # CPU wheel first
       /tmp/llmc-venv/bin/pip install -c <(echo torch==2.13.0) llmcompressor==0.14.0.1
       /tmp/llmc-venv/bin/python bench/peer_llmcompressor.py --run --strategy block

Everything goes under ``--work`` (default /tmp/llmc-peer). The model's hidden size, 576, is not a
multiple of 128: the stock W4A16 preset (``--run`` with no options) refuses 180 of the 210 Linears,
so the number in bench/README.md comes from ``--run --strategy block``: 1 x 128 blocks, i.e. groups of
128 along K with a shorter last group, as lowbit does. ``--group-size 64`` (divides 576) and
``--scale-dtype float16`` (lowbit's scale storage; the default is the weights' dtype, fp32) are the
variants reported there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

GGUF = Path("~/.cache/lowbit/assets/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf").expanduser()
SEQ_LEN, SAMPLES, SEED = 512, 128, 0


def prepare(work: Path) -> None:
    """lowbit's venv: fp32 HF copy of the GGUF model, calibration windows, evaluation windows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowbit.eval.corpus import load_texts
    from lowbit.eval.perplexity import chunk_tokens, tokenize_corpus
    from lowbit.model.loader import load_model
    from lowbit.quant.calibrate import CalibrationConfig, calibration_windows

    work.mkdir(parents=True, exist_ok=True)
    hf_dir = work / "hf-fp32"
    kw = dict(gguf_file=GGUF.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(GGUF.parent, dtype=torch.float32, **kw)
    # the weights are dequantized fp32, but the model is flagged "quantized with gguf" and refuses
    # save_pretrained: copy them into a plain model built from the config minus quantization_config
    config = gguf_model.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.save_pretrained(hf_dir)
    AutoTokenizer.from_pretrained(GGUF.parent, **kw).save_pretrained(hf_dir)

    tok = load_model("smollm2-135m", device="cpu", dtype="fp32").tokenizer
    calib = calibration_windows(
        tokenize_corpus(tok, load_texts("wiki", split="calib")),
        CalibrationConfig(samples=SAMPLES, seq_len=SEQ_LEN, seed=SEED),
    )
    chunks = chunk_tokens(tokenize_corpus(tok, load_texts("wiki", split="eval")), SEQ_LEN)
    torch.save(calib, work / "calib_windows.pt")
    torch.save(chunks, work / "eval_chunks.pt")
    print(f"prepared {hf_dir}, calib {tuple(calib.shape)}, eval {tuple(chunks.shape)}")


@torch.inference_mode()
def perplexity(model, chunks: torch.Tensor, batch_size: int = 8) -> tuple[float, int]:
    """lowbit.eval.perplexity.perplexity, copied: exp(mean NLL), first token of each window unscored."""
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, chunks.shape[0], batch_size):
        batch = chunks[start : start + batch_size]
        logits = model(input_ids=batch).logits
        if not bool(torch.isfinite(logits.sum(dtype=torch.float32))):
            raise RuntimeError("NaN/Inf logits")
        for row in range(batch.shape[0]):
            total += F.cross_entropy(logits[row, :-1].float(), batch[row, 1:], reduction="sum").double()
    tokens = chunks.shape[0] * (chunks.shape[1] - 1)
    return math.exp(total.item() / tokens), tokens


def run(
    work: Path, strategy: str, group_size: int, actorder: str, scale_dtype: str | None, bypass: bool, skip_fp32: bool
) -> None:
    """llm-compressor's venv: oneshot GPTQ W4A16 on the saved windows, then the same perplexity."""
    import compressed_tensors
    import llmcompressor
    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    hf_dir = work / "hf-fp32"
    calib = torch.load(work / "calib_windows.pt")
    chunks = torch.load(work / "eval_chunks.pt")
    versions = (
        f"llmcompressor {llmcompressor.__version__}, compressed-tensors {compressed_tensors.__version__}, "
        f"transformers {transformers.__version__}, torch {torch.__version__}"
    )
    print(versions, flush=True)
    res: dict = {"versions": versions, "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}

    def timed_ppl(model, key: str) -> None:
        t = time.time()
        ppl, tokens = perplexity(model.eval(), chunks)
        res[key], res[key + "_eval_s"], res["tokens"] = round(ppl, 3), round(time.time() - t, 1), tokens
        print(f"{key}: ppl {ppl:.3f} over {tokens} tokens ({res[key + '_eval_s']} s)", flush=True)

    if not skip_fp32:
        timed_ppl(AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32), "fp32")

    # lowbit's windows as a pre-tokenized dataset: every row is already exactly 512 tokens
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    weights = {"num_bits": 4, "type": "int", "symmetric": True}
    if scale_dtype:  # default (None): the weights' dtype, fp32 here; lowbit stores fp16 scales
        weights["scale_dtype"] = scale_dtype
    if strategy == "group":  # the W4A16 preset's weights when group_size == 128
        weights |= {"strategy": "group", "group_size": group_size}
    else:  # rows of 1 x group_size blocks: a shorter last block where K % group_size != 0
        weights |= {"strategy": "block", "block_structure": [1, group_size]}
    kw = {} if actorder == "default" else {"actorder": actorder}
    if (strategy, group_size, scale_dtype) == ("group", 128, None):
        kw |= {"targets": "Linear", "scheme": "W4A16"}
    else:
        kw |= {"config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}}
    recipe = GPTQModifier(ignore=["lm_head"], bypass_divisibility_checks=bypass, **kw)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    tag = f"{strategy}{group_size}" + (f"-{scale_dtype}-scales" if scale_dtype else "")
    out_dir = work / f"llmc-w4a16-{tag}"
    t = time.time()
    oneshot(
        model=model,
        dataset=ds,
        recipe=recipe,
        num_calibration_samples=SAMPLES,
        max_seq_length=SEQ_LEN,
        shuffle_calibration_samples=False,
    )
    res["gptq_s"] = round(time.time() - t, 1)
    qargs = model.model.layers[0].self_attn.q_proj.quantization_scheme.weights
    res["quant_args"] = qargs.model_dump(mode="json", exclude={"zp_dtype"})
    res["q_proj_weight_scale_shape"] = list(model.model.layers[0].self_attn.q_proj.weight_scale.shape)
    print(f"oneshot GPTQ: {res['gptq_s']} s; weights {res['quant_args']}", flush=True)
    in_memory = {n: m.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "weight_scale")}
    model.save_pretrained(out_dir, save_compressed=True)
    del model

    # score the model as saved: reload the compressed checkpoint (decompressed to fp32 on load)
    dequant = CompressedTensorsConfig(dequantize=True)
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, quantization_config=dequant)
    mods = dict(reloaded.named_modules())
    res["reload_max_abs_diff"] = max((mods[n].weight - w).abs().max().item() for n, w in in_memory.items())
    print(f"{len(in_memory)} quantized Linears; reloaded vs in-memory max |diff| {res['reload_max_abs_diff']:.3g}")
    timed_ppl(reloaded, "w4a16")
    res["date"] = time.strftime("%Y-%m-%d")
    (work / f"result-{tag}.json").write_text(json.dumps(res, indent=2))
    print(
        f"RESULT llm-compressor GPTQ W4A16 {tag} actorder={res['quant_args'].get('actorder')}: "
        f"wiki ppl {res['w4a16']} (fp32 {res.get('fp32', 'skipped')}), {res['tokens']} tokens / "
        f"{chunks.shape[0]} x {SEQ_LEN}, {calib.shape[0]} x {calib.shape[1]} calib windows; {versions}; CPU; {res['date']}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prepare", action="store_true", help="lowbit's venv: HF copy + windows")
    mode.add_argument("--run", action="store_true", help="llm-compressor's venv: GPTQ + perplexity")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("LLMC_PEER_WORK", "/tmp/llmc-peer")))
    ap.add_argument("--strategy", choices=("group", "block"), default="group", help="block: [1, group-size] blocks")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--scale-dtype", choices=("float16", "bfloat16", "float32"), help="default: the weights' dtype")
    ap.add_argument("--bypass-divisibility-checks", action="store_true", help="the modifier's option of that name")
    ap.add_argument("--actorder", default="static", help="static | weight | group | default (the modifier's)")
    ap.add_argument("--skip-fp32", action="store_true", help="do not score the unquantized copy")
    args = ap.parse_args()
    if args.prepare:
        prepare(args.work)
    else:
        run(
            args.work, args.strategy, args.group_size, args.actorder, args.scale_dtype,
            args.bypass_divisibility_checks, args.skip_fp32,
        )


if __name__ == "__main__":
    main()
