"""Retrieval-augmented generation: ``pilelm generate RUN --retrieve INDEX --prompt "question"``.

Each question is embedded by the index's own encoder (the run that built it), its top-k
documents are fetched (a document brings its best chunk), and the passages go in front of the
question, best first (Lewis et al. 2020, "RAG"; the prompt layout of in-context retrieval,
Ram et al. 2023):

    Use the passages to answer the question.

    [1] <passage>

    [2] <passage>

    Question: <question>
    Answer:

The prompt fits the generating model's context with room for ``max_new_tokens``, and the
question is never cut: the room the head and question leave is shared among the passages, each
cut (at a token boundary, from the right: a passage's start is what the search matched) to its
share, a short passage's unused share going to the others (``passage_caps``). Where even an
equal share would be under ``MIN_PASSAGE_TOKENS``, the lowest-ranked passages are left out.

The output is each question and its answer, not the assembled prompt (``--output`` keeps the
prompt in the JSONL), then the sources used. An empty answer is said to be empty, with what to
try, never printed as nothing.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pilelm.core.atomic import atomic_write_text
from pilelm.inference.generate import GenerateConfig, _read_prompts, run_generate
from pilelm.models import config_from_spec
from pilelm.retrieval.hybrid import HybridSearcher, Mode
from pilelm.retrieval.index import Hit, VectorIndex
from pilelm.retrieval.search import open_encoder_for
from pilelm.training.checkpoint import list_checkpoints

log = logging.getLogger(__name__)

HEAD = "Use the passages to answer the question.\n\n"
MIN_PASSAGE_TOKENS = 16  # a passage cut shorter than this is left out


@dataclass
class RagGenerateConfig(GenerateConfig):
    retrieve: str = ""
    """Index directory (pilelm embed output): put each prompt's top passages in front of it; empty = no retrieval."""
    retrieve_k: int = 3
    """Passages retrieved per prompt (fewer when the context is full)."""
    retrieve_mode: Mode = "hybrid"
    """How passages are ranked: hybrid (BM25 + the index's vectors, reciprocal rank fusion), bm25 or dense."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.retrieve_k < 1:
            raise ValueError(f"retrieve_k must be >= 1, got {self.retrieve_k}")


def passage_caps(lengths: list[int], room: int) -> int:
    """The largest cap c with sum(min(length, c)) <= room: every passage gets an equal share of
    the room, and a passage shorter than its share leaves the rest to the others (water-filling)."""
    spare, left = room, len(lengths)
    for n in sorted(lengths):
        if n * left > spare:
            return spare // left
        spare -= n
        left -= 1
    return max(lengths, default=0)


def _cut(text: str, tokenizer: Any, label: str, cap: int) -> str:
    """``text`` cut from the right so that ``label + text + blank line`` takes at most ``cap`` tokens."""
    keep = cap - len(tokenizer.encode(f"{label}\n\n")) - 1
    if keep <= 0:
        return ""
    cut = tokenizer.decode(tokenizer.encode(text)[:keep])
    while cut and len(tokenizer.encode(f"{label}{cut}\n\n")) > cap:  # re-encoding can merge differently
        cut = cut[: int(len(cut) * 0.9)]
    return cut


def assemble_prompt(question: str, passages: list[str], tokenizer: Any, budget: int) -> tuple[str, int]:
    """(prompt, passages used): the best ``used`` passages, each cut to its share of the
    ``budget`` tokens the head and the (whole) question leave."""
    tail = f"Question: {question}\nAnswer:"
    fixed = len(tokenizer.encode(HEAD + tail))
    if fixed > budget:
        raise ValueError(f"the question alone takes {fixed} tokens; the context leaves {budget} "
                         "after max_new_tokens: shorten it or lower max_new_tokens")
    used = len(passages)
    while used:
        blocks = [f"[{i}] {text}\n\n" for i, text in enumerate(passages[:used], start=1)]
        lengths = [len(tokenizer.encode(b)) for b in blocks]
        cap = passage_caps(lengths, budget - fixed - used)  # a token of slack per boundary merge
        if cap >= MIN_PASSAGE_TOKENS + len(tokenizer.encode("[1] \n\n")):
            parts = [b if n <= cap else f"[{i}] {_cut(t, tokenizer, f'[{i}] ', cap)}\n\n"
                     for i, (b, n, t) in enumerate(zip(blocks, lengths, passages, strict=False), start=1)]
            prompt = HEAD + "".join(parts) + tail
            if len(tokenizer.encode(prompt)) <= budget:  # merges across a boundary can add a token
                return prompt, used
        used -= 1  # too little room for this many: leave the lowest-ranked passage out
    return HEAD + tail, 0


def _context_of(run: str, step: int | None) -> int:
    ckpts = dict(list_checkpoints(run))
    if not ckpts:
        raise FileNotFoundError(f"run {run} has no completed checkpoint")
    ckpt = ckpts[step] if step is not None and step in ckpts else ckpts[max(ckpts)]
    return int(config_from_spec(json.loads((Path(ckpt) / "model.json").read_text())).block_size)


def answer_prompts(cfg: GenerateConfig, prompts: list[str]) -> list[str]:
    """The model's completions of ``prompts`` (not streamed: a RAG prompt is not shown)."""
    from pilelm.inference.generate import generate
    from pilelm.models.dtypes import resolve_dtype
    from pilelm.tokens.tokenizer import load_tokenizer
    from pilelm.training.checkpoint import load_for_inference

    model, _, tok_dir = load_for_inference(cfg.run, cfg.step, cfg.device)
    model = model.to(resolve_dtype(cfg.dtype, next(model.parameters()).device))
    return generate(model, load_tokenizer(tok_dir), prompts, cfg.sampling(), cfg.num_beams,
                    length_penalty=cfg.length_penalty)


