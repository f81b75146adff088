"""The table of stages: each a config class and a runner, imported lazily.

Both the CLI and ``pilelm run`` (the pipeline runner) look stages up here, so nothing needs to
import ``cli.py``.
"""

from __future__ import annotations

import importlib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pilelm.core.config import ConfigError

CONFIG_DIR = Path(__file__).parent.parent / "configs"


@dataclass(frozen=True)
class Command:
    name: str
    module: str
    config: str
    runner: str
    summary: str
    positionals: tuple[str, ...] = ()
    """Config fields filled by bare arguments, in order; a list field takes all the rest."""
    usage: str = ""
    report: str = ""
    """``module:function`` rendering the stage's section of the run report from its output
    (see ``pilelm.core.report.ReportSection``); empty = the report shows only its table row."""

    def load(self) -> tuple[type, typing.Callable[[Any], Any]]:
        mod = importlib.import_module(self.module)
        return getattr(mod, self.config), getattr(mod, self.runner)

    def load_report(self) -> typing.Callable[[Path, Path], Any] | None:
        if not self.report:
            return None
        module, _, name = self.report.partition(":")
        return getattr(importlib.import_module(module), name)


COMMANDS: dict[str, Command] = {
    c.name: c
    for c in [
        Command("prepare", "pilelm.data.pipeline", "PrepareConfig", "run_prepare",
                "clean, filter, dedup and decontaminate raw Pile-format data",
                ("inputs",), "pilelm prepare INPUT... -o PREPARED_DIR",
                report="pilelm.data.stats:report_section"),
        Command("tokenizer train", "pilelm.tokens.tokenizer_train", "TokenizerTrainConfig", "run_tokenizer_train",
                "train a BPE / WordPiece / Unigram tokenizer on prepared data",
                ("data",), "pilelm tokenizer train PREPARED_DIR -o TOKENIZER_DIR --kind bpe --vocab-size N",
                report="pilelm.tokens.report:tokenizer_section"),
        Command("tokenize", "pilelm.tokens.tokenize", "TokenizeConfig", "run_tokenize",
                "encode prepared data into Megatron-compatible .bin/.idx token shards",
                ("data",), "pilelm tokenize PREPARED_DIR --tokenizer TOKENIZER_DIR -o SHARD_DIR",
                report="pilelm.tokens.report:shards_section"),
        Command("shards export", "pilelm.tokens.exchange", "ShardExportConfig", "run_shard_export",
                "export a split of token shards as nanoGPT .bin, LMDB or TFRecord",
                ("data",), "pilelm shards export SHARD_DIR --split train --format nanogpt|lmdb|tfrecord -o OUT"),
        Command("shards import", "pilelm.tokens.exchange", "ShardImportConfig", "run_shard_import",
                "make a shard dir from others' tokens (Pythia/Megatron .bin/.idx, nanoGPT .bin)",
                ("source",), "pilelm shards import PREFIX_OR_BIN --tokenizer TOKENIZER -o SHARD_DIR"),
        Command("train", "pilelm.training.trainer", "TrainConfig", "run_train",
                "train a GPT-2 / GPT-NeoX / BERT model on token shards",
                (), "pilelm train --data SHARD_DIR -o RUN_DIR [--config NAME|FILE] [key=value ...]",
                report="pilelm.training.report:report_section"),
        Command("eval", "pilelm.evaluation.evaluate", "EvalConfig", "run_eval",
                "bits per byte and perplexity per Pile component; compare runs side by side",
                ("runs",), "pilelm eval RUN_DIR... --data SHARD_DIR_OR_PREPARED_DIR -o EVAL_DIR",
                report="pilelm.evaluation.results:report_section"),
        Command("generate", "pilelm.inference.generate", "GenerateConfig", "run_generate",
                "sample text from a trained model (greedy, top-k, top-p, beam; --retrieve INDEX for RAG)",
                ("run",), 'pilelm generate RUN_DIR --prompt "..." [--temperature 0.8 --top-p 0.95] [--retrieve INDEX]',
                report="pilelm.inference.generate:report_section"),
        Command("chat", "pilelm.inference.chat_session", "ChatConfig", "run_chat",
                "chat in the terminal with a chat model (a `finetune --task sft` run): /reset, /exit",
                ("run",), 'pilelm chat CHAT_RUN [--system "You are terse."] [--temperature 0.7]'),
        Command("finetune", "pilelm.finetune.stage", "FinetuneConfig", "run_finetune",
                "fine-tune a run: classification, NER, punctuation, chat/summaries (sft) or retrieval (contrastive)",
                ("run",), "pilelm finetune RUN_DIR --task classify|ner|punct|sft|contrastive --data FILES -o FT_DIR",
                report="pilelm.finetune.results:report_section"),
        Command("punctuate", "pilelm.finetune.punctuate", "PunctuateConfig", "run_punctuate",
                "restore punctuation and casing with a `--task punct` model (files or stdin)",
                ("model", "inputs"), "pilelm punctuate FT_DIR [FILE...] [-o OUT] < text.txt"),
        Command("predict", "pilelm.finetune.predict", "PredictConfig", "run_predict",
                "classify texts, tag entities or restore punctuation with a fine-tuned model (JSONL out)",
                ("model", "texts"), 'pilelm predict FT_DIR ["TEXT"...] [--data FILES] [-o OUT.jsonl] < texts.txt'),
        Command("export", "pilelm.interop.hf", "ExportConfig", "run_export",
                "export a run to a Hugging Face transformers folder or a llama.cpp GGUF file",
                ("run",), "pilelm export RUN_DIR --format hf -o HF_DIR | --format gguf -o MODEL.gguf"),
        Command("import", "pilelm.interop.hf", "ImportConfig", "run_import",
                "import a Hugging Face transformers folder as a pilelm run",
                ("source",), "pilelm import HF_DIR -o RUN_DIR",
                report="pilelm.training.report:report_section"),
        Command("serve", "pilelm.serve", "ServeConfig", "run_serve",
                "serve a model over an OpenAI-compatible HTTP API with a web playground",
                ("run",), "pilelm serve RUN_DIR [--host 127.0.0.1 --port 8000]"),
        Command("embed", "pilelm.retrieval.embed", "EmbedConfig", "run_embed",
                "embed documents with a run's model into a faiss index (chunked, resumable)",
                ("run",), "pilelm embed RUN_DIR --data PREPARED_OR_FILES -o INDEX_DIR [--index flat|ivf|hnsw]"),
        Command("search", "pilelm.retrieval.search", "SearchConfig", "run_search",
                "the documents of an index closest to a query",
                ("index", "query"), 'pilelm search INDEX_DIR "query" [-k 10] [--json]'),
        Command("similar", "pilelm.retrieval.search", "SimilarConfig", "run_similar",
                "the documents of an index closest to one of its documents",
                ("index",), "pilelm similar INDEX_DIR --doc ID [-k 10] [--json]"),
        Command("topics", "pilelm.retrieval.topics", "TopicsConfig", "run_topics",
                "cluster an index's documents (k-means) and name each cluster by its distinctive terms",
                ("index",), "pilelm topics INDEX_DIR -k 20 -o TOPICS_DIR"),
        Command("mine-pairs", "pilelm.retrieval.pair_mining", "MinePairsConfig", "run_mine_pairs",
                "mine retriever training pairs (question/answer, title/body, random crops) with BM25 hard negatives",
                ("corpus",), "pilelm mine-pairs PREPARED_DIR -o PAIRS.jsonl [--kinds qa --kinds title --kinds crop]"),
        Command("finetune-contrastive", "pilelm.retrieval.contrastive", "ContrastiveConfig", "run_contrastive",
                "fine-tune a run's pooled states for retrieval (in-batch InfoNCE on query/positive pairs)",
                ("run",), "pilelm finetune-contrastive RUN_DIR --corpus PREPARED_DIR [--pairs PAIRS.jsonl] -o RUN_DIR"),
        Command("distill", "pilelm.compress.distill", "DistillConfig", "run_distill",
                "train a smaller student on a teacher run's soft targets (KL at a temperature + LM loss)",
                (), "pilelm distill --teacher RUN_DIR --data SHARD_DIR -o STUDENT_DIR [--config NAME]"),
        Command("prune", "pilelm.compress.prune", "PruneConfig", "run_prune",
                "magnitude (unstructured) or head/channel (structured) pruning, then optional recovery",
                ("run",), "pilelm prune RUN_DIR -o PRUNED_DIR --method magnitude|structured --sparsity 0.5"),
        Command("quantize", "pilelm.compress.quantize", "QuantizeConfig", "run_quantize",
                "post-training int8 / int4 quantization for CPU inference",
                ("run",), "pilelm quantize RUN_DIR -o OUT_DIR --method int8-weight|int8-dynamic|int4-weight"),
        Command("compress report", "pilelm.compress.report", "CompressReportConfig", "run_compress_report",
                "one table: parameters, bytes, BPB and decode tokens/s of compressed runs vs their base",
                ("runs",), "pilelm compress report BASE_RUN COMPRESSED_RUN... --data SHARD_DIR -o REPORT_DIR"),
        Command("audit", "pilelm.privacy.audit", "AuditConfig", "run_audit",
                "memorization audit: canary exposure, greedy extraction, scrubbed-PII completion",
                ("run",), "pilelm audit RUN_DIR --canaries PREPARED_DIR/canaries.json -o AUDIT_DIR",
                report="pilelm.privacy.audit:report_section"),
        Command("run", "pilelm.core.runner", "PipelineConfig", "run_pipeline",
                "run a pipeline YAML that chains stages (resumes finished ones)",
                ("pipeline",), "pilelm run PIPELINE.yaml [-o WORK_DIR] [stage.key=value ...]"),
        Command("demo", "pilelm.core.runner", "DemoConfig", "run_demo",
                "the whole road on the bundled sample corpus, with a report",
                (), "pilelm demo [-o runs/demo]"),
    ]
}

# Extension points of a lower layer that a higher package implements: the lower layer asks
# for a hook by name, so it never imports the higher package (the stage table's lazy loading).
HOOKS: dict[str, str] = {
    "train.privacy": "pilelm.privacy.dpsgd:PrivateTraining",
    "prepare.canaries": "pilelm.privacy.canaries:plant_canaries",
    "generate.retrieve": "pilelm.retrieval.rag:retrieval_prompts",
}


def load_hook(name: str) -> typing.Callable[..., Any]:
    """The object registered in ``HOOKS`` under ``name`` (its module imported now)."""
    module, _, attr = HOOKS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def resolve_config_path(name: str) -> Path:
    """A YAML path, or the name of a shipped config (``tiny`` -> pilelm/configs/tiny.yaml)."""
    p = Path(name)
    if p.is_file():
        return p
    shipped = CONFIG_DIR / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    if shipped.is_file():
        return shipped
    names = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config {name!r} is neither a file nor a shipped config ({', '.join(names)})")

