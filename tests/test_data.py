"""Offline data layer: byte tokenizer, default corpus, local datasets, causal-LM packing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from datasets import Dataset, DatasetDict
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from hf_extras.data import VOCAB_SIZE, build_byte_tokenizer, load_default_corpus, load_text_dataset
from hf_extras.data.corpus import stable_fraction
from hf_extras.data.tokenizer import PADDED_VOCAB_SIZE, SPECIAL_TOKENS, is_byte_tokenizer
from hf_extras.tasks import causal_lm
from hf_extras.tasks.causal_lm import causal_lm_collator, prepare_causal_lm_dataset

UNICODE_SAMPLES = [
    "hello world",
    "  leading, trailing and  multiple   spaces  ",
    "tabs\tand\nnewlines\r\n\n",
    "héllo wörld — naïve café",
    "日本語のテキスト 中文 한국어",
    "emoji 🎉👍🏽 family 👨‍👩‍👧 flag 🇨🇭",
    "combining e\u0301 a\u0308 \u0915\u094d\u0937",  # decomposed accents, Devanagari conjunct
    "\u200b zero-width, \ufeff BOM, NUL \x00, DEL \x7f, \U0010ffff",
    "def f(x):\n    return x ** 2  # comment\n",
    "",
]


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return build_byte_tokenizer(model_max_length=256)


def char_offsets(text: str) -> list[tuple[int, int]]:
    """Expected offsets: each UTF-8 byte of character i maps to the span (i, i + 1)."""
    return [(i, i + 1) for i, ch in enumerate(text) for _ in ch.encode("utf-8")]


# ---------------------------------------------------------------- tokenizer


def test_vocabulary_layout(tok):
    assert len(tok) == VOCAB_SIZE == 263
    assert PADDED_VOCAB_SIZE == 264 and PADDED_VOCAB_SIZE % 8 == 0
    assert tok.is_fast and isinstance(tok, PreTrainedTokenizerFast)
    expected = ["<pad>", "</s>", "<s>", "<unk>", "<mask>", "<cls>", "<sep>"]
    assert tok.convert_ids_to_tokens(list(range(7))) == expected
    ids = {k: getattr(tok, f"{k[:-6]}_token_id") for k in SPECIAL_TOKENS}
    assert ids == {
        "pad_token": 0,
        "eos_token": 1,
        "bos_token": 2,
        "unk_token": 3,
        "mask_token": 4,
        "cls_token": 5,
        "sep_token": 6,
    }
    assert tok("A", add_special_tokens=False).input_ids == [ord("A") + 7]
    assert sorted(tok.get_vocab().values()) == list(range(263))
    assert tok.model_input_names == ["input_ids", "attention_mask"]
    assert tok.padding_side == "right"


@pytest.mark.parametrize("text", UNICODE_SAMPLES)
def test_unicode_round_trip(tok, text):
    plain = tok(text, add_special_tokens=False).input_ids
    assert plain == [b + 7 for b in text.encode("utf-8")]  # bytes, never <unk>
    assert tok.decode(plain) == text
    with_specials = tok(text).input_ids
    assert with_specials[0] == tok.cls_token_id and with_specials[-1] == tok.sep_token_id
    assert tok.decode(with_specials, skip_special_tokens=True) == text
    assert tok.unk_token_id not in with_specials


def test_random_unicode_round_trip(tok):
    rng = np.random.default_rng(0)
    codepoints = [c for c in rng.integers(0, 0x110000, 4000) if not 0xD800 <= c <= 0xDFFF]
    text = "".join(map(chr, codepoints))
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text.encode("utf-8")) and tok.decode(ids) == text


def test_offsets_point_into_original_text(tok):
    for text in UNICODE_SAMPLES:
        enc = tok(text, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        assert offsets[0] == offsets[-1] == (0, 0)  # <cls>, <sep>
        assert offsets[1:-1] == char_offsets(text), text
    text = "Zürich 🎉!"
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = [text[s:e] for s, e in enc["offset_mapping"]]
    assert spans == ["Z", "ü", "ü", "r", "i", "c", "h", " ", "🎉", "🎉", "🎉", "🎉", "!"]


def test_word_ids_follow_pretokenizer_words(tok):
    text = "Hello, wörld!  It's 3.14 🎉"
    enc = tok(text, return_offsets_mapping=True)
    words = tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)
    word_ids = enc.word_ids()
    assert word_ids[0] is None and word_ids[-1] is None
    assert max(w for w in word_ids if w is not None) == len(words) - 1
    for w in range(len(words)):
        spans = [o for o, wi in zip(enc["offset_mapping"], word_ids) if wi == w]
        assert (spans[0][0], spans[-1][1]) == words[w][1]  # word's character span
        assert enc.word_to_chars(w) == words[w][1]
    assert text[slice(*enc.word_to_chars(1))] == ","
    assert text[slice(*enc.word_to_chars(2))] == " wörld"


def test_pair_template_and_padding(tok):
    enc = tok("ab", "c", return_token_type_ids=True)
    assert enc.input_ids == [5, ord("a") + 7, ord("b") + 7, 6, ord("c") + 7, 6]
    assert enc.token_type_ids == [0, 0, 0, 0, 1, 1]
    assert "token_type_ids" not in tok("ab", "c")
    batch = tok(["a", "abc"], padding=True)
    assert batch.input_ids[0] == [5, ord("a") + 7, 6, 0, 0]
    assert batch.attention_mask[0] == [1, 1, 1, 0, 0]


def test_extractive_qa_windows(tok):
    question = "Où est Zürich?"
    context = (
        "Zürich liegt am Zürichsee in der Schweiz — the largest city. 日本語 text and emoji 🇨🇭 "
        "appear here, then the answer: the Limmat river flows through Zürich. "
    ) * 2
    answer = "Limmat river"
    answer_start = context.index(answer)
    enc = tok(
        question,
        context,
        truncation="only_second",
        max_length=64,
        stride=16,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    n = len(enc.input_ids)
    assert n >= 4 and enc["overflow_to_sample_mapping"] == [0] * n
    q_len = len(question.encode("utf-8"))
    context_ids = [b + 7 for b in context.encode("utf-8")]
    all_offsets = char_offsets(context)
    found, prev_ctx, byte_start = False, None, 0
    for i in range(n):
        seq = enc.sequence_ids(i)
        assert len(enc.input_ids[i]) <= 64
        assert seq[0] is None and seq[1 : 1 + q_len] == [0] * q_len and seq[1 + q_len] is None
        assert seq[-1] is None and set(seq[2 + q_len : -1]) == {1}
        offsets = enc["offset_mapping"][i]
        ctx = [(k, offsets[k]) for k in range(len(seq)) if seq[k] == 1]
        ids = [enc.input_ids[i][k] for k, _ in ctx]
        if prev_ctx is not None:
            assert prev_ctx[-16:] == ids[:16]  # consecutive windows overlap by `stride` tokens
            byte_start += len(prev_ctx) - 16
        prev_ctx = ids
        # the window holds context bytes [byte_start, byte_start + len) and their char offsets
        assert ids == context_ids[byte_start : byte_start + len(ids)]
        assert [o for _, o in ctx] == all_offsets[byte_start : byte_start + len(ids)]
        # locate the answer tokens the way QA preprocessing does
        starts = [k for k, (s, _) in ctx if s == answer_start]
        ends = [k for k, (_, e) in ctx if e == answer_start + len(answer)]
        if starts and ends:
            found = True
            s_tok, e_tok = starts[0], ends[-1]
            span = (offsets[s_tok][0], offsets[e_tok][1])
            assert context[span[0] : span[1]] == answer
    assert found
    assert byte_start + len(prev_ctx) == len(context_ids)  # the last window reaches the end


def test_save_and_reload_through_auto_tokenizer(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert loaded.is_fast and len(loaded) == VOCAB_SIZE
    assert loaded.model_input_names == ["input_ids", "attention_mask"]
    assert loaded.padding_side == "right" and loaded.model_max_length == 256
    for attr in ("pad", "eos", "bos", "unk", "mask", "cls", "sep"):
        assert getattr(loaded, f"{attr}_token") == getattr(tok, f"{attr}_token")
        assert getattr(loaded, f"{attr}_token_id") == getattr(tok, f"{attr}_token_id")
    for text in UNICODE_SAMPLES:
        a = tok(text, "pair → ü", return_offsets_mapping=True, return_token_type_ids=True)
        b = loaded(text, "pair → ü", return_offsets_mapping=True, return_token_type_ids=True)
        assert a == b and a.word_ids() == b.word_ids()
        assert loaded.decode(b.input_ids, skip_special_tokens=True) == text + "pair → ü"
    assert is_byte_tokenizer(loaded)


def test_is_byte_tokenizer_rejects_changed_vocab():
    changed = build_byte_tokenizer()
    changed.add_tokens(["<extra>"])
    assert not is_byte_tokenizer(changed)


def test_is_byte_tokenizer_refuses_a_large_byte_level_bpe_by_its_length(monkeypatch):
    """A GPT-2-style vocabulary is refused without building its vocabulary dict (63 ms at 50k entries; the QA
    pipeline asks for every tokenizer it serves)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(vocab={f"t{i}": i for i in range(5000)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel()
    large = PreTrainedTokenizerFast(tokenizer_object=backend)
    monkeypatch.setattr(type(large), "get_vocab", lambda self: pytest.fail("get_vocab was built"))
    assert not is_byte_tokenizer(large)


# ---------------------------------------------------------------- default corpus


def test_default_corpus_is_deterministic_and_split_by_path_hash():
    first, second = load_default_corpus(), load_default_corpus()
    for split in ("train", "validation"):
        assert first[split].to_dict() == second[split].to_dict()
        assert len(first[split]) > 0 and first[split].column_names == ["text", "source"]
    train, val = set(first["train"]["source"]), set(first["validation"]["source"])
    assert not train & val
    assert all(stable_fraction(s) < 0.02 for s in val)
    assert all(stable_fraction(s) >= 0.02 for s in train)
    sources = first["train"]["source"][:] + first["validation"]["source"][:]
    assert not any(
        s.startswith(("site-packages", "test/")) or "/test/" in s or "/tests/" in s or "idle_test" in s for s in sources
    )
    assert any(s.startswith("pydoc_data:") for s in sources) and "os.py" in sources
    assert all(text.strip() for text in first["train"]["text"][:50])


def test_corpus_split_is_independent_of_hash_seed():
    # A fresh interpreter with another hash seed (`import hf_extras` no longer loads `datasets` or any task).
    code = (
        "from hf_extras.data.corpus import load_default_corpus; "
        "print(','.join(load_default_corpus(validation_fraction=0.1)['validation']['source']))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345" if os.environ.get("PYTHONHASHSEED") != "12345" else "54321"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    here = ",".join(load_default_corpus(validation_fraction=0.1)["validation"]["source"])
    assert run.stdout.strip() == here and here


def test_default_corpus_max_documents():
    small = load_default_corpus(validation_fraction=0.1, max_documents=20)
    again = load_default_corpus(validation_fraction=0.1, max_documents=20)
    assert len(small["train"]) == 18 and len(small["validation"]) == 2
    assert small["train"]["source"][:] == again["train"]["source"][:]
    tiny = load_default_corpus(max_documents=2)
    assert len(tiny["train"]) == 1 and len(tiny["validation"]) == 1
    with pytest.raises(ValueError, match="max_documents"):
        load_default_corpus(max_documents=1)
    with pytest.raises(ValueError, match="validation_fraction"):
        load_default_corpus(validation_fraction=0.0)


# ---------------------------------------------------------------- local datasets


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def test_load_text_dataset_from_jsonl_file(tmp_path):
    rows = [{"content": f"document {i} — ü", "id": i} for i in range(50)]
    write_jsonl(tmp_path / "docs.jsonl", rows)
    ds = load_text_dataset(str(tmp_path / "docs.jsonl"), text_column="content", validation_fraction=0.1, seed=3)
    assert list(ds) == ["train", "validation"]
    assert len(ds["train"]) == 45 and len(ds["validation"]) == 5
    assert "text" in ds["train"].column_names and "content" not in ds["train"].column_names
    texts = set(ds["train"]["text"]) | set(ds["validation"]["text"])
    assert texts == {r["content"] for r in rows}
    again = load_text_dataset(str(tmp_path / "docs.jsonl"), text_column="content", validation_fraction=0.1, seed=3)
    assert again["validation"]["text"][:] == ds["validation"]["text"][:]

    with pytest.raises(ValueError, match="'body'"):
        load_text_dataset(str(tmp_path / "docs.jsonl"), text_column="body")


def test_load_text_dataset_from_folder_keeps_validation(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": f"train {i}"} for i in range(8)])
    write_jsonl(tmp_path / "validation.jsonl", [{"text": f"val {i}"} for i in range(3)])
    ds = load_text_dataset(str(tmp_path))
    assert len(ds["train"]) == 8 and ds["validation"]["text"][:] == [f"val {i}" for i in range(3)]


def test_load_text_dataset_builder_name_and_txt(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": f"a {i}"} for i in range(4)])
    write_jsonl(tmp_path / "b.jsonl", [{"text": f"b {i}"} for i in range(2)])
    ds = load_text_dataset("json", data_files={"train": str(tmp_path / "a.jsonl"), "dev": str(tmp_path / "b.jsonl")})
    assert len(ds["train"]) == 4 and ds["validation"]["text"][:] == ["b 0", "b 1"]
    (tmp_path / "lines.txt").write_text("one\ntwo\nthree\nfour\n", encoding="utf-8")
    txt = load_text_dataset(str(tmp_path / "lines.txt"), validation_fraction=0.25)
    assert len(txt["train"]) == 3 and len(txt["validation"]) == 1


def test_load_text_dataset_none_is_default_corpus():
    ds = load_text_dataset(None, validation_fraction=0.05)
    assert set(ds) == {"train", "validation"}
    assert ds["validation"]["source"][:] == load_default_corpus(0.05)["validation"]["source"][:]


# ---------------------------------------------------------------- causal LM packing


def test_causal_packing_exact_ids(tok):
    ds = DatasetDict(
        train=Dataset.from_dict({"text": ["ab", "cde", "é"]}), validation=Dataset.from_dict({"text": ["xyz"]})
    )
    packed = prepare_causal_lm_dataset(ds, tok, block_size=3, packing="concat")
    b = lambda s: [x + 7 for x in s.encode("utf-8")]  # noqa: E731
    eos = tok.eos_token_id
    stream = b("ab") + [eos] + b("cde") + [eos] + b("é") + [eos]  # 10 tokens -> 3 blocks
    assert packed["train"]["input_ids"][:] == [stream[0:3], stream[3:6], stream[6:9]]
    assert packed["train"]["attention_mask"][:] == [[1, 1, 1]] * 3
    assert packed["validation"]["input_ids"][:] == [b("xyz")]  # its eos is the dropped remainder
    assert packed["train"].column_names == ["input_ids", "attention_mask"]


def test_causal_packing_default_corpus(tok, monkeypatch):
    corpus = load_default_corpus(validation_fraction=0.25, max_documents=8)
    packed = prepare_causal_lm_dataset(corpus, tok, block_size=128, packing="concat")
    again = prepare_causal_lm_dataset(corpus, tok, block_size=128, packing="concat")
    for split in ("train", "validation"):
        ids = np.array(packed[split]["input_ids"][:])
        assert ids.ndim == 2 and ids.shape[1] == 128 and ids.shape[0] > 10
        assert (np.array(packed[split]["attention_mask"][:]) == 1).all()
        assert np.array_equal(ids, np.array(again[split]["input_ids"][:]))
        total = sum(len(t.encode("utf-8")) + 1 for t in corpus[split]["text"])
        assert ids.shape[0] == total // 128
        # eos separates documents: one eos per document (minus any in the dropped remainder)
        n_docs = len(corpus[split])
        assert n_docs - 1 <= (ids == tok.eos_token_id).sum() <= n_docs
        first_doc_len = len(corpus[split]["text"][0].encode("utf-8"))
        assert ids.reshape(-1)[first_doc_len] == tok.eos_token_id
        assert tok.decode(ids.reshape(-1)[:first_doc_len]) == corpus[split]["text"][0]


def test_byte_shortcut_matches_tokenizer(tok, monkeypatch):
    texts = UNICODE_SAMPLES[:-1] + ["literal <s> and </s> and <mask> stay special", "a" * 1000]
    ds = DatasetDict(train=Dataset.from_dict({"text": texts}))
    fast = prepare_causal_lm_dataset(ds, tok, block_size=16)
    monkeypatch.setattr(causal_lm, "is_byte_tokenizer", lambda _: False)
    slow = prepare_causal_lm_dataset(ds, tok, block_size=16)
    assert fast["train"]["input_ids"][:] == slow["train"]["input_ids"][:]
    flat = sum(fast["train"]["input_ids"][:], [])
    assert tok.bos_token_id in flat and tok.mask_token_id in flat


def test_causal_packing_multiprocess_matches(tok):
    ds = DatasetDict(train=Dataset.from_dict({"text": [f"doc {i} ✓" * (i + 1) for i in range(40)]}))
    one = prepare_causal_lm_dataset(ds, tok, block_size=8, batch_size=10)
    two = prepare_causal_lm_dataset(ds, tok, block_size=8, batch_size=10, num_proc=2)
    assert one["train"]["input_ids"][:] == two["train"]["input_ids"][:]


def test_causal_collator(tok):
    collate = causal_lm_collator(tok, packing="concat")  # transformers' collator (other modes: test_recipes_packing)
    eos = tok.eos_token_id
    batch = collate([{"input_ids": [10, 11, eos, 12]}, {"input_ids": [13, eos]}])
    assert batch["input_ids"].tolist() == [[10, 11, eos, 12], [13, eos, 0, 0]]
    assert batch["labels"].tolist() == [[10, 11, eos, 12], [13, eos, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
