"""Batches are a pure function of (seed, step): deterministic, resumable, rank-disjoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pilelm.training.loader import (
    IGNORE_INDEX,
    BatchLoader,
    ByteCounter,
    SpecialTokens,
    eval_batches,
    mask_tokens,
)

EOD = 1
SPECIAL = SpecialTokens(mask=2, vocab_size=100, cls=3, sep=4, pad=0, eod=EOD)


def stream(n_docs: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A token stream of documents (ids 10..99) each followed by EOD; returns (tokens, doc sizes)."""
    rng = np.random.default_rng(seed)
    docs = [np.append(rng.integers(10, 100, rng.integers(5, 60)), EOD) for _ in range(n_docs)]
    return np.concatenate(docs).astype(np.uint16), np.array([len(d) for d in docs])


def test_clm_windows_shift_by_one_and_come_from_the_stream():
    tokens, _ = stream()
    loader = BatchLoader(tokens, seq_len=16, micro_batch=4, accum=2, seed=0)
    micro = loader.next_step()
    assert len(micro) == 2
    for b in micro:
        x, y = b["input_ids"], b["labels"]
        assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(x, y, strict=True):
            start = next(s for s in range(0, len(tokens) - 16, 16) if np.array_equal(tokens[s : s + 16], row_x))
            assert np.array_equal(tokens[start + 1 : start + 17], row_y.numpy())


def test_one_epoch_visits_every_window_once():
    tokens, _ = stream()
    loader = BatchLoader(tokens, seq_len=16, micro_batch=1, accum=1, seed=3)
    n = loader.sampler.num_windows
    assert n == (len(tokens) - 17) // 16 + 1
    seen = [loader.sampler.windows(g, 1)[0] for g in range(n)]
    assert sorted(seen) == list(range(n))
    second = [loader.sampler.windows(g, 1)[0] for g in range(n, 2 * n)]
    assert sorted(second) == list(range(n)) and second != seen  # a new order each epoch


def test_same_seed_same_batches_other_seed_other_batches():
    tokens, _ = stream()
    a = [BatchLoader(tokens, 16, 4, 1, seed=5).next_step()[0]["input_ids"] for _ in range(2)]
    b = BatchLoader(tokens, 16, 4, 1, seed=6).next_step()[0]["input_ids"]
    assert torch.equal(a[0], a[1]) and not torch.equal(a[0], b)


def test_resume_from_state_continues_the_same_sequence():
    tokens, _ = stream()
    straight = BatchLoader(tokens, 16, 3, 2, seed=1)
    batches = [straight.next_step() for _ in range(16)]  # crosses an epoch boundary
    assert straight.epoch() > 1
    first = BatchLoader(tokens, 16, 3, 2, seed=1)
    for _ in range(5):
        first.next_step()
    resumed = BatchLoader(tokens, 16, 3, 2, seed=1)
    resumed.load_state_dict(first.state_dict())
    for want in batches[5:]:
        got = resumed.next_step()
        assert all(torch.equal(g["input_ids"], w["input_ids"]) for g, w in zip(got, want, strict=True))


def test_resume_refuses_a_different_batch_geometry():
    tokens, _ = stream()
    state = BatchLoader(tokens, 16, 3, 2, seed=1).state_dict()
    with pytest.raises(ValueError, match="global_batch"):
        BatchLoader(tokens, 16, 4, 2, seed=1).load_state_dict(state)


def test_ranks_read_disjoint_slices_that_make_up_the_single_process_batch():
    tokens, _ = stream(80)
    single = BatchLoader(tokens, 8, micro_batch=2, accum=4, seed=2)
    ranks = [BatchLoader(tokens, 8, micro_batch=2, accum=2, rank=r, world=2, seed=2) for r in range(2)]
    for _ in range(3):
        want = torch.cat([b["input_ids"] for b in single.next_step()])
        parts = [torch.cat([b["input_ids"] for b in r.next_step()]) for r in ranks]
        assert torch.equal(torch.cat(parts), want)
        rows = [tuple(x.tolist()) for x in torch.cat(parts)]
        assert len(set(rows)) == len(rows)


def test_masking_rates_and_specials():
    rng = np.random.default_rng(0)
    ids = rng.integers(10, 100, 200_000)
    ids[::50] = SPECIAL.cls
    inputs, labels = mask_tokens(ids, rng, SPECIAL, 0.15)
    chosen = labels != IGNORE_INDEX
    assert not chosen[ids == SPECIAL.cls].any()  # specials are never predicted
    assert np.array_equal(labels[chosen], ids[chosen])
    assert abs(chosen.mean() / (1 - 1 / 50) - 0.15) < 0.005
    masked = (inputs == SPECIAL.mask) & chosen
    kept = (inputs == ids) & chosen
    assert abs(masked.sum() / chosen.sum() - 0.8) < 0.01
    # 10 % random tokens (a random token equal to the original counts as kept: +0.1/vocab)
    assert abs(kept.sum() / chosen.sum() - (0.1 + 0.1 / SPECIAL.vocab_size)) < 0.01
    assert np.array_equal(inputs[~chosen], ids[~chosen])


