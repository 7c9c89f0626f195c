"""The progress of a LoadModel call as `orcd load` shows it.

On a terminal a tqdm bar is redrawn in place. Anywhere else (a file, a pipe, a CI log) a bar's
redraws are only noise (one load wrote 14 KB of carriage returns), so each stage gets one plain
line instead.
"""
from __future__ import annotations

from tqdm import tqdm


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class LoadProgress:
    """Feed it the (stage, bytes_done, bytes_total) of each LoadProgress event; finish() at the end."""

    def __init__(self, stream, *, tty: bool | None = None):
        self.stream = stream
        self.tty = _isatty(stream) if tty is None else tty
        self._stage: str | None = None
        self._bar: tqdm | None = None

    def update(self, stage: str, done: int, total: int) -> None:
        new_stage = stage != self._stage
        self._stage = stage
        if not self.tty:
            if new_stage:
                size = f" {total / 2**20:.1f} MiB" if total else ""
                self.stream.write(f"{stage}{size}\n")
                self.stream.flush()
            return
        if self._bar is None:
            # "iB" with a divisor of 1024 makes tqdm print KiB/MiB/GiB.
            self._bar = tqdm(total=total or None, desc=stage, file=self.stream, unit="iB", unit_scale=True,
                             unit_divisor=1024, dynamic_ncols=True, leave=True)
        bar = self._bar
        if total and bar.total != total:
            bar.total = total
        if new_stage:
            bar.set_description(stage, refresh=False)
        bar.update(max(0, min(done, total or done)) - bar.n)
        if new_stage:
            bar.refresh()

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
