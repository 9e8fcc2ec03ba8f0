"""Fine-tuning end to end through megatron_narrow/finetune.py on two data-parallel CPU ranks: tiny bert and
narrow models learn a classification task whose label needs reading the text (which of two word groups
occurs, anywhere) and a BIO NER task to >= 90% (accuracy, entity span F1); their exports give the same
predictions in stock transformers (narrow through its remote code, also as a text-classification pipeline)."""

from __future__ import annotations

import json
import random
import shutil
import signal
from pathlib import Path

import pytest
import torch

from megatron_narrow.tasks.config import TaskConfig
from megatron_narrow.tasks.kinds import read_examples
from megatron_narrow.tasks.loop import encode_examples, task_logits
from megatron_narrow.tasks.predict import load_classifier

from .conftest import REPO, run_fresh_python
from .distributed import free_port
from .doc_commands import doc_block, doc_workspace
from .runs import latest, losses, pretrain_argv, run_in_this_process, run_to_end, run_tool, start_run_until

FILLER = ["the", "file", "value", "return", "list", "string", "object", "function", "name", "data", "type",
          "default", "path", "module", "class", "method", "number", "time", "line", "is", "of", "to", "a", "in"]
GROUPS = {"problem": ["error", "invalid", "missing", "failed"], "fine": ["success", "valid", "correct", "found"]}
PEOPLE = [["alice"], ["bob", "smith"], ["carol", "jones"], ["dave"], ["eve", "brown"]]
PLACES = [["paris"], ["london"], ["berlin"], ["new", "york"], ["tokyo"]]


