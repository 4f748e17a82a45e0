"""Progress of one long phase (data generation, caching, an epoch's batches), with an ETA.

    bar = Progress("caching images", total=n, unit="img")
    bar.update_to(done); ...; bar.close()

On a terminal it is a tqdm bar (on stderr, gone once the phase ends: the phase's own summary line
follows). Elsewhere (CI logs, redirected output) there is no bar: one line at most every
`every_s` seconds, `desc: done/total unit (pct%, about ETA left)`. `enabled=False` (`-q`) shows
nothing.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from tqdm import tqdm

LOG_EVERY_S = 30.0


def _fmt_eta(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


class Progress:
    def __init__(
        self,
        desc: str,
        total: int,
        unit: str = "it",
        *,
        enabled: bool = True,
        tty: bool | None = None,
        write: Callable[[str], None] | None = None,
        clock: Callable[[], float] | None = None,
        every_s: float = LOG_EVERY_S,
    ) -> None:
        self.desc, self.total, self.unit = desc, total, unit
        self.enabled = enabled
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.write = write or (lambda s: print(s, flush=True))
        self.clock, self.every_s = clock or time.monotonic, every_s
        self.done = 0
        self.started = self.last = self.clock()
        self.base: tuple[float, int] | None = None
        self.bar: tqdm | None = None
        if enabled and self.tty:
            self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)

    def update_to(self, done: int) -> None:
        """`done` of `total` finished (monotone)."""
        delta, self.done = done - self.done, done
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(delta)
            return
        now = self.clock()
        if self.base is None:  # the rate counts from the first update seen (a resumed phase)
            self.base = (now, done)
        if now - self.last < self.every_s or done >= self.total:
            return
        self.last = now
        rate = (done - self.base[1]) / max(now - self.base[0], 1e-9)
        eta = f", about {_fmt_eta((self.total - done) / rate)} left" if rate > 0 else ""
        pct = 100 * done / self.total if self.total else 100.0
        self.write(f"    {self.desc}: {done:,}/{self.total:,} {self.unit} ({pct:.0f}%{eta})")

    def update(self, n: int = 1) -> None:
        self.update_to(self.done + n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
