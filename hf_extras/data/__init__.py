"""Offline data layer: the byte-level fast tokenizer, the embedded/default text corpora and extractive-QA windows.

Importing it does not import `datasets` (the corpus functions load it on first call), so `import hf_extras`, whose
question-answering pipeline uses `hf_extras.data.qa_spans`, stays light.
"""

from .corpus import load_default_corpus, load_text_dataset
from .tokenizer import PADDED_VOCAB_SIZE, VOCAB_SIZE, build_byte_tokenizer

__all__ = ["build_byte_tokenizer", "VOCAB_SIZE", "PADDED_VOCAB_SIZE", "load_default_corpus", "load_text_dataset"]
