"""The run report: ``report.md`` with the stages, the data, a loss curve and each stage's results.

``write_report(work_dir, results)`` reads what the stages left (manifests, ``metrics.jsonl``
of a run) and writes, into ``work_dir``:

- ``report.md``: one table of stages (ran or resumed, wall time, key counts), then each
  stage's own section, rendered by the function its ``Command.report`` names
  (``pilelm.core.stages``) from its output, written by the module that owns the format of
  that output: under "Data" prepare's counts, the tokenizer and the token shards; under
  "Training" each run's summary and loss curve; then the results (eval's BPB per Pile
  component next to the unigram baseline, generate's samples, ...);
- ``loss.png``: training loss per step (raw and smoothed), validation loss, and a stage's
  reference loss in the same units (nats per token) for scale (eval's unigram baseline).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pilelm.core.atomic import atomic_write_text
from pilelm.core.manifest import MANIFEST, read_manifest
from pilelm.core.plots import png_figure
from pilelm.core.stages import COMMANDS

log = logging.getLogger(__name__)

REPORT = "report.md"
LOSS_PNG = "loss.png"


@dataclass
class StageResult:
    """What happened to one stage of a pipeline."""

    name: str
    output: Path | None
    status: str
    """"ran" or "skipped" (already finished with the same config)."""
    seconds: float


@dataclass
class LossCurve:
    """A training run's loss per step, drawn by the report (``plot_loss``) with the reference
    line of another stage (eval's unigram baseline) for scale."""

    metrics: list[dict[str, Any]]
    """The run's ``metrics.jsonl`` rows (``read_metrics``)."""
    title: str


@dataclass
class ReportSection:
    """A stage's own part of the report, made by the function its ``Command.report`` names
    from the stage's output: ``(output path, work dir) -> ReportSection | None``."""

    body: list[str]
    """Markdown lines of the section, placed after the training section in pipeline order."""
    headline: list[str] = field(default_factory=list)
    """Markdown lines right under the report's title: the result a reader looks for first."""
    summary: str = ""
    """One line logged once the report is written."""
    loss_reference: tuple[str, float] | None = None
    """(label, nats per token): a horizontal line on the loss curves, for scale."""
    part: Literal["data", "training", "results"] = "results"
    """Where the body goes: under "## Data", under "## Training" (each part in pipeline
    order), or after them."""
    loss_curve: LossCurve | None = None
    """A loss curve drawn into ``loss.png`` (``loss_1.png``, ... for later ones) and shown
    after the body."""


def stage_manifest(path: Path | None) -> dict[str, Any] | None:
    """The manifest of a stage's output; None when it has none or it cannot be read."""
    if path is None or not (path / MANIFEST).is_file():
        return None
    try:
        return read_manifest(path)
    except (OSError, json.JSONDecodeError):
        return None


def display_path(path: Path | None, root: Path) -> str:
    """``path`` relative to ``root`` where it lies inside, else as given; "-" for None."""
    if path is None:
        return "-"
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def display_value(v: Any) -> str:
    """A count or measure for a table cell: thousands separators, 4 significant digits."""
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    return str(v)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill mid-write; the rest is still a curve
    return rows


def centered_mean(values: list[float] | tuple[float, ...], half_window: int) -> list[float]:
    """Mean over [i - h, i + h] clipped to the ends: the trend under batch noise, without the
    lag an exponential average has."""
    n = len(values)
    prefix = [0.0]
    for v in values:
        prefix.append(prefix[-1] + v)
    out = []
    for i in range(n):
        lo, hi = max(0, i - half_window), min(n, i + half_window + 1)
        out.append((prefix[hi] - prefix[lo]) / (hi - lo))
    return out


def plot_train_loss(ax: Any, train: list[tuple[int, float]]) -> None:
    """Train loss per step on a matplotlib axis: raw (faint) and smoothed."""
    if not train:
        return
    steps, losses = zip(*train, strict=True)
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1, label="train loss")
    ax.plot(steps, centered_mean(losses, max(1, len(losses) // 10)), color="tab:blue", linewidth=2,
            label="train loss (smoothed)")


def plot_loss(metrics: list[dict[str, Any]], out: Path, reference: tuple[str, float] | None = None,
              title: str = "") -> Path | None:
    """Write the loss curve PNG; None when there is nothing to plot. ``reference`` = (label,
    nats per token) draws a dashed line for scale."""
    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m and "step" in m and m["loss"] is not None]
    val = [(m["step"], m["val_loss"]) for m in metrics if m.get("val_loss") is not None and "step" in m]
    if not train and not val:
        return None
    with png_figure(out, (8, 4.5)) as (_, ax):
        plot_train_loss(ax, train)
        if val:
            vs, vl = zip(*val, strict=True)
            ax.plot(vs, vl, "o-", color="tab:orange", linewidth=1.5, markersize=4, label="val loss")
        if reference is not None:
            label, nats = reference
            ax.axhline(nats, color="gray", linestyle="--", linewidth=1, label=label)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("cross-entropy (nats / token)")
        if title:
            ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    return out


def _stage_rows(work_dir: Path, results: list[StageResult]) -> list[str]:
    lines = ["| # | stage | status | seconds | output | counts |", "|---:|---|---|---:|---|---|"]
    for i, r in enumerate(results, 1):
        m = stage_manifest(r.output) if r.output and r.output.is_dir() else None
        seconds = r.seconds
        if r.status == "skipped" and m:  # the time it took when it ran
            timings = {k: v for k, v in m.get("timings", {}).items() if isinstance(v, int | float)}
            seconds = timings.get("total", sum(timings.values()))
        scalars = {k: v for k, v in (m or {}).get("counts", {}).items() if not isinstance(v, dict | list)}
        shown = ", ".join(f"{k}={display_value(v)}" for k, v in list(scalars.items())[:6])
        status = "ran" if r.status == "ran" else "resumed (already done)"
        lines.append(f"| {i} | `{r.name}` | {status} | {seconds:.1f} | `{display_path(r.output, work_dir)}` | {shown} |")
    return lines


def display_mb(n: Any) -> str:
    """Bytes as megabytes for a table cell (2 decimals); "-" when not a number."""
    return f"{n / 1e6:.2f}" if isinstance(n, int | float) else "-"


def _stage_sections(name: str, outputs: list[Path], work_dir: Path) -> list[ReportSection]:
    """The sections the stage ``name`` renders from its outputs (none if it renders none)."""
    command = COMMANDS.get(name)
    render = command.load_report() if command is not None else None
    if render is None:
        return []
    return [sec for out in outputs if (sec := render(out, work_dir)) is not None]


def write_report(work_dir: str | Path, results: list[StageResult], title: str = "pilelm run") -> Path:
    """Write ``report.md`` (and ``loss.png`` when a train stage ran) into ``work_dir``."""
    work_dir = Path(work_dir)
    by_name: dict[str, list[Path]] = {}
    for r in results:
        if r.output is not None and r.output.exists():
            by_name.setdefault(r.name, []).append(r.output)
    sections = [section for name, paths in by_name.items() for section in _stage_sections(name, paths, work_dir)]
    reference = next((sec.loss_reference for sec in reversed(sections) if sec.loss_reference), None)

    lines = [f"# {title}", "", f"Written {time.strftime('%Y-%m-%d %H:%M:%S')} in `{work_dir}`.", ""]
    for sec in sections:
        lines += sec.headline
    lines += ["## Stages", "", *_stage_rows(work_dir, results), ""]

    data = [sec for sec in sections if sec.part == "data"]
    if data:
        lines += ["## Data", ""]
    for sec in data:
        lines += sec.body
    training = [sec for sec in sections if sec.part == "training"]
    if training:
        lines += ["## Training", ""]
    for i, sec in enumerate(training):
        lines += sec.body
        png_name = LOSS_PNG if i == 0 else f"loss_{i}.png"
        curve = sec.loss_curve
        if curve is not None and plot_loss(curve.metrics, work_dir / png_name, reference, title=curve.title):
            lines += [f"![loss curve]({png_name})", ""]

    for sec in sections:
        if sec.part == "results":
            lines += sec.body

    out = work_dir / REPORT
    atomic_write_text(out, "\n".join(lines).rstrip() + "\n")
    for sec in sections:
        if sec.summary:
            log.info("%s", sec.summary)
    return out
