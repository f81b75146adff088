"""`pilelm finetune` end to end on tiny models: every task, the best checkpoint, resume, early
stopping, LoRA, bad input, and exports that transformers loads with equal logits."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_run
from ft_helpers import DATA, SENTENCES, make_tiny_bert_run, write_classification

from pilelm.core.cli import main
from pilelm.core.manifest import read_manifest
from pilelm.finetune.model import load_task_model

FAST = ["loop.num_threads=1", "loop.tensorboard=false"]


@pytest.fixture(scope="session")
def neox_run(tmp_path_factory) -> Path:
    return make_tiny_run(tmp_path_factory.mktemp("neox") / "run", arch="neox", block_size=64)


@pytest.fixture(scope="session")
def bert_run(tmp_path_factory) -> Path:
    return make_tiny_bert_run(tmp_path_factory.mktemp("bert") / "run")


@pytest.fixture(scope="session")
def cls_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cls")
    return {"train": write_classification(d / "train.jsonl", 240, 0),
            "val": write_classification(d / "val.jsonl", 40, 1),
            "test": write_classification(d / "test.jsonl", 40, 2)}


@pytest.fixture(scope="session")
def punct_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("punct")
    rng = random.Random(0)
    out = {}
    for split, n in (("train", 300), ("val", 40)):
        (d / f"{split}.txt").write_text(" ".join(rng.choice(SENTENCES) for _ in range(n)))
        out[split] = d / f"{split}.txt"
    return out



def finetune(run, out, *args: str) -> dict:
    assert main(["finetune", str(run), "-o", str(out), *FAST, *args]) == 0
    return json.loads((out / "results.json").read_text())


def cls_args(files) -> list[str]:
    return ["--task", "classify", "--data", str(files["train"]), "--val-data", str(files["val"]),
            "--test-data", str(files["test"])]


def test_classify_gpt2_keeps_the_best_checkpoint_and_exports(tiny_run, cls_files, tmp_path):
    out = tmp_path / "ft"
    res = finetune(tiny_run, out, *cls_args(cls_files), "loop.max_steps=60", "loop.eval_every=20",
                   "optim.lr=2e-3")
    assert res["test"]["accuracy"] >= 0.75 and res["labels"] == ["animal", "fruit"]
    # The classical baseline is scored on the same test examples and shown beside the fine-tune.
    tfidf = res["baselines"]["TF-IDF + logistic regression"]["test"]
    assert tfidf["examples"] == res["test"]["examples"] and 0.0 <= tfidf["macro_f1"] <= 1.0
    assert "| TF-IDF + logistic regression |" in (out / "results.md").read_text()
    # The kept model is the best validation one, not the last: re-scored, it gives the best metric.
    assert res["val"]["main"] == pytest.approx(res["best_val"])
    assert res["best_step"] in (20, 40, 60)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_metric" in r] == [20, 40, 60]
    assert all(r["examples_per_s"] > 0 for r in rows if "loss" in r)
    for name in ("results.md", "curves.png", "confusion.png", "config.yaml", "tokenizer/tokenizer.json",
                 "best/head.json"):
        assert (out / name).is_file(), name
    m = read_manifest(out)
    assert m["stage"] == "finetune" and m["counts"]["train_examples"] == 240 and m["extra"]["task"] == "classify"

    from transformers import AutoModelForSequenceClassification

    assert main(["export", str(out), "-o", str(tmp_path / "hf")]) == 0
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "GPT2ForSequenceClassification"
    assert hf.config.id2label == {0: "animal", 1: "fruit"}
    _same_logits(load_task_model(out / "best"), hf)


def _same_logits(ours, hf) -> None:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, ours.trunk.cfg.vocab_size, (3, 14), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    ids[1, 9:] = ours.head.pad_id  # right padding, as pilelm batches
    if ours.family == "bert":
        ids[:, 0] = 2  # [CLS]
    with torch.no_grad():
        a, b = ours(ids, mask), hf(input_ids=ids, attention_mask=mask).logits
    if a.dim() == 3:
        a, b = a[mask.bool()], b[mask.bool()]
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_ner_neox_seqeval_and_token_export(neox_run, tmp_path):
    from transformers import AutoModelForTokenClassification

    conll = str(DATA / "tiny.conll")
    out = tmp_path / "ner"
    res = finetune(neox_run, out, "--task", "ner", "--data", conll, "--val-data", conll, "--test-data", conll,
                   "loop.max_steps=40", "loop.eval_every=20", "loop.batch_size=8", "optim.lr=3e-3")
    assert set(res["test"]["per_type"]) <= {"PER", "LOC", "ORG"} and 0.0 <= res["test"]["f1"] <= 1.0
    assert res["head"]["scheme"] == "bio"
    assert main(["export", str(out), "-o", str(tmp_path / "hf")]) == 0
    hf = AutoModelForTokenClassification.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "GPTNeoXForTokenClassification" and hf.config.id2label[5] == "O"
    _same_logits(load_task_model(out / "best"), hf)


def test_bert_classify_and_ner_export(bert_run, cls_files, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    res = finetune(bert_run, tmp_path / "cls", *cls_args(cls_files), "loop.max_steps=20", "loop.eval_every=10",
                   "optim.lr=2e-3")
    assert res["head"]["pooling"] == "cls"
    assert main(["export", str(tmp_path / "cls"), "-o", str(tmp_path / "cls_hf")]) == 0
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "cls_hf").eval()
    assert type(hf).__name__ == "BertForSequenceClassification"
    _same_logits(load_task_model(tmp_path / "cls" / "best"), hf)

    conll = str(DATA / "tiny.conll")
    finetune(bert_run, tmp_path / "ner", "--task", "ner", "--data", conll, "--val-data", conll,
             "loop.max_steps=10", "loop.eval_every=10", "test_ratio=0")
    assert main(["export", str(tmp_path / "ner"), "-o", str(tmp_path / "ner_hf")]) == 0
    hf = AutoModelForTokenClassification.from_pretrained(tmp_path / "ner_hf").eval()
    assert type(hf).__name__ == "BertForTokenClassification"
    _same_logits(load_task_model(tmp_path / "ner" / "best"), hf)


def test_punct_then_punctuate_stdin_and_files(tiny_run, punct_files, tmp_path):
    out = tmp_path / "punct"
    res = finetune(tiny_run, out, "--task", "punct", "--data", str(punct_files["train"]), "--val-data",
                   str(punct_files["val"]), "test_ratio=0", "words_per_example=12", "loop.max_steps=40",
                   "loop.eval_every=20", "optim.lr=3e-3")
    assert set(res["val"]["per_mark"]) == {"COMMA", "PERIOD", "QUESTION"}
    assert set(res["baselines"]) == {"unchanged text", "rule (capital after a full stop, full stop at the end)"}
    assert res["baselines"]["unchanged text"]["val"]["micro_f1"] == 0.0
    text = "the cat saw the park did a dog like paris"
    proc = subprocess.run([sys.executable, "-m", "pilelm", "punctuate", str(out)], input=text + "\n\n" + text,
                          capture_output=True, text=True, check=True)
    paragraphs = proc.stdout.strip().split("\n\n")
    assert len(paragraphs) == 2
    for p in paragraphs:  # the same words in order, with marks and capitals put back
        assert [w.strip(",.?").lower() for w in p.split()] == text.split()
    (tmp_path / "a.txt").write_text(text * 30)  # longer than max_length: restored window by window
    assert main(["punctuate", str(out), str(tmp_path / "a.txt"), "-o", str(tmp_path / "a.out")]) == 0
    assert len((tmp_path / "a.out").read_text().split()) == len((text * 30).split())
    # generate --punctuate applies it to samples
    assert main(["generate", str(tiny_run), "--prompt", "the quick", "--max-new-tokens", "8",
                 "--temperature", "0", "--punctuate", str(out), "--output", str(tmp_path / "s.jsonl")]) == 0
    assert "punctuated" in json.loads((tmp_path / "s.jsonl").read_text())


def test_resume_after_a_stop_matches_an_uninterrupted_run(tiny_run, cls_files, tmp_path):
    args = [*cls_args(cls_files), "loop.max_steps=30", "loop.eval_every=10", "optim.lr=2e-3", "head.dropout=0.2"]
    finetune(tiny_run, tmp_path / "a", *args)
    assert main(["finetune", str(tiny_run), "-o", str(tmp_path / "b"), *FAST, *args, "loop.stop_at_step=10"]) == 0
    assert not (tmp_path / "b" / "manifest.json").exists()
    finetune(tiny_run, tmp_path / "b", *args)

    def losses(d):
        return [json.loads(x).get("loss") for x in (d / "metrics.jsonl").read_text().splitlines()]

    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "a" / "best" / "model.safetensors"), load_file(tmp_path / "b" / "best" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_another_config_is_refused(tiny_run, cls_files, tmp_path, capsys):
    args = [*cls_args(cls_files), "loop.max_steps=30", "loop.eval_every=10"]
    out = tmp_path / "cut"
    assert main(["finetune", str(tiny_run), "-o", str(out), *FAST, *args, "loop.stop_at_step=10"]) == 0
    assert main(["finetune", str(tiny_run), "-o", str(out), *FAST, *args, "optim.lr=3e-3"]) != 0
    assert re.search(r"cannot be resumed:\n\s+optim\.lr: .* -> 0\.003", capsys.readouterr().err)
    # how long it runs may change (raising max_steps trains on); resume=false starts anew
    assert main(["finetune", str(tiny_run), "-o", str(out), *FAST, *args, "loop.max_steps=20"]) == 0
    assert main(["finetune", str(tiny_run), "-o", str(out), *FAST, *args, "optim.lr=3e-3", "resume=false"]) == 0


def test_early_stopping_with_patience(tiny_run, cls_files, tmp_path):
    res = finetune(tiny_run, tmp_path / "es", *cls_args(cls_files), "loop.max_steps=200", "loop.eval_every=5",
                   "loop.patience=2", "loop.min_delta=2.0")  # nothing can beat the first by 2.0
    assert res["best_step"] == 5 and res["steps"] == 15


def test_lora_trains_few_parameters_and_merges(tiny_run, cls_files, tmp_path):
    full = finetune(tiny_run, tmp_path / "full", *cls_args(cls_files), "loop.max_steps=20", "loop.eval_every=10")
    lora = finetune(tiny_run, tmp_path / "lora", *cls_args(cls_files), "loop.max_steps=20", "loop.eval_every=10",
                    "lora.r=4")
    assert lora["trainable_parameters"] < full["trainable_parameters"] / 4
    assert lora["val"]["main"] == pytest.approx(lora["best_val"])  # the merged model scores as trained
    keys = load_task_model(tmp_path / "lora" / "best").state_dict().keys()
    assert not any("lora" in k for k in keys)


def test_bad_input_errors(tiny_run, cls_files, tmp_path, capsys):
    val = tmp_path / "val.jsonl"
    val.write_text('{"text": "apple", "label": "fruit"}\n{"text": "rock", "label": "mineral"}\n')
    assert main(["finetune", str(tiny_run), "-o", str(tmp_path / "x"), "--data", str(cls_files["train"]),
                 "--val-data", str(val)]) == 1
    assert "val.jsonl:2: label 'mineral' does not occur in the training data" in capsys.readouterr().err
    bad = tmp_path / "bad.conll"
    bad.write_text("Alice B-PER\n\nlives VBZ O\n")
    assert main(["finetune", str(tiny_run), "-o", str(tmp_path / "y"), "--task", "ner", "--data", str(bad)]) == 1
    assert "bad.conll:3: 3 columns, but line 1 has 2" in capsys.readouterr().err
    assert main(["finetune", str(tiny_run), "-o", str(tmp_path / "z"), "--task", "summarize"]) == 2
    assert "use one of classify, ner, punct, sft, contrastive" in capsys.readouterr().err


def test_finetune_from_an_imported_hf_model(tiny_run, cls_files, tmp_path):
    assert main(["export", str(tiny_run), "-o", str(tmp_path / "hf")]) == 0
    assert main(["import", str(tmp_path / "hf"), "-o", str(tmp_path / "imported")]) == 0
    res = finetune(tmp_path / "imported", tmp_path / "ft", *cls_args(cls_files), "loop.max_steps=10",
                   "loop.eval_every=10")
    assert res["steps"] == 10


@pytest.mark.parametrize("family", ["gpt2", "neox", "bert"])
def test_finetune_from_a_folder_made_by_transformers(family, tiny_run, bert_run, tmp_path):
    """A random-init transformers model saved with save_pretrained (as a hub folder is), then
    `pilelm import` and `pilelm finetune` on it: NER (first sub-token labels) for each family."""
    import transformers

    torch.manual_seed(0)
    folder = tmp_path / "hf"
    if family == "bert":
        tok = transformers.PreTrainedTokenizerFast(
            tokenizer_file=str(bert_run / "tokenizer" / "tokenizer.json"), unk_token="[UNK]", pad_token="[PAD]",
            cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
        hf = transformers.BertForMaskedLM(transformers.BertConfig(
            vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
            max_position_embeddings=64))
    else:
        tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tiny_run / "tokenizer" / "tokenizer.json"),
                                                   eos_token="<|endoftext|>", bos_token="<|endoftext|>")
        if family == "neox":
            hf = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
                vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=256, max_position_embeddings=64, rotary_pct=0.25))
        else:
            hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
                vocab_size=len(tok), n_positions=64, n_embd=64, n_layer=2, n_head=4))
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    assert main(["import", str(folder), "-o", str(tmp_path / "imported")]) == 0
    conll = str(DATA / "tiny.conll")
    res = finetune(tmp_path / "imported", tmp_path / "ft", "--task", "ner", "--data", conll, "--val-data", conll,
                   "--test-data", conll, "loop.max_steps=6", "loop.eval_every=3", "loop.batch_size=4")
    assert res["steps"] == 6 and 0.0 <= res["test"]["f1"] <= 1.0
    assert read_manifest(tmp_path / "ft")["stage"] == "finetune"


def test_pipeline_stage_and_report(tiny_run, cls_files, tmp_path):
    import yaml

    pipeline = {"work_dir": str(tmp_path / "work"), "stages": [
        {"stage": "finetune", "run": str(tiny_run), "task": "classify", "data": [str(cls_files["train"])],
         "output": "cls", "loop": {"max_steps": 10, "eval_every": 5, "num_threads": 1, "tensorboard": False}},
        {"stage": "export", "run": "cls", "output": "cls_hf"}]}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(pipeline))
    assert main(["run", str(tmp_path / "p.yaml"), "finetune.loop.max_steps=5"]) == 0
    report = (tmp_path / "work" / "report.md").read_text()
    assert "## Fine-tuning" in report and "](cls/curves.png)" in report
    assert json.loads((tmp_path / "work" / "cls" / "results.json").read_text())["steps"] == 5
    assert (tmp_path / "work" / "cls_hf" / "config.json").is_file()
