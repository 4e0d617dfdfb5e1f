"""The sequence families of `tests/families.py` at benchmark size (hidden 256, 4 layers, 4 heads, byte vocabulary),
shared by the benchmark scripts that compare a family with itself (checkpointing, compile)."""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from families import FAMILIES  # noqa: E402

DIMS = dict(vocab_size=264, hidden_size=256, num_hidden_layers=4, num_heads=4, chunk_size=64)
FAMILY_NAMES = [f.name for f in FAMILIES]


def causal_lm(name: str, seed: int = 0) -> torch.nn.Module:
    """The causal LM of family `name` (its tiny test config's options, e.g. the GLA gate, at `DIMS`)."""
    family = next(f for f in FAMILIES if f.name == name)
    options = {k: v for k, v in family.tiny.items() if k != "num_heads"}
    torch.manual_seed(seed)
    return family.cls("ForCausalLM")(family.config_class(**{**DIMS, **options}))
