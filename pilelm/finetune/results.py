"""The fine-tuning results a person reads: ``results.md``, ``curves.png``, ``confusion.png``.

``pilelm run``'s report includes ``results.md`` (and its pictures) of every finetune stage
(``report_section``, named by the stage's ``Command.report``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pilelm.core.atomic import atomic_write_text
from pilelm.core.plots import png_figure
from pilelm.core.report import ReportSection, display_path, plot_train_loss, read_metrics
from pilelm.finetune.baselines import baseline_table

CURVES_PNG = "curves.png"
CONFUSION_PNG = "confusion.png"
RESULTS_MD = "results.md"


def plot_curves(ft_dir: Path, metric_name: str) -> Path | None:
    """Train loss (raw and smoothed) and the validation metric per step, on two axes."""
    rows = read_metrics(ft_dir)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_metric"]) for r in rows if "val_metric" in r]
    if not train and not val:
        return None
    out = ft_dir / CURVES_PNG
    with png_figure(out, (8, 4.5)) as (_, ax):
        plot_train_loss(ax, train)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("cross-entropy")
        ax.grid(alpha=0.3)
        if val:
            ax2 = ax.twinx()
            vs, vm = zip(*val, strict=True)
            ax2.plot(vs, vm, "o-", color="tab:orange", markersize=4, label=f"val {metric_name}")
            ax2.set_ylabel(f"val {metric_name}")
            ax2.legend(loc="lower right")
        if train:
            ax.legend(loc="upper right")
        ax.set_title(f"{ft_dir.name}: train loss and validation metric")
    return out


def plot_confusion(ft_dir: Path, confusion: list[list[int]], labels: list[str], split: str) -> Path:
    """Row-normalised confusion matrix (rows: gold, columns: predicted) with the counts."""
    import numpy as np

    m = np.asarray(confusion, dtype=np.float64)
    frac = m / np.maximum(1.0, m.sum(1, keepdims=True))
    size = max(4.0, 0.6 * len(labels) + 2)
    out = ft_dir / CONFUSION_PNG
    with png_figure(out, (size + 1, size)) as (fig, ax):
        im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        for i in range(len(labels)):
            for j in range(len(labels)):
                ax.text(j, i, str(int(m[i, j])), ha="center", va="center", fontsize=8,
                        color="white" if frac[i, j] > 0.5 else "black")
        ax.set_xlabel("predicted")
        ax.set_ylabel("gold")
        ax.set_title(f"confusion matrix ({split})")
        fig.colorbar(im, ax=ax, fraction=0.046)
    return out


def _f(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def metric_table(result: dict[str, Any]) -> list[str]:
    """Markdown rows: the headline numbers, then per label / type / mark."""
    heads = [k for k in ("accuracy", "macro_f1", "precision", "recall", "f1", "token_accuracy", "micro_precision",
                         "micro_recall", "micro_f1", "case_f1") if k in result]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---:|" * len(heads),
             "| " + " | ".join(_f(result[k]) for k in heads) + " |", ""]
    detail = result.get("per_label") or result.get("per_type") or result.get("per_mark") or {}
    if detail:
        lines += ["| | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {name} | {_f(v['precision'])} | {_f(v['recall'])} | {_f(v['f1'])} | {int(v['support'])} |"
                  for name, v in detail.items()]
        lines.append("")
    return lines


def write_results(ft_dir: Path, results: dict[str, Any]) -> Path:
    """results.md (+ curves.png, + confusion.png for a classifier) in ``ft_dir``."""
    lines = [f"### Fine-tuning `{results['task']}`: `{ft_dir.name}`", "",
             f"Best validation {results['metric']}: **{results['best_val']:.4f}** at step {results['best_step']} "
             f"of {results['steps']} (that checkpoint is kept and tested). Trainable parameters: "
             f"{results['trainable_parameters']:,} of {results['parameters']:,}"
             + (f" (LoRA r={results['lora_r']})." if results.get("lora_r") else " (full fine-tuning)."), ""]
    for split in ("test", "val"):
        if split in results:
            lines += [f"**{split}** ({results['metric']} {results[split]['main']:.4f}):", "",
                      *metric_table(results[split])]
    lines += baseline_table(results)
    if plot_curves(ft_dir, results["metric"]):
        lines += [f"![train loss and validation metric]({CURVES_PNG})", ""]
    split = "test" if "test" in results else "val"
    if "confusion" in results.get(split, {}):
        plot_confusion(ft_dir, results[split]["confusion"], results["labels"], split)
        lines += [f"![confusion matrix]({CONFUSION_PNG})", ""]
    out = ft_dir / RESULTS_MD
    atomic_write_text(out, "\n".join(lines).rstrip() + "\n")
    return out


def report_section(ft_dir: Path, work_dir: Path) -> ReportSection | None:
    """The run report's part for a finetune stage: its ``results.md``, picture links made
    relative to the report."""
    path = ft_dir / RESULTS_MD
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    for png in (CURVES_PNG, CONFUSION_PNG):
        text = text.replace(f"]({png})", f"]({display_path(ft_dir / png, work_dir)})")
    results = ft_dir / "results.json"
    summary = ""
    if results.is_file():
        import json

        r = json.loads(results.read_text())
        split = "test" if "test" in r else "val"
        summary = f"fine-tuned {r['task']}: {split} {r['metric']} {r[split]['main']:.4f}"
    return ReportSection(["## Fine-tuning", "", *text.rstrip("\n").splitlines(), ""], summary=summary)
