"""Progress of the long steps (lr_find's sweep, training epochs, validation, the index's decode check, evaluate's
and ``petbreeds predict``'s predictions), on stderr, fastai-style:

    with Bar(total=len(loader), desc="evaluate valid") as bar:
        for batch in loader:
            ...
            bar.update()
    for batch in progress(loader, desc="evaluate valid"): ...   # the same, around an iterable

On a terminal, a live tqdm bar, gone when the step ends (what follows it says the result). Elsewhere (``dvc queue
logs``, CI, a pipe) redraws would be a line each, so the bar prints tqdm's own text as a line at each tenth of the
way (``lines``: how many; 1: only at the end, a line per epoch; 0: nothing): a log gets a bounded number of lines
however many steps there are. A step that is run on every rank shows its progress on rank 0 only (``enabled``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator, Sized
from types import TracebackType
from typing import TextIO, TypeVar, cast

from tqdm import tqdm

T = TypeVar("T")
LOG_LINES = 10  # a line per ~10 % in a log


class Bar:
    """A bar of ``total`` steps named ``desc``: live on a terminal, ``lines`` lines in a log (see the module)."""

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str = "batch",
        *,
        lines: int = LOG_LINES,
        enabled: bool = True,
        file: TextIO | None = None,
    ) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.file = file or sys.stderr  # looked up now: pytest and the stages may have replaced sys.stderr
        live = enabled and self.file.isatty()
        self.lines = lines if enabled and not live else 0
        self.n, self.shown, self.printed = 0, 0, 0  # steps done; log lines printed; steps at the last line
        self.started = time.perf_counter()
        self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False, file=self.file) if live else None

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.lines and self.total > 0:
            due = min(self.n * self.lines // self.total, self.lines)  # the milestones passed so far
            if due > self.shown:
                self.shown = due
                self._line()

    def close(self) -> None:
        """Ends the bar; in a log, a last line where the step stopped short of a milestone (lr_find's early stop)."""
        if self.bar is not None:
            self.bar.close()
        elif self.lines and self.n > self.printed:
            self._line()

    def _line(self) -> None:
        elapsed = time.perf_counter() - self.started
        text = tqdm.format_meter(self.n, self.total, elapsed, prefix=self.desc, unit=self.unit)
        print(text, file=self.file, flush=True)
        self.printed = self.n

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()


def progress(
    items: Iterable[T],
    desc: str,
    unit: str = "batch",
    *,
    total: int | None = None,
    lines: int = LOG_LINES,
    enabled: bool = True,
) -> Iterator[T]:
    """``items`` as they come, with a :class:`Bar` of ``total`` (by default ``len(items)``) steps."""
    count = total if total is not None else len(cast(Sized, items))
    with Bar(count, desc, unit, lines=lines, enabled=enabled) as bar:
        for item in items:
            yield item
            bar.update()
