import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pilelm.evaluate import (
    DocumentSet,
    aggregate,
    bleu_chrf,
    read_pairs,
    score_documents,
    score_unigram,
    sliding_windows,
    unigram_logprobs,
)
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
