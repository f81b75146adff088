"""Every shipped YAML config loads: training configs with TrainConfig, pipelines with the
runner (which builds every stage's config with that stage's class, so every key is checked)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pilelm.core.config import load_config
from pilelm.core.runner import DEMO_PIPELINE, PIPELINE_DIR, SAMPLE_DIR, load_pipeline
from pilelm.core.stages import CONFIG_DIR

TRAIN_CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
PIPELINES = sorted(PIPELINE_DIR.glob("*.yaml"))
# Keys through which a stage reads an earlier stage's output (or raw data).
INPUT_KEYS = ("inputs", "data", "tokenizer", "runs", "run", "source")


def test_shipped_configs_exist():
    assert DEMO_PIPELINE in PIPELINES and len(PIPELINES) >= 2
    assert all(p.suffix == ".yaml" for p in TRAIN_CONFIGS)


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_train_config_loads(path):
    from pilelm.training.trainer import TrainConfig

    cfg = load_config(TrainConfig, path)
    assert isinstance(cfg, TrainConfig)


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_pipeline_loads_and_chains(path, tmp_path):
    """Each stage's config is valid, and each input is the output of an earlier stage (or the
    bundled sample), so the chain is wired before anything runs."""
    pipeline = load_pipeline(path, work_dir=tmp_path)
    assert pipeline.stages
    produced: set[Path] = set()
    for stage in pipeline.stages:
        for key in INPUT_KEYS:
            value = getattr(stage.config, key, None) if key != "tokenizer" or stage.name == "tokenize" else None
            for item in value if isinstance(value, list | tuple) else [value]:
                if not item:
                    continue
                p = Path(item)
                assert p in produced or p.is_relative_to(SAMPLE_DIR), (
                    f"{path.name}: stage {stage.name} reads {p}, which no earlier stage writes")
        if stage.output is not None:
            assert stage.output.is_relative_to(tmp_path), f"{stage.name} writes outside the work dir"
            produced.add(stage.output)


def test_demo_runs_on_the_bundled_sample_only(tmp_path):
    """`pilelm demo` must not need ../shared (or anything outside the package) at run time."""
    stages = load_pipeline(DEMO_PIPELINE, work_dir=tmp_path).stages
    assert [s.name for s in stages] == ["prepare", "tokenizer train", "tokenize", "train", "eval", "finetune", "generate"]
    inputs = [Path(p) for p in stages[0].config.inputs]
    assert inputs and all(p.is_relative_to(SAMPLE_DIR) and p.exists() for p in inputs)


def test_demo_states_every_filter_rule_group(tmp_path):
    """The demo's data must not change when a rule group's default does (a new default rule
    once dropped licence texts from the demo's train split and moved its test BPB): its
    prepare stage sets every rule group (a field with a ``<group>_skip`` list) that is on by
    default explicitly."""
    import dataclasses

    import yaml

    from pilelm.data.filters import FilterConfig

    names = {f.name for f in dataclasses.fields(FilterConfig)}
    defaults = FilterConfig()
    on = {n for n in names if f"{n}_skip" in names and getattr(defaults, n)}
    assert {"gopher_quality", "gopher_repetition", "c4", "light"} <= on
    prepare = next(s for s in yaml.safe_load(DEMO_PIPELINE.read_text())["stages"] if s["stage"] == "prepare")
    assert on <= set(prepare["filters"]), f"demo.yaml's prepare leaves {on - set(prepare['filters'])} at default"
    stage = load_pipeline(DEMO_PIPELINE, work_dir=tmp_path).stages[0]
    assert stage.config.filters.light == []
