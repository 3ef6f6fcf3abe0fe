"""Damaged checkpoints and interrupted saves: one ``lowbit: error:`` line naming the file and the tensor.

Each damage is made on a copy of a tiny quantized checkpoint and loaded through ``lowbit generate``,
the way a user meets it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lowbit
from lowbit.checkpoint.native import _host
from lowbit.cli import main
from lowbit.formats import QuantScheme, WeightFormat

REPO = Path(__file__).resolve().parents[1]
# asymmetric, so that the checkpoint has zero points; group 32 gives q_proj (K = 64) two groups
ASYM = QuantScheme("w4a16-asym-g32", WeightFormat(symmetric=False, group_size=32, method="rtn"))
Q = "model.layers.0.self_attn.q_proj"


def _calib() -> torch.Tensor:
    return torch.randint(3, 97, (4, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def float_dir(tiny_model_path) -> Path:
    """The tiny llama2 checkpoint with its tokenizer (conftest's, shared by the session; read only)."""
    return tiny_model_path


@pytest.fixture(scope="module")
def quantized(float_dir, tmp_path_factory):
    """scheme -> a quantized checkpoint of the tiny model (made once per scheme)."""
    made: dict[str, Path] = {}

    def get(scheme: QuantScheme | str = ASYM) -> Path:
        name = scheme if isinstance(scheme, str) else scheme.name
        if name not in made:
            loaded = lowbit.load_model(float_dir, device="cpu", dtype="fp32")
            model = lowbit.quantize(loaded, scheme, calib=_calib(), progress=False)
            made[name] = lowbit.save_quantized(model, tmp_path_factory.mktemp("q") / "ckpt", tokenizer=loaded.tokenizer)
        return made[name]

    return get


def _damaged(src: Path, dst: Path, edit) -> Path:  # noqa: ANN001
    """A copy of checkpoint ``src`` whose tensors went through ``edit(dict)``."""
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})
    return dst


