"""``pilelm generate`` and ``generate()``: prompts in, completions out, streamed as they come.

``generate(model, tokenizer, prompts, params)`` encodes the prompts, decodes them together in
one ``DecodeBatch`` (or one beam search each), streams each row's text through a
``CompletionText`` (whole characters only, stop strings held back and cut) and returns the
clean completions. ``run_generate`` is the stage: it loads a run, reads the prompts, prints
the samples in order while the batch decodes, and writes ``{prompt, completion}`` JSONL.

The parts: ``sampling`` (SamplingParams, the batched sampler), ``decode_batch`` (the
KV-cached running batch, ``stream_batch``), ``beam`` (beam search), ``textstream`` (token ids
to streamed text).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch.nn as nn

from pilelm.core.atomic import atomic_write_text
from pilelm.core.report import ReportSection
from pilelm.core.stages import load_hook
from pilelm.inference.beam import beam_search
from pilelm.inference.context import model_device_dtype
from pilelm.inference.decode_batch import stream_batch
from pilelm.inference.sampling import GENERATE_PRESET, SamplingParams
from pilelm.inference.textstream import CompletionText, TextTokenizer, clean_text, cut_at_stop, unescape
from pilelm.models import spec_for
from pilelm.models.dtypes import resolve_dtype
from pilelm.tokens.chat import DEFAULT_CHAT_STOP, chat_template_of, load_special_tokens, render_chat

log = logging.getLogger(__name__)


def generate(
    model: nn.Module,
    tokenizer: TextTokenizer,
    prompts: list[str],
    params: SamplingParams,
    num_beams: int = 1,
    on_text: Callable[[int, str], None] | None = None,
    length_penalty: float = 1.0,
) -> list[str]:
    """Complete each prompt (batched); returns the clean completions, without the prompts.

    ``on_text(row, delta)`` receives the text as it is generated (sampling only; beam search
    knows its text when it ends), never part of a stop string. Rows with a seed use
    ``seed + row`` so that repeated prompts give different samples.
    """
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    device, _ = model_device_dtype(model)
    eos = tokenizer.eod_id
    ids = [tokenizer.encode(p) for p in prompts]
    if num_beams > 1:
        outputs = [beam_search(model, p, num_beams, params.max_new_tokens, eos, length_penalty) for p in ids]
        texts = [cut_at_stop(tokenizer.decode(o, skip_special_tokens=True), params.stop)[0] for o in outputs]
        texts = [clean_text(t) for t in texts]
        if on_text is not None:
            for i, t in enumerate(texts):
                on_text(i, t)
        return texts

    row_params = [replace(params, seed=None if params.seed is None else params.seed + i) for i in range(len(ids))]
    generated: list[list[int]] = [[] for _ in ids]
    streams = [CompletionText(tokenizer, params.stop) for _ in ids]
    batch = stream_batch(model, ids, row_params, eos, device)
    finish: set[int] = set()
    try:
        while True:
            try:
                step = batch.send(finish or None)
            except StopIteration:
                break
            finish = set()
            for row, tok in enumerate(step):
                text = streams[row]
                if tok is None or text.stopped or tok == eos:
                    continue
                generated[row].append(tok)
                delta = text.push(tok)
                if text.stopped:
                    finish.add(row)
                if on_text is not None and delta:
                    on_text(row, delta)
    finally:
        batch.close()
    completions = []
    for row, (toks, text) in enumerate(zip(generated, streams, strict=True)):
        tail = text.finish()
        if on_text is not None and tail:
            on_text(row, tail)
        cut, _ = cut_at_stop(tokenizer.decode(toks, skip_special_tokens=True), params.stop)
        completions.append(clean_text(cut))
    return completions


# ---------------------------------------------------------------------------------------------
# The `pilelm generate` stage


@dataclass
class GenerateConfig:
    run: str = ""
    """Run directory (pilelm train or pilelm import output)."""
    prompt: list[str] = field(default_factory=list)
    """Prompt text; repeat --prompt for a batch. None given: one unconditional sample."""
    prompt_file: str = ""
    """A text file with one prompt per line (added after the --prompt ones)."""
    sampling: SamplingParams = field(default_factory=lambda: replace(GENERATE_PRESET))
    """How to sample (``pilelm.inference.sampling.SamplingParams``, starting from its ``GENERATE_PRESET``); its keys are given without the section's name: --temperature 0 --max-new-tokens 64."""
    num_beams: int = 1
    """Beam search with this many beams (> 1 ignores temperature/top-k/top-p)."""
    length_penalty: float = 1.0
    """Beam search: a hypothesis scores sum log p / length ** length_penalty."""
    num_samples: int = 1
    """Samples per prompt."""
    step: int | None = None
    """Checkpoint step to load; None = the latest."""
    device: str = "auto"
    """Torch device: auto (cuda if available), cpu, cuda, cuda:1, mps."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights and KV-cache dtype; auto = bfloat16 where bf16 matmuls are native (AMX / AVX512-BF16 CPUs, CUDA), else float32."""
    output: str = ""
    """Also write the samples to this JSONL file ({prompt, completion}); empty = terminal only."""
    chat: bool = False
    """Treat each prompt as a user message of a one-turn chat, rendered by the run's chat template (a `finetune --task sft` run); prints only the reply."""
    system: str = ""
    """--chat: a system prompt put before the user message."""
    plain_template: bool = False
    """--chat on a run without a chat template: use the plain 'User: / Assistant:' transcript."""
    punctuate: str = ""
    """A `pilelm finetune --task punct` directory: also print each sample (prompt + completion) with punctuation and casing restored by it (and add it to the JSONL as `punctuated`)."""
    retrieve: str = ""
    """Index directory (pilelm embed output): put each prompt's top passages in front of it; empty = no retrieval."""
    retrieve_k: int = 3
    """Passages retrieved per prompt (fewer when the context is full)."""
    retrieve_mode: Literal["hybrid", "bm25", "dense"] = "hybrid"
    """How passages are ranked: hybrid (BM25 + the index's vectors, reciprocal rank fusion), bm25 or dense."""

    FLAT_SECTIONS: ClassVar[tuple[str, ...]] = ("sampling",)
    """``--temperature`` means ``--sampling.temperature`` (``pilelm.core.config.flat_section_of``)."""

    def __post_init__(self) -> None:
        if self.retrieve_k < 1:
            raise ValueError(f"retrieve_k must be >= 1, got {self.retrieve_k}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        for key in ("logprobs", "prompt_logprobs"):
            if getattr(self.sampling, key) is not None:
                raise ValueError(f"generate does not report log-probabilities ({key}); pilelm serve does "
                                 "(/v1/completions with logprobs)")

    def sampling_params(self) -> SamplingParams:
        """``sampling`` with the stop strings unescaped (\\n typed on a command line is a newline)."""
        return replace(self.sampling, stop=[unescape(s) for s in self.sampling.stop])


def _read_prompts(cfg: GenerateConfig) -> list[str]:
    prompts = list(cfg.prompt)
    if cfg.prompt_file:
        path = Path(cfg.prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompt_file {path} does not exist")
        prompts += [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return prompts or [""]


class _OrderedStream:
    """Prints batched samples in order, streaming the one on screen; later ones catch up
    from their buffers when their turn comes."""

    def __init__(self, headers: list[str], write: Callable[[str], Any]):
        self.headers = headers
        self.buffers = [""] * len(headers)
        self.done = [False] * len(headers)
        self.write = write
        self.shown = 0
        self.printed = 0
        write(headers[0])

    def text(self, row: int, delta: str) -> None:
        self.buffers[row] += delta
        self._flush()

    def finish(self, row: int) -> None:
        self.done[row] = True
        self._flush()

    def _flush(self) -> None:
        while self.shown < len(self.headers):
            buf = self.buffers[self.shown]
            if len(buf) > self.printed:
                self.write(buf[self.printed :])
                self.printed = len(buf)
            if not self.done[self.shown]:
                return
            self.write("\n")
            self.shown += 1
            self.printed = 0
            if self.shown < len(self.headers):
                self.write(self.headers[self.shown])


def _punctuate(ft_dir: str, texts: list[str]) -> list[str]:
    """``texts`` restored by a punctuation model; [] without one. The fine-tuning package sits
    above inference, so it is reached by name through the stage table, as the CLI reaches it."""
    if not ft_dir:
        return []
    import importlib

    from pilelm.core.stages import COMMANDS

    return importlib.import_module(COMMANDS["punctuate"].module).Punctuator(ft_dir).restore_texts(texts)


def _chat_prompts(cfg: GenerateConfig, tokenizer: Any, tok_dir: Path, prompts: list[str]) -> tuple[list[str], list[str]]:
    """Each prompt as the user message of a one-turn chat through the run's template, and the
    stop strings the template needs."""
    template = chat_template_of(tokenizer, cfg.run, cfg.plain_template)  # refuses a run without one, saying how
    specials = {**tokenizer.special_tokens_map(), **load_special_tokens(tok_dir)}
    head = [{"role": "system", "content": cfg.system}] if cfg.system else []
    rendered = [render_chat([*head, {"role": "user", "content": p}], template, True, specials) for p in prompts]
    return rendered, (DEFAULT_CHAT_STOP if template is None else [])


def run_generate(cfg: GenerateConfig, write: Callable[[str], Any] | None = None) -> Path | None:
    """Generate from a run, streaming each sample to ``write`` (default: stdout) as it comes.

    Returns the JSONL output path when ``cfg.output`` is set, else None.
    """
    from pilelm.tokens.tokenizer import load_tokenizer
    from pilelm.training.checkpoint import load_for_inference

    if not cfg.run:
        raise ValueError("generate needs a run directory: pilelm generate RUN_DIR --prompt ...")
    if write is None:

        def write(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

    model, model_cfg, tok_dir = load_for_inference(cfg.run, cfg.step, cfg.device)
    if not spec_for(model_cfg).causal:
        raise ValueError(f"run {cfg.run} holds a {type(model_cfg).__name__} model; generate needs a causal LM (gpt)")
    model = model.to(resolve_dtype(cfg.dtype, next(model.parameters()).device))
    tokenizer = load_tokenizer(tok_dir)
    prompts, sources = _read_prompts(cfg), ""
    shown = prompts
    if cfg.retrieve:  # (prompts with passages, the sources used): pilelm.retrieval.rag
        shown = [f"Question: {q}\nAnswer:" for q in prompts]  # the passages are not echoed
        prompts, sources = load_hook("generate.retrieve")(cfg, prompts)
    prompts = [p for p in prompts for _ in range(cfg.num_samples)]
    shown = [p for p in shown for _ in range(cfg.num_samples)]
    many = len(prompts) > 1
    headers = [(f"--- sample {i} ---\n" if many else "") + ("" if cfg.chat else p) for i, p in enumerate(shown)]
    params = cfg.sampling_params()
    model_inputs = prompts
    if cfg.chat:
        model_inputs, stop = _chat_prompts(cfg, tokenizer, tok_dir, prompts)
        params = replace(params, stop=[*params.stop, *stop])
    screen = _OrderedStream(headers, write)
    completions = generate(
        model, tokenizer, model_inputs, params, cfg.num_beams, on_text=screen.text,
        length_penalty=cfg.length_penalty,
    )
    for row in range(len(prompts)):
        screen.finish(row)
    empty = [i for i, c in enumerate(completions) if not c.strip()]
    if empty:  # never an empty answer without a word
        log.warning("%d of %d samples are empty", len(empty), len(completions))
        write(f"({'samples ' + ', '.join(map(str, empty)) if many else 'the sample'}: no text: the model ended at "
              "once; try --temperature 0.7, more --max-new-tokens, or a model fine-tuned to answer)\n")
    punctuated = _punctuate(cfg.punctuate, [p + c for p, c in zip(prompts, completions, strict=True)])
    for i, text in enumerate(punctuated):
        write(f"--- punctuated{f' {i}' if many else ''} ---\n{text}\n")
    if sources:
        write(sources)
    if not cfg.output:
        return None
    out = Path(cfg.output)
    records = [{"prompt": p, "completion": c} for p, c in zip(prompts, completions, strict=True)]
    for rec, text in zip(records, punctuated, strict=False):
        rec["punctuated"] = text
    lines = [json.dumps(rec, ensure_ascii=False) for rec in records]
    atomic_write_text(out, "\n".join(lines) + "\n")
    log.info("wrote %d samples to %s", len(lines), out)
    return out


def report_section(path: Path, work_dir: Path) -> ReportSection | None:
    """The samples a generate stage wrote (its JSONL output), for the run report."""
    if not path.is_file():
        return None
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
    return ReportSection(lines)
