"""The notebook API: ``pilelm.load(path)`` gives a model object with the obvious methods.

    import pilelm
    lm = pilelm.load("runs/demo/train")          # a run: generate, score, embed, chat
    lm.generate("The Pile is", max_new_tokens=20)
    lm.score(["Some text."])[0]["bits_per_byte"]
    clf = pilelm.load("runs/demo/classify")      # a fine-tune: classify / tag / punctuate
    clf.classify("a sentence")["label"]

Every method takes one text (and returns one answer) or a list (and returns a list). The
methods call the same code as the commands: ``generate`` is ``pilelm generate``'s decoder,
``score`` is ``pilelm eval``'s scorer, ``embed`` is ``pilelm embed``'s encoder, ``chat`` is
``pilelm chat``'s session, ``classify`` / ``tag`` / ``punctuate`` are ``pilelm predict``'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def load(path: str | Path, device: str = "auto", step: int | None = None, dtype: str = "auto") -> Any:
    """The model in ``path``: a ``LanguageModel`` for a run (``pilelm train`` / ``import`` /
    ``finetune --task sft`` output), a ``FinetunedModel`` for a ``finetune --task
    classify|ner|punct`` directory. ``device="auto"`` is cuda where there is one."""
    from pilelm.core.manifest import read_manifest

    path = Path(path)
    manifest = read_manifest(path) if (path / "manifest.json").is_file() else {}
    if manifest.get("stage") == "finetune":
        return FinetunedModel(path, device)
    return LanguageModel(path, device, step, dtype)


def _many(texts: str | list[str]) -> tuple[list[str], bool]:
    return ([texts], True) if isinstance(texts, str) else (list(texts), False)


class LanguageModel:
    """A run's model and tokenizer: ``generate``, ``score``, ``embed``, ``chat``."""

    def __init__(self, run: str | Path, device: str = "auto", step: int | None = None, dtype: str = "auto"):
        from pilelm.models import spec_for
        from pilelm.models.dtypes import resolve_dtype
        from pilelm.tokens.tokenizer import load_tokenizer
        from pilelm.training.checkpoint import load_for_inference

        self.path = Path(run)
        model, self.config, self.tokenizer_dir = load_for_inference(self.path, step, device)
        self.device = next(model.parameters()).device
        self.causal = spec_for(self.config).causal
        self.model = model.to(resolve_dtype(dtype, self.device)) if self.causal else model
        self.tokenizer = load_tokenizer(self.tokenizer_dir)

    def __repr__(self) -> str:
        return f"LanguageModel({str(self.path)!r}, {type(self.config).__name__}, device={self.device})"

    def _require_causal(self, what: str) -> None:
        if not self.causal:
            raise ValueError(f"{self.path} holds a {type(self.config).__name__} (not a causal LM); {what} needs "
                             "a causal LM (gpt2 or neox); a BERT run can embed()")

    def generate(self, prompt: str | list[str], max_new_tokens: int = 64, temperature: float = 0.8,
                 top_k: int = 0, top_p: float = 0.95, repetition_penalty: float = 1.0,
                 stop: list[str] | None = None, seed: int | None = None, num_beams: int = 1) -> str | list[str]:
        """The completion of each prompt (without the prompt)."""
        from pilelm.inference.generate import generate
        from pilelm.inference.sampling import SamplingParams

        self._require_causal("generate")
        prompts, one = _many(prompt)
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                repetition_penalty=repetition_penalty, stop=list(stop or []), seed=seed)
        out = generate(self.model, self.tokenizer, prompts, params, num_beams)
        return out[0] if one else out

    def score(self, texts: str | list[str], context: int = 0, stride: int = 0) -> dict | list[dict]:
        """Per text: ``logprob`` (summed natural-log probability of its tokens, each given those
        before it and a leading end-of-text), ``tokens``, ``bytes``, ``bits_per_byte`` and
        ``ppl_token``: ``pilelm eval``'s sliding-window scoring (``context`` 0 = the model's
        block size; ``stride`` 0 = half of it)."""
        import torch

        from pilelm.evaluation.bpb import score_documents, summarize
        from pilelm.evaluation.documents import DocumentSet

        self._require_causal("score")
        items, one = _many(texts)
        context = context or int(self.config.block_size)
        stride = stride or max(1, context // 2)
        eod = self.tokenizer.eod_id if self.tokenizer.eod_id is not None else 0
        tokens = [np.asarray(t, dtype=np.int64) for t in self.tokenizer.encode_batch(items)]
        nbytes = np.asarray([len(t.encode("utf-8")) for t in items], dtype=np.int64)
        docs = DocumentSet(tokens, np.zeros(len(items), dtype=np.int64), ["text"], nbytes, eod,
                           int(self.config.vocab_size))
        with torch.no_grad():
            nll, counts = score_documents(self.model, docs, context, stride, 0, self.device, "score")
        out = []
        for i in range(len(items)):
            stats = summarize(float(nll[i]), int(counts[i]), int(nbytes[i]), 1)
            out.append({"logprob": -float(nll[i]), "tokens": stats["tokens"], "bytes": stats["bytes"],
                        "bits_per_byte": stats["bpb"], "ppl_token": stats["ppl_token"]})
        return out[0] if one else out

    def embed(self, texts: str | list[str], pooling: str = "mean", batch_size: int = 32) -> np.ndarray:
        """Unit vectors, (d,) for one text or (N, d) for a list: ``pilelm embed``'s encoder (a
        text longer than the context is an error; ``pilelm embed`` chunks documents)."""
        from pilelm.inference.text_encoder import TextEncoder

        items, one = _many(texts)
        vectors = TextEncoder(self.model, self.config, self.tokenizer, pooling, self.device).embed_queries(
            items, batch_size)
        return vectors[0] if one else vectors

    def chat_session(self, system: str = "", max_new_tokens: int = 0, temperature: float = 0.7,
                     top_p: float = 0.95, seed: int | None = None, plain_template: bool = False) -> Any:
        """A multi-turn ``ChatSession``: ``s.send("hi")`` returns the reply and keeps the history
        (``max_new_tokens`` 0 = 256, or half the model's context if that is less)."""
        from pilelm.inference.chat_session import ChatSession
        from pilelm.inference.sampling import SamplingParams
        from pilelm.tokens.chat import chat_template_of, load_special_tokens

        self._require_causal("chat")
        template = chat_template_of(self.tokenizer, self.path, plain_template)
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        specials = {**self.tokenizer.special_tokens_map(), **load_special_tokens(self.tokenizer_dir)}
        return ChatSession(self.model, self.tokenizer, template, params, system, specials)

    def chat(self, message: str | list[dict[str, str]], system: str = "", **options: Any) -> str:
        """The reply to one user message, or to a conversation (a list of ``{"role", "content"}``
        ending with a user message) through the run's chat template. ``options``: those of
        ``chat_session`` (max_new_tokens, temperature, top_p, seed, plain_template)."""
        if not isinstance(message, str) and (not message or message[-1].get("role") != "user"):
            raise ValueError("a conversation passed to chat() must end with a user message")
        session = self.chat_session(system, **options)
        if isinstance(message, str):
            return session.send(message).strip()
        if message[0].get("role") in ("system", "developer"):
            session.system = message[0]["content"]
            message = message[1:]
        session.history = [dict(m) for m in message[:-1]]
        return session.send(message[-1]["content"]).strip()


class FinetunedModel:
    """A ``finetune --task classify|ner|punct`` directory: ``classify``, ``tag``, ``punctuate``."""

    def __init__(self, ft_dir: str | Path, device: str = "auto", batch_size: int = 32):
        from pilelm.finetune.predict import Predictor

        self.path = Path(ft_dir)
        self.predictor = Predictor(self.path, device, batch_size)
        self.task = self.predictor.task
        self.labels = list(self.predictor.labels)

    def __repr__(self) -> str:
        return f"FinetunedModel({str(self.path)!r}, task={self.task!r}, labels={len(self.labels)})"

    def classify(self, texts: str | list[str], top_k: int = 1) -> dict | list[dict]:
        """``{"label", "score", "top_k"}`` per text."""
        items, one = _many(texts)
        out = self.predictor.classify(items, top_k)
        return out[0] if one else out

    def tag(self, texts: str | list[str]) -> list[dict] | list[list[dict]]:
        """Entity spans ``{"entity_group", "score", "word", "start", "end"}`` per text."""
        items, one = _many(texts)
        out = self.predictor.tag(items)
        return out[0] if one else out

    def punctuate(self, texts: str | list[str]) -> str | list[str]:
        """The texts with punctuation and capitals restored."""
        items, one = _many(texts)
        out = self.predictor.punctuate(items)
        return out[0] if one else out

    def predict(self, texts: str | list[str], top_k: int = 1) -> dict | list[dict]:
        """What ``pilelm predict`` writes per text, for whatever task the model has."""
        items, one = _many(texts)
        out = self.predictor.predict(items, top_k)
        return out[0] if one else out
