"""Progress bars that read well both on a terminal and in a log file.

Long stages (training epochs, INT8 calibration, verification on a runtime) draw a bar such as::

    baseline epoch 2/5 [#########...........] 45% 211/469 steps, 1m02s, ETA 1m16s, loss 0.4121

On a terminal (``log`` is ``print`` and stdout is a TTY) the bar is redrawn in place. Anywhere else (a log
file, a Ray Train worker's lines relayed to the driver, ``ray job logs``) a carriage return would
garble the output, so the bar is written as a whole line at most every ``interval`` seconds, and once at the
end. Code deep in the export path does not take a ``log`` argument: the caller sets where bars go for a block
with ``progress_to(log)``; with no destination set, bars are silent.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import time
from collections.abc import Callable, Iterator

Log = Callable[[str], None]

LOG_INTERVAL_SECONDS = 15.0  # a bar written to a log: a line at most this often
TTY_INTERVAL_SECONDS = 0.2  # a bar on a terminal: redrawn at most this often
WIDTH = 20

_destination: contextvars.ContextVar[Log | None] = contextvars.ContextVar("pf_ray_progress", default=None)


@contextlib.contextmanager
def progress_to(log: Log | None) -> Iterator[None]:
    """Within the block, bars created without their own ``log`` write to ``log`` (None: silent)."""
    token = _destination.set(log)
    try:
        yield
    finally:
        _destination.reset(token)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class ProgressBar:
    """A bar over ``total`` units of work; ``update`` as work is done, ``close`` (or the ``with`` block) ends it.

    Args:
        label: what is being done, e.g. "calibrate model.int8.onnx".
        total: units of work (steps, batches, runs); the bar is clamped at it.
        unit: the units' name shown after the count ("steps", "batches").
        log: where lines go; None = the block's ``progress_to`` destination (silent if none).
        interval: seconds between lines in a log (a terminal is redrawn more often).
    """

    def __init__(self, label: str, total: int, *, unit: str = "", log: Log | None = None,
                 interval: float = LOG_INTERVAL_SECONDS) -> None:
        self.label = label
        self.total = max(1, int(total))
        self.unit = unit
        self.log = log if log is not None else _destination.get()
        self.tty = self.log is print and sys.stdout.isatty()
        self.interval = TTY_INTERVAL_SECONDS if self.tty else interval
        self.done = 0
        self.note = ""
        self.started = self.last_shown = time.perf_counter()
        self.closed = False

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, count: int = 1, note: str | None = None) -> None:
        """``count`` more units done; ``note`` (e.g. "loss 0.41") is shown after the bar until replaced."""
        self.done = min(self.total, self.done + count)
        if note is not None:
            self.note = note
        now = time.perf_counter()
        if self.log is not None and now - self.last_shown >= self.interval and self.done < self.total:
            self.last_shown = now
            self._show(final=False)

    def close(self) -> None:
        """Show the final state once (done or not: a stage that stopped early says how far it got)."""
        if self.closed:
            return
        self.closed = True
        if self.log is not None:
            self._show(final=True)

    def render(self) -> str:
        fraction = self.done / self.total
        filled = int(round(WIDTH * fraction))
        elapsed = time.perf_counter() - self.started
        text = (f"{self.label} [{'#' * filled}{'.' * (WIDTH - filled)}] {int(100 * fraction):3d}% "
                f"{self.done}/{self.total}{' ' + self.unit if self.unit else ''}, {_duration(elapsed)}")
        if 0 < self.done < self.total:
            text += f", ETA {_duration(elapsed * (self.total - self.done) / self.done)}"
        return text + (f", {self.note}" if self.note else "")

    def _show(self, *, final: bool) -> None:
        if self.tty:  # redraw in place; the final state stays on its own line
            sys.stdout.write("\r" + self.render() + "\x1b[K" + ("\n" if final else ""))  # \x1b[K: clear the rest
            sys.stdout.flush()
        else:
            self.log(self.render())
