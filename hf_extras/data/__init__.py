"""Offline data layer: the byte-level fast tokenizer and the embedded/default text corpora."""

from .corpus import load_default_corpus, load_text_dataset
from .tokenizer import PADDED_VOCAB_SIZE, VOCAB_SIZE, build_byte_tokenizer

__all__ = ["build_byte_tokenizer", "VOCAB_SIZE", "PADDED_VOCAB_SIZE", "load_default_corpus", "load_text_dataset"]
