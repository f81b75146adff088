"""``pilelm run PIPELINE.yaml``: chain stages in one work directory, resuming finished ones.

A pipeline file names a work directory and an ordered list of stages. Each entry is
``stage: NAME`` (a command of ``pilelm.core.stages.COMMANDS``) followed by that stage's config keys,
exactly the keys ``pilelm NAME --help`` lists::

    work_dir: runs/demo            # relative to where pilelm is started; `-o DIR` overrides it
    stages:
      - stage: prepare
        inputs: ["{sample}/train", "{sample}/val.jsonl.zst", "{sample}/test.jsonl.zst"]
        output: prepared           # relative paths live in work_dir
      - stage: tokenizer train
        data: prepared
        output: tokenizer
      - stage: train
        config: tiny               # optional: a shipped or relative TrainConfig YAML as the base
        data: shards
        output: run
        loop:
          max_steps: 200

Paths: the path-valued keys of a stage (its ``Path`` fields and the usual ``inputs``, ``data``,
``output``, ``tokenizer``, ``run``, ``runs`` ... keys) resolve against ``work_dir`` when
relative; ``{sample}`` is the bundled sample corpus (``pilelm/sample``) and ``{cwd}`` the
directory pilelm was started in. A stage without ``output`` writes to a default name in
``work_dir`` (``DEFAULT_OUTPUT``).

Overrides: ``pilelm run p.yaml train.loop.max_steps=10 tokenizer.vocab_size=512`` sets a key of
every stage of that kind; the section names are ``prepare``, ``tokenizer`` (the ``tokenizer
train`` stage), ``tokenize``, ``train``, ``eval``, ``generate``, ``export`` and ``finetune``. Nested keys
work as on the stage's own command line (``train.model.n_layer=2``).

Resume: before running a stage the runner builds its full config; if the output directory
already holds a manifest of that stage made from the same config (the manifest's own, or the
one the runner recorded in ``work_dir/pipeline_state.json`` when it ran the stage) and the
inputs the manifest lists still have the same hashes, the stage is skipped. Otherwise it runs again in the same directory (stages resume
their own unfinished work). A stage with a ``restart`` key (``train``) whose output was made,
or started, from another config or other inputs runs with ``restart=true``: it discards the
old run and trains anew, since resuming it would mix two configs. Stages without a manifest (``generate``) always run. Every key
of every stage is validated before the first one starts, so a typo fails in a second.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pilelm.core.atomic import atomic_write_json
from pilelm.core.config import ConfigError, _merge, _strip_optional, load_config, load_yaml, to_dict
from pilelm.core.manifest import MANIFEST, content_hash, read_manifest
from pilelm.core.report import StageResult, write_report
from pilelm.core.stages import COMMANDS, Command, resolve_config_path

log = logging.getLogger(__name__)

SAMPLE_DIR = Path(__file__).parent.parent / "sample"
PIPELINE_DIR = Path(__file__).parent.parent / "configs" / "pipelines"
DEMO_PIPELINE = PIPELINE_DIR / "demo.yaml"
# In the work dir: for each stage output the runner made, the config it planned and the hash
# of the manifest the stage wrote (see ``finished_output``).
STATE_FILE = "pipeline_state.json"

# Override section name -> stage command. `serve`, `run` and `demo` do not chain.
SECTIONS = {
    "prepare": "prepare",
    "tokenizer": "tokenizer train",
    "tokenize": "tokenize",
    "train": "train",
    "eval": "eval",
    "generate": "generate",
    "export": "export",
    "finetune": "finetune",
    "audit": "audit",
}
STAGE_SECTION = {v: k for k, v in SECTIONS.items()} | {"import": "import"}
DEFAULT_OUTPUT = {
    "prepare": "prepared",
    "tokenizer train": "tokenizer",
    "tokenize": "shards",
    "train": "run",
    "eval": "eval",
    "generate": "samples.jsonl",
    "export": "hf",
    "import": "run",
    "finetune": "finetune",
    "audit": "audit",
}
# Keys that hold paths even when a stage types them as plain strings.
PATH_KEYS = {"inputs", "input", "data", "output", "tokenizer", "run", "runs", "source", "prompt_file", "bleu_data",
             "val_data", "test_data", "canaries"}


@dataclass
class PipelineConfig:
    """``pilelm run PIPELINE.yaml [-o WORK_DIR] [section.key=value ...]``."""

    pipeline: Path | None = None
    """The pipeline YAML (work_dir + an ordered list of stages; see pilelm/core/runner.py), or the
    name of a shipped one (demo, tiny)."""
    output: Path | None = None
    """Work directory; overrides the pipeline's work_dir."""
    report: bool = True
    """Write report.md (+ loss.png) into the work directory when the stages are done."""
    prepare: dict[str, Any] = field(default_factory=dict)
    """Keys set on every `prepare` stage, e.g. prepare.filters.min_chars=100."""
    tokenizer: dict[str, Any] = field(default_factory=dict)
    """Keys set on every `tokenizer train` stage, e.g. tokenizer.vocab_size=4096."""
    tokenize: dict[str, Any] = field(default_factory=dict)
    """Keys set on every `tokenize` stage."""
    train: dict[str, Any] = field(default_factory=dict)
    """Keys set on every `train` stage, e.g. train.loop.max_steps=100 or train.model.n_layer=2."""
    eval: dict[str, Any] = field(default_factory=dict)
    """Keys set on every `eval` stage."""
    generate: dict[str, Any] = field(default_factory=dict)
    """Keys set on every `generate` stage, e.g. generate.max_new_tokens=64."""
    export: dict[str, Any] = field(default_factory=dict)
    """Keys set on every `export` stage."""
    finetune: dict[str, Any] = field(default_factory=dict)
    """Keys set on every `finetune` stage, e.g. finetune.loop.max_steps=100."""
    audit: dict[str, Any] = field(default_factory=dict)
    """Keys set on every `audit` stage, e.g. audit.candidates=200."""

    def overrides(self) -> dict[str, dict[str, Any]]:
        return {name: getattr(self, name) for name in SECTIONS if getattr(self, name)}


