"""`pilelm finetune --task sft`: reply masks, truncation, bad input, vocabulary growth, packing
that changes no loss, resume, LoRA, mined examples, and a chat template that transformers and
the server render to the same ids."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import cpu_has_native_bf16, make_tiny_run

from pilelm.core.cli import main
from pilelm.core.manifest import read_manifest
from pilelm.finetune.records import DataError
from pilelm.finetune.sft.chat_format import ROLE_TOKENS, SFT_CHAT_TEMPLATE, chat_tokenizer, grow_vocabulary
from pilelm.finetune.sft.conversations import Conversation, mine_conversations, read_conversations
from pilelm.finetune.sft.encoding import ChatEncoder, collate_rows, packed_rows
from pilelm.finetune.sft.trainer import reply_loss, rows_of
from pilelm.tokens.chat import load_chat_template, load_special_tokens, render_chat
from pilelm.training import checkpoint as ckpt_io
from pilelm.training.precision import resolve_precision

FAST = ["loop.num_threads=1", "loop.tensorboard=false"]
WORDS = "red green blue cat dog sun moon tree".split()
SAMPLE_VAL = Path(__file__).resolve().parents[2] / "pilelm" / "sample" / "val.jsonl.zst"


def write_pairs(path: Path, n: int, seed: int) -> Path:
    """Copy tasks: "repeat: a b c" -> "a b c" (learnable in a few dozen steps)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            w = " ".join(rng.sample(WORDS, 3))
            f.write(json.dumps({"prompt": f"repeat: {w}", "response": w}) + "\n")
    return path


def sft_args(pairs: Path, *extra: str) -> list[str]:
    return ["--task", "sft", "--data", str(pairs), *FAST, "loop.max_steps=40", "loop.eval_every=20",
            "loop.batch_size=8", "optim.lr=3e-3", "sft.eval_generations=8", *extra]


@pytest.fixture(scope="session")
def pairs(tmp_path_factory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("sft") / "pairs.jsonl", 160, 0)


@pytest.fixture(scope="session")
def sft_run(tiny_run, pairs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sft_run") / "ft"
    assert main(["finetune", str(tiny_run), "-o", str(out), *sft_args(pairs)]) == 0
    return out


@pytest.fixture()
def encoder(tiny_run, tmp_path) -> ChatEncoder:
    tok, _, _ = chat_tokenizer(tiny_run / "tokenizer", tmp_path / "tok")
    return ChatEncoder(tok, SFT_CHAT_TEMPLATE, load_special_tokens(tmp_path / "tok"), 64)


def test_the_prompt_also_fits_the_room_generation_leaves(tiny_run, tmp_path):
    tok, _, _ = chat_tokenizer(tiny_run / "tokenizer", tmp_path / "tok")
    enc = ChatEncoder(tok, SFT_CHAT_TEMPLATE, load_special_tokens(tmp_path / "tok"), 64, prompt_room=40)
    counts: Counter[str] = Counter()
    e = enc.encode(conv(("user", " ".join(WORDS * 20)), ("assistant", "cat dog")), counts)
    assert len(tok.encode(e.prompt)) <= 40 and counts["prompt_truncated"] == 1
    assert e.prompt.startswith("<|user|>\n" + " ".join(WORDS[:3]))


def conv(*turns: tuple[str, str]) -> Conversation:
    return Conversation(tuple({"role": r, "content": c} for r, c in turns), "test")


def test_only_reply_tokens_are_trained_and_the_ids_are_transformers_ids(encoder, tmp_path):
    transformers = pytest.importorskip("transformers")
    c = conv(("system", "be brief"), ("user", "the quick"), ("assistant", "brown fox"), ("user", "and?"),
             ("assistant", "lazy dog"))
    e = encoder.encode(c, Counter())
    trained = [t for t, keep in zip(e.ids, e.trained, strict=True) if keep]
    eos = "<|endoftext|>"
    assert encoder.tok.decode(trained, skip_special_tokens=False) == f"brown fox{eos}\nlazy dog{eos}\n"
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"), local_files_only=True)
    messages = [dict(m) for m in c.messages]
    assert hf.apply_chat_template(messages, tokenize=False) == render_chat(messages, SFT_CHAT_TEMPLATE, False,
                                                                            encoder.special)
    assert list(hf.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]) == e.ids
    # The evaluation prompt is what the server sends for the conversation before its last reply.
    assert e.prompt == render_chat(messages[:-1], load_chat_template(tmp_path / "tok"), True, encoder.special)
    assert e.prompt.endswith("<|assistant|>\n") and e.reference == "lazy dog"
    assert all(encoder.tok.hf.token_to_id(t) is not None for t in ROLE_TOKENS.values())


