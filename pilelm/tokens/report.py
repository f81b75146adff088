"""The run report's sections of ``pilelm tokenizer train`` and ``pilelm tokenize``
(``Command.report``): the tokenizer's kind and vocabulary, the shards' tokens per split."""

from __future__ import annotations

from pathlib import Path

from pilelm.core.report import ReportSection, display_mb, display_path, display_value, stage_manifest


def tokenizer_section(path: Path, work_dir: Path) -> ReportSection | None:
    cfg = (stage_manifest(path) or {}).get("config", {})
    return ReportSection([f"### Tokenizer: `{display_path(path, work_dir)}`", "",
                          f"{cfg.get('kind', '?')}, vocabulary {display_value(cfg.get('vocab_size'))}.", ""],
                         part="data")


def shards_section(path: Path, work_dir: Path) -> ReportSection | None:
    splits = (stage_manifest(path) or {}).get("counts", {}).get("splits", {})
    if not splits:
        return None
    lines = [f"### Token shards: `{display_path(path, work_dir)}`", "",
             "| split | documents | tokens | MB of text | bytes / token |", "|---|---:|---:|---:|---:|"]
    for name, c in splits.items():
        tokens, nbytes = c.get("tokens"), c.get("bytes")
        bpt = f"{nbytes / tokens:.3f}" if tokens and nbytes else "-"
        lines.append(f"| {name} | {display_value(c.get('documents'))} | {display_value(tokens)} | "
                     f"{display_mb(nbytes)} | {bpt} |")
    return ReportSection(lines + [""], part="data")
