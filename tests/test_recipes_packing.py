"""Recipes with packed documents (issue 17, item 4): `packing` of the causal- and masked-LM recipes, `padding_free` of
the fine-tuning recipes, and the refusals; each checked against a reference built independently of the code under
test (the old concat packing, a Python walk over the eos-separated stream, documents run one per padded row)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict
from families import FAMILIES, head_config
from transformers import (
    DataCollatorForSeq2Seq,
    DataCollatorForTokenClassification,
    DataCollatorWithFlattening,
    Trainer,
    TrainingArguments,
)

from hf_extras.cli import main, parse_train_args
from hf_extras.data import build_byte_tokenizer, load_default_corpus
from hf_extras.data.packing import pack_documents
from hf_extras.errors import ConfigError
from hf_extras.tasks.causal_lm import causal_lm_collator, document_labels, prepare_causal_lm_dataset
from hf_extras.tasks.masked_lm import masked_lm_collator
from hf_extras.tasks.padding_free import Seq2SeqFlatteningCollator, TokenLabelFlatteningCollator

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TEXTS = ["ab", "cdefghijklm", "", "n", "opqrstu", "vw", "xyz0123456789", "é✓"]  # one longer than two blocks, one empty
BLOCK = 5
FAMILY = {f.name: f for f in FAMILIES}


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


def _dataset(texts=TEXTS) -> DatasetDict:
    return DatasetDict(train=Dataset.from_dict({"text": texts}))


def _stream(tok, texts=TEXTS) -> tuple[list[int], list[int]]:
    """Reference: the eos-separated token stream and each token's position in its document (a walk, token by
    token)."""
    ids, positions = [], []
    for text in texts:
        doc = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids += doc
        positions += list(range(len(doc)))
    return ids, positions


def _old_concat(tok, texts, block_size: int) -> list[list[int]]:
    """The causal-LM packing before `packing` existed (one map batch): eos-separated stream cut into full blocks."""
    eos = np.array([tok.eos_token_id], dtype=np.int64)
    pieces = [part for t in texts for part in (np.asarray(tok(t, add_special_tokens=False)["input_ids"]), eos)]
    stream = np.concatenate(pieces)
    n = len(stream) // block_size * block_size
    return stream[:n].reshape(-1, block_size).tolist()


def _rows(split: Dataset) -> list[dict]:
    return [split[i] for i in range(len(split))]


# --- causal LM: the three packings --------------------------------------------------------------------------------


def test_documents_rows_restart_positions_at_document_starts(tok):
    rows = prepare_causal_lm_dataset(_dataset(), tok, BLOCK)["train"]
    assert rows.column_names == ["input_ids", "position_ids"]
    ids, positions = _stream(tok)
    n = len(ids) // BLOCK * BLOCK
    # the rows, concatenated, are the eos-separated stream; positions restart exactly at each document start and
    # count on across block ends (a continuation at column 0 is not a new document)
    assert sum(rows["input_ids"], []) == ids[:n]
    assert sum(rows["position_ids"], []) == positions[:n]
    assert any(row[0] > 0 for row in rows["position_ids"])  # the long document does continue into a block

    batch = causal_lm_collator(tok)(_rows(rows))
    assert set(batch) == {"input_ids", "position_ids", "labels"}  # transformers' padding-free form: no mask, no pad
    labels = batch["labels"].reshape(-1).tolist()
    previous = [None] + ids[: n - 1]  # a document starts at the stream start and after each eos
    expected = [-100 if p is None or p == tok.eos_token_id else t for t, p in zip(ids[:n], previous)]
    assert labels == expected
    assert (batch["labels"] == -100).sum() == sum(1 for p in positions[:n] if p == 0)


def test_concat_is_the_old_packing(tok):
    corpus = load_default_corpus(validation_fraction=0.25, max_documents=6)
    texts = corpus["train"]["text"][:]
    got = prepare_causal_lm_dataset(corpus, tok, 128, packing="concat")["train"]
    assert got.column_names == ["input_ids", "attention_mask"]
    assert got["input_ids"][:] == _old_concat(tok, texts, 128)
    assert np.all(np.array(got["attention_mask"][:]) == 1)
    # documents: the same blocks, plus the positions
    documents = prepare_causal_lm_dataset(corpus, tok, 128)["train"]
    assert documents["input_ids"][:] == got["input_ids"][:]
    # transformers' labels for concat (input_ids, pad id -> -100), unchanged
    batch = causal_lm_collator(tok, packing="concat")(_rows(got)[:4])
    assert torch.equal(batch["labels"], batch["input_ids"]) and "position_ids" not in batch


def test_pad_rows_are_the_documents(tok):
    rows = prepare_causal_lm_dataset(_dataset(), tok, BLOCK, packing="pad")["train"]
    docs = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in TEXTS]
    assert rows["input_ids"][:] == [d[:BLOCK] for d in docs]
    batch = causal_lm_collator(tok, packing="pad")(_rows(rows))
    lengths = [min(len(d), BLOCK) for d in docs]
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for row, labels, n in zip(batch["input_ids"], batch["labels"], lengths):
        assert labels[1:n].tolist() == row[1:n].tolist()  # every real token after the first is a target
        assert (labels[n:] == -100).all() and labels[0] == -100


def test_document_labels_without_positions_mask_pads_and_each_rows_first_token():
    ids = torch.tensor([[5, 6, 7, 0], [0, 8, 9, 10]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])  # right and left padding
    assert document_labels(ids, mask).tolist() == [[-100, 6, 7, -100], [-100, -100, 9, 10]]


def test_unknown_packing_is_named(tok):
    with pytest.raises(ValueError, match="packing must be one of documents, concat, pad"):
        pack_documents([np.arange(3)], 1, 4, "stream")
    with pytest.raises(ConfigError, match="packing"):  # argparse choices, named by the CLI
        parse_train_args(str(CONFIGS / "quickstart.yaml"), ["--packing", "stream"])


def test_ragged_documents_rows_are_refused(tok):
    with pytest.raises(ValueError, match="choose block_size"):
        causal_lm_collator(tok, pad_to_multiple_of=8)
    with pytest.raises(ValueError, match="packing='pad'"):
        causal_lm_collator(tok)(
            [{"input_ids": [5, 6], "position_ids": [0, 1]}, {"input_ids": [7], "position_ids": [0]}]
        )


# --- masked LM ----------------------------------------------------------------------------------------------------


def test_masked_lm_documents_rows_keep_positions_and_mask_on_top(tok):
    rows = prepare_causal_lm_dataset(_dataset(TEXTS * 20), tok, 16)["train"]
    batch = masked_lm_collator(tok, mlm_probability=0.3, seed=0)(_rows(rows))
    assert set(batch) == {"input_ids", "position_ids", "labels"}
    assert batch["position_ids"].tolist() == rows["position_ids"][:]
    original = torch.tensor(rows["input_ids"][:])
    targets = batch["labels"] != -100
    assert 0.2 < targets.float().mean() < 0.4
    assert torch.equal(batch["labels"][targets], original[targets])
    assert not targets[original == tok.eos_token_id].any()  # eos (special) is never a target
    assert torch.equal(batch["input_ids"][~targets], original[~targets])


@pytest.mark.parametrize("family", ["gla", "mamba", "dyt"])
def test_masked_lm_documents_batch_keeps_documents_apart(tok, family):
    """The recipe's masked-LM batch through a bidirectional model: each document's logits are its own."""
    torch.manual_seed(0)
    config = head_config(FAMILY[family], "ForMaskedLM", vocab_size=272, initializer_range=0.2)
    model = FAMILY[family].cls("ForMaskedLM")(config).eval()
    rows = prepare_causal_lm_dataset(_dataset(TEXTS[:4]), tok, 12)["train"]  # "ab", "cdefghijklm", "", "n"
    batch = masked_lm_collator(tok, seed=0)(_rows(rows)[:1])  # row 0: [a b eos c d e f g h i j k]
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        ids = batch["input_ids"][0]
        for start, end in ((0, 3), (3, 12)):
            alone = model(input_ids=ids[None, start:end]).logits[0]
            torch.testing.assert_close(packed[start:end], alone, rtol=1e-5, atol=1e-5)


# --- the same documents, packed with boundaries vs one per padded row: one Trainer step ---------------------------


def _segments(rows: Dataset) -> list[tuple[list[int], list[int]]]:
    """Reference rows: each block cut at its document starts into (ids, positions) pieces, one document piece each."""
    pieces = []
    for ids, positions in zip(rows["input_ids"], rows["position_ids"]):
        starts = [0] + [i for i in range(1, len(ids)) if positions[i] == 0] + [len(ids)]
        pieces += [(ids[a:b], positions[a:b]) for a, b in zip(starts, starts[1:])]
    return pieces


def _padded_batch(pieces, pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in pieces)
    batch = {"input_ids": [], "position_ids": [], "attention_mask": [], "labels": []}
    for ids, positions in pieces:
        pad = width - len(ids)
        batch["input_ids"].append(ids + [pad_id] * pad)
        batch["position_ids"].append(positions + list(range(positions[-1] + 1, positions[-1] + 1 + pad)))
        batch["attention_mask"].append([1] * len(ids) + [0] * pad)
        batch["labels"].append(ids + [-100] * pad)  # column 0 is never predicted (shifted away)
    return {k: torch.tensor(v) for k, v in batch.items()}


class _Fixed(torch.utils.data.Dataset):
    """One pre-collated batch as a dataset of rows (Trainer batches it back with `_stack`)."""

    def __init__(self, batch: dict[str, torch.Tensor]):
        self.batch = batch

    def __len__(self) -> int:
        return len(next(iter(self.batch.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.batch.items()}


def _stack(features):
    return {k: torch.stack([f[k] for f in features]) for k in features[0]}


def _one_step(family, batch, tmp_path, head: str = "ForCausalLM") -> tuple[float, dict[str, torch.Tensor]]:
    """One SGD step of `Trainer` on `batch` (one pre-collated batch); the loss and the parameters after it."""
    torch.manual_seed(0)
    if head == "ForCausalLM":
        config = head_config(FAMILY[family], head, vocab_size=272, initializer_range=0.2)
    else:
        config = FAMILY[family].config(vocab_size=272, initializer_range=0.2)
    model = FAMILY[family].cls(head)(config)
    n = len(next(iter(batch.values())))
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=n, learning_rate=0.1, optim="sgd",
        lr_scheduler_type="constant", report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
        dataloader_drop_last=False, remove_unused_columns=False,
    )  # fmt: skip
    result = Trainer(model=model, args=args, train_dataset=_Fixed(batch), data_collator=_stack).train()
    return result.training_loss, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", ["gla", "retnet", "mamba", "dyt"])
def test_documents_batch_trains_as_the_documents_one_per_padded_row(tok, family, tmp_path):
    rows = prepare_causal_lm_dataset(_dataset(), tok, 8)["train"]
    packed = causal_lm_collator(tok)(_rows(rows))
    padded = _padded_batch(_segments(rows), tok.pad_token_id)
    assert len(padded["input_ids"]) > len(packed["input_ids"])  # some blocks hold several documents
    # the same labels are scored: every token but each piece's first
    assert (packed["labels"][:, 1:] != -100).sum() == (padded["labels"][:, 1:] != -100).sum()
    loss_packed, after_packed = _one_step(family, dict(packed), tmp_path / "packed")
    loss_padded, after_padded = _one_step(family, padded, tmp_path / "padded")
    assert loss_packed == pytest.approx(loss_padded, rel=1e-5)
    for name, value in after_packed.items():
        torch.testing.assert_close(value, after_padded[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


# --- padding-free fine-tuning recipes -----------------------------------------------------------------------------


def test_token_label_flattening_keeps_every_label():
    features = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [2, -100, 1]},
        {"input_ids": [8, 9], "attention_mask": [1, 1], "labels": [0, 3]},
    ]
    batch = TokenLabelFlatteningCollator()(features)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[2, -100, 1, 0, 3]]
    # transformers' own collator writes -100 over each first label (right for shifted causal labels only)
    assert DataCollatorWithFlattening()(features)["labels"].tolist() == [[-100, -100, 1, -100, 3]]
    with pytest.raises(ValueError, match="one label per token"):
        TokenLabelFlatteningCollator()([{"input_ids": [5, 6], "labels": [1]}])


@pytest.mark.parametrize("family", ["gla", "retnet", "mamba", "dyt"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_token_classification_padding_free_loss_equals_padded(tok, family, bidirectional):
    torch.manual_seed(0)
    config = head_config(
        FAMILY[family], "ForTokenClassification", vocab_size=272, initializer_range=0.2, bidirectional=bidirectional
    )
    model = FAMILY[family].cls("ForTokenClassification")(config).eval()
    g = torch.Generator().manual_seed(0)
    features = []
    for n in (4, 9, 1, 6):
        labels = torch.randint(0, 3, (n,), generator=g)
        labels[torch.rand(n, generator=g) < 0.3] = -100
        labels[0] = 1  # a real label on each first token: transformers' collator would drop it
        features.append({"input_ids": torch.randint(7, 260, (n,), generator=g).tolist(), "labels": labels.tolist()})
    flat = TokenLabelFlatteningCollator()(features)
    padded = DataCollatorForTokenClassification(tok)(features)
    with torch.no_grad():
        got = model(**flat)
        want = model(**padded)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    real = torch.cat([want.logits[i, : len(f["input_ids"])] for i, f in enumerate(features)])
    torch.testing.assert_close(got.logits[0], real, rtol=1e-5, atol=1e-5)


def _pairs(seed: int = 0) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    lengths = ((5, 3), (9, 6), (2, 1), (7, 4))  # (source, target incl. eos)
    return [
        {
            "input_ids": torch.randint(7, 260, (s,), generator=g).tolist(),
            "labels": torch.randint(7, 260, (t,), generator=g).tolist(),
        }
        for s, t in lengths
    ]


def test_seq2seq_flattening_collator_shifts_each_target():
    batch = Seq2SeqFlatteningCollator(decoder_start_token_id=2)(
        [
            {"input_ids": [10, 11], "labels": [20, 21, 1]},
            {"input_ids": [12], "labels": [22, 1]},
            {"input_ids": [], "labels": [5]},
        ]
    )
    assert batch["input_ids"].tolist() == [[10, 11, 12]] and batch["position_ids"].tolist() == [[0, 1, 0]]
    assert batch["labels"].tolist() == [[20, 21, 1, 22, 1]]  # every target token, none overwritten
    assert batch["decoder_input_ids"].tolist() == [[2, 20, 21, 2, 22]]
    assert batch["decoder_position_ids"].tolist() == [[0, 1, 2, 0, 1]]


@pytest.mark.parametrize("family", ["gla", "retnet", "mamba", "dyt"])
def test_seq2seq_padding_free_step_equals_padded(tok, family, tmp_path):
    """One Trainer step on the pairs packed into one row each side vs the same pairs padded (transformers' collator):
    the same loss and the same parameters after the step."""
    pairs = _pairs()
    start = FAMILY[family].config(vocab_size=272).decoder_start_token_id
    packed = Seq2SeqFlatteningCollator(decoder_start_token_id=start)(pairs)
    padded = dict(DataCollatorForSeq2Seq(tok, label_pad_token_id=-100)(pairs))
    loss_packed, after_packed = _one_step(family, packed, tmp_path / "packed", "ForConditionalGeneration")
    loss_padded, after_padded = _one_step(family, padded, tmp_path / "padded", "ForConditionalGeneration")
    assert loss_packed == pytest.approx(loss_padded, rel=1e-5)
    for name, value in after_packed.items():
        torch.testing.assert_close(value, after_padded[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize(
    ("task", "config"),
    [
        ("sequence_classification", "sequence_classification.yaml"),
        ("question_answering", "question_answering.yaml"),
    ],
)
def test_heads_with_one_output_per_example_refuse_padding_free(task, config):
    with pytest.raises(ConfigError, match=f"padding_free: true is not supported by task {task}"):
        parse_train_args(str(CONFIGS / config), ["--padding_free", "true"])
    assert parse_train_args(str(CONFIGS / config), ["--padding_free", "false"]).task.padding_free is False


def test_linearize_refuses_document_packing():
    from hf_extras.tasks.linearize import LinearizeArguments

    assert LinearizeArguments().packing == "concat"
    with pytest.raises(ConfigError, match="set packing: concat"):
        LinearizeArguments(packing="documents")


# --- `hf-extras train` with each packing --------------------------------------------------------------------------

TINY = [
    "--max_steps", "2", "--hidden_size", "32", "--num_hidden_layers", "1", "--num_heads", "2",
    "--block_size", "32", "--max_train_samples", "16", "--max_eval_samples", "8",
    "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8", "--eval_strategy", "no",
    "--logging_steps", "1", "--disable_tqdm", "true",
]  # fmt: skip


@pytest.mark.parametrize("packing", ["documents", "concat", "pad"])
def test_quickstart_runs_with_each_packing(packing, tmp_path):
    out = tmp_path / packing
    argv = ["train", str(CONFIGS / "quickstart.yaml"), *TINY, "--sample_max_new_tokens", "4", "--packing", packing]
    assert main([*argv, f"--output_dir={out}"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and np.isfinite(metrics["final_eval_loss"])
    if packing != "pad":  # full blocks
        assert metrics["tokens_seen"] == 2 * 4 * 32


@pytest.mark.parametrize("packing", ["documents", "pad"])
def test_masked_lm_runs_with_packing(packing, tmp_path):
    out = tmp_path / packing
    assert main(["train", str(CONFIGS / "masked_lm.yaml"), *TINY, "--packing", packing, f"--output_dir={out}"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and np.isfinite(metrics["final_eval_loss"])


def test_token_classification_runs_padding_free(tmp_path):
    out = tmp_path / "run"
    argv = ["train", str(CONFIGS / "token_classification.yaml"), "--hidden_size", "32", "--num_hidden_layers", "1",
            "--num_heads", "2", "--max_steps", "2", "--max_train_samples", "16", "--max_eval_samples", "8",
            "--per_device_train_batch_size", "4", "--max_seq_length", "48", "--eval_strategy", "no",
            "--padding_free", "true", "--disable_tqdm", "true", f"--output_dir={out}"]  # fmt: skip
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["final_eval_accuracy"] <= 1.0


def test_seq2seq_runs_padding_free_and_evaluates_padded(tmp_path):
    out = tmp_path / "run"
    argv = ["train", str(CONFIGS / "seq2seq.yaml"), "--max_steps", "2", "--hidden_size", "32", "--num_heads", "2",
            "--max_train_samples", "16", "--max_eval_samples", "4", "--generation_max_length", "6",
            "--max_target_length", "12", "--padding_free", "true", "--disable_tqdm", "true", f"--output_dir={out}"]  # fmt: skip
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and 0.0 <= metrics["final_eval_bleu"] <= 100.0  # generated from padded batches


@pytest.mark.parametrize("lora", [False, True])
def test_trainer_keeps_position_ids_for_the_model(tok, tmp_path, lora):
    """`remove_unused_columns` keeps the dataset columns the model's forward names: `position_ids` reaches it."""
    rows = prepare_causal_lm_dataset(_dataset(), tok, BLOCK)["train"]
    model = FAMILY["retnet"].cls("ForCausalLM")(head_config(FAMILY["retnet"], "ForCausalLM", vocab_size=272))
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=2))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=causal_lm_collator(tok))
    assert args.remove_unused_columns
    batch = next(iter(trainer.get_train_dataloader()))
    assert set(batch) == {"input_ids", "position_ids", "labels"}
