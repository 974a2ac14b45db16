"""Progress of long work on stderr: a bar redrawn in place on a terminal, a plain line every few seconds
otherwise (so logs stay readable). One small helper for downloads, prefill, bench, perplexity, convert, svd.

    bar = Progress("prefill", total=n, unit="tokens")
    for ...: bar.update(k)
    bar.close()
"""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, label: str, total: int | None = None, unit: str = "", done: int = 0,
                 scale: float = 1.0, every: float = 5.0, delay: float = 0.0):
        """unit: what is counted ("MB" with scale=1e6 shows bytes as MB); every: seconds between plain lines;
        delay: draw nothing for work that ends sooner than this."""
        self.label, self.total, self.unit, self.done, self.scale = label, total, unit, done, scale
        self.tty = sys.stderr.isatty()
        self.every = 0.2 if self.tty else every
        self.t0 = time.monotonic()
        self.start, self.delay = done, delay
        self.last = self.t0 + delay - self.every  # first draw at delay
        self.drawn = False
        self.note = ""

    def update(self, n: int = 1, note: str = "") -> None:
        self.done += n
        self.note = note or self.note
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self._draw(now)

    def _line(self, now: float) -> str:
        d = self.done / self.scale
        rate = (self.done - self.start) / self.scale / max(now - self.t0, 1e-9)
        unit = f" {self.unit}" if self.unit else ""
        if self.total is None and self.done == 0:  # a timer: elapsed time and what the work last said
            return f"{self.label}, {now - self.t0:.0f} s" + (f" · {self.note}" if self.note else "")
        if self.total:
            frac = min(self.done / self.total, 1.0)
            bar = f" [{'#' * int(24 * frac):<24}]" if self.tty else ""
            count = f"{d:.1f}/{self.total / self.scale:.1f}" if self.scale != 1 else f"{self.done}/{self.total}"
            text = f"{self.label}{bar} {frac:4.0%} {count}{unit}"
        else:
            text = f"{self.label} {d:.1f}{unit}" if self.scale != 1 else f"{self.label} {self.done}{unit}"
        text += f", {rate:.1f} {self.unit or 'items'}/s, {now - self.t0:.0f} s"
        return text + (f" · {self.note}" if self.note else "")

    def _draw(self, now: float) -> None:
        self.drawn, self.drawn_at = True, self.done
        if self.tty:
            sys.stderr.write("\r\033[K" + self._line(now))
        else:
            sys.stderr.write(self._line(now) + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        """The final state, once, where anything was drawn (work shorter than `delay` leaves no trace)."""
        now = time.monotonic()
        if self.drawn and not self.tty and self.drawn_at == self.done and self.total is not None:
            return  # the last plain line already says it
        if self.drawn or now - self.t0 >= self.delay:
            self._draw(now)
            if self.tty:
                sys.stderr.write("\n")
                sys.stderr.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
