"""One setup for every PNG pilelm draws (the run report's loss curves, eval's BPB bars):
matplotlib's file-only backend, a figure of a given size, and an atomic save."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pilelm.core.atomic import atomic_path

DPI = 120


@contextmanager
def png_figure(path: Path, figsize: tuple[float, float]) -> Iterator[tuple[Any, Any]]:
    """``with png_figure(path, (w, h)) as (fig, ax):`` draw on ``ax``; on leaving, the figure
    is laid out and written to ``path`` atomically (nothing is written if drawing raises)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed: works over ssh and in CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize, dpi=DPI)
    try:
        yield fig, ax
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
