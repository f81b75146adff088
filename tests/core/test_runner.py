"""The pipeline runner and the report, on two fake stages (fast, no torch): planning, path
resolution, overrides, resume, and the report's tables and loss curve."""

from __future__ import annotations

import dataclasses
import json
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pilelm.core import cli, stages
from pilelm.core.config import ConfigError, load_config
from pilelm.core.manifest import read_manifest, require_stage, write_manifest
from pilelm.core.report import StageResult, write_report
from pilelm.core.runner import SAMPLE_DIR, PipelineConfig, execute, load_pipeline, plan_pipeline, run_stage

CALLS: list[str] = []


@dataclass
class FakePrepareConfig:
    inputs: list[Path] = field(default_factory=list)
    """Raw inputs."""
    output: Path = Path("prepared")
    """Output dir."""
    lowercase: bool = False
    """Lowercase the text."""


def run_fake_prepare(cfg: FakePrepareConfig) -> Path:
    CALLS.append("prepare")
    text = "".join(Path(p).read_text() for p in cfg.inputs)
    Path(cfg.output).mkdir(parents=True, exist_ok=True)
    (Path(cfg.output) / "docs.txt").write_text(text.lower() if cfg.lowercase else text)
    write_manifest(cfg.output, "prepare", cfg, inputs=cfg.inputs, counts={"documents": len(cfg.inputs)})
    return Path(cfg.output)


@dataclass
class Optim:
    lr: float = 1e-3
    """Learning rate."""


@dataclass
class FakeTrainConfig:
    data: str = ""
    """Prepared dir (typed str on purpose: path keys are found by name too)."""
    output: str = ""
    """Run dir."""
    max_steps: int = 4
    """Steps."""
    vocab_size: int = 0
    """0 = resolved from the data (the manifest records the resolved value)."""
    optim: Optim = field(default_factory=Optim)
    """Optimizer."""

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")


def run_fake_train(cfg: FakeTrainConfig) -> Path:
    CALLS.append("train")
    require_stage(cfg.data, "prepare")
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"step": s, "loss": 5.0 / s, "tokens": 64 * s} for s in range(1, cfg.max_steps + 1)]
    rows[-1] |= {"val_loss": 1.5, "val_bpb": 1.1}
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    resolved = dataclasses.replace(cfg, vocab_size=cfg.vocab_size or 100)
    write_manifest(out, "train", resolved, inputs=[cfg.data], counts={"steps": cfg.max_steps})
    return out


@pytest.fixture
def fake_stages(monkeypatch):
    mod = types.ModuleType("_pilelm_fake_stages")
    for obj in (FakePrepareConfig, run_fake_prepare, FakeTrainConfig, run_fake_train):
        setattr(mod, obj.__name__, obj)
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setitem(stages.COMMANDS, "prepare", stages.Command(
        "prepare", mod.__name__, "FakePrepareConfig", "run_fake_prepare", "fake", ("inputs",)))
    monkeypatch.setitem(stages.COMMANDS, "train", stages.Command(
        "train", mod.__name__, "FakeTrainConfig", "run_fake_train", "fake",
        report=stages.COMMANDS["train"].report))  # the real train's report section
    CALLS.clear()
    return mod


def _pipeline_file(tmp_path: Path, raw: Path) -> Path:
    p = tmp_path / "p.yaml"
    p.write_text(
        "work_dir: ignored\n"
        "stages:\n"
        f"  - stage: prepare\n    inputs: ['{raw}']\n"
        "  - stage: train\n    data: prepared\n    max_steps: 3\n"
    )
    return p


def test_plan_resolves_paths_defaults_and_overrides(fake_stages, tmp_path):
    data = {
        "work_dir": str(tmp_path / "w"),
        "stages": [
            {"stage": "prepare", "inputs": ["{sample}/val.jsonl.zst", "/abs/x.jsonl"], "output": "prep"},
            {"stage": "train", "data": "prep", "max_steps": 2},
        ],
    }
    plan = plan_pipeline(data, overrides={"train": {"max_steps": 7, "optim": {"lr": 0.5}}})
    prep, train = (s.config for s in plan.stages)
    assert prep.inputs == [SAMPLE_DIR / "val.jsonl.zst", Path("/abs/x.jsonl")]
    assert prep.output == tmp_path / "w" / "prep"
    assert train.data == str(tmp_path / "w" / "prep")
    assert train.output == str(tmp_path / "w" / "run")  # default output name inside work_dir
    assert train.max_steps == 7 and train.optim.lr == 0.5
    # -o replaces work_dir
    plan = plan_pipeline(data, work_dir=tmp_path / "other")
    assert plan.stages[1].config.output == str(tmp_path / "other" / "run")