@dataclass
class DemoConfig(PipelineConfig):
    """``pilelm demo``: the shipped demo pipeline on the bundled sample corpus."""

    pipeline: Path | None = DEMO_PIPELINE
    """The demo pipeline (pilelm/configs/pipelines/demo.yaml)."""
    output: Path | None = Path("runs/demo")
    """Work directory of the demo (rerunning resumes finished stages)."""


@dataclass
class PlannedStage:
    """One stage of a pipeline with its fully resolved config."""

    index: int
    command: Command
    config: Any

    @property
    def name(self) -> str:
        return self.command.name

    @property
    def output(self) -> Path | None:
        out = getattr(self.config, "output", None)
        return Path(out) if out else None


@dataclass
class Pipeline:
    work_dir: Path
    stages: list[PlannedStage]
    source: Path | None = None


# --- building the plan ------------------------------------------------------------------


def _expand(value: str, work_dir: Path) -> str:
    text = value.replace("{sample}", str(SAMPLE_DIR)).replace("{cwd}", os.getcwd())
    path = Path(text).expanduser()
    return str(path if path.is_absolute() else work_dir / path)


def _path_keys(cls: type) -> set[str]:
    """Top-level fields of a stage config that hold paths (by type, or by conventional name)."""
    keys = set()
    for name, tp in typing.get_type_hints(cls).items():
        inner, _ = _strip_optional(tp)
        args = typing.get_args(inner)
        if inner is Path or (typing.get_origin(inner) in (list, tuple) and args and args[0] is Path):
            keys.add(name)
        elif name in PATH_KEYS and (inner is str or (args and args[0] is str)):
            keys.add(name)
    return keys


def _resolve_paths(data: dict[str, Any], cls: type, work_dir: Path) -> dict[str, Any]:
    out = dict(data)
    for key in _path_keys(cls) & out.keys():
        value = out[key]
        if isinstance(value, str) and value:
            out[key] = _expand(value, work_dir)
        elif isinstance(value, list | tuple):
            out[key] = [_expand(v, work_dir) if isinstance(v, str) and v else v for v in value]
    return out


def _base_yaml(name: str, pipeline_file: Path | None) -> Path:
    """A stage's `config:` base: a path relative to the pipeline file, or a shipped config."""
    if pipeline_file is not None and (pipeline_file.parent / name).is_file():
        return pipeline_file.parent / name
    return resolve_config_path(name)


