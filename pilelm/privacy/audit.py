"""``pilelm audit``: what a trained causal LM memorized of its training data.

- **Canaries** (``--canaries PREPARED/canaries.json``, planted by ``pilelm prepare
  privacy.canaries=N``): each canary's exposure among ``candidates`` random secrets of the
  same format and key (``privacy/exposure.py``), and whether greedy decoding from its prefix
  reproduces the secret; summarised per repetition count, next to the never-planted
  reference canaries.
- **Scrubbed PII** (``pii_originals`` > 0): the originals that ``prepare`` replaced by
  placeholders are found again in the raw training inputs named by the prepared manifest;
  the model is prompted with the text before each and is counted as completing it when its
  greedy continuation contains the original.

Writes ``AUDIT/results.json`` (per canary, per group, PII) and ``results.md``, and
``manifest.json`` (stage "audit") last. ``results.json`` never holds the PII itself: each
original, and any PII in its prompt or in the model's completion, is masked (``masked``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from pilelm.core.atomic import atomic_write_json, atomic_write_text
from pilelm.core.config import require_at_least
from pilelm.core.manifest import clear_manifest, read_manifest, write_manifest
from pilelm.core.report import ReportSection, display_path
from pilelm.privacy.canaries import CanarySet, load_canaries
from pilelm.privacy.exposure import extrapolated_exposure, rank_exposure, sequence_nll

log = logging.getLogger(__name__)

RESULTS = "results.json"
RESULTS_MD = "results.md"


@dataclass
class AuditConfig:
    run: Path = Path("")
    """Run directory to audit (a causal LM: `pilelm train` or `pilelm import` output)."""
    canaries: Path = Path("")
    """canaries.json written by `pilelm prepare ... privacy.canaries=N` (or its prepared dir)."""
    output: Path = Path("")
    """Output directory: results.json, results.md, manifest.json."""
    candidates: int = 1000
    """Random secrets each canary is ranked against."""
    extraction_tokens: int = 0
    """Tokens greedy extraction generates after a prefix; 0 = the secret's length in tokens + 4."""
    pii_originals: int = 100
    """Scrubbed PII originals (from the prepared data's raw train inputs) to prompt for; 0 = skip."""
    pii_context_chars: int = 64
    """Characters of text before a PII original used as its prompt."""
    batch_size: int = 64
    """Sequences per forward pass when scoring."""
    seed: int = 0
    """Seed of the candidate secrets."""
    device: str = "auto"
    """auto (cuda if available), cpu, cuda or cuda:N."""

    def __post_init__(self) -> None:
        require_at_least(self, 1, ("candidates", "batch_size"))
        require_at_least(self, 0, ("extraction_tokens", "pii_originals", "pii_context_chars"))


def _load(cfg: AuditConfig) -> tuple[torch.nn.Module, Any]:
    from pilelm.models import spec_for
    from pilelm.tokens.tokenizer import load_tokenizer
    from pilelm.training.checkpoint import load_for_inference

    model, _, tok_dir = load_for_inference(cfg.run, device=cfg.device)
    if not spec_for(model).causal:
        raise ValueError(f"{cfg.run} holds a {spec_for(model).family} model; the audit needs a causal LM "
                         "(exposure is a likelihood of the canary given its prefix)")
    return model, load_tokenizer(tok_dir)