@pytest.mark.parametrize(
    ("data", "overrides", "match"),
    [
        ({"stages": [{"stage": "prepare"}]}, None, "no work_dir"),
        ({"work_dir": "w", "stage": []}, None, "unknown top-level"),
        ({"work_dir": "w", "stages": []}, None, "non-empty list"),
        ({"work_dir": "w", "stages": [{"stage": "serve"}]}, None, "cannot run in a pipeline.*'prepare'"),
        ({"work_dir": "w", "stages": [{"stage": "prepare", "lowercas": True}]}, None,
         r"stage #1 \(prepare\).*'lowercas'.*lowercase"),
        ({"work_dir": "w", "stages": [{"stage": "train", "max_steps": 0}]}, None, "max_steps must be >= 1"),
        ({"work_dir": "w", "stages": [{"stage": "prepare"}]}, {"train": {"max_steps": 2}}, "has no such stage"),
        ({"work_dir": "w", "stages": [{"stage": "prepare"}]}, {"trian": {"x": 1}}, "unknown override section"),
        ({"work_dir": "w", "stages": [{"stage": "train", "optim": {"lrr": 1}}]}, None, "optim.lr"),
    ],
)
def test_plan_errors_name_the_problem(fake_stages, data, overrides, match):
    with pytest.raises(ConfigError, match=match):
        plan_pipeline(data, overrides=overrides)


def test_resume_skips_finished_stages_and_reruns_changed_ones(fake_stages, tmp_path):
    raw = tmp_path / "raw.txt"
    raw.write_text("Hello\n")
    pfile = _pipeline_file(tmp_path, raw)
    work = tmp_path / "work"
    statuses = [r.status for r in execute(load_pipeline(pfile, work))]
    assert statuses == ["ran", "ran"] and CALLS == ["prepare", "train"]
    # train's manifest holds a more resolved config than planned (vocab_size 0 -> 100): the
    # runner's own record of what it planned still lets it resume.
    assert [r.status for r in execute(load_pipeline(pfile, work))] == ["skipped", "skipped"]
    assert CALLS == ["prepare", "train"]
    # A changed key reruns that stage only ...
    execute(load_pipeline(pfile, work, {"train": {"max_steps": 5}}))
    assert CALLS[2:] == ["train"]
    # ... a changed input reruns its reader, whose new manifest reruns the next stage.
    raw.write_text("Changed\n")
    execute(load_pipeline(pfile, work, {"train": {"max_steps": 5}}))
    assert CALLS[3:] == ["prepare", "train"]
    assert (work / "prepared" / "docs.txt").read_text() == "Changed\n"


