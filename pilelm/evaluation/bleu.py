"""Conditional generation scored against references: corpus BLEU and chrF (sacrebleu).

The pairs are a JSONL file of ``{"prompt": str, "reference": str | [str, ...]}``; each prompt
is completed by ``pilelm.inference.generate.generate`` (greedy, or beam search) and the
completion ends at the first stop string.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch.nn as nn
from tqdm import tqdm

from pilelm.inference.generate import generate
from pilelm.inference.sampling import SamplingParams


def read_pairs(path: str | Path) -> tuple[list[str], list[list[str]]]:
    """Prompts and reference lists of a JSONL file of {"prompt", "reference"} records."""
    prompts, refs = [], []
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"bleu_data {path} does not exist")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from e
            ref = rec.get("reference", rec.get("references")) if isinstance(rec, dict) else None
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or ref is None:
                raise ValueError(f'{path}:{lineno}: expected {{"prompt": str, "reference": str or [str]}}')
            ref_list = [ref] if isinstance(ref, str) else list(ref)
            if not ref_list or not all(isinstance(r, str) for r in ref_list):
                raise ValueError(f"{path}:{lineno}: reference must be a string or a non-empty list of strings")
            prompts.append(rec["prompt"])
            refs.append(ref_list)
    if not prompts:
        raise ValueError(f"{path}: no prompt/reference pairs")
    return prompts, refs


def bleu_chrf(hypotheses: list[str], references: list[list[str]]) -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu defaults: 13a tokenisation, chrF2) of the hypotheses."""
    import sacrebleu

    n_refs = max(len(r) for r in references)
    # sacrebleu takes reference streams; None fills a missing reference of a segment.
    streams = [[r[k] if k < len(r) else None for r in references] for k in range(n_refs)]
    bleu = sacrebleu.corpus_bleu(hypotheses, streams)
    chrf = sacrebleu.corpus_chrf(hypotheses, streams)
    return {"bleu": bleu.score, "chrf": chrf.score, "pairs": len(hypotheses), "bleu_signature": str(bleu.format())}


def run_bleu(
    model: nn.Module,
    tokenizer_dir: Path,
    pairs: str | Path,
    *,
    max_new_tokens: int,
    num_beams: int = 1,
    stop: list[str] | None = None,
    batch_size: int = 16,
) -> dict[str, Any]:
    """BLEU and chrF of the model's greedy (or beam) completions of the prompts in ``pairs``."""
    from pilelm.tokens.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    prompts, refs = read_pairs(pairs)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop=list(stop or []))
    hyps: list[str] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="bleu", disable=None, leave=False):
        hyps += generate(model, tok, prompts[start : start + batch_size], params, num_beams)
    return bleu_chrf([h.strip() for h in hyps], refs)
