"""The version, git commit and build date of this orcd build.

Sources, first match wins for each of commit and date:
  1. the environment (ORCD_GIT_COMMIT, ORCD_BUILD_DATE), set by container builds that copy the
     source without its .git directory;
  2. orcd_grpc/_build_info.json, written by `python -m orcd_grpc.buildinfo --write` at build time;
  3. `git` when running from a checkout (the date is then the commit's date).
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import pathlib
import subprocess
import sys

from . import __version__

_PKG = pathlib.Path(__file__).resolve().parent
BUILD_INFO_FILE = _PKG / "_build_info.json"


@dataclasses.dataclass(frozen=True)
class BuildInfo:
    version: str
    git_commit: str
    build_date: str


def _git(*args: str) -> str:
    try:
        proc = subprocess.run(["git", "-C", str(_PKG.parent), *args], capture_output=True,
                              text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return ""
    return proc.stdout.strip() if proc.returncode == 0 else ""


def _from_file() -> dict:
    try:
        data = json.loads(BUILD_INFO_FILE.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _resolve(git_date: bool) -> BuildInfo:
    stored = _from_file()
    commit = os.environ.get("ORCD_GIT_COMMIT") or str(stored.get("git_commit") or "")
    date = os.environ.get("ORCD_BUILD_DATE") or str(stored.get("build_date") or "")
    if not commit and (_PKG.parent / ".git").exists():
        commit = _git("rev-parse", "HEAD")
        if git_date and commit and not date:
            date = _git("show", "-s", "--format=%cI", commit)
    return BuildInfo(version=__version__, git_commit=commit, build_date=date)


@functools.lru_cache(maxsize=1)
def build_info() -> BuildInfo:
    return _resolve(git_date=True)


def build_stamp() -> dict:
    """What a built wheel records (setup.py): as build_info, but a date neither given nor stored
    is the time of the build, not the commit's."""
    info = _resolve(git_date=False)
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    return dataclasses.asdict(dataclasses.replace(info, build_date=info.build_date or now))


def write_build_info(path: pathlib.Path = BUILD_INFO_FILE) -> BuildInfo:
    """Records the current commit and the time now, for builds that ship without .git."""
    build_info.cache_clear()
    info = build_info()
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    info = dataclasses.replace(info, build_date=os.environ.get("ORCD_BUILD_DATE") or now)
    path.write_text(json.dumps(dataclasses.asdict(info), indent=2) + "\n")
    build_info.cache_clear()
    return info


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        print(json.dumps(dataclasses.asdict(write_build_info())))
    else:
        print(json.dumps(dataclasses.asdict(build_info())))
