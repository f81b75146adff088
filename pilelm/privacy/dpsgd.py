"""DP-SGD inside ``pilelm train`` (``privacy.enabled=true``): sampling, clipping, noise, accounting.

One private step (Abadi et al. 2016, Algorithm 1, as Opacus implements it):

1. **Sample**: with ``privacy.sampling=poisson`` every training window joins the step
   independently with probability ``q = expected batch / N`` (N windows), so the batch size
   varies; ``shuffle`` takes the loader's shuffled fixed-size batch (its order from
   ``loop.seed``) and accounts it as Poisson at the same ``q`` (the approximation most DP
   training code makes; Opacus' ``poisson_sampling=False``). The batch is processed in
   chunks of ``loop.micro_batch`` windows: gradient accumulation within one sampled batch
   does not change what is sampled, so it is allowed.
2. **Clip**: each window's gradient (of its own mean loss) is clipped to L2 norm C =
   ``privacy.max_grad_norm`` (``privacy/per_sample.py``), and the clipped gradients summed.
3. **Noise**: N(0, (sigma C)^2) is added to every coordinate of the sum, which is divided by
   the *expected* batch size (Opacus' ``expected_batch_size``: dividing by the drawn size
   would leak it). The optimizer then steps as usual; ``optim.grad_clip`` is not applied
   (each sample is already clipped).
4. **Account**: the accountant composes one subsampled Gaussian step (sigma, q).

The privacy unit is one training window (``model.block_size`` + 1 tokens; neighbouring
windows share their boundary token): a fact repeated in k windows is protected as a group
of k (epsilon grows about k-fold). The accountant's state is saved with every checkpoint
(``privacy.json``) and restored on resume.

The accounting assumes nobody can replay the sampling or the noise. So by default
(``privacy.secure_rng=true``, Opacus' ``secure_mode`` idea) every step seeds both from the OS's
entropy (``secrets``): a run cannot be repeated. With ``privacy.secure_rng=false`` step s draws
them from ``(loop.seed, s)``: a resumed run reproduces the uninterrupted one (tests, debugging),
but the seed is in the run's config.yaml, so the epsilon does not hold against anyone who reads
it. The manifest's privacy record says which was used (``randomness``).
"""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pilelm.privacy.accountant import Accountant, noise_for_epsilon
from pilelm.privacy.per_sample import ClippedGradients, spec_loss

if TYPE_CHECKING:
    from pilelm.training.trainer import Trainer

log = logging.getLogger(__name__)


def refusal(trainer: Trainer) -> str | None:
    """Why DP-SGD cannot be accounted for in this run's settings (None when it can)."""
    cfg, loop = trainer.cfg, trainer.cfg.loop
    if trainer.info.world > 1:
        return ("privacy.enabled=true runs in one process: per-sample clipping and the noise are not "
                "split over ranks here; launch without torchrun")
    if loop.compile:
        return "privacy.enabled=true does not support loop.compile=true (per-sample gradients run eagerly)"
    if loop.on_nonfinite != "stop":
        return ("privacy.enabled=true needs loop.on_nonfinite=stop: skipping a step because of its data "
                "reveals something about the data that the accountant does not count")
    if trainer.precision.name == "bf16":
        return "privacy.enabled=true supports loop.precision=fp32 or bf16-autocast, not bf16 (master weights)"
    if cfg.objective == "mlm+nsp":
        return ("privacy.enabled=true cannot account for next-sentence prediction: a negative pair reads a "
                "second, random window, so one window can change two samples; set bert.nsp=false")
    if trainer.loader.global_batch >= trainer.loader.sampler.num_windows:
        return (f"the expected batch ({trainer.loader.global_batch} windows) is not smaller than the training "
                f"set ({trainer.loader.sampler.num_windows} windows): lower loop.micro_batch/tokens_per_step")
    return None


