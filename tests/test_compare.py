"""``lowbit compare``: a float model beside its quantized checkpoint.

What is checked is what the command guarantees: its perplexities are those ``lowbit eval`` reports for
the same models and windows, its answers are those each model generates alone (the eager reference and
the engine path, chat template applied as ``lowbit generate`` applies it), long answers are wrapped into
two columns within the width, and bad pairs of models fail with one line that says what to pass.
Which words the tiny random models emit is not checked.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.cli import main
from lowbit.engine.generate import generate_text
from lowbit.engine.reference import reference_generate
from lowbit.engine.sampling import SamplingParams
from lowbit.engine.text import decode, encode_prompt
from lowbit.eval.compare import GAP, Answer, Comparison, ModelResult, format_comparison, two_columns, wrap
from tests.tiny_models import make_hf_model, save_tiny_tokenizer

PROMPTS = ["w5 w6 w7", "w40"]
N = 12  # tokens per answer at most
EVAL = ["--eval-seq-len", "16", "--device", "cpu"]


@pytest.fixture(scope="module")
def float_dir(tiny_model_path) -> Path:
    """The tiny llama2 checkpoint with its tokenizer (conftest's, shared by the session; read only)."""
    return tiny_model_path


@pytest.fixture(scope="module")
def quant_dir(float_dir, tmp_path_factory) -> Path:
    loaded = lowbit.load_model(float_dir, device="cpu", dtype="fp32")
    calib = torch.randint(3, 97, (4, 16), generator=torch.Generator().manual_seed(0))
    model = lowbit.quantize(loaded, "w4a16-rtn", calib=calib, progress=False)
    return lowbit.save_quantized(model, tmp_path_factory.mktemp("compare") / "quant", tokenizer=loaded.tokenizer)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """Held-out text in the tiny tokenizer's words: 12 windows of 16 tokens and a tail."""
    g = torch.Generator().manual_seed(1)
    path = tmp_path_factory.mktemp("compare") / "eval.txt"
    path.write_text(" ".join(f"w{int(i)}" for i in torch.randint(3, 97, (200,), generator=g)))
    return str(path)


def _compare(capsys, float_dir, quant_dir, corpus, *extra: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["compare", str(float_dir), str(quant_dir), *[a for p in PROMPTS for a in ("-p", p)], "-n", str(N),
                 "--dataset", corpus, *EVAL, *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


def _columns(printed: str, left: str, right: str) -> tuple[str, str]:
    """The two answer columns of one prompt's block in ``printed``, each joined back into one line."""
    lines = printed.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith(left) and GAP + right in line)
    rule = head + 1
    end = next(i for i in range(rule + 1, len(lines)) if lines[i] == lines[rule])
    col = lines[rule].index("+") - 1
    body = lines[rule + 1:end]
    assert all(len(line) <= col or line[col:col + len(GAP)] == GAP for line in body)  # the gap never moves
    return (" ".join(w for line in body for w in line[:col].split()),
            " ".join(w for line in body for w in line[col + len(GAP):].split()))


def test_perplexities_and_answers_are_those_of_eval_and_generate(capsys, tmp_path, float_dir, quant_dir, corpus):
    report = tmp_path / "cmp.json"
    code, printed, err = _compare(capsys, float_dir, quant_dir, corpus, "--width", "90", "--json", str(report))
    assert code == 0, err
    data = json.loads(report.read_text())

    # perplexity: lowbit eval on the same models and windows, exactly
    assert main(["eval", str(float_dir), str(quant_dir), "--dataset", corpus, "--json", str(tmp_path / "e.json"),
                 *EVAL]) == 0
    rows = json.loads((tmp_path / "e.json").read_text())["rows"]
    assert (data["base"]["ppl"], data["quant"]["ppl"]) == (rows[0]["ppl"], rows[1]["ppl"])
    assert (data["base"]["bits_per_weight"], data["quant"]["bits_per_weight"]) == \
        (rows[0]["bits_per_weight"], rows[1]["bits_per_weight"])
    assert data["meta"]["windows"] == 12 and data["meta"]["tokens"] == rows[0]["tokens"]
    assert data["ppl_ratio"] == pytest.approx(rows[1]["ppl"] / rows[0]["ppl"], rel=1e-12)
    assert f"{rows[0]['ppl']:9.3f}" in printed and f"{rows[1]['ppl']:9.3f}" in printed
    assert f"x{data['ppl_ratio']:.3f} ({data['ppl_increase_pct']:+.1f}%)" in printed

    # answers: each model alone, through the eager reference and through the engine (lowbit.generate_text)
    for side, path in (("base", float_dir), ("quant", quant_dir)):
        loaded = lowbit.load_model(path, device="cpu", dtype="fp32")
        params = SamplingParams(max_new_tokens=N, stop_token_ids=loaded.stop_token_ids)
        for prompt, answer in zip(PROMPTS, data["answers"]):
            got = answer[side]
            ids = encode_prompt(loaded.tokenizer, prompt)  # the chat template, as lowbit generate applies it
            want = reference_generate(loaded.model, [ids], params)[0]
            assert (got["token_ids"], got["finish_reason"]) == (want.token_ids, want.finish_reason)
            assert got["text"] == decode(loaded.tokenizer, want.token_ids) == \
                generate_text(loaded, [prompt], SamplingParams(max_new_tokens=N))[0]
        capsys.readouterr()
        assert main(["generate", str(path), "-p", PROMPTS[0], "-n", str(N), "--device", "cpu"]) == 0
        assert capsys.readouterr().out == data["answers"][0][side]["text"] + "\n"  # what lowbit generate prints

    # the printed report: both answers of each prompt side by side, each line within the width
    labels = (data["base"]["label"], data["quant"]["label"])
    assert labels == ("unquantized", "w4a16-rtn")
    blocks = printed.split("=" * 90)[1:]
    assert len(blocks) == len(PROMPTS)
    for block, answer, prompt in zip(blocks, data["answers"], PROMPTS):
        assert f"] {prompt}" in block and all(len(line) <= 90 for line in block.splitlines())
        assert _columns(block, *labels) == (" ".join(answer["base"]["text"].split()),
                                            " ".join(answer["quant"]["text"].split()))


def test_long_answers_wrap_into_two_columns(capsys, float_dir, quant_dir, corpus):
    code, printed, err = _compare(capsys, float_dir, quant_dir, corpus, "--width", "50", "-n", "40")
    assert code == 0, err
    for block in printed.split("=" * 50)[1:]:
        assert all(len(line) <= 50 for line in block.splitlines())
        left, right = _columns(block, "unquantized", "w4a16-rtn")
        assert len(left.split()) > 10 and len(right.split()) > 10  # several lines per column


def _result(label: str, text: str) -> ModelResult:
    return ModelResult(label, label, label, 16.0, 10.0, 2.3, (Answer(text, tuple(range(len(text.split()))), "length"),))


def test_two_columns_keep_every_word_line_breaks_and_the_width():
    left = "a fairly long answer " * 12 + "\n\nsecond paragraph after a blank line"
    right = "short"
    lines = two_columns(left, right, 60)
    col = (60 - len(GAP)) // 2
    assert all(len(line) <= 60 for line in lines) and len(lines) == len(wrap(left, col)) > 5
    assert lines[0].endswith(GAP + right) and all(GAP not in line[col + len(GAP):] for line in lines)
    assert " ".join(line[:col].strip() for line in lines).split() == left.split()
    assert "" in [line[:col].strip() for line in lines]  # the blank line between paragraphs stays
    assert wrap("x" * 70, 30) == ["x" * 30, "x" * 30, "x" * 10]  # a word longer than a column is broken
    cmp = Comparison(("q?",), _result("unquantized", left), _result("w4a8", right),
                     {"dataset": "wiki", "windows": 1, "eval_seq_len": 8, "tokens": 7, "device": "cpu",
                      "dtype": "float32", "max_new_tokens": 64, "chat": True})
    text = format_comparison(cmp, width=10)  # too narrow: MIN_WIDTH columns instead
    assert max(len(line) for line in text.splitlines()[2:]) <= 40  # all but the models' names


def test_help_explains_the_options(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = capsys.readouterr().out
    for opt in ("BASE", "QUANT", "--prompt", "--max-new-tokens", "--max-chunks", "--json", "--width", "--no-chat",
                "--device", "--dtype", "lowbit eval", "lowbit generate"):
        assert opt in text


def _error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the progress lines, if it got that far
    assert last.startswith("lowbit: error: ") and "Traceback" not in err, err
    return last


def test_a_float_quant_or_a_quantized_base_is_refused(capsys, float_dir, quant_dir):
    err = _error(capsys, ["compare", str(float_dir), str(float_dir), "-p", "w5", *EVAL])
    assert "is not a lowbit quantized checkpoint" in err and "lowbit quantize" in err
    err = _error(capsys, ["compare", str(quant_dir), str(quant_dir), "-p", "w5", *EVAL])
    assert "BASE" in err and "is a quantized checkpoint" in err
    assert "no such model" in _error(capsys, ["compare", str(float_dir), "/no/such/dir", "-p", "w5", *EVAL])
    # settings are checked before anything is loaded
    assert "--max-chunks must be at least 1" in _error(
        capsys, ["compare", "/no/such/model", "/no/such/dir", "-p", "w5", "--max-chunks", "0"])


def test_another_vocabulary_or_tokenizer_is_refused(capsys, tmp_path, quant_dir, corpus):
    other = tmp_path / "other-vocab"
    make_hf_model("llama2", vocab_size=101).save_pretrained(other)
    save_tiny_tokenizer(other, vocab=101)
    err = _error(capsys, ["compare", str(other), str(quant_dir), "-p", "w5", "--dataset", corpus, *EVAL])
    assert "different vocabularies (101 and 97" in err

    retemplated = tmp_path / "other-template"
    make_hf_model("llama2").save_pretrained(retemplated)
    save_tiny_tokenizer(retemplated)
    cfg = retemplated / "tokenizer_config.json"
    data = json.loads(cfg.read_text())
    data["chat_template"] = "w9 {% for m in messages %}{{ m['content'] }} {% endfor %}"
    cfg.write_text(json.dumps(data))
    for f in retemplated.glob("chat_template.*"):  # newer transformers keep the template in its own file
        f.unlink()
    err = _error(capsys, ["compare", str(retemplated), str(quant_dir), "-p", "w5", "--dataset", corpus, *EVAL])
    assert "prompt 1 into different tokens" in err and "--no-chat" in err
    capsys.readouterr()
    assert main(["compare", str(retemplated), str(quant_dir), "-p", "w5", "-n", "2", "--no-chat",
                 "--dataset", corpus, *EVAL]) == 0


def test_a_tokenizer_that_cuts_the_text_differently_is_refused(capsys, tmp_path, quant_dir, corpus):
    """The same vocabulary, but a normalizer that rewrites a word: the evaluation windows differ."""
    other = tmp_path / "renormalized"
    make_hf_model("llama2").save_pretrained(other)
    save_tiny_tokenizer(other)
    spec = json.loads((other / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Replace", "pattern": {"String": "w5"}, "content": "w6"}
    (other / "tokenizer.json").write_text(json.dumps(spec))
    err = _error(capsys, ["compare", str(other), str(quant_dir), "-p", "w7", "--dataset", corpus, *EVAL])
    assert "evaluation text into different tokens" in err and "quantized from BASE" in err


def test_another_shape_warns(capsys, tmp_path, quant_dir, corpus):
    small = tmp_path / "small"
    make_hf_model("llama2", hidden_size=32, num_attention_heads=2, num_key_value_heads=2).save_pretrained(small)
    save_tiny_tokenizer(small)
    capsys.readouterr()
    assert main(["compare", str(small), str(quant_dir), "-p", "w5", "-n", "2", "--dataset", corpus, *EVAL]) == 0
    assert "lowbit: warning: QUANT was not quantized from BASE (hidden_size 32 vs 64" in capsys.readouterr().err


def test_a_missing_tokenizer_is_named(capsys, tmp_path, float_dir, quant_dir):
    bare = tmp_path / "bare"
    shutil.copytree(quant_dir, bare)
    for f in bare.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            f.unlink()
    err = _error(capsys, ["compare", str(float_dir), str(bare), "-p", "w5", *EVAL])
    assert "QUANT" in err and "ships no tokenizer" in err
