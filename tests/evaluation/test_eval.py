import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pilelm.evaluation.bleu import bleu_chrf, read_pairs
from pilelm.evaluation.bpb import aggregate, score_documents, score_unigram, sliding_windows, unigram_logprobs
from pilelm.evaluation.documents import DocumentSet
from pilelm.models.gpt import GPT, GPTConfig


class FixedLM(nn.Module):
    """Predicts the same distribution ``probs`` at every position: known probabilities."""

    def __init__(self, probs: list[float]):
        super().__init__()
        self.cfg = GPTConfig(vocab_size=len(probs), block_size=8, n_layer=1, n_head=1, d_model=4)
        self.register_buffer("logits", torch.log(torch.tensor(probs)))

    def forward(self, idx, targets=None, **_):
        return self.logits.expand(*idx.shape, -1), None


def docs_of(token_lists, components, nbytes, names=("A", "B"), eod=3, vocab=4):
    return DocumentSet([np.array(t, dtype=np.int64) for t in token_lists], np.array(components, dtype=np.int16),
                       list(names), np.array(nbytes, dtype=np.int64), eod, vocab)


def test_bpb_matches_a_hand_computed_value():
    model = FixedLM([0.5, 0.25, 0.125, 0.125])
    # doc 0: tokens 0 1 2 -> 1 + 2 + 3 = 6 bits over 4 bytes; doc 1: 0 0 -> 2 bits over 2 bytes
    docs = docs_of([[0, 1, 2], [0, 0]], [0, 1], [4, 2])
    nll, counts = score_documents(model, docs, context=2, stride=1)
    np.testing.assert_allclose(nll / math.log(2), [6.0, 2.0], rtol=1e-6)
    assert counts.tolist() == [3, 2]
    res = aggregate(nll, counts, docs)
    assert res["overall"]["bpb"] == pytest.approx(8 / 6, rel=1e-6)
    assert res["components"]["A"]["bpb"] == pytest.approx(6 / 4, rel=1e-6)
    assert res["components"]["B"]["bpb"] == pytest.approx(1.0, rel=1e-6)
    assert res["overall"]["ppl_token"] == pytest.approx(2 ** (8 / 5), rel=1e-6)
    assert res["overall"]["nll"] == pytest.approx(8 / 5 * math.log(2), rel=1e-6)
    assert (res["overall"]["tokens"], res["overall"]["bytes"], res["overall"]["documents"]) == (5, 6, 2)


@pytest.mark.parametrize("n,context,stride", [(1, 4, 2), (10, 4, 2), (10, 4, 4), (10, 4, 1), (9, 16, 8), (17, 5, 3)])
def test_windows_tile_the_document_and_respect_context(n, context, stride):
    windows = sliding_windows(n, context, stride)
    scored = [j for a, b, s in windows for j in range(s, b)]
    assert scored == list(range(n))  # every prediction exactly once, in order
    for i, (a, b, s) in enumerate(windows):
        assert 0 <= a <= s < b <= n and b - a <= context
        if i > 0:  # later windows give each scored token at least context - stride of context
            assert s - a >= context - stride or a == 0


def test_sliding_window_nll_equals_direct_computation():
    torch.manual_seed(0)
    model = GPT(GPTConfig(arch="neox", vocab_size=50, block_size=8, n_layer=2, n_head=2, d_model=32)).eval()
    toks = torch.randint(0, 49, (13,))
    docs = DocumentSet([toks.numpy()], np.zeros(1, dtype=np.int16), ["A"], np.array([40]), 49, 50)
    x = torch.cat([torch.tensor([49]), toks])  # [EOD] + document
    for stride in (1, 3, 8):
        nll, counts = score_documents(model, docs, context=8, stride=stride, batch_tokens=16)
        expected = 0.0
        for a, b, s in sliding_windows(len(toks), 8, stride):
            with torch.no_grad():
                logp = F.log_softmax(model(x[None, a:b])[0][0].double(), -1)
            expected -= sum(logp[j - a, x[j + 1]].item() for j in range(s, b))
        assert counts[0] == 13
        assert nll[0] == pytest.approx(expected, rel=1e-5)
    # Short documents batched together give the same sums as one at a time.
    many = DocumentSet([toks[:k].numpy() for k in (3, 7, 5, 8)], np.zeros(4, dtype=np.int16), ["A"],
                       np.ones(4, dtype=np.int64), 49, 50)
    together, _ = score_documents(model, many, 8, 4, batch_tokens=64)
    alone = [score_documents(model, DocumentSet([t], many.component[:1], ["A"], many.nbytes[:1], 49, 50), 8, 4)[0][0]
             for t in many.tokens]
    np.testing.assert_allclose(together, alone, rtol=1e-5)


