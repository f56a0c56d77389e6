"""A progress bar: tqdm when installed, else a line on stderr every tenth of the run."""

from __future__ import annotations

import sys


class Progress:
    def __init__(self, total: int, desc: str, *, enabled: bool = True):
        self.total, self.desc, self.done = total, desc, 0
        self._bar = None
        self._enabled = enabled and total > 0
        self._next_report = 0
        if self._enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, desc=desc, unit="req", file=sys.stderr)

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self._enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
        elif self.done >= self._next_report or self.done == self.total:
            print(f"{self.desc}: {self.done}/{self.total}", file=sys.stderr, flush=True)
            self._next_report = self.done + max(1, self.total // 10)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
