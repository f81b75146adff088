"""Counting what prepare does, and reporting it: per-component documents and bytes in/out,
drops per reason, edits per step, length histograms; the rejects log; ``stats.md`` + plots;
prepare's section of the run report.

Counts are kept per task as plain JSON (so a resumed run adds them up exactly as an
uninterrupted one) and merged at the end.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from pilelm.core.report import ReportSection, display_mb, display_path, display_value, stage_manifest
from pilelm.data.prepared import PLOTS, STATS

# Length histogram bins: log10(characters), 0.1 wide, from 1 character to 10**9.
HIST_BINS = 90
LENGTHS_PNG, REMOVED_PNG = PLOTS


def _hist_bin(chars: int) -> int:
    return min(HIST_BINS - 1, int(np.log10(max(chars, 1)) * 10))


def _new_component() -> dict[str, Any]:
    return {
        "documents_in": 0, "bytes_in": 0, "documents_out": 0, "bytes_out": 0,
        "dropped": {}, "dropped_bytes": {}, "edited": {},
        "hist_in": [0] * HIST_BINS, "hist_out": [0] * HIST_BINS,
    }


class TaskStats:
    """Counters of one task; ``to_json`` / ``merge`` make them resumable and summable."""

    def __init__(self) -> None:
        self.components: dict[str, dict[str, Any]] = {}
        self.pii: dict[str, int] = {}
        self.decontam_cuts = 0

    def _c(self, component: str) -> dict[str, Any]:
        c = self.components.get(component)
        if c is None:
            c = self.components[component] = _new_component()
        return c

    def seen(self, component: str, nbytes: int, chars: int) -> None:
        c = self._c(component)
        c["documents_in"] += 1
        c["bytes_in"] += nbytes
        c["hist_in"][_hist_bin(chars)] += 1

    def dropped(self, component: str, reason: str, nbytes: int) -> None:
        c = self._c(component)
        c["dropped"][reason] = c["dropped"].get(reason, 0) + 1
        c["dropped_bytes"][reason] = c["dropped_bytes"].get(reason, 0) + nbytes

    def edited(self, component: str, step: str, bytes_removed: int) -> None:
        e = self._c(component)["edited"].setdefault(step, {"documents": 0, "bytes_removed": 0})
        e["documents"] += 1
        e["bytes_removed"] += bytes_removed

    def kept(self, component: str, nbytes: int, chars: int) -> None:
        c = self._c(component)
        c["documents_out"] += 1
        c["bytes_out"] += nbytes
        c["hist_out"][_hist_bin(chars)] += 1

    def add_pii(self, counts: dict[str, int]) -> None:
        for k, v in counts.items():
            self.pii[k] = self.pii.get(k, 0) + v

    def to_json(self) -> dict[str, Any]:
        return {"components": self.components, "pii": self.pii, "decontam_cuts": self.decontam_cuts}

    @classmethod
    def merge(cls, parts: list[dict[str, Any]]) -> TaskStats:
        out = cls()
        for p in parts:
            for name, c in p["components"].items():
                o = out._c(name)
                for k in ("documents_in", "bytes_in", "documents_out", "bytes_out"):
                    o[k] += c[k]
                for k in ("dropped", "dropped_bytes"):
                    for r, v in c[k].items():
                        o[k][r] = o[k].get(r, 0) + v
                for step, e in c["edited"].items():
                    oe = o["edited"].setdefault(step, {"documents": 0, "bytes_removed": 0})
                    oe["documents"] += e["documents"]
                    oe["bytes_removed"] += e["bytes_removed"]
                for k in ("hist_in", "hist_out"):
                    o[k] = [a + b for a, b in zip(o[k], c[k], strict=True)]
            out.add_pii(p.get("pii", {}))
            out.decontam_cuts += p.get("decontam_cuts", 0)
        out.components = dict(sorted(out.components.items()))
        return out

    def totals(self) -> dict[str, Any]:
        t: dict[str, Any] = {"documents_in": 0, "bytes_in": 0, "documents_out": 0, "bytes_out": 0,
                             "dropped": {}, "dropped_bytes": {}}
        for c in self.components.values():
            for k in ("documents_in", "bytes_in", "documents_out", "bytes_out"):
                t[k] += c[k]
            for k in ("dropped", "dropped_bytes"):
                for r, v in c[k].items():
                    t[k][r] = t[k].get(r, 0) + v
        t["dropped"] = dict(sorted(t["dropped"].items()))
        t["dropped_bytes"] = dict(sorted(t["dropped_bytes"].items()))
        return t

    def manifest_counts(self) -> dict[str, Any]:
        """The summary for manifest.json: totals, drops per reason, per-component counts."""
        comps = {
            name: {k: c[k] for k in ("documents_in", "documents_out", "bytes_in", "bytes_out", "dropped")}
            | {"edited": c["edited"]}
            for name, c in self.components.items()
        }
        return self.totals() | {"components": comps, "pii_replaced": dict(sorted(self.pii.items())),
                                "decontam_cuts": self.decontam_cuts}


class RejectsLog:
    """A zstd-compressed JSON-lines log of every dropped document or unreadable record:
    ``{"reason", "source": "file:line", "split", "component", "bytes", "detail", "preview"}``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._buf = io.BytesIO()
        self._w = zstandard.ZstdCompressor(level=3).stream_writer(self._buf, closefd=False)
        self.count = 0

    def write(self, reason: str, source: str, split: str, component: str, nbytes: int,
              detail: str = "", preview: str = "") -> None:
        rec = {"reason": reason, "source": source, "split": split, "component": component,
               "bytes": nbytes, "detail": detail, "preview": preview[:120]}
        self._w.write(json.dumps(rec, ensure_ascii=True).encode() + b"\n")
        self.count += 1

    def getvalue(self) -> bytes:
        self._w.flush(zstandard.FLUSH_FRAME)
        return self._buf.getvalue()


