"""A machine shared with other jobs, for the benchmarks that time fxprune under load (imported by the
scripts beside it, which run with this folder on ``sys.path``)."""

from __future__ import annotations

import subprocess
import sys


class Busy:
    """``count`` processes spinning on the CPU for the ``with`` block (none for 0)."""

    def __init__(self, count: int = 2) -> None:
        self.count = count

    def __enter__(self) -> "Busy":
        self.processes = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.count)]
        return self

    def __exit__(self, *exc) -> None:
        for process in self.processes:
            process.kill()
            process.wait()
