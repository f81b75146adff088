"""`pilelm distill --teacher RUN --data SHARDS -o STUDENT [--config SMALL]`: knowledge distillation.

A student (the config's model section, or the teacher's shape with ``distill.student_layers``
blocks) trains on the token shards with the loss of Hinton et al. 2015, "Distilling the
Knowledge in a Neural Network":

    loss = lm_weight * CE(student, next token) + kl_weight * T^2 * KL(teacher_T || student_T)

where ``_T`` is the softmax at temperature T and the KL is averaged over target tokens (T^2
keeps the soft-target gradients' scale independent of T, as the paper notes). The teacher's
logits are computed on the fly (in ``teacher_dtype``, bf16 by default) from the same windows
the student sees. With ``top_k`` > 0 only the teacher's k largest logits per position are used
(its distribution renormalised over them); ``cache=true`` then keeps them on disk under
``STUDENT/teacher_topk/`` (safetensors, one file per window, keyed by the window's tokens) so
later epochs read them instead of running the teacher.

Training is ``pilelm train``'s ``Trainer``: ``DistillTrainer`` overrides only its per-batch loss
(``Trainer.step_loss``) and the manifest's stage, so accumulation, clipping, precision,
checkpoints and exact resume after a kill are the same code. The student's ``config.yaml`` is a
plain train config: the same student trained without the teacher, for the same steps on the
same data order, is ``pilelm train --config STUDENT/config.yaml -o BASELINE``; ``pilelm
compress report TEACHER STUDENT BASELINE --data ...`` puts the three side by side.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from pilelm.core.atomic import atomic_path, atomic_write_json
from pilelm.models import spec_for
from pilelm.models.dtypes import DTYPES
from pilelm.models.spec import IGNORE_INDEX
from pilelm.tokens.identity import require_same_tokenizer
from pilelm.training.checkpoint import load_for_inference, resolve_checkpoint
from pilelm.training.config import TrainConfig
from pilelm.training.distributed import init_distributed
from pilelm.training.trainer import ManifestEntry, Trainer

log = logging.getLogger(__name__)

TOPK_CACHE = "teacher_topk"


@dataclass
class DistillLossConfig:
    temperature: float = 2.0
    """Softmax temperature of the soft targets (both teacher and student); > 0."""
    kl_weight: float = 0.5
    """Weight of the KL term (multiplied by temperature^2)."""
    lm_weight: float = 0.5
    """Weight of the ordinary next-token cross-entropy."""
    teacher_dtype: Literal["bfloat16", "float32", "float16"] = "bfloat16"
    """Dtype the teacher runs in (its logits are computed on the fly)."""
    top_k: int = 0
    """Use only the teacher's k largest logits per position (0 = the full distribution)."""
    cache: bool = False
    """With top_k: keep the teacher's top-k on disk (STUDENT/teacher_topk/) for repeated epochs."""
    student_layers: int = 0
    """N > 0: the student is the teacher's shape with N blocks (the model section is not used); 0: the model section (--config)."""

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"distill.temperature must be > 0, got {self.temperature}")
        if self.kl_weight < 0 or self.lm_weight < 0 or self.kl_weight + self.lm_weight == 0:
            raise ValueError(f"distill.kl_weight and distill.lm_weight must be >= 0 and not both 0, "
                             f"got {self.kl_weight} and {self.lm_weight}")
        if self.top_k < 0 or self.student_layers < 0:
            raise ValueError("distill.top_k and distill.student_layers must be >= 0")
        if self.cache and not self.top_k:
            raise ValueError("distill.cache stores the teacher's top-k logits: set distill.top_k too (e.g. 64)")


@dataclass
class DistillConfig(TrainConfig):
    """A train config for the student, plus the teacher and the distillation loss."""

    teacher: str = ""
    """Teacher run directory (pilelm train / import output); it must share the data's tokenizer."""
    distill: DistillLossConfig = field(default_factory=DistillLossConfig)
    """Distillation loss and teacher settings."""

    def student_config(self) -> TrainConfig:
        """The plain train config of the student (what its config.yaml records)."""
        return TrainConfig(**{f.name: getattr(self, f.name) for f in fields(TrainConfig)})


