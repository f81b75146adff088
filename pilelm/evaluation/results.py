"""What ``pilelm eval`` writes and how it reads back: ``results.json`` (the numbers),
``results.md`` (tables), ``bpb.png`` (bars per component), and the eval's section of the run
report. The BPB table is drawn here only: ``results.md`` and the run report show the same one.

``results.json`` is ``{"runs": {name: {"overall": metrics, "components": {name: metrics},
"generation": {bleu, chrf, ...}}}, "baselines": {"unigram": {...}}}`` with metrics
``{bpb, ppl_token, nll, tokens, bytes, documents}`` (``pilelm.evaluation.bpb.summarize``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pilelm.core.atomic import atomic_write_json, atomic_write_text
from pilelm.core.plots import png_figure
from pilelm.core.report import ReportSection, display_path, display_value

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
BPB_PNG = "bpb.png"


def write_results(out: Path, results: dict[str, Any], settings: dict[str, Any]) -> None:
    """``results.json``, ``results.md`` and ``bpb.png`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / RESULTS_JSON, results)
    atomic_write_text(out / RESULTS_MD, results_markdown(results, settings))
    plot_bpb(results, out / BPB_PNG)


def read_results(eval_dir: Path) -> dict[str, Any] | None:
    """An eval output's ``results.json``; None when it has none."""
    path = eval_dir / RESULTS_JSON
    return json.loads(path.read_text()) if path.is_file() else None


def bpb_table(results: dict[str, Any], digits: int = 3) -> list[str]:
    """Markdown table: BPB per component for each run, the unigram baseline beside them, and
    each run's BPB as a fraction of the baseline's."""
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
        cells = [label, display_value(nbytes) if nbytes else "-"]
        cells += [f"{e['bpb']:.{digits}f}" if e and e.get("bpb") is not None else "-" for e in entries]
        if unigram:
            cells.append(f"{base['bpb']:.{digits}f}" if base and base.get("bpb") is not None else "-")
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


def results_markdown(results: dict[str, Any], settings: dict[str, Any]) -> str:
    runs = results["runs"]
    cols = list(runs) + list(results["baselines"])
    ref = next(iter(runs.values()), None) or next(iter(results["baselines"].values()), None)
    lines = [f"# Evaluation of {', '.join(runs)}", ""]
    lines.append(", ".join(f"{k}: {v}" for k, v in settings.items()))
    lines.append("")
    if ref is not None and "overall" in ref:
        lines += ["## Bits per byte (lower is better)", "", *bpb_table(results, digits=4), ""]
        lines += ["## Token perplexity", "", "| component | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]

        def row(label: str, get: Any) -> str:
            metrics = [get(runs.get(c) or results["baselines"].get(c)) for c in cols]
            return f"| {label} | " + " | ".join(f"{m['ppl_token']:.4f}" if m else "" for m in metrics) + " |"

        for comp in ref["components"]:
            lines.append(row(comp, lambda e, comp=comp: e["components"].get(comp)))
        lines += [row("**overall**", lambda e: e["overall"]), ""]
        lines += ["## Documents", "", "| component | documents | bytes | tokens |", "|---|---:|---:|---:|"]
        for comp, m in ref["components"].items():
            lines.append(f"| {comp} | {m['documents']} | {m['bytes']} | {m['tokens']} |")
        o = ref["overall"]
        lines += [f"| **overall** | {o['documents']} | {o['bytes']} | {o['tokens']} |", ""]
    gen = {name: r["generation"] for name, r in runs.items() if "generation" in r}
    if gen:
        lines += ["## Conditional generation", "", "| run | BLEU | chrF | pairs |", "|---|---:|---:|---:|"]
        for name, g in gen.items():
            lines.append(f"| {name} | {g['bleu']:.2f} | {g['chrf']:.2f} | {g['pairs']} |")
        lines += ["", f"sacrebleu: `{next(iter(gen.values()))['bleu_signature']}`", ""]
    return "\n".join(lines)


def plot_bpb(results: dict[str, Any], path: Path) -> None:
    """Grouped horizontal bars: BPB per component (and overall), one bar per run/baseline."""
    import numpy as np

    entries = {**results["runs"], **{f"{k} (baseline)": v for k, v in results["baselines"].items()}}
    entries = {k: v for k, v in entries.items() if "overall" in v}
    if not entries:
        return
    comps = sorted({c for v in entries.values() for c in v["components"]}) + ["overall"]
    n = len(entries)
    height = 0.8 / n
    with png_figure(path, (8, 0.5 + 0.35 * len(comps) * max(1, n / 2))) as (_, ax):
        for k, (name, v) in enumerate(entries.items()):
            vals = [v["overall"]["bpb"] if c == "overall" else v["components"].get(c, {}).get("bpb", np.nan)
                    for c in comps]
            ax.barh(np.arange(len(comps)) + k * height, vals, height=height, label=name)
        ax.set_yticks(np.arange(len(comps)) + height * (n - 1) / 2, comps)
        ax.invert_yaxis()
        ax.set_xlabel("bits per byte (lower is better)")
        ax.legend(loc="best", fontsize="small")


def report_section(eval_dir: Path, work_dir: Path) -> ReportSection | None:
    """The eval's part of the run report: test BPB under the title, the BPB table and plot, and
    the unigram baseline's loss on the loss curves."""
    results = read_results(eval_dir)
    if results is None:
        return None
    summary = summary_line(results)
    body = [f"## Bits per byte on the test split (`{display_path(eval_dir, work_dir)}`)", "",
            "BPB = total NLL in bits / UTF-8 bytes of the text; the unigram baseline predicts "
            "every token from its training-set frequency alone.", "", *bpb_table(results), ""]
    if (eval_dir / BPB_PNG).is_file():
        body += [f"![BPB per component]({display_path(eval_dir / BPB_PNG, work_dir)})", ""]
    base_nll = results.get("baselines", {}).get("unigram", {}).get("overall", {}).get("nll")
    reference = None if base_nll is None else (f"unigram baseline, test ({base_nll:.2f})", float(base_nll))
    return ReportSection(body, headline=[f"**Test BPB: {summary}** (lower is better).", ""],
                         summary=f"test {summary}", loss_reference=reference)
