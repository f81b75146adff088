"""The batching scheduler: concurrent requests share forward passes.

One worker thread owns the model. Requests put their rows (one per prompt and choice) on a
queue; the worker starts a batch once no row has arrived for ``batch_window_s`` (so a burst
of requests lands in one batch), the oldest row has waited ``BURST_WINDOWS`` windows, or
``max_batch`` rows wait. It decodes up to ``max_batch`` rows together with
``generate.stream_batch`` (one left-padded, KV-cached batch). Every step's tokens are turned
into text per row (whole characters only, stop strings held back and cut) and handed to the
request's ``emit`` callback, which the HTTP layer points at an asyncio queue.

A row ends at eos, at its stop string, at ``max_new_tokens``, or when its request is
cancelled (the client went away); the worker then tells ``stream_batch`` to drop it from the
cache, so the rest of the batch stops paying for it. Rows that arrive while a batch runs wait
for the next one (static batching: ``stream_batch`` fixes its rows when it starts).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal

import torch.nn as nn

from pilelm.generate import SamplingParams, TextTokenizer, stream_batch
from pilelm.serve.textstream import CompletionText

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]
# A batch waits at most this many batch windows for a burst of requests to finish arriving.
BURST_WINDOWS = 10


@dataclass
class TextDelta:
    """New text of choice ``index``; ``tokens`` = tokens generated for it so far."""

    index: int
    text: str
    tokens: int


@dataclass
class Finished:
    index: int
    reason: FinishReason
    tokens: int


@dataclass
class Failed:
    """Generation raised; the request's unfinished choices end with this message."""

    message: str


Event = TextDelta | Finished | Failed


@dataclass
class RowSpec:
    """One choice to generate: its index in the response, prompt token ids and sampling."""

    index: int
    prompt: list[int]
    params: SamplingParams


class Job:
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
    job: Job
    spec: RowSpec
    arrival: float


@dataclass
class EngineStats:
    """Counters for /health and the tests (rows_submitted is written under the queue lock, the
    rest by the worker thread only)."""

    rows_submitted: int = 0
    rows_finished: int = 0
    rows_cancelled: int = 0
    batches: int = 0
    decode_steps: int = 0
    tokens_generated: int = 0
    running: int = 0
    largest_batch: int = 0
    errors: int = 0


class Engine:
    def __init__(
        self,
        model: nn.Module,
        tokenizer: TextTokenizer,
        *,
        max_batch: int = 32,
        batch_window_s: float = 0.005,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eod_id
        self.max_batch = max_batch
        self.batch_window_s = batch_window_s
        self.device = next(model.parameters()).device
        self.block_size: int = model.cfg.block_size
        self.vocab_size: int = model.cfg.vocab_size
        self.stats = EngineStats()
        self._pending: deque[_Row] = deque()
        self._last_arrival = 0.0
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="pilelm-serve-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """End the running batch and the waiting rows (their requests get an error), join the worker."""
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
        """The counters plus the rows waiting for a batch."""
        return {**asdict(self.stats), "queued": len(self._pending)}

    def submit(self, job: Job) -> None:
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
        while (rows := self._take_batch()) is not None:
            if rows:
                self._run_batch(rows)

    def _take_batch(self) -> list[_Row] | None:
        """Block until a batch is due: max_batch rows waiting, or the oldest waited the window."""
        with self._cond:
            while True:
                while self._pending and self._pending[0].job.cancelled:
                    self._pending.popleft()
                    self.stats.rows_cancelled += 1
                if self._stopping:
                    return None
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
            while self._pending and len(rows) < self.max_batch:
                row = self._pending.popleft()
                if row.job.cancelled:
                    self.stats.rows_cancelled += 1
                else:
                    rows.append(row)
            return rows

    def _run_batch(self, rows: list[_Row]) -> None:
        st = self.stats
        st.batches += 1
        st.running = len(rows)
        st.largest_batch = max(st.largest_batch, len(rows))
        texts = [CompletionText(self.tokenizer, r.spec.params.stop) for r in rows]
        counts = [0] * len(rows)
        done = [False] * len(rows)

        def end(i: int, reason: FinishReason) -> None:
            tail = texts[i].finish()
            if tail:
                _safe_emit(rows[i].job, TextDelta(rows[i].spec.index, tail, counts[i]))
            _safe_emit(rows[i].job, Finished(rows[i].spec.index, reason, counts[i]))
            done[i] = True
            st.rows_finished += 1

        stream = stream_batch(
            self.model, [r.spec.prompt for r in rows], [r.spec.params for r in rows], self.eos_id, self.device
        )
        finish: set[int] = set()
        try:
            while not all(done):
                try:
                    step = stream.send(finish or None)
                except StopIteration:
                    break
                st.decode_steps += 1
                finish = set()
                if self._stopping:
                    raise RuntimeError("the server is shutting down")
                for i, token in enumerate(step):
                    if done[i]:
                        continue
                    row = rows[i]
                    if row.job.cancelled:
                        done[i] = True
                        finish.add(i)
                        st.rows_cancelled += 1
                        continue
                    if token is None:  # stream_batch ended the row: it reached its budget
                        end(i, "length")
                        continue
                    if token == self.eos_id:
                        end(i, "stop")
                        continue
                    counts[i] += 1
                    st.tokens_generated += 1
                    delta = texts[i].push(token)
                    if delta:
                        _safe_emit(row.job, TextDelta(row.spec.index, delta, counts[i]))
                    if texts[i].stopped:
                        end(i, "stop")
                        finish.add(i)
                    elif counts[i] >= row.spec.params.max_new_tokens:
                        end(i, "length")
            for i in range(len(rows)):
                if not done[i] and not rows[i].job.cancelled:
                    end(i, "length")
        except Exception as e:  # a bad batch must not take the server down
            if self._stopping:
                message = "the server is shutting down"
            else:
                log.exception("generation failed for a batch of %d rows", len(rows))
                st.errors += 1
                message = f"generation failed: {type(e).__name__}: {e}"
            for job in {id(rows[i].job): rows[i].job for i in range(len(rows)) if not done[i]}.values():
                _safe_emit(job, Failed(message))
        finally:
            stream.close()
            st.running = 0


def _safe_emit(job: Job, event: Event) -> None:
    """Deliver an event; a receiver that is gone (its event loop closed) cancels the job."""
    try:
        job.emit(event)
    except Exception:
        log.debug("dropping an event for a request whose receiver is gone", exc_info=True)
        job.cancel()
