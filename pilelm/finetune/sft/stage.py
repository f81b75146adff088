"""``pilelm finetune RUN --task sft --data FILES -o FT_RUN``: supervised fine-tuning of a
causal LM on conversations, then its before/after scores.

Steps: the base tokenizer gains the role tokens and the chat template
(``chat_format.chat_tokenizer``) and the model rows for them (``grow_vocabulary``);
conversations are read or mined (``conversations``), split like every fine-tuning task
(``pilelm.finetune.tasks.split_sources``), encoded with their reply masks (``encoding``);
``SftTrainer`` trains with early stopping on the validation reply loss; the best checkpoint
and the starting model are scored on the test split (``evaluate``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pilelm.core.atomic import atomic_write_json
from pilelm.core.manifest import require_stage, write_manifest
from pilelm.core.runner import SAMPLE_DIR
from pilelm.finetune.config import FinetuneConfig
from pilelm.finetune.loop import open_output, record_config
from pilelm.finetune.records import DataError
from pilelm.finetune.sft.chat_format import SFT_CHAT_TEMPLATE, chat_tokenizer, grow_vocabulary
from pilelm.finetune.sft.conversations import Conversation, mine_conversations, read_conversations
from pilelm.finetune.sft.encoding import ChatEncoder, SftExample
from pilelm.finetune.sft.evaluate import METRIC, score_replies, write_sft_results
from pilelm.finetune.sft.trainer import TRAINING, SftTrainer
from pilelm.finetune.tasks import split_sources
from pilelm.models import spec_for
from pilelm.tokens.chat import load_special_tokens
from pilelm.tokens.tokenizer import PileTokenizer
from pilelm.training import checkpoint as ckpt_io
from pilelm.training.distributed import pick_device

log = logging.getLogger(__name__)

BEFORE_JSON = "before.json"


def with_sample_data(cfg: FinetuneConfig) -> FinetuneConfig:
    """Mined examples without data: the bundled sample's train / val / test files."""
    if cfg.data or not cfg.sft.examples:
        return cfg
    return dataclasses.replace(cfg, data=[str(SAMPLE_DIR / "train")],
                               val_data=cfg.val_data or [str(SAMPLE_DIR / "val.jsonl.zst")],
                               test_data=cfg.test_data or [str(SAMPLE_DIR / "test.jsonl.zst")])


def load_splits(cfg: FinetuneConfig, encoder: ChatEncoder, counts: Counter[str]) -> dict[str, list[SftExample]]:
    def read(files: list[Path]) -> list[Conversation]:
        if cfg.sft.examples:
            return mine_conversations(cfg.sft.examples, files, counts)
        return [c for f in files for c in read_conversations(Path(f), counts)]

    splits = {}
    for split, convs in split_sources(cfg, read).items():
        splits[split] = [e for c in convs if (e := encoder.encode(c, counts)) is not None]
    for split in ("train", "val"):
        if not splits[split]:
            raise DataError(f"no usable {split} conversations (skipped: {dict(counts)}); raise max_length or "
                            "check the data")
    return splits


def _without_replies(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k != "replies"}


@dataclass
class SftSetup:
    """What fine-tuning starts from: the resolved config, the chat tokenizer, the model with
    rows for the new tokens, the encoded splits."""

    cfg: FinetuneConfig
    tokenizer: PileTokenizer
    model: torch.nn.Module
    model_cfg: Any
    new_ids: list[int]
    splits: dict[str, list[SftExample]]
    counts: Counter[str]
    pad_id: int
    device: torch.device
    resuming: bool