class PrivateTraining:
    """The trainer's DP-SGD hook (``pilelm.core.stages.HOOKS["train.privacy"]``).

    The trainer calls ``gradients()`` instead of its own forward/backward pass, ``metrics()``
    for each logged row, ``save``/``load`` with its checkpoints and ``summary()`` for the
    manifest.
    """

    def __init__(self, trainer: Trainer):
        why = refusal(trainer)
        if why:
            raise ValueError(why)
        self.trainer = trainer
        cfg = trainer.cfg.privacy
        self.cfg = cfg
        loader = trainer.loader
        self.num_samples = loader.sampler.num_windows
        self.expected_batch = loader.global_batch
        self.sample_rate = self.expected_batch / self.num_samples
        self.delta = cfg.delta or 1.0 / self.num_samples
        self.planned_steps = trainer.cfg.loop.max_steps
        if cfg.noise_multiplier:
            self.noise_multiplier = cfg.noise_multiplier
        else:
            self.noise_multiplier = noise_for_epsilon(cfg.target_epsilon, self.delta, self.sample_rate,
                                                      self.planned_steps, cfg.accountant)
        self.accountant = Accountant(cfg.accountant, self.delta)
        self.clipped = ClippedGradients(trainer.raw_model, spec_loss(trainer.spec), cfg.max_grad_norm,
                                        cfg.per_sample)
        self.last_batch = 0
        self.tokens = 0
        log.info("DP-SGD: %d windows, expected batch %d (q=%.3g), noise multiplier %.4g, clip %.3g, "
                 "delta %.3g, %s sampling, %s accountant", self.num_samples, self.expected_batch,
                 self.sample_rate, self.noise_multiplier, cfg.max_grad_norm, self.delta, cfg.sampling,
                 cfg.accountant)
        if not cfg.secure_rng:
            log.warning("privacy.secure_rng=false: the sampling and the noise follow loop.seed, which the run's "
                        "config.yaml records; the epsilon holds only against someone who does not know it "
                        "(for tests and debugging; drop the setting for real private training)")

    @property
    def noise_std(self) -> float:
        """Std of the noise added to the sum of clipped gradients: sigma * C."""
        return self.noise_multiplier * self.cfg.max_grad_norm

    # --- one step --------------------------------------------------------------------------

    def poisson_windows(self, step: int) -> np.ndarray:
        """The windows of step ``step``: each joins independently with probability q (a binomial
        count, then that many distinct windows uniformly: the same distribution)."""
        rng = np.random.default_rng(self._seed(step, 0x44505347))  # "DPSG"
        n = int(rng.binomial(self.num_samples, self.sample_rate))
        return np.sort(rng.choice(self.num_samples, size=n, replace=False))

    def _chunks(self) -> list[dict[str, torch.Tensor]]:
        loader = self.trainer.loader
        if self.cfg.sampling == "shuffle":
            return loader.next_step()
        step = loader.step
        windows = self.poisson_windows(step)
        loader.step += 1  # the loader's position counts steps as in non-private runs
        mb = loader.micro_batch
        return [loader.collate(windows[i : i + mb], [step] * len(windows[i : i + mb]))
                for i in range(0, len(windows), mb)]

    def _seed(self, step: int, stream: int) -> int:
        """The seed of one of step ``step``'s draws: 128 secret bits, or (privacy.secure_rng=false)
        a function of (loop.seed, step, stream)."""
        if self.cfg.secure_rng:
            return secrets.randbits(128)
        words = np.random.SeedSequence([self.trainer.cfg.loop.seed, step, stream]).generate_state(4, np.uint32)
        return sum(int(w) << (32 * i) for i, w in enumerate(words))

    def _noise_generator(self, device: torch.device, step: int) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self._seed(step, 0x4E4F4953) % 2**63)  # "NOIS"

    def randomness(self) -> dict[str, str]:
        """Where the sampling and the noise came from (the manifest's record)."""
        source = "os-entropy (secrets)" if self.cfg.secure_rng else "loop.seed (reproducible, not secret)"
        sampling = source if self.cfg.sampling == "poisson" else "loop.seed (the shuffled loader's order)"
        return {"sampling": sampling, "noise": source}

    def gradients(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Sample, clip, sum, noise; set ``p.grad`` of every trained parameter.

        Returns (mean loss of the sampled windows, L2 norm of the noisy gradient, tokens read).
        """
        trainer = self.trainer
        step = trainer.step
        self.clipped.reset()
        for batch in self._chunks():
            batch = {k: v.to(trainer.device, non_blocking=True) for k, v in batch.items()}
            with trainer.precision.autocast():
                self.clipped.add(batch)
        gen = self._noise_generator(trainer.device, step)
        sq = torch.zeros((), dtype=torch.float32, device=trainer.device)
        for name, p in self.clipped.params.items():
            total = self.clipped.summed.get(name)
            if total is None:
                total = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            noise = torch.normal(0.0, self.noise_std, size=p.shape, generator=gen, device=p.device)
            g = (total + noise) / self.expected_batch
            sq += g.pow(2).sum()
            p.grad = g.to(p.dtype)
        self.accountant.step(self.noise_multiplier, self.sample_rate)
        n = self.clipped.count
        self.last_batch = n
        self.tokens = n * trainer.seq_len
        losses = torch.cat(self.clipped.losses).sum() if n else torch.zeros((), device=trainer.device)
        return losses / max(n, 1), sq.sqrt(), self.tokens

    # --- what the trainer logs and stores ---------------------------------------------------

    def epsilon(self) -> float:
        return self.accountant.epsilon()

    def metrics(self) -> dict[str, Any]:
        """The privacy columns of a metrics row (``metrics.jsonl``, TensorBoard)."""
        return {"dp_epsilon": round(self.epsilon(), 4), "dp_batch": self.last_batch}

    def summary(self) -> dict[str, Any]:
        """The manifest's ``privacy`` record."""
        return {"epsilon": self.epsilon(), "delta": self.delta, "noise_multiplier": self.noise_multiplier,
                "max_grad_norm": self.cfg.max_grad_norm, "sample_rate": self.sample_rate,
                "expected_batch": self.expected_batch, "samples": self.num_samples,
                "steps": self.accountant.steps, "sampling": self.cfg.sampling,
                "accountant": self.cfg.accountant, "per_sample": self.clipped.method,
                "target_epsilon": self.cfg.target_epsilon or None, "unit": "window",
                "randomness": self.randomness()}

    def save(self, step_dir: Path) -> None:
        self.accountant.save(step_dir, {"step": self.trainer.step, "noise_multiplier": self.noise_multiplier,
                                        "sample_rate": self.sample_rate, "epsilon": self.epsilon()})

    def load(self, step_dir: Path) -> None:
        record = self.accountant.load(step_dir)
        if self.accountant.steps != self.trainer.step:
            raise ValueError(f"{step_dir}: the accountant composed {self.accountant.steps} steps but the "
                             f"checkpoint is at step {self.trainer.step}; the privacy record is inconsistent")
        if record.get("noise_multiplier") != self.noise_multiplier or record.get("sample_rate") != self.sample_rate:
            log.warning("resuming with noise multiplier %.4g and q %.3g (the checkpoint used %s and %s): the "
                        "accountant composes both exactly, but the final epsilon will differ from the target",
                        self.noise_multiplier, self.sample_rate, record.get("noise_multiplier"),
                        record.get("sample_rate"))
        log.info("privacy: resumed at step %d, epsilon %.3f spent at delta %.3g", self.trainer.step,
                 self.epsilon(), self.delta)
