"""torchrun with 2 CPU processes (gloo) trains the same numbers as 1 process with the same
global batch: DDP and FSDP2."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import losses, make_shards, tiny_config

from pilelm.core.manifest import read_manifest
from pilelm.training import checkpoint
from pilelm.training.trainer import run_train

pytestmark = pytest.mark.dist
ROOT = Path(__file__).resolve().parents[2]
STEPS = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], nproc: int = 2) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", "--master_addr=127.0.0.1", "-m", "pilelm", "train", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


def common(data: Path, out: Path) -> list[str]:
    return [
        "--data", str(data), "-o", str(out),
        "model.n_layer=2", "model.n_head=2", "model.d_model=64", "model.block_size=32",
        "optim.lr=3e-3", "schedule.warmup_steps=2",
        f"loop.max_steps={STEPS}", "loop.micro_batch=4", "loop.log_every=1", "loop.eval_every=3",
        "loop.eval_windows=8", "loop.save_every=3", "loop.num_threads=1", "loop.precision=fp32",
        "loop.peak_flops=1e12", "loop.tensorboard=false",
    ]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    data = make_shards(root / "shards")
    # One process, two micro-batches of 4: the global batch of 2 ranks x 4.
    single = run_train(tiny_config(data, root / "single", **{
        "loop.max_steps": STEPS, "loop.tokens_per_step": 8 * 32, "loop.eval_every": 3, "loop.save_every": 3,
        "schedule.warmup_steps": 2}))
    return data, single, root


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(setup, strategy):
    data, single, root = setup
    out = root / strategy
    torchrun(common(data, out) + [f"loop.distributed={strategy}"])
    assert read_manifest(out)["extra"]["world"] == 2
    got, want = losses(out), losses(single)
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, STEPS + 1))
    for (_, a), (_, b) in zip(got, want, strict=True):
        assert a == pytest.approx(b, abs=1e-5)
    val = [json.loads(x).get("val_loss") for x in (out / "metrics.jsonl").read_text().splitlines()]
    val_single = [json.loads(x).get("val_loss") for x in (single / "metrics.jsonl").read_text().splitlines()]
    assert [v is not None for v in val] == [v is not None for v in val_single]
    for a, b in zip(val, val_single, strict=True):
        assert (a is None) or a == pytest.approx(b, abs=1e-5)
    # The saved (gathered) weights are the single-process weights.
    a = checkpoint.load_model(checkpoint.latest_checkpoint(out))[0].state_dict()
    b = checkpoint.load_model(checkpoint.latest_checkpoint(single))[0].state_dict()
    for k in a:
        assert (a[k] - b[k]).abs().max() < 1e-4, k
