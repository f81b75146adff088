"""The batching scheduler: concurrent requests share forward passes (continuous batching).

One worker thread owns the model and one running ``DecodeBatch`` (a KV-cached batch
that rows join and leave between decode steps). Requests put their rows (one per prompt and
choice) on a queue. Before every decode step the worker admits waiting rows into the running
batch, up to ``max_batch`` live rows: they are prefilled and join the very next step, so a
request that arrives while others decode gets its first token after one prefill and one step,
not after the running rows end (continuous or in-flight batching, as vLLM and TGI schedule).
When the engine is idle, the first batch starts once no row has arrived for ``batch_window_s``
(so a burst of requests lands in one prefill), the oldest row has waited ``BURST_WINDOWS``
windows, or ``max_batch`` rows wait. Every step's tokens are turned into text per row (whole
characters only, stop strings held back and cut) and handed to the request's ``emit``
callback, which the HTTP layer points at an asyncio queue. Rows that ask for log-probabilities
get them from the decode step that sampled the token (``TextDelta.logprobs``, one event per
token) and, for their prompt, from its prefill (``PromptLogprobs``, before any text).

A row ends at eos, at its stop string, at ``max_new_tokens``, when its request is
cancelled (the client went away), or when its own sampling fails (probabilities not finite:
that request alone gets a 400, the other rows go on); it then leaves the batch before the next step, so the rest
stop paying for it. ``continuous=False`` keeps the old static batching (rows that arrive while
a batch runs wait until all of it has ended), for comparison in ``benchmarks/serve_load.py``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch.nn as nn

from pilelm.inference.decode_batch import DecodeBatch
from pilelm.inference.logprobs import TokenLogprob
from pilelm.inference.sampling import SamplingParams
from pilelm.inference.textstream import CompletionText, TextTokenizer

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]
# A batch waits at most this many batch windows for a burst of requests to finish arriving.
BURST_WINDOWS = 10


@dataclass
class TextDelta:
    """New text of choice ``index``; ``tokens`` = tokens generated for it so far. A row that
    asked for logprobs gets one event per token (its text may be empty while a character or a
    possible stop string is held back) with that token's ``logprobs``."""

    index: int
    text: str
    tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class PromptLogprobs:
    """The prompt's own tokens scored (the first is None), for a row that asked (echo)."""

    index: int
    logprobs: list[TokenLogprob | None]


@dataclass
class Finished:
    index: int
    reason: FinishReason
    tokens: int


@dataclass
class Failed:
    """Generation failed; the request's unfinished choices end with this message."""

    message: str
    status: int = 500
    """The HTTP status to answer with: 400 when the request's own settings caused it."""


Event = TextDelta | PromptLogprobs | Finished | Failed


@dataclass
class RowSpec:
    """One choice to generate: its index in the response, prompt token ids and sampling."""

    index: int
    prompt: list[int]
    params: SamplingParams


class Submission:
    """The rows of one request. ``emit`` is called from the worker thread with each event;
    ``cancel`` (any thread) makes the worker drop the request's rows at the next step."""

    def __init__(self, rows: list[RowSpec], emit: Callable[[Event], None]):
        self.rows = rows
        self.emit = emit
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class _Row:
    job: Submission
    spec: RowSpec
    arrival: float


@dataclass
class _Live:
    """A row in the running batch: its text so far and the tokens it has generated."""

    row: _Row
    text: CompletionText
    tokens: int = 0


@dataclass
class EngineStats:
    """Counters for /health and the tests (rows_submitted is written under the queue lock, the
    rest by the worker thread only)."""

    rows_submitted: int = 0
    rows_finished: int = 0
    rows_cancelled: int = 0
    batches: int = 0
    """Times decoding started at an idle engine (a busy period; static batching: one batch)."""
    admissions: int = 0
    """Groups of waiting rows prefilled into the batch (the first of a batch included)."""
    decode_steps: int = 0
    tokens_generated: int = 0
    running: int = 0
    """Rows in the running batch now."""
    largest_batch: int = 0
    """Most rows decoded together in one step."""
    errors: int = 0
    rows_failed: int = 0
    """Rows ended alone because their sampling failed (the rest of the batch went on)."""


