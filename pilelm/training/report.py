"""A training run's section of the run report (``Command.report`` of ``train`` and ``import``):
the model's shape, the last step's numbers, the final validation loss, and its loss curve."""

from __future__ import annotations

from pathlib import Path

from pilelm.core.report import (
    LossCurve,
    ReportSection,
    display_path,
    display_value,
    read_metrics,
    stage_manifest,
)

SHAPE = ("arch", "n_layer", "n_head", "d_model", "block_size", "vocab_size")


def report_section(run_dir: Path, work_dir: Path) -> ReportSection:
    m = stage_manifest(run_dir) or {}
    cfg = m.get("config", {})
    counts = m.get("counts", {})
    metrics = read_metrics(run_dir)
    lines = [f"### Training: `{display_path(run_dir, work_dir)}`", ""]
    model = cfg.get("model")
    if isinstance(model, dict):
        params = counts.get("parameters")
        lines.append("model: " + ", ".join(f"{k}={model[k]}" for k in SHAPE if k in model)
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
    title = f"{run_dir.name}: training loss"
    if isinstance(counts.get("parameters"), int) and isinstance(counts.get("tokens"), int):
        title += f" ({counts['parameters'] / 1e6:.1f}M parameters, {counts['tokens'] / 1e6:.2f}M tokens)"
    return ReportSection(lines, part="training", loss_curve=LossCurve(metrics, title))
