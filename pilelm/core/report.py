"""The run report: ``report.md`` with the stages, the data, a loss curve and each stage's results.

``write_report(work_dir, results)`` reads what the stages left (manifests, ``metrics.jsonl``
of a run) and writes, into ``work_dir``:

- ``report.md``: one table of stages (ran or resumed, wall time, key counts), the data
  counts, the training summary, then the sections of the stages that render their own
  (``Command.report`` in ``pilelm.core.stages``: eval's BPB per Pile component next to the
  unigram baseline, generate's samples), each written by the module that owns the format
  of that stage's output;
- ``loss.png``: training loss per step (raw and smoothed), validation loss, and a stage's
  reference loss in the same units (nats per token) for scale (eval's unigram baseline).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


def _manifest(path: Path | None) -> dict[str, Any] | None:
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
        m = _manifest(r.output) if r.output and r.output.is_dir() else None
        seconds = r.seconds
        if r.status == "skipped" and m:  # the time it took when it ran
            timings = {k: v for k, v in m.get("timings", {}).items() if isinstance(v, int | float)}
            seconds = timings.get("total", sum(timings.values()))
        scalars = {k: v for k, v in (m or {}).get("counts", {}).items() if not isinstance(v, dict | list)}
        shown = ", ".join(f"{k}={display_value(v)}" for k, v in list(scalars.items())[:6])
        status = "ran" if r.status == "ran" else "resumed (already done)"
        lines.append(f"| {i} | `{r.name}` | {status} | {seconds:.1f} | `{display_path(r.output, work_dir)}` | {shown} |")
    return lines


def _mb(n: Any) -> str:
    return f"{n / 1e6:.2f}" if isinstance(n, int | float) else "-"


def _prepare_section(path: Path, work_dir: Path) -> list[str]:
    manifest = _manifest(path) or {}
    counts = manifest.get("counts", {})
    if not counts:
        return []
    # The prepared dir names its own report files (the markdown first): data/ owns that layout.
    stats = next((f for f in manifest.get("extra", {}).get("report", []) if f.endswith(".md")), None)
    lines = [f"### Prepared data: `{display_path(path, work_dir)}`", "",
             f"{display_value(counts.get('documents_in'))} documents ({_mb(counts.get('bytes_in'))} MB) in, "
             f"{display_value(counts.get('documents_out'))} documents ({_mb(counts.get('bytes_out'))} MB) out."]
    if stats and (path / stats).is_file():
        lines[-1] += f" Details: `{display_path(path / stats, work_dir)}`."
    comps = counts.get("components", {})
    if comps:
        lines += ["", "| component | docs in | docs out | MB in | MB out | main drop reasons |",
                  "|---|---:|---:|---:|---:|---|"]
        for name, c in sorted(comps.items()):
            drops = sorted(c.get("dropped", {}).items(), key=lambda kv: -kv[1])[:3]
            reasons = ", ".join(f"{k} {v}" for k, v in drops)
            lines.append(f"| {name} | {display_value(c.get('documents_in'))} | {display_value(c.get('documents_out'))} | "
                         f"{_mb(c.get('bytes_in'))} | {_mb(c.get('bytes_out'))} | {reasons} |")
    return lines + [""]


def _tokens_section(tok_dirs: list[Path], shard_dirs: list[Path], work_dir: Path) -> list[str]:
    lines: list[str] = []
    for p in tok_dirs:
        cfg = (_manifest(p) or {}).get("config", {})
        lines += [f"### Tokenizer: `{display_path(p, work_dir)}`", "",
                  f"{cfg.get('kind', '?')}, vocabulary {display_value(cfg.get('vocab_size'))}.", ""]
    for p in shard_dirs:
        splits = (_manifest(p) or {}).get("counts", {}).get("splits", {})
        if not splits:
            continue
        lines += [f"### Token shards: `{display_path(p, work_dir)}`", "",
                  "| split | documents | tokens | MB of text | bytes / token |", "|---|---:|---:|---:|---:|"]
        for name, c in splits.items():
            tokens, nbytes = c.get("tokens"), c.get("bytes")
            bpt = f"{nbytes / tokens:.3f}" if tokens and nbytes else "-"
            lines.append(f"| {name} | {display_value(c.get('documents'))} | {display_value(tokens)} | {_mb(nbytes)} | {bpt} |")
        lines.append("")
    return lines


def _train_section(run_dir: Path, work_dir: Path, metrics: list[dict[str, Any]]) -> list[str]:
    m = _manifest(run_dir) or {}
    cfg = m.get("config", {})
    lines = [f"### Training: `{display_path(run_dir, work_dir)}`", ""]
    model = cfg.get("model")
    if isinstance(model, dict):
        shape = ("arch", "n_layer", "n_head", "d_model", "block_size", "vocab_size")
        params = m.get("counts", {}).get("parameters")
        lines.append("model: " + ", ".join(f"{k}={model[k]}" for k in shape if k in model)
                     + (f", {params / 1e6:.2f}M parameters" if isinstance(params, int | float) else ""))
        lines.append("")
    if metrics:
        last = metrics[-1]
        vals = [x for x in metrics if x.get("val_loss") is not None]
        facts = {
            "steps": last.get("step"),
            "tokens": last.get("tokens"),
            "final train loss": last.get("loss"),
            "tokens/s (last)": last.get("tokens_per_s"),
        }
        privacy = m.get("extra", {}).get("privacy")
        if privacy:  # DP-SGD (pilelm/privacy/dpsgd.py)
            facts["DP-SGD epsilon (delta)"] = f"{privacy['epsilon']:.2f} ({privacy['delta']:.2g})"
        if vals:
            facts["final val loss"] = vals[-1]["val_loss"]
            if vals[-1].get("val_bpb") is not None:
                facts["final val BPB"] = vals[-1]["val_bpb"]
        lines += ["| | |", "|---|---:|"] + [f"| {k} | {display_value(v)} |" for k, v in facts.items() if v is not None]
        lines.append("")
    return lines


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

    data_lines: list[str] = []
    for p in by_name.get("prepare", []):
        data_lines += _prepare_section(p, work_dir)
    data_lines += _tokens_section(by_name.get("tokenizer train", []), by_name.get("tokenize", []), work_dir)
    if data_lines:
        lines += ["## Data", "", *data_lines]

    runs = by_name.get("train", []) + by_name.get("import", [])
    if runs:
        lines += ["## Training", ""]
    for i, run_dir in enumerate(runs):
        metrics = read_metrics(run_dir)
        png_name = LOSS_PNG if i == 0 else f"loss_{i}.png"
        counts = (_manifest(run_dir) or {}).get("counts", {})
        title = f"{run_dir.name}: training loss"
        if isinstance(counts.get("parameters"), int) and isinstance(counts.get("tokens"), int):
            title += f" ({counts['parameters'] / 1e6:.1f}M parameters, {counts['tokens'] / 1e6:.2f}M tokens)"
        png = plot_loss(metrics, work_dir / png_name, reference, title=title)
        lines += _train_section(run_dir, work_dir, metrics)
        if png:
            lines += [f"![loss curve]({png_name})", ""]

    for sec in sections:
        lines += sec.body

    out = work_dir / REPORT
    atomic_write_text(out, "\n".join(lines).rstrip() + "\n")
    for sec in sections:
        if sec.summary:
            log.info("%s", sec.summary)
    return out