class Engine:
    def __init__(
        self,
        model: nn.Module,
        tokenizer: TextTokenizer,
        *,
        max_batch: int = 32,
        batch_window_s: float = 0.005,
        continuous: bool = True,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eod_id
        self.max_batch = max_batch
        self.batch_window_s = batch_window_s
        self.continuous = continuous
        self.device = next(model.parameters()).device
        self.block_size: int = model.cfg.block_size
        self.vocab_size: int = model.cfg.vocab_size
        self.stats = EngineStats()
        self._pending: deque[_Row] = deque()
        self._last_arrival = 0.0
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # The worker's: the running batch and its rows by id.
        self._batch = DecodeBatch(model, self.eos_id, self.device)
        self._live: dict[int, _Live] = {}

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="pilelm-serve-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """End the running rows and the waiting ones (their requests get an error), join the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._cond:
            left, self._pending = list(self._pending), deque()
        for job in {id(r.job): r.job for r in left}.values():
            _safe_emit(job, Failed("the server is shutting down"))

    def snapshot(self) -> dict[str, int]:
        """The counters plus the rows waiting to join the batch."""
        return {**asdict(self.stats), "queued": len(self._pending)}

    def submit(self, job: Submission) -> None:
        now = time.monotonic()
        with self._cond:
            if self._stopping:
                raise RuntimeError("the engine is stopped")
            self._pending.extend(_Row(job, spec, now) for spec in job.rows)
            self._last_arrival = now
            self.stats.rows_submitted += len(job.rows)
            self._cond.notify()

    # -- worker -----------------------------------------------------------------------------

    def _loop(self) -> None:
        while (rows := self._take_rows()) is not None:
            if rows:
                self._admit(rows)
            if self._live:
                self._step()
        self._fail_running("the server is shutting down")

    def _take_rows(self) -> list[_Row] | None:
        """The waiting rows to admit before the next step (None: the engine is stopping).

        With rows running, it takes what waits (continuous) or nothing (static) at once; at an
        idle engine it blocks until a batch is due: max_batch rows waiting, or the oldest
        waited the window."""
        with self._cond:
            while True:
                while self._pending and self._pending[0].job.cancelled:
                    self._pending.popleft()
                    self.stats.rows_cancelled += 1
                if self._stopping:
                    return None
                room = self.max_batch - len(self._live)
                if self._live:
                    if not self.continuous or room <= 0 or not self._pending:
                        return []
                    break
                if not self._pending:
                    self._cond.wait()
                    continue
                # Debounce: a burst keeps the batch open while rows keep coming, up to a cap.
                due = min(self._last_arrival + self.batch_window_s,
                          self._pending[0].arrival + BURST_WINDOWS * self.batch_window_s)
                wait = due - time.monotonic()
                if len(self._pending) >= self.max_batch or wait <= 0:
                    break
                self._cond.wait(wait)
            rows: list[_Row] = []
            while self._pending and len(rows) < room:
                row = self._pending.popleft()
                if row.job.cancelled:
                    self.stats.rows_cancelled += 1
                else:
                    rows.append(row)
            return rows

    def _admit(self, rows: list[_Row]) -> None:
        """Prefill ``rows`` into the running batch; if that fails, only their requests fail."""
        st = self.stats
        try:
            ids = self._batch.add([r.spec.prompt for r in rows], [r.spec.params for r in rows])
        except Exception as e:  # a bad prefill must not take the server (or the batch) down
            self._fail([r.job for r in rows], self._error_message(e, len(rows)))
            return
        if not self._live:
            st.batches += 1
        st.admissions += 1
        for row_id, row in zip(ids, rows, strict=True):
            scored = self._batch.prompt_logprobs.get(row_id)
            if scored is not None:
                # An empty prompt was fed as eos, which is not the prompt's: nothing to score.
                _safe_emit(row.job, PromptLogprobs(row.spec.index, scored if row.spec.prompt else []))
            if row.spec.params.max_new_tokens == 0:  # prefilled only; it has left the batch already
                _safe_emit(row.job, Finished(row.spec.index, "length", 0))
                st.rows_finished += 1
                continue
            self._live[row_id] = _Live(row, CompletionText(self.tokenizer, row.spec.params.stop))
        st.running = len(self._live)
        st.largest_batch = max(st.largest_batch, st.running)

    def _step(self) -> None:
        """One decode step of the running batch; each row's new text goes to its request."""
        st = self.stats
        live = self._live
        cancelled = [row_id for row_id, lv in live.items() if lv.row.job.cancelled]
        if cancelled:
            self._leave(cancelled)
            st.rows_cancelled += len(cancelled)
            if not live:
                return
        try:
            tokens = self._batch.step()
            st.decode_steps += 1
            for row_id, settings in self._batch.failed.items():  # only these rows fail
                job = live[row_id].row.job
                self._leave([row_id])
                st.rows_failed += 1
                self._fail([job], f"sampling failed: the next-token probabilities are not finite ({settings}); "
                                  "use a temperature or repetition_penalty nearer 1", status=400)
            for row_id, token in tokens.items():
                lv = live[row_id]
                if lv.row.job.cancelled:  # cancelled during the step
                    self._leave([row_id])
                    st.rows_cancelled += 1
                    continue
                scored = self._batch.logprobs.get(row_id)
                if token == self.eos_id:
                    if scored is not None:  # eos has no text, but its log-probability counts (as in vLLM)
                        _safe_emit(lv.row.job, TextDelta(lv.row.spec.index, "", lv.tokens, [scored]))
                    self._end(row_id, "stop")
                else:
                    lv.tokens += 1
                    st.tokens_generated += 1
                    delta = lv.text.push(token)
                    if delta or scored is not None:
                        _safe_emit(lv.row.job, TextDelta(lv.row.spec.index, delta, lv.tokens,
                                                         [] if scored is None else [scored]))
                    if lv.text.stopped:
                        self._end(row_id, "stop")
                    elif lv.tokens >= lv.row.spec.params.max_new_tokens:
                        self._end(row_id, "length")
        except Exception as e:  # a bad step must not take the server down: its rows fail
            self._fail_running(self._error_message(e, len(self._live)))

    def _end(self, row_id: int, reason: FinishReason) -> None:
        lv = self._live[row_id]
        tail = lv.text.finish()
        if tail:
            _safe_emit(lv.row.job, TextDelta(lv.row.spec.index, tail, lv.tokens))
        _safe_emit(lv.row.job, Finished(lv.row.spec.index, reason, lv.tokens))
        self.stats.rows_finished += 1
        self._leave([row_id])

    def _leave(self, row_ids: list[int]) -> None:
        self._batch.drop(row_ids)  # rows that ended at eos or their budget have left already
        for row_id in row_ids:
            del self._live[row_id]
        self.stats.running = len(self._live)

    def _fail_running(self, message: str) -> None:
        """End every running row's request with ``message``; start a new, empty batch."""
        failed = [lv.row.job for lv in self._live.values()]
        self._live.clear()
        self._batch = DecodeBatch(self.model, self.eos_id, self.device)
        self.stats.running = 0
        self._fail(failed, message)

    def _error_message(self, e: Exception, n_rows: int) -> str:
        if self._stopping:
            return "the server is shutting down"
        log.exception("generation failed for a batch of %d rows", n_rows, exc_info=e)
        self.stats.errors += 1
        return "generation failed: internal server error; the server log has the details"  # not the exception text

    def _fail(self, jobs: list[Submission], message: str, status: int = 500) -> None:
        """End these requests with ``message`` (once each); their other rows are cancelled."""
        for job in {id(job): job for job in jobs}.values():
            _safe_emit(job, Failed(message, status))
            job.cancel()


def _safe_emit(job: Submission, event: Event) -> None:
    """Deliver an event; a receiver that is gone (its event loop closed) cancels the job."""
    try:
        job.emit(event)
    except Exception:
        log.debug("dropping an event for a request whose receiver is gone", exc_info=True)
        job.cancel()
