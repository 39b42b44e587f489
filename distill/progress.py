"""Progress lines for long work: at most one every `EVERY_S` seconds, and the last, so that a CI
log or `ray job logs` stays readable while a person still sees rows done, rate and ETA.

    progress = Progress("teacher", total=461, unit="responses")
    progress.update(256)        # "[teacher] 256/461 responses, 5.5/s, ETA 37s" (if 10 s have passed)
"""

from __future__ import annotations

import math
import time

EVERY_S = 10.0


def loss_text(value: float | None) -> str:
    """A loss as a log line shows it: four decimals, or "n/a" when there was none to compute
    (no validation rows)."""
    return "n/a" if value is None else f"{value:.4f}"


class Progress:
    def __init__(self, stage: str, total: int, unit: str, every_s: float = EVERY_S, clock=time.time):
        self.stage, self.total, self.unit, self.every_s, self.clock = stage, total, unit, every_s, clock
        self.start = self.last = clock()

    def update(self, done: int, note: str = "") -> str | None:
        """Print (and return) a line when the work is done or `every_s` has passed since the last."""
        now = self.clock()
        if done < self.total and now - self.last < self.every_s:
            return None
        self.last = now
        rate = done / max(1e-9, now - self.start)
        eta = (self.total - done) / rate if rate else math.inf
        line = f"[{self.stage}] {done}/{self.total} {self.unit}{note}, {rate:.1f}/s, ETA {eta:.0f}s"
        print(line, flush=True)
        return line


def follow_parts(ds, total: int, source: str = "", teacher: str | None = None) -> None:
    """Run a dataset whose workers write parts and return `PART_SUMMARY` rows; show progress
    (`teacher`: its name, in a run with several)."""
    import pyarrow.compute as pc

    from distill.config.teacher_student import PRIMARY_TEACHER

    label = f"teacher {teacher}" if teacher and teacher != PRIMARY_TEACHER else "teacher"
    progress, written = Progress(label, total, "responses"), 0
    for summary in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        written += pc.sum(summary["rows"]).as_py() or 0
        progress.update(written, source)
