"""Progress off a terminal: plain lines at a fixed interval, never a redrawn bar."""

from __future__ import annotations

import logging

from pilelm.core import progress as progress_mod
from pilelm.core.progress import Progress


def test_lines_at_the_interval_only(caplog, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: clock[0])
    with caplog.at_level(logging.INFO, logger="pilelm.progress"):
        with Progress(100, "predict", "texts", interval_s=10, terminal=False) as p:
            for _ in range(100):
                clock[0] += 1.0  # one text per second
                p.update()
    lines = [r.getMessage() for r in caplog.records]
    # every 10 s while running, then one at the end
    assert len(lines) == 11 and lines[0].startswith("predict: 10/100 texts (10%), 1.0 texts/s")
    assert lines[-1].startswith("predict: 100/100")


def test_quick_work_logs_nothing(caplog):
    with caplog.at_level(logging.INFO, logger="pilelm.progress"), Progress(3, "x", terminal=False) as p:
        p.update(3)
    assert not caplog.records
