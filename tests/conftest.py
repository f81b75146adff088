"""Shared fixtures. Tests are offline and deterministic; torch uses the machine's 2 cores."""

from __future__ import annotations

import contextlib
import functools
import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import zstandard

ROOT = Path(__file__).resolve().parents[1]
MINIPILE = ROOT.parent / "shared" / "minipile"


def write_pile_shard(path: Path, docs: list[dict]) -> Path:
    """Write records as a streaming-compressed .jsonl.zst (no content size in the frame, like the Pile)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with zstandard.ZstdCompressor().stream_writer(buf, closefd=False) as w:
        for d in docs:
            w.write((json.dumps(d, ensure_ascii=False) + "\n").encode("utf-8"))
    path.write_bytes(buf.getvalue())
    return path


def read_pile_shard(path: Path) -> list[dict]:
    with open(path, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as r:
        return [json.loads(line) for line in io.TextIOWrapper(r, encoding="utf-8") if line.strip()]


@pytest.fixture(scope="session", autouse=True)
def _encoder_proof_cache(tmp_path_factory):
    """Passed encoder probes are remembered in a cache of this session's own, never the user's."""
    import os

    from pilelm.tokens.encoders import PROOF_CACHE_ENV

    saved = os.environ.get(PROOF_CACHE_ENV)
    os.environ[PROOF_CACHE_ENV] = str(tmp_path_factory.mktemp("pilelm_cache"))
    yield
    if saved is None:
        os.environ.pop(PROOF_CACHE_ENV, None)
    else:
        os.environ[PROOF_CACHE_ENV] = saved


@pytest.fixture(scope="session")
def minipile() -> Path:
    """The shared real corpus in the Pile layout (../shared/minipile)."""
    if not (MINIPILE / "val.jsonl.zst").is_file():
        pytest.skip("../shared/minipile is not present")
    return MINIPILE


# --- Native bf16: CI's CPUs differ (AVX512-BF16, AMX, or none) ---------------------------

NATIVE_BF16_REASON = ("this CPU has no native bf16 (AVX512-BF16 or AMX), so training refuses "
                      "loop.precision=bf16 and bf16-autocast (pilelm.models.dtypes.bf16_native)")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """The product's own test (``pilelm.models.dtypes.bf16_native``) on this machine's CPU."""
    import torch

    from pilelm.models.dtypes import bf16_native

    return bf16_native(torch.device("cpu"))


def pytest_configure(config):
    config.addinivalue_line("markers", "native_bf16: needs a CPU with native bf16; skipped (with the "
                                       "reason) where pilelm refuses bf16 training")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    # Evaluated only for marked tests, so collecting the suite does not import torch.
    if item.get_closest_marker("native_bf16") is not None and not cpu_has_native_bf16():
        pytest.skip(NATIVE_BF16_REASON)


# --- A tiny trained run directory (serve, generate, demo and eval tests can share it) ---------

TINY_TEXTS = [
    "the quick brown fox jumps over the lazy dog.",
    "pack my box with five dozen liquor jugs.",
    "a café in Zürich serves crème brûlée to naïve visitors.",
    "世界 你好 — 日本語のテキスト と 한국어 텍스트",
    "emoji 🎉 rocket 🚀 sparkles ✨ and more text",
]


def make_tiny_run(
    run_dir: Path,
    *,
    arch: str = "gpt2",
    n_layer: int = 2,
    n_head: int = 2,
    d_model: int = 64,
    block_size: int = 128,
    vocab_size: int = 320,
    train_steps: int = 0,
    seed: int = 0,
    model_options: dict | None = None,
    special_tokens: tuple[str, ...] = ("<|endoftext|>",),
) -> Path:
    """Build a run directory (``pilelm train`` layout) holding a tiny GPT and a byte-level BPE
    tokenizer trained on ``TINY_TEXTS``. ``train_steps`` > 0 fits the model to those texts
    with AdamW so greedy decoding reproduces them (``"the quick" -> " brown fox ..."``).
    ``model_options`` are more GPTConfig fields (``{"norm": "rmsnorm", ...}``);
    ``special_tokens`` take the first ids (add ``"<|padding|>"`` for pilelm's own BPE layout)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from pilelm.core import manifest
    from pilelm.models.gpt import GPT, GPTConfig
    from pilelm.training import checkpoint

    run_dir = Path(run_dir)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TINY_TEXTS * 4, trainer=trainer)
    (run_dir / "tokenizer").mkdir(parents=True, exist_ok=True)
    tok.save(str(run_dir / "tokenizer" / "tokenizer.json"))

    torch.manual_seed(seed)
    cfg = GPTConfig(arch=arch, vocab_size=tok.get_vocab_size(), n_layer=n_layer, n_head=n_head,
                    d_model=d_model, block_size=block_size, **(model_options or {}))
    model = GPT(cfg)
    if train_steps:
        eod = tok.token_to_id("<|endoftext|>")
        stream: list[int] = []
        for text in TINY_TEXTS:
            stream += tok.encode(text).ids + [eod]
        data = torch.tensor(stream * (2 * block_size // len(stream) + 2))
        opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
        T = min(block_size, 64)
        gen = torch.Generator().manual_seed(seed)
        # One intra-op thread: a model this small gains nothing from more, and two threads on a
        # busy 2-core machine spin-wait each other (10x slower measured here).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for _ in range(train_steps):
                starts = torch.randint(0, len(data) - T - 1, (16,), generator=gen)
                x = torch.stack([data[s : s + T] for s in starts])
                y = torch.stack([data[s + 1 : s + T + 1] for s in starts])
                _, loss = model(x, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        finally:
            torch.set_num_threads(threads)
    model.eval()
    ckpt = run_dir / "checkpoints" / checkpoint.step_dir_name(max(train_steps, 1))
    checkpoint.save_model(ckpt, model, cfg)
    checkpoint.mark_complete(ckpt)
    manifest.write_manifest(run_dir, "train", {"model": {"arch": arch}}, counts={"steps": train_steps})
    return run_dir


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A tiny GPT-2 run fitted to ``TINY_TEXTS`` (about a second to build, once per session)."""
    return make_tiny_run(tmp_path_factory.mktemp("tiny_run") / "run", train_steps=100)


# --- Retrieval: a small corpus and an index of it (tests/retrieval) -------------------------

RETRIEVAL_COMPONENTS = ["Wikipedia (en)", "Pile-CC", "Wikipedia (en)", "Github", "Pile-CC"]


def retrieval_corpus() -> list[dict]:
    """Ten documents (two per tiny text, in different surroundings) and one empty one."""
    docs = []
    for i, (text, comp) in enumerate(zip(TINY_TEXTS, RETRIEVAL_COMPONENTS, strict=True)):
        docs.append({"text": f"{text} {text}", "meta": {"pile_set_name": comp}})
        docs.append({"text": f"note {i}: {text}\n\n{TINY_TEXTS[(i + 1) % len(TINY_TEXTS)]}",
                     "meta": {"pile_set_name": comp}})
    docs.append({"text": "", "meta": {"pile_set_name": "Pile-CC"}})
    return docs


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    return write_pile_shard(tmp_path_factory.mktemp("corpus") / "docs.jsonl.zst", retrieval_corpus())


@pytest.fixture(scope="session")
def tiny_index(tiny_run, corpus_file, tmp_path_factory) -> Path:
    """An exact (flat) index of ``corpus_file`` by ``tiny_run``: 24-token chunks every 16 tokens."""
    from pilelm.core import cli

    out = tmp_path_factory.mktemp("index") / "idx"
    argv = ["embed", str(tiny_run), "--data", str(corpus_file), "-o", str(out),
            "--chunk-tokens", "24", "--chunk-stride", "16", "--part-docs", "3"]
    assert cli.main(argv) == 0
    return out


# --- Serving (tests/serve) --------------------------------------------------------------------

# A chat template that passes the messages' words through, so the fitted tiny model recites its
# text in a chat reply ("the quick" -> " brown fox ...").
PASS_THROUGH_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"


@pytest.fixture(scope="session")
def chat_template_run(tiny_run, tmp_path_factory) -> Path:
    """``tiny_run`` with ``PASS_THROUGH_TEMPLATE`` in its tokenizer_config.json."""
    import shutil

    from pilelm.tokens.tokenizer import load_tokenizer

    run = tmp_path_factory.mktemp("chat_run") / "run"
    shutil.copytree(tiny_run, run)
    load_tokenizer(run / "tokenizer").save(run / "tokenizer")
    config_path = run / "tokenizer" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "chat_template": PASS_THROUGH_TEMPLATE}))
    return run


@contextlib.contextmanager
def serving(run: Path, api_key: str | None = None, **config):
    """``pilelm serve RUN`` on a free loopback port from this process: yields its url, engine,
    tokenizer and an httpx client that sends the key."""
    import httpx

    from pilelm.serve import BackgroundServer, ServeConfig, create_app, load_engine

    cfg = ServeConfig(run=str(run), api_key=api_key, **config)
    engine = load_engine(cfg)
    engine.start()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with BackgroundServer(create_app(engine, cfg)) as srv, \
                httpx.Client(base_url=srv.url, headers=headers, timeout=60) as http:
            yield SimpleNamespace(url=srv.url, engine=engine, tok=engine.tokenizer, http=http)
    finally:
        engine.stop()


LM_EVAL_ASSETS = ROOT / "tests" / "assets" / "lm_eval"


def lm_eval_tiny_task(tmp_path: Path):
    """A TaskManager holding only the tiny multiple-choice task of tests/assets/lm_eval, its
    data path made absolute and its datasets cache under ``tmp_path`` (offline)."""
    import yaml
    from lm_eval.tasks import TaskManager

    task = yaml.safe_load((LM_EVAL_ASSETS / "pilelm_tiny.yaml").read_text())
    task["dataset_kwargs"]["data_files"]["test"] = str(LM_EVAL_ASSETS / "pilelm_tiny.jsonl")  # not cwd-relative
    task["dataset_kwargs"]["cache_dir"] = str(tmp_path / "datasets")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "pilelm_tiny.yaml").write_text(yaml.safe_dump(task))
    return TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)


def assert_lm_eval_matches_a_plain_forward(results: dict, run: Path) -> None:
    """lm_eval's log-likelihoods of the tiny task equal those of one plain forward of ``run``'s
    model, split as lm_eval splits (encode context + continuation whole, the continuation is
    the rest), and its accuracy is the one those give."""
    import torch

    from pilelm.tokens.tokenizer import load_tokenizer
    from pilelm.training.checkpoint import load_for_inference

    samples = results["samples"]["pilelm_tiny"]
    docs = [json.loads(line) for line in (LM_EVAL_ASSETS / "pilelm_tiny.jsonl").read_text().splitlines()]
    assert len(samples) == len(docs)
    model, _, tok_dir = load_for_inference(run)
    tok = load_tokenizer(tok_dir)
    correct = 0
    for sample in samples:
        doc = sample["doc"]
        ours = []
        for choice in doc["choices"]:
            ctx = tok.encode(doc["context"])
            whole = tok.encode(doc["context"] + " " + choice)
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole[:-1]]))[0][0].double(), -1)
            ours.append(sum(logp[j - 1, whole[j]].item() for j in range(len(ctx), len(whole))))
        theirs = [ll for ll, _ in sample["filtered_resps"]]
        assert theirs == pytest.approx(ours, abs=1e-3)
        correct += int(max(range(len(ours)), key=ours.__getitem__) == doc["label"])
    assert results["results"]["pilelm_tiny"]["acc,none"] == pytest.approx(correct / len(docs))


@pytest.fixture(scope="session")
def tiny_shards(tiny_run, tmp_path_factory) -> Path:
    """Token shards (train, val) of ``TINY_TEXTS`` in the tiny run's tokenizer, for training
    runs that start from or learn from ``tiny_run`` (distillation, recovery fine-tunes)."""
    from pilelm.core.manifest import write_manifest
    from pilelm.tokens.tokenize import TokenizeConfig, run_tokenize

    root = tmp_path_factory.mktemp("tiny_shards")
    for split, copies in (("train", 40), ("val", 4)):
        docs = [{"text": t, "meta": {"pile_set_name": "Pile-CC"}} for t in TINY_TEXTS * copies]
        write_pile_shard(root / "prep" / split / "00.jsonl.zst", docs)
    write_manifest(root / "prep", "prepare", {})
    return run_tokenize(TokenizeConfig(data=root / "prep", tokenizer=tiny_run / "tokenizer",
                                       output=root / "shards", workers=1))


# --- Fine-tuned heads of the tiny run (tests/finetune/test_predict.py, tests/serve) ------------

HEAD_WORDS = {"fruit": "apple banana cherry grape melon".split(), "animal": "zebra lion tiger horse camel".split()}
PUNCT_SENTENCES = ["The cat saw the park.", "Did a dog like paris?", "My friend called london, and then the teacher left.",
                   "Our team visited a house.", "Did the teacher find the river?"]


def write_fruit_animal(path: Path, n: int, seed: int) -> Path:
    """A separable two-label set (mostly fruit words or mostly animal words), JSONL."""
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            label = rng.choice(sorted(HEAD_WORDS))
            words = [rng.choice(HEAD_WORDS[label]) for _ in range(6)]
            f.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")
    return path


@pytest.fixture(scope="session")
def head_fine_tunes(tiny_run, tmp_path_factory) -> dict[str, Path]:
    """classify, ner and punct fine-tunes of ``tiny_run`` (30 steps each)."""
    import random

    from pilelm.core.cli import main

    d = tmp_path_factory.mktemp("heads")
    train, val = write_fruit_animal(d / "train.jsonl", 160, 0), write_fruit_animal(d / "val.jsonl", 30, 1)
    conll = str(ROOT / "tests" / "finetune" / "data" / "tiny.conll")
    rng = random.Random(0)
    (d / "punct.txt").write_text(" ".join(rng.choice(PUNCT_SENTENCES) for _ in range(200)))
    jobs = {"classify": ["--data", str(train), "--val-data", str(val), "optim.lr=2e-3"],
            "ner": ["--data", conll, "--val-data", conll, "loop.batch_size=8", "optim.lr=3e-3"],
            "punct": ["--data", str(d / "punct.txt"), "words_per_example=12", "optim.lr=3e-3"]}
    out = {}
    for task, args in jobs.items():
        out[task] = d / task
        assert main(["finetune", str(tiny_run), "-o", str(out[task]), "--task", task, *args, "test_ratio=0",
                     "loop.max_steps=30", "loop.eval_every=30", "loop.num_threads=1", "loop.tensorboard=false"]) == 0
    return out
