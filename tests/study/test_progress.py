"""study/progress.py: bars redraw in place on a terminal and rarely in a log."""

from __future__ import annotations

import sys

from study import progress


def test_a_log_gets_a_line_every_half_minute_and_a_terminal_a_live_bar(monkeypatch) -> None:
    import io

    kwargs = {"file": io.StringIO()}  # an enabled bar (a disabled one keeps no settings), drawn into a buffer
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert progress.bar(range(3), **kwargs).mininterval == progress.LOG_INTERVAL_S
    assert progress.bar(range(3), **kwargs, mininterval=1.0).mininterval == progress.LOG_INTERVAL_S
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert progress.bar(range(3), **kwargs).mininterval == 0.1
    assert progress.bar(range(3), **kwargs, mininterval=1.0).mininterval == 1.0
    assert list(progress.bar(range(3), **kwargs)) == [0, 1, 2]
