"""pilelm embed / search / similar: vectors, chunks, faiss kinds, resume after a kill, bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from pilelm.core import cli
from pilelm.core.manifest import read_manifest
from pilelm.inference import text_encoder as embed_infer
from pilelm.inference.text_encoder import TextEncoder, chunk_spans, pool
from pilelm.retrieval import embed as embed_mod
from pilelm.retrieval.index import VectorIndex


def test_chunk_spans_cover_the_document_and_end_at_it():
    for n, length, stride in [(1, 8, 8), (8, 8, 8), (9, 8, 8), (50, 8, 5), (23, 24, 16)]:
        spans = chunk_spans(n, length, stride)
        covered = set()
        for a, b in spans:
            assert 0 < b - a <= length
            covered |= set(range(a, b))
        assert covered == set(range(n)) and spans[-1][1] == n
        assert all(a2 - a1 == stride for (a1, _), (a2, _) in zip(spans, spans[1:], strict=False))
    assert chunk_spans(0, 8, 8) == []


def test_pooling_reads_only_the_real_tokens():
    h = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)  # (B=2, T=3, C=2)
    lengths = torch.tensor([3, 1])
    assert torch.equal(pool(h, lengths, "mean")[1], h[1, 0])
    assert torch.allclose(pool(h, lengths, "mean")[0], h[0].mean(0))
    assert torch.equal(pool(h, lengths, "last"), torch.stack([h[0, 2], h[1, 0]]))
    assert torch.equal(pool(h, lengths, "cls"), h[:, 0])


def test_padding_and_batching_do_not_change_a_vector(tiny_run):
    enc = TextEncoder.from_run(tiny_run)
    texts = ["the quick brown fox", "pack my box with five dozen liquor jugs.", "a"]
    together = enc.embed_queries(texts, batch_size=3)
    alone = np.stack([enc.embed_queries([t])[0] for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)


def test_a_short_query_runs_on_one_thread_and_restores_the_count(tiny_run, monkeypatch):
    enc = TextEncoder.from_run(tiny_run)
    seen = []
    forward = enc.forward_pooled
    monkeypatch.setattr(enc, "forward_pooled", lambda batch: (seen.append(torch.get_num_threads()), forward(batch))[1])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        enc.embed_queries(["a short query"])
        assert seen == [1] and torch.get_num_threads() == 2
        monkeypatch.setattr(embed_infer, "SMALL_WORK_TOKENS", 2)  # the same text is now "large" work
        enc.embed_queries(["a short query"])
        assert seen[1:] and set(seen[1:]) == {2}
    finally:
        torch.set_num_threads(before)


def test_cls_pooling_is_refused_for_a_causal_model(tiny_run):
    with pytest.raises(ValueError, match="cls needs a BERT"):
        TextEncoder.from_run(tiny_run, pooling="cls")


def test_embed_writes_an_index_whose_chunks_map_back_to_documents(tiny_index, corpus_file):
    m = read_manifest(tiny_index)
    assert m["stage"] == "embed" and m["counts"]["documents"] == 10
    assert m["counts"]["empty_documents_skipped"] == 1
    index = VectorIndex(tiny_index)
    assert len(index) == 10 and index.faiss.ntotal == len(index.vectors) == m["counts"]["chunks"]
    np.testing.assert_allclose(np.linalg.norm(np.asarray(index.vectors), axis=1), 1.0, atol=1e-5)
    # Every vector belongs to exactly one document, in order, and a long one has several.
    assert sum(d["chunks"] for d in index.docs) == len(index.vectors)
    assert max(d["chunks"] for d in index.docs) > 1
    assert all(d["id"].startswith(str(corpus_file)) for d in index.docs)
    # Re-embedding a stored chunk's text gives back its stored vector.
    enc = TextEncoder.from_run(read_manifest(tiny_index)["config"]["run"])
    row = index.docs[3]["first_chunk"]
    ids = enc.tokenize([index.chunk_text(row)])[0]
    assert float(enc.embed_ids([ids])[0] @ np.asarray(index.vectors[row])) > 0.98


def test_search_finds_the_document_a_query_was_cut_from(tiny_index, capsys):
    index = VectorIndex(tiny_index)
    target = index.docs[4]
    query = index.chunk_text(target["first_chunk"])
    assert cli.main(["search", str(tiny_index), query, "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 3 and hits[0]["id"] == target["id"]
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    assert len({h["id"] for h in hits}) == 3  # a document appears once, scored by its best chunk
    assert hits[0]["component"] == target["component"] and hits[0]["snippet"]
    assert cli.main(["search", str(tiny_index), query]) == 0
    assert target["id"] in capsys.readouterr().out


def test_similar_excludes_the_document_itself(tiny_index, capsys):
    index = VectorIndex(tiny_index)
    assert cli.main(["similar", str(tiny_index), "--doc", index.docs[0]["id"], "--json", "-k", "20"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 9 and index.docs[0]["id"] not in {h["id"] for h in hits}
    assert cli.main(["similar", str(tiny_index), "--doc", "row:0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["id"] == hits[0]["id"]
    assert cli.main(["similar", str(tiny_index), "--doc", "nope"]) == 1
    assert "no document 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("kind,dtype", [("flat", "float16"), ("ivf", "float32"), ("hnsw", "float16")])
def test_other_index_kinds_agree_with_the_exact_one(tiny_run, corpus_file, tiny_index, tmp_path, kind, dtype):
    out = tmp_path / "idx"
    argv = ["embed", str(tiny_run), "--data", str(corpus_file), "-o", str(out), "--chunk-tokens", "24",
            "--chunk-stride", "16", "--index", kind, "--vector-dtype", dtype, "nprobe=1000"]
    assert cli.main(argv) == 0
    exact, other = VectorIndex(tiny_index), VectorIndex(out)
    assert np.asarray(other.vectors).dtype == np.dtype(dtype)
    for row in (0, 5, 9):
        q = exact.doc_vector(row)
        assert [h.id for h in other.search(q, 3)][:1] == [h.id for h in exact.search(q, 3)][:1]


def test_a_killed_embed_resumes_after_its_last_whole_part(tiny_run, corpus_file, tiny_index, tmp_path, monkeypatch):
    out = tmp_path / "idx"
    argv = ["embed", str(tiny_run), "--data", str(corpus_file), "-o", str(out),
            "--chunk-tokens", "24", "--chunk-stride", "16", "--part-docs", "3"]
    real = embed_mod._write_part
    calls = []

    def dies_on_the_third_part(parts, n, docs, encoder, cfg):
        calls.append(n)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the process is killed while embedding part 2
        return real(parts, n, docs, encoder, cfg)

    monkeypatch.setattr(embed_mod, "_write_part", dies_on_the_third_part)
    assert cli.main(argv) == 130
    assert not (out / "manifest.json").exists() and sorted(p.name for p in (out / "parts").glob("*.npy")) == [
        "00000.npy", "00001.npy"]
    monkeypatch.setattr(embed_mod, "_write_part", real)
    assert cli.main(argv) == 0
    m = read_manifest(out)
    assert m["counts"]["documents_embedded_this_run"] == 10 - 6 + 0  # parts 2 and 3 (docs 6..10)
    assert not (out / "parts").exists()
    np.testing.assert_array_equal(np.load(out / "vectors.npy"), np.load(tiny_index / "vectors.npy"))
    assert (out / "docs.jsonl").read_text() == (tiny_index / "docs.jsonl").read_text()


def test_a_corrupted_index_file_is_a_clear_error(tiny_index, tmp_path, capsys):
    broken = tmp_path / "idx"
    shutil.copytree(tiny_index, broken)
    data = bytearray((broken / "index.faiss").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (broken / "index.faiss").write_bytes(bytes(data))
    assert cli.main(["search", str(broken), "fox"]) == 1
    err = capsys.readouterr().err
    assert "index.faiss is corrupted" in err and "pilelm embed" in err
    (broken / "index.faiss").write_bytes(b"not an index")
    with pytest.raises(ValueError, match="cannot be read"):
        VectorIndex(broken, verify=False)


def test_search_refuses_a_run_with_another_model(tiny_index, tmp_path, capsys):
    from conftest import make_tiny_run

    other = make_tiny_run(tmp_path / "other", seed=1)
    assert cli.main(["search", str(tiny_index), "fox", "--run", str(other)]) == 1
    err = capsys.readouterr().err
    assert "another model or tokenizer" in err and "model weights" in err and str(other) in err


def test_a_query_longer_than_the_context_is_refused(tiny_index, capsys):
    assert cli.main(["search", str(tiny_index), "fox " * 400]) == 1
    assert "the model reads at most 128" in capsys.readouterr().err
    assert cli.main(["search", str(tiny_index), ""]) == 1


def test_embed_refuses_data_with_no_text(tiny_run, tmp_path, capsys):
    from conftest import write_pile_shard

    empty = write_pile_shard(tmp_path / "empty.jsonl.zst", [{"text": "", "meta": {}}])
    assert cli.main(["embed", str(tiny_run), "--data", str(empty), "-o", str(tmp_path / "idx")]) == 1
    assert "no document" in capsys.readouterr().err


def test_search_one_matches_faiss_and_restores_the_thread_count():
    from pilelm.retrieval.index import build_faiss, import_faiss, search_one

    faiss = import_faiss()
    x = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    index = build_faiss(x, "flat", "float32")
    before = faiss.omp_get_max_threads()
    scores, rows = search_one(index, x[3], 5)
    want_scores, want_rows = index.search(x[3:4], 5)
    assert rows.tolist() == want_rows.tolist() and np.allclose(scores, want_scores)
    assert faiss.omp_get_max_threads() == before