def test_unigram_baseline_is_add_one_smoothed():
    counts = np.array([3, 1, 0, 0])  # 4 train tokens, vocab of 4
    logp = unigram_logprobs(counts, 4)
    np.testing.assert_allclose(np.exp(logp), [4 / 8, 2 / 8, 1 / 8, 1 / 8])
    docs = docs_of([[0, 1], [2]], [0, 0], [2, 1])
    nll, n = score_unigram(logp, docs)
    np.testing.assert_allclose(nll / math.log(2), [1 + 2, 3])
    assert aggregate(nll, n, docs)["overall"]["bpb"] == pytest.approx(6 / 3)


def test_bleu_and_chrf(tmp_path):
    perfect = bleu_chrf(["the cat sat on the mat"], [["the cat sat on the mat"]])
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["chrf"] == pytest.approx(100.0)
    partial = bleu_chrf(["the cat sat on a mat today"], [["the cat sat on the mat", "a cat sat on a mat"]])
    assert 0 < partial["bleu"] < 100 and 0 < partial["chrf"] < 100
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "a", "reference": "b"}\n\n{"prompt": "c", "reference": ["d", "e"]}\n')
    assert read_pairs(path) == (["a", "c"], [["b"], ["d", "e"]])
    path.write_text('{"prompt": "a", "reference": "b"}\n{"prompt": "c"}\n')
    with pytest.raises(ValueError, match=r"pairs.jsonl:2"):
        read_pairs(path)


# --- the eval stage ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eval_inputs(tmp_path_factory, tiny_run):
    """A prepared dir (two components; the test split holds the tiny run's training sentences
    and a document longer than its 128-token context) and its shard dir."""
    from conftest import TINY_TEXTS, make_tiny_run, write_pile_shard

    from pilelm.core.manifest import write_manifest
    from pilelm.tokens.tokenize import TokenizeConfig, run_tokenize

    root = tmp_path_factory.mktemp("eval_inputs")
    prep = root / "prep"

    def rec(text, comp):
        return {"text": text, "meta": {"pile_set_name": comp}}

    long_doc = " ".join(TINY_TEXTS[:2] * 12)
    test_docs = [rec(t, "Pile-CC" if i % 2 else "Github") for i, t in enumerate(TINY_TEXTS)]
    test_docs.append(rec(long_doc, "Github"))
    write_pile_shard(prep / "test" / "00.jsonl.zst", test_docs)
    write_pile_shard(prep / "train" / "00.jsonl.zst", [rec(t, "Github") for t in TINY_TEXTS * 3])
    write_manifest(prep, "prepare", {})
    shards = run_tokenize(TokenizeConfig(data=prep, tokenizer=tiny_run / "tokenizer", output=root / "shards",
                                         workers=1))
    untrained = make_tiny_run(root / "untrained", train_steps=0)
    return prep, shards, untrained


