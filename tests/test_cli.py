"""CLI behaviour that needs no model download."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lowbit.cli import main


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "lowbit.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "generate" in out.stdout and "fetch" in out.stdout


def test_generate_help_explains_options(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = capsys.readouterr().out
    for opt in ("--max-new-tokens", "--temperature", "--top-p", "--device", "--dtype", "smollm2-135m"):
        assert opt in text


def test_missing_model_is_one_line_error(capsys):
    assert main(["generate", "/no/such/model", "-p", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lowbit: error: no such model")
    assert "Traceback" not in err


def test_bad_sampling_option_fails_before_loading(capsys):
    assert main(["generate", "/no/such/model", "-p", "hi", "--top-p", "2"]) == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err


def test_model_without_tokenizer(capsys, tmp_path):
    from tests.tiny_models import make_hf_model

    make_hf_model("llama2").save_pretrained(tmp_path)
    assert main(["generate", str(tmp_path), "-p", "hi", "--device", "cpu"]) == 2  # no tokenizer files
    assert "ships no tokenizer" in capsys.readouterr().err


def test_unknown_asset(capsys):
    assert main(["fetch", "gpt-5"]) == 2
    assert "unknown asset 'gpt-5'" in capsys.readouterr().err


def test_import_does_not_touch_cuda():
    code = "import lowbit, lowbit.cli, lowbit.model.loader, lowbit.engine.generate, sys; " \
           "import torch; print(torch.cuda.is_initialized())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "False"
