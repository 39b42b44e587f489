"""Progress lines: at most one per interval, and always the last."""

from distill.progress import Progress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_line_at_most_every_interval_and_the_last_always(capsys):
    clock = Clock()
    progress = Progress("teacher", total=100, unit="responses", every_s=10, clock=clock)
    clock.now = 3
    assert progress.update(10) is None  # too soon
    clock.now = 11
    assert progress.update(50) == "[teacher] 50/100 responses, 4.5/s, ETA 11s"
    clock.now = 12
    assert progress.update(60) is None
    assert progress.update(100) == "[teacher] 100/100 responses, 8.3/s, ETA 0s"  # done: shown at once
    assert capsys.readouterr().out.count("\n") == 2