def setup_sft(cfg: FinetuneConfig) -> SftSetup:
    """Check the config, write FT_DIR/tokenizer, grow the model, read and encode the data."""
    if not cfg.run or not cfg.output:
        raise ValueError("finetune needs a run and an output: pilelm finetune RUN_DIR --task sft --data FILES -o FT_DIR")
    if not cfg.data and not cfg.sft.examples:
        raise ValueError("--task sft needs --data FILES (JSONL conversations) or sft.examples=lead|title|dialogue "
                         "(mined from the bundled sample when no data is given)")
    require_stage(cfg.run, "train", "import", what="run")
    cfg = with_sample_data(cfg)
    loop = cfg.loop
    if loop.num_threads:
        torch.set_num_threads(loop.num_threads)
    out = Path(cfg.output)
    trunk, trunk_cfg, tok_dir = ckpt_io.load_for_inference(cfg.run)
    if not spec_for(trunk_cfg).causal:
        raise ValueError(f"--task sft fine-tunes a causal LM; {cfg.run} holds a {spec_for(trunk_cfg).family} model")
    if cfg.sft.max_new_tokens >= trunk_cfg.block_size:
        raise ValueError(f"sft.max_new_tokens ({cfg.sft.max_new_tokens}) must be below the model's context "
                         f"({trunk_cfg.block_size}) to leave room for the prompt")
    # Before anything is written: a fresh start clears the old run (its manifest first).
    resuming = open_output(out, out / TRAINING, cfg)
    tokenizer, new_ids, trained_rows = chat_tokenizer(tok_dir, out / "tokenizer")
    torch.manual_seed(loop.seed)
    model, model_cfg = grow_vocabulary(trunk, trunk_cfg, new_ids, trained_rows)
    cfg = dataclasses.replace(cfg, max_length=min(cfg.max_length, model_cfg.block_size))
    encoder = ChatEncoder(tokenizer, SFT_CHAT_TEMPLATE, load_special_tokens(out / "tokenizer"), cfg.max_length,
                          prompt_room=model_cfg.block_size - cfg.sft.max_new_tokens)
    counts: Counter[str] = Counter()
    splits = load_splits(cfg, encoder, counts)
    if counts:
        log.info("sft examples: %s", ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eod_id
    return SftSetup(cfg, tokenizer, model, model_cfg, new_ids, splits, counts, pad_id, pick_device(loop.device),
                    resuming)


def run_sft(cfg: FinetuneConfig) -> Path:
    s = setup_sft(cfg)
    cfg, loop, out = s.cfg, s.cfg.loop, Path(s.cfg.output)
    record_config(out, cfg, s.resuming)
    tokenizer, model, model_cfg, splits, pad_id, device = s.tokenizer, s.model, s.model_cfg, s.splits, s.pad_id, s.device
    new_ids, counts = s.new_ids, s.counts
    eval_split = "test" if splits.get("test") else "val"
    scored = splits[eval_split][: cfg.sft.eval_generations or None]

    before = None
    if cfg.sft.before:
        if (out / BEFORE_JSON).is_file():
            before = json.loads((out / BEFORE_JSON).read_text())
        else:
            from pilelm.training.precision import resolve_precision

            before = score_replies(model.to(device), tokenizer, scored, cfg, pad_id,
                                   resolve_precision(loop.precision, device), device)
            atomic_write_json(out / BEFORE_JSON, before)
    if cfg.lora.r:
        from pilelm.finetune.lora import add_lora

        add_lora(model, "gpt", cfg.lora)
        if new_ids:  # the new role tokens' rows must learn; LoRA alone would leave them at the mean
            model.wte.weight.requires_grad = True
    from pilelm.finetune.lora import trainable_parameters

    trainable, total = trainable_parameters(model)
    trainer = SftTrainer(cfg, model, model_cfg, splits, pad_id, device)
    trainer.fit("finetune sft")
    if trainer.preempted:
        return out

    best, _ = ckpt_io.load_model(ckpt_io.resolve_checkpoint(out)[1], device)
    after = score_replies(best.eval(), tokenizer, scored, cfg, pad_id, trainer.precision, device)
    results: dict[str, Any] = {
        "task": "sft", "metric": METRIC, "split": eval_split, "best_step": trainer.best_step,
        "best_val_loss": trainer.best_loss, "steps": trainer.step, "num_beams": cfg.sft.num_beams,
        "trainable_parameters": trainable, "parameters": total, "lora_r": cfg.lora.r,
        "before": before and _without_replies(before), "after": _without_replies(after),
        eval_split: _without_replies(after),
        "samples": [{"prompt": e.prompt, "reference": e.reference, "before": before["replies"][i] if before else None,
                     "after": after["replies"][i]} for i, e in enumerate(scored[: cfg.sft.samples])],
    }
    atomic_write_json(out / "results.json", results)
    write_sft_results(out, results | {"before": before, "after": after}, scored, cfg.sft.samples)
    n_rows = {f"{s}_rows": len(r) for s, r in trainer.rows.items()}
    tokens = sum(len(e.ids) - 1 for e in splits["train"])
    fill = tokens / max(1, len(trainer.rows["train"]) * cfg.max_length) if cfg.sft.pack else None
    manifest_counts = ({f"{s}_examples": len(v) for s, v in splits.items()} | n_rows | dict(counts)
                       | {"steps": trainer.step, "best_step": trainer.best_step, "added_tokens": len(new_ids),
                          "trainable_parameters": trainable, "parameters": total})
    write_manifest(out, "train", cfg, inputs=[cfg.run, *cfg.data, *cfg.val_data, *cfg.test_data],
                   counts=manifest_counts, timings={"train": trainer.train_seconds},
                   extra={"objective": "sft", "task": "sft", "best_val_loss": trainer.best_loss,
                          "packed_row_fill": fill, f"{eval_split}_rougeL": after["rougeL"]})
    log.info("sft: best val reply loss %.4f at step %d; %s ROUGE-L %.2f -> %.2f", trainer.best_loss, trainer.best_step,
             eval_split, before["rougeL"] if before else float("nan"), after["rougeL"])
    return out