def sentiment_examples(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        label = rng.choice(sorted(GROUPS))
        words = [rng.choice(FILLER) for _ in range(rng.randint(5, 14))]
        words.insert(rng.randint(0, len(words)), rng.choice(GROUPS[label]))
        out.append({"text": " ".join(words), "label": label})
    return out


def ner_examples(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        words, tags = [], []
        for _ in range(rng.randint(4, 10)):
            roll = rng.random()
            if roll < 0.15:
                entity, kind = rng.choice(PEOPLE), "PER"
            elif roll < 0.3:
                entity, kind = rng.choice(PLACES), "LOC"
            else:
                words.append(rng.choice(FILLER))
                tags.append("O")
                continue
            words += entity
            tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(entity) - 1)
        out.append({"tokens": words, "tags": tags})
    return out


def write_conll(path: Path, examples: list[dict]) -> Path:
    path.write_text("-DOCSTART- O\n\n" + "".join(
        "".join(f"{w} {t}\n" for w, t in zip(e["tokens"], e["tags"], strict=True)) + "\n" for e in examples))
    return path


@pytest.fixture(scope="module")
def tiny_hf_models(tmp_path_factory, tiny_corpus_data) -> dict[str, Path]:
    """Randomly initialised tiny bert and narrow models as Hugging Face directories with the corpus tokenizer."""
    from megatron_narrow.config import ModelConfig
    from megatron_narrow.convert.checkpoint import build_hf_tokenizer
    from megatron_narrow.convert.export import export_to_hf
    from megatron_narrow.model import BertForPreTraining

    root = tmp_path_factory.mktemp("tiny_hf")
    out = {}
    for variant in ("bert", "narrow"):
        config = ModelConfig(variant=variant, vocab_size=1000, hidden_size=64, num_layers=4, num_heads=4,
                             full_length_layers=2, max_position_embeddings=64)
        directory = export_to_hf(BertForPreTraining(config), root / variant)
        build_hf_tokenizer("sentencepiece", tiny_corpus_data["tokenizer"], model_max_length=64).save_pretrained(
            directory)
        out[variant] = directory
    return out


def finetune_argv(save_dir: Path, init_from: Path, **settings: str) -> list[str]:
    overrides = {"model.init_from": str(init_from), "train.save_dir": str(save_dir), "train.micro_batch_size": "16",
                 "train.lr": "1.0e-3", "train.warmup_steps": "10", "train.log_interval": "10",
                 "train.weight_decay": "0.0", **settings}
    return ["--deepspeed_config", str(REPO / "ds_configs/zero0.json"), *(f"{k}={v}" for k, v in overrides.items())]


def finetune(save_dir: Path, init_from: Path, *, world: int = 2, **settings: str) -> dict:
    run_to_end(finetune_argv(save_dir, init_from, **settings), world=world, entry="finetune", timeout=400)
    return json.loads((save_dir / "eval_results.json").read_text())


@pytest.fixture(scope="module")
def sentiment_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sentiment")
    return {"train": write_jsonl_records(root / "train.jsonl", sentiment_examples(1200, 0)),
            "valid": write_jsonl_records(root / "valid.jsonl", sentiment_examples(200, 1))}


def write_jsonl_records(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("variant", ["bert", "narrow"])
def test_sequence_classification_learns_and_exports(variant, tiny_hf_models, sentiment_files, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    save_dir = tmp_path / "run"
    results = finetune(save_dir, tiny_hf_models[variant], **{
        "task.kind": "sequence", "task.train_file": sentiment_files["train"],
        "task.valid_file": sentiment_files["valid"], "task.max_seq_len": "32", "train.train_steps": "80",
        "train.eval_interval": "40"})  # measured: 0.985 after 40 steps, 1.0 after 100
    assert results["accuracy"] >= 0.9, results
    hf_dir = save_dir / "hf"
    remote = variant == "narrow"
    assert (hf_dir / "modeling_narrow_bert.py").is_file() == remote

    # stock transformers on the export: the same predictions as our model made at the end of the run
    ours = [json.loads(line)["prediction"] for line in (save_dir / "valid_predictions.jsonl").read_text().splitlines()]
    texts = [json.loads(line)["text"] for line in sentiment_files["valid"].read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForSequenceClassification.from_pretrained(hf_dir, trust_remote_code=remote).eval()
    with torch.no_grad():
        logits = model(**tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")).logits
    assert [model.config.id2label[i] for i in logits.argmax(-1).tolist()] == ours
    # logits, not only argmax: transformers' code and ours on the exported weights agree to fp32 rounding
    classifier = load_classifier(hf_dir)
    task = TaskConfig(kind="sequence", max_seq_len=32, labels=classifier.labels)
    tensors, _ = encode_examples(read_examples(sentiment_files["valid"], task), task, classifier.tokenizer,
                                 classifier.labels, "valid")
    with torch.no_grad():
        our_logits = task_logits(classifier.model, tensors, "sequence")
    torch.testing.assert_close(our_logits, logits, atol=1e-5, rtol=0)
    classify = pipeline("text-classification", model=str(hf_dir), trust_remote_code=remote)
    assert [r["label"] for r in classify(texts[:8])] == ours[:8]
    if remote:  # as a user's fresh interpreter sees it: no prompt for remote code, no warning
        script = (f"from transformers import AutoTokenizer, pipeline\n"
                  f"AutoTokenizer.from_pretrained({str(hf_dir)!r})\n"
                  f"classify = pipeline('text-classification', model={str(hf_dir)!r}, trust_remote_code=True)\n"
                  f"print(classify({texts[0]!r})[0]['label'])\n")
        result = run_fresh_python(script)
        assert result.returncode == 0 and result.stdout.strip() == ours[0], result.stdout + result.stderr
        assert result.stderr.strip() == "", result.stderr

    # the batch prediction tool reloads the export into our model code: the run's predictions again
    output = tmp_path / "predictions.jsonl"
    assert run_tool("predict", ["--model", str(hf_dir), "--input", str(sentiment_files["valid"]), "--output",
                                str(output), "--max-seq-len", "32"]) == 0
    assert [json.loads(line)["prediction"] for line in output.read_text().splitlines()] == ours


@pytest.mark.parametrize("variant", ["bert", "narrow"])
def test_ner_learns_span_f1_and_exports(variant, tiny_hf_models, tmp_path):
    """CoNLL files in, BIO tags at each word's first sub-token; the export tags the same in transformers."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    train = write_conll(tmp_path / "train.conll", ner_examples(1200, 0))
    valid_examples = ner_examples(200, 1)
    valid = write_conll(tmp_path / "valid.conll", valid_examples)
    save_dir = tmp_path / "run"
    results = finetune(save_dir, tiny_hf_models[variant], **{
        "task.kind": "token", "task.train_file": train, "task.valid_file": valid, "task.max_seq_len": "40",
        "task.max_labeled_tokens": "24", "train.train_steps": "250", "train.lr": "3.0e-3"})
    assert results["span_f1"] >= 0.9 and results["entities_gold"] > 100, results

    records = [json.loads(line) for line in (save_dir / "valid_predictions.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in records] == [e["tokens"] for e in valid_examples]
    hf_dir = save_dir / "hf"
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForTokenClassification.from_pretrained(hf_dir, trust_remote_code=variant == "narrow").eval()
    classifier = load_classifier(hf_dir)  # our model code on the export: the logits transformers computes below
    task = TaskConfig(kind="token", max_seq_len=40, max_labeled_tokens=24, labels=classifier.labels)
    tensors, _ = encode_examples(read_examples(valid, task)[:20], task, classifier.tokenizer, classifier.labels,
                                 "valid")
    with torch.no_grad():
        our_logits = task_logits(classifier.model, tensors, "token")
    for index, record in enumerate(records[:20]):
        encoding = tokenizer(record["tokens"], is_split_into_words=True, return_tensors="pt")
        firsts, previous = [], None
        for position, word in enumerate(encoding.word_ids()):
            if word is not None and word != previous:
                firsts.append(position)
            previous = word
        with torch.no_grad():
            logits = model(**encoding).logits[0]
        tags = [model.config.id2label[i] for i in logits[firsts].argmax(-1).tolist()]
        assert tags == record["predictions"], record["tokens"]
        torch.testing.assert_close(our_logits[index, :len(firsts)], logits[firsts], atol=1e-5, rtol=0)

    # words only (no tags column) through the batch prediction tool: the run's tags again
    words_only = tmp_path / "words.conll"
    words_only.write_text("".join("".join(f"{w}\n" for w in e["tokens"]) + "\n" for e in valid_examples))
    output = tmp_path / "tags.jsonl"
    assert run_tool("predict", ["--model", str(hf_dir), "--input", str(words_only), "--output", str(output),
                                      "--max-seq-len", "40"]) == 0
    assert [json.loads(line)["predictions"] for line in output.read_text().splitlines()] == \
        [r["predictions"] for r in records]


def test_pairs_from_a_token_drop_pretraining_checkpoint(tmp_path, tiny_corpus_data):
    """The README's fine-tuning command as written (deepspeed launcher, examples/configs/finetune_classification.yaml
    with its MNLI-style file names and fields; two ranks, a short fp32 run): a token_drop pretraining checkpoint
    (its tokenizer from the checkpoint) fine-tunes as plain BERT on text pairs; the export is a stock
    BertForSequenceClassification that classifies pairs as our model did."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    work = doc_workspace(tmp_path / "work")
    run_to_end(pretrain_argv(tiny_corpus_data, work / "runs/narrowbert_base", "token_drop",
                                  ds_config=str(REPO / "ds_configs/zero1.json"),
                                  **{"train.train_steps": "2", "train.save_interval": "0"}))
    rng = random.Random(3)
    pairs = []
    for example in sentiment_examples(96, 2):
        pairs.append({"premise": " ".join(rng.choice(FILLER) for _ in range(6)), "hypothesis": example["text"],
                      "label": example["label"]})
    (work / "data/mnli").mkdir(parents=True)
    train = write_jsonl_records(work / "data/mnli/train.jsonl", pairs)
    shutil.copy(train, work / "data/mnli/dev_matched.jsonl")
    two_ranks = {"deepspeed --num_gpus 8": f"deepspeed --master_port {free_port()} --num_gpus 2"}
    doc_block("readme-finetune").run(work, replace=two_ranks, append=(
        "task.max_seq_len=48 train.train_steps=6 train.micro_batch_size=16 train.lr=1.0e-3 train.warmup_steps=0 "
        "train.precision=fp32"), timeout=400)
    save_dir = work / "runs/finetune_mnli"
    hf_dir = save_dir / "hf"
    model = BertForSequenceClassification.from_pretrained(hf_dir).eval()  # stock class: token dropping is gone
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    encoded = tokenizer([p["premise"] for p in pairs], [p["hypothesis"] for p in pairs], padding=True,
                        truncation=True, max_length=48, return_tensors="pt")
    assert (encoded["token_type_ids"] == 1).any()
    with torch.no_grad():
        logits = model(**encoded).logits
    hf = [model.config.id2label[i] for i in logits.argmax(-1).tolist()]
    ours = [json.loads(line)["prediction"] for line in (save_dir / "valid_predictions.jsonl").read_text().splitlines()]
    assert hf == ours
    # the same token and segment ids as our encoder, and the same logits to fp32 rounding (an argmax alone would
    # pass a lost token-type embedding: after 6 steps most pairs get one label)
    classifier = load_classifier(hf_dir)
    task = TaskConfig(kind="sequence", max_seq_len=48, labels=classifier.labels, text_field="premise",
                      text_pair_field="hypothesis")
    tensors, _ = encode_examples(read_examples(train, task), task, classifier.tokenizer, classifier.labels, "train")
    width = encoded["input_ids"].shape[1]
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        assert torch.equal(tensors[key][:, :width].long(), encoded[key]), key
        assert not tensors[key][:, width:].any(), key
    with torch.no_grad():
        our_logits = task_logits(classifier.model, tensors, "sequence")
    torch.testing.assert_close(our_logits, logits, atol=1e-5, rtol=0)
    assert json.loads((save_dir / "finetune_config.json").read_text())["task"]["text_pair_field"] == "hypothesis"


@pytest.mark.parametrize(("overrides", "expected"), [
    ({}, "model.init_from is required"),
    ({"model.init_from": "{tmp}"}, "task.train_file is required"),
    ({"task.kind": "ranking"}, "task.kind must be sequence, regression or token"),
    ({"task.metrics": "[pearson]"}, "task.metrics ['pearson'] for task.kind=sequence: choose from accuracy, macro_f1"),
    ({"model.init_from": "{tmp}", "task.train_file": "{tmp}/missing.jsonl"}, "missing.jsonl does not exist"),
    ({"model.init_from": "{tmp}", "task.train_file": "{tmp}/config.json"}, "config.json lacks ['vocab_size'"),
])
def test_bad_finetune_runs_are_refused_in_one_line(overrides, expected, tmp_path, capsys, monkeypatch):
    argv = ["--deepspeed_config", str(REPO / "ds_configs/zero0.json"),
            *(f"{k}={v.format(tmp=tmp_path)}" for k, v in overrides.items())]
    (tmp_path / "config.json").write_text("{}")  # an HF directory that is never reached
    assert run_in_this_process(argv, monkeypatch, entry="finetune") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines


def regression_examples(count: int, seed: int) -> list[dict]:
    """STS-B-like numeric targets: the score is how many "problem" words a sentence holds (0-3)."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        words = [rng.choice(FILLER) for _ in range(rng.randint(5, 12))]
        problems = rng.randint(0, 3)
        for _ in range(problems):
            words.insert(rng.randint(0, len(words)), rng.choice(GROUPS["problem"]))
        out.append({"sentence": " ".join(words), "score": float(problems)})
    return out


def test_regression_learns_pearson_and_spearman_and_exports(tiny_hf_models, tmp_path):
    """task.kind=regression: one output and an MSE loss; Pearson/Spearman (and MSE) on the valid file, the export
    a stock BertForSequenceClassification with problem_type regression whose outputs are our scores, and the
    prediction tool its scores."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root = tmp_path / "data"
    root.mkdir()
    files = {split: write_jsonl_records(root / f"{split}.jsonl", regression_examples(count, seed))
             for split, count, seed in (("train", 1200, 0), ("valid", 200, 1))}
    save_dir = tmp_path / "run"
    results = finetune(save_dir, tiny_hf_models["bert"], **{
        "task.kind": "regression", "task.train_file": files["train"], "task.valid_file": files["valid"],
        "task.text_field": "sentence", "task.label_field": "score", "task.metrics": "[pearson, spearman, mse]",
        "task.max_seq_len": "32", "train.train_steps": "80"})  # measured: Pearson 0.99 after 150 steps
    assert set(results) == {"pearson", "spearman", "mse"} and results["pearson"] >= 0.8, results
    hf = AutoModelForSequenceClassification.from_pretrained(save_dir / "hf")
    assert hf.config.problem_type == "regression" and hf.config.num_labels == 1
    ours = [json.loads(line)["prediction"] for line in (save_dir / "valid_predictions.jsonl").read_text().splitlines()]
    assert all(isinstance(p, float) for p in ours)
    # stock transformers' outputs on the export are our model's scores, to fp32 rounding
    texts = [json.loads(line)["sentence"] for line in files["valid"].read_text().splitlines()]
    encoded = AutoTokenizer.from_pretrained(save_dir / "hf")(texts, padding=True, truncation=True, max_length=32,
                                                              return_tensors="pt")
    with torch.no_grad():
        stock = hf.eval()(**encoded).logits[:, 0]
    assert stock.tolist() == pytest.approx(ours, abs=1e-5)
    assert max(ours) - min(ours) > 1.0, "the scores must spread over the 0-3 range, not sit at one value"
    output = tmp_path / "predictions.jsonl"
    # --text-field and --max-seq-len default to the fine-tuning run's (sentence, 32)
    assert run_tool("predict", ["--model", str(save_dir / "hf"), "--input", str(files["valid"]), "--output",
                                str(output)]) == 0
    predicted = [json.loads(line)["prediction"] for line in output.read_text().splitlines()]
    assert predicted == pytest.approx(ours, abs=1e-5)
    (tmp_path / "pretraining" / "checkpoints").mkdir(parents=True)  # a pretraining save_dir, not an export
    assert run_tool("predict", ["--model", str(tmp_path / "pretraining"), "--input", str(files["valid"]), "--output",
                      str(output)]) == 2


def safetensors_of(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(hf_dir / "model.safetensors")


@pytest.mark.parametrize("kind", ["sequence", "token"])
def test_sigterm_checkpoints_and_the_rerun_equals_an_uninterrupted_run(kind, tiny_hf_models, sentiment_files,
                                                                       tmp_path):
    """SIGTERM mid-run (two ranks, dropout on, an evaluation and a best export before and after the stop): exit 75
    with a checkpoint at the stopped step; the rerun resumes there and ends with the uninterrupted run's losses,
    metrics and weights, bit for bit."""
    if kind == "token":
        files = {"train": write_conll(tmp_path / "train.conll", ner_examples(300, 0)),
                 "valid": write_conll(tmp_path / "valid.conll", ner_examples(60, 1))}
        extra = {"task.max_seq_len": "40", "task.max_labeled_tokens": "24"}
    else:
        files, extra = sentiment_files, {"task.max_seq_len": "32"}
    settings = {"task.kind": kind, "task.train_file": files["train"], "task.valid_file": files["valid"],
                "train.train_steps": "24", "train.eval_interval": "8", "train.log_interval": "1", **extra}
    reference = tmp_path / "reference"
    finetune(reference, tiny_hf_models["narrow"], **settings)

    save_dir = tmp_path / "stopped"
    argv = finetune_argv(save_dir, tiny_hf_models["narrow"], **settings)
    run = start_run_until(argv, lambda: (save_dir / "metrics.jsonl").is_file() and len(losses(save_dir)) >= 10,
                          world=2, entry="finetune")
    run.send_signal(signal.SIGTERM)
    assert run.wait() == 75, run.output()[-3000:]
    stopped_at = max(losses(save_dir))
    assert 10 <= stopped_at < 24 and f"SIGTERM: checkpoint saved at step {stopped_at}" in run.output()
    assert latest(save_dir) == f"step_{stopped_at:07d}" and not (save_dir / "eval_results.json").exists()

    output = run_to_end(argv, world=2, entry="finetune")
    assert f"resumed from step {stopped_at}" in output
    assert losses(save_dir) == losses(reference)
    for name in ("eval_results.json", "finetune_summary.json", "best/eval_results.json"):
        assert json.loads((save_dir / name).read_text()) == json.loads((reference / name).read_text()), name
    assert json.loads((save_dir / "finetune_summary.json").read_text())["step"] == 24
    for name in ("hf", "best/hf"):
        mine, reference_weights = safetensors_of(save_dir / name), safetensors_of(reference / name)
        assert mine.keys() == reference_weights.keys()
        assert all(torch.equal(mine[k], reference_weights[k]) for k in mine), name


def test_early_stopping_keeps_the_best_model(tiny_hf_models, sentiment_files, tmp_path):
    """lr 1e-12, below fp32's resolution (the weights never change): no evaluation beats the first, so
    task.early_stopping_patience=2 stops at the third; the best export is the first evaluation's, and a rerun of
    the finished run trains no further step."""
    save_dir = tmp_path / "run"
    settings = {"task.train_file": sentiment_files["train"], "task.valid_file": sentiment_files["valid"],
                "task.max_seq_len": "32", "task.early_stopping_patience": "2", "train.lr": "1.0e-12",
                "train.train_steps": "50", "train.eval_interval": "4", "train.log_interval": "1"}
    results = finetune(save_dir, tiny_hf_models["bert"], world=1, **settings)
    summary = json.loads((save_dir / "finetune_summary.json").read_text())
    assert summary == {"step": 12, "best_metric": "accuracy", "best_value": results["accuracy"], "best_step": 4,
                       "stopped_early": True}
    assert json.loads((save_dir / "best" / "finetune_summary.json").read_text())["step"] == 4
    assert json.loads((save_dir / "best" / "eval_results.json").read_text()) == results
    assert max(losses(save_dir)) == 12 and latest(save_dir) == "step_0000012"
    output = run_to_end(finetune_argv(save_dir, tiny_hf_models["bert"], **settings), entry="finetune")
    assert "resumed from step 12" in output and max(losses(save_dir)) == 12