def test_long_prompts_keep_their_head_and_long_replies_are_skipped(encoder):
    counts: Counter[str] = Counter()
    long_prompt = " ".join(WORDS * 20)
    e = encoder.encode(conv(("user", "Summarise: " + long_prompt), ("assistant", "cat dog")), counts)
    assert counts["prompt_truncated"] == 1 and counts["prompt_cut_from_left"] == 0
    assert encoder.max_length - 3 <= len(e.ids) <= encoder.max_length
    # The message was cut from its end: the instruction and the document's head stay.
    head = "Summarise: " + " ".join(WORDS[:4])
    assert head in e.prompt and head in encoder.tok.decode(e.ids)
    assert len(encoder.tok.encode(e.prompt)) <= encoder.prompt_room
    trained = [t for t, keep in zip(e.ids, e.trained, strict=True) if keep]
    assert encoder.tok.decode(trained, skip_special_tokens=False).startswith("cat dog")  # the reply is whole
    assert not e.trained[0]
    assert encoder.encode(conv(("user", "hi"), ("assistant", long_prompt)), counts) is None
    assert counts["response_too_long"] == 1
    # Too long only because of a trailing user turn: that turn goes, the rest stays whole.
    e = encoder.encode(conv(("user", "hi"), ("assistant", "cat dog"), ("user", long_prompt)), counts)
    assert counts["tail_dropped"] == 1 and e.ids[0] == encoder.tok.hf.token_to_id("<|user|>")
    assert len(e.ids) < encoder.max_length and e.trained[-1]


def test_bad_records_are_errors_naming_the_line_and_empty_replies_are_counted(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"prompt": "a", "response": " "}) + "\n"
                 + json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n"
                 + json.dumps({"prompt": "a", "response": "b"}) + "\n")
    counts: Counter[str] = Counter()
    assert len(read_conversations(f, counts)) == 1
    assert counts == {"empty_response": 1, "no_reply": 1}
    f.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n"
                 + json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(DataError, match=r"c\.jsonl:2: messages\[0\]\.role is 'robot'"):
        read_conversations(f, Counter())
    f.write_text(json.dumps({"text": "a"}) + "\n")
    with pytest.raises(DataError, match=r"c\.jsonl:1: a record needs prompt and response, or messages"):
        read_conversations(f, Counter())


def test_new_token_rows_start_at_the_mean_and_old_logits_do_not_change(tiny_run, tmp_path):
    model, cfg, tok_dir = ckpt_io.load_for_inference(tiny_run)
    tok, new_ids, trained_rows = chat_tokenizer(tok_dir, tmp_path / "tok")
    assert len(new_ids) == 3 and min(new_ids) == trained_rows and max(new_ids) >= cfg.vocab_size
    grown, grown_cfg = grow_vocabulary(model, cfg, new_ids, trained_rows)
    assert grown_cfg.vocab_size % 64 == 0 and grown_cfg.vocab_size > cfg.vocab_size
    mean = model.wte.weight[:trained_rows].mean(0)
    for i in new_ids:
        torch.testing.assert_close(grown.wte.weight[i], mean)
    ids = torch.tensor([tok.encode("the quick brown fox")])
    old_logits, _ = model(ids)
    new_logits, _ = grown.eval()(ids)
    torch.testing.assert_close(new_logits[..., : cfg.vocab_size], old_logits)