def plan_pipeline(
    data: dict[str, Any],
    work_dir: Path | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    source: Path | None = None,
) -> Pipeline:
    """Validate a pipeline mapping and build every stage's config (nothing runs yet)."""
    where = str(source) if source else "pipeline"
    unknown = set(data) - {"work_dir", "stages"}
    if unknown:
        raise ConfigError(f"{where}: unknown top-level key(s) {sorted(unknown)}; valid: work_dir, stages")
    if work_dir is None:
        if not data.get("work_dir"):
            raise ConfigError(f"{where}: no work_dir; set `work_dir:` in the file or pass -o WORK_DIR")
        work_dir = Path(str(data["work_dir"])).expanduser()
    entries = data.get("stages")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{where}: `stages:` must be a non-empty list of {{stage: NAME, ...keys}}")
    overrides = dict(overrides or {})
    for section in overrides:
        if section not in SECTIONS:
            raise ConfigError(f"unknown override section {section!r}; valid: {', '.join(SECTIONS)}")
    used: set[str] = set()
    stages = []
    for i, entry in enumerate(entries, 1):
        if not isinstance(entry, dict) or "stage" not in entry:
            raise ConfigError(f"{where}: stage #{i} must be a mapping with a `stage:` key, got {entry!r}")
        entry = dict(entry)
        name = str(entry.pop("stage"))
        if name not in STAGE_SECTION:
            valid = ", ".join(repr(n) for n in STAGE_SECTION)
            raise ConfigError(f"{where}: stage #{i}: {name!r} cannot run in a pipeline; valid stages: {valid}")
        command = COMMANDS[name]
        cls, _ = command.load()
        section = STAGE_SECTION[name]
        if section in overrides:
            entry = _merge(entry, overrides[section])
            used.add(section)
        base = entry.pop("config", None)
        if "output" in {f.name for f in dataclasses.fields(cls)} and not entry.get("output"):
            entry["output"] = DEFAULT_OUTPUT[name]
        entry = _resolve_paths(entry, cls, work_dir)
        try:
            cfg = load_config(cls, _base_yaml(str(base), source) if base else None, entry)
        except ValueError as e:
            raise ConfigError(f"{where}: stage #{i} ({name}): {e}") from e
        stages.append(PlannedStage(i, command, cfg))
    unused = set(overrides) - used
    if unused:
        raise ConfigError(f"overrides for {sorted(unused)} given, but {where} has no such stage")
    return Pipeline(work_dir, stages, source)


def load_pipeline(
    path: str | Path, work_dir: Path | None = None, overrides: dict[str, dict[str, Any]] | None = None
) -> Pipeline:
    path = Path(path)
    return plan_pipeline(load_yaml(path), work_dir, overrides, source=path)


# --- running it -------------------------------------------------------------------------