def shown_answer(completion: str) -> str:
    """The answer as printed: its text, or a line saying it is empty and what to try."""
    text = completion.strip()
    if text:
        return text
    log.warning("the model generated no answer text")
    return ("(no answer: the model ended its answer before writing any text; try --temperature 0.7, "
            "more --max-new-tokens, or a model fine-tuned to answer: pilelm finetune --task sft)")


def run_generate_rag(cfg: RagGenerateConfig, write: Callable[[str], Any] | None = None) -> Path | None:
    """``run_generate``, with retrieved passages in front of each prompt when ``retrieve`` is set:
    prints each question, its answer and the sources used; ``output`` gets {question, prompt,
    completion, sources} JSONL."""
    from pilelm.tokens.tokenizer import load_tokenizer

    if not cfg.retrieve:
        return run_generate(cfg, write)
    if write is None:

        def write(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

    index = VectorIndex(cfg.retrieve)
    encoder = None if cfg.retrieve_mode == "bm25" else open_encoder_for(index, "", cfg.device)
    searcher = HybridSearcher(index)
    questions = _read_prompts(cfg)
    if not questions or questions == [""]:
        raise ValueError("generate --retrieve needs a question: --prompt \"...\"")
    tokenizer = load_tokenizer(Path(cfg.run) / "tokenizer")
    budget = _context_of(cfg.run, cfg.step) - cfg.max_new_tokens
    prompts, sources = [], []
    for q in questions:
        hits = searcher.search(q, cfg.retrieve_k, cfg.retrieve_mode, encoder)
        prompt, used = assemble_prompt(q, [h.text for h in hits], tokenizer, budget)
        prompts.append(prompt)
        sources.append(hits[:used])
    completions = answer_prompts(cfg, prompts)
    for q, completion, hits in zip(questions, completions, sources, strict=True):
        write(f"Question: {q}\nAnswer: {shown_answer(completion)}\n{format_sources(q, hits)}\n\n")
    if not cfg.output:
        return None
    records = [{"question": q, "prompt": p, "completion": c, "sources": [h.id for h in hits]}
               for q, p, c, hits in zip(questions, prompts, completions, sources, strict=True)]
    out = Path(cfg.output)
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return out


def format_sources(question: str, hits: list[Hit]) -> str:
    lines = [f"sources for {question!r}:"]
    lines += [f"  [{h.rank}] {h.id} [{h.component}] score {h.score:.3f}" for h in hits] or ["  (none fit the context)"]
    return "\n".join(lines)