def test_packing_changes_no_reply_loss(tiny_run, encoder, pairs):
    base, cfg, _ = ckpt_io.load_for_inference(tiny_run)
    new_ids = [encoder.tok.hf.token_to_id(t) for t in ROLE_TOKENS.values()]
    model, _ = grow_vocabulary(base, cfg, new_ids, min(new_ids))
    model.eval()
    examples = [encoder.encode(c, Counter()) for c in read_conversations(pairs, Counter())[:40]]
    rows = packed_rows([len(e.ids) - 1 for e in examples], 64, seed=0)
    assert max(len(r) for r in rows) > 1 and sorted(i for r in rows for i in r) == list(range(40))
    assert all(sum(len(examples[i].ids) - 1 for i in r) <= 64 for r in rows)
    batch = collate_rows([[examples[i] for i in r] for r in rows[:2]], 0, packed=True)
    assert set(batch["segments"][0].tolist()) >= {0, 1}
    precision, cpu = resolve_precision("fp32", torch.device("cpu")), torch.device("cpu")
    packed, n_packed = reply_loss(model, examples, rows, 4, 0, True, precision, cpu)
    alone, n_alone = reply_loss(model, examples, rows_of(examples, 64, False, 0), 4, 0, False, precision, cpu)
    assert n_packed == n_alone > 0
    assert packed == pytest.approx(alone, rel=1e-5)


def test_sft_learns_the_replies_and_writes_a_run(sft_run):
    r = json.loads((sft_run / "results.json").read_text())
    assert r["after"]["reply_loss"] < 0.5 * r["before"]["reply_loss"]
    assert r["after"]["rougeL"] > r["before"]["rougeL"]
    for key in ("rouge1", "rouge2", "rougeL", "bleu", "chrf"):
        assert 0.0 <= r["after"][key] <= 100.0
    m = read_manifest(sft_run)
    assert m["stage"] == "train" and m["extra"]["objective"] == "sft" and m["counts"]["added_tokens"] == 3
    assert 0.0 < m["extra"]["packed_row_fill"] <= 1.0
    assert "| before |" in (sft_run / "results.md").read_text()
    assert load_chat_template(sft_run / "tokenizer") == SFT_CHAT_TEMPLATE
    # A train-stage run: generate reads it, and the reply ends at the end-of-text token.
    model, _, _ = ckpt_io.load_for_inference(sft_run)
    assert model.cfg.vocab_size % 64 == 0


def test_export_reproduces_the_chat_in_transformers(sft_run, pairs, tmp_path):
    transformers = pytest.importorskip("transformers")
    from pilelm.inference.generate import generate
    from pilelm.inference.sampling import SamplingParams
    from pilelm.tokens.tokenizer import load_tokenizer

    hf_dir = tmp_path / "hf"
    assert main(["export", str(sft_run), "--format", "hf", "-o", str(hf_dir)]) == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    messages = [{"role": "user", "content": "repeat: sun tree dog"}]
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    tok = load_tokenizer(sft_run / "tokenizer")
    prompt = render_chat(messages, load_chat_template(sft_run / "tokenizer"), True, load_special_tokens(sft_run / "tokenizer"))
    assert tok.encode(prompt) == list(ids)
    out = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    hf_reply = hf_tok.decode(out[0, len(ids):], skip_special_tokens=True)
    model, _, _ = ckpt_io.load_for_inference(sft_run)
    ours = generate(model, tok, [prompt], SamplingParams(max_new_tokens=12, temperature=0.0))[0]
    assert hf_reply.strip() == ours.strip() and ours.strip()


