"""Sequence and token classification and masked-LM recipes: preprocessing units and `hf-extras train` runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA
from datasets import ClassLabel, Dataset, DatasetDict, Features, Sequence, Value
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

import hf_extras
from hf_extras.cli import main
from hf_extras.data import build_byte_tokenizer
from hf_extras.tasks.masked_lm import masked_lm_collator
from hf_extras.tasks.sequence_classification import prepare_sequence_classification_dataset
from hf_extras.tasks.token_classification import align_word_labels, prepare_token_classification_dataset

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = [
    "--hidden_size", "32", "--num_hidden_layers", "1", "--num_heads", "2", "--max_steps", "3",
    "--max_train_samples", "48", "--max_eval_samples", "16", "--per_device_train_batch_size", "8",
    "--max_seq_length", "64", "--eval_strategy", "no", "--logging_steps", "1", "--disable_tqdm", "true",
]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    return build_byte_tokenizer()


def metrics_of(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


# --- sequence classification -------------------------------------------------------------------------------------


def test_pairs_are_joined_with_the_separator_and_labels_named(tokenizer):
    raw = DatasetDict(
        train=Dataset.from_dict({"text": ["ab", "cd"], "hyp": ["x", "y"], "label": ["yes", "no"]}),
        validation=Dataset.from_dict({"text": ["ef"], "hyp": ["z"], "label": ["yes"]}),
    )
    data, names = prepare_sequence_classification_dataset(raw, tokenizer, text_pair_column="hyp")
    assert names == ["no", "yes"] and data["train"]["labels"] == [1, 0]
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    ids = data["train"][0]["input_ids"]
    assert tokenizer.decode(ids) == "<cls>ab<sep>x<sep>"
    assert ids[0] == cls and ids[3] == sep and ids[-1] == sep and len(ids) == 6
    raw["validation"] = Dataset.from_dict({"text": ["ef"], "hyp": ["z"], "label": ["maybe"]})
    with pytest.raises(ValueError, match="'maybe'.*does not occur in the training split"):
        prepare_sequence_classification_dataset(raw, tokenizer, text_pair_column="hyp")
    with pytest.raises(ValueError, match="set text_pair_column"):
        prepare_sequence_classification_dataset(raw, tokenizer, text_pair_column="premise")


def test_class_label_ids_pass_through(tokenizer):
    features = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos"])})
    split = Dataset.from_dict({"text": ["a", "b", "c"], "label": [1, 0, 1]}, features=features)
    data, names = prepare_sequence_classification_dataset(DatasetDict(train=split, validation=split), tokenizer)
    assert names == ["neg", "pos"] and data["validation"]["labels"] == [1, 0, 1]


def test_sequence_classification_offline_default(tmp_path):
    out = tmp_path / "run"
    assert main(["train", str(CONFIGS / "sequence_classification.yaml"), *TINY, f"--output_dir={out}"]) == 0
    metrics = metrics_of(out)
    assert metrics["task"] == "sequence_classification" and metrics["steps"] == 3
    assert 0.0 <= metrics["final_eval_accuracy"] <= 1.0 and "final_eval_macro_f1" in metrics
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.id2label == {0: "comment", 1: "docstring"}


def test_sequence_classification_local_multiemo_pairs(tmp_path):
    source = os.path.join(SHARED_DATA, "multiemo_en_sentences.jsonl")
    if not os.path.isfile(source):
        pytest.skip("../shared/data/multiemo_en_sentences.jsonl is not available")
    with open(source, encoding="utf-8") as f:
        rows = [json.loads(next(f)) for _ in range(60)]
    path = tmp_path / "multiemo.jsonl"  # a pair column too, so the run exercises text pairs from a file
    path.write_text("".join(json.dumps({"sentence": r["text"], "context": "review", **r}) + "\n" for r in rows))
    out = tmp_path / "run"
    argv = ["train", str(CONFIGS / "sequence_classification.yaml"), *TINY, f"--output_dir={out}",
            f"--dataset_name={path}", "--text_column=sentence", "--text_pair_column=context"]  # fmt: skip
    assert main(argv) == 0
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert set(model.config.label2id) == {r["label"] for r in rows}
    assert main([*argv, "--label_column=sentiment"]) == 2  # missing column: a configuration error naming it


# --- token classification ----------------------------------------------------------------------------------------


def test_align_word_labels():
    word_ids = [None, 0, 0, 1, 2, 2, 2, None]
    assert align_word_labels(word_ids, [5, 6, 7]) == [-100, 5, -100, 6, 7, -100, -100, -100]


def test_word_labels_land_on_first_sub_tokens(tokenizer):
    features = Features({"text": Sequence(Value("string")), "ner_tags": Sequence(ClassLabel(names=["O", "X"]))})
    split = Dataset.from_dict({"text": [["def", "main", "(", ")"]], "ner_tags": [[1, 0, 1, 1]]}, features=features)
    data, names = prepare_token_classification_dataset(DatasetDict(train=split, validation=split), tokenizer)
    row = data["train"][0]
    # <cls> d e f ␣ m a i n ␣ ( ␣ ) <sep>: each word's first byte (its prefix space) carries the label
    assert tokenizer.decode(row["input_ids"]) == "<cls>def main ( )<sep>"
    assert names == ["O", "X"]
    assert row["labels"] == [-100, 1, -100, -100, 0, -100, -100, -100, -100, 1, -100, 1, -100, -100]


def test_token_classification_offline_default(tmp_path):
    out = tmp_path / "run"
    assert main(["train", str(CONFIGS / "token_classification.yaml"), *TINY, f"--output_dir={out}"]) == 0
    metrics = metrics_of(out)
    assert metrics["task"] == "token_classification" and "final_eval_accuracy" in metrics
    model = AutoModelForTokenClassification.from_pretrained(out)
    assert set(model.config.label2id) == {"COMMENT", "KEYWORD", "NAME", "NUMBER", "OP", "STRING"}


def test_token_classification_local_jsonl(tmp_path):
    rows = [{"tokens": ["Alice", "met", "Bob", "in", "Paris"], "tags": ["B-PER", "O", "B-PER", "O", "B-LOC"]}] * 20
    path = tmp_path / "ner.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    argv = ["train", str(CONFIGS / "token_classification.yaml"), *TINY, f"--output_dir={out}",
            f"--dataset_name={path}", "--text_column=tokens", "--label_column=tags"]  # fmt: skip
    assert main(argv) == 0
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForTokenClassification.from_pretrained(out)
    assert model.config.id2label == {0: "B-LOC", 1: "B-PER", 2: "O"}
    ids = tokenizer(["Alice", " met"], is_split_into_words=True, return_tensors="pt")
    assert model(**ids).logits.shape == (1, ids["input_ids"].shape[1], 3)


# --- masked LM ---------------------------------------------------------------------------------------------------


def test_masking_is_15_percent_80_10_10(tokenizer):
    torch.manual_seed(0)
    ids = torch.randint(7, 263, (64, 512))
    collator = masked_lm_collator(tokenizer)
    batch = collator([{"input_ids": row} for row in ids])
    targets = batch["labels"] != -100
    assert torch.equal(batch["labels"][targets], ids[targets])
    assert targets.float().mean().item() == pytest.approx(0.15, abs=0.01)
    masked = batch["input_ids"][targets] == tokenizer.mask_token_id
    unchanged = batch["input_ids"][targets] == ids[targets]
    assert masked.float().mean().item() == pytest.approx(0.8, abs=0.02)
    assert unchanged.float().mean().item() == pytest.approx(0.1, abs=0.02)  # (+ the rare random = original)
    assert torch.equal(batch["input_ids"][~targets], ids[~targets])


def test_masked_lm_offline_default(tmp_path):
    out = tmp_path / "run"
    argv = ["train", str(CONFIGS / "masked_lm.yaml"), "--hidden_size=32", "--num_hidden_layers=1", "--max_steps=2",
            "--block_size=64", "--max_train_samples=32", "--max_eval_samples=8", "--per_device_train_batch_size=8",
            "--eval_strategy=no", "--disable_tqdm=true", f"--output_dir={out}"]  # fmt: skip
    assert main(argv) == 0
    metrics = metrics_of(out)
    assert metrics["final_eval_perplexity"] == pytest.approx(np.exp(metrics["final_eval_loss"]), rel=1e-4)
    assert 0.0 <= metrics["final_eval_masked_accuracy"] <= 1.0
    assert hf_extras.RetNetForMaskedLM.from_pretrained(out).config.bidirectional
    data = tmp_path / "notes.csv"  # any text file replaces the corpus
    data.write_text("note\n" + "".join(f"sentence number {i} is plain English text\n" for i in range(60)))
    assert main([*argv, f"--dataset_name={data}", "--text_column=note", "--validation_fraction=0.2"]) == 0
    assert metrics_of(out)["train_samples"] > 0


# --- fine-tuning from a checkpoint -------------------------------------------------------------------------------


@pytest.fixture
def causal_lm_folder(tmp_path):
    config = hf_extras.RetNetConfig(vocab_size=264, hidden_size=32, num_hidden_layers=1, num_heads=2)
    folder = tmp_path / "causal"
    hf_extras.RetNetForCausalLM(config).save_pretrained(folder)
    build_byte_tokenizer().save_pretrained(folder)
    return folder


def fine_tune_config(tmp_path: Path, checkpoint: Path) -> str:
    """A fine-tuning YAML: task, data and training keys only; the architecture comes from the checkpoint."""
    path = tmp_path / "finetune.yaml"
    path.write_text(f"task: sequence_classification\nvalidation_fraction: 0.2\nmodel_name_or_path: {checkpoint}\n")
    return str(path)


def test_fine_tune_a_saved_causal_lm_into_sequence_classification(tmp_path, causal_lm_folder):
    out = tmp_path / "run"
    pairs = zip(TINY[::2], TINY[1::2])
    tiny = [a for k, v in pairs if k not in ("--hidden_size", "--num_hidden_layers", "--num_heads") for a in (k, v)]
    argv = ["train", fine_tune_config(tmp_path, causal_lm_folder), *tiny, f"--output_dir={out}",
            "--learning_rate=0", "--classifier_pooling=last"]  # fmt: skip
    assert main(argv) == 0
    causal = hf_extras.RetNetForCausalLM.from_pretrained(causal_lm_folder)
    tuned = AutoModelForSequenceClassification.from_pretrained(out)
    assert type(tuned).__name__ == "RetNetForSequenceClassification"
    assert tuned.config.hidden_size == 32 and tuned.config.classifier_pooling == "last"  # ...explicit keys override
    assert tuned.config.id2label == {0: "comment", 1: "docstring"}
    for name, value in causal.model.state_dict().items():  # learning rate 0: the backbone is the checkpoint's
        assert torch.equal(tuned.model.state_dict()[name], value), name


def test_fine_tune_rejects_a_mismatched_vocabulary_or_shape(tmp_path, causal_lm_folder, capsys):
    out = tmp_path / "run"
    big = build_byte_tokenizer()
    big.add_tokens([f"<extra_{i}>" for i in range(10)])
    big.save_pretrained(tmp_path / "big_tokenizer")
    data = tmp_path / "few.jsonl"  # a small file: each refused run loads its data first
    data.write_text("".join(json.dumps({"text": f"row {i}", "label": i % 2}) + "\n" for i in range(10)))
    base = ["train", fine_tune_config(tmp_path, causal_lm_folder), "--max_steps=1", f"--output_dir={out}",
            f"--dataset_name={data}"]  # fmt: skip
    assert main([*base, "--vocab_size=512"]) == 2
    assert "vocab_size 512 differs from the checkpoint's 264" in capsys.readouterr().err
    assert main([*base, "--tokenizer_name", str(tmp_path / "big_tokenizer")]) == 2  # 263 + 10 tokens > 264
    assert "smaller than the tokenizer (273 tokens)" in capsys.readouterr().err
    assert main([*base, "--model_type=hfx_dyt"]) == 2
    assert "holds a 'hfx_retnet' model" in capsys.readouterr().err
    assert main([*base, "--hidden_size=64"]) == 2  # would silently re-initialise every weight
    assert "hidden_size" in capsys.readouterr().err
