"""What ``Trainer.fit`` records about its process's part of a run: the throughput window
(tokens/s and MFU between logged steps), the metrics.jsonl row of a logged step, and the
manifest written when the budget is spent. ``trainer`` is the ``training.trainer.Trainer``
(not imported: the trainer imports this module)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from pilelm.core.manifest import write_manifest
from pilelm.training.mfu import PeakFlops
from pilelm.training.outcomes import StepResult


@dataclass
class RunLog:
    t_start: float
    tokens_at_start: int
    peak: PeakFlops
    """The MFU peak (``training/mfu.py``)."""
    train_time: float = 0.0
    """Seconds inside ``train_step`` (this process, since it started)."""
    window_t: float = field(default_factory=time.perf_counter)
    """Start of the throughput window (reset after evaluations and checkpoints)."""
    window_tokens: int = 0
    last: StepResult | None = None
    evals: dict[str, float] = field(default_factory=dict)
    """The last evaluation's results."""

    def train_row(self, trainer: Any, bar: Any) -> dict[str, Any]:
        """The metrics.jsonl row of a logged step (tokens/s and MFU over the steps since the last)."""
        last, now = self.last, time.perf_counter()
        assert last is not None
        tps = self.window_tokens / max(now - self.window_t, 1e-9)
        self.window_t, self.window_tokens = now, 0
        mfu = self.peak.utilisation(tps * trainer.flops_per_token / trainer.info.world)
        row: dict[str, Any] = {"step": trainer.step, "loss": round(last.loss, 6), "lr": last.lr,
                               "tokens": trainer.tokens_seen, "tokens_per_s": round(tps, 1), "mfu": round(mfu, 4),
                               "grad_norm": round(last.grad_norm, 4), "epoch": round(trainer.loader.epoch(), 4),
                               "elapsed_s": round(trainer.elapsed, 2)}
        if last.skipped:
            row["skipped"] = True
        if trainer.private is not None:
            row.update(trainer.private.metrics())
        bar.set_postfix(loss=f"{last.loss:.4f}", lr=f"{last.lr:.2e}", tok_s=f"{tps:,.0f}",
                        mfu=f"{100 * mfu:.1f}%", refresh=False)
        return row

    def write_manifest(self, trainer: Any) -> None:
        """RUN/manifest.json of the finished run (rank 0)."""
        tokens = trainer.tokens_seen - self.tokens_at_start
        counts = {"steps": trainer.step, "tokens": trainer.tokens_seen, "parameters": trainer.num_params,
                  "final_loss": self.last.loss if self.last else None, **self.evals}
        entry = trainer.manifest_entry()
        write_manifest(trainer.out, entry.stage, entry.config, inputs=entry.inputs, counts={**counts, **entry.counts},
                       timings={"total": time.perf_counter() - self.t_start, "train": self.train_time,
                                "budget_elapsed": trainer.elapsed},
                       extra={"tokens_per_s": tokens / self.train_time if self.train_time else None,
                              "precision": trainer.precision.name, "world": trainer.info.world,
                              "peak_flops": self.peak.value, "peak_flops_source": self.peak.source,
                              **({"privacy": trainer.private.summary()} if trainer.private is not None else {})})
