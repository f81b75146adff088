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

The prompt fits the generating model's context with room for ``max_new_tokens``: passages are
added while they fit, and the first that does not is cut (at a token boundary) to the space
left. The sources used are written after the answers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pilelm.models import config_from_spec
from pilelm.retrieval.index import Hit, VectorIndex
from pilelm.retrieval.search import open_encoder_for
from pilelm.training.checkpoint import list_checkpoints

if TYPE_CHECKING:
    from pilelm.inference.generate import GenerateConfig

HEAD = "Use the passages to answer the question.\n\n"
MIN_PASSAGE_TOKENS = 16  # a passage cut shorter than this is left out


def assemble_prompt(question: str, passages: list[str], tokenizer: Any, budget: int) -> tuple[str, int]:
    """(prompt, passages used): the passages that fit ``budget`` tokens around the question."""
    tail = f"Question: {question}\nAnswer:"
    used_tokens = len(tokenizer.encode(HEAD + tail))
    if used_tokens > budget:
        raise ValueError(f"the question alone takes {used_tokens} tokens; the context leaves {budget} "
                         "after max_new_tokens: shorten it or lower max_new_tokens")
    parts: list[str] = []
    for i, text in enumerate(passages, start=1):
        label = f"[{i}] "
        cost = len(tokenizer.encode(f"{label}{text}\n\n"))
        room = budget - used_tokens
        if cost > room:
            keep = room - len(tokenizer.encode(f"{label}\n\n")) - 1
            if keep >= MIN_PASSAGE_TOKENS:
                cut = tokenizer.decode(tokenizer.encode(text)[:keep])
                # Re-encoding decoded text can merge differently: shrink until it fits.
                while cut and len(tokenizer.encode(f"{label}{cut}\n\n")) > room:
                    cut = cut[: int(len(cut) * 0.9)]
                if cut:
                    parts.append(f"{label}{cut}\n\n")
            break
        parts.append(f"{label}{text}\n\n")
        used_tokens += cost
    return HEAD + "".join(parts) + tail, len(parts)


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
    encoder = open_encoder_for(index, "", cfg.device)
    if not questions or questions == [""]:
        raise ValueError("generate --retrieve needs a question: --prompt \"...\"")
    tokenizer = load_tokenizer(Path(cfg.run) / "tokenizer")
    budget = _context_of(cfg.run, cfg.step) - cfg.max_new_tokens
    prompts, sources = [], []
    for q in questions:
        hits = index.search(encoder.embed_queries([q])[0], cfg.retrieve_k)
        prompt, used = assemble_prompt(q, [h.text for h in hits], tokenizer, budget)
        prompts.append(prompt)
        sources.append(hits[:used])
    return prompts, "\n" + "\n".join(format_sources(q, s) for q, s in zip(questions, sources, strict=True)) + "\n"


def format_sources(question: str, hits: list[Hit]) -> str:
    lines = [f"sources for {question!r}:"]
    lines += [f"  [{h.rank}] {h.id} [{h.component}] score {h.score:.3f}" for h in hits] or ["  (none fit the context)"]
    return "\n".join(lines)