def read_rejects(path: str | Path) -> list[dict[str, Any]]:
    with open(path, "rb") as f:
        data = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True).read()
    return [json.loads(line) for line in data.splitlines() if line]


# ---------------------------------------------------------------- the report


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f}"


def write_report(out_dir: Path, stats: TaskStats, splits: dict[str, TaskStats], title: str = "prepare",
                 file_notes: dict[str, list[dict[str, str]]] | None = None) -> list[str]:
    """Write ``stats.md`` and its plots into ``out_dir``; returns the files written, the
    markdown first. ``file_notes``: input files skipped (``skipped_files``: file, reason) and
    read by their content rather than their name (``read_by_content``: file, note)."""
    from pilelm.core.atomic import atomic_write_text

    files = _plots(out_dir, stats)
    t = stats.totals()
    lines = [
        f"# {title}: what happened to the data", "",
        f"{t['documents_in']:,} documents ({_mb(t['bytes_in'])} MB) in, "
        f"{t['documents_out']:,} documents ({_mb(t['bytes_out'])} MB) out.", "",
        "## Per component", "",
        "| component | docs in | docs out | kept % | MB in | MB out | main drop reasons |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, c in stats.components.items():
        kept = 100 * c["documents_out"] / max(1, c["documents_in"])
        top = sorted(c["dropped"].items(), key=lambda kv: -kv[1])[:3]
        reasons = ", ".join(f"{r} {n}" for r, n in top)
        lines.append(f"| {name} | {c['documents_in']:,} | {c['documents_out']:,} | {kept:.1f} | "
                     f"{_mb(c['bytes_in'])} | {_mb(c['bytes_out'])} | {reasons} |")
    lines += ["", "## What each rule removes, per component", "",
              "Documents dropped (and their share of the component's bytes); `edit:` rows are "
              "kept documents a step shortened (bytes removed).", "",
              "| component | rule | documents | MB | % of component MB |", "|---|---|---:|---:|---:|"]
    for name, c in stats.components.items():
        removed = [(r, n, c["dropped_bytes"][r]) for r, n in c["dropped"].items()]
        removed += [(f"edit:{step}", e["documents"], e["bytes_removed"]) for step, e in c["edited"].items()]
        for r, n, b in sorted(removed, key=lambda row: -row[2]):
            lines.append(f"| {name} | {r} | {n:,} | {_mb(b)} | {100 * b / max(1, c['bytes_in']):.1f} |")
    lines += ["", "## Per split", "", "| split | docs in | docs out | MB in | MB out |", "|---|---:|---:|---:|---:|"]
    for split, s in splits.items():
        st = s.totals()
        lines.append(f"| {split} | {st['documents_in']:,} | {st['documents_out']:,} | "
                     f"{_mb(st['bytes_in'])} | {_mb(st['bytes_out'])} |")
    lines += ["", "## Dropped documents per reason", "", "| reason | documents | MB |", "|---|---:|---:|"]
    for r, n in sorted(t["dropped"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {r} | {n:,} | {_mb(t['dropped_bytes'][r])} |")
    edits: dict[str, list[int]] = {}
    for c in stats.components.values():
        for step, e in c["edited"].items():
            acc = edits.setdefault(step, [0, 0])
            acc[0] += e["documents"]
            acc[1] += e["bytes_removed"]
    lines += ["", "## Documents edited (kept, but changed)", "", "| step | documents | MB removed |",
              "|---|---:|---:|"]
    for step, (n, b) in sorted(edits.items()):
        lines.append(f"| {step} | {n:,} | {_mb(b)} |")
    if stats.pii:
        lines += ["", "PII replaced: " + ", ".join(f"{k} {v:,}" for k, v in sorted(stats.pii.items())) + "."]
    notes = file_notes or {}
    if notes.get("skipped_files"):
        lines += ["", "## Input files skipped (reader.on_bad_file=skip)", "", "| file | reason |", "|---|---|"]
        lines += [f"| {f['file']} | {f['reason']} |" for f in notes["skipped_files"]]
    if notes.get("read_by_content"):
        lines += ["", "## Input files read by their content, not their name", "", "| file | note |", "|---|---|"]
        lines += [f"| {f['file']} | {f['note']} |" for f in notes["read_by_content"]]
    lines += ["", "## Plots", ""] + [f"![{Path(f).stem}]({f})" for f in files] + [""]
    atomic_write_text(out_dir / STATS, "\n".join(lines))
    return [STATS, *files]


def _plots(out_dir: Path, stats: TaskStats) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pilelm.core.atomic import atomic_path

    written = []
    names = list(stats.components)
    if names:
        cols = min(3, len(names))
        rows = (len(names) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
        edges = 10 ** (np.arange(HIST_BINS + 1) / 10)
        used = np.flatnonzero(np.sum([c["hist_in"] for c in stats.components.values()], axis=0))
        lo, hi = (edges[used[0]], edges[used[-1] + 1]) if used.size else (1, 10)
        for ax, name in zip(axes.flat, names, strict=False):
            c = stats.components[name]
            ax.stairs(c["hist_in"], edges, label="in", color="0.6", fill=True)
            ax.stairs(c["hist_out"], edges, label="out", color="C0")
            ax.set_xscale("log")
            ax.set_xlim(lo, hi)
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("characters per document", fontsize=8)
            ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7)
        fig.suptitle("Document length per component (before and after prepare)", fontsize=10)
        fig.tight_layout()
        with atomic_path(out_dir / LENGTHS_PNG) as tmp:
            fig.savefig(tmp, dpi=90, format="png")
        plt.close(fig)
        written.append(LENGTHS_PNG)
    removed: dict[str, float] = {}
    for c in stats.components.values():
        for r, b in c["dropped_bytes"].items():
            removed[f"drop: {r}"] = removed.get(f"drop: {r}", 0) + b / 1e6
        for step, e in c["edited"].items():
            removed[f"edit: {step}"] = removed.get(f"edit: {step}", 0) + e["bytes_removed"] / 1e6
    if removed:
        items = sorted(removed.items(), key=lambda kv: kv[1])
        fig, ax = plt.subplots(figsize=(7, 0.3 * len(items) + 1.2))
        ax.barh([k for k, _ in items], [v for _, v in items], color="C3")
        ax.set_xlabel("MB of text removed")
        ax.set_title("What each step removed", fontsize=10)
        ax.tick_params(labelsize=8)
        fig.tight_layout()
        with atomic_path(out_dir / REMOVED_PNG) as tmp:
            fig.savefig(tmp, dpi=90, format="png")
        plt.close(fig)
        written.append(REMOVED_PNG)
    return written


def report_section(path: Path, work_dir: Path) -> ReportSection | None:
    """Prepare's part of the run report (``Command.report``): documents and bytes in and out,
    per component with the main drop reasons, and where ``stats.md`` lies."""
    manifest = stage_manifest(path) or {}
    counts = manifest.get("counts", {})
    if not counts:
        return None
    # The prepared dir names its own report files (the markdown first).
    stats = next((f for f in manifest.get("extra", {}).get("report", []) if f.endswith(".md")), None)
    lines = [f"### Prepared data: `{display_path(path, work_dir)}`", "",
             f"{display_value(counts.get('documents_in'))} documents ({display_mb(counts.get('bytes_in'))} MB) in, "
             f"{display_value(counts.get('documents_out'))} documents ({display_mb(counts.get('bytes_out'))} MB) out."]
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
                         f"{display_mb(c.get('bytes_in'))} | {display_mb(c.get('bytes_out'))} | {reasons} |")
    return ReportSection(lines + [""], part="data")
