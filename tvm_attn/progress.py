"""A tiny step progress bar for slow command-line work (no dependencies).

    with Progress(["generate", "compile", "export"]) as bar:
        bar.step("generate"); ...; bar.step("compile"); ...

(``bar.finish(name)`` instead counts steps that finish in any order, e.g. in parallel.)

On a terminal it redraws one line (``[#####.....] 2/3 compile  1.4 s``); otherwise it prints one line
per step, so logs stay readable.
"""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, steps: list[str], stream=None, width: int = 24):
        self.steps, self.width = list(steps), width
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.done = 0
        self.start = self.step_start = time.perf_counter()
        self.current: str | None = None
        #: seconds per finished step
        self.seconds: dict[str, float] = {}

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        self._finish_step()
        if exc_type is None:
            self._draw(f"done in {time.perf_counter() - self.start:.1f} s", final=True)
        elif self.tty:
            self.stream.write("\n")
        return False

    def step(self, name: str) -> None:
        """Begin step ``name`` (one of the declared steps), finishing the previous one."""
        if name not in self.steps:
            raise ValueError(f"unknown step {name!r}; declared: {self.steps}")
        self._finish_step()
        self.current, self.step_start = name, time.perf_counter()
        self._draw(name)

    def finish(self, name: str, note: str = "") -> None:
        """Count step ``name`` done, for steps that finish in any order (work in parallel processes)
        rather than one after another; ``note`` follows its name on the line."""
        if name not in self.steps:
            raise ValueError(f"unknown step {name!r}; declared: {self.steps}")
        now = time.perf_counter()
        self.seconds[name], self.step_start = now - self.step_start, now
        self.done += 1
        self._draw(f"{name} {note}".rstrip())

    def _finish_step(self) -> None:
        if self.current is not None:
            self.seconds[self.current] = time.perf_counter() - self.step_start
            self.done += 1
            self.current = None

    def _draw(self, label: str, final: bool = False) -> None:
        n = len(self.steps)
        filled = self.width * self.done // max(n, 1)
        bar = "#" * filled + "." * (self.width - filled)
        line = f"[{bar}] {self.done}/{n} {label}"
        if self.tty:
            self.stream.write("\r" + line.ljust(72) + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