def distillation_loss(student_logits: torch.Tensor, labels: torch.Tensor, teacher: TeacherTargets,
                      cfg: DistillLossConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mixed loss, LM cross-entropy, KL) of student logits (B, T, V) against next-token labels
    (B, T; IGNORE_INDEX where none) and the teacher's targets; means over target tokens.

    With top-k targets the KL is sum_i p_t(i) (log p_t(i) - log p_s(i)) over the teacher's k
    tokens, p_t renormalised over them and p_s the student's full softmax: still >= 0, and 0
    only when the student puts all its mass where the teacher's k tokens are, as the teacher does.
    """
    s = student_logits.float()
    V = s.size(-1)
    mask = labels != IGNORE_INDEX  # (B, T)
    lm = F.cross_entropy(s.view(-1, V), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    log_ps = F.log_softmax(s / cfg.temperature, dim=-1)  # (B, T, V)
    log_pt = F.log_softmax(teacher.logits.float() / cfg.temperature, dim=-1)  # (B, T, V or k)
    if teacher.indices is not None:
        log_ps = log_ps.gather(-1, teacher.indices.long())  # (B, T, k)
    kl_per_token = (log_pt.exp() * (log_pt - log_ps)).sum(-1)  # (B, T)
    kl = (kl_per_token * mask).sum() / mask.sum().clamp(min=1)
    return cfg.lm_weight * lm + cfg.kl_weight * cfg.temperature**2 * kl, lm, kl


@dataclass
class TeacherTargets:
    logits: torch.Tensor
    """(B, T, V) teacher logits, or (B, T, k) of its top-k."""
    indices: torch.Tensor | None = None
    """(B, T, k) vocabulary ids of the top-k logits; None for the full distribution."""


class TopKCache:
    """The teacher's top-k logits of each window, on disk: ``DIR/<sha256 of the window's
    tokens>.safetensors`` holding ``values`` (k logits per position) and ``indices``. The
    folder's ``cache.json`` names the teacher checkpoint and k; another teacher is refused."""

    def __init__(self, root: Path, teacher_ckpt: Path, top_k: int):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        ident = {"teacher": str(teacher_ckpt.resolve()), "top_k": top_k}
        meta = root / "cache.json"
        if meta.is_file():
            found = json.loads(meta.read_text())
            if found != ident:
                raise ValueError(f"{root} caches {found}, not {ident}; delete it or distill into a new --output")
        else:
            atomic_write_json(meta, ident)
        self.hits = self.misses = 0

    def _path(self, window: torch.Tensor) -> Path:
        key = hashlib.sha256(window.to(torch.int64).cpu().numpy().tobytes()).hexdigest()
        return self.root / f"{key}.safetensors"

    def get(self, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        path = self._path(window)
        if not path.is_file():
            self.misses += 1
            return None
        self.hits += 1
        stored = load_file(str(path))
        return stored["values"], stored["indices"]

    def put(self, window: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> None:
        with atomic_path(self._path(window)) as tmp:
            save_file({"values": values.contiguous().cpu(), "indices": indices.to(torch.int32).contiguous().cpu()},
                      str(tmp))


class Teacher:
    """The teacher model and how its targets for a batch are obtained (run, top-k, cache)."""

    def __init__(self, model: nn.Module, cfg: DistillLossConfig, cache: TopKCache | None):
        self.model, self.cfg, self.cache = model, cfg, cache

    @torch.no_grad()
    def _logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits, _ = self.model(input_ids)  # (B, T, V)
        return logits

    def targets(self, input_ids: torch.Tensor) -> TeacherTargets:
        k = self.cfg.top_k
        if not k:
            return TeacherTargets(self._logits(input_ids))
        if self.cache is None:
            values, indices = self._logits(input_ids).topk(k, dim=-1)
            return TeacherTargets(values, indices)
        rows = [self.cache.get(w) for w in input_ids]
        missing = [i for i, r in enumerate(rows) if r is None]
        if missing:
            values, indices = self._logits(input_ids[missing]).topk(k, dim=-1)
            for j, i in enumerate(missing):
                self.cache.put(input_ids[i], values[j], indices[j])
                rows[i] = (values[j].cpu(), indices[j].cpu())
        device = input_ids.device
        return TeacherTargets(torch.stack([r[0] for r in rows]).to(device),
                              torch.stack([r[1] for r in rows]).to(device))


class DistillTrainer(Trainer):
    """``Trainer`` whose per-batch loss mixes in the teacher's soft targets."""

    def __init__(self, cfg: DistillConfig, teacher: Teacher, info=None):
        super().__init__(cfg.student_config(), info)
        self.distill_cfg = cfg
        self.teacher = teacher
        teacher.model.to(self.device)

    def step_loss(self, batch: dict[str, torch.Tensor], kwargs: dict[str, Any]) -> torch.Tensor:
        logits, _ = self.forward(batch["input_ids"])  # (B, T, V): the KL needs them
        targets = self.teacher.targets(batch["input_ids"])
        loss, _, _ = distillation_loss(logits, batch["labels"], targets, self.distill_cfg.distill)
        return loss

    def manifest_entry(self) -> ManifestEntry:
        cfg = self.distill_cfg
        return ManifestEntry("distill", cfg, [str(cfg.data), cfg.teacher])


def _student_config(cfg: DistillConfig, teacher_cfg: Any) -> DistillConfig:
    """The config with the student's model section resolved against the teacher's shape."""
    section = spec_for(teacher_cfg).config_section
    if cfg.distill.student_layers:
        student = replace(teacher_cfg, n_layer=cfg.distill.student_layers, dropout=cfg.model_config.dropout)
        return replace(cfg, family=spec_for(teacher_cfg).family, **{section: student})
    student = cfg.model_config
    if cfg.family != spec_for(teacher_cfg).family:
        raise ValueError(f"the student is family={cfg.family} but the teacher {cfg.teacher} is "
                         f"{spec_for(teacher_cfg).family}; distill within one family")
    if student.vocab_size == 0:
        student = replace(student, vocab_size=teacher_cfg.vocab_size)
    elif student.vocab_size != teacher_cfg.vocab_size:
        raise ValueError(f"{section}.vocab_size={student.vocab_size} differs from the teacher's "
                         f"{teacher_cfg.vocab_size}: the KL compares the two output distributions token by "
                         f"token; set {section}.vocab_size=0 to take the teacher's")
    if getattr(student, "block_size", 0) > getattr(teacher_cfg, "block_size", 0):
        raise ValueError(f"{section}.block_size={student.block_size} is longer than the teacher's context "
                         f"({teacher_cfg.block_size}); use a block_size <= {teacher_cfg.block_size}")
    return replace(cfg, **{section: student})


def run_distill(cfg: DistillConfig) -> Path:
    if not cfg.teacher or not str(cfg.data) or str(cfg.data) == ".":
        raise ValueError("distill needs a teacher, data and an output: "
                         "pilelm distill --teacher RUN_DIR --data SHARD_DIR -o STUDENT_DIR [--config NAME]")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("distill runs in one process (the teacher is not sharded); run it without torchrun")
    require_same_tokenizer(cfg.teacher, cfg.data, what="distill",
                           fix="distill on shards tokenized with the teacher's tokenizer: pilelm tokenize "
                               f"PREPARED_DIR --tokenizer {Path(cfg.teacher) / 'tokenizer'} -o SHARD_DIR")
    teacher_model, teacher_cfg, _ = load_for_inference(cfg.teacher)
    if not spec_for(teacher_cfg).causal:
        raise ValueError(f"the teacher {cfg.teacher} is a {spec_for(teacher_cfg).family} model; "
                         "distill distils causal language models")
    cfg = _student_config(cfg, teacher_cfg)
    teacher_model.to(DTYPES[cfg.distill.teacher_dtype]).eval().requires_grad_(False)
    cache = None
    if cfg.distill.cache:
        _, teacher_ckpt = resolve_checkpoint(cfg.teacher)
        cache = TopKCache(Path(cfg.output) / TOPK_CACHE, teacher_ckpt, cfg.distill.top_k)
    trainer = DistillTrainer(cfg, Teacher(teacher_model, cfg.distill, cache), init_distributed(cfg.loop.device))
    out = trainer.fit()
    if cache is not None:
        log.info("teacher top-k cache: %d windows read, %d computed", cache.hits, cache.misses)
    return out
