"""A cancel flag that interrupts a job part-way, for the tests of cancel and resume."""
from __future__ import annotations


class StopAfter:
    """Pass as both ``progress=stop.progress`` and ``cancel=stop``: trips once the job
    reports ``n`` tiles done."""

    def __init__(self, n: int):
        self.n, self.done = n, 0

    def progress(self, done, total):
        self.done = done

    def is_set(self) -> bool:
        return self.done >= self.n
