"""`lowbit quantize` and `lowbit eval` end to end on the default model (small settings), and their errors."""

from __future__ import annotations

import json

import pytest

from lowbit.cli import main


def test_unknown_scheme_lists_the_known_ones(capsys, tmp_path):
    assert main(["quantize", "smollm2-135m", "--scheme", "w2a2", "-o", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert "unknown scheme 'w2a2'" in err and "w4a16" in err and "w4a4kv4-comet" in err


def test_existing_output_is_refused_before_loading(capsys, tmp_path):
    (tmp_path / "q").mkdir()
    assert main(["quantize", "/no/such/model", "--scheme", "w4a16", "-o", str(tmp_path / "q")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_quantize_help_lists_presets(capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    out = capsys.readouterr().out
    for name in ("w4a16", "w8a8-fp8", "w4a4-quik", "+kv4", "--samples", "--seq-len", "--calib"):
        assert name in out


@pytest.mark.asset
def test_quantize_eval_generate_round_trip(capsys, tmp_path):
    """quantize -> eval -> generate through the CLI. What is checked is what our code guarantees: the
    checkpoint holds exactly the model that lowbit.quantize makes in-process with the same settings
    (same greedy tokens), `lowbit generate` prints that model's greedy text, and the perplexity of an
    8-bit model stays within a loose tolerance of the unquantized one. Which words a lossy model
    emits is not checked: it changes with the versions of torch and tokenizers."""
    import torch

    import lowbit
    from lowbit.engine.generate import generate
    from lowbit.engine.text import decode, encode_prompt
    from lowbit.engine.sampling import SamplingParams

    out = tmp_path / "q"
    common = ["--samples", "2", "--seq-len", "64", "--device", "cpu"]
    assert main(["quantize", "smollm2-135m", "--scheme", "w8a8-int8", "-o", str(out), *common]) == 0
    assert "saved to" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["scheme"]["name"] == "w8a8-int8"
    assert (out / "tokenizer.json").is_file()

    report = tmp_path / "eval.json"
    assert main(["eval", "smollm2-135m", str(out), "--schemes", "w4a16-rtn", "--max-chunks", "2",
                 "--eval-seq-len", "128", "--json", str(report), *common]) == 0
    table = capsys.readouterr().out
    assert "unquantized" in table and "w8a8-int8 (q)" in table and "w4a16-rtn" in table
    rows = json.loads(report.read_text())["rows"]
    assert [r["label"].split(" ")[0] for r in rows] == ["unquantized", "w8a8-int8", "w4a16-rtn"]
    assert rows[0]["delta"] == 0 and rows[2]["bits_per_weight"] == pytest.approx(4.125)
    assert all(1 < r["ppl"] < float("inf") for r in rows)
    assert rows[1]["ppl"] < 1.5 * rows[0]["ppl"]  # 8-bit weights and activations: +1.4% on the full split

    prompt = "What is the capital of France?"
    assert main(["generate", str(out), "-p", prompt, "-n", "8", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out

    # the same scheme and calibration in-process: the checkpoint must hold that very model
    reference = lowbit.load_model("smollm2-135m", device="cpu", dtype="fp32")
    lowbit.quantize(reference, "w8a8-int8", calib="wiki", samples=2, seq_len=64, progress=False)
    loaded = lowbit.load_model(out, device="cpu", dtype="fp32")
    ids = encode_prompt(loaded.tokenizer, prompt)
    params = SamplingParams(max_new_tokens=8, stop_token_ids=loaded.stop_token_ids)
    want = generate(reference.model, [ids], params)[0].token_ids
    got = generate(loaded.model, [ids], params)[0].token_ids
    assert got == want
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), reference.model(x), rtol=0, atol=0)
    assert printed.strip() == decode(loaded.tokenizer, got).strip()


@pytest.mark.asset
def test_calibration_file_too_short(capsys, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Just a few words of calibration text.")
    assert main(["quantize", "smollm2-135m", "--scheme", "w4a16", "--calib", str(short), "-o",
                 str(tmp_path / "q"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "calibration text too short" in err
    assert not (tmp_path / "q").exists()