def test_mlm_masks_are_dynamic_per_epoch_and_fixed_across_resumes_and_world_sizes():
    tokens, _ = stream(60)
    loader = BatchLoader(tokens, 16, 4, 1, seed=0, objective="mlm", special=SPECIAL)
    n = loader.sampler.num_windows
    b = loader.batch(0, 4)
    assert b["input_ids"].shape == (4, 16)
    assert (b["input_ids"][:, 0] == SPECIAL.cls).all() and (b["input_ids"][:, -1] == SPECIAL.sep).all()
    # The same window in the next epoch gets a fresh mask.
    w = loader.sampler.windows(0, 1)[0]
    g_next = n + int(np.flatnonzero(loader.sampler._permutation(1) == w)[0])
    again = loader.batch(g_next, 1)
    assert not torch.equal(again["labels"][0], b["labels"][0])
    # ... but the same global sample is masked identically by any loader with that seed.
    other = BatchLoader(tokens, 16, 2, 1, rank=1, world=2, seed=0, objective="mlm", special=SPECIAL)
    assert torch.equal(other.batch(0, 4)["labels"], b["labels"])


def test_nsp_pairs():
    tokens, _ = stream(60)
    loader = BatchLoader(tokens, 32, 8, 1, seed=0, objective="mlm+nsp", special=SPECIAL)
    b = loader.batch(0, 400)
    assert set(b) == {"input_ids", "labels", "token_type_ids", "attention_mask", "next_sentence_label"}
    assert b["input_ids"].shape == (400, 32)
    is_next = b["next_sentence_label"] == 0
    assert 0.4 < is_next.float().mean() < 0.6
    stream_text = tokens.tobytes()
    for i in range(400):
        n = int(b["attention_mask"][i].sum())
        assert b["attention_mask"][i, :n].all() and not b["attention_mask"][i, n:].any()
        types = b["token_type_ids"][i, :n]
        seps = torch.nonzero(types[1:] != types[:-1]).flatten()
        assert len(seps) == 1  # one switch from A (0) to B (1)
        # Reconstruct the unmasked pair from inputs and labels.
        ids = torch.where(b["labels"][i] >= 0, b["labels"][i], b["input_ids"][i])[:n].numpy()
        assert ids[0] == SPECIAL.cls and ids[n - 1] == SPECIAL.sep and ids[int(seps[0])] == SPECIAL.sep
        a, bb = ids[1 : int(seps[0])], ids[int(seps[0]) + 1 : n - 1]
        assert EOD not in a and EOD not in bb  # segments never cross a document boundary
        if is_next[i]:  # A then B is contiguous text of the stream
            assert np.concatenate([a, bb]).astype(np.uint16).tobytes() in stream_text


def test_byte_counter_spreads_document_bytes_over_its_tokens():
    sizes = np.array([4, 2, 5])
    nbytes = np.array([40, 10, 5])
    c = ByteCounter(sizes, nbytes)
    assert c.offset(np.array([0]))[0] == 0 and c.offset(np.array([11]))[0] == 55
    assert c.offset(np.array([4]))[0] == 40 and c.offset(np.array([5]))[0] == 45
    assert c.offset(np.array([2]))[0] == 20


def test_eval_batches_cover_the_split_once_and_count_its_bytes():
    tokens, sizes = stream(30)
    nbytes = sizes * 3
    counter = ByteCounter(sizes, nbytes)
    rows, total_bytes = [], 0.0
    for x, y, b in eval_batches(tokens, 16, 4, counter=counter):
        assert torch.equal(x[:, 1:], y[:, :-1])
        rows.append(y)
        total_bytes += b
    y = torch.cat(rows)
    n = (len(tokens) - 1) // 16
    assert y.shape == (n, 16)
    assert np.array_equal(y.flatten().numpy(), tokens[1 : n * 16 + 1])
    assert total_bytes == pytest.approx(counter.offset(np.array([n * 16 + 1]))[0] - counter.offset(np.array([1]))[0])
    shards = [list(eval_batches(tokens, 16, 4, rank=r, world=2)) for r in range(2)]
    assert sum(len(s) for s in shards) == len(list(eval_batches(tokens, 16, 4)))


def test_too_short_a_split_is_a_clear_error():
    with pytest.raises(ValueError, match="shorter than one training window"):
        BatchLoader(np.arange(10, dtype=np.uint16), 16, 1, 1)