def _cli_error(path: Path, capsys) -> str:  # noqa: ANN001
    """The last stderr line of ``lowbit generate`` on ``path``, which must fail with exit code 2."""
    capsys.readouterr()
    assert main(["generate", str(path), "-p", "w5 w6", "-n", "2", "--device", "cpu"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("lowbit: error: "), last
    return last


def test_sound_checkpoint_generates(quantized, capsys):
    capsys.readouterr()
    assert main(["generate", str(quantized()), "-p", "w5 w6", "-n", "2", "--device", "cpu"]) == 0


# ------------------------------------------------------------------ damaged files

@pytest.mark.parametrize("which", ["float", "quantized"])
def test_truncated_file_names_the_file_and_the_lost_tensors(which, float_dir, quantized, tmp_path, capsys):
    src = float_dir if which == "float" else quantized()
    path = tmp_path / "ckpt"
    shutil.copytree(src, path)
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    err = _cli_error(path, capsys)
    assert f"{f} is corrupt or truncated" in err
    assert "tensor 'model." in err and "past the end" in err  # the header survived: it says what is lost


def test_garbage_header_names_the_file(quantized, tmp_path, capsys):
    path = tmp_path / "ckpt"
    shutil.copytree(quantized(), path)
    f = path / "model.safetensors"
    f.write_bytes(bytes(range(256)) * (f.stat().st_size // 256))
    assert f"{f} is corrupt or truncated" in _cli_error(path, capsys)


def test_garbage_data_is_caught_by_the_scale_checks(quantized, tmp_path, capsys):
    """safetensors keeps no checksum: garbage inside the data region reads fine, as NaN scales here."""
    path = tmp_path / "ckpt"
    shutil.copytree(quantized(), path)
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    data[header_end:] = b"\xff" * (len(data) - header_end)  # 0xffff is a NaN in fp16
    f.write_bytes(bytes(data))
    err = _cli_error(path, capsys)
    # the first layer whose tensors complete in the file's (name) order
    assert re.search(rf"{re.escape(str(f))}: tensor 'model\.layers\.0\.\S+\.scales' holds NaN or Inf", err), err


# ------------------------------------------------------------------ wrong shapes and dtypes

def _widen(t: torch.Tensor) -> torch.Tensor:
    return torch.cat([t, t[:, :1]], dim=1)


@pytest.mark.parametrize(("tensor", "edit", "expected"), [
    ("scales", _widen, "has shape (64, 3), expected (64, 2) for asymmetric int4 weights, group 32"),
    ("zeros", _widen, "has shape (64, 3), expected (64, 2)"),
    ("qweight", _widen, "has shape (64, 33), expected (64, 32)"),  # 64 int4 codes in 32 bytes per row
    ("qweight", lambda t: t[:32], "has shape (32, 32), expected (64, 32)"),  # out_features from the config
    ("qweight", lambda t: t.to(torch.int32), "has dtype int32, expected uint8"),
    ("scales", lambda t: t.float(), "has dtype float32, expected float16"),
    ("zeros", lambda t: t + 200, "holds zero points above 15"),
])
def test_wrong_shape_or_dtype_names_file_and_tensor(tensor, edit, expected, quantized, tmp_path, capsys):
    def damage(ts: dict) -> None:
        ts[f"{Q}.{tensor}"] = edit(ts[f"{Q}.{tensor}"])

    path = _damaged(quantized(), tmp_path / "ckpt", damage)
    err = _cli_error(path, capsys)
    assert f"{path / 'model.safetensors'}: tensor '{Q}.{tensor}' {expected}" in err
    assert err.endswith("the checkpoint is corrupt or was written by another tool")


def test_act_order_groups_and_comet_order_are_checked(quantized, tmp_path, capsys):
    """Index tensors: g_idx (act-order GPTQ) in range, act_perm (COMET) a permutation."""
    gptq = QuantScheme("w4a16-actorder", WeightFormat(group_size=32, act_order=True))

    def bad_groups(ts: dict) -> None:
        ts[f"{Q}.g_idx"][0] = 7

    err = _cli_error(_damaged(quantized(gptq), tmp_path / "a", bad_groups), capsys)
    assert f"tensor '{Q}.g_idx' holds groups outside [0, 2)" in err

    def wide_groups(ts: dict) -> None:
        ts[f"{Q}.g_idx"] = ts[f"{Q}.g_idx"].long()

    err = _cli_error(_damaged(quantized(gptq), tmp_path / "c", wide_groups), capsys)
    assert f"tensor '{Q}.g_idx' has dtype int64, expected int32" in err

    def bad_perm(ts: dict) -> None:
        ts[f"{Q}.act_perm"][0] = ts[f"{Q}.act_perm"][1]

    err = _cli_error(_damaged(quantized("w4a4kv4-comet"), tmp_path / "b", bad_perm), capsys)
    assert f"tensor '{Q}.act_perm' is not a permutation of the 64 quantized columns" in err


# ------------------------------------------------------------------ missing tensors

@pytest.mark.parametrize(("removed", "expected"), [
    ([f"{Q}.scales"], f"tensor '{Q}.scales' is missing (required for asymmetric int4 weights, group 32)"),
    ([f"{Q}.zeros"], f"tensor '{Q}.zeros' is missing (required for asymmetric int4 weights, group 32)"),
    ([f"{Q}.qweight"], f"tensor '{Q}.qweight' is missing"),
    # a whole layer gone: the loader then wants the float weight it would have had
    ([f"{Q}.qweight", f"{Q}.scales", f"{Q}.zeros"], f"lacks tensor '{Q}.weight'"),
    (["model.layers.1.input_layernorm.weight"], "lacks tensor 'model.layers.1.input_layernorm.weight'"),
])
def test_missing_tensor_names_file_and_tensor(removed, expected, quantized, tmp_path, capsys):
    def damage(ts: dict) -> None:
        for k in removed:
            del ts[k]

    path = _damaged(quantized(), tmp_path / "ckpt", damage)
    err = _cli_error(path, capsys)
    assert str(path / "model.safetensors") in err and expected in err


def test_missing_comet_blocks(quantized, tmp_path, capsys):
    """Without fmpq_high every block would silently run at 4 bits."""
    def damage(ts: dict) -> None:
        del ts[f"{Q}.fmpq_high"]

    err = _cli_error(_damaged(quantized("w4a4kv4-comet"), tmp_path / "ckpt", damage), capsys)
    assert f"tensor '{Q}.fmpq_high' is missing" in err


# ------------------------------------------------------------------ non-finite values

@pytest.mark.parametrize(("scheme", "tensor", "value", "expected"), [
    (ASYM, f"{Q}.scales", float("nan"), "holds NaN or Inf"),
    (ASYM, f"{Q}.scales", float("inf"), "holds NaN or Inf"),
    # SmoothQuant factors that no norm absorbs stay with o_proj as a divisor
    ("w8a8-int8", "model.layers.0.self_attn.o_proj.smooth", float("inf"), "holds NaN, Inf or non-positive"),
    ("w8a8-int8", "model.layers.0.self_attn.o_proj.smooth", 0.0, "holds NaN, Inf or non-positive"),
    ("w4a4-quik", f"{Q}.outlier_weight", float("nan"), "holds NaN or Inf"),
])
def test_non_finite_values_name_file_and_tensor(scheme, tensor, value, expected, quantized, tmp_path, capsys):
    def damage(ts: dict) -> None:
        ts[tensor].view(-1)[3] = value

    path = _damaged(quantized(scheme), tmp_path / "ckpt", damage)
    assert f"{path / 'model.safetensors'}: tensor '{tensor}' {expected}" in _cli_error(path, capsys)


# ------------------------------------------------------------------ killed mid-save

_KILLED_SAVE = """
import os, sys
import safetensors.torch
import torch
import lowbit
import lowbit.checkpoint.native as native

def half_then_die(tensors, filename, metadata=None):
    data = safetensors.torch.save(tensors, metadata=metadata)
    with open(filename, "wb") as f:
        f.write(data[: len(data) // 2])
    os._exit(9)  # as abrupt as SIGKILL: no except, no finally, no atexit

native.save_file = half_then_die
loaded = lowbit.load_model(sys.argv[1], device="cpu", dtype="fp32", with_tokenizer=False)
model = lowbit.quantize(loaded, "w4a16-rtn", calib=torch.randint(3, 97, (2, 16)), progress=False)
lowbit.save_quantized(model, sys.argv[2])
"""


def test_killed_save_leaves_no_output_and_the_next_save_cleans_up(float_dir, tmp_path):
    out = tmp_path / "q"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    writer = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, str(float_dir), str(out)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, stderr = writer.communicate(timeout=300)
    assert writer.returncode == 9, stderr
    assert not out.exists()  # the rename never happened
    (left,) = [p for p in tmp_path.iterdir() if p.name.startswith(".q.partial-")]
    assert left.name.startswith(f".q.partial-{_host()}-{writer.pid}-")  # the writer's host and pid
    assert (left / "model.safetensors").stat().st_size > 0  # the dead writer's half file

    loaded = lowbit.load_model(float_dir, device="cpu", dtype="fp32", with_tokenizer=False)
    model = lowbit.quantize(loaded, "w4a16-rtn", calib=_calib(), progress=False)
    lowbit.save_quantized(model, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no .partial- leftover
    back = lowbit.load_model(out, device="cpu", dtype="fp32", with_tokenizer=False)
    assert back.model.quant_scheme.name == "w4a16-rtn"

    # kept: a live writer's directory (this process's pid), another host's, and an older lowbit's name
    # without a pid; removed: the dead writer's again
    kept = [f".q.partial-{_host()}-{os.getpid()}-abc123", f".q.partial-otherhost-{writer.pid}-abc123",
            ".q.partial-k3j2h1g0"]
    for name in [*kept, left.name]:
        (tmp_path / name).mkdir()
    lowbit.save_quantized(model, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["q", *kept])