def _normalised(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _read_state(work_dir: Path) -> dict[str, Any]:
    path = work_dir / STATE_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def finished_output(stage: PlannedStage, state: dict[str, Any] | None = None) -> bool:
    """True if the stage's output already holds its manifest for this exact config and inputs.

    The config matches when the manifest's equals the planned one, or when this runner made
    that very manifest (same hash) from the planned config: stages may write a more resolved
    config than they were given (train fills ``model.vocab_size=0`` from the shards).
    """
    out = stage.output
    if out is None or not (out / MANIFEST).is_file():
        return False
    try:
        manifest = read_manifest(out)
    except (OSError, json.JSONDecodeError):
        return False
    record = (state or {}).get(str(out), {})
    # This runner made that very manifest by running this stage (some stages name another in
    # their manifest: `finetune-contrastive` and `finetune --task sft` write a train run's).
    made_here = record.get("stage") == stage.name and record.get("manifest") == content_hash(out)
    if manifest.get("stage") not in (stage.name, stage.name.split()[0]) and not made_here:
        return False
    planned = _normalised(to_dict(stage.config))
    same_config = _normalised(manifest.get("config")) == planned or (made_here and record.get("config") == planned)
    if not same_config:
        log.info("%s: config changed since %s was written; running it again", stage.name, out)
        return False
    for item in manifest.get("inputs", []):
        path = Path(item.get("path", ""))
        if not path.exists() or content_hash(path) != item.get("hash"):
            log.info("%s: input %s changed since %s was written; running it again", stage.name, path, out)
            return False
    return True


def _needs_restart(stage: PlannedStage, planned: Any, state: dict[str, Any]) -> bool:
    """A stage that can restart (a ``restart`` key) and whose output holds work from another
    config or inputs: a finished output ``finished_output`` refused, or an unfinished one this
    runner started with another config."""
    out = stage.output
    if out is None or not out.exists() or "restart" not in {f.name for f in dataclasses.fields(stage.config)}:
        return False
    record = state.get(str(out))
    return (out / MANIFEST).is_file() or (record is not None and record.get("config") != planned)


def execute(pipeline: Pipeline) -> list[StageResult]:
    """Run (or skip, when finished) every stage in order; return what happened to each."""
    work_dir = pipeline.work_dir
    work_dir.mkdir(parents=True, exist_ok=True)
    state = _read_state(work_dir)
    results = []
    n = len(pipeline.stages)
    for stage in pipeline.stages:
        label = f"[{stage.index}/{n}] {stage.name}"
        if finished_output(stage, state):
            log.info("%s: already done in %s (same config and inputs); skipping", label, stage.output)
            results.append(StageResult(stage.name, stage.output, "skipped", 0.0))
            continue
        log.info("%s -> %s", label, stage.output or "(no output directory)")
        _, runner = stage.command.load()
        planned = _normalised(to_dict(stage.config))
        config = stage.config
        if _needs_restart(stage, planned, state):
            log.info("%s: %s was made from another config or other inputs; starting it anew", label, stage.output)
            config = dataclasses.replace(config, restart=True)
        if stage.output is not None:  # what this output is being made from, should the stage die
            state[str(stage.output)] = {"stage": stage.name, "config": planned, "manifest": None}
            atomic_write_json(work_dir / STATE_FILE, state)
        t0 = time.perf_counter()
        returned = runner(config)
        seconds = time.perf_counter() - t0
        out = stage.output or (Path(returned) if isinstance(returned, str | Path) else None)
        log.info("%s: done in %.1f s", label, seconds)
        results.append(StageResult(stage.name, out, "ran", seconds))
        if out is not None and (out / MANIFEST).is_file():
            state[str(out)] = {"stage": stage.name, "config": planned, "manifest": content_hash(out)}
            atomic_write_json(work_dir / STATE_FILE, state)
    return results


def run_stage(name: str, config: str | Path | None = None, **overrides: Any) -> Path:
    """Run the stage ``name`` with config keys ``overrides`` (``output`` among them) over the base
    YAML ``config`` (a file or a shipped name, like a pipeline entry's ``config:``) unless its
    output already holds the manifest of this exact config and inputs (``finished_output``, as
    ``pilelm run`` resumes): benchmarks and scripts chain stages this way. The output's parent
    is the work directory that keeps the record (``pipeline_state.json``); a changed key or
    input reruns the stage, and one with a ``restart`` key (train) then trains anew."""
    command = COMMANDS[name]
    cls, _ = command.load()
    base = resolve_config_path(str(config)) if config else None
    stage = PlannedStage(1, command, load_config(cls, base, overrides))
    if stage.output is None:
        raise ConfigError(f"run_stage({name!r}, ...) needs output=DIR: the output is what it reuses or makes")
    (result,) = execute(Pipeline(stage.output.parent, [stage]))
    return stage.output if result.output is None else result.output


def run_pipeline(cfg: PipelineConfig, title: str = "") -> Path:
    """Run a pipeline file; return the report path (or the work directory with report=false)."""
    if cfg.pipeline is None:
        raise ConfigError("pilelm run needs a pipeline file: pilelm run PIPELINE.yaml")
    path = Path(cfg.pipeline)
    if not path.is_file() and path.suffix == "" and (PIPELINE_DIR / f"{path.name}.yaml").is_file():
        path = PIPELINE_DIR / f"{path.name}.yaml"  # a shipped pipeline by name: `pilelm run tiny`
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in PIPELINE_DIR.glob("*.yaml")))
        raise ConfigError(f"pipeline file {path} does not exist (shipped pipelines: {shipped})")
    title = title or f"pilelm run {path.name}"
    pipeline = load_pipeline(path, cfg.output, cfg.overrides())
    t0 = time.perf_counter()
    results = execute(pipeline)
    log.info("%s finished in %.1f s (work dir %s)", title, time.perf_counter() - t0, pipeline.work_dir)
    if not cfg.report:
        return pipeline.work_dir
    report = write_report(pipeline.work_dir, results, title=title)
    log.info("report: %s", report)
    return report


def run_demo(cfg: DemoConfig) -> Path:
    """The whole road on the bundled sample: prepare -> tokenizer -> tokenize -> train -> eval
    -> generate -> report. Returns the report path."""
    return run_pipeline(cfg, title="pilelm demo")
