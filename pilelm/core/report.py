"""The run report: ``report.md`` with the stages, the data, a loss curve and BPB per component.

``write_report(work_dir, results)`` reads what the stages left (manifests, ``metrics.jsonl``
of a run, ``results.json`` of an eval, a generate JSONL file) and writes, into ``work_dir``:

- ``report.md``: one table of stages (ran or resumed, wall time, key counts), the data
  counts, the training summary, BPB per Pile component next to the unigram baseline, and the
  generated samples;
- ``loss.png``: training loss per step (raw and smoothed), validation loss, and the unigram
  baseline's test loss in the same units (nats per token) for scale.

Bits per byte (BPB) is the model's total negative log-likelihood in bits over the UTF-8 bytes
of the text (Gao et al. 2020, "The Pile", section 4), so it compares across tokenizers.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pilelm.core.atomic import atomic_path, atomic_write_text
from pilelm.core.manifest import MANIFEST, read_manifest

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


def _manifest(path: Path | None) -> dict[str, Any] | None:
    if path is None or not (path / MANIFEST).is_file():
        return None
    try:
        return read_manifest(path)
    except (OSError, json.JSONDecodeError):
        return None


def _rel(path: Path | None, root: Path) -> str:
    if path is None:
        return "-"
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _fmt(v: Any) -> str:
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


def nats_per_token(entry: dict[str, Any]) -> float | None:
    """Mean loss in nats/token from an eval entry's bpb, bytes and tokens."""
    try:
        return entry["bpb"] * entry["bytes"] / entry["tokens"] * math.log(2)
    except (KeyError, TypeError, ZeroDivisionError):
        return None


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


