"""Scoring a chat model on held-out conversations, and the before/after report.

For each conversation the prompt (everything before its last reply, with the generation
prompt) is decoded greedily, or by beam search with ``sft.num_beams`` > 1, up to the model's
end-of-text token or ``sft.max_new_tokens``; the reply is compared with the reference by
ROUGE-1/2/L (``pilelm.evaluation.rouge``) and corpus BLEU/chrF (sacrebleu). The reply loss
(mean cross-entropy per reply token, teacher-forced) is measured on the same conversations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pilelm.core.atomic import atomic_write_text
from pilelm.evaluation.bleu import bleu_chrf
from pilelm.evaluation.rouge import rouge
from pilelm.finetune.config import FinetuneConfig
from pilelm.finetune.results import RESULTS_MD, plot_curves
from pilelm.finetune.sft.encoding import SftExample
from pilelm.finetune.sft.trainer import reply_loss, rows_of
from pilelm.inference.generate import generate
from pilelm.inference.sampling import SamplingParams
from pilelm.tokens.tokenizer import PileTokenizer
from pilelm.training.precision import Precision

HEADLINE = "rougeL"
METRIC = "ROUGE-L"


def score_replies(model: torch.nn.Module, tokenizer: PileTokenizer, examples: list[SftExample],
                  cfg: FinetuneConfig, pad_id: int, precision: Precision, device: torch.device) -> dict[str, Any]:
    """Reply loss, ROUGE-1/2/L, BLEU and chrF of ``model`` on ``examples``; ``replies`` holds
    its decoded replies in order."""
    loss, tokens = reply_loss(model, examples, rows_of(examples, cfg.max_length, False, 0), cfg.loop.eval_batch_size,
                              pad_id, False, precision, device)
    params = SamplingParams(max_new_tokens=cfg.sft.max_new_tokens, temperature=0.0)
    model.eval()
    replies = [r.strip() for r in generate(model, tokenizer, [e.prompt for e in examples], params, cfg.sft.num_beams)]
    refs = [e.reference for e in examples]
    out: dict[str, Any] = {"reply_loss": loss, "reply_tokens": tokens, "conversations": len(examples)}
    out |= rouge(replies, refs)
    out |= {k: v for k, v in bleu_chrf(replies, [[r] for r in refs]).items() if k in ("bleu", "chrf")}
    out["main"] = out[HEADLINE]
    out["replies"] = replies
    return out


def _cell(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    text = text if len(text) <= limit else "…" + text[-limit:]
    return text.replace("|", "\\|")


def write_sft_results(ft_dir: Path, results: dict[str, Any], examples: list[SftExample], samples: int) -> Path:
    """results.md: the before/after table, the curves, side-by-side samples."""
    after, before = results["after"], results.get("before")
    split = results["split"]
    decoding = "greedily" if results["num_beams"] == 1 else f"with {results['num_beams']} beams"
    lines = [f"### Supervised fine-tuning: `{ft_dir.name}`", "",
             f"Best validation reply loss **{results['best_val_loss']:.4f}** at step {results['best_step']} of "
             f"{results['steps']} (that checkpoint is kept and scored). {after['conversations']} {split} "
             f"conversations, decoded {decoding}.", "",
             "| | reply loss | ROUGE-1 | ROUGE-2 | ROUGE-L | BLEU | chrF |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in (("before", before), ("after", after)):
        if r:
            lines.append(f"| {name} | {r['reply_loss']:.4f} | {r['rouge1']:.2f} | {r['rouge2']:.2f} | {r['rougeL']:.2f} "
                         f"| {r['bleu']:.2f} | {r['chrf']:.2f} |")
    lines.append("")
    if plot_curves(ft_dir, "-(reply loss)"):
        lines += ["![train loss and the negated validation reply loss](curves.png)", ""]
    if samples:
        lines += ["| prompt (end) | reference | before | after |", "|---|---|---|---|"]
        for i, e in enumerate(examples[:samples]):
            was = before["replies"][i] if before else ""
            lines.append(f"| {_cell(e.prompt, 200)} | {_cell(e.reference)} | {_cell(was)} | {_cell(after['replies'][i])} |")
        lines.append("")
    out = ft_dir / RESULTS_MD
    atomic_write_text(out, "\n".join(lines).rstrip() + "\n")
    return out