def test_resume_after_a_stop_matches_an_uninterrupted_run(tiny_run, pairs, tmp_path):
    args = sft_args(pairs, "loop.max_steps=20", "loop.eval_every=10", "sft.before=false", "sft.eval_generations=2")
    assert main(["finetune", str(tiny_run), "-o", str(tmp_path / "whole"), *args]) == 0
    assert main(["finetune", str(tiny_run), "-o", str(tmp_path / "cut"), *args, "loop.stop_at_step=10"]) == 0
    assert not (tmp_path / "cut" / "results.json").exists()
    assert main(["finetune", str(tiny_run), "-o", str(tmp_path / "cut"), *args]) == 0
    from safetensors.torch import load_file

    a = load_file(str(ckpt_io.resolve_checkpoint(tmp_path / "whole")[1] / "model.safetensors"))
    b = load_file(str(ckpt_io.resolve_checkpoint(tmp_path / "cut")[1] / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)


def test_lora_unpacked_bf16_trains_the_adapters_and_the_new_rows(neox_sft_run):
    """LoRA on neox, unpacked, under bf16 autocast; in fp32 on a CPU without native bf16 (which
    refuses bf16 training), so the adapters and new rows are still checked there."""
    r = json.loads((neox_sft_run / "results.json").read_text())
    assert r["lora_r"] == 4 and r["trainable_parameters"] < r["parameters"]
    assert r["after"]["reply_loss"] < r["before"]["reply_loss"]
    model, _, _ = ckpt_io.load_for_inference(neox_sft_run)  # adapters merged: a plain model
    assert not any("lora" in k for k in model.state_dict())


@pytest.fixture(scope="session")
def neox_sft_run(pairs, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("neox_sft")
    run = make_tiny_run(d / "run", arch="neox", block_size=64, train_steps=30)
    out = d / "ft"
    precision = "bf16-autocast" if cpu_has_native_bf16() else "fp32"
    assert main(["finetune", str(run), "-o", str(out), *sft_args(pairs, "lora.r=4", "sft.pack=false", "sft.max_new_tokens=16",
                                                                  f"loop.precision={precision}")]) == 0
    return out


@pytest.mark.parametrize("kind", ["lead", "title", "dialogue"])
def test_mined_examples_from_the_bundled_sample(kind):
    counts: Counter[str] = Counter()
    convs = mine_conversations(kind, [SAMPLE_VAL], counts)
    assert len(convs) >= 10 and counts[f"documents_without_{kind}"] > 0
    for c in convs:
        user, reply = c.messages
        assert user["role"] == "user" and reply["role"] == "assistant" and reply["content"].strip()
        if kind == "lead":
            assert reply["content"] not in user["content"]  # the summary is not in its source
        if kind == "title":
            assert "\n" not in reply["content"] and len(reply["content"]) <= 80


def test_sft_on_mined_titles_without_data(tiny_run, tmp_path):
    out = tmp_path / "ft"
    assert main(["finetune", str(tiny_run), "-o", str(out), "--task", "sft", "sft.examples=title", *FAST,
                 "loop.max_steps=2", "loop.eval_every=2", "loop.batch_size=2", "sft.eval_generations=2",
                 "sft.max_new_tokens=4", "max_train_examples=8", "max_eval_examples=4"]) == 0
    m = read_manifest(out)
    assert m["counts"]["train_examples"] == 8 and any("sample" in p["path"] for p in m["inputs"])


def test_serve_chats_with_the_fine_tuned_run(sft_run):
    """`pilelm serve FT_RUN`: /v1/chat/completions renders the stored template into the ids the
    model was trained on and replies as `generate` does on that prompt."""
    from conftest import serving

    from pilelm.inference.generate import generate
    from pilelm.inference.sampling import SamplingParams

    messages = [{"role": "user", "content": "repeat: moon red cat"}]
    with serving(sft_run, max_batch=4) as s:
        r = s.http.post("/v1/chat/completions", json={"messages": messages, "temperature": 0, "max_tokens": 12})
        assert r.status_code == 200, r.text
        body = r.json()
        prompt = render_chat(messages, load_chat_template(sft_run / "tokenizer"), True,
                             load_special_tokens(sft_run / "tokenizer"))
        assert body["usage"]["prompt_tokens"] == len(s.tok.encode(prompt))
        reply = body["choices"][0]["message"]["content"]
        model, _, _ = ckpt_io.load_for_inference(sft_run)
        ours = generate(model, s.tok, [prompt], SamplingParams(max_new_tokens=12, temperature=0.0))[0]
        assert reply.strip() == ours.strip() and reply.strip()