def test_eval_stage_writes_results_markdown_and_plot(eval_inputs, tiny_run, tmp_path):
    from pilelm.core.cli import main
    from pilelm.core.manifest import read_manifest

    prep, shards, untrained = eval_inputs
    out = tmp_path / "eval"
    assert main(["eval", str(tiny_run), str(untrained), "--data", str(shards), "-o", str(out), "--stride", "32"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["runs"]) == {"run", "untrained"}
    unigram = res["baselines"]["unigram"]
    for entry in [*res["runs"].values(), unigram]:
        assert set(entry["components"]) == {"Github", "Pile-CC"}
        o = entry["overall"]
        assert o["documents"] == 6 and o["bytes"] == sum(len(t.encode()) for t in _test_texts(prep))
        assert o["bpb"] == pytest.approx(o["nll"] * o["tokens"] / math.log(2) / o["bytes"])
        parts = entry["components"].values()
        assert sum(c["tokens"] for c in parts) == o["tokens"] and sum(c["bytes"] for c in parts) == o["bytes"]
    fitted, random = res["runs"]["run"]["overall"]["bpb"], res["runs"]["untrained"]["overall"]["bpb"]
    # The fitted run saw these sentences; the untrained one is near uniform over 320 tokens.
    assert fitted < unigram["overall"]["bpb"] < random
    md = (out / "results.md").read_text()
    assert "| **overall** |" in md and "untrained" in md and "unigram" in md
    assert (out / "bpb.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert read_manifest(out)["stage"] == "eval"


def _test_texts(prep):
    from conftest import read_pile_shard

    return [r["text"] for r in read_pile_shard(prep / "test" / "00.jsonl.zst")]


def test_prepared_dir_gives_the_same_numbers_as_the_shards(eval_inputs, tiny_run, tmp_path):
    from pilelm.evaluation.evaluate import EvalConfig, run_eval

    prep, shards, _ = eval_inputs
    a = run_eval(EvalConfig(runs=[str(tiny_run)], data=str(shards), output=str(tmp_path / "a"), stride=48))
    b = run_eval(EvalConfig(runs=[str(tiny_run)], data=str(prep), output=str(tmp_path / "b"), stride=48))
    ra, rb = (json.loads((p / "results.json").read_text()) for p in (a, b))
    assert ra["runs"]["run"]["overall"]["tokens"] > 128  # the long document needed several windows
    for key in ("runs", "baselines"):
        for name in ra[key]:
            for comp, m in ra[key][name]["components"].items():
                m2 = rb[key][name]["components"][comp]
                assert m2["bpb"] == pytest.approx(m["bpb"], rel=1e-6) and m2["tokens"] == m["tokens"]


def test_a_run_with_another_tokenizer_needs_the_prepared_dir(eval_inputs, tmp_path):
    from conftest import make_tiny_run

    from pilelm.evaluation.evaluate import EvalConfig, run_eval

    prep, shards, _ = eval_inputs
    other = make_tiny_run(tmp_path / "other", vocab_size=300)
    with pytest.raises(ValueError, match=r"^eval: .*tokenizer and .* have different tokenizers .*as --data"):
        run_eval(EvalConfig(runs=[str(other)], data=str(shards), output=str(tmp_path / "x")))
    out = run_eval(EvalConfig(runs=[str(other)], data=str(prep), output=str(tmp_path / "y"), unigram=False))
    assert json.loads((out / "results.json").read_text())["runs"]["other"]["overall"]["documents"] == 6


def test_bleu_chrf_of_conditional_generation_and_checkpoints_side_by_side(tiny_run, tmp_path):
    import shutil

    from conftest import TINY_TEXTS

    from pilelm.evaluation.evaluate import EvalConfig, run_eval
    from pilelm.inference.generate import generate
    from pilelm.inference.sampling import SamplingParams
    from pilelm.tokens.tokenizer import load_tokenizer
    from pilelm.training.checkpoint import load_for_inference

    pairs = tmp_path / "pairs.jsonl"
    half = [len(t) // 2 for t in TINY_TEXTS[:3]]
    records = [{"prompt": t[:h], "reference": t[h:].strip()} for t, h in zip(TINY_TEXTS, half, strict=False)]
    pairs.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (ckpt,) = (run / "checkpoints").iterdir()
    shutil.copytree(ckpt, ckpt.parent / "step_00000001")  # a second (older) checkpoint
    out = run_eval(EvalConfig(runs=[str(run)], output=str(tmp_path / "eval"), bleu_data=str(pairs),
                              all_checkpoints=True, bleu_max_new_tokens=24))
    res = json.loads((out / "results.json").read_text())
    assert list(res["runs"]) == ["run@1", "run@100"]
    gen = res["runs"]["run@100"]["generation"]
    model, _, tok_dir = load_for_inference(run)
    hyps = generate(model, load_tokenizer(tok_dir), [r["prompt"] for r in records],
                    SamplingParams(24, temperature=0.0, stop=["\n"]))
    import sacrebleu

    refs = [[r["reference"] for r in records]]
    assert gen["bleu"] == pytest.approx(sacrebleu.corpus_bleu([h.strip() for h in hyps], refs).score)
    assert gen["chrf"] == pytest.approx(sacrebleu.corpus_chrf([h.strip() for h in hyps], refs).score)
    assert gen["bleu"] > 50  # the run was fitted to these sentences
    assert "BLEU" in (out / "results.md").read_text()