def plot_loss(metrics: list[dict[str, Any]], out: Path, baseline_nats: float | None = None,
              title: str = "") -> Path | None:
    """Write the loss curve PNG; None when there is nothing to plot."""
    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m and "step" in m and m["loss"] is not None]
    val = [(m["step"], m["val_loss"]) for m in metrics if m.get("val_loss") is not None and "step" in m]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display; also keeps the demo working over ssh
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    if train:
        steps, losses = zip(*train, strict=True)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1, label="train loss")
        ax.plot(steps, centered_mean(losses, max(1, len(losses) // 10)), color="tab:blue", linewidth=2,
                label="train loss (smoothed)")
    if val:
        vs, vl = zip(*val, strict=True)
        ax.plot(vs, vl, "o-", color="tab:orange", linewidth=1.5, markersize=4, label="val loss")
    if baseline_nats is not None:
        ax.axhline(baseline_nats, color="gray", linestyle="--", linewidth=1,
                   label=f"unigram baseline, test ({baseline_nats:.2f})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / token)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out


def bpb_table(results: dict[str, Any]) -> list[str]:
    """Markdown table: BPB per component for each run, the unigram baseline beside them."""
    runs: dict[str, Any] = results.get("runs", {})
    unigram = results.get("baselines", {}).get("unigram", {})
    comps = sorted({c for r in [*runs.values(), unigram] for c in r.get("components", {})})
    head = ["component", "bytes", *[f"{name} BPB" for name in runs]]
    if unigram:
        head += ["unigram BPB", *[f"{name} / unigram" for name in runs]]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]

    def row(label: str, get: Any) -> str:
        entries = [get(r) for r in runs.values()]
        base = get(unigram) if unigram else None
        nbytes = next((e.get("bytes") for e in [*entries, base] if e and e.get("bytes")), None)
        cells = [label, _fmt(nbytes) if nbytes else "-"]
        cells += [f"{e['bpb']:.3f}" if e and e.get("bpb") is not None else "-" for e in entries]
        if unigram:
            cells.append(f"{base['bpb']:.3f}" if base and base.get("bpb") is not None else "-")
            for e in entries:
                ok = e and base and e.get("bpb") is not None and base.get("bpb")
                cells.append(f"{e['bpb'] / base['bpb']:.2f}" if ok else "-")
        return "| " + " | ".join(cells) + " |"

    for c in comps:
        lines.append(row(c, lambda r, c=c: r.get("components", {}).get(c)))
    lines.append(row("**overall**", lambda r: r.get("overall")))
    return lines


def summary_line(results: dict[str, Any]) -> str:
    """One line for the log: each run's overall BPB and the unigram baseline's."""
    parts = [f"{name} BPB {r['overall']['bpb']:.3f}" for name, r in results.get("runs", {}).items()
             if r.get("overall", {}).get("bpb") is not None]
    base = results.get("baselines", {}).get("unigram", {}).get("overall", {}).get("bpb")
    if base is not None:
        parts.append(f"unigram baseline BPB {base:.3f}")
    return ", ".join(parts)


def _stage_rows(work_dir: Path, results: list[StageResult]) -> list[str]:
    lines = ["| # | stage | status | seconds | output | counts |", "|---:|---|---|---:|---|---|"]
    for i, r in enumerate(results, 1):
        m = _manifest(r.output) if r.output and r.output.is_dir() else None
        seconds = r.seconds
        if r.status == "skipped" and m:  # the time it took when it ran
            timings = {k: v for k, v in m.get("timings", {}).items() if isinstance(v, int | float)}
            seconds = timings.get("total", sum(timings.values()))
        scalars = {k: v for k, v in (m or {}).get("counts", {}).items() if not isinstance(v, dict | list)}
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in list(scalars.items())[:6])
        status = "ran" if r.status == "ran" else "resumed (already done)"
        lines.append(f"| {i} | `{r.name}` | {status} | {seconds:.1f} | `{_rel(r.output, work_dir)}` | {shown} |")
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
    lines = [f"### Prepared data: `{_rel(path, work_dir)}`", "",
             f"{_fmt(counts.get('documents_in'))} documents ({_mb(counts.get('bytes_in'))} MB) in, "
             f"{_fmt(counts.get('documents_out'))} documents ({_mb(counts.get('bytes_out'))} MB) out."]
    if stats and (path / stats).is_file():
        lines[-1] += f" Details: `{_rel(path / stats, work_dir)}`."
    comps = counts.get("components", {})
    if comps:
        lines += ["", "| component | docs in | docs out | MB in | MB out | main drop reasons |",
                  "|---|---:|---:|---:|---:|---|"]
        for name, c in sorted(comps.items()):
            drops = sorted(c.get("dropped", {}).items(), key=lambda kv: -kv[1])[:3]
            reasons = ", ".join(f"{k} {v}" for k, v in drops)
            lines.append(f"| {name} | {_fmt(c.get('documents_in'))} | {_fmt(c.get('documents_out'))} | "
                         f"{_mb(c.get('bytes_in'))} | {_mb(c.get('bytes_out'))} | {reasons} |")
    return lines + [""]


def _tokens_section(tok_dirs: list[Path], shard_dirs: list[Path], work_dir: Path) -> list[str]:
    lines: list[str] = []
    for p in tok_dirs:
        cfg = (_manifest(p) or {}).get("config", {})
        lines += [f"### Tokenizer: `{_rel(p, work_dir)}`", "",
                  f"{cfg.get('kind', '?')}, vocabulary {_fmt(cfg.get('vocab_size'))}.", ""]
    for p in shard_dirs:
        splits = (_manifest(p) or {}).get("counts", {}).get("splits", {})
        if not splits:
            continue
        lines += [f"### Token shards: `{_rel(p, work_dir)}`", "",
                  "| split | documents | tokens | MB of text | bytes / token |", "|---|---:|---:|---:|---:|"]
        for name, c in splits.items():
            tokens, nbytes = c.get("tokens"), c.get("bytes")
            bpt = f"{nbytes / tokens:.3f}" if tokens and nbytes else "-"
            lines.append(f"| {name} | {_fmt(c.get('documents'))} | {_fmt(tokens)} | {_mb(nbytes)} | {bpt} |")
        lines.append("")
    return lines


def _train_section(run_dir: Path, work_dir: Path, metrics: list[dict[str, Any]]) -> list[str]:
    m = _manifest(run_dir) or {}
    cfg = m.get("config", {})
    lines = [f"### Training: `{_rel(run_dir, work_dir)}`", ""]
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
        if vals:
            facts["final val loss"] = vals[-1]["val_loss"]
            if vals[-1].get("val_bpb") is not None:
                facts["final val BPB"] = vals[-1]["val_bpb"]
        lines += ["| | |", "|---|---:|"] + [f"| {k} | {_fmt(v)} |" for k, v in facts.items() if v is not None]
        lines.append("")
    return lines


def _samples_section(path: Path) -> list[str]:
    lines = ["## Samples", "", f"From `{path.name}`: each block is the prompt, then the model's completion.", ""]
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        prompt, completion = rec.get("prompt", ""), rec.get("completion", "")
        text = (prompt + completion).replace("```", "'''")
        lines += [f"**Sample {i}**, prompt `{json.dumps(prompt, ensure_ascii=False)}`:", "",
                  "```text", text.strip("\n"), "```", ""]
    return lines


def write_report(work_dir: str | Path, results: list[StageResult], title: str = "pilelm run") -> Path:
    """Write ``report.md`` (and ``loss.png`` when a train stage ran) into ``work_dir``."""
    work_dir = Path(work_dir)
    by_name: dict[str, list[Path]] = {}
    for r in results:
        if r.output is not None and r.output.exists():
            by_name.setdefault(r.name, []).append(r.output)
    evals = [p for p in by_name.get("eval", []) if (p / "results.json").is_file()]
    eval_results = [json.loads((p / "results.json").read_text()) for p in evals]
    baseline_nats = None
    for res in eval_results:
        base = res.get("baselines", {}).get("unigram", {}).get("overall")
        if base:
            baseline_nats = nats_per_token(base)

    lines = [f"# {title}", "", f"Written {time.strftime('%Y-%m-%d %H:%M:%S')} in `{work_dir}`.", ""]
    for res in eval_results:
        lines += [f"**Test BPB: {summary_line(res)}** (lower is better).", ""]
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
        png = plot_loss(metrics, work_dir / png_name, baseline_nats, title=title)
        lines += _train_section(run_dir, work_dir, metrics)
        if png:
            lines += [f"![loss curve]({png_name})", ""]

    for p, res in zip(evals, eval_results, strict=True):
        lines += [f"## Bits per byte on the test split (`{_rel(p, work_dir)}`)", "",
                  "BPB = total NLL in bits / UTF-8 bytes of the text; the unigram baseline predicts "
                  "every token from its training-set frequency alone.", "", *bpb_table(res), ""]
        if (p / "bpb.png").is_file():
            lines += [f"![BPB per component]({_rel(p / 'bpb.png', work_dir)})", ""]

    for p in by_name.get("generate", []):
        if p.is_file():
            lines += _samples_section(p)

    out = work_dir / REPORT
    atomic_write_text(out, "\n".join(lines).rstrip() + "\n")
    for res in eval_results:
        log.info("test %s", summary_line(res))
    return out
