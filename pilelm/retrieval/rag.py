"""Retrieval-augmented generation: ``pilelm generate RUN --retrieve INDEX --prompt "question"``.

``pilelm generate`` (``pilelm.inference.generate``) calls ``retrieval_prompts`` through the
``generate.retrieve`` hook (``pilelm.core.stages.HOOKS``) when ``--retrieve`` is set.

Each question is embedded by the index's own encoder (the run that built it), its top-k
documents are fetched (a document brings its best chunk), and the passages go in front of the
question, best first (Lewis et al. 2020, "RAG"; the prompt layout of in-context retrieval,
Ram et al. 2023):

    Use the passages to answer the question.

    [1] <passage>

    [2] <passage>

    Question: <question>
    Answer:

The passages are ranked by ``--retrieve-mode`` (hybrid by default: BM25 and the index's vectors
fused, ``retrieval/hybrid.py``). The prompt fits the generating model's context with room for
``max_new_tokens``, and the question is never cut: the room the head and question leave is
shared among the passages, each cut (at a token boundary, from the right: a passage's start is
what the search matched) to its share, a short passage's unused share going to the others
(``passage_caps``). Where even an equal share would be under ``MIN_PASSAGE_TOKENS``, the
lowest-ranked passages are left out. ``pilelm generate`` shows each question, not the assembled
prompt, and says so when an answer is empty. The sources used are written after the answers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pilelm.models import config_from_spec
from pilelm.retrieval.hybrid import HybridSearcher
from pilelm.retrieval.index import Hit, VectorIndex
from pilelm.retrieval.search import open_encoder_for
from pilelm.training.checkpoint import list_checkpoints

if TYPE_CHECKING:
    from pilelm.inference.generate import GenerateConfig

HEAD = "Use the passages to answer the question.\n\n"
MIN_PASSAGE_TOKENS = 16  # a passage cut shorter than this is left out


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


def retrieval_prompts(cfg: GenerateConfig, questions: list[str]) -> tuple[list[str], str]:
    """(prompts, sources): each question with the passages of ``cfg.retrieve`` that fit the
    generating model's context in front of it, and the text naming the sources used, written
    after the answers."""
    from pilelm.tokens.tokenizer import load_tokenizer

    index = VectorIndex(cfg.retrieve)
    encoder = None if cfg.retrieve_mode == "bm25" else open_encoder_for(index, "", cfg.device)
    searcher = HybridSearcher(index)
    if not questions or questions == [""]:
        raise ValueError("generate --retrieve needs a question: --prompt \"...\"")
    tokenizer = load_tokenizer(Path(cfg.run) / "tokenizer")
    budget = _context_of(cfg.run, cfg.step) - cfg.sampling.max_new_tokens
    prompts, sources = [], []
    for q in questions:
        hits = searcher.search(q, cfg.retrieve_k, cfg.retrieve_mode, encoder)
        prompt, used = assemble_prompt(q, [h.text for h in hits], tokenizer, budget)
        prompts.append(prompt)
        sources.append(hits[:used])
    return prompts, "\n" + "\n".join(format_sources(q, s) for q, s in zip(questions, sources, strict=True)) + "\n"


def format_sources(question: str, hits: list[Hit]) -> str:
    lines = [f"sources for {question!r}:"]
    lines += [f"  [{h.rank}] {h.id} [{h.component}] score {h.score:.3f}" for h in hits] or ["  (none fit the context)"]
    return "\n".join(lines)