def audit_canaries(model: torch.nn.Module, tokenizer: Any, canaries: CanarySet, candidates: int, seed: int,
                   batch_size: int = 64, extraction_tokens: int = 0) -> list[dict[str, Any]]:
    """Per canary: NLL, exposure (sampled rank and extrapolated), rank, extraction."""
    from pilelm.inference.generate import generate
    from pilelm.inference.sampling import SamplingParams

    context = [tokenizer.eod_id] if tokenizer.eod_id is not None else []
    context += tokenizer.encode("\n")
    rng = np.random.default_rng([seed, 0x41554449])  # "AUDI"
    space_bits = canaries.secret_digits * math.log2(10)
    rows = []
    for c in tqdm(canaries.canaries, desc="canaries", unit="canary", dynamic_ncols=True):
        others = [s for s in canaries.random_secrets(candidates + 1, rng) if s != c.secret][:candidates]
        nll = sequence_nll(model, tokenizer.encode, [c.text] + [canaries.render(c.key, s) for s in others],
                           context, batch_size)
        exposure_rank, rank = rank_exposure(float(nll[0]), nll[1:])
        n_new = extraction_tokens or len(tokenizer.encode(" " + c.secret)) + 4
        prompt = "\n" + c.prefix.rstrip()
        completion = generate(model, tokenizer, [prompt], SamplingParams(max_new_tokens=n_new, temperature=0.0))[0]
        rows.append({"id": c.id, "repetitions": c.repetitions, "secret": c.secret, "nll": float(nll[0]),
                     "rank": rank, "exposure_rank": exposure_rank,
                     "exposure": extrapolated_exposure(float(nll[0]), nll[1:], space_bits),
                     "extracted": completion.lstrip().startswith(c.secret), "completion": completion})
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per repetition count (0 = reference): canaries, mean exposures and the spread of the
    extrapolated one (sample standard deviation over the group's canaries), extracted count."""
    out = []
    for reps in sorted({r["repetitions"] for r in rows}):
        group = [r for r in rows if r["repetitions"] == reps]
        exposure = np.array([r["exposure"] for r in group])
        out.append({"repetitions": reps, "canaries": len(group), "exposure": float(exposure.mean()),
                    "exposure_sd": float(exposure.std(ddof=1)) if len(group) > 1 else 0.0,
                    "exposure_rank": float(np.mean([r["exposure_rank"] for r in group])),
                    "extracted": sum(r["extracted"] for r in group)})
    return out


def masked(original: str) -> str:
    """A PII original as its first and last character around asterisks (only asterisks up to 4
    characters): enough to tell the items of a results file apart, not to read them back. Not a
    hash: phone numbers and IP addresses are few enough to hash them all."""
    return "*" * len(original) if len(original) <= 4 else original[0] + "*" * (len(original) - 2) + original[-1]


def redacted(text: str, scrubber: Any, originals: tuple[str, ...] = ()) -> str:
    """``text`` with every PII span the scrubber finds, and every one of ``originals``, masked."""
    for original in originals:
        text = text.replace(original, masked(original))
    parts, pos = [], 0
    for a, b, _ in scrubber.find(text):
        parts += [text[pos:a], masked(text[a:b])]
        pos = b
    return "".join(parts) + text[pos:]


def redacted_rows(rows: list[dict[str, Any]], scrubber: Any) -> list[dict[str, Any]]:
    """What ``results.json`` keeps of ``audit_pii``'s rows: the prompt, original and completion
    masked (the scrubbed data must not reappear in the audit's own output)."""
    return [{**row, "prefix": redacted(row["prefix"], scrubber), "original": masked(row["original"]),
             "completion": redacted(row["completion"], scrubber, (row["original"],))} for row in rows]


def pii_scrubber(prepared: Path) -> Any:
    """The scrubber ``prepare`` ran with (its manifest's config), or None when it scrubbed nothing."""
    from pilelm.core.config import from_dict
    from pilelm.data.config import PrepareConfig
    from pilelm.data.pii import PiiScrubber

    pcfg = from_dict(PrepareConfig, read_manifest(prepared)["config"])
    return PiiScrubber(pcfg.pii) if pcfg.pii.enabled else None


def scrubbed_pii(prepared: Path, limit: int, context_chars: int) -> list[dict[str, str]]:
    """Up to ``limit`` PII originals that prepare scrubbed from its train inputs: kind, the
    text before it (``context_chars``, from its line) and the original."""
    from pilelm.core.config import from_dict
    from pilelm.data.config import PrepareConfig
    from pilelm.data.readers import iter_source
    from pilelm.data.sources import expand_inputs

    pcfg = from_dict(PrepareConfig, read_manifest(prepared)["config"])
    scrubber = pii_scrubber(prepared)
    if scrubber is None:
        return []
    found: list[dict[str, str]] = []
    for src in expand_inputs(pcfg.inputs, pcfg.reader.default_component):
        if src.split != "train":
            continue
        for doc in iter_source(src, pcfg.reader):
            text = getattr(doc, "text", None)
            if text is None:  # a rejected record
                continue
            for a, b, kind in scrubber.find(text):
                line_start = text.rfind("\n", 0, a) + 1
                prefix = text[max(line_start, a - context_chars) : a]
                if len(prefix.strip()) >= 8:
                    found.append({"kind": kind, "prefix": prefix, "original": text[a:b]})
                if len(found) >= limit:
                    return found
    return found


def audit_pii(model: torch.nn.Module, tokenizer: Any, items: list[dict[str, str]]) -> list[dict[str, Any]]:
    from pilelm.inference.generate import generate
    from pilelm.inference.sampling import SamplingParams

    rows = []
    for item in tqdm(items, desc="scrubbed PII", unit="item", dynamic_ncols=True):
        n_new = len(tokenizer.encode(item["original"])) + 4
        completion = generate(model, tokenizer, [item["prefix"]], SamplingParams(max_new_tokens=n_new, temperature=0.0))[0]
        rows.append({**item, "completion": completion, "completed": item["original"] in completion})
    return rows


def run_audit(cfg: AuditConfig) -> Path:
    """Run ``pilelm audit``; returns the output directory."""
    if not str(cfg.run) or str(cfg.run) == ".":
        raise ValueError("run: give the run directory to audit (pilelm audit RUN_DIR --canaries FILE)")
    if not str(cfg.canaries) or str(cfg.canaries) == ".":
        raise ValueError("canaries: give PREPARED_DIR/canaries.json (pilelm prepare ... privacy.canaries=N)")
    if not str(cfg.output) or str(cfg.output) == ".":
        raise ValueError("output: give the output directory with -o")
    t0 = time.perf_counter()
    canaries = load_canaries(cfg.canaries)
    canaries_path = Path(cfg.canaries) if Path(cfg.canaries).is_file() else Path(cfg.canaries) / "canaries.json"
    model, tokenizer = _load(cfg)
    torch.manual_seed(cfg.seed)
    rows = audit_canaries(model, tokenizer, canaries, cfg.candidates, cfg.seed, cfg.batch_size,
                          cfg.extraction_tokens)
    groups = summarise(rows)
    pii_rows: list[dict[str, Any]] = []
    prepared = canaries_path.parent
    if cfg.pii_originals and (prepared / "manifest.json").is_file():
        pii_rows = audit_pii(model, tokenizer, scrubbed_pii(prepared, cfg.pii_originals, cfg.pii_context_chars))
        pii_rows = redacted_rows(pii_rows, pii_scrubber(prepared))
    privacy = read_manifest(cfg.run).get("extra", {}).get("privacy")
    results = {"run": str(cfg.run), "privacy": privacy, "candidates": cfg.candidates, "groups": groups,
               "canaries": rows, "pii": {"tried": len(pii_rows), "completed": sum(r["completed"] for r in pii_rows),
                                         "items": pii_rows}}
    out = Path(cfg.output)
    clear_manifest(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / RESULTS, results)
    atomic_write_text(out / RESULTS_MD, "\n".join(results_table(results)) + "\n")
    counts = {"canaries": len(rows), "extracted": sum(r["extracted"] for r in rows),
              "pii_tried": len(pii_rows), "pii_completed": results["pii"]["completed"]}
    write_manifest(out, "audit", cfg, inputs=[cfg.run, canaries_path], counts=counts,
                   timings={"total": time.perf_counter() - t0}, extra={"groups": groups})
    for g in groups:
        log.info("audit: repetitions %3d: exposure %.2f bits (rank %.2f), %d/%d extracted", g["repetitions"],
                 g["exposure"], g["exposure_rank"], g["extracted"], g["canaries"])
    return out


def results_table(results: dict[str, Any]) -> list[str]:
    """Markdown: exposure per repetition count (0 = never planted), extraction, PII."""
    lines = ["| canary repetitions | canaries | exposure (bits, mean ± sd) | exposure, sampled rank (bits) | extracted |",
             "|---:|---:|---:|---:|---:|"]
    for g in results["groups"]:
        name = "0 (reference)" if g["repetitions"] == 0 else str(g["repetitions"])
        lines.append(f"| {name} | {g['canaries']} | {g['exposure']:.2f} ± {g.get('exposure_sd', 0.0):.2f} | "
                     f"{g['exposure_rank']:.2f} | {g['extracted']}/{g['canaries']} |")
    pii = results["pii"]
    lines += ["", f"Scrubbed PII originals completed by greedy decoding: {pii['completed']}/{pii['tried']}."]
    if results.get("privacy"):
        p = results["privacy"]
        lines.append(f"Trained with DP-SGD: epsilon {p['epsilon']:.2f} at delta {p['delta']:.2g} "
                     f"(noise multiplier {p['noise_multiplier']:.3g}, clip {p['max_grad_norm']}).")
    return lines


def report_section(audit_dir: Path, work_dir: Path) -> ReportSection | None:
    """The audit's part of the run report."""
    path = Path(audit_dir) / RESULTS
    if not path.is_file():
        return None
    import json

    results = json.loads(path.read_text())
    body = [f"## Memorization audit (`{display_path(audit_dir, work_dir)}`)", "",
            f"Exposure of each canary among {results['candidates']} random secrets (Carlini et al. 2019); "
            "the never-planted reference canaries show the level of chance.", "", *results_table(results), ""]
    top = max(results["groups"], key=lambda g: g["repetitions"])
    return ReportSection(body, summary=f"canaries x{top['repetitions']}: exposure {top['exposure']:.1f} bits")
