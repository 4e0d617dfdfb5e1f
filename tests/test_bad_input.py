"""Bad input fails early with a message that names the field and the fix."""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES
from huggingface_hub.errors import StrictDataclassError


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(hidden_size=30, num_heads=4), "hidden_size"),
        (dict(forward_mode="fast"), "forward_mode"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(chunk_size=-4), "chunk_size"),
        (dict(num_hidden_layers=-1), "num_hidden_layers"),
        (dict(norm_type="batchnorm"), "norm_type"),
        (dict(ffn_type="moe", num_experts=2, num_experts_per_tok=3), "num_experts_per_tok"),
        (dict(hidden_dropout=1.5), "hidden_dropout"),
        (dict(vocab_size=0), "vocab_size"),
    ],
)
def test_invalid_config_raises_at_construction(family, overrides, field):
    with pytest.raises(StrictDataclassError, match=field):
        family.config(**overrides)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_out_of_vocabulary_ids_raise_before_kernels(family):
    model = family.cls("ForCausalLM")(family.config())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[5, 96]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[-1, 5]]))


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_wrong_attention_mask_shape_raises(family):
    model = family.cls("ForCausalLM")(family.config())
    ids = torch.randint(7, 96, (2, 6))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(3, 6))
    with pytest.raises(ValueError, match="2-D padding mask"):
        model(ids, attention_mask=torch.ones(2, 1, 6, 6))