def test_run_stage_reuses_an_output_only_for_the_same_config_and_inputs(fake_stages, tmp_path, monkeypatch):
    """Benchmarks chain stages with ``run_stage``: a finished output is reused only when its
    manifest's config and input hashes match (the pipeline's own check), never by folder name."""
    raw = tmp_path / "raw.txt"
    raw.write_text("Hello\n")
    work = tmp_path / "work"
    prep = run_stage("prepare", inputs=[str(raw)], output=str(work / "prep"))
    assert prep == work / "prep" and CALLS == ["prepare"]
    assert run_stage("prepare", inputs=[str(raw)], output=str(work / "prep")) == prep and CALLS == ["prepare"]
    # train records a more resolved config (vocab_size 0 -> 100): the record of what was asked still matches.
    run = run_stage("train", data=str(prep), output=str(work / "run"), max_steps=3)
    run_stage("train", data=str(prep), output=str(work / "run"), max_steps=3)
    assert CALLS == ["prepare", "train"]
    # A changed key reruns the stage (a 5-step request never gets the cached 3-step run) ...
    run_stage("train", data=str(prep), output=str(work / "run"), max_steps=5)
    assert CALLS[2:] == ["train"] and read_manifest(run)["counts"]["steps"] == 5
    # ... and so does a changed input, or a manifest of another config it did not make.
    raw.write_text("Changed\n")
    run_stage("prepare", inputs=[str(raw)], output=str(work / "prep"))
    assert CALLS[3:] == ["prepare"] and (prep / "docs.txt").read_text() == "Changed\n"
    other = tmp_path / "elsewhere" / "prep"
    run_fake_prepare(FakePrepareConfig(inputs=[raw], output=other, lowercase=True))
    run_stage("prepare", inputs=[str(raw)], output=str(other))
    assert CALLS[4:] == ["prepare", "prepare"] and (other / "docs.txt").read_text() == "Changed\n"
    # A stage whose manifest names another stage (finetune-contrastive writes a train run's) is
    # reused when this runner made it.
    monkeypatch.setitem(stages.COMMANDS, "finetune-contrastive", dataclasses.replace(
        stages.COMMANDS["train"], name="finetune-contrastive"))
    for _ in range(2):
        run_stage("finetune-contrastive", data=str(prep), output=str(work / "ft"), max_steps=2)
    assert CALLS[6:] == ["train"]
    # A base YAML (a pipeline entry's `config:`) is part of the config: editing it reruns.
    base = tmp_path / "base.yaml"
    for steps in (2, 2, 6):
        base.write_text(f"max_steps: {steps}\n")
        run_stage("train", config=base, data=str(prep), output=str(work / "based"))
    assert CALLS[7:] == ["train", "train"] and read_manifest(work / "based")["counts"]["steps"] == 6


def test_cli_run_with_dotted_overrides_writes_report(fake_stages, tmp_path, capsys):
    raw = tmp_path / "raw.txt"
    raw.write_text("Hello\n")
    pfile = _pipeline_file(tmp_path, raw)
    work = tmp_path / "work"
    code = cli.main(["run", str(pfile), "-o", str(work), "train.max_steps=6", "prepare.lowercase=true"])
    assert code == 0
    assert capsys.readouterr().out.strip() == str(work / "report.md")
    assert (work / "prepared" / "docs.txt").read_text() == "hello\n"
    assert len((work / "run" / "metrics.jsonl").read_text().splitlines()) == 6
    report = (work / "report.md").read_text()
    assert "`prepare`" in report and "`train`" in report and "![loss curve](loss.png)" in report
    assert (work / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A typo in an override is an error listing the valid keys, before any stage runs.
    CALLS.clear()
    assert cli.main(["run", str(pfile), "-o", str(work), "train.max_stepz=6"]) != 0
    assert "max_steps" in capsys.readouterr().err and CALLS == []
    assert load_config(PipelineConfig, overrides=["train.optim.lr=0.1"]).train == {"optim": {"lr": 0.1}}


def test_report_bpb_table_has_unigram_beside_each_component(tmp_path):
    run, ev = tmp_path / "run", tmp_path / "eval"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 6 - s / 10, "tokens": 100 * s}) + "\n" for s in range(1, 30))
        + "{truncated line\n"
    )
    write_manifest(run, "train", {"model": {"n_layer": 2, "d_model": 64}})
    ev.mkdir()

    def entry(bpb: float, nbytes: int = 1000, tokens: int = 400) -> dict:
        return {"bpb": bpb, "bytes": nbytes, "tokens": tokens, "nll": 0.0, "ppl_token": 0.0}

    results = {
        "runs": {"run": {"overall": entry(1.5, 3000), "components": {"ArXiv": entry(1.2), "Github": entry(1.8)}}},
        "baselines": {"unigram": {"overall": entry(3.0, 3000),
                                  "components": {"ArXiv": entry(2.4), "Github": entry(3.6)}}},
    }
    (ev / "results.json").write_text(json.dumps(results))
    write_manifest(ev, "eval", {})
    out = write_report(tmp_path, [StageResult("train", run, "ran", 1.0), StageResult("eval", ev, "skipped", 0.0)])
    text = out.read_text()
    assert "| ArXiv | 1,000 | 1.200 | 2.400 | 0.50 |" in text
    assert "| Github | 1,000 | 1.800 | 3.600 | 0.50 |" in text
    assert "| **overall** | 3,000 | 1.500 | 3.000 | 0.50 |" in text
    assert "run BPB 1.500, unigram baseline BPB 3.000" in text
    assert (tmp_path / "loss.png").stat().st_size > 1000
