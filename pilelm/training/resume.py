"""Resume only what was started: a run directory continues with the config and data it began
with, or not at all.

A run records what it was started from: ``RUN/config.yaml`` (the resolved config) and
``RUN/inputs.json`` (the content hash of its token shards, ``pilelm.core.manifest.content_hash``).
Before resuming from a checkpoint (finished or not), the trainer compares the new config and
data with those; any difference that changes what is trained (optimizer, model, data, seed,
batching ...) is refused with an error naming each difference, the fix being ``--restart``
(discard the old run and train anew in the same directory) or a new ``-o``. Keys that change
only how long or how visibly the run goes on (``RESUME_NEUTRAL``) may differ: raising
``loop.max_steps`` trains on, as documented.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from pilelm.core.atomic import atomic_write_json
from pilelm.core.config import to_dict
from pilelm.core.manifest import MANIFEST, content_hash
from pilelm.training.checkpoint import CHECKPOINTS

log = logging.getLogger(__name__)

INPUTS_FILE = "inputs.json"
CONFIG_FILE = "config.yaml"
# What a run may change between resumes: where and whether to resume, how far to train, and
# how often to log, evaluate and save. Everything else shapes the weights.
RESUME_NEUTRAL = frozenset({
    "data",  # the shards are compared by content hash (a moved shard dir is the same data)
    "output", "resume", "restart",
    "loop.max_steps", "loop.stop_at_step", "loop.eval_every", "loop.eval_windows", "loop.save_every",
    "loop.keep_last", "loop.log_every", "loop.num_threads", "loop.peak_flops", "loop.tensorboard", "loop.trackers",
    "loop.compile",
})
# What --restart (and any stage writing a new model into a used directory) removes, the
# manifest first: from then on the directory reads as unfinished, so a stop part-way never
# leaves an old manifest vouching for what is left. hardware.json, a measurement of the
# machine, stays.
RUN_STATE = (MANIFEST, CHECKPOINTS, "tokenizer", "metrics.jsonl", "tensorboard", CONFIG_FILE, INPUTS_FILE)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def config_differences(old: dict[str, Any], new: dict[str, Any],
                       neutral: frozenset[str] = RESUME_NEUTRAL) -> list[str]:
    """``key: old -> new`` for every key outside ``neutral`` that differs."""
    a = _flatten(json.loads(json.dumps(old, default=str)))
    b = _flatten(json.loads(json.dumps(new, default=str)))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a.keys() | b.keys())
            if k not in neutral and a.get(k) != b.get(k)]


def data_identity(data: str | Path) -> dict[str, str]:
    return {"path": str(data), "hash": content_hash(data)}


def record_input_files(run_dir: Path, inputs: dict[str, list[str]]) -> None:
    """Write ``RUN/inputs.json`` with the content hash of every input file, by role (a
    fine-tune's ``data``, ``val_data``, ``test_data``), when a run starts from scratch."""
    atomic_write_json(run_dir / INPUTS_FILE, {k: [data_identity(p) for p in paths] for k, paths in inputs.items()})


def input_file_differences(run_dir: Path, inputs: dict[str, list[str]]) -> list[str]:
    """``ROLE: ...`` for every role of ``inputs`` whose files' contents differ from those
    recorded by ``record_input_files`` (names may change: a moved file is the same data)."""
    path = run_dir / INPUTS_FILE
    if not path.is_file():
        log.info("%s has no %s (an older run): its data cannot be compared", run_dir, INPUTS_FILE)
        return []
    recorded = json.loads(path.read_text())
    problems = []
    for role, paths in inputs.items():
        old = recorded.get(role, [])
        if not isinstance(old, list):
            continue
        new = [data_identity(p) for p in paths]
        if [o.get("hash") for o in old] != [n["hash"] for n in new]:
            changed = [f"{o['path']} ({o['hash'][:12]}) -> {n['path']} ({n['hash'][:12]})"
                       for o, n in zip(old, new, strict=False) if o.get("hash") != n["hash"]]
            if len(old) != len(new):
                changed.append(f"{len(old)} files -> {len(new)}")
            problems.append(f"{role}: the contents changed: {'; '.join(changed)}")
    return problems


def record_run_inputs(run_dir: Path, data: str | Path) -> None:
    """Write ``RUN/inputs.json`` when a run starts from scratch."""
    atomic_write_json(run_dir / INPUTS_FILE, {"data": data_identity(data)})


def saved_config_differences(saved: Path, cfg: Any, neutral: frozenset[str] = RESUME_NEUTRAL) -> list[str]:
    """``config_differences`` between the config recorded in the YAML file ``saved`` and ``cfg``
    (a config dataclass); none when nothing was recorded."""
    import yaml

    if not saved.is_file():
        return []
    return config_differences(yaml.safe_load(saved.read_text()) or {}, to_dict(cfg), neutral)


def refuse_resume(where: Path, what: str, problems: list[str], fix: str) -> None:
    """Raise ValueError listing ``problems`` (one per line) if there are any: ``where`` holds
    ``what`` (a run started otherwise), which cannot be resumed; ``fix`` says what to do."""
    if problems:
        listed = "\n  ".join(problems)
        raise ValueError(f"{where} holds {what}, so it cannot be resumed:\n  {listed}\n{fix}")


def resume_differences(run_dir: Path, cfg: Any) -> list[str]:
    """What differs between the run in ``run_dir`` and resuming it with ``cfg`` (resolved)."""
    problems = saved_config_differences(run_dir / CONFIG_FILE, cfg)
    inputs_path = run_dir / INPUTS_FILE
    if inputs_path.is_file():
        old_data = json.loads(inputs_path.read_text()).get("data", {})
        new_data = data_identity(cfg.data)
        if old_data.get("hash") != new_data["hash"]:
            problems.append(f"data: the token shards changed ({old_data.get('path')} was {old_data.get('hash')}, "
                            f"{new_data['path']} is {new_data['hash']})")
    else:
        log.info("%s has no %s (an older run): its data cannot be compared", run_dir, INPUTS_FILE)
    return problems


def require_same_run(run_dir: Path, cfg: Any) -> None:
    """Raise ValueError naming each difference if ``cfg`` is not the config and data of the run
    in ``run_dir`` (see the module docstring)."""
    refuse_resume(run_dir, "a run started with another config or other data", resume_differences(run_dir, cfg),
                  f"Rerun with --restart to discard it and train anew there, give a new -o, or rerun with the "
                  f"run's own {CONFIG_FILE} to continue it")


def discard_run(run_dir: str | Path, why: str = "--restart") -> None:
    """Remove a run's manifest (first), checkpoints, tokenizer, metrics and recorded config/inputs:
    ``--restart``, a fresh start, or a stage that writes a new model into a used directory, so no
    loader can pair an old run's checkpoint with the new run's tokenizer or manifest."""
    run_dir = Path(run_dir)
    found = []
    for name in RUN_STATE:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        found.append(name)
    if found:
        log.info("%s: discarded the previous run's %s (%s)", run_dir, ", ".join(found), why)


def require_separate_output(source: str | Path, out: str | Path, what: str) -> None:
    """Refuse an output that is ``source``: writing there would discard ``what``."""
    if Path(source).resolve() == Path(out).resolve():
        raise ValueError(f"output {out} is {what}; writing there would discard it: give another -o")
